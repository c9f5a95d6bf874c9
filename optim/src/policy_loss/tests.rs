use proptest::prelude::*;

use super::*;

fn inputs<'a>(
    new: &'a [f32],
    old: &'a [f32],
    reference: Option<&'a [f32]>,
    adv: &'a [f32],
    mask: &'a [bool],
    cu: &'a [u32],
) -> PolicyLossInputs<'a> {
    PolicyLossInputs {
        new_logp: new,
        old_logp: old,
        ref_logp: reference,
        advantages: adv,
        loss_mask: mask,
        cu_seqlens: cu,
        entropy: None,
    }
}

fn assert_close(got: f32, want: f64, tol: f64) {
    assert!((f64::from(got) - want).abs() <= tol * (1.0 + want.abs()), "{got} vs {want}");
}

#[test]
fn ppo_clip_by_hand() {
    // Four tokens, one sequence, token-mean, clip 0.2 / 0.28 (DAPO clip-higher):
    // t0: ratio e^0.1 = 1.105171, A = 1: inside [0.8, 1.28] -> l = -1.105171, grad = -1.105171 / 4
    // t1: ratio e^0.5 = 1.648721, A = 1: above 1.28 -> l = -1.28 (clipped high), grad 0
    // t2: ratio e^-0.5 = 0.606531, A = -2: below 0.8 -> max(1.213061, 1.6) = 1.6 (clipped low), grad 0
    // t3: ratio e^-0.5, A = 2: unclipped term -1.213061 > -1.6 -> l = -1.213061, grad -1.213061 / 4
    // loss = (-1.105171 - 1.28 + 1.6 - 1.213061) / 4 = -0.499558
    let new = [0.1, 0.5, -0.5, -0.5];
    let old = [0.0; 4];
    let adv = [1.0, 1.0, -2.0, 2.0];
    let mask = [true; 4];
    let cfg = PolicyLossConfig { clip_low: 0.2, clip_high: 0.28, ..Default::default() };
    let out = policy_loss(&inputs(&new, &old, None, &adv, &mask, &[0, 4]), &cfg).unwrap();
    let (e1, e5, em5) = (0.1f64.exp(), 0.5f64.exp(), (-0.5f64).exp());
    assert_close(out.loss, (-e1 - 1.28 + 1.6 - 2.0 * em5) / 4.0, 1e-6);
    assert_close(out.grad_new_logp[0], -e1 / 4.0, 1e-6);
    assert_eq!(out.grad_new_logp[1], 0.0);
    assert_eq!(out.grad_new_logp[2], 0.0);
    assert_close(out.grad_new_logp[3], -2.0 * em5 / 4.0, 1e-6);
    for (t, want) in [-e1, -1.28, 1.6, -2.0 * em5].into_iter().enumerate() {
        assert_close(out.token_loss[t], want, 1e-6);
    }
    assert_eq!(out.metrics.clip_frac_high, 0.25);
    assert_eq!(out.metrics.clip_frac_low, 0.25);
    assert_close(out.metrics.ratio_max, e5, 1e-6);
    assert_close(out.metrics.ratio_min, em5, 1e-6);
    assert_close(out.metrics.approx_kl, -(0.1 + 0.5 - 1.0) / 4.0, 1e-6);
    // Entropy metric: mean over loss tokens; with token 3 masked, (1 + 2 + 3) / 3 = 2.
    let entropy = [1.0, 2.0, 3.0, 100.0];
    let masked = [true, true, true, false];
    let x = PolicyLossInputs { entropy: Some(&entropy), ..inputs(&new, &old, None, &adv, &masked, &[0, 4]) };
    assert_close(policy_loss(&x, &cfg).unwrap().metrics.entropy.unwrap(), 2.0, 1e-6);
}

#[test]
fn dual_clip_by_hand() {
    // ratio e^2 = 7.389056, A = -1: PPO term max(7.389056, 1.2) = 7.389056; dual clip c = 3:
    // min(7.389056, 3) = 3, gradient 0. Without dual clip the gradient is -A ratio = 7.389056.
    let (new, old, adv, mask) = ([2.0], [0.0], [-1.0], [true]);
    let cfg = PolicyLossConfig { dual_clip: Some(3.0), ..Default::default() };
    let out = policy_loss(&inputs(&new, &old, None, &adv, &mask, &[0, 1]), &cfg).unwrap();
    assert_close(out.loss, 3.0, 1e-6);
    assert_eq!(out.grad_new_logp[0], 0.0);
    assert_eq!(out.metrics.dual_clip_frac, 1.0);
    let out = policy_loss(&inputs(&new, &old, None, &adv, &mask, &[0, 1]), &PolicyLossConfig::default()).unwrap();
    assert_close(out.loss, 2.0f64.exp(), 1e-6);
    assert_close(out.grad_new_logp[0], 2.0f64.exp(), 1e-6);
}

#[test]
fn kl_estimators_by_hand() {
    // new = old = -1 (ratio 1), A = 0, so the loss is beta * kl alone; ref = -1.5, delta = ref - new = -0.5.
    // k1 = new - ref = 0.5, grad 1; k2 = 0.25 / 2 = 0.125, grad new - ref = 0.5;
    // k3 = e^-0.5 + 0.5 - 1 = 0.106531, grad 1 - e^-0.5 = 0.393469; k3+ = k3 value, k2 grad.
    let (new, old, reference, adv, mask) = ([-1.0], [-1.0], [-1.5], [0.0], [true]);
    let k3 = (-0.5f64).exp() - 0.5;
    for (est, value, grad) in [
        (KlEstimator::K1, 0.5, 1.0),
        (KlEstimator::K2, 0.125, 0.5),
        (KlEstimator::K3, k3, 1.0 - (-0.5f64).exp()),
        (KlEstimator::K3Plus, k3, 0.5),
    ] {
        let cfg = PolicyLossConfig {
            kl: Some(KlPenalty { estimator: est, beta: 0.1, k3_clamp: Some(10.0) }),
            ..Default::default()
        };
        let out = policy_loss(&inputs(&new, &old, Some(&reference), &adv, &mask, &[0, 1]), &cfg).unwrap();
        assert_close(out.loss, 0.1 * value, 1e-6);
        assert_close(out.grad_new_logp[0], 0.1 * grad, 1e-6);
        assert_close(out.metrics.kl.unwrap(), value, 1e-6);
    }
    // k3 clamp: delta = 3 -> k3 = e^3 - 4 = 16.0855 > 10 -> value 10, gradient 0.
    let cfg = PolicyLossConfig {
        kl: Some(KlPenalty { estimator: KlEstimator::K3, beta: 1.0, k3_clamp: Some(10.0) }),
        ..Default::default()
    };
    let out = policy_loss(&inputs(&new, &old, Some(&[2.0]), &adv, &mask, &[0, 1]), &cfg).unwrap();
    assert_close(out.loss, 10.0, 1e-6);
    assert_eq!(out.grad_new_logp[0], 0.0);
}

#[test]
fn aggregation_by_hand() {
    // Per-token loss -A (ratio 1, nothing clipped). Sequence 0: tokens with A = 1, 2, 3 and a masked
    // tool token (A = 100); sequence 1: one token with A = 4; sequence 2: only masked tokens.
    // token-mean: -(1 + 2 + 3 + 4) / 4 = -2.5
    // seq-mean-token-sum: -((1 + 2 + 3) + 4) / 2 = -5          (2 sequences with loss tokens)
    // seq-mean-token-mean: -((6 / 3) + 4 / 1) / 2 = -3
    // seq-mean-token-sum-norm, budget 8: -(6 + 4) / (2 * 8) = -0.625
    let new = [0.0; 7];
    let adv = [1.0, 2.0, 100.0, 3.0, 4.0, 5.0, 6.0];
    let mask = [true, true, false, true, true, false, false];
    let cu = [0, 4, 5, 7];
    let x = inputs(&new, &new, None, &adv, &mask, &cu);
    for (agg, want, g0) in [
        (Aggregation::TokenMean, -2.5, -0.25),
        (Aggregation::SeqMeanTokenSum, -5.0, -0.5),
        (Aggregation::SeqMeanTokenMean, -3.0, -1.0 / 6.0),
        (Aggregation::SeqMeanTokenSumNorm { budget: 8.0 }, -0.625, -1.0 / 16.0),
    ] {
        let out = policy_loss(&x, &PolicyLossConfig { aggregation: agg, ..Default::default() }).unwrap();
        assert_close(out.loss, want, 1e-6);
        assert_close(out.grad_new_logp[0], g0, 1e-6);
        assert_eq!(out.grad_new_logp[2], 0.0);
        assert_eq!(out.metrics.loss_seqs, 2);
    }
    // Global denominators: two "ranks" (token 0..4 and 4..7) with global counts sum to the full loss.
    let cfg =
        PolicyLossConfig { denominators: Denominators { tokens: Some(4.0), seqs: Some(2.0) }, ..Default::default() };
    let a = policy_loss(&inputs(&new[..4], &new[..4], None, &adv[..4], &mask[..4], &[0, 4]), &cfg).unwrap();
    let b = policy_loss(&inputs(&new[4..], &new[4..], None, &adv[4..], &mask[4..], &[0, 1, 3]), &cfg).unwrap();
    assert_close(a.loss + b.loss, -2.5, 1e-6);
    assert_eq!(count_loss_tokens_and_seqs(&mask, &cu), Ok((4, 2)));
}

#[test]
fn verl_seq_mean_token_sum_norm_and_token_sum_by_hand() {
    // verl 0.9.1 `agg_loss` on a padded batch of 2 rows x 2 positions (horizon 2):
    //   row 0: tokens with A = 1, 2 (both in the loss); row 1: one token with A = 3, then padding.
    //   Ratio 1 everywhere, so l_t = -A: loss_mat = [[-1, -2], [-3, 0]], mask [[1, 1], [1, 0]].
    //   seq-mean-token-sum-norm: seq_losses = [-3, -3], seq_mask = [1, 1], global_batch_size = 2,
    //     loss = (-3 - 3) / 2 = -3, then / loss_scale_factor (2) = -1.5;
    //     dloss/dnew_t = -A_t / (2 * 2) = -A_t / 4.
    //   token-sum: masked_sum = -6 (dp_size 1); dloss/dnew_t = -A_t.
    // Packed for squid: two sequences [1, 2] and [3] (padding does not exist), budget 2.
    let new = [0.0f32; 3];
    let adv = [1.0, 2.0, 3.0];
    let mask = [true; 3];
    let cu = [0, 2, 3];
    let x = inputs(&new, &new, None, &adv, &mask, &cu);
    let norm = PolicyLossConfig { aggregation: Aggregation::SeqMeanTokenSumNorm { budget: 2.0 }, ..Default::default() };
    let out = policy_loss(&x, &norm).unwrap();
    assert_close(out.loss, -1.5, 1e-7);
    for (&g, &a) in out.grad_new_logp.iter().zip(&adv) {
        assert_close(g, -f64::from(a) / 4.0, 1e-7);
    }
    // What the docs used to prescribe (`seqs: Some(1.0)`) gives N_seq = 2 times verl 0.9.1's loss
    // (it is verl 0.8's formula, sum / horizon, without the mean over sequences).
    let old_advice = PolicyLossConfig { denominators: Denominators { tokens: None, seqs: Some(1.0) }, ..norm };
    assert_close(policy_loss(&x, &old_advice).unwrap().loss, -3.0, 1e-7);
    let sum = PolicyLossConfig { aggregation: Aggregation::TokenSum, ..Default::default() };
    let out = policy_loss(&x, &sum).unwrap();
    assert_close(out.loss, -6.0, 1e-7);
    assert_eq!(out.grad_new_logp, vec![-1.0, -2.0, -3.0]);
    assert_eq!(out.token_loss, vec![-1.0, -2.0, -3.0]);
    // token-sum ignores the denominators (verl's token-sum has none).
    let with_den = PolicyLossConfig { denominators: Denominators { tokens: Some(7.0), seqs: Some(5.0) }, ..sum };
    assert_close(policy_loss(&x, &with_den).unwrap().loss, -6.0, 1e-7);
}

#[test]
fn presets_are_what_they_name() {
    // verl 0.9.1 actor defaults: clip_ratio 0.2 (low = high), clip_ratio_c 3.0, token-mean, no KL.
    let verl = PolicyLossConfig::verl();
    assert_eq!((verl.clip_low, verl.clip_high, verl.dual_clip, verl.kl), (0.2, 0.2, Some(3.0), None));
    assert_eq!(verl.aggregation, Aggregation::TokenMean);
    // TRL 1.16.0 GRPOConfig defaults: epsilon 0.2 = epsilon_high, no dual clip, beta 0, dapo (token-mean).
    let trl = PolicyLossConfig::trl();
    assert_eq!((trl.clip_low, trl.clip_high, trl.dual_clip, trl.kl), (0.2, 0.2, None, None));
    assert_eq!(trl.aggregation, Aggregation::TokenMean);
    assert_eq!(PolicyLossConfig::default(), trl);
    // The difference on one token (ratio e^2, A = -1): verl's dual clip caps the loss at 3 with
    // gradient 0; TRL takes -A ratio = e^2 with gradient e^2.
    let (new, old, adv, mask) = ([2.0], [0.0], [-1.0], [true]);
    let x = inputs(&new, &old, None, &adv, &mask, &[0, 1]);
    let v = policy_loss(&x, &verl).unwrap();
    assert_close(v.loss, 3.0, 1e-6);
    assert_eq!((v.grad_new_logp[0], v.token_loss[0]), (0.0, 3.0));
    let t = policy_loss(&x, &trl).unwrap();
    assert_close(t.loss, 2.0f64.exp(), 1e-6);
    assert_close(t.grad_new_logp[0], 2.0f64.exp(), 1e-6);
    assert_eq!(KlPenalty::verl(0.001), KlPenalty { estimator: KlEstimator::K3, beta: 0.001, k3_clamp: Some(10.0) });
    assert_eq!(KlPenalty::trl(0.04), KlPenalty { estimator: KlEstimator::K3, beta: 0.04, k3_clamp: None });
    for cfg in [verl, trl] {
        cfg.validate().unwrap();
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (v, mask) = ([0.0f32; 3], [true; 3]);
    let good = inputs(&v, &v, None, &v, &mask, &[0, 3]);
    assert!(matches!(
        policy_loss(&inputs(&v, &v[..2], None, &v, &mask, &[0, 3]), &Default::default()),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        policy_loss(&inputs(&v, &v, None, &v, &mask, &[0, 2]), &Default::default()),
        Err(Error::CuSeqlens(_))
    ));
    let cfg = PolicyLossConfig {
        kl: Some(KlPenalty { estimator: KlEstimator::K3, beta: 0.1, k3_clamp: None }),
        ..Default::default()
    };
    assert!(matches!(policy_loss(&good, &cfg), Err(Error::Config { what: "kl", .. })));
    let cfg = PolicyLossConfig { dual_clip: Some(0.5), ..Default::default() };
    assert!(matches!(policy_loss(&good, &cfg), Err(Error::Config { what: "dual_clip", .. })));
    let nan = [0.0, f32::NAN, 0.0];
    assert!(matches!(
        policy_loss(&inputs(&v, &nan, None, &v, &mask, &[0, 3]), &Default::default()),
        Err(Error::NonFinite { what: "old_logp", index: 1, .. })
    ));
    // A negative KL coefficient (it rewarded moving away from the reference) and a NaN entropy (it
    // became the entropy metric) were accepted.
    let cfg = PolicyLossConfig { kl: Some(KlPenalty::verl(-0.1)), ..Default::default() };
    let with_ref = inputs(&v, &v, Some(&v), &v, &mask, &[0, 3]);
    assert!(matches!(policy_loss(&with_ref, &cfg), Err(Error::Config { what: "kl.beta", .. })));
    assert!(matches!(cfg.validate(), Err(Error::Config { what: "kl.beta", .. })));
    let cfg = PolicyLossConfig { kl: Some(KlPenalty::trl(f32::NAN)), ..Default::default() };
    assert!(matches!(policy_loss(&with_ref, &cfg), Err(Error::Config { what: "kl.beta", .. })));
    let entropy = [1.0, f32::NAN, 2.0];
    let x = PolicyLossInputs { entropy: Some(&entropy), ..good };
    assert!(matches!(policy_loss(&x, &Default::default()), Err(Error::NonFinite { what: "entropy", index: 1, .. })));
    // Token-loss buffer of the wrong length.
    let (mut g, mut tl) = ([0.0f32; 3], [0.0f32; 2]);
    assert!(matches!(
        policy_loss_with_token_loss_into(&good, &Default::default(), &mut g, &mut tl),
        Err(Error::Length { what: "token_loss", .. })
    ));
    // No loss tokens: 0, not NaN.
    let out = policy_loss(&inputs(&v, &v, None, &v, &[false; 3], &[0, 3]), &Default::default()).unwrap();
    assert_eq!((out.loss, out.grad_new_logp), (0.0, vec![0.0; 3]));
}

/// A packed batch: sequence lengths, per-token values, a mask with zeros.
#[derive(Debug, Clone)]
struct Batch {
    cu: Vec<u32>,
    new: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<bool>,
}

fn batch(max_seqs: usize, max_len: usize) -> impl Strategy<Value = Batch> {
    prop::collection::vec(1..=max_len, 1..=max_seqs).prop_flat_map(|lens| {
        let t: usize = lens.iter().sum();
        let mut cu = vec![0u32];
        for l in &lens {
            cu.push(cu.last().unwrap() + *l as u32);
        }
        let v = |lo: f32, hi: f32| prop::collection::vec(lo..hi, t);
        (
            Just(cu),
            v(-3.0, 0.0),
            v(-0.6, 0.6),
            v(-1.0, 1.0),
            v(-2.0, 2.0),
            prop::collection::vec(prop::bool::weighted(0.8), t),
        )
            .prop_map(|(cu, new, shift, rshift, adv, mask)| {
                let old = new.iter().zip(&shift).map(|(n, s)| n + s).collect();
                let reference = new.iter().zip(&rshift).map(|(n, s)| n + s).collect();
                Batch { cu, new, old, reference, adv, mask }
            })
    })
}

fn configs() -> impl Strategy<Value = PolicyLossConfig> {
    let agg = prop_oneof![
        Just(Aggregation::TokenMean),
        Just(Aggregation::TokenSum),
        Just(Aggregation::SeqMeanTokenSum),
        Just(Aggregation::SeqMeanTokenMean),
        Just(Aggregation::SeqMeanTokenSumNorm { budget: 16.0 }),
    ];
    let kl = prop::option::of(
        (
            prop_oneof![Just(KlEstimator::K1), Just(KlEstimator::K2), Just(KlEstimator::K3), Just(KlEstimator::K3Plus)],
            0.0f32..0.5,
        )
            .prop_map(|(estimator, beta)| KlPenalty { estimator, beta, k3_clamp: Some(10.0) }),
    );
    (agg, kl, prop::option::of(Just(3.0f32)), prop::bool::ANY).prop_map(|(aggregation, kl, dual_clip, higher)| {
        PolicyLossConfig {
            clip_low: 0.2,
            clip_high: if higher { 0.28 } else { 0.2 },
            dual_clip,
            kl,
            aggregation,
            denominators: Denominators::default(),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Fast vs f64 reference on batches up to 28k tokens (crossing the 16k-token chunks): loss to
    /// 2e-6 of the sum of its terms' magnitudes (f32 lane sums), gradient to 4e-6 of its terms'
    /// size per element (f32 arithmetic, exp_fast 3e-7).
    #[test]
    fn fast_matches_naive(b in batch(40, 700), cfg in configs()) {
        let x = PolicyLossInputs {
            new_logp: &b.new, old_logp: &b.old, ref_logp: Some(&b.reference), advantages: &b.adv,
            loss_mask: &b.mask, cu_seqlens: &b.cu, entropy: None,
        };
        let out = policy_loss(&x, &cfg).unwrap();
        let (loss, grad) = naive::policy_loss(&x, &cfg);
        // The loss is a sum of signed terms that cancel: its f32 error scales with sum |w_t l_t|.
        let weights = naive::weights(&x, &cfg);
        let scale: f64 = (0..b.new.len())
            .map(|t| weights[t] * naive::token_loss(&cfg, f64::from(b.new[t]), f64::from(b.old[t]), f64::from(b.reference[t]), f64::from(b.adv[t])).abs())
            .sum();
        prop_assert!((f64::from(out.loss) - loss).abs() <= 2e-6 * scale + 1e-7, "loss {} vs {} (scale {})", out.loss, loss, scale);
        // Per-token losses: the reference's l_t on loss tokens (f32 arithmetic and exp_fast: 2e-6 of
        // the terms' size), exactly 0 on masked tokens; sum_t w_t l_t is the loss.
        for t in 0..b.new.len() {
            let want = if b.mask[t] {
                naive::token_loss(&cfg, f64::from(b.new[t]), f64::from(b.old[t]), f64::from(b.reference[t]), f64::from(b.adv[t]))
            } else { 0.0 };
            let tol = 2e-6 * (2.0 * f64::from(b.adv[t].abs()) + 2.0);
            prop_assert!((f64::from(out.token_loss[t]) - want).abs() <= tol, "token_loss[{}] {} vs {}", t, out.token_loss[t], want);
        }
        let weighted: f64 = (0..b.new.len()).map(|t| weights[t] * f64::from(out.token_loss[t])).sum();
        prop_assert!((weighted - f64::from(out.loss)).abs() <= 2e-6 * scale + 1e-7);
        for (t, (&g, &w)) in out.grad_new_logp.iter().zip(&grad).enumerate() {
            // Where the ratio sits within 1e-5 of a clip boundary, exp_fast and f64 exp may pick
            // different sides of the kink; those tokens are compared by the loss only.
            let ratio = (f64::from(b.new[t]) - f64::from(b.old[t])).exp();
            let bounds = [1.0 - f64::from(cfg.clip_low), 1.0 + f64::from(cfg.clip_high)];
            if bounds.iter().any(|k| (ratio - k).abs() < 1e-5) { continue; }
            // f32 arithmetic on terms of size w (|A| ratio + beta |kl'|) <= w (2 |A| + 2): 4e-6 of that.
            let tol = 4e-6 * weights[t] * (2.0 * f64::from(b.adv[t].abs()) + 2.0) + 1e-12;
            prop_assert!((f64::from(g) - w).abs() <= tol, "grad[{}] {} vs {} (tol {})", t, g, w, tol);
        }
    }

    /// The f64 reference's gradient against central differences of its own loss (h = 1e-6),
    /// away from clip boundaries where the loss has kinks.
    #[test]
    fn gradient_matches_finite_differences(b in batch(6, 12), cfg in configs()) {
        let x = PolicyLossInputs {
            new_logp: &b.new, old_logp: &b.old, ref_logp: Some(&b.reference), advantages: &b.adv,
            loss_mask: &b.mask, cu_seqlens: &b.cu, entropy: None,
        };
        let (_, grad) = naive::policy_loss(&x, &cfg);
        let base: Vec<f64> = b.new.iter().map(|&v| f64::from(v)).collect();
        let h = 1e-6;
        for t in 0..base.len() {
            let ratio = (base[t] - f64::from(b.old[t])).exp();
            let near_kink = [1.0 - f64::from(cfg.clip_low), 1.0 + f64::from(cfg.clip_high)]
                .iter().any(|k| (ratio - k).abs() < 1e-4)
                || cfg.dual_clip.is_some_and(|c| (ratio - f64::from(c)).abs() < 1e-4 * f64::from(c));
            if near_kink { continue; }
            let mut plus = base.clone();
            plus[t] += h;
            let mut minus = base.clone();
            minus[t] -= h;
            let fd = (naive::loss_at(&x, &cfg, &plus) - naive::loss_at(&x, &cfg, &minus)) / (2.0 * h);
            let want = if matches!(cfg.kl, Some(KlPenalty { estimator: KlEstimator::K3Plus, .. })) {
                // k3+ is a straight-through estimator: its gradient is k2's, not its value's slope.
                continue;
            } else { fd };
            prop_assert!((grad[t] - want).abs() <= 1e-6 + 1e-5 * want.abs(), "token {}: {} vs fd {}", t, grad[t], want);
        }
    }

    /// The AVX2 + FMA copy of the token loop (where the CPU has it) and the portable copy give
    /// bit-identical results.
    #[test]
    fn simd_copies_agree_bitwise(b in batch(20, 300), cfg in configs()) {
        let x = PolicyLossInputs {
            new_logp: &b.new, old_logp: &b.old, ref_logp: Some(&b.reference), advantages: &b.adv,
            loss_mask: &b.mask, cu_seqlens: &b.cu, entropy: Some(&b.adv),
        };
        let portable = crate::math::with_portable(|| policy_loss(&x, &cfg).unwrap());
        let dispatched = policy_loss(&x, &cfg).unwrap();
        prop_assert_eq!(portable, dispatched);
    }

    /// A masked token contributes nothing: changing its inputs changes neither loss nor gradient.
    #[test]
    fn masked_tokens_contribute_nothing(b in batch(10, 40), cfg in configs(), junk in -5.0f32..5.0) {
        let x = PolicyLossInputs {
            new_logp: &b.new, old_logp: &b.old, ref_logp: Some(&b.reference), advantages: &b.adv,
            loss_mask: &b.mask, cu_seqlens: &b.cu, entropy: None,
        };
        let a = policy_loss(&x, &cfg).unwrap();
        let mut changed = b.clone();
        for t in 0..b.mask.len() {
            if !b.mask[t] {
                changed.new[t] += junk;
                changed.adv[t] = junk * 10.0;
                changed.reference[t] -= junk;
            }
        }
        let y = PolicyLossInputs {
            new_logp: &changed.new, old_logp: &b.old, ref_logp: Some(&changed.reference), advantages: &changed.adv,
            loss_mask: &b.mask, cu_seqlens: &b.cu, entropy: None,
        };
        let c = policy_loss(&y, &cfg).unwrap();
        prop_assert_eq!(a.loss, c.loss);
        prop_assert_eq!(a.grad_new_logp, c.grad_new_logp);
    }

    /// With every sequence the same number of loss tokens L: seq-mean-token-mean == token-mean, and
    /// seq-mean-token-sum == L * token-mean == seq-mean-token-sum-norm with budget L.
    #[test]
    fn modes_agree_at_equal_lengths(seqs in 1usize..8, len in 1usize..30, seed in any::<u64>(), cfg in configs()) {
        let t = seqs * len;
        let cu: Vec<u32> = (0..=seqs).map(|s| (s * len) as u32).collect();
        let mut state = seed | 1;
        let mut rnd = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 1000) as f32 / 1000.0 };
        let new: Vec<f32> = (0..t).map(|_| -rnd() * 2.0).collect();
        let old: Vec<f32> = new.iter().map(|n| n + rnd() - 0.5).collect();
        let adv: Vec<f32> = (0..t).map(|_| rnd() * 2.0 - 1.0).collect();
        let mask = vec![true; t];
        let x = PolicyLossInputs { new_logp: &new, old_logp: &old, ref_logp: Some(&old), advantages: &adv, loss_mask: &mask, cu_seqlens: &cu, entropy: None };
        let run = |aggregation| policy_loss(&x, &PolicyLossConfig { aggregation, ..cfg }).unwrap();
        let tm = run(Aggregation::TokenMean);
        let smtm = run(Aggregation::SeqMeanTokenMean);
        let smts = run(Aggregation::SeqMeanTokenSum);
        let norm = run(Aggregation::SeqMeanTokenSumNorm { budget: len as f32 });
        let l = len as f32;
        let tol = |a: f32| 1e-5 * (1.0 + a.abs());
        prop_assert!((tm.loss - smtm.loss).abs() <= tol(tm.loss));
        prop_assert!((smts.loss - l * tm.loss).abs() <= tol(smts.loss));
        prop_assert!((smts.loss - l * norm.loss).abs() <= tol(smts.loss));
        for i in 0..t {
            prop_assert!((tm.grad_new_logp[i] - smtm.grad_new_logp[i]).abs() <= 1e-6 * (1.0 + tm.grad_new_logp[i].abs()));
        }
    }
}
