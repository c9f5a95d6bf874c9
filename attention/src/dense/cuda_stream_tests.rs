//! The device entry points on a caller's stream and memory: a `Gpu` built with
//! `Gpu::from_stream` over the simulator's `SimStream`, every tensor allocated on that stream
//! as the caller's own `SimSlice`, and every input and output passed as a view of a sub-range
//! at a non-zero offset (the stand-in for a framework's tensors on its CUDA stream). Results are
//! held to the CPU path (within the stated tolerance), to the same call on squid's own buffers
//! (bit for bit), and the memory around each output window must be left untouched.

use half::bf16;
use squid_cuda::dtype::unit_roundoff;
use squid_cuda::launch::{DeviceView, DeviceViewMut, Gpu, SimSlice, SimStream};
use squid_cuda::DType;

use super::cuda::{self as dev, BackwardInputs, DeviceGradsMut, DqMode};
use super::cuda_decode::{self, DecodeOptions, DevicePagedKv, PagedSeq};
use super::tests::{offsets, to, values};
use super::DenseConfig;
use crate::segments::{self, Segment, SegmentConfig, SegmentLayout};
use crate::Heads;

/// Elements before and after every tensor's window: 48 bytes of bf16 (the 16-byte alignment
/// the tile loads need is kept) and 96 of f32.
const PAD: usize = 24;
const SENTINEL: f32 = 7.0;

fn padded<T: squid_cuda::launch::DeviceCopy>(stream: &SimStream, x: &[T], fill: T) -> SimSlice<T> {
    let mut v = vec![fill; PAD];
    v.extend_from_slice(x);
    v.extend(std::iter::repeat_n(fill, PAD));
    stream.clone_htod(&v)
}

fn inner<T>(s: &SimSlice<T>) -> DeviceView<'_, T> {
    DeviceView::from(s).slice(PAD..s.len() - PAD).unwrap()
}

/// An output of `len` elements inside a sentinel-filled allocation.
fn out<T: squid_cuda::launch::DeviceCopy>(stream: &SimStream, len: usize, fill: T) -> SimSlice<T> {
    stream.clone_htod(&vec![fill; len + 2 * PAD])
}

/// The window's contents, after checking the padding around it kept its sentinel.
fn window<T: squid_cuda::launch::DeviceCopy + PartialEq + std::fmt::Debug>(
    stream: &SimStream,
    s: &SimSlice<T>,
    fill: T,
    what: &str,
) -> Vec<T> {
    let all = stream.clone_dtoh(s).unwrap();
    let n = all.len();
    assert!(all[..PAD].iter().chain(&all[n - PAD..]).all(|x| *x == fill), "{what}: written outside its view");
    all[PAD..n - PAD].to_vec()
}

fn assert_near(what: &str, got: &[bf16], want: &[bf16], units: f64) {
    let max = want.iter().fold(0f64, |m, x| m.max(x.to_f64().abs()));
    let tol = units * unit_roundoff(DType::BF16) as f64 * (1.0 + max);
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a.to_f64() - b.to_f64()).abs() <= tol, "{what}[{i}] = {a}, CPU {b} (tol {tol})");
    }
}

fn assert_lse_near(what: &str, got: &[f32], want: &[f32]) {
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if b == f32::NEG_INFINITY {
            assert_eq!(a, b, "{what}[{i}]");
        } else {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}[{i}] = {a}, CPU {b}");
        }
    }
}

#[test]
fn caller_stream_views_at_offsets_match_the_cpu_path() {
    if std::env::var_os("SQUID_ATTENTION_ISA").is_some() || !squid_cuda::testing::nvrtc_available() {
        return;
    }
    let stream = SimStream::new();
    let gpu = Gpu::from_stream(&stream).unwrap();
    let sent = bf16::from_f32(SENTINEL);
    let h = Heads::new(4, 2, 64, 64);
    let cfg = DenseConfig::causal(h);
    let lens = [5usize, 37];
    let (cu, n) = (offsets(&lens), lens.iter().sum::<usize>());
    let q: Vec<bf16> = to(&values(n * h.num_q_heads * h.head_dim_k, 1));
    let k: Vec<bf16> = to(&values(n * h.num_kv_heads * h.head_dim_k, 2));
    let v: Vec<bf16> = to(&values(n * h.num_kv_heads * h.head_dim_v, 3));
    let d_o: Vec<bf16> = to(&values(n * h.num_q_heads * h.head_dim_v, 4));
    let (qs, ks, vs, dos) =
        (padded(&stream, &q, sent), padded(&stream, &k, sent), padded(&stream, &v, sent), padded(&stream, &d_o, sent));
    let (o_len, lse_len) = (q.len(), n * h.num_q_heads);

    // Forward into the caller's o and lse.
    let want = super::forward(&cfg, &q, &k, &v, &cu, &cu).unwrap();
    let (mut os, mut ls) = (out(&stream, o_len, sent), out(&stream, lse_len, SENTINEL));
    {
        let (mut o_all, mut l_all) = (DeviceViewMut::from(&mut os), DeviceViewMut::from(&mut ls));
        let (o, lse) = (o_all.slice_mut(PAD..PAD + o_len).unwrap(), l_all.slice_mut(PAD..PAD + lse_len).unwrap());
        dev::forward_into(&gpu, &cfg, inner(&qs), inner(&ks), inner(&vs), &cu, &cu, o, lse).unwrap();
    }
    let (o, lse) = (window(&stream, &os, sent, "o"), window(&stream, &ls, SENTINEL, "lse"));
    assert_near("forward o", &o, &want.o, 4.0);
    assert_lse_near("forward lse", &lse, &want.lse);
    // A view that starts 2 bytes into a row cannot feed the 16-byte tile loads: a typed error,
    // not a misaligned access on the device.
    let (mut o2, mut l2) = (out(&stream, o_len, sent), out(&stream, lse_len, SENTINEL));
    let shifted = DeviceView::from(&qs).slice(PAD + 1..PAD + 1 + q.len()).unwrap();
    let (mut o_all, mut l_all) = (DeviceViewMut::from(&mut o2), DeviceViewMut::from(&mut l2));
    let (o_bad, l_bad) = (o_all.slice_mut(PAD..PAD + o_len).unwrap(), l_all.slice_mut(PAD..PAD + lse_len).unwrap());
    let e = dev::forward_into(&gpu, &cfg, shifted, inner(&ks), inner(&vs), &cu, &cu, o_bad, l_bad).unwrap_err();
    assert!(matches!(&e, crate::Error::Shape(m) if m.contains("multiple of 16 bytes")), "{e}");
    let (o_bad, l_bad) =
        (o_all.slice_mut(PAD + 1..PAD + 1 + o_len).unwrap(), l_all.slice_mut(PAD..PAD + lse_len).unwrap());
    let e = dev::forward_into(&gpu, &cfg, inner(&qs), inner(&ks), inner(&vs), &cu, &cu, o_bad, l_bad).unwrap_err();
    assert!(matches!(&e, crate::Error::Shape(m) if m.starts_with("o starts")), "{e}");
    assert_eq!(window(&stream, &o2, sent, "refused o"), vec![sent; o_len], "a refused call wrote nothing");
    let own = dev::forward(
        &gpu,
        &cfg,
        &gpu.upload(&q).unwrap(),
        &gpu.upload(&k).unwrap(),
        &gpu.upload(&v).unwrap(),
        &cu,
        &cu,
    )
    .unwrap();
    assert_eq!(gpu.download(&own.o).unwrap(), o, "a caller's views and squid's buffers give the same bits");

    // Backward from those views into the caller's gradients.
    let grads = super::backward(&cfg, &q, &k, &v, &want.o, &want.lse, &d_o, &cu, &cu).unwrap();
    for mode in [DqMode::Atomic, DqMode::Deterministic] {
        let (mut dqs, mut dks, mut dvs) =
            (out(&stream, q.len(), sent), out(&stream, k.len(), sent), out(&stream, v.len(), sent));
        {
            let x = BackwardInputs {
                q: inner(&qs),
                k: inner(&ks),
                v: inner(&vs),
                o: DeviceView::from(&os).slice(PAD..PAD + o_len).unwrap(),
                lse: DeviceView::from(&ls).slice(PAD..PAD + lse_len).unwrap(),
                d_o: inner(&dos),
            };
            let (mut a, mut b, mut c) =
                (DeviceViewMut::from(&mut dqs), DeviceViewMut::from(&mut dks), DeviceViewMut::from(&mut dvs));
            let g = DeviceGradsMut {
                dq: a.slice_mut(PAD..PAD + q.len()).unwrap(),
                dk: b.slice_mut(PAD..PAD + k.len()).unwrap(),
                dv: c.slice_mut(PAD..PAD + v.len()).unwrap(),
            };
            dev::backward_into(&gpu, &cfg, x, &cu, &cu, mode, g).unwrap();
        }
        assert_near("dq", &window(&stream, &dqs, sent, "dq"), &grads.dq, 8.0);
        assert_near("dk", &window(&stream, &dks, sent, "dk"), &grads.dk, 8.0);
        assert_near("dv", &window(&stream, &dvs, sent, "dv"), &grads.dv, 8.0);
    }

    // Decode of each sequence's last token, packed and paged, split and batch invariant.
    let row_q = h.num_q_heads * h.head_dim_k;
    let q1: Vec<bf16> =
        cu[1..].iter().flat_map(|&e| q[(e as usize - 1) * row_q..e as usize * row_q].to_vec()).collect();
    let cu1 = offsets(&[1, 1]);
    let want = super::decode(&cfg, &q1, &k, &v, &cu1, &cu).unwrap();
    let q1s = padded(&stream, &q1, sent);
    let page = 8;
    let row = h.num_kv_heads * h.head_dim_k;
    // Pools: each sequence's keys in whole pages, the second sequence's pages first.
    let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(page)).collect();
    let mut kp = vec![bf16::ZERO; (pages[0] + pages[1]) * page * row];
    let mut vp = kp.clone();
    let firsts = [pages[1], 0];
    for s in 0..2 {
        for t in 0..lens[s] {
            let (src, dst) = ((cu[s] as usize + t) * row, ((firsts[s] + t / page) * page + t % page) * row);
            kp[dst..dst + row].copy_from_slice(&k[src..src + row]);
            vp[dst..dst + row].copy_from_slice(&v[src..src + row]);
        }
    }
    let (kps, vps) = (padded(&stream, &kp, sent), padded(&stream, &vp, sent));
    let tables: Vec<Vec<u32>> = (0..2).map(|s| (firsts[s]..firsts[s] + pages[s]).map(|p| p as u32).collect()).collect();
    let seqs: Vec<PagedSeq<'_>> = (0..2).map(|s| PagedSeq { len: lens[s], page_table: &tables[s] }).collect();
    let pool = DevicePagedKv {
        page_size: page,
        kv_heads: h.num_kv_heads,
        head_dim: h.head_dim_k,
        k_pages: inner(&kps),
        v_pages: inner(&vps),
    };
    let (o1_len, l1_len) = (2 * h.num_q_heads * h.head_dim_v, 2 * h.num_q_heads);
    for opts in [
        DecodeOptions { num_splits: Some(2), batch_invariant: false },
        DecodeOptions { num_splits: None, batch_invariant: true },
    ] {
        for paged in [false, true] {
            let (mut os, mut ls) = (out(&stream, o1_len, sent), out(&stream, l1_len, SENTINEL));
            {
                let (mut o_all, mut l_all) = (DeviceViewMut::from(&mut os), DeviceViewMut::from(&mut ls));
                let (o, lse) =
                    (o_all.slice_mut(PAD..PAD + o1_len).unwrap(), l_all.slice_mut(PAD..PAD + l1_len).unwrap());
                if paged {
                    cuda_decode::decode_paged_into(&gpu, &cfg, &opts, inner(&q1s), &pool, &seqs, &cu1, o, lse).unwrap();
                } else {
                    cuda_decode::decode_into(&gpu, &cfg, &opts, inner(&q1s), inner(&ks), inner(&vs), &cu1, &cu, o, lse)
                        .unwrap();
                }
            }
            let what = format!("decode {opts:?} paged {paged}");
            assert_near(&what, &window(&stream, &os, sent, &what), &want.o, 4.0);
            assert_lse_near(&what, &window(&stream, &ls, SENTINEL, &what), &want.lse);
        }
    }

    // Segment attention forward: a document then a global tail in the second context.
    let contexts = vec![vec![Segment::global(5)], vec![Segment::document(20), Segment::global(17)]];
    let layout = SegmentLayout::new(&contexts, &cu).unwrap();
    let scfg = SegmentConfig::new(h);
    let want = segments::forward(&scfg, &layout, &q, &k, &v, &cu, &cu).unwrap();
    let (mut os, mut ls) = (out(&stream, o_len, sent), out(&stream, lse_len, SENTINEL));
    {
        let (mut o_all, mut l_all) = (DeviceViewMut::from(&mut os), DeviceViewMut::from(&mut ls));
        let (o, lse) = (o_all.slice_mut(PAD..PAD + o_len).unwrap(), l_all.slice_mut(PAD..PAD + lse_len).unwrap());
        segments::cuda::forward_into(&gpu, &scfg, &layout, inner(&qs), inner(&ks), inner(&vs), &cu, &cu, o, lse)
            .unwrap();
    }
    assert_near("segments o", &window(&stream, &os, sent, "segments o"), &want.o, 4.0);
    assert_lse_near("segments lse", &window(&stream, &ls, SENTINEL, "segments lse"), &want.lse);
}
