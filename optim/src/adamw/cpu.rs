//! The fused update: one pass per tensor, chunks in parallel, each element read and written once.

use rayon::prelude::*;
use squid_cuda::dtype::Element;

use super::TensorState;
use crate::Error;

/// Elements per parallel work item.
const CHUNK: usize = 32 * 1024;

/// Per-step constants (bias corrections folded in).
pub(super) struct StepConsts {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bc2: f32,
    /// Gradient clip factor.
    pub clip: f32,
}

/// Global L2 norm over gradients of any storage type, in f64; non-finite -> error naming the element.
pub(super) fn grad_norm<G: Element>(grads: &[&[G]]) -> Result<f64, Error> {
    let sum: f64 = grads
        .par_iter()
        .map(|g| {
            g.par_chunks(CHUNK)
                .map(|c| {
                    let mut lanes = [0.0f32; 8];
                    for (i, x) in c.iter().enumerate() {
                        let x = x.to_f32();
                        lanes[i % 8] += x * x;
                    }
                    lanes.iter().map(|&l| f64::from(l)).sum::<f64>()
                })
                .sum::<f64>()
        })
        .sum();
    if sum.is_finite() {
        return Ok(sum.sqrt());
    }
    // An f32 lane overflowed: a non-finite element, or finite ones whose squares need f64.
    crate::clip::exact_norm_or_culprit(grads)
}

#[inline(always)]
fn element(k: &StepConsts, p: f32, g: f32, m: &mut f32, v: &mut f32, v_max: Option<&mut f32>) -> f32 {
    let g = g * k.clip;
    let p = p * k.decay;
    *m = k.beta1 * *m + (1.0 - k.beta1) * g;
    *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
    let v_hat = match v_max {
        Some(vm) => {
            *vm = vm.max(*v);
            *vm
        }
        None => *v,
    };
    p - k.step_size * *m / (v_hat.sqrt() * k.inv_sqrt_bc2 + k.eps)
}

/// The first element (in order) that this step would make non-finite, as (index, what, value),
/// computed with exactly the arithmetic of [`update`] but writing nothing: [`update`] runs only when
/// this finds none, so a refused step changes nothing. Chunks are scanned in parallel and a chunk is
/// searched element by element only when a branch-free pass over it saw a NaN or infinity.
#[allow(clippy::eq_op)]
pub(super) fn first_non_finite<T: Element, G: Element>(
    k: &StepConsts,
    params: &[T],
    grads: &[G],
    st: &TensorState,
) -> Option<(usize, &'static str, f32)> {
    let n = params.len();
    let stored = T::DTYPE != squid_cuda::dtype::DType::F32;
    let at = |i: usize| -> [f32; 5] {
        let p = st.master.as_ref().map_or_else(|| params[i].to_f32(), |w| w[i]);
        let (mut m, mut v) = (st.m[i], st.v[i]);
        let mut vm = st.v_max.as_ref().map(|x| x[i]);
        let p = element(k, p, grads[i].to_f32(), &mut m, &mut v, vm.as_mut());
        // The parameter as stored (bf16/f16 overflow where f32 does not: f16 tops out at 65504).
        let p_stored = if stored { T::from_f32(p).to_f32() } else { p };
        [p, p_stored, m, v, vm.unwrap_or(0.0)]
    };
    const WHAT: [&str; 5] = ["parameter", "parameter in its storage type", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];
    (0..n.div_ceil(CHUNK)).into_par_iter().find_map_first(|c| {
        let range = c * CHUNK..((c + 1) * CHUNK).min(n);
        // x - x is 0 for finite x and NaN otherwise: one sum per chunk says whether to look closer.
        let poison: f32 = range.clone().map(|i| at(i).iter().map(|&x| x - x).sum::<f32>()).sum();
        if poison == 0.0 {
            return None;
        }
        range.into_iter().find_map(|i| {
            let vals = at(i);
            vals.iter().position(|x| !x.is_finite()).map(|j| (i, WHAT[j], vals[j]))
        })
    })
}

pub(super) fn update<T: Element, G: Element>(k: &StepConsts, params: &mut [T], grads: &[G], st: &mut TensorState) {
    let TensorState { master, m, v, v_max } = st;
    let chunks = params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK));
    match (master, v_max) {
        (None, None) => chunks.for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                p[i] = T::from_f32(element(k, p[i].to_f32(), g[i].to_f32(), &mut m[i], &mut v[i], None));
            }
        }),
        (Some(master), None) => chunks.zip(master.par_chunks_mut(CHUNK)).for_each(|((((p, g), m), v), w)| {
            for i in 0..p.len() {
                w[i] = element(k, w[i], g[i].to_f32(), &mut m[i], &mut v[i], None);
                p[i] = T::from_f32(w[i]);
            }
        }),
        (None, Some(vmax)) => chunks.zip(vmax.par_chunks_mut(CHUNK)).for_each(|((((p, g), m), v), vm)| {
            for i in 0..p.len() {
                p[i] = T::from_f32(element(k, p[i].to_f32(), g[i].to_f32(), &mut m[i], &mut v[i], Some(&mut vm[i])));
            }
        }),
        (Some(master), Some(vmax)) => chunks
            .zip(master.par_chunks_mut(CHUNK))
            .zip(vmax.par_chunks_mut(CHUNK))
            .for_each(|(((((p, g), m), v), w), vm)| {
                for i in 0..p.len() {
                    w[i] = element(k, w[i], g[i].to_f32(), &mut m[i], &mut v[i], Some(&mut vm[i]));
                    p[i] = T::from_f32(w[i]);
                }
            }),
    }
}
