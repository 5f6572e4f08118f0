#!/usr/bin/env bash
# egret against its anchors in one run, alternating (anchor, egret, anchor, egret) so the
# shared machine's noise hits both sides alike; prints each figure and the ratio of the
# means.  Needs bench/anchors/setup.sh and make_f32_gguf.sh done, and a release build:
#   cargo build --release && bash bench/compare.sh [--threads T] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
T=2 R=2
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) T="$2"; shift 2 ;; --rounds) R="$2"; shift 2 ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
C="${EGRET_CACHE:-$HOME/.cache/egret}"
EGRET=target/release/egret
F32="$C/smollm2/SmolLM2-135M-Instruct.F32.gguf"
Q41="$C/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
for f in "$EGRET" "$F32" "$Q41" "$C/anchors/venv/bin/python"; do
  [ -e "$f" ] || { echo "compare.sh: missing $f (see bench/README.md)" >&2; exit 1; }
done
# llama.cpp's Q8_0 of the same weights (from the F32 file), the anchor of egret's int8 weights.
Q80="$C/smollm2/SmolLM2-135M-Instruct.Q8_0.gguf"
if [ ! -s "$Q80" ]; then
  "$C/anchors/bin/llama-quantize" "$F32" "$Q80.tmp" Q8_0 > /dev/null 2>&1 \
    || { echo "compare.sh: llama-quantize to Q8_0 failed" >&2; exit 1; }
  mv "$Q80.tmp" "$Q80"
fi
out=$(mktemp)
for r in $(seq "$R"); do
  echo "numpy $("$C/anchors/venv/bin/python" bench/anchors/numpy_sgemm.py --size 2048 --threads "$T")" >> "$out"
  echo "egret_mm $("$EGRET" bench matmul --size 2048 --threads "$T" --json)" >> "$out"
  echo "llama $(bash bench/anchors/llama_cpp.sh "$F32" --threads "$T" --prompt-len 64 --gen 64)" >> "$out"
  echo "egret_model $("$EGRET" bench model "$Q41" --threads "$T" --prompt-len 64 --gen 64 --json)" >> "$out"
  echo "egret_bf16 $("$EGRET" bench model "$Q41" --threads "$T" --prompt-len 64 --gen 64 --weights-dtype bf16 --json)" >> "$out"
  echo "llama_q8 $(bash bench/anchors/llama_cpp.sh "$Q80" --threads "$T" --prompt-len 64 --gen 64)" >> "$out"
  echo "egret_q8 $("$EGRET" bench model "$Q41" --threads "$T" --prompt-len 64 --gen 64 --weights-dtype q8 --json)" >> "$out"
  echo "llama_q41 $(bash bench/anchors/llama_cpp.sh "$Q41" --threads "$T" --prompt-len 64 --gen 64)" >> "$out"
done
echo "membw $(bash bench/anchors/membw.sh --threads "$T")" >> "$out"
python3 - "$out" <<'PY'
import json, sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    k, v = line.split(" ", 1)
    rows.setdefault(k, []).append(json.loads(v))
mean = lambda k, f: st.mean(r[f] for r in rows[k])
def line(what, ours, anchor):
    print(f"| {what} | {ours:.1f} | {anchor:.1f} | {ours / anchor:.2f}x |")
print("| measure | egret | anchor | ratio |")
print("| --- | --- | --- | --- |")
line("sgemm 2048^3 f32, GFLOP/s (anchor numpy/OpenBLAS)", mean("egret_mm", "gflops"), mean("numpy", "gflops"))
line("SmolLM2 f32 prefill pp64, tok/s (anchor llama.cpp F32)", mean("egret_model", "prefill_tok_s"), mean("llama", "prefill_tok_s"))
line("SmolLM2 f32 decode tg64, tok/s (anchor llama.cpp F32)", mean("egret_model", "decode_tok_s"), mean("llama", "decode_tok_s"))
line("SmolLM2 bf16-weight prefill pp64, tok/s (anchor llama.cpp F32)", mean("egret_bf16", "prefill_tok_s"), mean("llama", "prefill_tok_s"))
line("SmolLM2 bf16-weight decode tg64, tok/s (anchor llama.cpp F32)", mean("egret_bf16", "decode_tok_s"), mean("llama", "decode_tok_s"))
line("SmolLM2 int8-weight prefill pp64, tok/s (anchor llama.cpp Q8_0)", mean("egret_q8", "prefill_tok_s"), mean("llama_q8", "prefill_tok_s"))
line("SmolLM2 int8-weight decode tg64, tok/s (anchor llama.cpp Q8_0)", mean("egret_q8", "decode_tok_s"), mean("llama_q8", "decode_tok_s"))
line("SmolLM2 int8-weight prefill pp64, tok/s (anchor llama.cpp on the Q4_1 file itself)", mean("egret_q8", "prefill_tok_s"), mean("llama_q41", "prefill_tok_s"))
line("SmolLM2 int8-weight decode tg64, tok/s (anchor llama.cpp on the Q4_1 file itself)", mean("egret_q8", "decode_tok_s"), mean("llama_q41", "decode_tok_s"))
# Weight bytes streamed per decoded token: every matmul weight once (the tied embedding
# doubles as the LM head); against the measured copy bandwidth (read + write).
params = 134_515_008
for k, bytes_per in (("egret_model", 4), ("egret_bf16", 2), ("egret_q8", 1 + 4 / 32)):
    gbs = mean(k, "decode_tok_s") * params * bytes_per / 1e9
    print(f"| {k}: weight bytes/token x tok/s = {gbs:.1f} GB/s of {mean('membw', 'rw_gbs'):.1f} GB/s copy read+write ({gbs / mean('membw', 'rw_gbs'):.0%}) |")
print("raw:", json.dumps(rows))
PY
rm -f "$out"
