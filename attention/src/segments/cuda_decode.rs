//! Segment decode on the device (feature `cuda`): new tokens of a final `Global` segment see the
//! whole context, so after the layout check this is the device's dense causal decode
//! ([`crate::dense::cuda_decode`]). The paged form reads a context's private pages and the pages
//! of the cached documents it holds (placed with squid-kvcache's device `reposition`, and shared
//! between the sequences whose page tables name them) in place.

use squid_cuda::launch::{DeviceView, DeviceViewMut, Gpu};

use super::{check_global_tail, SegmentConfig, SegmentLayout};
use crate::dense::cuda::alloc_outputs;
use crate::dense::cuda_decode::{self, DecodeElement, DecodeOptions, DeviceDenseOutput, DevicePagedKv, PagedSeq};
use crate::dense::validate_lens;
use crate::layout::rows_of;
use crate::Error;

/// [`super::decode_global`] on the device against a packed cache, into the caller's `o` and
/// `lse`.
#[allow(clippy::too_many_arguments)]
pub fn decode_global_into<'a, 'b, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    k_cache: impl Into<DeviceView<'a, T>>,
    v_cache: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    o: impl Into<DeviceViewMut<'b, T>>,
    lse: impl Into<DeviceViewMut<'b, f32>>,
) -> Result<(), Error> {
    let (q, k_cache, v_cache) = (q.into(), k_cache.into(), v_cache.into());
    // Shapes here; the device decode checks finiteness itself when asked.
    let dims = validate_lens(&cfg.dense(), q.len(), k_cache.len(), v_cache.len(), cu_seqlens_q, cu_seqlens_k)?;
    if layout.num_contexts() != dims.num_seqs {
        return Err(Error::Shape(format!(
            "the segment layout has {} contexts but cu_seqlens {}",
            layout.num_contexts(),
            dims.num_seqs
        )));
    }
    let key_lens: Vec<usize> = cu_seqlens_k.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    check_global_tail(layout, cu_seqlens_q, &key_lens[..dims.num_seqs])?;
    cuda_decode::decode_into(gpu, &cfg.dense(), opts, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, o, lse)
}

/// [`decode_global_into`] with `o` and `lse` allocated on `gpu`'s stream.
#[allow(clippy::too_many_arguments)]
pub fn decode_global<'a, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    k_cache: impl Into<DeviceView<'a, T>>,
    v_cache: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DeviceDenseOutput<T>, Error> {
    let q = q.into();
    let total_q = rows_of("q", q.len(), cfg.heads.num_q_heads, cfg.heads.head_dim_k)?;
    let (mut o, mut lse) = alloc_outputs::<T>(gpu, &cfg.dense(), total_q)?;
    decode_global_into(gpu, cfg, layout, opts, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, &mut o, &mut lse)?;
    Ok(DeviceDenseOutput { o, lse })
}

/// [`super::decode_global`] on the device against paged K/V, into the caller's `o` and `lse`:
/// `seqs[s]` is context `s`'s page table over `kv`'s pools, covering all its positions
/// (documents and global tokens alike), and its length must be the layout's token count for
/// that context.
#[allow(clippy::too_many_arguments)]
pub fn decode_global_paged_into<'a, 'b, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    kv: &DevicePagedKv<'_, T>,
    seqs: &[PagedSeq<'_>],
    cu_seqlens_q: &[u32],
    o: impl Into<DeviceViewMut<'b, T>>,
    lse: impl Into<DeviceViewMut<'b, f32>>,
) -> Result<(), Error> {
    let q = q.into();
    cfg.dense().validate()?;
    let h = cfg.heads;
    let total_q = rows_of("q", q.len(), h.num_q_heads, h.head_dim_k)?;
    let num = crate::validate_cu_seqlens(cu_seqlens_q, total_q)?;
    if layout.num_contexts() != num || seqs.len() != num {
        return Err(Error::Shape(format!(
            "{} contexts in the layout, {} paged sequences, {num} in cu_seqlens_q",
            layout.num_contexts(),
            seqs.len()
        )));
    }
    for (s, seq) in seqs.iter().enumerate() {
        let tokens = layout.spans[s].last().map_or(0, |span| span.1);
        if tokens != seq.len {
            return Err(Error::Shape(format!("context {s}: the segments hold {tokens} tokens, its pages {}", seq.len)));
        }
    }
    let key_lens: Vec<usize> = seqs.iter().map(|seq| seq.len).collect();
    check_global_tail(layout, cu_seqlens_q, &key_lens)?;
    cuda_decode::decode_paged_into(gpu, &cfg.dense(), opts, q, kv, seqs, cu_seqlens_q, o, lse)
}

/// [`decode_global_paged_into`] with `o` and `lse` allocated on `gpu`'s stream.
#[allow(clippy::too_many_arguments)]
pub fn decode_global_paged<'a, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    kv: &DevicePagedKv<'_, T>,
    seqs: &[PagedSeq<'_>],
    cu_seqlens_q: &[u32],
) -> Result<DeviceDenseOutput<T>, Error> {
    let q = q.into();
    let total_q = rows_of("q", q.len(), cfg.heads.num_q_heads, cfg.heads.head_dim_k)?;
    let (mut o, mut lse) = alloc_outputs::<T>(gpu, &cfg.dense(), total_q)?;
    decode_global_paged_into(gpu, cfg, layout, opts, q, kv, seqs, cu_seqlens_q, &mut o, &mut lse)?;
    Ok(DeviceDenseOutput { o, lse })
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use squid_cuda::dtype::unit_roundoff;

    use super::*;
    use crate::dense::tests::{back, offsets, to, values};
    use crate::segments::{naive, Segment};
    use crate::Heads;

    /// Two contexts `[doc 21, doc 30, global 14 + new]` that share the documents' pages (the
    /// full pages of the common 51-token prefix, as a fork leaves them) and hold their global
    /// tokens in private pages; 2 new tokens each, GQA 2, bf16, against the segment reference.
    #[test]
    fn paged_decode_global_reads_shared_document_pages() {
        let Some(gpu) = squid_cuda::testing::test_device() else { return };
        let h = Heads::new(4, 2, 64, 64);
        let cfg = SegmentConfig::new(h);
        let (page, prefix, tails) = (8usize, 51usize, [16usize, 9]);
        let contexts: Vec<Vec<Segment>> =
            tails.iter().map(|&t| vec![Segment::document(21), Segment::document(30), Segment::global(t)]).collect();
        let lens_k: Vec<usize> = tails.iter().map(|&t| prefix + t).collect();
        let (cu_q, cu_k) = (offsets(&[2, 2]), offsets(&lens_k));
        let layout = SegmentLayout::new(&contexts, &cu_k).unwrap();
        let row = h.num_kv_heads * h.head_dim_k;
        // The shared prefix once, then each context's own tail; packed for the reference.
        let doc_k = values(prefix * row, 1);
        let doc_v = values(prefix * row, 2);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (s, &t) in tails.iter().enumerate() {
            k.extend_from_slice(&doc_k);
            v.extend_from_slice(&doc_v);
            k.extend(values(t * row, 10 + s as u64));
            v.extend(values(t * row, 20 + s as u64));
        }
        let q = values(4 * h.num_q_heads * h.head_dim_k, 3);
        let r = |x: &[f64]| back(&to::<bf16>(x));
        let want = naive::forward(&cfg, &contexts, &r(&q), &r(&k), &r(&v), &cu_q, &cu_k).unwrap();

        // Pool: the prefix's full pages shared, then per context the rest in its own pages
        // (listed in reverse so no table is in pool order).
        let shared = prefix / page;
        let mut pool_k = vec![bf16::ZERO; shared * page * row];
        let mut pool_v = pool_k.clone();
        pool_k.copy_from_slice(&to::<bf16>(&doc_k[..shared * page * row]));
        pool_v.copy_from_slice(&to::<bf16>(&doc_v[..shared * page * row]));
        let mut tables = Vec::new();
        for s in 0..2 {
            let k0 = cu_k[s] as usize;
            let own = (lens_k[s] - shared * page).div_ceil(page);
            let first = pool_k.len() / (page * row);
            let ids: Vec<u32> = (first..first + own).rev().map(|p| p as u32).collect();
            pool_k.resize(pool_k.len() + own * page * row, bf16::ZERO);
            pool_v.resize(pool_v.len() + own * page * row, bf16::ZERO);
            for t in shared * page..lens_k[s] {
                let dst = (ids[t / page - shared] as usize * page + t % page) * row;
                pool_k[dst..dst + row].copy_from_slice(&to::<bf16>(&k[(k0 + t) * row..(k0 + t + 1) * row]));
                pool_v[dst..dst + row].copy_from_slice(&to::<bf16>(&v[(k0 + t) * row..(k0 + t + 1) * row]));
            }
            tables.push([(0..shared as u32).collect::<Vec<u32>>(), ids].concat());
        }
        let (kp, vp) = (gpu.upload(&pool_k).unwrap(), gpu.upload(&pool_v).unwrap());
        let kv = DevicePagedKv {
            page_size: page,
            kv_heads: h.num_kv_heads,
            head_dim: h.head_dim_k,
            k_pages: kp.view(),
            v_pages: vp.view(),
        };
        let seqs: Vec<PagedSeq<'_>> = (0..2).map(|s| PagedSeq { len: lens_k[s], page_table: &tables[s] }).collect();
        let qd = gpu.upload(&to::<bf16>(&q)).unwrap();
        let opts = DecodeOptions { num_splits: Some(2), batch_invariant: false };
        let got = decode_global_paged(&gpu, &cfg, &layout, &opts, &qd, &kv, &seqs, &cu_q).unwrap();
        let (o, lse) = (back(&gpu.download(&got.o).unwrap()), gpu.download(&got.lse).unwrap());
        let tol = 2.0 * unit_roundoff(squid_cuda::DType::BF16) as f64 * 3.0 + 1e-3;
        for (i, (a, b)) in o.iter().zip(&want.0).enumerate() {
            assert!((a - b).abs() <= tol, "o[{i}] = {a}, want {b}");
        }
        for (i, (&a, &b)) in lse.iter().zip(&want.1).enumerate() {
            assert!((a as f64 - b).abs() <= 1e-3 * (1.0 + b.abs()), "lse[{i}] = {a}, want {b}");
        }
        // The packed device path gives the same bits as the paged one (same tiles, same splits).
        let (kd, vd) = (gpu.upload(&to::<bf16>(&k)).unwrap(), gpu.upload(&to::<bf16>(&v)).unwrap());
        let packed = decode_global(&gpu, &cfg, &layout, &opts, &qd, &kd, &vd, &cu_q, &cu_k).unwrap();
        assert_eq!(gpu.download(&packed.o).unwrap(), gpu.download(&got.o).unwrap());

        // A context ending in a document cannot decode; lengths must match the layout.
        let docs_last: Vec<Vec<Segment>> =
            tails.iter().map(|&t| vec![Segment::document(prefix), Segment::document(t)]).collect();
        let bad = SegmentLayout::new(&docs_last, &cu_k).unwrap();
        let e = decode_global_paged(&gpu, &cfg, &bad, &opts, &qd, &kv, &seqs, &cu_q).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        let e = decode_global(&gpu, &cfg, &bad, &opts, &qd, &kd, &vd, &cu_q, &cu_k).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        let short = [seqs[0], PagedSeq { len: lens_k[1] - 1, ..seqs[1] }];
        let e = decode_global_paged(&gpu, &cfg, &layout, &opts, &qd, &kv, &short, &cu_q).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
    }
}
