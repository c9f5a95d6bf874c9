//! NSA's device kernels (on `test_device()`: the simulator here) against the CPU path on the
//! same stored inputs.
//!
//! Compression: the kernels sum in the CPU path's order with separate roundings, so forward and
//! backward must equal the CPU path bit for bit (bf16 and f16), over generated shapes (lengths
//! of 1 and below l, non-multiples of d and l, many short sequences, H x D not a multiple of
//! anything).

use half::{bf16, f16};
use proptest::prelude::*;
use squid_cuda::launch::{DeviceCopy, Gpu};

use super::*;
use crate::dense::tests::{offsets, to, values};

fn check_compress<T: Element + DeviceCopy + PartialEq + std::fmt::Debug>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    heads: usize,
    dim: usize,
    lens: &[usize],
    seed: u64,
) {
    let cu = offsets(lens);
    let total: usize = lens.iter().sum();
    let x: Vec<T> = to(&values(total * heads * dim, seed));
    let want = compress_mean(cfg, heads, dim, &x, &cu).unwrap();
    let got = cuda::compress_mean(gpu, cfg, heads, dim, &gpu.upload(&x).unwrap(), &cu).unwrap();
    assert_eq!(gpu.download(&got).unwrap(), want, "compress_mean {:?} lens {lens:?}", T::DTYPE);
    let dy: Vec<T> = to(&values(want.len(), seed ^ 0x33));
    let want_dx = compress_mean_backward(cfg, heads, dim, &dy, &cu).unwrap();
    let got_dx = cuda::compress_mean_backward(gpu, cfg, heads, dim, &gpu.upload(&dy).unwrap(), &cu).unwrap();
    assert_eq!(gpu.download(&got_dx).unwrap(), want_dx, "compress_mean_backward {:?} lens {lens:?}", T::DTYPE);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn compress_mean_equals_cpu(
        (l, d) in prop::sample::select(vec![(4usize, 2usize), (8, 4), (6, 3), (16, 8), (5, 5), (32, 16)]),
        heads in 1usize..4,
        dim in prop::sample::select(vec![1usize, 3, 8, 12]),
        lens in prop::collection::vec(1usize..40, 1..6),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = squid_cuda::testing::test_device() else { return Ok(()) };
        let cfg = NsaConfig { block_cmp: l, stride_cmp: d, block_slc: 2 * l.div_ceil(d) * d, ..Default::default() };
        check_compress::<bf16>(&gpu, &cfg, heads, dim, &lens, seed);
        check_compress::<f16>(&gpu, &cfg, heads, dim, &lens, seed);
    }
}

/// Many short sequences (most shorter than l: no block), and an input with no block at all.
#[test]
fn compress_mean_many_short_sequences() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let cfg = NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, ..Default::default() };
    let lens: Vec<usize> = (0..40).map(|i| 1 + (i * 7) % 13).collect();
    check_compress::<bf16>(&gpu, &cfg, 2, 5, &lens, 9);
    check_compress::<f16>(&gpu, &cfg, 1, 4, &[1, 7, 3], 10);
}

/// f32 storage is refused (the CPU path takes it); bad shapes are the CPU path's errors.
#[test]
fn compress_mean_bad_input() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let cfg = NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc: 8, ..Default::default() };
    let x32 = gpu.upload(&[0f32; 16]).unwrap();
    assert!(matches!(cuda::compress_mean(&gpu, &cfg, 1, 2, &x32, &[0, 8]), Err(Error::Unsupported(_))));
    let x = gpu.upload(&[bf16::ZERO; 16]).unwrap();
    assert!(matches!(cuda::compress_mean(&gpu, &cfg, 1, 2, &x, &[0, 7]), Err(Error::CuSeqlens(_))));
    assert!(matches!(cuda::compress_mean(&gpu, &cfg, 3, 2, &x, &[0, 8]), Err(Error::Shape(_))));
    let bad = NsaConfig { stride_cmp: 3, ..cfg };
    assert!(matches!(cuda::compress_mean(&gpu, &bad, 1, 2, &x, &[0, 8]), Err(Error::Config(_))));
    // 8 rows of 2: 3 blocks of 2 values; 5 values is the wrong gradient length.
    assert!(matches!(cuda::compress_mean_backward(&gpu, &cfg, 1, 2, &x, &[0, 8]), Err(Error::Shape(_))));
    let dy = gpu.upload(&[bf16::ONE; 6]).unwrap();
    assert!(cuda::compress_mean_backward(&gpu, &cfg, 1, 2, &dy, &[0, 8]).is_ok());
}

/// Top-n selection on the device equals the CPU choice on the same scores exactly: the ranking
/// is a total order on the f32 bits and the index, so nothing is rounded and near-ties need no
/// tolerance (scores drawn from a few values, so exact ties are common; signed zeros, NaN and
/// infinities included). Chunked prefill positions, per-token counts, forced counts 0..3.
#[test]
fn select_top_n_equals_cpu() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let palette = [0.0f32, 0.25, 0.5, 1.0, -0.0, f32::NAN, f32::INFINITY, -1.0, 0.125];
    let mut state = 7u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for case in 0..6 {
        let (ni, nl) = (case % 3, (case / 2) % 4);
        let n = (ni + nl).max(1) + case % 4;
        let cfg = NsaConfig {
            block_cmp: 4,
            stride_cmp: 2,
            block_slc: 4 + 4 * (case % 2),
            num_selected: n,
            num_initial: ni,
            num_local: nl,
            ..Default::default()
        };
        let hkv = 1 + case % 3;
        let seqs: Vec<(usize, usize)> = (0..1 + case % 3)
            .map(|_| {
                let tk = 1 + next() % 70;
                (tk, 1 + next() % tk)
            })
            .collect();
        let cu_k = offsets(&seqs.iter().map(|s| s.0).collect::<Vec<_>>());
        let cu_q = offsets(&seqs.iter().map(|s| s.1).collect::<Vec<_>>());
        let total_q = *cu_q.last().unwrap() as usize;
        let stride = seqs.iter().map(|s| cfg.num_slc_blocks(s.0)).max().unwrap();
        let scores: Vec<f32> = (0..total_q * hkv * stride).map(|_| palette[next() % palette.len()]).collect();
        let counts: Vec<u32> = (0..total_q)
            .map(|_| (cfg.forced_blocks().max(1) + next() % (n - cfg.forced_blocks().max(1) + 1)) as u32)
            .collect();
        let counts = (case % 2 == 1).then_some(counts);
        let dev = cuda::select_top_n(
            &gpu,
            &cfg,
            hkv,
            &gpu.upload(&scores).unwrap(),
            stride,
            &cu_q,
            Some(&cu_k),
            counts.as_deref(),
        )
        .unwrap();
        let got = gpu.download(&dev).unwrap();
        let mut want = vec![NO_BLOCK; total_q * hkv * n];
        let mut chosen = Vec::new();
        for (s, &(tk, tq)) in seqs.iter().enumerate() {
            for i in 0..tq {
                let row = cu_q[s] as usize + i;
                let t = i + tk - tq;
                let n_t = counts.as_ref().map_or(n, |c| c[row] as usize);
                for g in 0..hkv {
                    let r = row * hkv + g;
                    select_blocks_n(&cfg, t, n_t, &scores[r * stride..][..t / cfg.block_slc + 1], &mut chosen);
                    want[r * n..][..chosen.len()].copy_from_slice(&chosen);
                }
            }
        }
        assert_eq!(got, want, "case {case}: {cfg:?} seqs {seqs:?}");
    }
}
