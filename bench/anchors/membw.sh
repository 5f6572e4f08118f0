#!/usr/bin/env bash
# Compiles membw.c (cc + OpenMP) into the anchors cache and runs it.
# Usage: membw.sh [--mib M] [--threads T] [--runs R]   (defaults 1024, 2, 10); prints JSON.
set -euo pipefail
MIB=1024 THREADS=2 RUNS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) MIB="$2"; shift 2 ;; --threads) THREADS="$2"; shift 2 ;; --runs) RUNS="$2"; shift 2 ;;
    *) echo "usage: membw.sh [--mib M] [--threads T] [--runs R]" >&2; exit 2 ;;
  esac
done
OUT="${EGRET_CACHE:-$HOME/.cache/egret}/anchors/membw"
mkdir -p "$(dirname "$OUT")"
SRC="$(dirname "$0")/membw.c"
[ "$OUT" -nt "$SRC" ] || cc -O2 -march=native -fopenmp -o "$OUT" "$SRC"
OMP_PROC_BIND=spread "$OUT" "$MIB" "$THREADS" "$RUNS"
