#!/usr/bin/env bash
# Writes an F32 GGUF of SmolLM2-135M by dequantising the Q4_1 GGUF with llama.cpp's own
# llama-quantize: every tensor becomes F32 (bit-exact dequantisation), all metadata and the
# tokenizer are copied (only general.file_type changes), Q/K rows keep GGUF's permuted order.
# Then checks that llama.cpp loads it and greedily continues "The capital of France is" with
# " Paris.".   Usage: make_f32_gguf.sh [IN.gguf [OUT.gguf]]   (run setup.sh first)
set -euo pipefail

EC="${EGRET_CACHE:-$HOME/.cache/egret}"
BIN="$EC/anchors/bin"
IN="${1:-$EC/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"   # fetched by scripts/setup.sh
OUT="${2:-$EC/smollm2/SmolLM2-135M-Instruct.F32.gguf}"
LOG="$EC/anchors/make_f32_gguf.log"

if [ ! -s "$OUT" ]; then
  "$BIN/llama-quantize" --allow-requantize "$IN" "$OUT.tmp" F32 > "$LOG" 2>&1 \
    || { tail -20 "$LOG"; exit 1; }
  mv "$OUT.tmp" "$OUT"
fi

# llama-simple decodes greedily; 3 tokens are " Paris", "." and a newline.
text="$("$BIN/llama-simple" -m "$OUT" -n 3 "The capital of France is" 2>/dev/null)"
case "$text" in
  "The capital of France is Paris."*) echo "ok: $OUT -> ${text%%$'\n'*}" ;;
  *) echo "make_f32_gguf.sh: unexpected continuation: $text" >&2; exit 1 ;;
esac
