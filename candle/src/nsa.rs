//! Native Sparse Attention as a candle op. NSA has six differentiable inputs and candle's custom
//! ops take at most three, so the wrapper concatenates them (flattened) into one vector: candle's
//! own `cat` backward then hands each input its slice of the packed gradient.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use squid_attention::nsa::{self, NsaConfig, NsaInputs};
use squid_attention::Heads;

use crate::host::{self, err, with_float};

/// NSA's inputs: `q [total, HQ, Dk]`, `k [total, HKV, Dk]` and `v [total, HKV, Dv]` (shared by
/// the selected and window branches), compressed `k_cmp [total_cmp, HKV, Dk]` and
/// `v_cmp [total_cmp, HKV, Dv]` (e.g. mean-pooled blocks), and `gates [total, HQ, 3]` (cmp, slc,
/// win). All six receive gradients.
#[derive(Debug, Clone, Copy)]
pub struct NsaTensors<'a> {
    /// Queries.
    pub q: &'a Tensor,
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
    /// Compressed keys.
    pub k_cmp: &'a Tensor,
    /// Compressed values.
    pub v_cmp: &'a Tensor,
    /// Branch gates.
    pub gates: &'a Tensor,
}

struct NsaOp {
    cfg: NsaConfig,
    heads: Heads,
    cu_seqlens: Vec<u32>,
    /// Element counts of q, k, v, k_cmp, v_cmp, gates in the packed vector.
    lens: [usize; 6],
    saved: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl NsaOp {
    const NAME: &'static str = "nsa";

    fn split<'a, T>(&self, packed: &'a [T]) -> Result<[&'a [T]; 6]> {
        if packed.len() != self.lens.iter().sum::<usize>() {
            return Err(err(
                Self::NAME,
                format!("packed input of {} elements, expected {:?}", packed.len(), self.lens),
            ));
        }
        let mut rest = packed;
        Ok(self.lens.map(|n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        }))
    }

    fn inputs<'a, T>(&'a self, p: [&'a [T]; 6]) -> NsaInputs<'a, T> {
        NsaInputs {
            q: p[0],
            k: p[1],
            v: p[2],
            k_win: None,
            v_win: None,
            k_cmp: p[3],
            v_cmp: p[4],
            gates: p[5],
            cu_seqlens: &self.cu_seqlens,
        }
    }
}

impl CustomOp1 for NsaOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dtype = host::float_dtype(Self::NAME, &[("inputs", s.dtype())])?;
        let total = self.lens[0] / (self.heads.num_q_heads * self.heads.head_dim_k).max(1);
        with_float!(dtype, T => {
            let parts = self.split(host::contiguous::<T>(Self::NAME, "packed inputs", s, l)?)?;
            let out = nsa::forward(&self.cfg, &self.heads, &self.inputs(parts)).map_err(|e| err(Self::NAME, e))?;
            let o = out.o.clone();
            *self.saved.lock().expect("saved lock") = Some(Box::new(out));
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(o), Shape::from((total, self.heads.num_q_heads, self.heads.head_dim_v))))
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Err(crate::cuda::not_on_cuda(Self::NAME))
    }

    fn bwd(&self, packed: &Tensor, _o: &Tensor, d_o: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().expect("saved lock").take();
        with_float!(packed.dtype(), T => {
            let p = host::host_vec::<T>(packed)?;
            let parts = self.split(&p)?;
            let x = self.inputs(parts);
            let fwd: nsa::NsaOutput<T> = match saved.and_then(|b| b.downcast::<nsa::NsaOutput<T>>().ok()) {
                Some(f) => *f,
                None => nsa::forward(&self.cfg, &self.heads, &x).map_err(|e| err(Self::NAME, e))?,
            };
            let d_o = host::host_vec::<T>(&d_o.to_dtype(packed.dtype())?)?;
            let g = nsa::backward(&self.cfg, &self.heads, &x, &fwd, &d_o).map_err(|e| err(Self::NAME, e))?;
            *self.saved.lock().expect("saved lock") = Some(Box::new(fwd));
            let mut all = Vec::with_capacity(p.len());
            for part in [g.dq, g.dk, g.dv, g.dk_cmp, g.dv_cmp, g.dgates] {
                all.extend(part);
            }
            Ok(Some(host::to_tensor(all, packed.shape(), packed.device())?))
        })
    }
}

/// NSA forward over packed sequences (`cu_seqlens`, `B + 1` offsets) with the block sizes of
/// `cfg`; returns `o [total, HQ, Dv]` in q's dtype, differentiable in all six inputs (the chosen
/// blocks held fixed in the backward, as squid's `nsa::backward`).
pub fn nsa_varlen(x: &NsaTensors<'_>, cu_seqlens: &Tensor, cfg: &NsaConfig) -> Result<Tensor> {
    let (_, hq, dk) = x.q.dims3()?;
    let (_, hkv, _) = x.k.dims3()?;
    let dv = x.v.dim(2)?;
    let dtype = x.q.dtype();
    let parts = [x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gates];
    let lens = parts.map(|t| t.elem_count());
    let flat = parts.iter().map(|t| t.to_dtype(dtype)?.flatten_all()).collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let op = NsaOp {
        cfg: *cfg,
        heads: Heads::new(hq, hkv, dk, dv),
        cu_seqlens: host::offsets(NsaOp::NAME, "cu_seqlens", cu_seqlens)?,
        lens,
        saved: Mutex::new(None),
    };
    packed.apply_op1(op)
}
