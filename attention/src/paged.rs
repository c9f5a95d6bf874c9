//! The paged KV view attention reads in place. The KV cache (squid-kvcache's `PagedKv`) hands
//! out these views; attention defines the type so that neither crate imports the other's
//! internals and decode walks the pages without gathering them into one buffer.

use crate::Error;

/// One layer of one sequence, read in place: what an attention op needs to walk the pages.
///
/// Token `t` lives in page `page_table[t / page_size]`, row `t % page_size`; a page's K occupies
/// `k_pages[p * page_len .. (p + 1) * page_len]` (`[page_size, kv_heads, head_dim]`), V likewise.
#[derive(Debug, Clone, Copy)]
pub struct PagedKvView<'a, T> {
    /// Tokens per page.
    pub page_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// Tokens of the sequence.
    pub len: usize,
    /// The sequence's pages in token order.
    pub page_table: &'a [u32],
    /// The layer's whole K pool, `[num_pages, page_size, kv_heads, head_dim]`.
    pub k_pages: &'a [T],
    /// The layer's whole V pool, same layout.
    pub v_pages: &'a [T],
}

impl<'a, T> PagedKvView<'a, T> {
    /// Checks that the page table covers `len` tokens and every page lies inside both pools, so
    /// reading through the view cannot go out of bounds.
    pub fn validate(&self) -> Result<(), Error> {
        if self.page_size == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(Error::Cache(format!(
                "paged view: page_size {}, kv_heads {}, head_dim {} must all be positive",
                self.page_size, self.kv_heads, self.head_dim
            )));
        }
        // Sizes are the caller's: a product that wrapped could pass the checks below.
        let page_len = [self.page_size, self.kv_heads, self.head_dim]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::Cache(format!(
                    "paged view: a page of {} tokens x {} kv heads x {} dims has more elements than usize holds",
                    self.page_size, self.kv_heads, self.head_dim
                ))
            })?;
        let needed_pages = self.len.div_ceil(self.page_size);
        if self.page_table.len() < needed_pages {
            return Err(Error::Cache(format!(
                "paged view: {} pages of {} tokens cannot hold {} tokens",
                self.page_table.len(),
                self.page_size,
                self.len
            )));
        }
        let pages = (self.k_pages.len() / page_len).min(self.v_pages.len() / page_len);
        if let Some(p) = self.page_table.iter().find(|&&p| p as usize >= pages) {
            return Err(Error::Cache(format!("paged view: page {p} is outside the pools ({pages} pages)")));
        }
        Ok(())
    }

    fn row_len(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn offset(&self, pos: usize) -> usize {
        assert!(pos < self.len, "position {pos} of a {}-token view", self.len);
        let page = self.page_table[pos / self.page_size] as usize;
        (page * self.page_size + pos % self.page_size) * self.row_len()
    }

    /// Token `pos`'s keys, `[kv_heads, head_dim]`. Panics if `pos >= len`.
    pub fn key(&self, pos: usize) -> &'a [T] {
        let o = self.offset(pos);
        &self.k_pages[o..o + self.row_len()]
    }

    /// Token `pos`'s values, `[kv_heads, head_dim]`. Panics if `pos >= len`.
    pub fn value(&self, pos: usize) -> &'a [T] {
        let o = self.offset(pos);
        &self.v_pages[o..o + self.row_len()]
    }

    /// The sequence page by page: `(first position, K rows, V rows)`, each chunk
    /// `[tokens in this page, kv_heads, head_dim]` and contiguous.
    pub fn chunks(&self) -> impl Iterator<Item = (usize, &'a [T], &'a [T])> + '_ {
        let row = self.row_len();
        let page_len = self.page_size * row;
        self.page_table.iter().take(self.len.div_ceil(self.page_size.max(1))).enumerate().map(move |(i, &p)| {
            let start = i * self.page_size;
            let tokens = self.page_size.min(self.len - start);
            let o = p as usize * page_len;
            (start, &self.k_pages[o..o + tokens * row], &self.v_pages[o..o + tokens * row])
        })
    }
}
