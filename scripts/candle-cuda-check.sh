#!/usr/bin/env bash
# Compiles squid-candle with candle's CUDA backend (feature `candle-cuda`), as clippy with
# warnings denied: a type check of squid's CUDA path against candle's CudaStorage and candle's
# cudarc. No GPU is needed, but candle-kernels runs nvcc in its build script (PTX for candle's
# kernels, and a static library of its MoE/GGUF kernels). nvcc comes from NVIDIA's PyPI wheels
# (CUDA 13.0: nvcc, cicc/NVVM, the C runtime and CCCL headers), installed once into the cache
# that scripts/cuda-tools.sh uses, and reached through `NVCC` only (not PATH, so cudarc's CUDA
# version detection elsewhere in the build is unchanged). candle-kernels is compiled for
# `CUDA_COMPUTE_CAP` (default 80).
#   bash scripts/candle-cuda-check.sh
# Its own target directory under the cache (`SQUID_CANDLE_CUDA_TARGET` overrides), so the
# long nvcc build is done once per machine, not once per clone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=13.0.88
cache_root="${SQUID_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/squid-ci}"
dir="$cache_root/nvcc-$version"
if [ ! -x "$dir/nvidia/cu13/bin/nvcc" ] || [ ! -x "$dir/nvidia/cu13/nvvm/bin/cicc" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
    fi
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    echo "candle-cuda-check: installing nvcc $version wheels into $dir" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tmp" \
        "nvidia-cuda-nvcc==$version" "nvidia-nvvm==$version" "nvidia-cuda-crt==$version" \
        "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" || { rm -rf "$tmp"; exit 1; }
    rm -rf "$dir" && mkdir -p "$cache_root" && mv "$tmp" "$dir"
fi
export NVCC="$dir/nvidia/cu13/bin/nvcc"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
"$NVCC" --version | tail -n 1
export CARGO_TARGET_DIR="${SQUID_CANDLE_CUDA_TARGET:-$cache_root/candle-cuda-target}"
cd "$root"
start=$(date +%s)
cargo clippy --quiet -p squid-candle --all-targets --features candle-cuda -- -D warnings
echo "squid-candle --features candle-cuda: clippy clean ($(( $(date +%s) - start ))s)"
