//! `attention --device cuda`: the device kernels on a GPU (feature `cuda`). Never run on the
//! simulator: a simulated launch says nothing about speed.
//!
//! - `decode_splitkv`: dense decode, one new token per sequence against `T` cached tokens
//!   (bf16, HQ = 32, HKV = 8, D = 128, causal), batch 1 and 16: our split-KV decode (splits
//!   chosen from the SM count, combine kernel included) against the same kernel with one split
//!   per (sequence, kv head). Rate: GB/s of K and V read (the step is bound by that read).
//!
//! Forward/backward cases (ours against a cuBLAS-based blocked attention) go in [`cases`] next to
//! the decode ones, built on the same `DeviceCase` helper.

use std::rc::Rc;

use half::bf16;
use squid_attention::dense::cuda_decode::{self, DecodeOptions};
use squid_attention::dense::DenseConfig;
use squid_attention::Heads;
use squid_cuda::launch::{DeviceBuffer, Gpu};

use crate::harness::{Case, Work};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn filled(len: usize, seed: u32) -> Vec<bf16> {
    (0..len)
        .map(|i| {
            let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8) as f32;
            bf16::from_f32(x / (1 << 24) as f32 * 2.0 - 1.0)
        })
        .collect()
}

/// Device inputs of one decode shape.
struct DecodeInputs {
    q: DeviceBuffer<bf16>,
    k: DeviceBuffer<bf16>,
    v: DeviceBuffer<bf16>,
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
}

fn decode_inputs(gpu: &Gpu, batch: usize, t: usize) -> Result<DecodeInputs, squid_cuda::Error> {
    let cu = |n: usize| (0..=batch as u32).map(|s| s * n as u32).collect::<Vec<u32>>();
    Ok(DecodeInputs {
        q: gpu.upload(&filled(batch * HQ * D, 1))?,
        k: gpu.upload(&filled(batch * t * HKV * D, 2))?,
        v: gpu.upload(&filled(batch * t * HKV * D, 3))?,
        cu_q: cu(1),
        cu_k: cu(t),
    })
}

/// One timed call: the decode, then a stream synchronisation (the harness times host calls).
fn decode_call(gpu: &Gpu, x: &DecodeInputs, opts: &DecodeOptions) {
    let cfg = DenseConfig::causal(Heads::new(HQ, HKV, D, D));
    let out = cuda_decode::decode(gpu, &cfg, opts, &x.q, &x.k, &x.v, &x.cu_q, &x.cu_k).expect("device decode");
    gpu.synchronize().expect("synchronize");
    std::hint::black_box(out);
}

/// The GPU cases (see the module doc); inputs are uploaded here, outside the timed calls.
pub fn cases(gpu: Rc<Gpu>, quick: bool) -> Result<Vec<Case>, squid_cuda::Error> {
    let lengths: &[usize] = if quick { &[4096, 16384] } else { &[4096, 16384, 65536] };
    let mut out = Vec::new();
    for &batch in &[1usize, 16] {
        for &t in lengths {
            let inputs = Rc::new(decode_inputs(&gpu, batch, t)?);
            let (g1, g2, x1, x2) = (gpu.clone(), gpu.clone(), inputs.clone(), inputs);
            out.push(Case {
                suite: "attention",
                case: "decode_splitkv".into(),
                params: format!("B={batch} T={t} HQ={HQ} HKV={HKV} D={D} bf16 cuda"),
                baseline: "the same decode kernel with one split per (sequence, kv head)",
                ours: Box::new(move || decode_call(&g1, &x1, &DecodeOptions::default())),
                base: Box::new(move || {
                    decode_call(&g2, &x2, &DecodeOptions { num_splits: Some(1), batch_invariant: false })
                }),
                work: Work::Bytes((2 * batch * t * HKV * D * 2) as f64),
            });
        }
    }
    Ok(out)
}
