#!/usr/bin/env bash
# Prepares `gpu-check/` here (where LLVM and Rust are) for one call of a lent GPU machine:
# the bundle of PTX and CPU artifacts, inputs, expected outputs and fixtures
# (`examples/gpu_bundle.rs`), packed as `bundle.tar.xz`, and the runtime-only check binary,
# stripped (the working tree plus what a call carries must stay under 64 MiB). Then, on the
# device, carrying `gpu-check`: `bash bench/gpu-check.sh gpu-check`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-check.tmp
cargo run --release --example gpu_bundle -- gpu-check.tmp/bundle
cargo build --release -p egret-runtime --example gpu_check
cp target/release/examples/gpu_check gpu-check.tmp/
strip gpu-check.tmp/gpu_check
XZ_OPT="-6 -T0" tar -C gpu-check.tmp -cJf gpu-check.tmp/bundle.tar.xz bundle
rm -rf gpu-check.tmp/bundle
rm -rf gpu-check
mv gpu-check.tmp gpu-check
size=$(du -sb gpu-check | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "gpu-check: $size bytes; with the working tree $((size + tree)) of 67108864 a call may carry"
if [ $((size + tree)) -ge 67108864 ]; then
    echo "gpu-prepare: too large to carry to the device" >&2
    exit 1
fi
