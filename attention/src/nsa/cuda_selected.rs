//! NSA's selected-block and sliding-window branches and the gated combine on a device (a GPU,
//! or squid-cuda's simulator), with the CPU path's semantics ([`super`]).
//!
//! - The selected branch runs `selected.cu` (see its header): one CTA per 64 query rows of one
//!   kv head, the rows being the group's heads of consecutive tokens, walking the union of the
//!   blocks those tokens chose so each chosen K/V tile is loaded once for the whole GQA group
//!   and every token of the CTA that chose it.
//! - The window branch is the dense flash kernel with its window (`(w - 1, 0)`), on the
//!   window's own K/V when given.
//! - The combine mixes the three branch outputs by the gates; `o_cmp` is an input (the
//!   compressed branch is computed elsewhere).
//!
//! The chosen blocks come in as a host slice `[total, HKV, n]` (the CPU forward's `indices`, or
//! any caller's): they are checked as [`super::backward`] checks them, and the host buckets each
//! CTA's tokens by block into the tile schedule it uploads. Storage is bf16 or f16; head dims
//! are [`crate::dense::flash::HEAD_DIMS`].

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, Gpu, LaunchDims};
use squid_cuda::Element;

use super::{validate_indices, NsaConfig, NO_BLOCK, SELECTED_KERNEL};
use crate::dense::cuda::{self as dense_dev, check_finite_device, device_err, dtype_suffix, DeviceOutput};
use crate::dense::{flash, DenseConfig};
use crate::layout::{expect_len, numel, rows_of};
use crate::{validate_cu_seqlens, Error, Heads};

/// Query rows per CTA (four warps of 16).
pub const TILE_ROWS: usize = 64;
const HEADER: usize = 8;
const ITEM: usize = 8;
const TILE: usize = 4;

/// Keys per K/V tile for head dim `dk` (as the dense forward: two stages fit 48 KiB).
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

/// The selected branch's work: header, items, tiles (layout in `selected.cu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlcSchedule {
    pub ints: Vec<i32>,
    pub items: usize,
    /// Key tiles over all items (each loaded once per head chunk).
    pub tiles: usize,
}

/// How a GQA group of `group` heads maps onto a CTA's 64 rows: `(heads per token, tokens per
/// CTA, CTAs per token)`.
pub(crate) fn row_layout(group: usize) -> (usize, usize, usize) {
    let hc = group.clamp(1, TILE_ROWS);
    (hc, TILE_ROWS / hc, group.div_ceil(hc))
}

/// Buckets each CTA's tokens by chosen block: for every (kv head, sequence, run of tokens) the
/// ascending union of the blocks they chose, cut into tiles of `bn` keys inside one block, each
/// with the tokens that chose it and see one of its keys. `indices` must have passed
/// [`validate_indices`].
pub(crate) fn slc_schedule(
    cfg: &NsaConfig,
    h: &Heads,
    cu: &[u32],
    indices: &[u32],
    bn: usize,
) -> Result<SlcSchedule, Error> {
    let (hq, hkv, n, ls) = (h.num_q_heads, h.num_kv_heads, cfg.num_selected, cfg.block_slc);
    let total = *cu.last().unwrap_or(&0) as usize;
    to_i32(numel("q", &[total, hq, h.head_dim_k.max(h.head_dim_v)])?, "total x HQ x D")?;
    let (hc, per_cta, chunks) = row_layout(h.group());
    let mut items = Vec::new();
    let mut tiles: Vec<i32> = Vec::new();
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for g in 0..hkv {
        for w in cu.windows(2) {
            let (base, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            for t0 in (0..len).step_by(per_cta) {
                let ntok = per_cta.min(len - t0);
                pairs.clear();
                for ti in 0..ntok {
                    let chosen = &indices[((base + t0 + ti) * hkv + g) * n..][..n];
                    pairs.extend(chosen.iter().take_while(|&&j| j != NO_BLOCK).map(|&j| (j, ti as u32)));
                }
                pairs.sort_unstable();
                let tile_lo = tiles.len() / TILE;
                for run in pairs.chunk_by(|a, b| a.0 == b.0) {
                    let start = run[0].0 as usize * ls;
                    let end = (start + ls).min(t0 + ntok);
                    for n0 in (start..end).step_by(bn) {
                        // Tokens before the tile see none of its keys.
                        let mask = run
                            .iter()
                            .filter(|&&(_, ti)| t0 + ti as usize >= n0)
                            .fold(0u64, |m, &(_, ti)| m | 1u64 << ti);
                        if mask != 0 {
                            let keys = bn.min(end - n0);
                            tiles.extend([
                                to_i32(n0, "key")?,
                                keys as i32,
                                mask as u32 as i32,
                                (mask >> 32) as u32 as i32,
                            ]);
                        }
                    }
                }
                let tile_hi = tiles.len() / TILE;
                if tile_hi == tile_lo {
                    continue;
                }
                for c in 0..chunks {
                    items.extend([base, ntok, t0, g, c, tile_lo, tile_hi, 0]);
                }
            }
        }
    }
    let num_items = items.len() / ITEM;
    let num_tiles = tiles.len() / TILE;
    let mut ints = vec![0; HEADER];
    ints[..5].copy_from_slice(&[
        to_i32(total, "total")?,
        to_i32(hq, "HQ")?,
        to_i32(hkv, "HKV")?,
        hc as i32,
        chunks as i32,
    ]);
    for v in items {
        ints.push(to_i32(v, "schedule item")?);
    }
    ints[5] = to_i32(ints.len(), "schedule length")?;
    to_i32(ints.len() + tiles.len(), "schedule length")?;
    ints.extend(tiles);
    Ok(SlcSchedule { ints, items: num_items, tiles: num_tiles })
}

fn entry(name: &str) -> Result<&'static str, Error> {
    SELECTED_KERNEL
        .entries
        .iter()
        .copied()
        .find(|e| *e == name)
        .ok_or_else(|| Error::Unsupported(format!("no kernel entry {name}")))
}

/// Checks a device call's shared inputs: config, heads, head dims, storage type, `q`, `k`, `v`
/// against `cu_seqlens`, the chosen blocks; returns the number of tokens.
#[allow(clippy::too_many_arguments)]
fn validate<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    h: &Heads,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    indices: &[u32],
    cu: &[u32],
) -> Result<usize, Error> {
    cfg.validate()?;
    h.validate()?;
    dtype_suffix::<T>()?;
    flash::check_head_dims(h.head_dim_k, h.head_dim_v)?;
    let total = rows_of("q", q.len(), h.num_q_heads, h.head_dim_k)?;
    validate_cu_seqlens(cu, total)?;
    expect_len("k", k.len(), numel("k", &[total, h.num_kv_heads, h.head_dim_k])?, "[total, HKV, Dk]")?;
    expect_len("v", v.len(), numel("v", &[total, h.num_kv_heads, h.head_dim_v])?, "[total, HKV, Dv]")?;
    validate_indices(cfg, h, cu, indices)?;
    if cfg.check_finite {
        check_finite_device(gpu, "q", &q.view())?;
        check_finite_device(gpu, "k", &k.view())?;
        check_finite_device(gpu, "v", &v.view())?;
    }
    Ok(total)
}

/// The selected branch alone: `o_slc [total, HQ, Dv]` and `lse_slc [HQ, total]` (`0` and `-inf`
/// for a token that chose nothing), as the CPU forward's, for the chosen blocks `indices
/// [total, HKV, n]` (ascending, [`NO_BLOCK`]-padded).
#[allow(clippy::too_many_arguments)]
pub fn selected_forward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    h: &Heads,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    indices: &[u32],
    cu_seqlens: &[u32],
) -> Result<DeviceOutput<T>, Error> {
    let total = validate(gpu, cfg, h, q, k, v, indices, cu_seqlens)?;
    let sched = slc_schedule(cfg, h, cu_seqlens, indices, key_tile(h.head_dim_k))?;
    launch_selected(gpu, cfg, h, total, &sched, q, k, v)
}

#[allow(clippy::too_many_arguments)]
fn launch_selected<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    h: &Heads,
    total: usize,
    sched: &SlcSchedule,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
) -> Result<DeviceOutput<T>, Error> {
    let (hq, dv) = (h.num_q_heads, h.head_dim_v);
    let mut o = gpu.zeros::<T>(total * hq * dv).map_err(device_err)?;
    let mut lse = gpu.upload(&vec![f32::NEG_INFINITY; total * hq]).map_err(device_err)?;
    if sched.items == 0 {
        return Ok(DeviceOutput { o, lse });
    }
    let name = format!("squid_nsa_slc_fwd_dk{}_dv{}_{}", h.head_dim_k, dv, dtype_suffix::<T>()?);
    let ints = gpu.upload(&sched.ints).map_err(device_err)?;
    let scale_log2 = cfg.softmax_scale(h) * std::f32::consts::LOG2_E;
    let launch = LaunchDims { grid: (sched.items as u32, 1, 1), block: (128, 1, 1), shared_bytes: 0 };
    // SAFETY: the entry is (const T* q, const T* k, const T* v, T* o, float* lse, const int*
    // sched, float scale_log2) with T a 16-bit storage type; the schedule was built from the
    // validated cu_seqlens and indices, so every row and key it names lies inside its sequence.
    let kernel = unsafe {
        gpu.typed_kernel::<(
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &mut DeviceBuffer<T>,
            &mut DeviceBuffer<f32>,
            &DeviceBuffer<i32>,
            f32,
        )>(&SELECTED_KERNEL, entry(&name)?)
    }
    .map_err(device_err)?;
    kernel.launch(gpu, launch, (q, k, v, &mut o, &mut lse, &ints, scale_log2)).map_err(device_err)?;
    Ok(DeviceOutput { o, lse })
}

/// The device inputs of [`forward`] (layouts as [`super::NsaInputs`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceNsaInputs<'a, T> {
    /// `[total, HQ, Dk]`.
    pub q: &'a DeviceBuffer<T>,
    /// Selected branch keys (and the window branch's unless `k_win` is given).
    pub k: &'a DeviceBuffer<T>,
    /// Selected branch values (and the window branch's unless `v_win` is given).
    pub v: &'a DeviceBuffer<T>,
    /// The window branch's own keys.
    pub k_win: Option<&'a DeviceBuffer<T>>,
    /// The window branch's own values (given together with `k_win`).
    pub v_win: Option<&'a DeviceBuffer<T>>,
    /// The compressed branch's output `[total, HQ, Dv]`, computed elsewhere.
    pub o_cmp: &'a DeviceBuffer<T>,
    /// Gates `[total, HQ, 3]`: cmp, slc, win.
    pub gates: &'a DeviceBuffer<T>,
    /// Sequence offsets `[num_seqs + 1]`, on the host.
    pub cu_seqlens: &'a [u32],
}

/// Forward result on the device.
#[derive(Debug)]
pub struct DeviceNsaOutput<T> {
    /// The gated output `[total, HQ, Dv]`.
    pub o: DeviceBuffer<T>,
    /// Selected branch output.
    pub o_slc: DeviceBuffer<T>,
    /// Window branch output.
    pub o_win: DeviceBuffer<T>,
    /// `[HQ, total]`.
    pub lse_slc: DeviceBuffer<f32>,
    /// `[HQ, total]`.
    pub lse_win: DeviceBuffer<f32>,
}

/// The window branch's dense config: causal, the last `w` keys, NSA's scale.
pub(crate) fn window_cfg(cfg: &NsaConfig, h: &Heads) -> DenseConfig {
    DenseConfig {
        heads: *h,
        causal: true,
        window: Some(cfg.window),
        scale: Some(cfg.softmax_scale(h)),
        check_finite: false,
    }
}

/// NSA forward on the device given the compressed branch's output and the chosen blocks: the
/// selected and window branches and `o = g_cmp o_cmp + g_slc o_slc + g_win o_win`.
pub fn forward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    h: &Heads,
    x: &DeviceNsaInputs<'_, T>,
    indices: &[u32],
) -> Result<DeviceNsaOutput<T>, Error> {
    let total = validate(gpu, cfg, h, x.q, x.k, x.v, indices, x.cu_seqlens)?;
    let (hq, dv) = (h.num_q_heads, h.head_dim_v);
    let o_len = numel("o", &[total, hq, dv])?;
    expect_len("o_cmp", x.o_cmp.len(), o_len, "[total, HQ, Dv]")?;
    expect_len("gates", x.gates.len(), numel("gates", &[total, hq, 3])?, "[total, HQ, 3]")?;
    let (kw, vw) = match (x.k_win, x.v_win) {
        (Some(kw), Some(vw)) => {
            expect_len("k_win", kw.len(), x.k.len(), "[total, HKV, Dk]")?;
            expect_len("v_win", vw.len(), x.v.len(), "[total, HKV, Dv]")?;
            (kw, vw)
        }
        (None, None) => (x.k, x.v),
        _ => return Err(Error::Shape("k_win and v_win must be given together".into())),
    };
    if cfg.check_finite {
        check_finite_device(gpu, "o_cmp", &x.o_cmp.view())?;
        check_finite_device(gpu, "gates", &x.gates.view())?;
        if x.k_win.is_some() {
            check_finite_device(gpu, "k_win", &kw.view())?;
            check_finite_device(gpu, "v_win", &vw.view())?;
        }
    }
    let sched = slc_schedule(cfg, h, x.cu_seqlens, indices, key_tile(h.head_dim_k))?;
    let slc = launch_selected(gpu, cfg, h, total, &sched, x.q, x.k, x.v)?;
    let win = dense_dev::forward(gpu, &window_cfg(cfg, h), x.q, kw, vw, x.cu_seqlens, x.cu_seqlens)?;
    let o = combine(gpu, x.o_cmp, &slc.o, &win.o, x.gates, dv)?;
    Ok(DeviceNsaOutput { o, o_slc: slc.o, o_win: win.o, lse_slc: slc.lse, lse_win: win.lse })
}

/// `o = g_cmp o_cmp + g_slc o_slc + g_win o_win` on the device (lengths checked by the caller).
fn combine<T: Element + DeviceCopy>(
    gpu: &Gpu,
    o_cmp: &DeviceBuffer<T>,
    o_slc: &DeviceBuffer<T>,
    o_win: &DeviceBuffer<T>,
    gates: &DeviceBuffer<T>,
    dv: usize,
) -> Result<DeviceBuffer<T>, Error> {
    let n = o_slc.len();
    let mut o = gpu.zeros::<T>(n).map_err(device_err)?;
    if n == 0 {
        return Ok(o);
    }
    // SAFETY: (const T* o_cmp, const T* o_slc, const T* o_win, const T* gates, T* o, long long n,
    // int dv): the outputs hold n = rows * dv elements and the gates 3 * rows.
    let kernel = unsafe {
        gpu.typed_kernel::<(
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &mut DeviceBuffer<T>,
            i64,
            i32,
        )>(&SELECTED_KERNEL, entry(&format!("squid_nsa_combine_{}", dtype_suffix::<T>()?))?)
    }
    .map_err(device_err)?;
    kernel
        .launch(gpu, LaunchDims::linear(n, 256, 4096), (o_cmp, o_slc, o_win, gates, &mut o, n as i64, dv as i32))
        .map_err(device_err)?;
    Ok(o)
}

/// The dK/dV schedule of the selected branch: one item per (kv head, sequence, chosen block,
/// tile of `bn` keys inside the block), with the ascending list of the sequence's tokens that
/// chose the block and see a key of the tile (layout in `selected.cu`). Blocks no token chose
/// get no item (their keys' gradients stay 0).
pub(crate) fn key_schedule(
    cfg: &NsaConfig,
    h: &Heads,
    cu: &[u32],
    indices: &[u32],
    bn: usize,
) -> Result<SlcSchedule, Error> {
    let (hq, hkv, n, ls) = (h.num_q_heads, h.num_kv_heads, cfg.num_selected, cfg.block_slc);
    let total = *cu.last().unwrap_or(&0) as usize;
    to_i32(numel("q", &[total, hq, h.head_dim_k.max(h.head_dim_v)])?, "total x HQ x D")?;
    let mut items = Vec::new();
    let mut lists: Vec<i32> = Vec::new();
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for g in 0..hkv {
        for w in cu.windows(2) {
            let (base, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            pairs.clear();
            for t in 0..len {
                let chosen = &indices[((base + t) * hkv + g) * n..][..n];
                pairs.extend(chosen.iter().take_while(|&&j| j != NO_BLOCK).map(|&j| (j, t as u32)));
            }
            pairs.sort_unstable();
            for run in pairs.chunk_by(|a, b| a.0 == b.0) {
                let start = run[0].0 as usize * ls;
                let end = (start + ls).min(len);
                for n0 in (start..end).step_by(bn) {
                    let first = run.partition_point(|&(_, t)| (t as usize) < n0);
                    if first == run.len() {
                        continue;
                    }
                    let list_lo = lists.len();
                    for &(_, t) in &run[first..] {
                        lists.push(t as i32);
                    }
                    items.extend([base, n0, bn.min(end - n0), g, list_lo, lists.len(), 0, 0]);
                }
            }
        }
    }
    let num_items = items.len() / ITEM;
    let mut ints = vec![0; HEADER];
    ints[..3].copy_from_slice(&[to_i32(total, "total")?, to_i32(hq, "HQ")?, to_i32(hkv, "HKV")?]);
    for v in items {
        ints.push(to_i32(v, "schedule item")?);
    }
    ints[5] = to_i32(ints.len(), "schedule length")?;
    to_i32(ints.len() + lists.len(), "schedule length")?;
    ints.extend(lists);
    Ok(SlcSchedule { ints, items: num_items, tiles: num_items })
}

/// Keys per dQ tile and per dK/dV CTA of the selected backward for `(dk, dv)` (the dense
/// backward's, but two warps of dK/dV keys for Dk = 96, which spills with four at sm_80), or the
/// typed refusal (head dim 256 has no backward).
fn backward_tiles(dk: usize, dv: usize) -> Result<(usize, usize), Error> {
    flash::backward_key_tile(dk, dv)?;
    Ok(match dk {
        64 => (64, 64),
        192 => (16, 32),
        _ => (32, 32),
    })
}

/// Backward result on the device.
#[derive(Debug)]
pub struct DeviceNsaGrads<T> {
    /// `[total, HQ, Dk]`: the selected and window branches' (the compressed branch's, computed
    /// from [`Self::d_o_cmp`] elsewhere, is to be added).
    pub dq: DeviceBuffer<T>,
    /// Selected branch keys (plus the window branch's when it shares them).
    pub dk: DeviceBuffer<T>,
    /// Selected branch values (plus the window branch's when it shares them).
    pub dv: DeviceBuffer<T>,
    /// The window branch's own keys, when given separately.
    pub dk_win: Option<DeviceBuffer<T>>,
    /// The window branch's own values, when given separately.
    pub dv_win: Option<DeviceBuffer<T>>,
    /// `[total, HQ, 3]`.
    pub dgates: DeviceBuffer<T>,
    /// The compressed branch's output gradient `g_cmp dO` `[total, HQ, Dv]`, for its backward.
    pub d_o_cmp: DeviceBuffer<T>,
}

/// NSA backward on the device for the selected and window branches and the gates, with the
/// chosen blocks `indices` held fixed: `fwd` is [`forward`]'s result on the same inputs,
/// `d_o [total, HQ, Dv]` the output gradient.
pub fn backward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    h: &Heads,
    x: &DeviceNsaInputs<'_, T>,
    fwd: &DeviceNsaOutput<T>,
    indices: &[u32],
    d_o: &DeviceBuffer<T>,
) -> Result<DeviceNsaGrads<T>, Error> {
    let total = validate(gpu, cfg, h, x.q, x.k, x.v, indices, x.cu_seqlens)?;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let (bn_dq, bn_dkdv) = backward_tiles(dk, dv)?;
    let o_len = numel("o", &[total, hq, dv])?;
    for (name, b) in [("o_cmp", x.o_cmp), ("d_o", d_o), ("o_slc", &fwd.o_slc), ("o_win", &fwd.o_win)] {
        expect_len(name, b.len(), o_len, "[total, HQ, Dv]")?;
    }
    for (name, b) in [("lse_slc", &fwd.lse_slc), ("lse_win", &fwd.lse_win)] {
        expect_len(name, b.len(), total * hq, "[HQ, total]")?;
    }
    expect_len("gates", x.gates.len(), numel("gates", &[total, hq, 3])?, "[total, HQ, 3]")?;
    let (kw, vw) = match (x.k_win, x.v_win) {
        (Some(kw), Some(vw)) => {
            expect_len("k_win", kw.len(), x.k.len(), "[total, HKV, Dk]")?;
            expect_len("v_win", vw.len(), x.v.len(), "[total, HKV, Dv]")?;
            (kw, vw)
        }
        (None, None) => (x.k, x.v),
        _ => return Err(Error::Shape("k_win and v_win must be given together".into())),
    };
    if cfg.check_finite {
        check_finite_device(gpu, "d_o", &d_o.view())?;
    }
    let sfx = dtype_suffix::<T>()?;
    let scale = cfg.softmax_scale(h);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let total_i = to_i32(total, "total")?;

    // Gates: dgates, the branches' output gradients, delta of the selected branch.
    let mut dgates = gpu.zeros::<T>(total * hq * 3).map_err(device_err)?;
    let mut d_o_cmp = gpu.zeros::<T>(o_len).map_err(device_err)?;
    let mut d_o_slc = gpu.zeros::<T>(o_len).map_err(device_err)?;
    let mut d_o_win = gpu.zeros::<T>(o_len).map_err(device_err)?;
    let mut delta = gpu.zeros::<f32>(total * hq).map_err(device_err)?;
    if total > 0 {
        // SAFETY: (o_cmp, o_slc, o_win, gates, d_o, dgates, d_o_cmp, d_o_slc, d_o_win, delta,
        // dims = [total, hq, dv]) as declared in selected.cu: one warp per (token, head) < total *
        // hq, lengths checked above.
        let dims = gpu.upload(&[total_i, hq as i32, dv as i32]).map_err(device_err)?;
        let gate = unsafe {
            gpu.typed_kernel::<(
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &mut DeviceBuffer<T>,
                &mut DeviceBuffer<T>,
                &mut DeviceBuffer<T>,
                &mut DeviceBuffer<T>,
                &mut DeviceBuffer<f32>,
                &DeviceBuffer<i32>,
            )>(&SELECTED_KERNEL, entry(&format!("squid_nsa_gate_bwd_{sfx}"))?)
        }
        .map_err(device_err)?;
        gate.launch(
            gpu,
            LaunchDims::linear(total * hq * 32, 128, 4096),
            (
                x.o_cmp,
                &fwd.o_slc,
                &fwd.o_win,
                x.gates,
                d_o,
                &mut dgates,
                &mut d_o_cmp,
                &mut d_o_slc,
                &mut d_o_win,
                &mut delta,
                &dims,
            ),
        )
        .map_err(device_err)?;
    }

    // Window branch: the dense backward on its output gradient.
    let wx = dense_dev::BackwardInputs {
        q: x.q.view(),
        k: kw.view(),
        v: vw.view(),
        o: fwd.o_win.view(),
        lse: fwd.lse_win.view(),
        d_o: d_o_win.view(),
    };
    let win = dense_dev::backward(gpu, &window_cfg(cfg, h), wx, x.cu_seqlens, x.cu_seqlens, dense_dev::DqMode::Atomic)?;

    // Selected branch, f32 accumulators.
    let mut dq_slc = gpu.zeros::<f32>(total * hq * dk).map_err(device_err)?;
    let mut dk_slc = gpu.zeros::<f32>(total * hkv * dk).map_err(device_err)?;
    let mut dv_slc = gpu.zeros::<f32>(total * hkv * dv).map_err(device_err)?;
    let fwd_sched = slc_schedule(cfg, h, x.cu_seqlens, indices, bn_dq)?;
    if fwd_sched.items > 0 {
        let ints = gpu.upload(&fwd_sched.ints).map_err(device_err)?;
        // SAFETY: (q, k, v, d_o_slc, lse_slc, delta, dq f32, sched, scale_log2, scale) as declared;
        // the schedule names rows and keys inside their sequences (validated cu_seqlens, indices).
        let kernel = unsafe {
            gpu.typed_kernel::<(
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<f32>,
                &DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &DeviceBuffer<i32>,
                f32,
                f32,
            )>(&SELECTED_KERNEL, entry(&format!("squid_nsa_slc_bwd_dq_dk{dk}_dv{dv}_{sfx}"))?)
        }
        .map_err(device_err)?;
        // Dk = 192 splits the dQ columns over two CTAs.
        let split = if dk == 192 { 2 } else { 1 };
        let launch = LaunchDims { grid: (fwd_sched.items as u32, 1, split), block: (128, 1, 1), shared_bytes: 0 };
        kernel
            .launch(gpu, launch, (x.q, x.k, x.v, &d_o_slc, &fwd.lse_slc, &delta, &mut dq_slc, &ints, scale_log2, scale))
            .map_err(device_err)?;
    }
    let key_sched = key_schedule(cfg, h, x.cu_seqlens, indices, bn_dkdv)?;
    if key_sched.items > 0 {
        let ints = gpu.upload(&key_sched.ints).map_err(device_err)?;
        // SAFETY: (q, k, v, d_o_slc, lse_slc, delta, dk f32, dv f32, sched, scale_log2, scale) as
        // declared; every key tile and listed token lies inside its sequence.
        let kernel = unsafe {
            gpu.typed_kernel::<(
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<f32>,
                &DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &DeviceBuffer<i32>,
                f32,
                f32,
            )>(&SELECTED_KERNEL, entry(&format!("squid_nsa_slc_bwd_dkdv_dk{dk}_dv{dv}_{sfx}"))?)
        }
        .map_err(device_err)?;
        let launch = LaunchDims {
            grid: (key_sched.items as u32, 1, flash::dkdv_passes(dk)),
            block: (2 * bn_dkdv as u32, 1, 1),
            shared_bytes: 0,
        };
        kernel
            .launch(
                gpu,
                launch,
                (x.q, x.k, x.v, &d_o_slc, &fwd.lse_slc, &delta, &mut dk_slc, &mut dv_slc, &ints, scale_log2, scale),
            )
            .map_err(device_err)?;
    }

    // Sums: dq = window + selected; dk, dv likewise when the branches share K/V.
    let dq = add(gpu, &win.dq, &dq_slc)?;
    let separate = x.k_win.is_some();
    let (dk_out, dv_out, dk_win, dv_win) = if separate {
        let zk = gpu.zeros::<T>(dk_slc.len()).map_err(device_err)?;
        let zv = gpu.zeros::<T>(dv_slc.len()).map_err(device_err)?;
        (add(gpu, &zk, &dk_slc)?, add(gpu, &zv, &dv_slc)?, Some(win.dk), Some(win.dv))
    } else {
        (add(gpu, &win.dk, &dk_slc)?, add(gpu, &win.dv, &dv_slc)?, None, None)
    };
    Ok(DeviceNsaGrads { dq, dk: dk_out, dv: dv_out, dk_win, dv_win, dgates, d_o_cmp })
}

/// `a + b` rounded once to the storage type (`a.len() == b.len()`).
fn add<T: Element + DeviceCopy>(
    gpu: &Gpu,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<f32>,
) -> Result<DeviceBuffer<T>, Error> {
    let n = b.len();
    let mut out = gpu.zeros::<T>(n).map_err(device_err)?;
    if n == 0 {
        return Ok(out);
    }
    // SAFETY: (const T* a, const float* b, T* out, long long n), all n long.
    let kernel = unsafe {
        gpu.typed_kernel::<(&DeviceBuffer<T>, &DeviceBuffer<f32>, &mut DeviceBuffer<T>, i64)>(
            &SELECTED_KERNEL,
            entry(&format!("squid_nsa_add_{}", dtype_suffix::<T>()?))?,
        )
    }
    .map_err(device_err)?;
    kernel.launch(gpu, LaunchDims::linear(n, 256, 4096), (a, b, &mut out, n as i64)).map_err(device_err)?;
    Ok(out)
}
