//! Reading candle's CPU storage as squid's slices and back, with the checks that keep a strided
//! or mistyped tensor from being misread.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor, WithDType};

/// A squid error (or any message) as a candle error naming the op.
pub(crate) fn err(op: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("squid-candle {op}: {e}"))
}

/// The elements a contiguous layout views. A strided view is refused (the public functions make
/// their inputs contiguous before applying an op, so only a direct `apply_op` caller sees this).
pub(crate) fn contiguous<'a, T: WithDType>(op: &str, name: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(err(
            op,
            format!(
                "input `{name}` is not contiguous (shape {:?}, strides {:?}): call .contiguous() first",
                l.dims(),
                l.stride()
            ),
        )),
    }
}

/// Checks that every input has the first one's storage type and that it is one squid computes in.
pub(crate) fn float_dtype(op: &str, inputs: &[(&str, DType)]) -> Result<DType> {
    let (_, first) = inputs[0];
    for &(name, dt) in inputs {
        if dt != first {
            return Err(err(
                op,
                format!("`{name}` is {dt:?} but `{}` is {first:?}: all inputs need one dtype", inputs[0].0),
            ));
        }
    }
    match first {
        DType::F32 | DType::BF16 | DType::F16 => Ok(first),
        other => Err(err(op, format!("dtype {other:?} is not supported (f32, bf16 or f16)"))),
    }
}

/// A tensor's elements in row-major order on the host (any layout, any device).
pub(crate) fn host_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// A host vector as a tensor of `shape` on `device`.
pub(crate) fn to_tensor<T: WithDType>(v: Vec<T>, shape: &Shape, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), device)
}

/// `dims` of a rank-`N` layout, or an error naming the input and the expected layout.
pub(crate) fn dims<const N: usize>(op: &str, name: &str, l: &Layout, expected: &str) -> Result<[usize; N]> {
    l.dims().try_into().map_err(|_| err(op, format!("`{name}` has shape {:?}, expected {expected}", l.dims())))
}

/// Runs `$body` with `$T` bound to the Rust type of a float dtype (f32, bf16, f16).
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => Err(candle_core::Error::msg(format!(
                "squid-candle: dtype {other:?} is not supported (f32, bf16 or f16)"
            ))),
        }
    };
}
pub(crate) use with_float;

/// Host `u32` offsets from a tensor of any integer dtype (`cu_seqlens` as candle-flash-attn takes them).
pub(crate) fn offsets(op: &str, name: &str, t: &Tensor) -> Result<Vec<u32>> {
    if t.rank() != 1 {
        return Err(err(op, format!("`{name}` must be 1-D (num_seqs + 1 offsets), got shape {:?}", t.dims())));
    }
    match t.dtype() {
        DType::U32 => t.to_vec1::<u32>(),
        DType::I64 | DType::I32 | DType::U8 => {
            let v = t.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            v.iter()
                .map(|&x| u32::try_from(x).map_err(|_| err(op, format!("`{name}` holds {x}, outside 0..2^32"))))
                .collect()
        }
        other => Err(err(op, format!("`{name}` must be an integer tensor, got {other:?}"))),
    }
}
