//! The ops this crate ships so the whole path (registry, NVRTC, ptxas, launch, simulator) is
//! exercised end to end: two small ones (`axpy`, `softmax`) and two that prove the
//! instructions later kernels need (`logsumexp`: warp shuffles and `expf` in an online-softmax
//! row reduction; `gemm`: `cp.async`, `ldmatrix` and bf16 `mma.sync`). Each has a plain
//! reference (`naive`), a fast CPU path (`cpu`) and, with the `cuda` feature, a device path
//! (`cuda`) that runs on a GPU or on the simulated device.

pub mod axpy;
pub mod gemm;
pub mod logsumexp;
pub mod softmax;
