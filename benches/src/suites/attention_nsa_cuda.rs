//! `attention --device cuda`, NSA cases (feature `cuda`): on a GPU only, never the simulator.
//!
//! - `nsa_decode`: one NSA decode step ([`NsaDeviceCache::decode`]: compressed branch and
//!   selection scores, top-n, selected and window branches, gated combine) for the newest token
//!   of each sequence against `T` cached tokens, against the dense split-KV decode of the same
//!   token over all `T` keys: the comparison the NSA paper's decode figure makes (4 / 6.4 / 9.1 /
//!   11.6x expected from memory access at 8k / 16k / 32k / 64k). The paper's config (l = 32,
//!   d = 16, l' = 64, n = 16, w = 512) and heads (HQ = 64, HKV = 4, Dk = 192, Dv = 128), bf16,
//!   batch 1 and 16. The cache is filled outside the timed calls (the append is not timed). Rate:
//!   GB/s of the K/V the NSA step reads (compressed, selected and window rows).

use std::rc::Rc;

use half::bf16;
use squid_attention::dense::cuda_decode::{self, DecodeOptions};
use squid_attention::dense::DenseConfig;
use squid_attention::nsa::cuda_decode::NsaDeviceCache;
use squid_attention::nsa::NsaConfig;
use squid_attention::Heads;
use squid_cuda::launch::{DeviceBuffer, Gpu};

use crate::harness::{Case, Work};

const HQ: usize = 64;
const HKV: usize = 4;
const DK: usize = 192;
const DV: usize = 128;

fn filled(len: usize, seed: u32) -> Vec<bf16> {
    (0..len)
        .map(|i| {
            let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8) as f32;
            bf16::from_f32(x / (1 << 24) as f32 * 2.0 - 1.0)
        })
        .collect()
}

/// Device inputs of one shape: the packed K/V the dense decode reads, and the NSA cache holding
/// the same tokens.
struct NsaDecodeInputs {
    q: DeviceBuffer<bf16>,
    gates: DeviceBuffer<bf16>,
    k: DeviceBuffer<bf16>,
    v: DeviceBuffer<bf16>,
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
    cache: NsaDeviceCache<bf16>,
}

fn heads() -> Heads {
    Heads::new(HQ, HKV, DK, DV)
}

fn inputs(gpu: &Gpu, batch: usize, t: usize) -> Result<NsaDecodeInputs, String> {
    let e = |x: squid_cuda::Error| x.to_string();
    let cu = |n: usize| (0..=batch as u32).map(|s| s * n as u32).collect::<Vec<u32>>();
    let k = gpu.upload(&filled(batch * t * HKV * DK, 2)).map_err(e)?;
    let v = gpu.upload(&filled(batch * t * HKV * DV, 3)).map_err(e)?;
    let mut cache =
        NsaDeviceCache::new(gpu, NsaConfig::default(), heads(), batch, t, false).map_err(|x| x.to_string())?;
    cache.append(gpu, &vec![t; batch], k.view(), v.view(), None).map_err(|x| x.to_string())?;
    Ok(NsaDecodeInputs {
        q: gpu.upload(&filled(batch * HQ * DK, 1)).map_err(e)?,
        gates: gpu.upload(&vec![bf16::from_f32(1.0 / 3.0); batch * HQ * 3]).map_err(e)?,
        k,
        v,
        cu_q: cu(1),
        cu_k: cu(t),
        cache,
    })
}

/// K/V bytes one NSA step reads per sequence and kv head: the compressed blocks, the selected
/// blocks and the window.
fn nsa_step_bytes(t: usize) -> usize {
    let cfg = NsaConfig::default();
    let keys = cfg.num_cmp_blocks(t) + (cfg.num_selected * cfg.block_slc).min(t) + cfg.window.min(t);
    keys * (DK + DV) * 2
}

/// The GPU NSA cases (see the module doc); inputs are prepared here, outside the timed calls.
pub fn cases(gpu: Rc<Gpu>, quick: bool) -> Result<Vec<Case>, String> {
    let lengths: &[usize] = if quick { &[8192, 16384] } else { &[8192, 16384, 32768, 65536] };
    let mut out = Vec::new();
    for &batch in &[1usize, 16] {
        for &t in lengths {
            let x = Rc::new(inputs(&gpu, batch, t)?);
            let (g1, g2, x1, x2) = (gpu.clone(), gpu.clone(), x.clone(), x);
            out.push(Case {
                suite: "attention",
                case: "nsa_decode".into(),
                params: format!(
                    "B={batch} T={t} HQ={HQ} HKV={HKV} Dk={DK} Dv={DV} l=32 d=16 l'=64 n=16 w=512 bf16 cuda"
                ),
                baseline: "dense split-KV decode of the same token over all T keys",
                ours: Box::new(move || {
                    let o = x1.cache.decode(&g1, x1.q.view(), x1.gates.view()).expect("NSA device decode");
                    g1.synchronize().expect("synchronize");
                    std::hint::black_box(o);
                }),
                base: Box::new(move || {
                    let cfg = DenseConfig::causal(heads());
                    let o = cuda_decode::decode(
                        &g2,
                        &cfg,
                        &DecodeOptions::default(),
                        &x2.q,
                        &x2.k,
                        &x2.v,
                        &x2.cu_q,
                        &x2.cu_k,
                    )
                    .expect("dense device decode");
                    g2.synchronize().expect("synchronize");
                    std::hint::black_box(o);
                }),
                work: Work::Bytes((batch * HKV * nsa_step_bytes(t)) as f64),
            });
        }
    }
    Ok(out)
}
