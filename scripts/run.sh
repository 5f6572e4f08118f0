#!/usr/bin/env bash
# egret's main job: builds egret, then compiles SmolLM2-135M-Instruct for this CPU and generates text from a
# prompt (default "The capital of France is"). Installs what is missing first.
#   scripts/run.sh ["PROMPT"] [more egret generate flags, e.g. --max-new-tokens 64]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --quiet
prompt="${1:-The capital of France is}"
shift || true
exec target/release/egret generate "$EGRET_SMOLLM2_GGUF" --prompt "$prompt" --max-new-tokens 32 "$@"
