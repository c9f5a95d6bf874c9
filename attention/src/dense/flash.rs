//! The tensor-core flash attention kernels (`flash.cu`) and the host side of their launches
//! that needs no CUDA: the head-dim specialisations and the tile schedule.
//!
//! A launch runs one CTA per (schedule item, query head). The schedule is built here from
//! `cu_seqlens` and the mask, so no CTA is launched for a tile whose rows see no key, and each
//! item carries the key range its rows see (only those key tiles are loaded) and the range every
//! row sees (key tiles inside it are not masked). Tiles never straddle sequences, and their
//! positions depend only on their own sequence, so a sequence's results do not depend on what
//! is packed with it.

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
    ],
    fast_math = false
);

/// The `(Dk, Dv)` pairs compiled as specialisations.
pub const HEAD_DIMS: [(usize, usize); 5] = [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256)];

/// Query rows per forward CTA (four warps of 16 rows).
pub const TILE_M: usize = 64;

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

/// A schedule ready to upload: header, items, then (optionally) each packed query row's first
/// visible key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub ints: Vec<i32>,
    pub items: usize,
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
    let total_q = *cu_q.last().unwrap_or(&0) as usize;
    let total_k = *cu_k.last().unwrap_or(&0) as usize;
    to_i32(total_k, "total_k")?;
    to_i32(total_q * num_q_heads.max(1), "total_q x HQ")?;
    let window = match kmask.window {
        Some(w) => to_i32(w.min(total_k + 1), "window")?,
        None => 0,
    };
    let mut ints = vec![
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
    if kmask.row_lo {
        ints[5] = to_i32(ints.len(), "schedule length")?;
        ints.extend(row_lo);
    }
    ints[6] = to_i32(items, "items")?;
    Ok(Schedule { ints, items })
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
