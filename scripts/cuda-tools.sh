# Source this file: it installs NVRTC and ptxas from NVIDIA's PyPI wheels into a cache
# directory (once; reused after) and exports SQUID_NVRTC_LIB and SQUID_PTXAS for squid.
# No GPU, driver or CUDA toolkit is needed: these two tools compile and assemble kernels.
#   source scripts/cuda-tools.sh
# shellcheck shell=bash
squid_cuda_tools() {
    local version=12.8.93
    local cache_root="${SQUID_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/squid-ci}"
    local dir="$cache_root/nvidia-$version"
    local lib="$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
    local ptxas="$dir/nvidia/cuda_nvcc/bin/ptxas"
    if [ ! -f "$lib" ] || [ ! -x "$ptxas" ]; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            echo "cuda-tools: installing pip (Debian python3-pip)" >&2
            apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null || return 1
        fi
        local tmp="$dir.tmp.$$"
        rm -rf "$tmp"
        echo "cuda-tools: installing nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12 $version into $dir" >&2
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tmp" \
            "nvidia-cuda-nvrtc-cu12==$version" "nvidia-cuda-nvcc-cu12==$version" || { rm -rf "$tmp"; return 1; }
        rm -rf "$dir" && mkdir -p "$cache_root" && mv "$tmp" "$dir" || return 1
    fi
    export SQUID_NVRTC_LIB="$lib"
    export SQUID_PTXAS="$ptxas"
}
squid_cuda_tools
