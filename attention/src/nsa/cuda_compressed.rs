//! NSA's compressed branch on a device (a GPU, or squid-cuda's simulator), with the CPU path's
//! semantics ([`super`]): the attention of each query over the compressed blocks it sees
//! (`o_cmp`, `lse_cmp`) and, in the same kernel, the selection scores: the compressed
//! probabilities mapped to selection blocks by the overlap rule ([`super::overlap_weight`]) and
//! summed over the GQA group, `[total_q, HKV, stride]` f32, ready for
//! [`super::cuda::select_top_n`].
//!
//! `compressed.cu` (see its header) is organised per GQA group as the selected branch: one CTA
//! per 64 query rows of one kv head, the rows being the group's heads of consecutive tokens, so
//! each compressed K/V tile is loaded once for the whole group. Storage is bf16 or f16; head dims
//! are [`crate::dense::flash::HEAD_DIMS`]. Chunked prefill (queries that are the last `Tq` of a
//! sequence's `Tk` keys) as [`super::NsaExtra::cu_seqlens_k`].

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, Gpu, LaunchDims};
use squid_cuda::Element;

use super::cuda_selected::row_layout;
use super::{offsets, NsaConfig, COMPRESSED_KERNEL};
use crate::dense::cuda::{check_finite_device, device_err, dtype_suffix};
use crate::dense::flash;
use crate::layout::{expect_len, numel, rows_of};
use crate::{validate_cu_seqlens, Error, Heads};

const HEADER: usize = 8;
const ITEM: usize = 8;

/// Compressed keys per K/V tile for head dim `dk` (two K/V stages and the f32 probability tile
/// fit 48 KiB of static shared memory).
pub(crate) fn key_tile(dk: usize) -> usize {
    match dk {
        64 => 64,
        256 => 16,
        _ => 32,
    }
}

fn to_i32(v: usize, what: &str) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds the kernels' 32-bit indices")))
}

/// The compressed branch's work (layout in `compressed.cu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CmpSchedule {
    pub ints: Vec<i32>,
    pub items: usize,
    /// Compressed key tiles over all items (each loaded twice: the lse sweep and the output sweep).
    pub tiles: usize,
}

/// One item per (kv head, sequence, run of `64 / hc` query tokens, head chunk) whose last token
/// sees a compressed block; tokens that see none keep `o = 0`, `lse = -inf`, scores 0.
pub(crate) fn cmp_schedule(
    cfg: &NsaConfig,
    h: &Heads,
    cu_q: &[u32],
    cu_k: &[u32],
    stride: usize,
    bn: usize,
) -> Result<CmpSchedule, Error> {
    let (hq, hkv) = (h.num_q_heads, h.num_kv_heads);
    let total = *cu_q.last().unwrap_or(&0) as usize;
    to_i32(numel("q", &[total, hq, h.head_dim_k.max(h.head_dim_v)])?, "total x HQ x D")?;
    to_i32(numel("scores", &[total, hkv, stride])?, "scores")?;
    let (hc, per_cta, chunks) = row_layout(h.group());
    let offs = offsets(cfg, cu_k);
    let mut items = Vec::new();
    let mut tiles = 0;
    for g in 0..hkv {
        for (s, (wq, wk)) in cu_q.windows(2).zip(cu_k.windows(2)).enumerate() {
            let (q0, tq) = (wq[0] as usize, (wq[1] - wq[0]) as usize);
            let tk = (wk[1] - wk[0]) as usize;
            for i0 in (0..tq).step_by(per_cta) {
                let ntok = per_cta.min(tq - i0);
                let pos0 = i0 + tk - tq;
                let nkeys = cfg.num_cmp_blocks(pos0 + ntok);
                if nkeys == 0 {
                    continue;
                }
                tiles += nkeys.div_ceil(bn) * chunks;
                for c in 0..chunks {
                    items.extend([q0 + i0, ntok, pos0, offs[s] as usize, g, c, nkeys, 0]);
                }
            }
        }
    }
    let num_items = items.len() / ITEM;
    let (a, b) = (cfg.block_slc / cfg.stride_cmp, cfg.block_cmp / cfg.stride_cmp);
    let mut ints = vec![
        to_i32(total, "total")?,
        to_i32(hq, "HQ")?,
        to_i32(hkv, "HKV")?,
        hc as i32,
        to_i32(stride, "stride")?,
        to_i32(cfg.block_slc, "l'")?,
        to_i32(a, "l' / d")?,
        to_i32(b, "l / d")?,
    ];
    debug_assert_eq!(ints.len(), HEADER);
    to_i32(HEADER + items.len(), "schedule length")?;
    for v in items {
        ints.push(to_i32(v, "schedule item")?);
    }
    Ok(CmpSchedule { ints, items: num_items, tiles })
}

/// The compressed branch's forward result on the device.
#[derive(Debug)]
pub struct DeviceCmpOutput<T> {
    /// `[total_q, HQ, Dv]`; 0 for a query that sees no compressed block.
    pub o: DeviceBuffer<T>,
    /// `[HQ, total_q]`, natural log; `-inf` for a query that sees no compressed block.
    pub lse: DeviceBuffer<f32>,
    /// Selection-block importance `[total_q, HKV, stride]`: entry `j` of a query at position `t`
    /// for `j <= t / l'` as [`super::naive::NaiveForward::scores`], 0 beyond.
    pub scores: DeviceBuffer<f32>,
    /// Entries per (query, kv head) row of `scores`: the longest sequence's selection blocks.
    pub stride: usize,
}

/// The compressed branch forward and the selection scores on the device: `q [total_q, HQ, Dk]`,
/// `k_cmp [total_cmp, HKV, Dk]`, `v_cmp [total_cmp, HKV, Dv]` (packed per sequence as
/// [`super::cmp_offsets`] of `cu_seqlens_k`). Queries are the last `Tq` positions of each
/// sequence's `Tk` keys (`cu_seqlens_k`, or `cu_seqlens_q` when `None`).
#[allow(clippy::too_many_arguments)]
pub fn compressed_forward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    h: &Heads,
    q: &DeviceBuffer<T>,
    k_cmp: &DeviceBuffer<T>,
    v_cmp: &DeviceBuffer<T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: Option<&[u32]>,
) -> Result<DeviceCmpOutput<T>, Error> {
    cfg.validate()?;
    h.validate()?;
    let sfx = dtype_suffix::<T>()?;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    flash::check_head_dims(dk, dv)?;
    let total = rows_of("q", q.len(), hq, dk)?;
    let num_seqs = validate_cu_seqlens(cu_seqlens_q, total)?;
    let cu_k = cu_seqlens_k.unwrap_or(cu_seqlens_q);
    let total_k = *cu_k.last().ok_or_else(|| Error::CuSeqlens("empty cu_seqlens_k".into()))? as usize;
    if validate_cu_seqlens(cu_k, total_k)? != num_seqs {
        return Err(Error::CuSeqlens("cu_seqlens_q and cu_seqlens_k describe different numbers of sequences".into()));
    }
    let mut stride = 0;
    for (s, (wq, wk)) in cu_seqlens_q.windows(2).zip(cu_k.windows(2)).enumerate() {
        let (tq, tk) = (wq[1] - wq[0], wk[1] - wk[0]);
        if tq > tk {
            return Err(Error::CuSeqlens(format!(
                "sequence {s} has {tq} queries but only {tk} keys (chunked prefill needs Tq <= Tk)"
            )));
        }
        stride = stride.max(cfg.num_slc_blocks(tk as usize));
    }
    let total_cmp = *offsets(cfg, cu_k).last().unwrap_or(&0) as usize;
    expect_len("k_cmp", k_cmp.len(), numel("k_cmp", &[total_cmp, hkv, dk])?, "[total_cmp, HKV, Dk]")?;
    expect_len("v_cmp", v_cmp.len(), numel("v_cmp", &[total_cmp, hkv, dv])?, "[total_cmp, HKV, Dv]")?;
    if cfg.check_finite {
        check_finite_device(gpu, "q", &q.view())?;
        check_finite_device(gpu, "k_cmp", &k_cmp.view())?;
        check_finite_device(gpu, "v_cmp", &v_cmp.view())?;
    }
    let sched = cmp_schedule(cfg, h, cu_seqlens_q, cu_k, stride, key_tile(dk))?;
    let mut o = gpu.zeros::<T>(numel("o", &[total, hq, dv])?).map_err(device_err)?;
    let mut lse = gpu.upload(&vec![f32::NEG_INFINITY; numel("lse", &[hq, total])?]).map_err(device_err)?;
    let mut scores = gpu.zeros::<f32>(numel("scores", &[total, hkv, stride])?).map_err(device_err)?;
    if sched.items > 0 {
        let ints = gpu.upload(&sched.ints).map_err(device_err)?;
        let scale_log2 = cfg.softmax_scale(h) * std::f32::consts::LOG2_E;
        let name = format!("squid_nsa_cmp_fwd_dk{dk}_dv{dv}_{sfx}");
        let entry = COMPRESSED_KERNEL
            .entries
            .iter()
            .copied()
            .find(|e| *e == name)
            .ok_or_else(|| Error::Unsupported(format!("no kernel entry {name}")))?;
        // SAFETY: the entry is (const T* q, const T* k_cmp, const T* v_cmp, T* o, float* lse,
        // float* scores, const int* sched, float scale_log2) with T a 16-bit storage type; the
        // schedule was built from the validated offsets, so every query row, compressed row and
        // score entry it names lies inside its buffer (o, lse, scores sized above).
        let kernel = unsafe {
            gpu.typed_kernel::<(
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &mut DeviceBuffer<T>,
                &mut DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &DeviceBuffer<i32>,
                f32,
            )>(&COMPRESSED_KERNEL, entry)
        }
        .map_err(device_err)?;
        let launch = LaunchDims { grid: (sched.items as u32, 1, 1), block: (128, 1, 1), shared_bytes: 0 };
        kernel
            .launch(gpu, launch, (q, k_cmp, v_cmp, &mut o, &mut lse, &mut scores, &ints, scale_log2))
            .map_err(device_err)?;
    }
    Ok(DeviceCmpOutput { o, lse, scores, stride })
}
