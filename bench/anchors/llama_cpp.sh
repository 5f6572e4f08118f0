#!/usr/bin/env bash
# llama.cpp anchor: runs llama-bench (CPU) on MODEL for prompt processing (pp P) and
# generation (tg N), and prints JSON {"prefill_tok_s": x, "decode_tok_s": y} (llama-bench's
# mean over its repetitions).  Usage: llama_cpp.sh MODEL.gguf [--threads T] [--prompt-len P]
# [--gen N] [--reps R]   (defaults 2, 64, 64, 5; run setup.sh first)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: llama_cpp.sh MODEL.gguf [--threads T] [--prompt-len P] [--gen N]" >&2; exit 2; }
MODEL="$1"; shift
T=2 P=64 N=64 R=5
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) T="$2"; shift 2 ;; --prompt-len) P="$2"; shift 2 ;;
    --gen) N="$2"; shift 2 ;; --reps) R="$2"; shift 2 ;;
    *) echo "llama_cpp.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -f "$MODEL" ] || { echo "llama_cpp.sh: no such model: $MODEL" >&2; exit 1; }
BIN="${EGRET_CACHE:-$HOME/.cache/egret}/anchors/bin"

# llama-bench -o json prints one record per test: n_prompt>0 is pp, n_gen>0 is tg.
"$BIN/llama-bench" -m "$MODEL" -t "$T" -p "$P" -n "$N" -r "$R" -o json 2>/dev/null | python3 -c '
import json, sys
recs = json.load(sys.stdin)
pp = next(r["avg_ts"] for r in recs if r["n_prompt"] > 0 and r["n_gen"] == 0)
tg = next(r["avg_ts"] for r in recs if r["n_gen"] > 0 and r["n_prompt"] == 0)
print(json.dumps({"prefill_tok_s": round(pp, 1), "decode_tok_s": round(tg, 1)}))'
