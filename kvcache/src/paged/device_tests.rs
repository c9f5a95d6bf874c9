//! [`DevicePages`] against the CPU [`PagedKv`] on the test device (the simulator without a GPU):
//! random sequences of page operations leave the same page tables, free lists and (read back)
//! pools, and the paged decode over device pages equals the CPU decode.

use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use squid_attention::dense::cuda_decode::{DecodeOptions, PagedSeq};
use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::Heads;
use squid_cuda::launch::{DeviceCopy, Gpu};
use squid_cuda::testing::test_device;

use super::cuda::DevicePages;
use super::*;

fn values<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            T::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// One page operation, its operands drawn from a seed against the live sequences.
#[derive(Debug, Clone, Copy)]
enum Op {
    Allocate,
    Fork(u64),
    Free(u64),
    Truncate(u64, u64),
    Append(u64, usize),
    Write(u64, u64, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Allocate),
        2 => any::<u64>().prop_map(Op::Fork),
        1 => any::<u64>().prop_map(Op::Free),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Op::Truncate(a, b)),
        4 => (any::<u64>(), 0usize..11).prop_map(|(a, n)| Op::Append(a, n)),
        2 => (any::<u64>(), any::<u64>(), 1usize..6).prop_map(|(a, b, n)| Op::Write(a, b, n)),
    ]
}

/// Both sides' results must agree: the same value, or errors of the same kind.
fn same<A: PartialEq + std::fmt::Debug>(cpu: Result<A, Error>, dev: Result<A, Error>, op: &Op) {
    match (cpu, dev) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{op:?}"),
        (Err(a), Err(b)) => assert_eq!(format!("{a}"), format!("{b}"), "{op:?}"),
        (a, b) => panic!("{op:?}: cpu {a:?}, device {b:?}"),
    }
}

/// Runs `ops` on both and compares everything after each one (pools at the end).
fn run_ops<T: Element + DeviceCopy + PartialEq + std::fmt::Debug>(gpu: &Gpu, config: PagedKvConfig, ops: &[Op]) {
    let mut cpu = PagedKv::<T>::new(config).unwrap();
    let mut dev = DevicePages::<T>::new(gpu, config).unwrap();
    let per_token = config.layers * config.row_len();
    let mut seed = 1u64;
    for op in ops {
        let live: Vec<SeqId> = cpu.sequences().collect();
        let pick = |r: u64| live.get((r % live.len().max(1) as u64) as usize).copied().unwrap_or(SeqId(999));
        match *op {
            Op::Allocate => assert_eq!(cpu.allocate(), dev.allocate()),
            Op::Fork(r) => same(cpu.fork(pick(r)), dev.fork(pick(r)), op),
            Op::Free(r) => same(cpu.free(pick(r)), dev.free(pick(r)), op),
            Op::Truncate(r, l) => {
                let id = pick(r);
                let len = cpu.len(id).unwrap_or(0) as u64;
                // Mostly in range, now and then one past the end (an error on both).
                let to = (l % (len + 2)) as usize;
                same(cpu.truncate(id, to), dev.truncate(id, to), op);
            }
            Op::Append(r, n) => {
                seed += 1;
                let (k, v) = (values::<T>(n * per_token, seed), values::<T>(n * per_token, seed + 1000));
                let (dk, dv) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
                same(cpu.append(pick(r), &k, &v), dev.append(gpu, pick(r), &dk, &dv), op);
            }
            Op::Write(r, s, n) => {
                seed += 1;
                let id = pick(r);
                let len = cpu.len(id).unwrap_or(0) as u64;
                let start = (s % (len + 1)) as usize;
                let layer = (s / 7 % config.layers as u64) as usize;
                let row = config.row_len();
                let (k, v) = (values::<T>(n * row, seed), values::<T>(n * row, seed + 1000));
                let (dk, dv) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
                same(cpu.write(id, layer, start, &k, &v), dev.write(gpu, id, layer, start, &dk, &dv), op);
            }
        }
        assert_eq!(cpu.free_pages(), dev.free_pages(), "{op:?}");
        for id in cpu.sequences() {
            assert_eq!(cpu.page_table(id).unwrap(), dev.page_table(id).unwrap(), "{op:?}");
            assert_eq!(cpu.len(id).unwrap(), dev.len(id).unwrap());
        }
        for p in 0..config.num_pages as u32 {
            assert_eq!(cpu.page_refcount(p), dev.page_refcount(p));
        }
    }
    // The pools, whole (free pages included: both copied and wrote the same rows to the same slots).
    let any = cpu.allocate();
    for layer in 0..config.layers {
        let view = cpu.view(any, layer).unwrap();
        let (k, v) = dev.layer(layer).unwrap();
        assert_eq!(gpu.download(k).unwrap(), view.k_pages, "layer {layer} K");
        assert_eq!(gpu.download(v).unwrap(), view.v_pages, "layer {layer} V");
    }
}

#[test]
fn random_page_operations_match_cpu() {
    let Some(gpu) = test_device() else { return };
    // Pages of 3 tokens (appends of up to 10 cross several; a write into a forked page copies it),
    // a pool small enough to run out (OutOfPages on both), 2 layers, GQA-like rows of 2 x 5.
    let config = PagedKvConfig { layers: 2, kv_heads: 2, head_dim: 5, page_size: 3, num_pages: 14 };
    let strategy = (prop::collection::vec(op(), 1..28), any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 16, ..Config::default() });
    runner
        .run(&strategy, |(mut ops, f32_pool)| {
            ops.insert(0, Op::Allocate);
            if f32_pool {
                run_ops::<f32>(&gpu, config, &ops);
            } else {
                run_ops::<bf16>(&gpu, config, &ops);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fork_then_append_copies_the_shared_last_page() {
    let Some(gpu) = test_device() else { return };
    let config = PagedKvConfig { layers: 1, kv_heads: 1, head_dim: 2, page_size: 4, num_pages: 4 };
    let mut dev = DevicePages::<f32>::new(&gpu, config).unwrap();
    let a = dev.allocate();
    let rows = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    dev.append(&gpu, a, &rows, &rows).unwrap();
    let b = dev.fork(a).unwrap();
    assert_eq!(dev.page_refcount(dev.page_table(a).unwrap()[0]), 2);
    let more = gpu.upload(&[7.0f32, 8.0]).unwrap();
    dev.append(&gpu, b, &more, &more).unwrap();
    let (pa, pb) = (dev.page_table(a).unwrap()[0], dev.page_table(b).unwrap()[0]);
    assert_ne!(pa, pb, "the fork's append copied the shared last page");
    let k = gpu.download(dev.layer(0).unwrap().0).unwrap();
    let page = |p: u32| k[p as usize * 8..p as usize * 8 + 8].to_vec();
    assert_eq!(page(pa), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]);
    assert_eq!(page(pb), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    // Typed errors, nothing changed.
    let free = dev.free_pages();
    let odd = gpu.upload(&[1.0f32; 3]).unwrap();
    assert!(matches!(dev.append(&gpu, a, &odd, &odd), Err(Error::ShapeMismatch(_))));
    let big = gpu.upload(&vec![0.0f32; 2 * 40]).unwrap();
    assert!(matches!(dev.append(&gpu, a, &big, &big), Err(Error::OutOfPages { .. })));
    assert!(matches!(dev.write(&gpu, a, 1, 0, &more, &more), Err(Error::OutOfRange(_))));
    assert!(matches!(dev.write(&gpu, a, 0, 3, &rows, &rows), Err(Error::OutOfRange(_))));
    assert_eq!(dev.free_pages(), free);
    assert!(matches!(dev.fork(SeqId(77)), Err(Error::UnknownSequence(77))));
}

#[test]
fn paged_decode_over_device_pages_matches_cpu() {
    let Some(gpu) = test_device() else { return };
    let (hkv, d, page) = (2usize, 64usize, 16usize);
    let row = hkv * d;
    let config = PagedKvConfig { layers: 2, kv_heads: hkv, head_dim: d, page_size: page, num_pages: 12 };
    let mut dev = DevicePages::<bf16>::new(&gpu, config).unwrap();
    // A prompt of 21 tokens (its second page shared and partly full), forked into two samples that
    // append 5 and 12 tokens of their own (each copies the shared last page).
    let prompt = dev.allocate();
    let (pk, pv) = (values::<bf16>(2 * 21 * row, 1), values::<bf16>(2 * 21 * row, 2));
    dev.append(&gpu, prompt, &gpu.upload(&pk).unwrap(), &gpu.upload(&pv).unwrap()).unwrap();
    let tails = [5usize, 12];
    let samples: Vec<SeqId> = tails
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let id = dev.fork(prompt).unwrap();
            let (k, v) = (values::<bf16>(2 * n * row, 10 + s as u64), values::<bf16>(2 * n * row, 20 + s as u64));
            dev.append(&gpu, id, &gpu.upload(&k).unwrap(), &gpu.upload(&v).unwrap()).unwrap();
            id
        })
        .collect();
    assert_eq!(dev.page_table(samples[0]).unwrap()[0], dev.page_table(samples[1]).unwrap()[0]);
    assert_ne!(dev.page_table(samples[0]).unwrap()[1], dev.page_table(samples[1]).unwrap()[1]);
    dev.free(prompt).unwrap();

    // Decode the last token of each sample over layer 1: GQA 3, one global segment.
    let heads = Heads::new(3 * hkv, hkv, d, d);
    let cfg = SegmentConfig::new(heads);
    let lens: Vec<usize> = tails.iter().map(|&n| 21 + n).collect();
    let cu_q = [0u32, 1, 2];
    let cu_k = [0u32, lens[0] as u32, (lens[0] + lens[1]) as u32];
    let contexts: Vec<Vec<Segment>> = lens.iter().map(|&n| vec![Segment::global(n)]).collect();
    let layout = SegmentLayout::new(&contexts, &cu_k).unwrap();
    let q = values::<bf16>(2 * heads.num_q_heads * d, 81);
    let seqs: Vec<PagedSeq<'_>> = samples
        .iter()
        .map(|&id| PagedSeq { len: dev.len(id).unwrap(), page_table: dev.page_table(id).unwrap() })
        .collect();
    let pools = dev.pools(1).unwrap();
    let qd = gpu.upload(&q).unwrap();
    let got = segments::cuda_decode::decode_global_paged(
        &gpu,
        &cfg,
        &layout,
        &DecodeOptions::default(),
        &qd,
        &pools,
        &seqs,
        &cu_q,
    )
    .unwrap();
    let (o, lse) = (gpu.download(&got.o).unwrap(), gpu.download(&got.lse).unwrap());

    // The CPU: the same tokens gathered from what was appended (prompt rows then the tail's), layer 1.
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for (s, &n) in tails.iter().enumerate() {
        let (tk, tv) = (values::<bf16>(2 * n * row, 10 + s as u64), values::<bf16>(2 * n * row, 20 + s as u64));
        k.extend_from_slice(&pk[21 * row..]);
        k.extend_from_slice(&tk[n * row..]);
        v.extend_from_slice(&pv[21 * row..]);
        v.extend_from_slice(&tv[n * row..]);
    }
    let want = segments::decode_global(&cfg, &layout, &q, &k, &v, &cu_q, &cu_k).unwrap();
    // Both round their output to bf16 once: within 2 ulps of it (plus 1e-3 for f32 summation
    // order), lse within 1e-4 relative (the tolerances of cuda_tests.rs).
    for (i, (a, b)) in o.iter().zip(&want.o).enumerate() {
        let (a, b) = (a.to_f32(), b.to_f32());
        assert!((a - b).abs() <= 2.0 * 2f32.powi(-8) * (1.0 + b.abs()) + 1e-3, "o[{i}] = {a}, want {b}");
    }
    for (i, (a, b)) in lse.iter().zip(&want.lse).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "lse[{i}] = {a}, want {b}");
    }
}
