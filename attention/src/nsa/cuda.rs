//! NSA kernels on a device (a GPU, or squid-cuda's simulator): compression by mean pooling,
//! forward and backward, and top-n block selection, over [`DeviceBuffer`]s, with the CPU path's validation and typed
//! errors. Storage is bf16 or f16 (f32 is refused with [`Error::Unsupported`]);
//! `cu_seqlens` stay on the host, where the launchers build the small row tables the kernels
//! read.

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, Gpu, LaunchDims};
use squid_cuda::Element;

use super::{offsets, NsaConfig, COMPRESS_KERNEL, SELECT_KERNEL};
use crate::dense::cuda::{device_err, dtype_suffix};
use crate::layout::{expect_len, numel, rows_of};
use crate::{validate_cu_seqlens, Error};

/// Threads per CTA of the element-wise kernels.
const THREADS: u32 = 256;
/// Most CTAs of a grid-stride launch.
const MAX_BLOCKS: u32 = 65_535;

/// Finds `name` among the compression kernel's declared entries.
fn entry(name: &str) -> Result<&'static str, Error> {
    entry_of(&COMPRESS_KERNEL, name)
}

/// Finds `name` among `kernel`'s declared entries (they are `&'static`, as launches need).
fn entry_of(kernel: &'static squid_cuda::KernelSource, name: &str) -> Result<&'static str, Error> {
    kernel
        .entries
        .iter()
        .copied()
        .find(|e| *e == name)
        .ok_or_else(|| Error::Unsupported(format!("no kernel entry {name}")))
}

/// `x` as an `i32` kernel argument, or the error naming what is too large.
fn as_i32(what: &str, x: usize) -> Result<i32, Error> {
    i32::try_from(x).map_err(|_| Error::Unsupported(format!("{what} = {x} exceeds the kernels' 32-bit indices")))
}

/// [`super::compress_mean`] on the device: `x [total, H, D] -> [total_cmp, H, D]`, block `i` of
/// a sequence the mean of its rows `i d .. i d + l`, summed in f32. Equal to the CPU path bit
/// for bit (same order of f32 additions, one rounding to the storage type).
pub fn compress_mean<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    heads: usize,
    dim: usize,
    x: &DeviceBuffer<T>,
    cu_seqlens: &[u32],
) -> Result<DeviceBuffer<T>, Error> {
    cfg.validate()?;
    let sfx = dtype_suffix::<T>()?;
    let total = rows_of("x", x.len(), heads, dim)?;
    validate_cu_seqlens(cu_seqlens, total)?;
    let row = heads * dim;
    let offs = offsets(cfg, cu_seqlens);
    let total_cmp = *offs.last().unwrap_or(&0) as usize;
    // First input row of each compressed block.
    let mut first = Vec::with_capacity(total_cmp);
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        for i in 0..(offs[s + 1] - offs[s]) as usize {
            first.push(as_i32("input row", w[0] as usize + i * cfg.stride_cmp)?);
        }
    }
    let n = numel("compress_mean output", &[total_cmp, row])?;
    let mut out = gpu.zeros::<T>(n).map_err(device_err)?;
    if n == 0 {
        return Ok(out);
    }
    let (row_i, l_i) = (as_i32("H x D", row)?, as_i32("l", cfg.block_cmp)?);
    as_i32("rows", total)?;
    let first = gpu.upload(&first).map_err(device_err)?;
    // SAFETY: the entry is (const T* x, T* out, const int* first, long long n, int row, int l,
    // float inv_l); out has n = total_cmp * row elements, first has total_cmp entries, and every
    // block's rows first[b] .. first[b] + l lie inside its sequence, so inside x (validated).
    let kernel = unsafe {
        gpu.typed_kernel::<(&DeviceBuffer<T>, &mut DeviceBuffer<T>, &DeviceBuffer<i32>, i64, i32, i32, f32)>(
            &COMPRESS_KERNEL,
            entry(&format!("squid_nsa_compress_mean_fwd_{sfx}"))?,
        )
    }
    .map_err(device_err)?;
    let inv = 1.0 / cfg.block_cmp as f32;
    kernel
        .launch(gpu, LaunchDims::linear(n, THREADS, MAX_BLOCKS), (x, &mut out, &first, n as i64, row_i, l_i, inv))
        .map_err(device_err)?;
    Ok(out)
}

/// [`super::compress_mean_backward`] on the device: `dx[t] = sum over blocks i containing t of
/// dx_cmp[i] / l` (ascending `i`, f32), zero for rows no block covers. Equal to the CPU path
/// bit for bit.
pub fn compress_mean_backward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &NsaConfig,
    heads: usize,
    dim: usize,
    dx_cmp: &DeviceBuffer<T>,
    cu_seqlens: &[u32],
) -> Result<DeviceBuffer<T>, Error> {
    cfg.validate()?;
    let sfx = dtype_suffix::<T>()?;
    let total = *cu_seqlens.last().ok_or_else(|| Error::CuSeqlens("empty".into()))? as usize;
    validate_cu_seqlens(cu_seqlens, total)?;
    let row = numel("dx", &[heads, dim])?;
    if row == 0 {
        return Err(Error::Shape(format!("heads x dim = {heads} x {dim} is empty")));
    }
    let offs = offsets(cfg, cu_seqlens);
    let total_cmp = *offs.last().unwrap_or(&0) as usize;
    expect_len("dx_cmp", dx_cmp.len(), numel("dx_cmp", &[total_cmp, row])?, "[total_cmp, H, D]")?;
    let n = numel("dx", &[total, row])?;
    let (l, d) = (cfg.block_cmp, cfg.stride_cmp);
    // Per input row: its first covering block (global index) and how many cover it.
    let mut cover = Vec::with_capacity(2 * total);
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        let nb = (offs[s + 1] - offs[s]) as usize;
        for p in 0..(w[1] - w[0]) as usize {
            // Blocks i with i d <= p < i d + l, i < nb.
            let lo = if p + 1 > l { (p + 1 - l).div_ceil(d) } else { 0 };
            let hi = (p / d + 1).min(nb);
            let count = hi.saturating_sub(lo);
            cover.push(as_i32("compressed block", offs[s] as usize + lo.min(nb))?);
            cover.push(count as i32);
        }
    }
    let mut dx = gpu.zeros::<T>(n).map_err(device_err)?;
    if n == 0 || total_cmp == 0 {
        return Ok(dx);
    }
    let row_i = as_i32("H x D", row)?;
    let cover = gpu.upload(&cover).map_err(device_err)?;
    // SAFETY: the entry is (const T* dx_cmp, T* dx, const int* cover, long long n, int row,
    // float inv_l); dx has n = total * row elements, cover 2 * total entries, and each row's
    // blocks cover[2r] .. cover[2r] + cover[2r + 1] are blocks of its own sequence, inside dx_cmp
    // (length checked above).
    let kernel = unsafe {
        gpu.typed_kernel::<(&DeviceBuffer<T>, &mut DeviceBuffer<T>, &DeviceBuffer<i32>, i64, i32, f32)>(
            &COMPRESS_KERNEL,
            entry(&format!("squid_nsa_compress_mean_bwd_{sfx}"))?,
        )
    }
    .map_err(device_err)?;
    let inv = 1.0 / cfg.block_cmp as f32;
    kernel
        .launch(gpu, LaunchDims::linear(n, THREADS, MAX_BLOCKS), (dx_cmp, &mut dx, &cover, n as i64, row_i, inv))
        .map_err(device_err)?;
    Ok(dx)
}

/// Top-n selection on the device, as [`super::select_blocks_n`] per (query token, kv head):
/// `scores [total_q, HKV, stride]` holds each row's selection-block importance (entry `j` for
/// blocks `j <= t / l'`, `t` the token's position; `stride` at least the longest sequence's
/// block count, [`NsaConfig::num_slc_blocks`]). Returns the chosen blocks `[total_q, HKV, n]`,
/// ascending, [`super::NO_BLOCK`]-padded: the forced initial and local blocks, then the highest scores
/// by `f32::total_cmp`, ties to the lower index, `num_selected[row]` blocks in all (or `n`).
/// Queries are the last `Tq` positions of each sequence's `Tk` keys (`cu_seqlens_k`, or the
/// query offsets when `None`), as [`super::NsaExtra`] has them. Equal to the CPU choice on the
/// same scores, exactly (the ranking is a total order: no rounding enters).
#[allow(clippy::too_many_arguments)]
pub fn select_top_n(
    gpu: &Gpu,
    cfg: &NsaConfig,
    num_kv_heads: usize,
    scores: &DeviceBuffer<f32>,
    stride: usize,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: Option<&[u32]>,
    num_selected: Option<&[u32]>,
) -> Result<DeviceBuffer<u32>, Error> {
    cfg.validate()?;
    if num_kv_heads == 0 {
        return Err(Error::Heads("num_kv_heads is 0".into()));
    }
    let total_q = *cu_seqlens_q.last().ok_or_else(|| Error::CuSeqlens("empty".into()))? as usize;
    let num_seqs = validate_cu_seqlens(cu_seqlens_q, total_q)?;
    let cu_k = cu_seqlens_k.unwrap_or(cu_seqlens_q);
    let total_k = *cu_k.last().ok_or_else(|| Error::CuSeqlens("empty cu_seqlens_k".into()))? as usize;
    if validate_cu_seqlens(cu_k, total_k)? != num_seqs {
        return Err(Error::CuSeqlens("cu_seqlens_q and cu_seqlens_k describe different numbers of sequences".into()));
    }
    let rows = numel("scores rows", &[total_q, num_kv_heads])?;
    expect_len("scores", scores.len(), numel("scores", &[rows, stride])?, "[total_q, HKV, stride]")?;
    if let Some(c) = num_selected {
        expect_len("num_selected", c.len(), total_q, "[total_q]")?;
    }
    let n = cfg.num_selected;
    let mut meta = Vec::with_capacity(3 * rows);
    for (s, (wq, wk)) in cu_seqlens_q.windows(2).zip(cu_k.windows(2)).enumerate() {
        let (tq, tk) = ((wq[1] - wq[0]) as usize, (wk[1] - wk[0]) as usize);
        if tq > tk {
            return Err(Error::CuSeqlens(format!("sequence {s} has {tq} queries but only {tk} keys")));
        }
        if cfg.num_slc_blocks(tk) > stride {
            return Err(Error::Shape(format!(
                "stride {stride} is below sequence {s}'s {} selection blocks",
                cfg.num_slc_blocks(tk)
            )));
        }
        for i in 0..tq {
            let row = wq[0] as usize + i;
            let n_t = num_selected.map_or(n, |c| c[row] as usize);
            if n_t < cfg.forced_blocks() || n_t > n {
                return Err(Error::Config(format!(
                    "num_selected of query row {row} is {n_t}, outside {} ..= {n}",
                    cfg.forced_blocks()
                )));
            }
            for _ in 0..num_kv_heads {
                meta.extend([as_i32("position", i + tk - tq)?, n_t as i32, 0]);
            }
        }
    }
    let len = numel("indices", &[rows, n])?;
    let mut out = gpu.zeros::<u32>(len).map_err(device_err)?;
    if len == 0 {
        return Ok(out);
    }
    let args = [
        as_i32("rows", rows)?,
        as_i32("stride", stride)?,
        as_i32("n", n)?,
        as_i32("l'", cfg.block_slc)?,
        as_i32("num_initial", cfg.num_initial.min(n))?,
        as_i32("num_local", cfg.num_local.min(n))?,
    ];
    let meta = gpu.upload(&meta).map_err(device_err)?;
    // SAFETY: the entry is (const float* scores, unsigned* out, const int* meta, int rows, int
    // stride, int n, int block_slc, int num_initial, int num_local); one thread per row < rows
    // reads meta[3 r ..], scores[r * stride + j] for j <= t / l' < stride (checked above), and
    // writes out[r * n ..][..n].
    let kernel = unsafe {
        gpu.typed_kernel::<(
            &DeviceBuffer<f32>,
            &mut DeviceBuffer<u32>,
            &DeviceBuffer<i32>,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
        )>(&SELECT_KERNEL, entry_of(&SELECT_KERNEL, "squid_nsa_select_topn")?)
    }
    .map_err(device_err)?;
    kernel
        .launch(
            gpu,
            LaunchDims::linear(rows, 128, u32::MAX),
            (scores, &mut out, &meta, args[0], args[1], args[2], args[3], args[4], args[5]),
        )
        .map_err(device_err)?;
    Ok(out)
}
