//! The CUDA forwards (feature `cuda`): squid's kernels launched on candle's own stream
//! (`Gpu::from_stream` over `candle_core::cuda_backend::cudarc`, the one cudarc both crates
//! build against).
//!
//! squid-attention's and squid-kvcache's device launchers take squid-owned `DeviceBuffer`s
//! today, so the inputs are staged: read from candle's buffers on candle's stream, uploaded to
//! squid buffers on the same stream, and the result copied into a new candle buffer. When the
//! launchers take `DeviceView`s (`From<&CudaSlice>`), the staging goes and the kernels read
//! candle's buffers in place. Ops without a squid kernel are refused with a clear error.
//! Never run on a GPU in this repository's CI (there is none): only compiled.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use squid_attention::dense::cuda::{self as dense_cuda, BackwardInputs, DqMode};
use squid_attention::segments::{cuda as segments_cuda, SegmentConfig};
use squid_cuda::launch::{DeviceBuffer, DeviceCopy, Gpu};
use squid_kvcache::rope::cuda::{self as rope_cuda, DeviceRope, RopeElement};

use crate::attention::{FlashAttn, Mask};
use crate::host::{self, err};
use crate::rope::{RopeOp, Rotation};

/// The error of an op that has no squid kernel yet.
pub(crate) fn not_on_cuda(op: &str) -> candle_core::Error {
    err(op, "not on CUDA yet (squid has no kernel for it): move the inputs to the CPU with .to_device(&Device::Cpu)")
}

/// squid's launcher on the stream candle queues its own work on.
fn gpu_on(device: &CudaDevice) -> Result<(Gpu, Arc<CudaStream>)> {
    let stream = device.cuda_stream();
    let gpu = Gpu::from_stream(&stream).map_err(|e| err("cuda", e))?;
    Ok((gpu, stream))
}

/// The elements a contiguous layout views, read on `stream` into a squid buffer on `gpu`.
fn stage<T: CudaDType + DeviceCopy>(
    op: &str,
    name: &str,
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    s: &CudaStorage,
    l: &Layout,
) -> Result<DeviceBuffer<T>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        err(op, format!("input `{name}` is not contiguous (strides {:?}): call .contiguous() first", l.stride()))
    })?;
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    let host = stream.clone_dtoh(&slice.slice(start..end)).map_err(|e| err(op, e))?;
    gpu.upload(&host).map_err(|e| err(op, e))
}

/// A squid buffer as a new candle storage on `device`.
fn unstage<T: CudaDType + DeviceCopy>(
    op: &str,
    gpu: &Gpu,
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    buf: &DeviceBuffer<T>,
) -> Result<CudaStorage> {
    let host = gpu.download(buf).map_err(|e| err(op, e))?;
    let slice = stream.clone_htod(&host).map_err(|e| err(op, e))?;
    Ok(CudaStorage::wrap_cuda_slice(slice, device.clone()))
}

fn half_dtype(op: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::BF16 | DType::F16 => Ok(()),
        other => Err(err(
            op,
            format!("{other:?} on CUDA: squid's tensor-core kernels take bf16 or f16 (convert with .to_dtype)"),
        )),
    }
}

/// Runs `$body` with `$T` the half type of `$dtype` (bf16 or f16).
macro_rules! with_half {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            _ => {
                type $T = f16;
                $body
            }
        }
    };
}

pub(crate) fn flash_attn_fwd(
    op: &FlashAttn,
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    vs: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const NAME: &str = "flash-attn";
    let heads = op.heads(ql, kl, vl)?;
    let dtype = host::float_dtype(NAME, &[("q", qs.dtype()), ("k", ks.dtype()), ("v", vs.dtype())])?;
    half_dtype(NAME, dtype)?;
    let (gpu, stream) = gpu_on(qs.device())?;
    let shape = Shape::from((ql.dims()[0], heads.num_q_heads, heads.head_dim_v));
    with_half!(dtype, T => {
        let q = stage::<T>(NAME, "q", &gpu, &stream, qs, ql)?;
        let k = stage::<T>(NAME, "k", &gpu, &stream, ks, kl)?;
        let v = stage::<T>(NAME, "v", &gpu, &stream, vs, vl)?;
        let out = match &op.mask {
            Mask::Dense { .. } => dense_cuda::forward(&gpu, &op.dense_config(heads), &q, &k, &v, &op.cu_q, &op.cu_k),
            Mask::Segments(layout) => {
                let cfg = SegmentConfig { heads, scale: op.scale, check_finite: false };
                segments_cuda::forward(&gpu, &cfg, layout, &q, &k, &v, &op.cu_q, &op.cu_k)
            }
        }
        .map_err(|e| err(NAME, e))?;
        let lse = gpu.download(&out.lse).map_err(|e| err(NAME, e))?;
        *op.lse.lock().expect("lse lock") = Some(crate::attention::SavedLse::Host(lse));
        Ok((unstage(NAME, &gpu, qs.device(), &stream, &out.o)?, shape))
    })
}

/// The backward of a CUDA forward: squid's backward kernels on candle's stream.
pub(crate) fn flash_attn_bwd(
    op: &FlashAttn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const NAME: &str = "flash-attn";
    let heads = op.heads(q.layout(), k.layout(), v.layout())?;
    let candle_core::Device::Cuda(device) = q.device() else {
        return Err(err(NAME, "a CUDA backward for a tensor not on CUDA"));
    };
    half_dtype(NAME, q.dtype())?;
    let (gpu, _stream) = gpu_on(device)?;
    let saved = op.lse.lock().expect("lse lock").take();
    let Some(crate::attention::SavedLse::Host(lse)) = saved else {
        return Err(err(NAME, "backward without the forward's log-sum-exp (apply the op with backprop)"));
    };
    with_half!(q.dtype(), T => {
        let up = |t: &Tensor| -> Result<DeviceBuffer<T>> {
            gpu.upload(&host::host_vec::<T>(&t.to_dtype(q.dtype())?)?).map_err(|e| err(NAME, e))
        };
        let (qb, kb, vb, ob, dob) = (up(q)?, up(k)?, up(v)?, up(o)?, up(d_o)?);
        let lse_b = gpu.upload(&lse).map_err(|e| err(NAME, e))?;
        let x = BackwardInputs { q: &qb, k: &kb, v: &vb, o: &ob, lse: &lse_b, d_o: &dob };
        let g = match &op.mask {
            Mask::Dense { .. } => dense_cuda::backward(&gpu, &op.dense_config(heads), x, &op.cu_q, &op.cu_k, DqMode::Atomic),
            Mask::Segments(layout) => {
                let cfg = SegmentConfig { heads, scale: op.scale, check_finite: false };
                segments_cuda::backward(&gpu, &cfg, layout, x, &op.cu_q, &op.cu_k, DqMode::Atomic)
            }
        }
        .map_err(|e| err(NAME, e))?;
        *op.lse.lock().expect("lse lock") = Some(crate::attention::SavedLse::Host(lse));
        let down = |b: &DeviceBuffer<T>, like: &Tensor| -> Result<Tensor> {
            host::to_tensor(gpu.download(b).map_err(|e| err(NAME, e))?, like.shape(), like.device())
        };
        Ok((Some(down(&g.dq, q)?), Some(down(&g.dk, k)?), Some(down(&g.dv, v)?)))
    })
}

fn rope_typed<T: CudaDType + RopeElement>(
    op: &RopeOp,
    s: &CudaStorage,
    l: &Layout,
    heads: usize,
) -> Result<CudaStorage> {
    const NAME: &str = "rope";
    let (gpu, stream) = gpu_on(s.device())?;
    let mut x = stage::<T>(NAME, "x", &gpu, &stream, s, l)?;
    let rope = op.table.rope();
    match (&op.rotation, op.inverse) {
        (Rotation::PerToken(p), inverse) => {
            let positions = p.iter().max().map_or(0, |&m| m as usize + 1);
            let table = DeviceRope::new(&gpu, rope, positions).map_err(|e| err(NAME, e))?;
            if inverse {
                table.backward(&gpu, &mut x, heads, p)
            } else {
                table.forward(&gpu, &mut x, heads, p)
            }
        }
        (&Rotation::Shift { from, to }, false) => rope_cuda::reposition(&gpu, rope, &mut x, heads, from, to),
        (&Rotation::Shift { from, to }, true) => rope_cuda::reposition(&gpu, rope, &mut x, heads, to, from),
    }
    .map_err(|e| err(NAME, e))?;
    unstage(NAME, &gpu, s.device(), &stream, &x)
}

pub(crate) fn rope_fwd(op: &RopeOp, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let heads = op.heads_and_dtype(l)?;
    let out = match s.dtype() {
        DType::F32 => rope_typed::<f32>(op, s, l, heads)?,
        DType::BF16 => rope_typed::<bf16>(op, s, l, heads)?,
        DType::F16 => rope_typed::<f16>(op, s, l, heads)?,
        other => return Err(err("rope", format!("dtype {other:?} is not supported (f32, bf16 or f16)"))),
    };
    Ok((out, l.shape().clone()))
}
