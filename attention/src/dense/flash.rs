//! The tensor-core flash attention kernels (`flash.cu`) and the host side of their launches
//! that needs no CUDA: the head-dim specialisations and the tile schedule.
//!
//! A launch runs one CTA per (schedule item, query head). The schedule is built here from
//! `cu_seqlens` and the mask, so no CTA is launched for a tile whose rows see no key, and each
//! item carries the key range its rows see (only those key tiles are loaded) and the range every
//! row sees (key tiles inside it are not masked). Tiles never straddle sequences, and their
//! positions depend only on their own sequence, so a sequence's results do not depend on what
//! is packed with it.
// Without the `cuda` feature only the tests use the schedule.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use squid_cuda::KernelSource;

use super::cpu::Mask;
use crate::Error;

/// The CUDA source: forward and backward entries for every supported head-dim pair, bf16 and f16.
pub static KERNEL: KernelSource = squid_cuda::kernel_source!(
    "attention_flash",
    "src/dense/flash.cu",
    [
        "squid_flash_fwd_dk64_dv64_bf16",
        "squid_flash_fwd_dk64_dv64_f16",
        "squid_flash_fwd_dk96_dv96_bf16",
        "squid_flash_fwd_dk96_dv96_f16",
        "squid_flash_fwd_dk128_dv128_bf16",
        "squid_flash_fwd_dk128_dv128_f16",
        "squid_flash_fwd_dk192_dv128_bf16",
        "squid_flash_fwd_dk192_dv128_f16",
        "squid_flash_fwd_dk256_dv256_bf16",
        "squid_flash_fwd_dk256_dv256_f16",
        "squid_flash_bwd_pre_bf16",
        "squid_flash_bwd_pre_f16",
        "squid_flash_bwd_dq_convert_bf16",
        "squid_flash_bwd_dq_convert_f16",
        "squid_flash_bwd_dkdv_dk64_dv64_bf16",
        "squid_flash_bwd_dkdv_dk64_dv64_f16",
        "squid_flash_bwd_dkdv_dk96_dv96_bf16",
        "squid_flash_bwd_dkdv_dk96_dv96_f16",
        "squid_flash_bwd_dkdv_dk128_dv128_bf16",
        "squid_flash_bwd_dkdv_dk128_dv128_f16",
        "squid_flash_bwd_dkdv_dk192_dv128_bf16",
        "squid_flash_bwd_dkdv_dk192_dv128_f16",
        "squid_flash_bwd_dq_dk64_dv64_bf16",
        "squid_flash_bwd_dq_dk64_dv64_f16",
        "squid_flash_bwd_dq_dk96_dv96_bf16",
        "squid_flash_bwd_dq_dk96_dv96_f16",
        "squid_flash_bwd_dq_dk128_dv128_bf16",
        "squid_flash_bwd_dq_dk128_dv128_f16",
        "squid_flash_bwd_dq_dk192_dv128_bf16",
        "squid_flash_bwd_dq_dk192_dv128_f16",
        "squid_flash_bwd_dkdv_dk256_dv256_bf16",
        "squid_flash_bwd_dkdv_dk256_dv256_f16",
        "squid_flash_bwd_dq_dk256_dv256_bf16",
        "squid_flash_bwd_dq_dk256_dv256_f16",
    ],
    fast_math = false
);

/// The `(Dk, Dv)` pairs compiled as specialisations.
pub const HEAD_DIMS: [(usize, usize); 5] = [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256)];

/// The `(Dk, Dv)` pairs with a backward (every compiled pair), and the keys per dK/dV CTA (16 per
/// warp: four warps where the accumulators and shared tiles allow, two above, one at 256).
pub const BACKWARD_HEAD_DIMS: [(usize, usize, usize); 5] =
    [(64, 64, 64), (96, 96, 64), (128, 128, 32), (192, 128, 32), (256, 256, 16)];

/// Query rows per forward CTA (four warps of 16 rows).
pub const TILE_M: usize = 64;

/// Query heads per forward CTA: the GQA group (its largest divisor up to [`TILE_M`] for a larger
/// group), stacked in the CTA's rows so each K/V tile is loaded once for all of them; 1 at
/// Dk = 256 (its kernel is compiled without the stacking: its registers are full).
pub(crate) fn forward_heads_per_cta(num_q_heads: usize, num_kv_heads: usize, dk: usize) -> usize {
    let group = (num_q_heads / num_kv_heads.max(1)).max(1);
    if dk == 256 {
        return 1;
    }
    (1..=group.min(TILE_M)).rev().find(|d| group % d == 0).unwrap_or(1)
}

/// Query positions per forward schedule item: [`TILE_M`] rows shared by the stacked heads.
pub(crate) fn forward_tile_m(num_q_heads: usize, num_kv_heads: usize, dk: usize) -> usize {
    TILE_M / forward_heads_per_cta(num_q_heads, num_kv_heads, dk)
}

/// Ints before the first item: `total_q hq hkv causal window row_lo_at - -`.
pub(crate) const HEADER: usize = 8;
/// Ints per item: `q_base tq k_base tk r0 rows k_lo k_hi full_lo full_hi`.
pub(crate) const ITEM: usize = 10;

/// Fails unless `(dk, dv)` is one of [`HEAD_DIMS`].
pub(crate) fn check_head_dims(dk: usize, dv: usize) -> Result<(), Error> {
    if HEAD_DIMS.contains(&(dk, dv)) {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "no CUDA specialisation for Dk = {dk}, Dv = {dv}: compiled pairs are {HEAD_DIMS:?} (the CPU path takes any)"
        )))
    }
}

/// CTAs per key tile of the dK/dV kernel: 2 for Dk = 192 (one computes dV, the other dK, since
/// both accumulators do not fit the registers together), 4 for Dk = 256 (each of dV and dK in
/// two column halves), else 1.
pub(crate) fn dkdv_passes(dk: usize) -> u32 {
    match dk {
        192 => 2,
        256 => 4,
        _ => 1,
    }
}

/// Query rows per CTA of the deterministic dQ kernel (its schedule's tile height): one warp of
/// 16 rows at Dk = 256 (Q, dO and the K/V stages fill the shared memory), else [`TILE_M`].
pub(crate) fn dq_tile_m(dk: usize) -> usize {
    if dk == 256 {
        16
    } else {
        TILE_M
    }
}

/// CTAs per query tile of the deterministic dQ kernel: 2 at Dk = 256 (dQ's column halves), else 1.
pub(crate) fn dq_passes(dk: usize) -> u32 {
    if dk == 256 {
        2
    } else {
        1
    }
}

/// The keys per dK/dV CTA for `(dk, dv)`, or the error saying the pair has no backward.
pub(crate) fn backward_key_tile(dk: usize, dv: usize) -> Result<usize, Error> {
    check_head_dims(dk, dv)?;
    BACKWARD_HEAD_DIMS
        .iter()
        .find(|b| (b.0, b.1) == (dk, dv))
        .map(|b| b.2)
        .ok_or_else(|| Error::Unsupported(format!("no CUDA backward for Dk = {dk}, Dv = {dv}; use the CPU backward")))
}

/// A schedule ready to upload: header, items, then (optionally) each packed query row's first
/// visible key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub ints: Vec<i32>,
    pub items: usize,
}

impl Schedule {
    /// No items (a launch that is skipped).
    pub(crate) fn empty() -> Self {
        Self { ints: Vec::new(), items: 0 }
    }
}

/// How the kernel derives each row's key range: `causal` and `window` as [`super::DenseConfig`],
/// plus, when `row_lo` is set, a per-row lower bound taken from the mask (segments).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelMask {
    pub causal: bool,
    pub window: Option<usize>,
    pub row_lo: bool,
}

fn to_i32(v: usize, what: &str) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds the kernels' 32-bit indices")))
}

/// Builds the schedule for query tiles of at most `tile_m` rows. `cuts(s, tq, tk)` lists query
/// indices of sequence `s` where a tile must end (segment boundaries); `mask` gives each row's
/// key range, which must be what the kernel computes from `kmask` (the callers pair them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn schedule<M: Mask>(
    mask: &M,
    kmask: KernelMask,
    num_q_heads: usize,
    num_kv_heads: usize,
    tile_m: usize,
    cu_q: &[u32],
    cu_k: &[u32],
    cuts: impl Fn(usize, usize, usize) -> Vec<usize>,
) -> Result<Schedule, Error> {
    let mut ints = header(kmask, num_q_heads, num_kv_heads, cu_q, cu_k)?;
    let mut row_lo = Vec::new();
    let mut items = 0;
    for s in 0..cu_q.len().saturating_sub(1) {
        let (q_base, tq) = (cu_q[s] as usize, (cu_q[s + 1] - cu_q[s]) as usize);
        let (k_base, tk) = (cu_k[s] as usize, (cu_k[s + 1] - cu_k[s]) as usize);
        if kmask.row_lo {
            row_lo.extend((0..tq).map(|i| mask.range(s, i, tq, tk).0 as i32));
        }
        let mut cut = cuts(s, tq, tk);
        cut.retain(|&c| c > 0 && c < tq);
        cut.sort_unstable();
        let mut r0 = 0;
        while r0 < tq {
            let next_cut = cut.iter().copied().find(|&c| c > r0).unwrap_or(tq);
            let r1 = (r0 + tile_m).min(next_cut);
            let (mut k_lo, mut k_hi) = (usize::MAX, 0);
            let (mut full_lo, mut full_hi) = (0, usize::MAX);
            for i in r0..r1 {
                let (lo, hi) = mask.range(s, i, tq, tk);
                if lo < hi {
                    k_lo = k_lo.min(lo);
                    k_hi = k_hi.max(hi);
                }
                full_lo = full_lo.max(lo);
                full_hi = full_hi.min(hi);
            }
            if k_lo < k_hi {
                let full_hi = full_hi.max(full_lo);
                let item: [usize; ITEM] = [q_base, tq, k_base, tk, r0, r1 - r0, k_lo, k_hi, full_lo, full_hi];
                ints.extend(item.map(|v| v as i32));
                items += 1;
            }
            r0 = r1;
        }
    }
    finish(ints, items, kmask.row_lo.then_some(row_lo))
}

fn header(
    kmask: KernelMask,
    num_q_heads: usize,
    num_kv_heads: usize,
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<Vec<i32>, Error> {
    let total_q = *cu_q.last().unwrap_or(&0) as usize;
    let total_k = *cu_k.last().unwrap_or(&0) as usize;
    to_i32(total_k * num_kv_heads.max(1), "total_k x HKV")?;
    to_i32(total_q * num_q_heads.max(1), "total_q x HQ")?;
    let window = match kmask.window {
        Some(w) => to_i32(w.min(total_k + 1), "window")?,
        None => 0,
    };
    let ints = vec![
        to_i32(total_q, "total_q")?,
        to_i32(num_q_heads, "HQ")?,
        to_i32(num_kv_heads, "HKV")?,
        i32::from(kmask.causal),
        window,
        -1,
        0,
        0,
    ];
    debug_assert_eq!(ints.len(), HEADER);
    Ok(ints)
}

fn finish(mut ints: Vec<i32>, items: usize, row_lo: Option<Vec<i32>>) -> Result<Schedule, Error> {
    if let Some(row_lo) = row_lo {
        ints[5] = to_i32(ints.len(), "schedule length")?;
        ints.extend(row_lo);
    }
    ints[6] = to_i32(items, "items")?;
    Ok(Schedule { ints, items })
}

/// The dK/dV schedule: one item per key tile of `tile_n` keys that some query sees, with the
/// queries `q_lo..q_hi` that see some key of it and `qf_lo..qf_hi` that see all of it (a
/// contiguous run for every mask here, since both ends of a row's range never decrease; the
/// run is left empty if a mask ever breaks that). `atomic` sets the header flag that makes the
/// kernel add dQ into an f32 buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn key_schedule<M: Mask>(
    mask: &M,
    kmask: KernelMask,
    num_q_heads: usize,
    num_kv_heads: usize,
    tile_n: usize,
    cu_q: &[u32],
    cu_k: &[u32],
    atomic: bool,
) -> Result<Schedule, Error> {
    let mut ints = header(kmask, num_q_heads, num_kv_heads, cu_q, cu_k)?;
    ints[7] = i32::from(atomic);
    let mut row_lo = Vec::new();
    let mut items = 0;
    for s in 0..cu_q.len().saturating_sub(1) {
        let (q_base, tq) = (cu_q[s] as usize, (cu_q[s + 1] - cu_q[s]) as usize);
        let (k_base, tk) = (cu_k[s] as usize, (cu_k[s + 1] - cu_k[s]) as usize);
        let ranges: Vec<(usize, usize)> = (0..tq).map(|i| mask.range(s, i, tq, tk)).collect();
        if kmask.row_lo {
            row_lo.extend(ranges.iter().map(|r| r.0 as i32));
        }
        for n0 in (0..tk).step_by(tile_n.max(1)) {
            let n1 = (n0 + tile_n).min(tk);
            let (mut q_lo, mut q_hi) = (usize::MAX, 0);
            let (mut f_lo, mut f_hi, mut contiguous) = (usize::MAX, 0, true);
            for (i, &(lo, hi)) in ranges.iter().enumerate() {
                if lo < hi && lo < n1 && hi > n0 {
                    q_lo = q_lo.min(i);
                    q_hi = i + 1;
                }
                if lo <= n0 && hi >= n1 && lo < hi {
                    if f_hi != 0 && f_hi != i {
                        contiguous = false;
                    }
                    f_lo = f_lo.min(i);
                    f_hi = i + 1;
                }
            }
            if q_lo >= q_hi {
                continue;
            }
            let (f_lo, f_hi) = if contiguous && f_lo < f_hi { (f_lo, f_hi) } else { (0, 0) };
            let item: [usize; ITEM] = [q_base, tq, k_base, tk, n0, n1 - n0, q_lo, q_hi, f_lo, f_hi];
            ints.extend(item.map(|v| v as i32));
            items += 1;
        }
    }
    finish(ints, items, kmask.row_lo.then_some(row_lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::DenseConfig;
    use crate::Heads;

    #[test]
    fn schedule_skips_empty_tiles_and_bounds_each_tile() {
        let mut cfg = DenseConfig::causal(Heads::new(2, 1, 64, 64));
        // Sequence 0: 3 queries, no keys (empty); sequence 1: 130 queries on 100 keys (causal
        // bottom-right: its first 30 rows see nothing); sequence 2: one token.
        let cu_q = [0u32, 3, 133, 134];
        let cu_k = [0u32, 0, 100, 101];
        let km = KernelMask { causal: true, window: None, row_lo: false };
        let s = schedule(&cfg, km, 2, 1, TILE_M, &cu_q, &cu_k, |_, _, _| Vec::new()).unwrap();
        let items: Vec<&[i32]> = s.ints[HEADER..].chunks(ITEM).collect();
        assert_eq!(s.items, 4);
        assert_eq!(items[0], [3, 130, 0, 100, 0, 64, 0, 34, 0, 0]);
        assert_eq!(items[1], [3, 130, 0, 100, 64, 64, 0, 98, 0, 35]);
        assert_eq!(items[2], [3, 130, 0, 100, 128, 2, 0, 100, 0, 99]);
        assert_eq!(items[3], [133, 1, 100, 1, 0, 1, 0, 1, 0, 1]);
        // A window of 10: tile 2's keys start at 99 - 9 = 90.
        cfg.window = Some(10);
        let km = KernelMask { window: Some(10), ..km };
        let s = schedule(&cfg, km, 2, 1, TILE_M, &cu_q, &cu_k, |_, _, _| Vec::new()).unwrap();
        assert_eq!(&s.ints[HEADER + 2 * ITEM..][..ITEM], [3, 130, 0, 100, 128, 2, 89, 100, 90, 99]);
        // Cuts split tiles.
        let s = schedule(&cfg, km, 2, 1, TILE_M, &[0, 5], &[0, 5], |_, _, _| vec![2, 0, 9]).unwrap();
        assert_eq!(s.items, 2);
    }
}
