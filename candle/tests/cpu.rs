//! squid's candle ops on the CPU against candle's own composed ops (matmul + masked softmax,
//! `candle_nn::rotary_emb::rope_slow`, `log_softmax`): forwards and gradients over generated
//! shapes, awkward ones included (length 1, GQA, Tq < Tk, windows, many short sequences).

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};
use proptest::prelude::*;
use squid_candle::config::{PolicyLossConfig, RopeConfig, RopeLayout, Segment, SegmentKind};
use squid_candle::{AttentionOptions, PolicyLossMetrics, PolicyLossTensors, RopeTable};

const DEV: Device = Device::Cpu;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `|a - b| <= tol * (1 + max|b|)`, with the numbers in the message.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (d, m) = (max_abs_diff(a, b), max_abs(b));
    assert!(d <= tol * (1.0 + m), "{what}: max |diff| {d} > {tol} * (1 + {m})");
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random normals-ish in [-1.5, 1.5] (candle's randn has no seed on CPU).
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// Reference attention for one sequence from candle ops: `visible(i, j)` says whether query `i`
/// sees key `j`. Every query must see at least one key.
fn reference_seq(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    visible: &dyn Fn(usize, usize) -> bool,
) -> Result<Tensor> {
    let (tq, hq, _) = q.dims3()?;
    let (tk, hkv, _) = k.dims3()?;
    let group = hq / hkv;
    let kv_of: Vec<u32> = (0..hq as u32).map(|h| h / group as u32).collect();
    let idx = Tensor::new(kv_of.as_slice(), &DEV)?;
    let qh = q.transpose(0, 1)?.contiguous()?; // [hq, tq, dk]
    let kh = k.transpose(0, 1)?.contiguous()?.index_select(&idx, 0)?; // [hq, tk, dk]
    let vh = v.transpose(0, 1)?.contiguous()?.index_select(&idx, 0)?; // [hq, tk, dv]
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| (i, j)))
        .map(|(i, j)| if visible(i, j) { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let mask = Tensor::from_vec(mask, (tq, tk), &DEV)?;
    let scores = (qh.matmul(&kh.t()?)? * scale as f64)?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    p.matmul(&vh)?.transpose(0, 1)?.contiguous()
}

#[derive(Debug, Clone)]
struct Case {
    lens: Vec<(usize, usize)>,
    hq: usize,
    hkv: usize,
    dk: usize,
    dv: usize,
    causal: bool,
    window: Option<usize>,
    scale: Option<f32>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((1usize..9, 0usize..4), 1..4),
        prop_oneof![Just((1, 1)), Just((2, 1)), Just((4, 2)), Just((3, 3)), Just((6, 2))],
        1usize..9,
        1usize..9,
        any::<bool>(),
        prop_oneof![Just(None), (1usize..6).prop_map(Some)],
        prop_oneof![Just(None), Just(Some(0.3f32))],
    )
        .prop_map(|(lens, (hq, hkv), dk, dv, causal, window, scale)| Case {
            // Tq <= Tk, so every query sees a key under every mask.
            lens: lens.into_iter().map(|(tq, extra)| (tq, tq + extra)).collect(),
            hq,
            hkv,
            dk,
            dv,
            causal,
            window,
            scale,
        })
}

fn offsets(lens: impl Iterator<Item = usize>) -> Vec<u32> {
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    cu
}

/// Forward and gradients of `squid` against `reference` (both `(q, k, v) -> o`) under the loss
/// `sum(o * w)`.
fn check_attention(
    what: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    squid: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    reference: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    tol: f32,
) {
    let (qv, kv, vv) = (Var::from_tensor(q).unwrap(), Var::from_tensor(k).unwrap(), Var::from_tensor(v).unwrap());
    let o = squid(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let o_ref = reference(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    assert_close(&format!("{what}: o"), &o, &o_ref, tol);
    let w = randn(o.dims(), 7);
    let g = (o.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (o_ref * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("dq", &qv), ("dk", &kv), ("dv", &vv)] {
        let a = g.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: no {name}"));
        let b = g_ref.get(var.as_tensor()).unwrap();
        assert_close(&format!("{what}: {name}"), a, b, tol);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Varlen dense attention (causal or not, windows, GQA, Tq < Tk, custom scale) against
    /// candle's matmul + masked softmax, forward and dq/dk/dv.
    #[test]
    fn varlen_attention_matches_candle(c in case()) {
        let total_q: usize = c.lens.iter().map(|l| l.0).sum();
        let total_k: usize = c.lens.iter().map(|l| l.1).sum();
        let cu_q = offsets(c.lens.iter().map(|l| l.0));
        let cu_k = offsets(c.lens.iter().map(|l| l.1));
        let q = randn(&[total_q, c.hq, c.dk], 1);
        let k = randn(&[total_k, c.hkv, c.dk], 2);
        let v = randn(&[total_k, c.hkv, c.dv], 3);
        let opts = AttentionOptions { causal: c.causal, window: c.window, softmax_scale: c.scale };
        let scale = c.scale.unwrap_or(1.0 / (c.dk as f32).sqrt());
        let (cq, ck) = (Tensor::new(cu_q.as_slice(), &DEV).unwrap(), Tensor::new(cu_k.as_slice(), &DEV).unwrap());
        let squid = |q: &Tensor, k: &Tensor, v: &Tensor| squid_candle::flash_attn_varlen(q, k, v, &cq, &ck, &opts);
        let reference = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let mut outs = Vec::new();
            for (s, &(tq, tk)) in c.lens.iter().enumerate() {
                let (q0, k0) = (cu_q[s] as usize, cu_k[s] as usize);
                let visible = |i: usize, j: usize| {
                    let p = i + tk - tq;
                    (!c.causal || j <= p) && c.window.is_none_or(|w| j + w > p)
                };
                outs.push(reference_seq(&q.narrow(0, q0, tq)?, &k.narrow(0, k0, tk)?, &v.narrow(0, k0, tk)?, scale, &visible)?);
            }
            Tensor::cat(&outs, 0)
        };
        check_attention("varlen", &q, &k, &v, &squid, &reference, 2e-5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// Segment attention (documents see only themselves, globals everything before) against
    /// candle's masked softmax with the segment mask spelled out.
    #[test]
    fn segment_attention_matches_candle(
        contexts in proptest::collection::vec(proptest::collection::vec((any::<bool>(), 1usize..5), 1..4), 1..3),
        (hq, hkv) in prop_oneof![Just((2usize, 1usize)), Just((2, 2))],
        d in 1usize..6,
    ) {
        let segs: Vec<Vec<Segment>> = contexts
            .iter()
            .map(|c| c.iter().map(|&(g, len)| if g { Segment::global(len) } else { Segment::document(len) }).collect())
            .collect();
        let lens: Vec<usize> = segs.iter().map(|c| c.iter().map(|s| s.len).sum()).collect();
        let cu = offsets(lens.iter().copied());
        let total = *cu.last().unwrap() as usize;
        let (q, k, v) = (randn(&[total, hq, d], 4), randn(&[total, hkv, d], 5), randn(&[total, hkv, d], 6));
        let cu_t = Tensor::new(cu.as_slice(), &DEV).unwrap();
        let squid = |q: &Tensor, k: &Tensor, v: &Tensor| squid_candle::segment_attn_varlen(q, k, v, &cu_t, &cu_t, &segs, None);
        let reference = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let mut outs = Vec::new();
            for (s, ctx) in segs.iter().enumerate() {
                // Per position: (start of its segment, whether the segment is global).
                let mut seg_of = Vec::new();
                let mut start = 0;
                for seg in ctx {
                    seg_of.extend(std::iter::repeat_n((start, seg.kind == SegmentKind::Global), seg.len));
                    start += seg.len;
                }
                let visible = |i: usize, j: usize| j <= i && (seg_of[i].1 || j >= seg_of[i].0);
                let (t0, t) = (cu[s] as usize, lens[s]);
                outs.push(reference_seq(&q.narrow(0, t0, t)?, &k.narrow(0, t0, t)?, &v.narrow(0, t0, t)?, 1.0 / (d as f32).sqrt(), &visible)?);
            }
            Tensor::cat(&outs, 0)
        };
        check_attention("segments", &q, &k, &v, &squid, &reference, 2e-5);
    }
}

/// Batched `[B, T, H, D]` attention equals varlen attention over the same rows, also when the
/// inputs are strided views (a transpose), and bf16/f16 storage stays within their rounding of f32.
#[test]
fn batched_strided_and_half_precision() {
    let (b, t, hq, hkv, d) = (3, 5, 4, 2, 8);
    let q = randn(&[b, t, hq, d], 11);
    let k = randn(&[b, t, hkv, d], 12);
    let v = randn(&[b, t, hkv, d], 13);
    let opts = AttentionOptions::causal();
    let o = squid_candle::flash_attn(&q, &k, &v, &opts).unwrap();
    let cu = Tensor::new(&[0u32, 5, 10, 15], &DEV).unwrap();
    let flat = |x: &Tensor| x.reshape((b * t, x.dim(2).unwrap(), d)).unwrap();
    let o_var = squid_candle::flash_attn_varlen(&flat(&q), &flat(&k), &flat(&v), &cu, &cu, &opts).unwrap();
    assert_eq!(max_abs_diff(&o.reshape((b * t, hq, d)).unwrap(), &o_var), 0.0);
    // A strided q: [B, H, T, D] transposed to [B, T, H, D] is read as its values, not its storage.
    let q_strided = q.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
    assert!(!q_strided.is_contiguous());
    let o_strided = squid_candle::flash_attn(&q_strided, &k, &v, &opts).unwrap();
    assert_eq!(max_abs_diff(&o_strided, &o), 0.0);
    for dtype in [DType::BF16, DType::F16] {
        let cast = |x: &Tensor| x.to_dtype(dtype).unwrap();
        let o_half = squid_candle::flash_attn(&cast(&q), &cast(&k), &cast(&v), &opts).unwrap();
        assert_eq!(o_half.dtype(), dtype);
        let tol = if dtype == DType::BF16 { 2e-2 } else { 4e-3 };
        assert_close(&format!("{dtype:?} o"), &o_half, &o, tol);
        let (qv, kv, vv) = (
            Var::from_tensor(&cast(&q)).unwrap(),
            Var::from_tensor(&cast(&k)).unwrap(),
            Var::from_tensor(&cast(&v)).unwrap(),
        );
        let oh = squid_candle::flash_attn(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &opts).unwrap();
        let g = oh.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        let (qf, kf, vf) =
            (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
        let gf = squid_candle::flash_attn(qf.as_tensor(), kf.as_tensor(), vf.as_tensor(), &opts)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (a, b) in [(&qv, &qf), (&kv, &kf), (&vv, &vf)] {
            let ga = g.get(a.as_tensor()).unwrap();
            assert_eq!(ga.dtype(), dtype);
            assert_close(&format!("{dtype:?} grad"), ga, gf.get(b.as_tensor()).unwrap(), 4.0 * tol);
        }
    }
}

/// Bad inputs are candle errors naming what is wrong, never a panic.
#[test]
fn bad_inputs_are_errors() {
    let q = randn(&[4, 2, 4], 1);
    let k = randn(&[4, 1, 4], 2);
    let v = randn(&[4, 1, 4], 3);
    let opts = AttentionOptions::causal();
    let bad_cu = Tensor::new(&[0u32, 3, 5], &DEV).unwrap();
    let cu = Tensor::new(&[0u32, 4], &DEV).unwrap();
    let e = squid_candle::flash_attn_varlen(&q, &k, &v, &bad_cu, &bad_cu, &opts).unwrap_err().to_string();
    assert!(e.contains("cu_seqlens"), "{e}");
    let k3 = randn(&[4, 3, 4], 2);
    let e = squid_candle::flash_attn_varlen(&q, &k3, &v, &cu, &cu, &opts).unwrap_err().to_string();
    assert!(e.contains("do not agree"), "{e}");
    let e = squid_candle::flash_attn_varlen(&q.to_dtype(DType::F64).unwrap(), &k, &v, &cu, &cu, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F64"), "{e}");
    let e = squid_candle::flash_attn_varlen(&q, &k.to_dtype(DType::BF16).unwrap(), &v, &cu, &cu, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("one dtype"), "{e}");
    let logits = randn(&[3, 5], 1);
    let e =
        squid_candle::log_prob_entropy(&logits, &Tensor::new(&[0u32, 5, 1], &DEV).unwrap()).unwrap_err().to_string();
    assert!(e.contains("target"), "{e}");
}

fn cos_sin(table: &RopeTable, positions: &[u64]) -> (Tensor, Tensor) {
    let half = table.rope().config().rotary_dim / 2;
    let angles: Vec<f64> = positions
        .iter()
        .flat_map(|&p| (0..half).map(move |i| (p, i)))
        .map(|(p, i)| table.rope().angle(p as f64, i))
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
    (
        Tensor::from_vec(cos, (positions.len(), half), &DEV).unwrap(),
        Tensor::from_vec(sin, (positions.len(), half), &DEV).unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// RoPE (rotate-half and interleaved) against `candle_nn::rotary_emb::rope_slow` /
    /// `rope_i_slow` at arbitrary positions, forward and gradient; reposition equals rotating
    /// at the new positions.
    #[test]
    fn rope_matches_candle(tokens in 1usize..7, heads in 1usize..4, half in 1usize..6, interleaved: bool, start in 0u64..5000) {
        let d = 2 * half;
        let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf };
        let table = RopeTable::new(RopeConfig { layout, ..RopeConfig::new(d) }).unwrap();
        let positions: Vec<u64> = (0..tokens as u64).map(|t| start + 3 * t).collect();
        let x = Var::from_tensor(&randn(&[tokens, heads, d], 9)).unwrap();
        let y = squid_candle::rope(x.as_tensor(), &positions, &table).unwrap();
        let (cos, sin) = cos_sin(&table, &positions);
        // candle's layout is [B, H, T, D].
        let xt = x.as_tensor().transpose(0, 1).unwrap().unsqueeze(0).unwrap().contiguous().unwrap();
        let y_ref = if interleaved { candle_nn::rotary_emb::rope_i_slow(&xt, &cos, &sin) } else { candle_nn::rotary_emb::rope_slow(&xt, &cos, &sin) }
            .unwrap().squeeze(0).unwrap().transpose(0, 1).unwrap();
        assert_close("rope", &y, &y_ref, 1e-5);
        let w = randn(y.dims(), 3);
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close("rope grad", g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap(), 1e-5);
        let moved = squid_candle::reposition(&y, start, start + 77, &table).unwrap();
        let direct = squid_candle::rope(x.as_tensor(), &positions.iter().map(|p| p + 77).collect::<Vec<_>>(), &table).unwrap();
        assert_close("reposition", &moved, &direct, 1e-5);
    }

    /// Fused log-prob + entropy against `log_softmax` + gather and `-(p log p).sum()`, forward
    /// and the gradient of `sum(a logp + b H)`, in f32 and bf16.
    #[test]
    fn log_prob_entropy_matches_candle(tokens in 1usize..6, vocab in 1usize..40, bf16: bool, seed in 0u64..1000) {
        let logits = (randn(&[tokens, vocab], seed) * 2.0).unwrap();
        let targets: Vec<u32> = (0..tokens).map(|t| ((t as u64 * 7 + seed) % vocab as u64) as u32).collect();
        let tgt = Tensor::new(targets.as_slice(), &DEV).unwrap();
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let x = Var::from_tensor(&logits.to_dtype(dtype).unwrap()).unwrap();
        let (logp, ent) = squid_candle::log_prob_entropy(x.as_tensor(), &tgt).unwrap();
        let xf = x.as_tensor().to_dtype(DType::F32).unwrap();
        let ls = candle_nn::ops::log_softmax(&xf, D::Minus1).unwrap();
        let logp_ref = ls.gather(&tgt.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
        let ent_ref = (ls.exp().unwrap() * &ls).unwrap().sum(1).unwrap().neg().unwrap();
        let tol = if bf16 { 1e-5 } else { 2e-6 };
        assert_close("logp", &logp, &logp_ref, tol);
        assert_close("entropy", &ent, &ent_ref, tol);
        let (a, b) = (randn(&[tokens], seed + 1), randn(&[tokens], seed + 2));
        let g = ((&logp * &a).unwrap().sum_all().unwrap() + (&ent * &b).unwrap().sum_all().unwrap()).unwrap().backward().unwrap();
        let g_ref = ((&logp_ref * &a).unwrap().sum_all().unwrap() + (&ent_ref * &b).unwrap().sum_all().unwrap()).unwrap().backward().unwrap();
        let (dx, dx_ref) = (g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
        assert_eq!(dx.dtype(), dtype);
        assert_close("dlogits", dx, dx_ref, if bf16 { 1e-2 } else { 1e-5 });
    }

    /// The PPO clipped loss (token-mean, clip 0.2) against the same formula in candle ops, loss
    /// and gradient; masked tokens contribute nothing.
    #[test]
    fn policy_loss_matches_candle(lens in proptest::collection::vec(1usize..6, 1..4), seed in 0u64..1000) {
        let n: usize = lens.iter().sum();
        let cu = Tensor::new(offsets(lens.iter().copied()).as_slice(), &DEV).unwrap();
        let new = Var::from_tensor(&(randn(&[n], seed) * 0.3).unwrap()).unwrap();
        let old = (new.as_tensor().detach() + (randn(&[n], seed + 1) * 0.2).unwrap()).unwrap();
        let adv = randn(&[n], seed + 2);
        let mask_v: Vec<f32> = (0..n).map(|i| if (i as u64 + seed) % 3 == 0 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::new(mask_v.as_slice(), &DEV).unwrap();
        let metrics = PolicyLossMetrics::default();
        let inputs = PolicyLossTensors { old_logp: &old, ref_logp: None, advantages: &adv, loss_mask: &mask, cu_seqlens: &cu };
        let loss = squid_candle::policy_loss(new.as_tensor(), &inputs, &PolicyLossConfig::trl(), Some(&metrics)).unwrap();
        let ratio = (new.as_tensor() - &old).unwrap().exp().unwrap();
        let clipped = ratio.clamp(0.8f32, 1.2f32).unwrap();
        let neg_adv = adv.neg().unwrap();
        let pg = (&neg_adv * &ratio).unwrap().maximum(&(&neg_adv * &clipped).unwrap()).unwrap();
        let count = mask_v.iter().sum::<f32>().max(1.0);
        let loss_ref = ((pg * &mask).unwrap().sum_all().unwrap() / count as f64).unwrap();
        assert_close("loss", &loss, &loss_ref, 1e-5);
        let g = loss.backward().unwrap();
        let g_ref = loss_ref.backward().unwrap();
        assert_close("dnew", g.get(new.as_tensor()).unwrap(), g_ref.get(new.as_tensor()).unwrap(), 1e-5);
        prop_assert_eq!(metrics.get().unwrap().loss_tokens, mask_v.iter().filter(|&&m| m != 0.0).count());
    }
}

/// NSA through the packed op gives squid's own forward and each of the six gradients.
#[test]
fn nsa_matches_squid_directly() {
    use squid_attention::nsa::{self, NsaConfig, NsaInputs};
    use squid_attention::Heads;
    let cfg = NsaConfig {
        block_cmp: 4,
        stride_cmp: 2,
        block_slc: 4,
        num_selected: 3,
        window: 3,
        scale: None,
        check_finite: false,
        ..NsaConfig::default()
    };
    let cu: Vec<u32> = vec![0, 9, 10, 22];
    let (total, hq, hkv, dk, dv) = (22, 4, 2, 4, 3);
    let offs = nsa::cmp_offsets(&cfg, &cu).unwrap();
    let total_cmp = *offs.last().unwrap() as usize;
    let shapes: [&[usize]; 6] = [
        &[total, hq, dk],
        &[total, hkv, dk],
        &[total, hkv, dv],
        &[total_cmp, hkv, dk],
        &[total_cmp, hkv, dv],
        &[total, hq, 3],
    ];
    let vars: Vec<Var> =
        shapes.iter().enumerate().map(|(i, s)| Var::from_tensor(&randn(s, 20 + i as u64)).unwrap()).collect();
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let x = squid_candle::NsaTensors { q: t[0], k: t[1], v: t[2], k_cmp: t[3], v_cmp: t[4], gates: t[5] };
    let o = squid_candle::nsa_varlen(&x, &Tensor::new(cu.as_slice(), &DEV).unwrap(), &cfg).unwrap();
    let w = randn(o.dims(), 5);
    let grads = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let host: Vec<Vec<f32>> = t.iter().map(|x| x.flatten_all().unwrap().to_vec1().unwrap()).collect();
    let inputs = NsaInputs {
        q: &host[0],
        k: &host[1],
        v: &host[2],
        k_win: None,
        v_win: None,
        k_cmp: &host[3],
        v_cmp: &host[4],
        gates: &host[5],
        cu_seqlens: &cu,
    };
    let heads = Heads::new(hq, hkv, dk, dv);
    let fwd = nsa::forward(&cfg, &heads, &inputs).unwrap();
    assert_eq!(o.flatten_all().unwrap().to_vec1::<f32>().unwrap(), fwd.o);
    let d_o: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let g = nsa::backward(&cfg, &heads, &inputs, &fwd, &d_o).unwrap();
    for (i, want) in [g.dq, g.dk, g.dv, g.dk_cmp, g.dv_cmp, g.dgates].into_iter().enumerate() {
        let got: Vec<f32> = grads.get(t[i]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want, "gradient of input {i}");
        assert!(want.iter().any(|&x| x != 0.0), "input {i} got an all-zero gradient");
    }
}

/// Paged decode reads pages in place and equals varlen attention over the gathered keys.
#[test]
fn paged_decode_matches_varlen() {
    let (page_size, hq, hkv, d) = (4, 4, 2, 8);
    let lens = [6usize, 1, 9];
    let tables: Vec<Vec<u32>> = vec![vec![3, 0], vec![5], vec![1, 4, 2]];
    let k_pages = randn(&[6, page_size, hkv, d], 30);
    let v_pages = randn(&[6, page_size, hkv, d], 31);
    // Two new queries for the first sequence, one for the others.
    let new = [2usize, 1, 1];
    let cu_q = offsets(new.iter().copied());
    let q = randn(&[4, hq, d], 32);
    let opts = AttentionOptions::causal();
    let cache = squid_candle::PagedKv { page_tables: tables.clone(), lens: lens.to_vec() };
    let cq = Tensor::new(cu_q.as_slice(), &DEV).unwrap();
    let o = squid_candle::paged_decode(&q, &k_pages, &v_pages, &cq, &cache, &opts).unwrap();
    let gather = |pages: &Tensor| -> Tensor {
        let rows: Vec<Tensor> = tables
            .iter()
            .zip(lens)
            .flat_map(|(tab, len)| {
                (0..len)
                    .map(move |t| pages.i((tab[t / page_size] as usize, t % page_size)).unwrap().unsqueeze(0).unwrap())
            })
            .collect();
        Tensor::cat(&rows, 0).unwrap()
    };
    let ck = Tensor::new(offsets(lens.iter().copied()).as_slice(), &DEV).unwrap();
    let o_ref = squid_candle::flash_attn_varlen(&q, &gather(&k_pages), &gather(&v_pages), &cq, &ck, &opts).unwrap();
    assert_close("paged decode", &o, &o_ref, 1e-5);
}
