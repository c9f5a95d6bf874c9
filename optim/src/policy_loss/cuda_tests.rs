//! The device policy loss against the CPU path (per-token values, loss, every metric) and the f64
//! reference (loss, gradient), on the test device (the simulator without a GPU).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use squid_cuda::launch::Gpu;
use squid_cuda::testing::test_device;

use super::cuda::{self as dev, DevicePolicyLossInputs};
use super::*;

/// Host inputs of one case.
struct Case {
    new: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<bool>,
    cu: Vec<u32>,
    entropy: Vec<f32>,
}

impl Case {
    fn inputs(&self, with_ref: bool, with_entropy: bool) -> PolicyLossInputs<'_> {
        PolicyLossInputs {
            new_logp: &self.new,
            old_logp: &self.old,
            ref_logp: with_ref.then_some(&self.reference[..]),
            advantages: &self.adv,
            loss_mask: &self.mask,
            cu_seqlens: &self.cu,
            entropy: with_entropy.then_some(&self.entropy[..]),
        }
    }
}

/// Runs the device loss on `case`; returns (loss, metrics, grad, token_loss).
fn run_dev(
    gpu: &Gpu,
    case: &Case,
    with_ref: bool,
    with_entropy: bool,
    config: &PolicyLossConfig,
) -> Result<(f32, Metrics, Vec<f32>, Vec<f32>), Error> {
    let up = |x: &[f32]| gpu.upload(x).unwrap();
    let (new, old, reference, adv, entropy) =
        (up(&case.new), up(&case.old), up(&case.reference), up(&case.adv), up(&case.entropy));
    let mask = gpu.upload(&case.mask.iter().map(|&m| u8::from(m)).collect::<Vec<_>>()).unwrap();
    let n = case.new.len();
    let mut grad = gpu.upload(&vec![7.0f32; n]).unwrap();
    let mut tl = gpu.upload(&vec![7.0f32; n]).unwrap();
    let inputs = DevicePolicyLossInputs {
        new_logp: (&new).into(),
        old_logp: (&old).into(),
        ref_logp: with_ref.then(|| (&reference).into()),
        advantages: (&adv).into(),
        loss_mask: (&mask).into(),
        cu_seqlens: &case.cu,
        entropy: with_entropy.then(|| (&entropy).into()),
    };
    let (loss, metrics) = dev::policy_loss(gpu, inputs, config, &mut grad, &mut tl)?;
    Ok((loss, metrics, gpu.download(&grad).unwrap(), gpu.download(&tl).unwrap()))
}

fn close(what: &str, got: f32, want: f64, tol: f64) {
    assert!((f64::from(got) - want).abs() <= tol * (1.0 + want.abs()), "{what}: {got} vs {want}");
}

/// Device against the CPU fast path: per-token gradients and losses and every metric within 2e-6
/// relative (both compute each token in f32; the device's `expf` and the CPU's `exp_fast` differ
/// by at most ~3e-7 relative), ratio extremes the same to that tolerance, counts equal; the loss
/// within 1e-5 of the f64 reference's and the gradient within 1e-5 of it (plus 1e-6 of the
/// largest).
fn same_as_cpu(gpu: &Gpu, case: &Case, with_ref: bool, with_entropy: bool, config: &PolicyLossConfig) {
    let inputs = case.inputs(with_ref, with_entropy);
    let cpu = policy_loss(&inputs, config);
    let got = run_dev(gpu, case, with_ref, with_entropy, config);
    let (cpu, (loss, m, grad, tl)) = match (cpu, got) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(Error::NonFinite { what: w1, index: i1, .. }), Err(Error::NonFinite { what: w2, index: i2, .. })) => {
            assert_eq!((w1, i1), (w2, i2));
            return;
        }
        (Err(c), Err(d)) => {
            assert_eq!(c, d);
            return;
        }
        (c, d) => panic!("cpu {c:?} vs device {:?} ({config:?})", d.map(|d| (d.0, d.1))),
    };
    let c = &cpu.metrics;
    for (t, (g, w)) in grad.iter().zip(&cpu.grad_new_logp).enumerate() {
        close(&format!("grad {t}"), *g, f64::from(*w), 2e-6);
    }
    for (t, (g, w)) in tl.iter().zip(&cpu.token_loss).enumerate() {
        close(&format!("token_loss {t}"), *g, f64::from(*w), 2e-6);
    }
    // The loss sums the token losses, which can cancel: the CPU sums them in f32 (recursive
    // summation errs by up to n eps of the sum of magnitudes), the device in f64 partials.
    let sum_abs: f64 = tl.iter().map(|x| f64::from(x.abs())).sum();
    let n_eps = tl.len() as f64 * f64::from(f32::EPSILON);
    let loss_err = (f64::from(loss) - f64::from(cpu.loss)).abs();
    assert!(
        loss_err <= 2e-6 * (1.0 + f64::from(cpu.loss).abs()) + n_eps * sum_abs,
        "loss: {loss} vs {} (sum of |token loss| {sum_abs})",
        cpu.loss
    );
    for (what, a, b) in [
        ("clip_frac_low", m.clip_frac_low, c.clip_frac_low),
        ("clip_frac_high", m.clip_frac_high, c.clip_frac_high),
        ("dual_clip_frac", m.dual_clip_frac, c.dual_clip_frac),
        ("approx_kl", m.approx_kl, c.approx_kl),
        ("kl", m.kl.unwrap_or(0.0), c.kl.unwrap_or(0.0)),
        ("entropy", m.entropy.unwrap_or(0.0), c.entropy.unwrap_or(0.0)),
        ("ratio_min", m.ratio_min, c.ratio_min),
        ("ratio_mean", m.ratio_mean, c.ratio_mean),
        ("ratio_max", m.ratio_max, c.ratio_max),
    ] {
        close(what, a, f64::from(b), 2e-6);
    }
    assert_eq!((m.kl.is_some(), m.entropy.is_some()), (c.kl.is_some(), c.entropy.is_some()));
    assert_eq!((m.loss_tokens, m.loss_seqs), (c.loss_tokens, c.loss_seqs));
    let (ref_loss, ref_grad) = naive::policy_loss(&inputs, config);
    assert!(
        (f64::from(loss) - ref_loss).abs() <= 1e-5 * (1.0 + ref_loss.abs()) + 1e-6 * sum_abs,
        "loss vs f64 reference: {loss} vs {ref_loss}"
    );
    // A token's gradient is a sum of the surrogate's and the KL's terms, which can cancel: 1e-5
    // relative plus 1e-6 of the batch's largest gradient.
    let big = ref_grad.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    for (t, (g, w)) in grad.iter().zip(&ref_grad).enumerate() {
        assert!((f64::from(*g) - w).abs() <= 1e-5 * w.abs() + 1e-6 * big, "grad {t} vs f64 reference: {g} vs {w}");
    }
}

fn configs() -> Vec<PolicyLossConfig> {
    let kls = [
        None,
        Some(KlPenalty { estimator: KlEstimator::K1, beta: 0.1, k3_clamp: None }),
        Some(KlPenalty { estimator: KlEstimator::K2, beta: 0.1, k3_clamp: None }),
        Some(KlPenalty::verl(0.05)),
        Some(KlPenalty::trl(0.04)),
        Some(KlPenalty { estimator: KlEstimator::K3Plus, beta: 0.2, k3_clamp: Some(0.5) }),
    ];
    let aggs = [
        Aggregation::TokenMean,
        Aggregation::TokenSum,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm { budget: 64.0 },
    ];
    let mut out = Vec::new();
    for (i, kl) in kls.into_iter().enumerate() {
        for (j, aggregation) in aggs.into_iter().enumerate() {
            let base = if (i + j) % 2 == 0 { PolicyLossConfig::verl() } else { PolicyLossConfig::trl() };
            let denominators = if (i + j) % 3 == 0 {
                Denominators { tokens: Some(50.0), seqs: Some(9.0) }
            } else {
                Denominators::default()
            };
            out.push(PolicyLossConfig { kl, aggregation, denominators, clip_high: [0.2, 0.28][j % 2], ..base });
        }
    }
    out
}

fn case(lens: &[u32], seed: u64) -> Case {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut cu = vec![0u32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let n = *cu.last().unwrap() as usize;
    let new: Vec<f32> = (0..n).map(|_| -3.0 * next()).collect();
    // Old and reference log-probs near the new ones, some far enough to clip (ratios beyond 1.2
    // and below 0.8) and to reach the dual clip and the k3 clamp.
    let old: Vec<f32> = new.iter().map(|&x| x + (next() - 0.5) * if next() < 0.2 { 4.0 } else { 0.4 }).collect();
    let reference: Vec<f32> = new.iter().map(|&x| x + (next() - 0.5) * 2.0).collect();
    let adv: Vec<f32> = (0..n).map(|_| (next() - 0.5) * 4.0).collect();
    let mask: Vec<bool> = (0..n).map(|_| next() < 0.7).collect();
    let entropy: Vec<f32> = (0..n).map(|_| next() * 3.0).collect();
    Case { new, old, reference, adv, mask, cu, entropy }
}

#[test]
fn generated_batches_match_cpu() {
    let Some(gpu) = test_device() else { return };
    let configs = configs();
    // 1 to 8 sequences of 0 to 40 tokens (empty ones included), the odd one longer than a block (128).
    let strategy =
        (proptest::collection::vec(0u32..40, 1..8), any::<u64>(), 0..configs.len(), any::<bool>(), any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 24, max_shrink_iters: 32, ..Config::default() });
    runner
        .run(&strategy, |(mut lens, seed, c, long, with_entropy)| {
            if long {
                lens[0] = 300;
            }
            let config = &configs[c];
            same_as_cpu(&gpu, &case(&lens, seed), config.kl.is_some() || seed % 2 == 0, with_entropy, config);
            Ok(())
        })
        .unwrap();
}

#[test]
fn edges_and_errors() {
    let Some(gpu) = test_device() else { return };
    let cfg = PolicyLossConfig::verl();
    // Many one-token sequences; a batch whose every token is masked (loss and gradient 0).
    same_as_cpu(&gpu, &case(&[1; 37], 5), false, true, &cfg);
    let mut c = case(&[3, 2], 9);
    c.mask.fill(false);
    let (loss, m, grad, _) = run_dev(&gpu, &c, false, false, &cfg).unwrap();
    assert_eq!((loss, m.loss_tokens, m.ratio_min, m.ratio_max), (0.0, 0, 0.0, 0.0));
    assert!(grad.iter().all(|&g| g == 0.0));
    same_as_cpu(&gpu, &c, false, false, &cfg);
    // No sequences at all.
    let empty =
        Case { new: vec![], old: vec![], reference: vec![], adv: vec![], mask: vec![], cu: vec![0], entropy: vec![] };
    same_as_cpu(&gpu, &empty, true, true, &PolicyLossConfig { kl: Some(KlPenalty::verl(0.1)), ..cfg });
    // A NaN on a masked token is still an error naming it, in the CPU path's input order.
    let mut c = case(&[4, 5], 3);
    c.mask[6] = false;
    c.adv[6] = f32::NAN;
    c.old[7] = f32::INFINITY;
    same_as_cpu(&gpu, &c, false, false, &cfg);
    assert!(matches!(run_dev(&gpu, &c, false, false, &cfg), Err(Error::NonFinite { what: "old_logp", index: 7, .. })));
    c.old[7] = 0.0;
    assert!(matches!(
        run_dev(&gpu, &c, false, false, &cfg),
        Err(Error::NonFinite { what: "advantages", index: 6, .. })
    ));
    // An advantage near f32::MAX overflows the loss: the CPU path's typed error.
    let mut c = case(&[2], 4);
    c.mask.fill(true);
    c.adv[0] = 3e38;
    c.old[0] = c.new[0] - 1.0;
    same_as_cpu(&gpu, &c, false, false, &PolicyLossConfig { aggregation: Aggregation::TokenSum, ..cfg });
    // Bad inputs: a KL term without ref_logp, bad cu_seqlens, a bad config.
    let c = case(&[3, 2], 1);
    let kl = PolicyLossConfig { kl: Some(KlPenalty::verl(0.1)), ..cfg };
    assert!(matches!(run_dev(&gpu, &c, false, false, &kl), Err(Error::Config { what: "kl", .. })));
    let mut bad_cu = case(&[3, 2], 1);
    bad_cu.cu = vec![0, 4, 5];
    bad_cu.cu[1] = 6;
    assert!(matches!(run_dev(&gpu, &bad_cu, false, false, &cfg), Err(Error::CuSeqlens(_))));
    assert!(matches!(
        run_dev(&gpu, &c, false, false, &PolicyLossConfig { clip_low: 1.5, ..cfg }),
        Err(Error::Config { .. })
    ));
}
