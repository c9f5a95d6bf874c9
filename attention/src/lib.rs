#![doc = include_str!("../README.md")]

use thiserror::Error;

/// What can be wrong with an attention call's inputs.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// `cu_seqlens` must start at 0, never decrease, and end at the number of packed tokens.
    #[error("invalid cu_seqlens: {0}")]
    CuSeqlens(String),
}

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
