#!/usr/bin/env bash
# egret's test command: installs what is missing (scripts/setup.sh), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --no-fail-fast "$@"
