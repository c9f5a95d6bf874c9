#!/usr/bin/env bash
# squid-cuda (feature `cuda`) must build in anyone's cudarc graph. Cargo builds one cudarc with
# the union of every crate's features, and cudarc fails (duplicate definitions) when two CUDA
# versions are selected at once: two `cuda-XXXXX` features, or one plus `CUDARC_CUDA_VERSION`.
# So squid pins none and asks for `cuda-version-from-build-system` + `fallback-latest` +
# `fallback-dynamic-loading` (see the root Cargo.toml).
#
# This type-checks (no link, so no CUDA install) a throwaway crate that depends on squid-cuda
# and on cudarc with each neighbour's feature list, exactly as that neighbour declares it:
#   candle  candle-core 0.11.1's cudarc features (its `cuda` feature): dynamic-linking and
#           version-from-build-system (cudarc itself with that list, not candle-core: candle's
#           kernels need nvcc to build, and the cudarc feature union is what clashes)
#   cubecl  cubecl-cuda 0.12's (0.19-based) cudarc features: fallback-dynamic-loading,
#           version-from-build-system, fallback-latest, nccl
#   pin13   a crate that pins `cuda-13000` (cudarc's default features plus the pin)
# each with CUDARC_CUDA_VERSION unset, 12080 and 13000. Every cell must build, except that a
# crate pinning 13000 cannot build with CUDARC_CUDA_VERSION=12080 whoever else is in the graph
# (cudarc then selects both versions itself); that cell must fail *inside cudarc* and is
# reported as such.
#   bash scripts/check-cudarc-matrix.sh            # the whole matrix
#   bash scripts/check-cudarc-matrix.sh candle     # one neighbour
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
# One target dir for every cell: squid-ptxsim and the other dependencies build once.
target="${CARGO_TARGET_DIR:-$root/target}/cudarc-matrix"
cudarc_version="$(sed -n 's/^cudarc = { version = "\([^"]*\)".*/\1/p' "$root/Cargo.toml")"
if grep -rqE '"cuda-[0-9]{5}"' "$root/Cargo.toml" "$root"/*/Cargo.toml "$root"/*/*/Cargo.toml; then
    echo "cudarc matrix: a workspace manifest pins a cuda-XXXXX feature:" >&2
    grep -rnE '"cuda-[0-9]{5}"' "$root/Cargo.toml" "$root"/*/Cargo.toml "$root"/*/*/Cargo.toml >&2
    exit 1
fi

neighbour_dep() {
    case "$1" in
        candle) echo 'cudarc = { version = "'"$cudarc_version"'", default-features = false, features = ["std", "cublas", "cublaslt", "curand", "driver", "nvrtc", "f16", "f8", "cuda-version-from-build-system", "dynamic-linking"] }' ;;
        cubecl) echo 'cudarc = { version = "'"$cudarc_version"'", default-features = false, features = ["std", "driver", "nvrtc", "nccl", "fallback-dynamic-loading", "cuda-version-from-build-system", "fallback-latest"] }' ;;
        pin13) echo 'cudarc = { version = "'"$cudarc_version"'", features = ["cuda-13000"] }' ;;
        *) echo "unknown neighbour $1" >&2; return 1 ;;
    esac
}

neighbours=("$@")
[ ${#neighbours[@]} -gt 0 ] || neighbours=(candle cubecl pin13)
failed=0
for n in "${neighbours[@]}"; do
    crate="$dir/$n"
    mkdir -p "$crate/src"
    cat > "$crate/Cargo.toml" <<TOML
[package]
name = "squid-beside-$n"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
squid-cuda = { path = "$root/cuda", features = ["cuda"] }
$(neighbour_dep "$n")

[workspace]
TOML
    # The workspace's lock file: the same versions as squid's own build (cargo adds the rest).
    cp "$root/Cargo.lock" "$crate/Cargo.lock"
    cat > "$crate/src/main.rs" <<'RS'
fn main() {
    // Both users of the one cudarc: squid's launch path and the neighbour's own driver calls.
    let _ = squid_cuda::Device::discover();
    let _ = cudarc::driver::CudaContext::device_count();
}
RS
    for version in unset 12080 13000; do
        log="$crate/check-$version.log"
        env_args=(env -u CUDARC_CUDA_VERSION)
        [ "$version" = unset ] || env_args=(env "CUDARC_CUDA_VERSION=$version")
        rc=0
        "${env_args[@]}" CARGO_TARGET_DIR="$target" \
            cargo check --quiet --manifest-path "$crate/Cargo.toml" >"$log" 2>&1 || rc=$?
        if [ "$n" = pin13 ] && [ "$version" = 12080 ]; then
            # cudarc's own clash: only acceptable if squid-cuda is not where it breaks.
            if [ $rc -ne 0 ] && grep -q "could not compile \`cudarc\`" "$log" && ! grep -q "could not compile \`squid-cuda\`" "$log"; then
                # The control: the pinning crate alone (no squid) fails the same way.
                alone="$dir/pin13-alone"
                mkdir -p "$alone/src"
                printf '[package]\nname = "pin13-alone"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n[dependencies]\n%s\n\n[workspace]\n' \
                    "$(neighbour_dep pin13)" > "$alone/Cargo.toml"
                cp "$root/Cargo.lock" "$alone/Cargo.lock"
                echo 'fn main() { let _ = cudarc::driver::CudaContext::device_count(); }' > "$alone/src/main.rs"
                if CUDARC_CUDA_VERSION=12080 CARGO_TARGET_DIR="$target" \
                    cargo check --quiet --manifest-path "$alone/Cargo.toml" >"$alone/check.log" 2>&1; then
                    printf '%-7s CUDARC_CUDA_VERSION=%-6s FAILED (the pin alone builds, so squid breaks it)\n' "$n" "$version"
                    failed=$((failed + 1))
                else
                    printf '%-7s CUDARC_CUDA_VERSION=%-6s expected failure inside cudarc: the pin and the variable select two versions (the pin alone fails too)\n' "$n" "$version"
                fi
                continue
            elif [ $rc -eq 0 ]; then
                printf '%-7s CUDARC_CUDA_VERSION=%-6s ok\n' "$n" "$version"
                continue
            fi
        fi
        if [ $rc -eq 0 ]; then
            printf '%-7s CUDARC_CUDA_VERSION=%-6s ok\n' "$n" "$version"
        else
            printf '%-7s CUDARC_CUDA_VERSION=%-6s FAILED\n' "$n" "$version"
            grep -E '^(error|warning: unused)' "$log" | sort | uniq -c | sort -rn | head -5 >&2 || true
            tail -n 5 "$log" >&2
            failed=$((failed + 1))
        fi
    done
done
if [ $failed -gt 0 ]; then
    echo "cudarc matrix: $failed cell(s) failed: squid-cuda does not compose with that cudarc feature set" >&2
    exit 1
fi
echo "cudarc matrix: ok"
