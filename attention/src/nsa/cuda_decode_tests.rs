//! The device NSA decode against the CPU cache ([`NsaCache`], itself held to the forward's last
//! row by the CPU tests), on `squid_cuda::testing::test_device()` (the PTX simulator here).
//!
//! Both caches get the same tokens (uniform in [-2, 2], gates in [0.25, 0.75], rounded to the
//! storage type) in the same chunks (a prefill, then single tokens), and each sequence's newest
//! token is decoded at several lengths. Checked: the compressed blocks bit for bit (same f32
//! sums), the chosen blocks exactly (random scores have no ties within rounding; blocks no
//! compressed block reaches score exactly 0 on both sides and go to the lower index), and `o`
//! within `4u (1 + max |cpu|)`, u the storage unit roundoff (each side rounds once to storage,
//! and their f32 softmaxes differ in summation order and `exp`).

use half::{bf16, f16};
use squid_cuda::dtype::unit_roundoff;
use squid_cuda::launch::{DeviceCopy, Gpu};
use squid_cuda::Element;

use super::{NsaDeviceCache, HEAD_CHUNK};
use crate::dense::cuda_tests::device;
use crate::dense::tests::{to, values};
use crate::nsa::{NsaCache, NsaConfig};
use crate::{Error, Heads};

/// A small config whose lengths below 100 have free blocks to choose: l = 8, d = 4, l' = 16.
fn small_cfg(n: usize, window: usize) -> NsaConfig {
    NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: n, window, ..NsaConfig::default() }
}

/// Feeds both caches `chunks[i]` tokens per sequence at step i (prefill first), decoding after
/// each step; returns the largest relative `o` error seen.
fn run_case<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: NsaConfig,
    h: Heads,
    steps: &[Vec<usize>],
    separate: bool,
    seed: u64,
) -> f64 {
    let ns = steps[0].len();
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let cap: usize = (0..ns).map(|s| steps.iter().map(|c| c[s]).sum::<usize>()).max().unwrap();
    let mut cpu = NsaCache::<T>::new(cfg, h, ns, separate).unwrap();
    let mut dev = NsaDeviceCache::<T>::new(gpu, cfg, h, ns, cap, separate).unwrap();
    let u = unit_roundoff(T::DTYPE) as f64;
    let mut worst = 0f64;
    for (i, counts) in steps.iter().enumerate() {
        let total: usize = counts.iter().sum();
        let seed = seed + 16 * i as u64;
        let k = to::<T>(&values(total * hkv * dk, seed));
        let v = to::<T>(&values(total * hkv * dv, seed + 1));
        let kw = to::<T>(&values(total * hkv * dk, seed + 2));
        let vw = to::<T>(&values(total * hkv * dv, seed + 3));
        let mut row = 0;
        for (s, &c) in counts.iter().enumerate() {
            let (kr, vr) = (&k[row * hkv * dk..][..c * hkv * dk], &v[row * hkv * dv..][..c * hkv * dv]);
            let win = separate.then(|| (&kw[row * hkv * dk..][..c * hkv * dk], &vw[row * hkv * dv..][..c * hkv * dv]));
            cpu.append(s, kr, vr, win).unwrap();
            row += c;
        }
        let (kd, vd) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
        let (kwd, vwd) = (gpu.upload(&kw).unwrap(), gpu.upload(&vw).unwrap());
        let win = separate.then(|| (kwd.view(), vwd.view()));
        dev.append(gpu, counts, kd.view(), vd.view(), win).unwrap();
        for s in 0..ns {
            assert_eq!(dev.len(s), cpu.len(s));
            let (kc, vc) = dev.compressed_to_host(gpu, s).unwrap();
            let (kc_cpu, vc_cpu) = cpu.compressed(s).unwrap();
            assert!(kc == kc_cpu && vc == vc_cpu, "step {i}, sequence {s}: compressed blocks differ from the CPU's");
        }
        let q = to::<T>(&values(ns * hq * dk, seed + 4));
        let gates = to::<T>(&values(ns * hq * 3, seed + 5).iter().map(|x| 0.5 + 0.125 * x).collect::<Vec<_>>());
        let want = cpu.decode(&q, &gates).unwrap();
        let (qd, gd) = (gpu.upload(&q).unwrap(), gpu.upload(&gates).unwrap());
        let got = dev.decode(gpu, qd.view(), gd.view()).unwrap();
        let idx = gpu.download(&got.indices).unwrap();
        assert_eq!(
            idx,
            want.indices,
            "step {i}: chosen blocks differ (lengths {:?})",
            (0..ns).map(|s| cpu.len(s)).collect::<Vec<_>>()
        );
        let o = gpu.download(&got.o).unwrap();
        let scale = 1.0 + want.o.iter().fold(0f64, |m, x| m.max((x.to_f32() as f64).abs()));
        let err =
            o.iter().zip(&want.o).map(|(a, b)| (a.to_f32() as f64 - b.to_f32() as f64).abs()).fold(0f64, f64::max);
        let rel = err / scale;
        assert!(rel <= 4.0 * u, "step {i}: o differs from the CPU cache's by {rel:.3e} (bound {:.3e})", 4.0 * u);
        worst = worst.max(rel / u);
    }
    worst
}

/// A prefill of `prefill[s]` tokens, then `extra` single-token steps for every sequence.
fn steps(prefill: &[usize], extra: usize) -> Vec<Vec<usize>> {
    let mut v = vec![prefill.to_vec()];
    v.extend((0..extra).map(|_| vec![1; prefill.len()]));
    v
}

#[test]
fn decode_matches_cpu_cache_gqa_ratios() {
    let Some(gpu) = device() else { return };
    // Lengths around multiples of l = 8, d = 4 and l' = 16, several sequences, GQA 1, 3, 4, 16.
    for (group, hkv, dk, dv) in [(1usize, 2usize, 32usize, 32usize), (3, 1, 24, 40), (4, 2, 64, 64), (16, 1, 32, 16)] {
        let h = Heads::new(group * hkv, hkv, dk, dv);
        let worst = run_case::<bf16>(gpu, small_cfg(4, 12), h, &steps(&[1, 15, 30, 47], 2), false, 7 * group as u64);
        println!("group {group}: worst o error {worst:.2}u");
    }
}

#[test]
fn decode_matches_cpu_cache_separate_window_f16_and_two_head_chunks() {
    let Some(gpu) = device() else { return };
    // 18 heads a group: two chunks of the step CTA; separate window K/V; f16; n = 5 of ~6 blocks.
    let h = Heads::new(HEAD_CHUNK + 2, 1, 16, 24);
    run_case::<f16>(gpu, small_cfg(5, 20), h, &steps(&[63, 80], 2), true, 3);
    // Length-1 sequences and a window of 1.
    let h = Heads::new(4, 4, 16, 16);
    run_case::<f16>(gpu, small_cfg(3, 1), h, &steps(&[1, 1, 1], 3), false, 11);
}

#[test]
fn decode_matches_cpu_cache_paper_config() {
    let Some(gpu) = device() else { return };
    // l = 32, d = 16, l' = 64, n = 16, w = 512 at 700 tokens: 42 compressed blocks, 11 selection
    // blocks (all chosen), the window reaching past the start.
    let h = Heads::new(4, 1, 64, 64);
    run_case::<bf16>(gpu, NsaConfig::default(), h, &steps(&[700], 1), false, 5);
    // n = 4 of the 11 blocks: a real choice.
    let cfg = NsaConfig { num_selected: 4, ..NsaConfig::default() };
    run_case::<bf16>(gpu, cfg, h, &steps(&[700], 1), false, 9);
}

#[test]
fn decode_errors_are_typed() {
    let Some(gpu) = device() else { return };
    let h = Heads::new(2, 1, 16, 16);
    let cfg = small_cfg(4, 8);
    let mut dev = NsaDeviceCache::<bf16>::new(gpu, cfg, h, 2, 4, false).unwrap();
    let q = gpu.upload(&[bf16::ZERO; 2 * 2 * 16]).unwrap();
    let g = gpu.upload(&[bf16::ZERO; 2 * 2 * 3]).unwrap();
    assert!(matches!(dev.decode(gpu, q.view(), g.view()), Err(Error::Cache(_))), "decode of empty sequences");
    let k = gpu.upload(&[bf16::ONE; 5 * 16]).unwrap();
    assert!(matches!(dev.append(gpu, &[5, 0], k.view(), k.view(), None), Err(Error::Cache(_))), "past the capacity");
    assert!(matches!(dev.append(gpu, &[2, 2], k.view(), k.view(), None), Err(Error::Shape(_))), "k of 5 rows for 4");
    let kw = (k.view(), k.view());
    assert!(matches!(dev.append(gpu, &[3, 2], k.view(), k.view(), Some(kw)), Err(Error::Cache(_))), "window k, v");
    assert!(matches!(
        NsaDeviceCache::<bf16>::new(gpu, cfg, Heads::new(2, 1, 320, 16), 1, 4, false),
        Err(Error::Heads(_) | Error::Unsupported(_))
    ));
    assert!(matches!(NsaDeviceCache::<f32>::new(gpu, cfg, h, 1, 4, false), Err(Error::Unsupported(_))));
    dev.append(gpu, &[3, 2], k.view(), k.view(), None).unwrap();
    assert!(matches!(dev.decode(gpu, q.view(), q.view()), Err(Error::Shape(_))), "gates of the wrong length");
    dev.decode(gpu, q.view(), g.view()).unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3))]

    /// Generated shapes: lengths, GQA ratio, head dims, l' and n, window, separate window K/V.
    #[test]
    fn decode_generated_shapes(
        prefill in proptest::collection::vec(1usize..70, 1..4),
        group in proptest::sample::select(vec![1usize, 2, 3, 4, 16]),
        hkv in 1usize..3,
        dims in proptest::sample::select(vec![(16usize, 16usize), (24, 40), (64, 32)]),
        block_slc in proptest::sample::select(vec![8usize, 12, 16]),
        extra_n in 0usize..4,
        window in 1usize..30,
        separate in proptest::prelude::any::<bool>(),
        seed in 0u64..1000,
    ) {
        let Some(gpu) = device() else { return Ok(()) };
        let cfg = NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc, num_selected: 3 + extra_n, window, ..NsaConfig::default() };
        let h = Heads::new(group * hkv, hkv, dims.0, dims.1);
        run_case::<bf16>(gpu, cfg, h, &steps(&prefill, 1), separate, seed);
    }
}

/// Counters of the launches of one call, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    warp_instructions: f64,
    unique_bytes: f64,
    bytes_requested: f64,
    shared_wavefronts: f64,
    tensor_flops: f64,
}

impl Counts {
    fn of(gpu: &Gpu) -> Self {
        let mut c = Counts::default();
        for (_, p) in gpu.take_profiles() {
            c.warp_instructions += p.total_warp_instructions() as f64;
            c.unique_bytes += (p.unique_bytes_read + p.unique_bytes_written) as f64;
            c.bytes_requested += p.global_bytes_requested as f64;
            c.shared_wavefronts += p.shared_wavefronts as f64;
            c.tensor_flops += p.tensor_flops as f64;
        }
        c
    }

    /// `self + (other - self) * f`, counter by counter (a linear extrapolation in keys).
    fn lerp(&self, other: &Self, f: f64) -> Self {
        let l = |a: f64, b: f64| a + (b - a) * f;
        Counts {
            warp_instructions: l(self.warp_instructions, other.warp_instructions),
            unique_bytes: l(self.unique_bytes, other.unique_bytes),
            bytes_requested: l(self.bytes_requested, other.bytes_requested),
            shared_wavefronts: l(self.shared_wavefronts, other.shared_wavefronts),
            tensor_flops: l(self.tensor_flops, other.tensor_flops),
        }
    }

    /// The whole-GPU roofline on H100 SXM (a model): the largest of warp instructions at 4 a
    /// clock per SM, unique DRAM bytes at 3.35 TB/s, shared wavefronts at 1 a clock per SM and
    /// tensor FLOPs at the `mma.sync` rate, all 132 SMs busy (a batch that fills the GPU).
    fn h100_seconds(&self) -> (f64, &'static str) {
        let m = squid_cuda::ptxsim::profile::H100_SXM;
        let per_s = f64::from(m.sms) * m.clock_ghz * 1e9;
        [
            (self.warp_instructions / (m.issue_per_clock_per_sm * per_s), "issue"),
            (self.unique_bytes / m.dram_bytes_per_s, "dram"),
            (self.shared_wavefronts / (m.shared_wavefronts_per_clock_per_sm * per_s), "shared"),
            (self.tensor_flops / (m.mma_flops_per_clock_per_sm * per_s), "tensor"),
        ]
        .into_iter()
        .fold((0.0, "issue"), |a, x| if x.0 > a.0 { x } else { a })
    }
}

/// Keys one NSA decode step reads per kv head at length `t` (compressed, selected, window).
fn nsa_keys(cfg: &NsaConfig, t: usize) -> usize {
    cfg.num_cmp_blocks(t) + (cfg.num_selected * cfg.block_slc).min(t) + cfg.window.min(t)
}

/// Simulator profile of one NSA decode step (the step kernel only) at length `t`.
fn nsa_step_counts(gpu: &Gpu, cfg: NsaConfig, h: Heads, t: usize) -> Counts {
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let mut dev = NsaDeviceCache::<bf16>::new(gpu, cfg, h, 1, t, false).unwrap();
    let k = gpu.upload(&to::<bf16>(&values(t * hkv * dk, 1))).unwrap();
    let v = gpu.upload(&to::<bf16>(&values(t * hkv * dv, 2))).unwrap();
    dev.append(gpu, &[t], &k, &v, None).unwrap();
    let q = gpu.upload(&to::<bf16>(&values(hq * dk, 3))).unwrap();
    let g = gpu.upload(&vec![bf16::from_f32(0.5); hq * 3]).unwrap();
    gpu.take_profiles();
    dev.decode(gpu, &q, &g).unwrap();
    Counts::of(gpu)
}

/// Simulator profile of the dense split-KV decode (one split: one CTA per kv head) at length `t`.
fn dense_step_counts(gpu: &Gpu, h: Heads, t: usize) -> Counts {
    use crate::dense::cuda_decode::{decode, DecodeOptions};
    use crate::dense::DenseConfig;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let k = gpu.upload(&to::<bf16>(&values(t * hkv * dk, 1))).unwrap();
    let v = gpu.upload(&to::<bf16>(&values(t * hkv * dv, 2))).unwrap();
    let q = gpu.upload(&to::<bf16>(&values(hq * dk, 3))).unwrap();
    let opts = DecodeOptions { num_splits: Some(1), batch_invariant: false };
    gpu.take_profiles();
    decode(gpu, &DenseConfig::causal(h), &opts, &q, &k, &v, &[0, 1], &[0, t as u32]).unwrap();
    Counts::of(gpu)
}

/// The modelled NSA / dense decode ratio on H100 (see docs/KERNELS.md, "NSA decode"): both
/// kernels profiled on the simulator at two lengths, every counter extrapolated linearly in the
/// keys each reads, and both timed by the same whole-GPU roofline. Also the K/V bytes a step
/// requests for GQA groups 1, 4 and 16: the group's heads share each K/V row's load. Slow
/// (minutes on the simulator): `cargo test -p squid-attention --features cuda --lib
/// nsa_decode_modelled_ratio -- --ignored --nocapture`.
#[test]
#[ignore = "a profile for docs/KERNELS.md: minutes on the simulator"]
fn nsa_decode_modelled_ratio() {
    use squid_cuda::ptxsim::Options;
    if device().is_none() {
        return;
    }
    let gpu = Gpu::simulator_with(Options { profile: true, ..Options::default() }).unwrap();
    let cfg = NsaConfig::default();
    let (t1, t2) = (1024usize, 4096usize);
    for group in [1usize, 4, 16] {
        let h = Heads::new(group, 1, 128, 128);
        let (n1, n2) = (nsa_step_counts(&gpu, cfg, h, t1), nsa_step_counts(&gpu, cfg, h, t2));
        let (d1, d2) = (dense_step_counts(&gpu, h, t1), dense_step_counts(&gpu, h, t2));
        let kv_row = (128 + 128) * 2;
        println!(
            "group {group:2}: NSA step at T={t2}: {} keys x {kv_row} B = {} B of K/V; profile: {} B requested, {} B unique \
             read+written, {} warp instr.; dense at T={t2}: {} B requested, {} warp instr.",
            nsa_keys(&cfg, t2),
            nsa_keys(&cfg, t2) * kv_row,
            n2.bytes_requested,
            n2.unique_bytes,
            n2.warp_instructions,
            d2.bytes_requested,
            d2.warp_instructions
        );
        // Each K/V row is requested once for the whole group (plus Q, gates, scratch and output).
        let kv = (nsa_keys(&cfg, t2) * kv_row) as f64;
        assert!(
            n2.bytes_requested < 1.3 * kv + (group * 4096) as f64 * 16.0,
            "group {group}: {} B requested for {kv} B of K/V",
            n2.bytes_requested
        );
        for t in [8192usize, 16384, 32768, 65536] {
            let fn_ =
                (nsa_keys(&cfg, t) - nsa_keys(&cfg, t1)) as f64 / (nsa_keys(&cfg, t2) - nsa_keys(&cfg, t1)) as f64;
            let fd = (t - t1) as f64 / (t2 - t1) as f64;
            let (ns, nb) = n1.lerp(&n2, fn_).h100_seconds();
            let (ds, db) = d1.lerp(&d2, fd).h100_seconds();
            println!(
                "  T={t:5}: NSA {:.2} us ({nb}), dense {:.2} us ({db}): ratio {:.1}x (keys {:.1}x)",
                ns * 1e6,
                ds * 1e6,
                ds / ns,
                t as f64 / nsa_keys(&cfg, t) as f64
            );
        }
    }
}
