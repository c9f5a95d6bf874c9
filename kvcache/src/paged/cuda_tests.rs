//! The device path end to end, on `test_device()`: document keys rotated and re-positioned by
//! the RoPE kernels, stored in `PagedKv` (a prompt of two documents forked into two samples that
//! share its pages, each with private global tokens), then decoded on the device through the page
//! tables exactly as the CPU views hold them. Held to the CPU `decode_global` on the gathered
//! cache: both round their output to bf16 once, so they agree within 2 ulps of it (plus 1e-3 for
//! f32 summation order), and lse within 1e-4 relative.

use half::bf16;
use squid_attention::dense::cuda_decode::{DecodeOptions, DevicePagedKv, PagedSeq};
use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::Heads;

use super::*;
use crate::rope::cuda::{reposition, DeviceRope};
use crate::rope::{Rope, RopeConfig};

fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

#[test]
fn documents_placed_on_the_device_decode_through_forked_pages() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let (hkv, d, page) = (2usize, 64usize, 16usize);
    let row = hkv * d;
    let rope = Rope::new(RopeConfig::new(d)).unwrap();
    let device_rope = DeviceRope::new(&gpu, &rope, 128).unwrap();
    let mut kv =
        PagedKv::<bf16>::new(PagedKvConfig { layers: 2, kv_heads: hkv, head_dim: d, page_size: page, num_pages: 32 })
            .unwrap();

    // Two documents, keys computed at position 0 (as the document cache holds them), the second
    // moved to offset 20 on the device.
    let docs = [20usize, 13];
    let prompt = kv.allocate();
    let mut offset = 0;
    for (i, &len) in docs.iter().enumerate() {
        let mut k = gpu.upload(&values(len * row, 1 + i as u64)).unwrap();
        device_rope.forward(&gpu, &mut k, hkv, &(0..len as u64).collect::<Vec<_>>()).unwrap();
        reposition(&gpu, &rope, &mut k, hkv, 0, offset as u64).unwrap();
        let k = gpu.download(&k).unwrap();
        let v = values(len * row, 11 + i as u64);
        // Layer 0 gets other values: the decode below must read layer 1's pool.
        let (k0, v0) = (values(len * row, 21 + i as u64), values(len * row, 31 + i as u64));
        kv.append(prompt, &[k0, k].concat(), &[v0, v].concat()).unwrap();
        offset += len;
    }
    // Two samples fork the prompt and append their own global tokens (rotated at their positions).
    let tails = [5usize, 9];
    let samples: Vec<SeqId> = tails
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let id = kv.fork(prompt).unwrap();
            let mut k = gpu.upload(&values(n * row, 41 + s as u64)).unwrap();
            device_rope.forward(&gpu, &mut k, hkv, &(offset as u64..(offset + n) as u64).collect::<Vec<_>>()).unwrap();
            let k = gpu.download(&k).unwrap();
            let v = values(n * row, 51 + s as u64);
            kv.append(id, &[values(n * row, 61), k].concat(), &[values(n * row, 71), v].concat()).unwrap();
            id
        })
        .collect();
    assert_eq!(kv.view(samples[0], 1).unwrap().page_table[..2], kv.view(samples[1], 1).unwrap().page_table[..2]);

    // Decode the last token of each sample: GQA 3, a final global segment.
    let heads = Heads::new(3 * hkv, hkv, d, d);
    let cfg = SegmentConfig::new(heads);
    let lens: Vec<usize> = tails.iter().map(|&n| offset + n).collect();
    let cu_q = [0u32, 1, 2];
    let cu_k = [0u32, lens[0] as u32, (lens[0] + lens[1]) as u32];
    let contexts: Vec<Vec<Segment>> = tails
        .iter()
        .map(|&n| vec![Segment::document(docs[0]), Segment::document(docs[1]), Segment::global(n)])
        .collect();
    let layout = SegmentLayout::new(&contexts, &cu_k).unwrap();
    let q = values(2 * heads.num_q_heads * d, 81);

    let views: Vec<_> = samples.iter().map(|&id| kv.view(id, 1).unwrap()).collect();
    let (kp, vp) = (gpu.upload(views[0].k_pages).unwrap(), gpu.upload(views[0].v_pages).unwrap());
    let pools = DevicePagedKv { page_size: page, kv_heads: hkv, head_dim: d, k_pages: kp.view(), v_pages: vp.view() };
    let seqs: Vec<PagedSeq<'_>> = views.iter().map(PagedSeq::from).collect();
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

    let (mut k, mut v) = (Vec::new(), Vec::new());
    for &id in &samples {
        let (ks, vs) = kv.gather(id, 1).unwrap();
        k.extend(ks);
        v.extend(vs);
    }
    let want = segments::decode_global(&cfg, &layout, &q, &k, &v, &cu_q, &cu_k).unwrap();
    for (i, (a, b)) in o.iter().zip(&want.o).enumerate() {
        let (a, b) = (a.to_f32(), b.to_f32());
        assert!((a - b).abs() <= 2.0 * 2f32.powi(-8) * (1.0 + b.abs()) + 1e-3, "o[{i}] = {a}, want {b}");
    }
    for (i, (a, b)) in lse.iter().zip(&want.lse).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "lse[{i}] = {a}, want {b}");
    }
}
