//! Packed variable-length sequences: `cu_seqlens[s]..cu_seqlens[s + 1]` are sequence s's tokens.

use crate::Error;

/// Checks `0 = cu[0] <= ... <= cu[n] = total` and returns the number of sequences.
pub(crate) fn validate(cu_seqlens: &[u32], total: usize) -> Result<usize, Error> {
    let Some((&first, _)) = cu_seqlens.split_first() else {
        return Err(Error::CuSeqlens("empty (it needs num_seqs + 1 offsets)".into()));
    };
    if first != 0 {
        return Err(Error::CuSeqlens(format!("cu_seqlens[0] = {first}, must be 0")));
    }
    if let Some(i) = cu_seqlens.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::CuSeqlens(format!("decreasing at {}: {} > {}", i + 1, cu_seqlens[i], cu_seqlens[i + 1])));
    }
    let last = *cu_seqlens.last().unwrap_or(&0) as usize;
    if last != total {
        return Err(Error::CuSeqlens(format!("last offset {last} != number of tokens {total}")));
    }
    Ok(cu_seqlens.len() - 1)
}

/// The sequence that holds token `t` (the last sequence whose start is <= t, skipping empty ones).
pub(crate) fn seq_of_token(cu_seqlens: &[u32], t: usize) -> usize {
    cu_seqlens.partition_point(|&c| c as usize <= t) - 1
}

/// Tokens per parallel work item in the fast paths: big enough to amortise scheduling, small
/// enough to balance two to sixteen cores on a million tokens.
pub(crate) const TOKEN_CHUNK: usize = 16 * 1024;
