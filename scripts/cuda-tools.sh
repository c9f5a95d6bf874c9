# Source this file: it installs NVRTC and ptxas from NVIDIA's PyPI wheels into a cache
# directory (once; reused after) and exports SQUID_NVRTC_LIB and SQUID_PTXAS for squid.
# No GPU, driver or CUDA toolkit is needed: these two tools compile and assemble kernels.
#   source scripts/cuda-tools.sh                              # CUDA 12 (12.8)
#   SQUID_CUDA_TOOLS_VERSION=13 source scripts/cuda-tools.sh  # CUDA 13 (13.0)
#   squid_cuda_tools 13                                       # switch, once sourced
# The two major versions ship different wheels with different layouts:
#   12: nvidia-cuda-nvrtc-cu12 / nvidia-cuda-nvcc-cu12 -> nvidia/cuda_nvrtc/lib/libnvrtc.so.12,
#       nvidia/cuda_nvcc/bin/ptxas
#   13: nvidia-cuda-nvrtc / nvidia-cuda-nvcc (13.x)    -> nvidia/cu13/lib/libnvrtc.so.13,
#       nvidia/cu13/bin/ptxas
# shellcheck shell=bash
squid_cuda_tools() {
    local major="${1:-12}" version packages lib ptxas
    case "$major" in
        12)
            version=12.8.93
            packages=("nvidia-cuda-nvrtc-cu12==$version" "nvidia-cuda-nvcc-cu12==$version")
            lib=nvidia/cuda_nvrtc/lib/libnvrtc.so.12
            ptxas=nvidia/cuda_nvcc/bin/ptxas
            ;;
        13)
            version=13.0.88
            packages=("nvidia-cuda-nvrtc==$version" "nvidia-cuda-nvcc==$version")
            lib=nvidia/cu13/lib/libnvrtc.so.13
            ptxas=nvidia/cu13/bin/ptxas
            ;;
        *)
            echo "cuda-tools: CUDA major version must be 12 or 13, not '$major'" >&2
            return 1
            ;;
    esac
    local cache_root="${SQUID_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/squid-ci}"
    local dir="$cache_root/nvidia-$version"
    if [ ! -f "$dir/$lib" ] || [ ! -x "$dir/$ptxas" ]; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            echo "cuda-tools: installing pip (Debian python3-pip)" >&2
            apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null || return 1
        fi
        local tmp="$dir.tmp.$$"
        rm -rf "$tmp"
        echo "cuda-tools: installing ${packages[*]} into $dir" >&2
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tmp" \
            "${packages[@]}" || { rm -rf "$tmp"; return 1; }
        rm -rf "$dir" && mkdir -p "$cache_root" && mv "$tmp" "$dir" || return 1
    fi
    export SQUID_NVRTC_LIB="$dir/$lib"
    export SQUID_PTXAS="$dir/$ptxas"
}
squid_cuda_tools "${SQUID_CUDA_TOOLS_VERSION:-12}"
