#!/usr/bin/env bash
# egret train against PyTorch (eager, CPU) on the same small LLaMA, the same data and the
# same batches: a model of dim 256, 4 layers, SmolLM2's tokenizer (vocabulary 49152, tied
# embeddings), trained from scratch on the King James Bible (Debian's bible-kjv-text).
#   cargo build --release && bash bench/train/compare.sh [--steps N] [--threads T]
# Needs: apt bible-kjv-text (the `bible` command), the SmolLM2 GGUF (scripts/setup.sh) and
# a Python with torch + transformers ($EGRET_CACHE/refvenv, see tools/make_fixtures.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=200 T=2
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;; --threads) T="$2"; shift 2 ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
C="${EGRET_CACHE:-$HOME/.cache/egret}"
PY="${TORCH_PYTHON:-$C/refvenv/bin/python}"
GGUF="$C/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
command -v bible >/dev/null || { echo "compare.sh: needs the bible command (apt-get install bible-kjv-text)" >&2; exit 1; }
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
bible "Gen1:1-Rev22:21" > "$W/kjv.txt"
cat > "$W/config.json" <<'JSON'
{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,"hidden_size":256,"intermediate_size":768,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,"max_position_embeddings":1024,"bos_token_id":1,"eos_token_id":2}
JSON
HP=(--steps "$STEPS" --batch 1 --seq 256 --lr 1e-3 --warmup 20 --weight-decay 0.01 --seed 0)
target/release/egret tokenize "$GGUF" --file "$W/kjv.txt" > "$W/ids.json"
E=$(target/release/egret train "$W/config.json" --init random --tokenizer "$GGUF" --data "$W/kjv.txt" \
    "${HP[@]}" --threads "$T" --log "$W/egret.jsonl" 2>/dev/null)
P=$("$PY" bench/train/torch_train.py --config "$W/config.json" --ids "$W/ids.json" "${HP[@]}" \
    --threads "$T" --log "$W/torch.jsonl" 2>/dev/null)
python3 - "$W/egret.jsonl" "$W/torch.jsonl" "$E" "$P" <<'PY'
import json, sys
def rows(p): return [json.loads(l) for l in open(p)]
e, t = rows(sys.argv[1]), rows(sys.argv[2])
es, ts = json.loads(sys.argv[3]), json.loads(sys.argv[4])
last = lambda r: sum(x["loss"] for x in r[-10:]) / len(r[-10:])
# steady-state throughput: steps after the first (compilation, warm-up)
tok = lambda r: sum(1 for _ in r[1:]) * 256 / sum(256 / x["tok_s"] for x in r[1:])
print("| measure | egret | PyTorch | ratio |")
print("| --- | --- | --- | --- |")
print(f"| loss, mean of the last 10 of {len(e)} steps | {last(e):.4f} | {last(t):.4f} | {last(e) / last(t):.3f} |")
print(f"| loss at step 1 | {e[0]['loss']:.4f} | {t[0]['loss']:.4f} | |")
print(f"| training tokens/s (steps 2..) | {tok(e):.0f} | {tok(t):.0f} | {tok(e) / tok(t):.2f}x |")
print("torch", ts.get("torch"))
PY
