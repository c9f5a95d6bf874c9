#!/usr/bin/env bash
# candle turns on cudarc's `dynamic-linking`. A crate that asks cudarc for `dynamic-loading`
# explicitly breaks the build of anyone who uses both (candle issues 3209, 3373). This builds a
# throwaway crate that depends on squid-cuda (feature `cuda`) and on cudarc with
# `dynamic-linking`, as a candle user's build would, and type-checks it (no link, so no CUDA
# install is needed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
cudarc_version="$(sed -n 's/^cudarc = { version = "\([^"]*\)".*/\1/p' "$root/Cargo.toml")"
mkdir -p "$dir/src"
cat > "$dir/Cargo.toml" <<TOML
[package]
name = "candle-user"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
squid-cuda = { path = "$root/cuda", features = ["cuda"] }
cudarc = { version = "$cudarc_version", default-features = false, features = ["std", "driver", "nvrtc", "cuda-version-from-build-system", "dynamic-linking"] }

[workspace]
TOML
cat > "$dir/src/main.rs" <<'RS'
fn main() {
    let _ = squid_cuda::Device::discover();
}
RS
CUDARC_CUDA_VERSION=12080 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/candle-compat" \
    cargo check --quiet --manifest-path "$dir/Cargo.toml" --offline 2>&1 || {
    echo "candle compatibility: squid-cuda does not build next to cudarc's dynamic-linking" >&2
    exit 1
}
echo "candle compatibility: ok (squid-cuda builds beside cudarc with dynamic-linking)"
