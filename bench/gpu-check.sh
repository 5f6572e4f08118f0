#!/usr/bin/env bash
# The GPU check, for one call of a lent GPU machine (no Rust there). Prepare it here with
# `bash bench/gpu-prepare.sh` (the bundle and the stripped runtime-only binary in
# `gpu-check/`), then run `bench/gpu-check.sh gpu-check` there (carrying `gpu-check`). It makes
# SmolLM2-shaped weights with PyTorch, runs egret's conformance cases, SmolLM2 (GPU against
# CPU) and timings, then PyTorch's timings on the same card; a table comes last.
set -uo pipefail
dir="${1:-gpu-check}"
out="${OUT:-$dir/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
weights="$(mktemp -d)"
python3 "$(dirname "$0")/gpu/torch_ref.py" "$weights" | tee "$out/torch.jsonl"
"$dir/gpu_check" "$dir/bundle" "$weights" > "$out/egret.jsonl" 2> >(tee "$out/egret.log" >&2)
rc=$?
echo "--- torch (same card) ---"
python3 - "$out/torch.jsonl" "$out/egret.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["what"] == "hf greedy ids":
        hf = r["ids"]
        continue
    print(r["what"], {k: round(v, 4) for k, v in r.items() if isinstance(v, float)})
for line in open(sys.argv[2]):
    r = json.loads(line)
    if r.get("check") == "smollm2":
        same = sum(1 for _ in __import__("itertools").takewhile(lambda p: p[0] == p[1], zip(r["gpu_ids"], hf)))
        print(f"egret gpu greedy ids equal to HF's (f32, GPU) for the first {same}/{len(hf)}")
PY
exit $rc
