#!/usr/bin/env bash
# The GPU check, for one call of a lent GPU machine (no Rust there). Prepare it here with
# `bash bench/gpu-prepare.sh` (the bundle, packed, and the stripped runtime-only binary in
# `gpu-check/`), then run `bench/gpu-check.sh gpu-check` there (carrying `gpu-check`). It makes
# SmolLM2-shaped weights with PyTorch, runs egret's conformance cases, SmolLM2 (GPU against
# CPU) and timings, each step in a process of its own (a fault leaves a CUDA context
# unusable: the other steps still run), then PyTorch's timings on the same card; the tables
# come last.
set -uo pipefail
dir="${1:-gpu-check}"
out="${OUT:-$dir/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
bundle="$dir/bundle"
if [ ! -d "$bundle" ]; then
    bundle="$(mktemp -d)/bundle"
    python3 -c 'import sys, tarfile; f = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **f)' \
        "$dir/bundle.tar.xz" "$(dirname "$bundle")" || exit 1
fi
weights="$(mktemp -d)"
# cuBLAS for the matmul timed in turn with egret's (`matmul pair benches`): PyTorch's own copy.
if [ -z "${EGRET_CUBLAS:-}" ]; then
    EGRET_CUBLAS="$(python3 -c '
import glob, os, torch
top = os.path.dirname(torch.__file__)
roots = [os.path.join(top, "lib"), os.path.join(os.path.dirname(top), "nvidia", "cublas", "lib"),
         "/usr/local/cuda/lib64"]
found = [f for r in roots for f in sorted(glob.glob(os.path.join(r, "libcublas.so*")))]
print(found[0] if found else "")')"
    export EGRET_CUBLAS
fi
# egret's steps run with its folder first on the loader's path, for the libraries it needs
# beside it (PyTorch's steps keep their own).
egret_env=(env)
if [ -n "$EGRET_CUBLAS" ]; then
    egret_env=(env "LD_LIBRARY_PATH=$(dirname "$EGRET_CUBLAS")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi
echo "cuBLAS for the paired matmul: ${EGRET_CUBLAS:-none found, so the search path of the loader}"
python3 "$(dirname "$0")/gpu/torch_ref.py" "$weights" | tee "$out/torch.jsonl"
rc=0
# Each step's own log goes to a scratch folder: a call brings back at most 8 files of $OUT.
steplogs="$(mktemp -d)"
: > "$out/egret.jsonl"
: > "$out/egret.log"
mapfile -t steps < <("$dir/gpu_check" --steps)
for i in "${!steps[@]}"; do
    "${egret_env[@]}" "$dir/gpu_check" "$bundle" "$weights" "${steps[$i]}" >> "$out/egret.jsonl" \
        2> "$steplogs/egret-$i.log" || rc=1
    tee -a "$out/egret.log" < "$steplogs/egret-$i.log" >&2
done
# cuBLAS and SDPA once more: the card's clocks drift over a call.
python3 "$(dirname "$0")/gpu/torch_again.py" | tee -a "$out/torch.jsonl"
echo "--- egret (each step's table: what follows its last empty line) ---"
for i in "${!steps[@]}"; do
    awk 'NF == 0 { n = 0; next } { t[n++] = $0 } END { for (j = 0; j < n; j++) print t[j] }' \
        "$steplogs/egret-$i.log"
done
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
# The goals' ratios: egret's sm_90a kernel over PyTorch's figure before and after egret's steps.
rows = lambda path: [json.loads(l) for l in open(path)]
for name, ours, theirs in [("matmul bf16 4096^3 / cuBLAS", "matmul wgmma (sm_90a)", "matmul bfloat16 4096^3"),
                           ("attention causal t4096 d128 / SDPA flash", "attention causal 16x4096x128 wgmma", "sdpa causal h16 t4096 d128 bfloat16")]:
    e = [r["tflops"] for r in rows(sys.argv[2]) if r.get("what", "").startswith(ours) and "tflops" in r]
    t = [r["tflops"] for r in rows(sys.argv[1]) if r.get("what", "").startswith(theirs) and "forward" not in r["what"]]
    if e and t:
        print(f"ratio {name}: " + ", ".join(f"{e[0] / x:.3f}" for x in t)
              + f" (egret {e[0]:.1f}, torch {', '.join(f'{x:.1f}' for x in t)} TFLOP/s)")
# The matmul timed in turn with cuBLAS in one process: the ratio under the same clocks.
# (`wgmma`: the ring filled by `cp.async`, the default; `tma`: by the tensor memory accelerator)
for r in rows(sys.argv[2]):
    for variant in ["wgmma", "tma"]:
        if "ratio" in r and r.get("what", "").startswith(f"matmul {variant} paired"):
            print(f"ratio matmul bf16 4096^3 / cuBLAS ({variant}), in turn in one process: "
                  f"{r['ratio']:.3f} (rounds {r['ratio_min']:.3f}-{r['ratio_max']:.3f}; "
                  f"egret {r['tflops']:.1f}, cuBLAS {r['cublas_tflops']:.1f} TFLOP/s)")
PY
# The tensor-core kernels under Nsight Compute, where the machine has it, at the card's own
# clocks (`--clock-control none`: the device notes ask that clocks be left alone, and ncu
# otherwise locks them to base for the run): one launch each of the benches' matmul and
# attention (their thirteenth: after the f32 version's twelve runs), or of
# the kernels named in NCU_KERNELS, skipping NCU_SKIP launches of each (by default 12 of the
# former and 1 of the latter), with the metrics
# NCU_METRICS names besides the sections (`stalls`: why warps did not issue, per issued
# instruction, and the tensor pipes' use). Each runs only the bench step its kernel belongs
# to; the reports go to one file, `ncu.txt`.
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then
    : > "$out/ncu.txt"
    skip_default=12
    [ -n "${NCU_KERNELS:-}" ] && skip_default=1
    for k in ${NCU_KERNELS:-matmul_k0 attention_k1}; do
        case "$k" in
            matmul_tma*) step="matmul pair benches tma" ;;
            matmul*) step="matmul benches" ;;
            attention_bwd*) step="attention backward benches" ;;
            *) step="attention benches" ;;
        esac
        echo "=== ncu $k ($step)" >> "$out/ncu.txt"
        metrics=()
        if [ "${NCU_METRICS:-}" = stalls ]; then
            metrics=(--metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active')
        fi
        timeout 120 ncu --clock-control none --kernel-name "regex:egret_bench_${k}" --launch-skip "${NCU_SKIP:-$skip_default}" --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section WarpStateStats \
            --section MemoryWorkloadAnalysis --section SchedulerStats ${metrics[@]+"${metrics[@]}"} \
            "$dir/gpu_check" "$bundle" "$weights" "$step" > "$steplogs/ncu.txt" 2>&1
        cat "$steplogs/ncu.txt" >> "$out/ncu.txt"
        echo "--- ncu $k"
        grep -E "Duration|Compute \(SM\) Throughput|L2 Cache Throughput|Warp Cycles Per Issued|One or More Eligible|ERR|==ERROR" "$steplogs/ncu.txt" | head -12
        # (the stall reasons over 0.2 cycles an instruction, and the busiest pipes)
        awk '/issue_stalled/ && $NF + 0 >= 0.2 { sub("smsp__average_warps_issue_stalled_", ""); sub("_per_issue_active.ratio", ""); print "    stall", $1, $NF }
             /pct_of_peak_sustained_active/ && $NF + 0 >= 5 { print "    pipe", $1, $NF }' "$steplogs/ncu.txt" | head -24
    done
fi
exit $rc
