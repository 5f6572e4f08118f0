#!/usr/bin/env bash
# Builds the performance anchors under ${EGRET_CACHE:-$HOME/.cache/egret}/anchors (idempotent):
#   venv/      Python venv: cmake + ninja (build tools), numpy (OpenBLAS wheels), gguf
#   llama_cpp_python-$V/vendor/llama.cpp   llama.cpp's full source, from the llama-cpp-python sdist
#   build-$V/  CPU-only static build; bin -> build-$V/bin holds llama-bench, llama-simple,
#              llama-completion, llama-quantize.  Log: build.log
# Nothing of llama.cpp is committed; only this script.
set -euo pipefail

V=0.3.36                                  # llama-cpp-python sdist (vendors llama.cpp)
PIP_PINS=(cmake==4.4.5 ninja==1.13.2 numpy==2.4.6 gguf==0.19.0 threadpoolctl==3.8.0)
CACHE="${EGRET_CACHE:-$HOME/.cache/egret}/anchors"
VENV="$CACHE/venv"
LOG="$CACHE/build.log"
mkdir -p "$CACHE"
fail() { tail -40 "$LOG"; echo "setup.sh: failed, see $LOG" >&2; exit 1; }

# 1. venv with the build tools and the Python anchors.
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PINS[@]}"
export PATH="$VENV/bin:$PATH"             # cmake and ninja from pip

# 2. llama.cpp source. --no-binary names only this package: `--no-binary :all:` would make pip
#    compile cmake itself from source (>10 min) while it reads the sdist's metadata.
SRC="$CACHE/llama_cpp_python-$V/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$V" -d "$tmp"
  tar xzf "$tmp/llama_cpp_python-$V.tar.gz" -C "$CACHE"
  rm -rf "$tmp"
fi

# 3. CPU-only build: native ISA, static libs, no server/UI/HTTPS/tests. In this llama.cpp,
#    llama-cli is built only with the server, so llama-simple/llama-completion stand in for it.
BUILD="$CACHE/build-$V"
start=$SECONDS
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON > "$LOG" 2>&1 || fail
cmake --build "$BUILD" -j "$(nproc)" \
  --target llama-bench llama-simple llama-completion llama-quantize >> "$LOG" 2>&1 || fail
ln -sfn "build-$V/bin" "$CACHE/bin"
echo "llama.cpp from llama-cpp-python $V ready in $CACHE/bin (build step: $((SECONDS - start)) s)"
