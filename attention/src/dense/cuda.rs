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
use crate::layout::check_finite;
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

/// Runs the forward kernel over a schedule (shared by dense and segment attention).
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
    let mut o = gpu.zeros::<T>(dims.total_q * h.num_q_heads * h.head_dim_v).map_err(device_err)?;
    let mut lse = gpu.upload(&vec![f32::NEG_INFINITY; dims.total_q * h.num_q_heads]).map_err(device_err)?;
    if sched.items == 0 {
        return Ok(DeviceOutput { o, lse });
    }
    let name = format!("squid_flash_fwd_dk{}_dv{}_{}", h.head_dim_k, h.head_dim_v, dtype_suffix::<T>()?);
    let ints = gpu.upload(&sched.ints).map_err(device_err)?;
    let scale_log2 = cfg.softmax_scale() * std::f32::consts::LOG2_E;
    let grid = (sched.items as u32, h.num_q_heads as u32, 1);
    let launch = LaunchDims { grid, block: (128, 1, 1), shared_bytes: 0 };
    // SAFETY: the entry is (const T* q, const T* k, const T* v, T* o, float* lse, const int*
    // sched, float scale_log2) with T a 16-bit storage type; the schedule was built from the
    // validated cu_seqlens, so every row it addresses lies inside q, k, v, o and lse.
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
    let sched = dense_schedule(cfg, cu_seqlens_q, cu_seqlens_k, flash::TILE_M)?;
    forward_scheduled(gpu, cfg, dims, &sched, q, k, v)
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
