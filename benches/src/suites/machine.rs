//! `machine`: the limits every other figure is judged against. Large f32 matmul through the
//! `gemm` crate (the compute roof) and a large memory copy (the bandwidth roof), each on all
//! threads ("ours") against one thread ("baseline"): the ratio is the parallel speed-up.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::harness::{Case, Work};

/// The matmul the roofs are measured with (shared with the test model).
pub use squid_tests::tiny_model::matmul_into as matmul_f32;

fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
        .collect()
}

/// The cases: matmul (N = 2048, or 1024 with `--quick`) and copy (256 MiB, or 64 MiB).
pub fn cases(quick: bool) -> Vec<Case> {
    let n = if quick { 1024 } else { 2048 };
    let a = filled(n * n, 1);
    let b = filled(n * n, 2);
    let (a2, b2) = (a.clone(), b.clone());
    let mut c = vec![0.0f32; n * n];
    let mut c2 = c.clone();
    let threads = rayon::current_num_threads();
    let matmul = Case {
        suite: "machine",
        case: "matmul_f32".into(),
        params: format!("M=N=K={n} threads={threads}"),
        baseline: "gemm crate, one thread",
        ours: Box::new(move || matmul_f32(&a, &b, &mut c, n, n, n, Parallelism::Rayon(0))),
        base: Box::new(move || matmul_f32(&a2, &b2, &mut c2, n, n, n, Parallelism::None)),
        work: Work::Flops(2.0 * (n as f64).powi(3)),
    };

    let bytes = if quick { 64 << 20 } else { 256 << 20 };
    let len = bytes / 4;
    let src = filled(len, 3);
    let src2 = src.clone();
    let mut dst = vec![0.0f32; len];
    let mut dst2 = vec![0.0f32; len];
    let copy = Case {
        suite: "machine",
        case: "copy".into(),
        params: format!("bytes={}MiB threads={threads}", bytes >> 20),
        baseline: "copy_from_slice, one thread",
        ours: Box::new(move || {
            dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s))
        }),
        base: Box::new(move || dst2.copy_from_slice(&src2)),
        // Read + write, as STREAM counts a copy.
        work: Work::Bytes(2.0 * bytes as f64),
    };
    vec![matmul, copy]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_wrapper_computes_row_major_products() {
        // [1 2; 3 4] @ [5 6; 7 8] = [19 22; 43 50]
        let mut c = [0.0f32; 4];
        matmul_f32(&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], &mut c, 2, 2, 2, Parallelism::None);
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        // Non-square: [1 2 3] @ [1; 1; 1] = [6]
        let mut d = [0.0f32; 1];
        matmul_f32(&[1.0, 2.0, 3.0], &[1.0, 1.0, 1.0], &mut d, 1, 3, 1, Parallelism::Rayon(0));
        assert_eq!(d, [6.0]);
    }
}
