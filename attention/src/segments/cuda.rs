//! Segment attention on a device: the dense flash kernels with the segment layout's per-query key
//! ranges. Each query row's first visible key (its document's start, or 0 for a global token)
//! goes to the kernel with the schedule; query tiles are cut at every segment boundary, so a
//! document's tiles load only that document's keys, and key tiles no query of a tile sees are
//! never visited. Same storage types, head dims and errors as [`crate::dense::cuda`].

use squid_cuda::launch::{DeviceCopy, DeviceView, DeviceViewMut, Gpu};
use squid_cuda::Element;

use super::{SegmentConfig, SegmentLayout, SegmentMask};
use crate::dense::cuda::{
    alloc_grads, alloc_outputs, backward_scheduled, forward_scheduled, validate_backward_device, validate_device,
    BackwardInputs, DeviceGrads, DeviceGradsMut, DeviceOutput, DqMode,
};
use crate::dense::flash::{self, KernelMask, Schedule};
use crate::dense::{validate_lens, Dims};
use crate::Error;

/// The kernel reads each row's lower bound from the schedule; causal gives the upper bound.
const SEGMENT_MASK: KernelMask = KernelMask { causal: true, window: None, row_lo: true };

#[allow(clippy::too_many_arguments)]
fn validate<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: &DeviceView<'_, T>,
    k: &DeviceView<'_, T>,
    v: &DeviceView<'_, T>,
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<Dims, Error> {
    let dims = validate_device(gpu, &cfg.dense(), q, k, v, cu_q, cu_k)?;
    if layout.num_contexts() != dims.num_seqs {
        return Err(Error::Shape(format!(
            "the segment layout has {} contexts but cu_seqlens {}",
            layout.num_contexts(),
            dims.num_seqs
        )));
    }
    Ok(dims)
}

/// Query indices of context `s` where a segment starts (query `i` sits at key position
/// `i + tk - tq`).
fn segment_cuts(layout: &SegmentLayout, s: usize, tq: usize, tk: usize) -> Vec<usize> {
    layout.spans[s].iter().filter_map(|&(start, _, _)| (start + tq).checked_sub(tk)).collect()
}

/// The query-tile schedule of a segment call, tiles of at most `tile_m` rows.
pub(crate) fn segment_schedule(
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    cu_q: &[u32],
    cu_k: &[u32],
    tile_m: usize,
) -> Result<Schedule, Error> {
    let h = cfg.heads;
    flash::schedule(
        &SegmentMask(layout),
        SEGMENT_MASK,
        h.num_q_heads,
        h.num_kv_heads,
        tile_m,
        cu_q,
        cu_k,
        |s, tq, tk| segment_cuts(layout, s, tq, tk),
    )
}

/// Segment attention forward on the device into the caller's `o` and `lse`, as
/// [`super::forward`].
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a, 'b, T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: impl Into<DeviceView<'a, T>>,
    k: impl Into<DeviceView<'a, T>>,
    v: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    o: impl Into<DeviceViewMut<'b, T>>,
    lse: impl Into<DeviceViewMut<'b, f32>>,
) -> Result<(), Error> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let dims = validate(gpu, cfg, layout, &q, &k, &v, cu_seqlens_q, cu_seqlens_k)?;
    let h = cfg.heads;
    let tile_m = flash::forward_tile_m(h.num_q_heads, h.num_kv_heads, h.head_dim_k);
    let sched = segment_schedule(cfg, layout, cu_seqlens_q, cu_seqlens_k, tile_m)?;
    forward_scheduled(gpu, &cfg.dense(), dims, &sched, q, k, v, o.into(), lse.into())
}

/// Segment attention forward on the device, as [`forward_into`] with `o` and `lse` allocated on
/// `gpu`'s stream.
#[allow(clippy::too_many_arguments)]
pub fn forward<'a, T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: impl Into<DeviceView<'a, T>>,
    k: impl Into<DeviceView<'a, T>>,
    v: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DeviceOutput<T>, Error> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let dims = validate_lens(&cfg.dense(), q.len(), k.len(), v.len(), cu_seqlens_q, cu_seqlens_k)?;
    let (mut o, mut lse) = alloc_outputs::<T>(gpu, &cfg.dense(), dims.total_q)?;
    forward_into(gpu, cfg, layout, q, k, v, cu_seqlens_q, cu_seqlens_k, &mut o, &mut lse)?;
    Ok(DeviceOutput { o, lse })
}

/// Segment attention backward on the device into the caller's gradients, as
/// [`super::backward`]: `dq, dk, dv` from the forward's `o`, `lse` and `d_o`; `mode` picks how
/// dQ is summed.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    x: BackwardInputs<'_, T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    mode: DqMode,
    grads: DeviceGradsMut<'_, T>,
) -> Result<(), Error> {
    let dims = validate(gpu, cfg, layout, &x.q, &x.k, &x.v, cu_seqlens_q, cu_seqlens_k)?;
    let dense = cfg.dense();
    validate_backward_device(gpu, &dense, dims, &x)?;
    let h = cfg.heads;
    let tile_n = flash::backward_key_tile(h.head_dim_k, h.head_dim_v)?;
    let atomic = mode == DqMode::Atomic;
    let mask = SegmentMask(layout);
    let keys = flash::key_schedule(
        &mask,
        SEGMENT_MASK,
        h.num_q_heads,
        h.num_kv_heads,
        tile_n,
        cu_seqlens_q,
        cu_seqlens_k,
        atomic,
    )?;
    let dq_tile = flash::dq_tile_m(h.head_dim_k);
    let fwd =
        if atomic { Schedule::empty() } else { segment_schedule(cfg, layout, cu_seqlens_q, cu_seqlens_k, dq_tile)? };
    backward_scheduled(gpu, &dense, dims, &fwd, &keys, x, mode, grads)
}

/// Segment attention backward on the device, as [`backward_into`] with the gradients allocated
/// on `gpu`'s stream.
pub fn backward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    x: BackwardInputs<'_, T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    mode: DqMode,
) -> Result<DeviceGrads<T>, Error> {
    let dense = cfg.dense();
    let dims = validate_lens(&dense, x.q.len(), x.k.len(), x.v.len(), cu_seqlens_q, cu_seqlens_k)?;
    alloc_grads(gpu, &dense, dims, |g| backward_into(gpu, cfg, layout, x, cu_seqlens_q, cu_seqlens_k, mode, g))
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use proptest::prelude::*;
    use squid_cuda::launch::DeviceCopy;
    use squid_cuda::Element;

    use super::*;
    use crate::dense::cuda::mask_matches_kernel;
    use crate::dense::cuda_tests::{assert_forward, assert_grads, case, device};
    use crate::dense::flash::{HEADER, ITEM};
    use crate::dense::tests::{offsets, to};
    use crate::segments::{naive, Segment};
    use crate::Heads;

    fn check<T: Element + DeviceCopy>(h: Heads, contexts: &[Vec<Segment>], tail: &[usize], seed: u64, mode: DqMode) {
        let Some(gpu) = device() else { return };
        let lens_k: Vec<usize> = contexts.iter().map(|c| c.iter().map(|s| s.len).sum()).collect();
        // Queries: the last `tail[s]` positions of each context (all of it when tail >= Tk).
        let lens_q: Vec<usize> = lens_k.iter().zip(tail).map(|(&k, &t)| t.min(k)).collect();
        let cfg = SegmentConfig::new(h);
        let x = case::<T>(&h, &lens_q, &lens_k, seed);
        let layout = SegmentLayout::new(contexts, &x.cu_k).unwrap();
        assert!(mask_matches_kernel(&SegmentMask(&layout), SEGMENT_MASK, &x.cu_q, &x.cu_k));
        let (o_ref, lse_ref) = naive::forward(&cfg, contexts, &x.q, &x.k, &x.v, &x.cu_q, &x.cu_k).unwrap();
        let (dq, dk, dv) = naive::backward(&cfg, contexts, &x.q, &x.k, &x.v, &x.d_o, &x.cu_q, &x.cu_k).unwrap();
        let up = |v: &[f64]| gpu.upload(&to::<T>(v)).unwrap();
        let (q, k, v, d_o) = (up(&x.q), up(&x.k), up(&x.v), up(&x.d_o));
        let out = forward(gpu, &cfg, &layout, &q, &k, &v, &x.cu_q, &x.cu_k).unwrap();
        let what = format!("{:?} {mode:?} {h:?} {contexts:?} q {lens_q:?}", T::DTYPE);
        let (o, lse) = (gpu.download(&out.o).unwrap(), gpu.download(&out.lse).unwrap());
        assert_forward(&what, &o, &lse, &o_ref, &lse_ref);
        let inputs = BackwardInputs {
            q: q.view(),
            k: k.view(),
            v: v.view(),
            o: out.o.view(),
            lse: out.lse.view(),
            d_o: d_o.view(),
        };
        let g = backward(gpu, &cfg, &layout, inputs, &x.cu_q, &x.cu_k, mode).unwrap();
        let got = [gpu.download(&g.dq).unwrap(), gpu.download(&g.dk).unwrap(), gpu.download(&g.dv).unwrap()];
        assert_grads(&what, [&got[0], &got[1], &got[2]], [&dq, &dk, &dv]);
    }

    #[test]
    fn documents_and_globals_match_the_reference() {
        let d = Segment::document;
        let g = Segment::global;
        let contexts = vec![vec![d(5), d(70), g(9), d(1), g(30)], vec![g(3)], vec![d(40), d(33)]];
        check::<bf16>(Heads::new(2, 1, 64, 64), &contexts, &[200, 3, 73], 1, DqMode::Atomic);
        // A tail of queries (bottom-right aligned against the whole context's keys).
        check::<f16>(Heads::new(3, 1, 128, 128), &contexts, &[40, 1, 20], 2, DqMode::Deterministic);
    }

    #[test]
    fn a_document_tile_loads_only_its_own_keys() {
        let d = Segment::document;
        let contexts = vec![vec![d(5), d(70), d(1), d(100)]];
        let cu = offsets(&[176]);
        let layout = SegmentLayout::new(&contexts, &cu).unwrap();
        let cfg = SegmentConfig::new(Heads::new(1, 1, 64, 64));
        let sched = segment_schedule(&cfg, &layout, &cu, &cu, flash::TILE_M).unwrap();
        let docs = [(0, 5), (5, 75), (75, 76), (76, 176)];
        for item in sched.ints[HEADER..][..sched.items * ITEM].chunks(ITEM) {
            let (r0, rows, k_lo, k_hi) = (item[4] as usize, item[5] as usize, item[6] as usize, item[7] as usize);
            let doc = docs.iter().find(|d| d.0 <= r0 && r0 < d.1).unwrap();
            assert!(r0 + rows <= doc.1 && doc.0 <= k_lo && k_hi <= doc.1, "{item:?} crosses {doc:?}");
        }
        // Tiles: 1 + 2 (70 rows) + 1 + 2 (100 rows).
        assert_eq!(sched.items, 6);
    }

    fn segments() -> impl Strategy<Value = Vec<Vec<Segment>>> {
        let seg = (any::<bool>(), 0usize..60)
            .prop_map(|(doc, len)| if doc { Segment::document(len) } else { Segment::global(len) });
        proptest::collection::vec(proptest::collection::vec(seg, 1..4), 1..3)
            .prop_filter("a context with keys", |c| c.iter().all(|s| s.iter().map(|g| g.len).sum::<usize>() > 0))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4))]

        #[test]
        fn generated_layouts(contexts in segments(), tail in 1usize..200, atomic in any::<bool>(), seed in any::<u64>()) {
            let tails = vec![tail; contexts.len()];
            let mode = if atomic { DqMode::Atomic } else { DqMode::Deterministic };
            check::<bf16>(Heads::new(2, 1, 64, 64), &contexts, &tails, seed, mode);
        }
    }
}
