//! Splitting full row-major matrices into one rank's shard, and gathering the shards back.
//!
//! Rank r of p owns the r-th of p equal blocks: rows `r*R/p .. (r+1)*R/p` for a row split
//! (column-parallel weights, the embedding table), columns `r*C/p .. (r+1)*C/p` for a column
//! split (row-parallel weights, activations split along their last dimension). A 1-D vector
//! (a bias) is a matrix of one column for a row split.

use super::{check_len, split_dim, Result, TpRank};
use crate::Communicator;

/// Rank `tp.rank()`'s block of rows of the `rows x cols` matrix `full`: `[rows / p, cols]`.
pub fn split_rows(full: &[f32], rows: usize, cols: usize, tp: TpRank) -> Result<Vec<f32>> {
    check_len("split_rows", "full", full.len(), rows.saturating_mul(cols))?;
    let local = split_dim("rows", rows, tp.world)?;
    Ok(full[tp.rank() * local * cols..(tp.rank() + 1) * local * cols].to_vec())
}

/// Rank `tp.rank()`'s block of columns of the `rows x cols` matrix `full`: `[rows, cols / p]`.
pub fn split_cols(full: &[f32], rows: usize, cols: usize, tp: TpRank) -> Result<Vec<f32>> {
    check_len("split_cols", "full", full.len(), rows.saturating_mul(cols))?;
    let local = split_dim("cols", cols, tp.world)?;
    let start = tp.rank() * local;
    Ok(full.chunks_exact(cols).flat_map(|row| &row[start..start + local]).copied().collect())
}

/// The full `[p * local_rows, cols]` matrix from every rank's `[local_rows, cols]` shard (an
/// all-gather: rank blocks of rows are contiguous).
pub fn gather_rows<C: Communicator>(comm: &C, shard: &[f32], local_rows: usize, cols: usize) -> Result<Vec<f32>> {
    check_len("gather_rows", "shard", shard.len(), local_rows.saturating_mul(cols))?;
    let mut full = vec![0.0f32; shard.len() * comm.world_size()];
    comm.all_gather(shard, &mut full)?;
    Ok(full)
}

/// The full `[rows, p * local_cols]` matrix from every rank's `[rows, local_cols]` shard (an
/// all-gather into rank-major blocks, then each row is put back together).
pub fn gather_cols<C: Communicator>(comm: &C, shard: &[f32], rows: usize, local_cols: usize) -> Result<Vec<f32>> {
    check_len("gather_cols", "shard", shard.len(), rows.saturating_mul(local_cols))?;
    let world = comm.world_size();
    let mut blocks = vec![0.0f32; shard.len() * world];
    comm.all_gather(shard, &mut blocks)?;
    let cols = local_cols * world;
    let mut full = vec![0.0f32; rows * cols];
    if full.is_empty() {
        return Ok(full);
    }
    for (r, block) in blocks.chunks_exact(rows * local_cols).enumerate() {
        for (i, row) in block.chunks_exact(local_cols).enumerate() {
            full[i * cols + r * local_cols..][..local_cols].copy_from_slice(row);
        }
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalGroup;

    #[test]
    fn split_then_gather_is_the_identity() {
        let (rows, cols) = (4, 8);
        let full: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        for world in [1, 2, 4] {
            let results = LocalGroup::new(world).unwrap().run(|comm| {
                let tp = TpRank::of(&comm);
                let by_rows = split_rows(&full, rows, cols, tp)?;
                let by_cols = split_cols(&full, rows, cols, tp)?;
                assert_eq!(by_rows[0], (tp.rank() * rows / world * cols) as f32);
                assert_eq!(by_cols[0], (tp.rank() * cols / world) as f32);
                let back_rows = gather_rows(&comm, &by_rows, rows / world, cols)?;
                let back_cols = gather_cols(&comm, &by_cols, rows, cols / world)?;
                Ok::<_, super::super::TpError>((back_rows, back_cols))
            });
            for result in results {
                let (back_rows, back_cols) = result.unwrap().unwrap();
                assert_eq!(back_rows, full);
                assert_eq!(back_cols, full);
            }
        }
    }

    #[test]
    fn uneven_splits_are_typed_errors() {
        let full = vec![0.0f32; 6 * 3];
        let tp = TpRank::new(1, 4).unwrap();
        assert!(matches!(split_rows(&full, 6, 3, tp), Err(super::super::TpError::NotDivisible { dim: 6, .. })));
        assert!(matches!(split_cols(&full, 6, 3, tp), Err(super::super::TpError::NotDivisible { dim: 3, .. })));
        assert!(matches!(split_rows(&full, 5, 3, tp), Err(super::super::TpError::Shape { .. })));
        assert!(TpRank::new(4, 4).is_err());
    }
}
