//! The two small ops this crate ships so the whole path (registry, NVRTC, ptxas, launch) is
//! exercised end to end. Each has a plain reference (`naive`), a fast CPU path (`cpu`) and,
//! with the `cuda` feature, a GPU path (`cuda`).

pub mod axpy;
pub mod softmax;
