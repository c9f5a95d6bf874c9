//! Checks shared by every op: packed offsets, head shapes, tensor lengths, finiteness.

use squid_cuda::Element;

use crate::Error;

/// The largest head dimension (key or value) the ops accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Checks a FlashAttention-style `cu_seqlens` offset array against the packed token count,
/// and returns the number of sequences it describes.
pub fn validate_cu_seqlens(cu_seqlens: &[u32], total_tokens: usize) -> Result<usize, Error> {
    let (first, last) = match (cu_seqlens.first(), cu_seqlens.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Err(Error::CuSeqlens("empty: it needs num_seqs + 1 entries".into())),
    };
    if first != 0 {
        return Err(Error::CuSeqlens(format!("starts at {first}, not 0")));
    }
    if let Some(i) = cu_seqlens.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::CuSeqlens(format!(
            "decreases at index {}: {} -> {}",
            i + 1,
            cu_seqlens[i],
            cu_seqlens[i + 1]
        )));
    }
    if last as usize != total_tokens {
        return Err(Error::CuSeqlens(format!("ends at {last} but the batch holds {total_tokens} tokens")));
    }
    Ok(cu_seqlens.len() - 1)
}

/// Head counts and head dimensions of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads `HQ`.
    pub num_q_heads: usize,
    /// Key/value heads `HKV`; `HQ % HKV == 0` and query head `h` reads kv head `h / (HQ / HKV)`.
    pub num_kv_heads: usize,
    /// Key (and query) head dimension `Dk`.
    pub head_dim_k: usize,
    /// Value (and output) head dimension `Dv`.
    pub head_dim_v: usize,
}

impl Heads {
    /// Heads with the given counts and dimensions (checked by [`Heads::validate`]).
    pub fn new(num_q_heads: usize, num_kv_heads: usize, head_dim_k: usize, head_dim_v: usize) -> Self {
        Self { num_q_heads, num_kv_heads, head_dim_k, head_dim_v }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.num_q_heads / self.num_kv_heads.max(1)
    }

    /// `1 / sqrt(Dk)`, the default softmax scale.
    pub fn default_scale(&self) -> f32 {
        1.0 / (self.head_dim_k as f32).sqrt()
    }

    /// Non-zero counts, `HQ % HKV == 0`, dimensions in `1..=256`.
    pub fn validate(&self) -> Result<(), Error> {
        if self.num_q_heads == 0 || self.num_kv_heads == 0 {
            return Err(Error::Heads(format!("zero heads: HQ = {}, HKV = {}", self.num_q_heads, self.num_kv_heads)));
        }
        if self.num_q_heads % self.num_kv_heads != 0 {
            return Err(Error::Heads(format!(
                "HQ = {} is not a multiple of HKV = {}",
                self.num_q_heads, self.num_kv_heads
            )));
        }
        for (name, d) in [("Dk", self.head_dim_k), ("Dv", self.head_dim_v)] {
            if d == 0 || d > MAX_HEAD_DIM {
                return Err(Error::Heads(format!("{name} = {d} is outside 1..={MAX_HEAD_DIM}")));
            }
        }
        Ok(())
    }
}

/// The number of rows of a `[rows, heads, dim]` tensor, or a shape error naming it.
pub(crate) fn rows_of(name: &'static str, len: usize, heads: usize, dim: usize) -> Result<usize, Error> {
    let row = heads
        .checked_mul(dim)
        .ok_or_else(|| Error::Shape(format!("{name}: heads x dim = {heads} x {dim} overflows usize")))?;
    if row == 0 || len % row != 0 {
        return Err(Error::Shape(format!(
            "{name} has {len} elements, not a multiple of heads x dim = {heads} x {dim}"
        )));
    }
    Ok(len / row)
}

/// The element count of a tensor of shape `dims`, or a shape error naming it if the product
/// overflows `usize` (sizes come from the caller: a wrapped product could pass a length check).
pub(crate) fn numel(name: &'static str, dims: &[usize]) -> Result<usize, Error> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("{name}: the shape {dims:?} has more elements than usize holds")))
}

/// A zero-filled buffer of `len` elements, or [`Error::OutOfMemory`] if the allocator refuses
/// it (sizes that come from the caller must not abort the process).
pub(crate) fn try_zeroed<T: bytemuck::Zeroable>(name: &'static str, len: usize) -> Result<Vec<T>, Error> {
    bytemuck::allocation::try_zeroed_vec(len)
        .map_err(|()| Error::OutOfMemory { what: name, bytes: len.saturating_mul(std::mem::size_of::<T>()) })
}

/// A buffer of `len` copies of `value`, or [`Error::OutOfMemory`] if the allocator refuses it.
pub(crate) fn try_filled<T: Copy>(name: &'static str, len: usize, value: T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::OutOfMemory { what: name, bytes: len.saturating_mul(std::mem::size_of::<T>()) })?;
    v.resize(len, value);
    Ok(v)
}

/// An exact length check.
pub(crate) fn expect_len(name: &'static str, len: usize, expected: usize, what: &str) -> Result<(), Error> {
    if len != expected {
        return Err(Error::Shape(format!("{name} has {len} elements, expected {expected} ({what})")));
    }
    Ok(())
}

/// Fails on the first NaN or infinity in `x`.
pub(crate) fn check_finite<T: Element>(name: &'static str, x: &[T]) -> Result<(), Error> {
    match x.iter().position(|v| !v.to_f32().is_finite()) {
        Some(index) => Err(Error::NonFinite { tensor: name, index }),
        None => Ok(()),
    }
}

/// Sequence lengths from offsets.
pub(crate) fn seq_lens(cu: &[u32]) -> impl Iterator<Item = usize> + '_ {
    cu.windows(2).map(|w| (w[1] - w[0]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_packed_offsets_and_counts_sequences() {
        assert_eq!(validate_cu_seqlens(&[0, 3, 3, 10], 10), Ok(3));
        assert_eq!(validate_cu_seqlens(&[0], 0), Ok(0));
    }

    #[test]
    fn rejects_each_kind_of_bad_offsets() {
        assert!(validate_cu_seqlens(&[], 0).is_err());
        assert!(validate_cu_seqlens(&[1, 4], 4).is_err());
        assert!(validate_cu_seqlens(&[0, 5, 4], 4).is_err());
        assert!(validate_cu_seqlens(&[0, 5], 6).is_err());
    }
}
