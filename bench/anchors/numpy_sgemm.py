#!/usr/bin/env python3
"""float32 GEMM (N x N @ N x N) through numpy/OpenBLAS; prints JSON {"gflops": best, ...}.

Run with the anchors venv (bench/anchors/setup.sh):
  "${EGRET_CACHE:-$HOME/.cache/egret}/anchors/venv/bin/python" numpy_sgemm.py --size 2048 --threads 2
"""
import argparse, json, os, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=2048)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=10, help="timed runs; the best is reported")
args = ap.parse_args()

# Thread count must be fixed before numpy loads OpenBLAS. Some machines here set
# OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for old OpenBLAS builds; they slow a current one, so
# the benchmark drops both (only in this process) and reports the kernel actually used.
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(var, None)

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info  # noqa: E402

n = args.size
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), dtype=np.float32)
np.matmul(a, b, out=c)  # warm-up: thread pool start, page faults

best = float("inf")
for _ in range(args.repeats):
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    best = min(best, time.perf_counter() - t0)

blas = next((p for p in threadpool_info() if p.get("internal_api") == "openblas"), {})
json.dump({"gflops": round(2 * n**3 / best / 1e9, 1), "size": n, "threads": args.threads,
           "numpy": np.__version__, "openblas": blas.get("version"),
           "openblas_kernel": blas.get("architecture"), "openblas_threads": blas.get("num_threads")},
          sys.stdout)
print()
