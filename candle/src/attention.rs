//! Dense and segment attention as candle ops (varlen and batched), and paged decode.
//!
//! Layouts are FlashAttention's, as in candle-flash-attn: packed `q [total_q, HQ, Dk]`,
//! `k [total_k, HKV, Dk]`, `v [total_k, HKV, Dv]` with `cu_seqlens` of length `B + 1`, or
//! batched `[B, T, H, D]`. GQA needs no `repeat_kv`: `HQ` is any multiple of `HKV`.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use squid_attention::dense::{self, DenseConfig};
use squid_attention::paged::PagedKvView;
use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::Heads;

use crate::host::{self, err, with_float};

/// Mask and scale of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOptions {
    /// Causal mask, bottom-right aligned (FlashAttention 2.1+: the last query sees the last key).
    pub causal: bool,
    /// Left sliding window: the number of keys a query sees, itself included (flash-attn's
    /// `window_size_left + 1`).
    pub window: Option<usize>,
    /// Softmax scale; `None` is `1 / sqrt(Dk)`.
    pub softmax_scale: Option<f32>,
}

impl AttentionOptions {
    /// Causal attention with the default scale and no window.
    pub fn causal() -> Self {
        Self { causal: true, ..Self::default() }
    }
}

/// Which keys a query sees.
#[derive(Debug, Clone)]
pub(crate) enum Mask {
    /// Causal and/or windowed dense attention.
    Dense { causal: bool, window: Option<usize> },
    /// squid's document/global segments (causal within them).
    Segments(SegmentLayout),
}

/// The forward's log-sum-exp, kept for the backward (candle hands `bwd` only the output).
#[derive(Debug)]
pub(crate) enum SavedLse {
    Host(Vec<f32>),
}

/// `o = attention(q, k, v)` over packed sequences; `bwd` gives `dq, dk, dv`.
pub(crate) struct FlashAttn {
    pub(crate) mask: Mask,
    pub(crate) scale: Option<f32>,
    pub(crate) cu_q: Vec<u32>,
    pub(crate) cu_k: Vec<u32>,
    pub(crate) lse: Mutex<Option<SavedLse>>,
}

impl FlashAttn {
    const NAME: &'static str = "flash-attn";

    /// Heads from the three layouts, checked against each other.
    pub(crate) fn heads(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Heads> {
        let [_, hq, dk] = host::dims::<3>(Self::NAME, "q", q, "[total_q, HQ, Dk]")?;
        let [tk, hkv, dk2] = host::dims::<3>(Self::NAME, "k", k, "[total_k, HKV, Dk]")?;
        let [tk2, hkv2, dv] = host::dims::<3>(Self::NAME, "v", v, "[total_k, HKV, Dv]")?;
        if dk != dk2 || tk != tk2 || hkv != hkv2 {
            return Err(err(
                Self::NAME,
                format!("q {:?}, k {:?} and v {:?} do not agree on Dk, total_k or HKV", q.dims(), k.dims(), v.dims()),
            ));
        }
        Ok(Heads::new(hq, hkv, dk, dv))
    }

    pub(crate) fn dense_config(&self, heads: Heads) -> DenseConfig {
        let (causal, window) = match self.mask {
            Mask::Dense { causal, window } => (causal, window),
            Mask::Segments(_) => (true, None),
        };
        DenseConfig { heads, causal, window, scale: self.scale, check_finite: false }
    }

    fn forward_host<T: squid_cuda::Element>(
        &self,
        heads: Heads,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<dense::DenseOutput<T>> {
        match &self.mask {
            Mask::Dense { .. } => dense::forward(&self.dense_config(heads), q, k, v, &self.cu_q, &self.cu_k),
            Mask::Segments(layout) => {
                let cfg = SegmentConfig { heads, scale: self.scale, check_finite: false };
                segments::forward(&cfg, layout, q, k, v, &self.cu_q, &self.cu_k)
            }
        }
        .map_err(|e| err(Self::NAME, e))
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let heads = self.heads(ql, kl, vl)?;
        let dtype = host::float_dtype(Self::NAME, &[("q", qs.dtype()), ("k", ks.dtype()), ("v", vs.dtype())])?;
        let total_q = ql.dims()[0];
        with_float!(dtype, T => {
            let q = host::contiguous::<T>(Self::NAME, "q", qs, ql)?;
            let k = host::contiguous::<T>(Self::NAME, "k", ks, kl)?;
            let v = host::contiguous::<T>(Self::NAME, "v", vs, vl)?;
            let out = self.forward_host(heads, q, k, v)?;
            *self.lse.lock().expect("lse lock") = Some(SavedLse::Host(out.lse));
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out.o), Shape::from((total_q, heads.num_q_heads, heads.head_dim_v))))
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::flash_attn_fwd(self, qs, ql, ks, kl, vs, vl)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if q.device().is_cuda() {
            return crate::cuda::flash_attn_bwd(self, q, k, v, o, d_o);
        }
        let heads = self.heads(q.layout(), k.layout(), v.layout())?;
        let saved = self.lse.lock().expect("lse lock").take();
        with_float!(q.dtype(), T => {
            let (qh, kh, vh) = (host::host_vec::<T>(q)?, host::host_vec::<T>(k)?, host::host_vec::<T>(v)?);
            let oh = host::host_vec::<T>(o)?;
            let lse = match saved {
                Some(SavedLse::Host(lse)) => lse,
                // Not saved (applied without backprop): recompute it.
                None => self.forward_host(heads, &qh, &kh, &vh)?.lse,
            };
            let doh = host::host_vec::<T>(&d_o.to_dtype(q.dtype())?)?;
            let g = match &self.mask {
                Mask::Dense { .. } => dense::backward(&self.dense_config(heads), &qh, &kh, &vh, &oh, &lse, &doh, &self.cu_q, &self.cu_k),
                Mask::Segments(layout) => {
                    let cfg = SegmentConfig { heads, scale: self.scale, check_finite: false };
                    segments::backward(&cfg, layout, &qh, &kh, &vh, &oh, &lse, &doh, &self.cu_q, &self.cu_k)
                }
            }
            .map_err(|e| err(Self::NAME, e))?;
            // Keep the lse for a second backward through the same graph.
            *self.lse.lock().expect("lse lock") = Some(SavedLse::Host(lse));
            Ok((
                Some(host::to_tensor(g.dq, q.shape(), q.device())?),
                Some(host::to_tensor(g.dk, k.shape(), k.device())?),
                Some(host::to_tensor(g.dv, v.shape(), v.device())?),
            ))
        })
    }
}

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, op: FlashAttn) -> Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Attention over packed variable-length sequences, as candle-flash-attn's `flash_attn_varlen`:
/// `q [total_q, HQ, Dk]`, `k [total_k, HKV, Dk]`, `v [total_k, HKV, Dv]`, `cu_seqlens_q` and
/// `cu_seqlens_k` the `B + 1` cumulative offsets (u32, i32 or i64; read on the host). Returns
/// `o [total_q, HQ, Dv]` in q's dtype (f32, bf16 or f16); differentiable in q, k and v.
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let op = FlashAttn {
        mask: Mask::Dense { causal: options.causal, window: options.window },
        scale: options.softmax_scale,
        cu_q: host::offsets(FlashAttn::NAME, "cu_seqlens_q", cu_seqlens_q)?,
        cu_k: host::offsets(FlashAttn::NAME, "cu_seqlens_k", cu_seqlens_k)?,
        lse: Mutex::new(None),
    };
    apply(q, k, v, op)
}

/// Batched attention, as candle-flash-attn's `flash_attn`: `q [B, Tq, HQ, Dk]`,
/// `k [B, Tk, HKV, Dk]`, `v [B, Tk, HKV, Dv]`; returns `[B, Tq, HQ, Dv]`.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<Tensor> {
    let (b, tq, hq, dk) = q.dims4()?;
    let (bk, tk, hkv, _) = k.dims4()?;
    let dv = v.dim(3)?;
    if b != bk || v.dims4()?.0 != b {
        return Err(err(
            FlashAttn::NAME,
            format!("batch sizes differ: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()),
        ));
    }
    let offsets = |t: usize| -> Result<Vec<u32>> {
        (0..=b)
            .map(|i| u32::try_from(i * t).map_err(|_| err(FlashAttn::NAME, "more than 2^32 tokens in the batch")))
            .collect()
    };
    let op = FlashAttn {
        mask: Mask::Dense { causal: options.causal, window: options.window },
        scale: options.softmax_scale,
        cu_q: offsets(tq)?,
        cu_k: offsets(tk)?,
        lse: Mutex::new(None),
    };
    let o = apply(
        &q.reshape((b * tq, hq, dk))?,
        &k.reshape((b * tk, hkv, k.dim(3)?))?,
        &v.reshape((b * tk, hkv, dv))?,
        op,
    )?;
    o.reshape((b, tq, hq, dv))
}

/// squid segment attention over packed contexts: `segments[s]` lists context `s`'s document and
/// global segments (their lengths add up to its key count). A document token sees only earlier
/// tokens of its own document; a global token sees everything before it. Shapes as
/// [`flash_attn_varlen`]; differentiable in q, k and v.
pub fn segment_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
    segments: &[Vec<Segment>],
    softmax_scale: Option<f32>,
) -> Result<Tensor> {
    let cu_k = host::offsets(FlashAttn::NAME, "cu_seqlens_k", cu_seqlens_k)?;
    let layout = SegmentLayout::new(segments, &cu_k).map_err(|e| err(FlashAttn::NAME, e))?;
    let op = FlashAttn {
        mask: Mask::Segments(layout),
        scale: softmax_scale,
        cu_q: host::offsets(FlashAttn::NAME, "cu_seqlens_q", cu_seqlens_q)?,
        cu_k,
        lse: Mutex::new(None),
    };
    apply(q, k, v, op)
}

/// The page tables of a paged KV cache: sequence `s`'s token `t` lives in page
/// `page_tables[s][t / page_size]`, row `t % page_size`; `lens[s]` tokens are cached, the new
/// ones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedKv {
    /// Per sequence, its pages in token order.
    pub page_tables: Vec<Vec<u32>>,
    /// Per sequence, its cached token count.
    pub lens: Vec<usize>,
}

/// Decode against a paged KV cache: `q [total_q, HQ, D]` (each sequence's new queries, offsets
/// `cu_seqlens_q`), `k_pages`/`v_pages [num_pages, page_size, HKV, D]`, read in place. Masks as
/// [`flash_attn_varlen`] (the new queries are the last of each sequence's `lens[s]` positions).
/// Inference only: there is no backward.
pub fn paged_decode(
    q: &Tensor,
    k_pages: &Tensor,
    v_pages: &Tensor,
    cu_seqlens_q: &Tensor,
    cache: &PagedKv,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let op = PagedDecode {
        cfg: *options,
        cu_q: host::offsets(PagedDecode::NAME, "cu_seqlens_q", cu_seqlens_q)?,
        cache: cache.clone(),
    };
    q.contiguous()?.apply_op3_no_bwd(&k_pages.contiguous()?, &v_pages.contiguous()?, &op)
}

struct PagedDecode {
    cfg: AttentionOptions,
    cu_q: Vec<u32>,
    cache: PagedKv,
}

impl PagedDecode {
    const NAME: &'static str = "paged-decode";
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [total_q, hq, d] = host::dims::<3>(Self::NAME, "q", ql, "[total_q, HQ, D]")?;
        let [_, page_size, hkv, dk] = host::dims::<4>(Self::NAME, "k_pages", kl, "[num_pages, page_size, HKV, D]")?;
        if kl.dims() != vl.dims() || dk != d {
            return Err(err(
                Self::NAME,
                format!("k_pages {:?} and v_pages {:?} must match, with D = q's {d}", kl.dims(), vl.dims()),
            ));
        }
        if self.cache.page_tables.len() != self.cache.lens.len() {
            return Err(err(
                Self::NAME,
                format!("{} page tables for {} lengths", self.cache.page_tables.len(), self.cache.lens.len()),
            ));
        }
        let dtype =
            host::float_dtype(Self::NAME, &[("q", qs.dtype()), ("k_pages", ks.dtype()), ("v_pages", vs.dtype())])?;
        let heads = Heads::new(hq, hkv, d, d);
        let cfg = DenseConfig {
            heads,
            causal: self.cfg.causal,
            window: self.cfg.window,
            scale: self.cfg.softmax_scale,
            check_finite: false,
        };
        with_float!(dtype, T => {
            let q = host::contiguous::<T>(Self::NAME, "q", qs, ql)?;
            let k_pages = host::contiguous::<T>(Self::NAME, "k_pages", ks, kl)?;
            let v_pages = host::contiguous::<T>(Self::NAME, "v_pages", vs, vl)?;
            let views: Vec<PagedKvView<'_, T>> = self
                .cache
                .page_tables
                .iter()
                .zip(&self.cache.lens)
                .map(|(table, &len)| PagedKvView { page_size, kv_heads: hkv, head_dim: d, len, page_table: table, k_pages, v_pages })
                .collect();
            let out = dense::decode_paged(&cfg, q, &views, &self.cu_q).map_err(|e| err(Self::NAME, e))?;
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out.o), Shape::from((total_q, hq, d))))
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // squid's paged decode kernel reads page tables from device memory laid out by
        // squid-kvcache's PagedKv; wiring candle's page pools to it is not done yet.
        Err(crate::cuda::not_on_cuda(Self::NAME))
    }
}
