#!/usr/bin/env bash
# egret's test command: installs what is missing (scripts/setup.sh), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --no-fail-fast "$@"
# The GPU tests pass without a GPU by skipping (the test harness hides what they print).
if ! { ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; }; then
  echo "test.sh: no CUDA driver here: the tests that need a GPU were skipped (GPU conformance," \
    "tensor-core matmuls, GPU gradients, GPU generation); every PTX was assembled with ptxas." >&2
fi
