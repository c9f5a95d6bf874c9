//! Dense attention on a device (a GPU, or squid-cuda's simulator): the CPU API over
//! [`DeviceBuffer`]s, with the same configs, validation and typed errors.
//!
//! Storage is bf16 or f16 (the tensor cores' inputs); f32 tensors are refused with
//! [`Error::Unsupported`]: convert them on the host (`half::bf16::from_f32`) before uploading.
//! Head dims are the compiled pairs [`super::flash::HEAD_DIMS`]. `cu_seqlens` stay on the host:
//! the tile schedule is built from them there and uploaded with each call.

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, Gpu, LaunchDims};
use squid_cuda::{DType, Element};

use super::flash::{self, KernelMask, Schedule, KERNEL};
use super::{validate_lens, DenseConfig, Dims};
use crate::layout::{check_finite, expect_len};
use crate::Error;

/// Forward result on the device: `o [total_q, HQ, Dv]`, `lse [HQ, total_q]` (natural log; `-inf`
/// and `o = 0` for a query that sees no key).
#[derive(Debug)]
pub struct DeviceOutput<T> {
    /// `[total_q, HQ, Dv]`.
    pub o: DeviceBuffer<T>,
    /// `[HQ, total_q]`.
    pub lse: DeviceBuffer<f32>,
}

pub(crate) fn device_err(e: squid_cuda::Error) -> Error {
    Error::Device(e.to_string())
}

/// The entry-name suffix of a storage type, or the error that says to convert.
pub(crate) fn dtype_suffix<T: Element>() -> Result<&'static str, Error> {
    match T::DTYPE {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Err(Error::Unsupported(
            "f32 storage: the tensor-core kernels take bf16 or f16; convert on the host before uploading".into(),
        )),
    }
}

/// Finds `name` among the kernel's declared entries (they are `&'static`, as launches need).
pub(crate) fn entry(name: &str) -> Result<&'static str, Error> {
    KERNEL
        .entries
        .iter()
        .copied()
        .find(|e| *e == name)
        .ok_or_else(|| Error::Unsupported(format!("no kernel entry {name}")))
}

/// The check `check_finite` asks for, on a downloaded copy (one device-to-host copy per tensor).
pub(crate) fn check_finite_device<T: Element + DeviceCopy>(
    gpu: &Gpu,
    name: &'static str,
    x: &DeviceBuffer<T>,
) -> Result<(), Error> {
    check_finite(name, &gpu.download(x).map_err(device_err)?)
}

/// Validation shared by the device calls: lengths, dtype, head dims, finiteness.
pub(crate) fn validate_device<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<Dims, Error> {
    let dims = validate_lens(cfg, q.len(), k.len(), v.len(), cu_q, cu_k)?;
    dtype_suffix::<T>()?;
    flash::check_head_dims(cfg.heads.head_dim_k, cfg.heads.head_dim_v)?;
    if cfg.check_finite {
        check_finite_device(gpu, "q", q)?;
        check_finite_device(gpu, "k", k)?;
        check_finite_device(gpu, "v", v)?;
    }
    Ok(dims)
}

/// Runs the forward kernel over a schedule (shared by dense and segment attention), whose items
/// hold at most [`flash::forward_tile_m`] positions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_scheduled<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    sched: &Schedule,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
) -> Result<DeviceOutput<T>, Error> {
    let h = cfg.heads;
    let hpc = flash::forward_heads_per_cta(h.num_q_heads, h.num_kv_heads, h.head_dim_k);
    forward_scheduled_stacking(gpu, cfg, dims, sched, q, k, v, hpc)
}

/// [`forward_scheduled`] with `hpc` heads per CTA (a divisor of the group; items of at most
/// `TILE_M / hpc` positions): the tests compare stacking against one head per CTA.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_scheduled_stacking<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    sched: &Schedule,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    hpc: usize,
) -> Result<DeviceOutput<T>, Error> {
    let h = cfg.heads;
    let mut o = gpu.zeros::<T>(dims.total_q * h.num_q_heads * h.head_dim_v).map_err(device_err)?;
    let mut lse = gpu.upload(&vec![f32::NEG_INFINITY; dims.total_q * h.num_q_heads]).map_err(device_err)?;
    if sched.items == 0 {
        return Ok(DeviceOutput { o, lse });
    }
    let name = format!("squid_flash_fwd_dk{}_dv{}_{}", h.head_dim_k, h.head_dim_v, dtype_suffix::<T>()?);
    // Header int 7 tells the kernel how many heads of a group each CTA stacks.
    let group = h.num_q_heads / h.num_kv_heads.max(1);
    if hpc == 0 || group % hpc != 0 || hpc > flash::TILE_M || (hpc > 1 && h.head_dim_k == 256) {
        return Err(Error::Unsupported(format!("{hpc} heads per forward CTA for a GQA group of {group}")));
    }
    debug_assert!(sched.ints[flash::HEADER..][..sched.items * flash::ITEM]
        .chunks(flash::ITEM)
        .all(|it| it[5] as usize * hpc <= flash::TILE_M));
    let mut header_ints = sched.ints.clone();
    header_ints[7] = hpc as i32;
    let ints = gpu.upload(&header_ints).map_err(device_err)?;
    let scale_log2 = cfg.softmax_scale() * std::f32::consts::LOG2_E;
    let grid = (sched.items as u32, (h.num_q_heads / hpc) as u32, 1);
    let launch = LaunchDims { grid, block: (128, 1, 1), shared_bytes: 0 };
    // SAFETY: the entry is (const T* q, const T* k, const T* v, T* o, float* lse, const int*
    // sched, float scale_log2) with T a 16-bit storage type; the schedule was built from the
    // validated cu_seqlens, so every row it addresses lies inside q, k, v, o and lse; the
    // CTA of grid row y writes heads y * hpc .. (y + 1) * hpc, and hpc divides HQ / HKV.
    let kernel = unsafe {
        gpu.typed_kernel::<(
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &mut DeviceBuffer<T>,
            &mut DeviceBuffer<f32>,
            &DeviceBuffer<i32>,
            f32,
        )>(&KERNEL, entry(&name)?)
    }
    .map_err(device_err)?;
    kernel.launch(gpu, launch, (q, k, v, &mut o, &mut lse, &ints, scale_log2)).map_err(device_err)?;
    Ok(DeviceOutput { o, lse })
}

pub(crate) fn dense_schedule(cfg: &DenseConfig, cu_q: &[u32], cu_k: &[u32], tile_m: usize) -> Result<Schedule, Error> {
    let kmask = KernelMask { causal: cfg.causal, window: cfg.window, row_lo: false };
    flash::schedule(cfg, kmask, cfg.heads.num_q_heads, cfg.heads.num_kv_heads, tile_m, cu_q, cu_k, |_, _, _| Vec::new())
}

/// Attention forward on the device, as [`super::forward`]: `q [total_q, HQ, Dk]`,
/// `k [total_k, HKV, Dk]`, `v [total_k, HKV, Dv]` in bf16 or f16.
pub fn forward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DeviceOutput<T>, Error> {
    let dims = validate_device(gpu, cfg, q, k, v, cu_seqlens_q, cu_seqlens_k)?;
    let tile_m = flash::forward_tile_m(cfg.heads.num_q_heads, cfg.heads.num_kv_heads, cfg.heads.head_dim_k);
    let sched = dense_schedule(cfg, cu_seqlens_q, cu_seqlens_k, tile_m)?;
    forward_scheduled(gpu, cfg, dims, &sched, q, k, v)
}

/// Backward result on the device.
#[derive(Debug)]
pub struct DeviceGrads<T> {
    /// `[total_q, HQ, Dk]`.
    pub dq: DeviceBuffer<T>,
    /// `[total_k, HKV, Dk]`, summed over each GQA group.
    pub dk: DeviceBuffer<T>,
    /// `[total_k, HKV, Dv]`, summed over each GQA group.
    pub dv: DeviceBuffer<T>,
}

/// How the backward computes dQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DqMode {
    /// The dK/dV kernel adds each key tile's share of dQ into an f32 buffer with atomics
    /// (one pass over the keys; the order of the f32 additions, so the last bits, vary run to run).
    #[default]
    Atomic,
    /// A separate kernel per query tile walks the keys again and sums dQ in registers: bit-for-bit
    /// reproducible, at the cost of recomputing the scores.
    Deterministic,
}

/// The forward's tensors and the output gradient a backward takes, all on the device.
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    /// `[total_q, HQ, Dk]`.
    pub q: &'a DeviceBuffer<T>,
    /// `[total_k, HKV, Dk]`.
    pub k: &'a DeviceBuffer<T>,
    /// `[total_k, HKV, Dv]`.
    pub v: &'a DeviceBuffer<T>,
    /// The forward's output `[total_q, HQ, Dv]`.
    pub o: &'a DeviceBuffer<T>,
    /// The forward's `[HQ, total_q]` log-sum-exp.
    pub lse: &'a DeviceBuffer<f32>,
    /// The output gradient `[total_q, HQ, Dv]`.
    pub d_o: &'a DeviceBuffer<T>,
}

/// Runs the backward kernels over a forward (query-tile) schedule of [`flash::dq_tile_m`] rows
/// and a key-tile schedule.
pub(crate) fn backward_scheduled<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    fwd_sched: &Schedule,
    key_sched: &Schedule,
    x: BackwardInputs<'_, T>,
    mode: DqMode,
) -> Result<DeviceGrads<T>, Error> {
    let h = cfg.heads;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let sfx = dtype_suffix::<T>()?;
    let key_tile = flash::backward_key_tile(dk, dv)?;
    let mut dq = gpu.zeros::<T>(dims.total_q * hq * dk).map_err(device_err)?;
    let mut dkb = gpu.zeros::<T>(dims.total_k * hkv * dk).map_err(device_err)?;
    let mut dvb = gpu.zeros::<T>(dims.total_k * hkv * dv).map_err(device_err)?;
    if key_sched.items == 0 {
        return Ok(DeviceGrads { dq, dk: dkb, dv: dvb });
    }
    let scale = cfg.softmax_scale();
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let total_q = i32::try_from(dims.total_q).map_err(|_| Error::Unsupported("total_q exceeds i32".into()))?;

    // delta = rowsum(dO * O).
    let mut delta = gpu.zeros::<f32>(dims.total_q * hq).map_err(device_err)?;
    // SAFETY: (const T* o, const T* d_o, float* delta, int total_q, int hq, int dv): one warp per
    // (row, head) < total_q * hq, reading dv elements of each; lengths validated by the caller.
    let pre = unsafe {
        gpu.typed_kernel::<(&DeviceBuffer<T>, &DeviceBuffer<T>, &mut DeviceBuffer<f32>, i32, i32, i32)>(
            &KERNEL,
            entry(&format!("squid_flash_bwd_pre_{sfx}"))?,
        )
    }
    .map_err(device_err)?;
    let warps = LaunchDims::linear(dims.total_q * hq * 32, 128, 4096);
    pre.launch(gpu, warps, (x.o, x.d_o, &mut delta, total_q, hq as i32, dv as i32)).map_err(device_err)?;

    let atomic = mode == DqMode::Atomic;
    let mut dq_acc = gpu.zeros::<f32>(if atomic { dims.total_q * hq * dk } else { 1 }).map_err(device_err)?;
    let key_ints = gpu.upload(&key_sched.ints).map_err(device_err)?;
    // SAFETY: (q, k, v, d_o, lse, delta, dk, dv, dq_acc, sched, scale_log2, scale) as declared in
    // flash.cu; the key schedule was built from the validated cu_seqlens, so every row it names
    // is inside the buffers; dq_acc is only written when the schedule's atomic flag is set, and
    // then it has total_q * HQ * Dk elements.
    let dkdv = unsafe {
        gpu.typed_kernel::<(
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<T>,
            &DeviceBuffer<f32>,
            &DeviceBuffer<f32>,
            &mut DeviceBuffer<T>,
            &mut DeviceBuffer<T>,
            &mut DeviceBuffer<f32>,
            &DeviceBuffer<i32>,
            f32,
            f32,
        )>(&KERNEL, entry(&format!("squid_flash_bwd_dkdv_dk{dk}_dv{dv}_{sfx}"))?)
    }
    .map_err(device_err)?;
    let launch = LaunchDims {
        grid: (key_sched.items as u32, hkv as u32, flash::dkdv_passes(dk)),
        block: (2 * key_tile as u32, 1, 1),
        shared_bytes: 0,
    };
    dkdv.launch(
        gpu,
        launch,
        (x.q, x.k, x.v, x.d_o, x.lse, &delta, &mut dkb, &mut dvb, &mut dq_acc, &key_ints, scale_log2, scale),
    )
    .map_err(device_err)?;

    if atomic {
        // SAFETY: (const float* acc, T* dq, long long n, float scale), n = both lengths.
        let convert = unsafe {
            gpu.typed_kernel::<(&DeviceBuffer<f32>, &mut DeviceBuffer<T>, i64, f32)>(
                &KERNEL,
                entry(&format!("squid_flash_bwd_dq_convert_{sfx}"))?,
            )
        }
        .map_err(device_err)?;
        let n = dq.len();
        convert
            .launch(gpu, LaunchDims::linear(n, 256, 4096), (&dq_acc, &mut dq, n as i64, scale))
            .map_err(device_err)?;
    } else if fwd_sched.items > 0 {
        let ints = gpu.upload(&fwd_sched.ints).map_err(device_err)?;
        // SAFETY: (q, k, v, d_o, lse, delta, dq, sched, scale_log2, scale) as declared; the
        // forward schedule bounds every row as in the forward.
        let dq_kernel = unsafe {
            gpu.typed_kernel::<(
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<T>,
                &DeviceBuffer<f32>,
                &DeviceBuffer<f32>,
                &mut DeviceBuffer<T>,
                &DeviceBuffer<i32>,
                f32,
                f32,
            )>(&KERNEL, entry(&format!("squid_flash_bwd_dq_dk{dk}_dv{dv}_{sfx}"))?)
        }
        .map_err(device_err)?;
        let launch = LaunchDims {
            grid: (fwd_sched.items as u32, hq as u32, flash::dq_passes(dk)),
            block: (2 * flash::dq_tile_m(dk) as u32, 1, 1),
            shared_bytes: 0,
        };
        dq_kernel
            .launch(gpu, launch, (x.q, x.k, x.v, x.d_o, x.lse, &delta, &mut dq, &ints, scale_log2, scale))
            .map_err(device_err)?;
    }
    Ok(DeviceGrads { dq, dk: dkb, dv: dvb })
}

/// Checks the lengths (and, with `check_finite`, the values) of a backward's extra inputs.
pub(crate) fn validate_backward_device<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    x: &BackwardInputs<'_, T>,
) -> Result<(), Error> {
    let h = cfg.heads;
    let o_len = dims.total_q * h.num_q_heads * h.head_dim_v;
    expect_len("o", x.o.len(), o_len, "[total_q, HQ, Dv]")?;
    expect_len("d_o", x.d_o.len(), o_len, "[total_q, HQ, Dv]")?;
    expect_len("lse", x.lse.len(), dims.total_q * h.num_q_heads, "[HQ, total_q]")?;
    flash::backward_key_tile(h.head_dim_k, h.head_dim_v)?;
    if cfg.check_finite {
        check_finite_device(gpu, "d_o", x.d_o)?;
        check_finite_device(gpu, "o", x.o)?;
    }
    Ok(())
}

/// Attention backward on the device, as [`super::backward`]: recomputes the probabilities from
/// `lse` and returns `dq, dk, dv` (dK/dV summed over each GQA group). `mode` picks how dQ is
/// summed.
pub fn backward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    x: BackwardInputs<'_, T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    mode: DqMode,
) -> Result<DeviceGrads<T>, Error> {
    let dims = validate_device(gpu, cfg, x.q, x.k, x.v, cu_seqlens_q, cu_seqlens_k)?;
    validate_backward_device(gpu, cfg, dims, &x)?;
    let h = cfg.heads;
    let kmask = KernelMask { causal: cfg.causal, window: cfg.window, row_lo: false };
    let tile_n = flash::backward_key_tile(h.head_dim_k, h.head_dim_v)?;
    let atomic = mode == DqMode::Atomic;
    let keys =
        flash::key_schedule(cfg, kmask, h.num_q_heads, h.num_kv_heads, tile_n, cu_seqlens_q, cu_seqlens_k, atomic)?;
    let dq_tile = flash::dq_tile_m(h.head_dim_k);
    let fwd = if atomic { Schedule::empty() } else { dense_schedule(cfg, cu_seqlens_q, cu_seqlens_k, dq_tile)? };
    backward_scheduled(gpu, cfg, dims, &fwd, &keys, x, mode)
}

/// Whether the mask `m` and the kernel's own row ranges agree on every row (a debug check of
/// the pairing the schedule relies on).
#[cfg(test)]
pub(crate) fn mask_matches_kernel<M: super::cpu::Mask>(m: &M, km: KernelMask, cu_q: &[u32], cu_k: &[u32]) -> bool {
    (0..cu_q.len() - 1).all(|s| {
        let tq = (cu_q[s + 1] - cu_q[s]) as usize;
        let tk = (cu_k[s + 1] - cu_k[s]) as usize;
        (0..tq).all(|i| {
            let (lo, hi) = m.range(s, i, tq, tk);
            let p = i as i64 + tk as i64 - tq as i64;
            let khi = if km.causal { (p + 1).clamp(0, tk as i64) } else { tk as i64 };
            let mut klo = km.window.map_or(0, |w| (p - w as i64 + 1).clamp(0, tk as i64));
            if km.row_lo {
                klo = klo.max(lo as i64);
            }
            let kernel_empty = klo >= khi;
            (lo >= hi && kernel_empty) || (lo as i64 == klo && hi as i64 == khi)
        })
    })
}
