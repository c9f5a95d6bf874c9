//! Fuzz-style test of squid-optim's public API: every entry point is called on generated inputs
//! (lengths that disagree, sizes near the integer limits, NaN, infinities and values near
//! `f32::MAX`, configurations out of range) and must return a typed error or a correct result,
//! never panic. Each call runs under `catch_unwind` so a panic names the entry point and the input.
//! An allocation abort or a hang cannot be caught: it fails the test binary, which is also a
//! failure CI sees. Correct results are checked against the f64 references where the inputs are
//! moderate, and for finiteness and shape everywhere; a refused optimizer step must change nothing.

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};

use proptest::prelude::*;
use squid_optim::adamw::naive::NaiveAdamW;
use squid_optim::advantage::{
    broadcast_to_tokens, filter_zero_variance_groups, reinforce_pp, reinforce_pp_baseline, sample_advantages,
    sample_advantages_with_stats, AdvantageConfig, Estimator, Groups, GrpoConfig, NonFinitePolicy, SingletonPolicy,
    StdScope, WhitenConfig,
};
use squid_optim::logprob::{logprobs, logprobs_backward, logprobs_into, LogprobOutput};
use squid_optim::policy_loss::{
    count_loss_tokens_and_seqs, policy_loss, policy_loss_into, policy_loss_with_token_loss_into, Aggregation,
    Denominators, KlEstimator, KlPenalty, PolicyLossConfig, PolicyLossInputs,
};
use squid_optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig, LrSchedule};

/// Runs `f`, turning a panic into a test failure that names the call and its input.
fn call<R>(what: &str, input: &dyn Debug, f: impl FnOnce() -> R) -> Result<R, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("{what} panicked ({msg}) on input {input:?}"))
    })
}

/// Floats: mostly moderate, often hostile.
fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -5.0f32..5.0,
        1 => prop_oneof![
            Just(0.0f32), Just(-0.0), Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY),
            Just(f32::MAX), Just(-f32::MAX), Just(3e38), Just(-3e38), Just(1e30), Just(-1e30),
            Just(f32::MIN_POSITIVE), Just(1e-45), Just(1e-30),
        ],
    ]
}

/// Sizes: small, or near the integer limits.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..6,
        1 => prop_oneof![
            Just(usize::MAX), Just(usize::MAX / 2 + 1), Just(usize::MAX / 4 + 1), Just(1usize << 32),
            Just(u32::MAX as usize), Just(u32::MAX as usize + 1), Just((1usize << 62) + 3),
        ],
    ]
}

fn floats(max: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(float(), 0..=max)
}

/// Offsets: usually valid for some length, sometimes not (decreasing, huge, not starting at 0).
fn cu_seqlens() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        4 => prop::collection::vec(0u32..4, 0..5).prop_map(|lens| {
            let mut cu = vec![0u32];
            for l in lens {
                cu.push(cu.last().unwrap() + l);
            }
            cu
        }),
        1 => prop::collection::vec(prop_oneof![0u32..8, Just(u32::MAX), Just(u32::MAX - 1)], 0..5),
    ]
}

/// Bit patterns, so an unchanged NaN compares equal to itself.
fn bits(x: &[Vec<f32>]) -> Vec<Vec<u32>> {
    x.iter().map(|v| v.iter().map(|f| f.to_bits()).collect()).collect()
}

fn moderate(x: &[f32]) -> bool {
    x.iter().all(|v| v.abs() <= 5.0)
}

fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

fn grpo_config() -> impl Strategy<Value = AdvantageConfig> {
    let scope = prop_oneof![Just(StdScope::None), Just(StdScope::Group), Just(StdScope::Batch)];
    let estimator = prop_oneof![
        (scope, any::<bool>(), float()).prop_map(|(scope, unbiased_std, eps)| Estimator::Grpo(GrpoConfig {
            scope,
            unbiased_std,
            eps
        })),
        Just(Estimator::Rloo),
    ];
    let singleton =
        prop_oneof![Just(SingletonPolicy::Error), Just(SingletonPolicy::Zero), Just(SingletonPolicy::RawScore)];
    let non_finite = prop_oneof![Just(NonFinitePolicy::Error), Just(NonFinitePolicy::Ignore)];
    (estimator, singleton, non_finite).prop_map(|(estimator, singleton, non_finite)| AdvantageConfig {
        estimator,
        singleton,
        non_finite,
    })
}

fn loss_config() -> impl Strategy<Value = PolicyLossConfig> {
    let agg = prop_oneof![
        Just(Aggregation::TokenMean),
        Just(Aggregation::TokenSum),
        Just(Aggregation::SeqMeanTokenSum),
        Just(Aggregation::SeqMeanTokenMean),
        float().prop_map(|budget| Aggregation::SeqMeanTokenSumNorm { budget }),
    ];
    let est =
        prop_oneof![Just(KlEstimator::K1), Just(KlEstimator::K2), Just(KlEstimator::K3), Just(KlEstimator::K3Plus)];
    let kl =
        prop::option::of((est, float(), prop::option::of(float())).prop_map(|(estimator, beta, k3_clamp)| KlPenalty {
            estimator,
            beta,
            k3_clamp,
        }));
    let den =
        prop::option::of(prop_oneof![Just(1.0f64), Just(3.0), Just(1e-300), Just(f64::NAN), Just(-1.0), Just(1e300)]);
    (float(), float(), prop::option::of(float()), kl, agg, den.clone(), den).prop_map(
        |(clip_low, clip_high, dual_clip, kl, aggregation, tokens, seqs)| PolicyLossConfig {
            clip_low,
            clip_high,
            dual_clip,
            kl,
            aggregation,
            denominators: Denominators { tokens, seqs },
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn logprob_entry_points(
        logits in prop_oneof![1 => Just(Vec::new()), 3 => floats(12)], vocab in size(),
        targets in prop::collection::vec(prop_oneof![4 => 0u32..2, 1 => 0u32..4, 1 => Just(u32::MAX)], 0..4),
        grad_logp in floats(4), grad_entropy in prop::option::of(floats(4)), grad_len in 0usize..14,
    ) {
        let input = (&logits, vocab, &targets);
        let out = call("logprobs", &input, || logprobs(&logits, vocab, &targets))?;
        let mut reused = LogprobOutput { logp: vec![7.0; 9], ..Default::default() };
        let into = call("logprobs_into", &input, || logprobs_into(&logits, vocab, &targets, &mut reused))?;
        prop_assert_eq!(out.is_ok(), into.is_ok());
        if let Ok(fwd) = &out {
            prop_assert_eq!(fwd, &reused);
            prop_assert_eq!((fwd.logp.len(), fwd.entropy.len(), fwd.lse.len()), (targets.len(), targets.len(), targets.len()));
            prop_assert!(all_finite(&fwd.lse) && all_finite(&fwd.entropy));
            // Accepted only when the logits really are tokens x vocab.
            prop_assert_eq!(Some(logits.len()), targets.len().checked_mul(vocab));
            if moderate(&logits) {
                let want = squid_optim::logprob::naive::forward(&logits, vocab, &targets);
                for (t, &(logp, entropy, lse)) in want.iter().enumerate() {
                    prop_assert!((f64::from(fwd.logp[t]) - logp).abs() <= 1e-5, "logp {} vs {}", fwd.logp[t], logp);
                    prop_assert!((f64::from(fwd.entropy[t]) - entropy).abs() <= 1e-5, "entropy {} vs {}", fwd.entropy[t], entropy);
                    prop_assert!((f64::from(fwd.lse[t]) - lse).abs() <= 1e-5, "lse {} vs {}", fwd.lse[t], lse);
                }
            }
        }
        // The backward with whatever forward came out (or an empty or foreign one).
        let fwd = out.as_ref().cloned().unwrap_or_default();
        let mut grad_logits = vec![0.0f32; grad_len];
        let input = (&logits, vocab, &targets, &fwd, &grad_logp, &grad_entropy, grad_len);
        let back = call("logprobs_backward", &input, || {
            logprobs_backward(&logits, vocab, &targets, &fwd, &grad_logp, grad_entropy.as_deref(), &mut grad_logits)
        })?;
        if back.is_ok() {
            prop_assert!(all_finite(&grad_logits) || !moderate(&logits));
            if moderate(&logits) && moderate(&grad_logp) && grad_entropy.as_deref().is_none_or(moderate) {
                let want = squid_optim::logprob::naive::backward(&logits, vocab, &targets, &grad_logp, grad_entropy.as_deref());
                for (g, w) in grad_logits.iter().zip(&want) {
                    prop_assert!((f64::from(*g) - w).abs() <= 1e-4, "{} vs {}", g, w);
                }
            }
        }
    }

    #[test]
    fn advantage_entry_points(
        rewards in floats(8), group in size(), ids in prop::collection::vec(0u64..3, 0..9),
        by_ids in any::<bool>(), config in grpo_config(), cu in cu_seqlens(),
        mask in prop::collection::vec(any::<bool>(), 0..12), token_rewards in floats(12),
        gamma in float(), eps in float(), derive in prop::bool::weighted(0.8), seq_lens in prop::collection::vec(0u32..4, 9),
    ) {
        // Mostly offsets and a mask that fit the rewards (one sequence per reward), so the calls get
        // past their length checks; otherwise the generated ones.
        let (cu, mask, token_rewards) = if derive {
            let mut cu = vec![0u32];
            for l in &seq_lens[..rewards.len()] {
                cu.push(cu.last().unwrap() + l);
            }
            let total = *cu.last().unwrap() as usize;
            let mask: Vec<bool> = (0..total).map(|t| mask.get(t).copied().unwrap_or(t % 3 != 0)).collect();
            let tr: Vec<f32> = (0..total).map(|t| token_rewards.get(t).copied().unwrap_or(1.0)).collect();
            (cu, mask, tr)
        } else {
            (cu, mask, token_rewards)
        };
        let groups = if by_ids { Groups::Ids(&ids) } else { Groups::Size(group) };
        let input = (&rewards, &groups, &config);
        let members = call("Groups::resolve", &input, || groups.resolve(rewards.len()))?;
        let with_stats = call("sample_advantages_with_stats", &input, || sample_advantages_with_stats(&rewards, groups, &config))?;
        let plain = call("sample_advantages", &input, || sample_advantages(&rewards, groups, &config))?;
        prop_assert_eq!(plain.as_ref().ok(), with_stats.as_ref().ok().map(|a| &a.advantages));
        if let (Ok(a), Ok(members)) = (&with_stats, &members) {
            prop_assert_eq!(a.advantages.len(), rewards.len());
            prop_assert_eq!(a.groups.len(), members.len());
            prop_assert!(all_finite(&a.advantages));
            let want = squid_optim::advantage::naive::sample_advantages(&rewards, members, &config);
            prop_assert!(want.is_ok(), "fast accepted what the reference refused: {:?}", want);
            // Values compared where the rewards are moderate: with rewards 30 orders of magnitude
            // apart (1e30 and -1e30 beside 1.8) the f64 group sum cancels the small ones away, in
            // the fast path's order as in any single-pass sum; the reference's leave-one-out sums
            // differ, so there they agree only in being finite.
            if moderate(&rewards) {
                for (x, w) in a.advantages.iter().zip(want.unwrap()) {
                    prop_assert!((f64::from(*x) - w).abs() <= 1e-5 * (1.0 + w.abs()), "{} vs {}", x, w);
                }
            }
        }
        let _ = call("filter_zero_variance_groups", &input, || filter_zero_variance_groups(&rewards, groups))?;
        let input = (&rewards, &cu, &mask);
        if let Ok(tok) = call("broadcast_to_tokens", &input, || broadcast_to_tokens(&rewards, &cu, &mask))? {
            prop_assert_eq!(tok.len(), mask.len());
            prop_assert!(all_finite(&tok));
            for (t, (&v, &m)) in tok.iter().zip(&mask).enumerate() {
                let s = cu.partition_point(|&c| c as usize <= t) - 1;
                prop_assert_eq!(v, if m { rewards[s] } else { 0.0 });
            }
        }
        let input = (&token_rewards, &cu, &mask, gamma, eps);
        if let Ok(a) = call("reinforce_pp", &input, || reinforce_pp(&token_rewards, &cu, &mask, gamma, WhitenConfig { eps }))? {
            prop_assert_eq!(a.len(), mask.len());
            prop_assert!(all_finite(&a));
        }
        let input = (&rewards, &groups, &cu, &mask, &config, eps);
        let baseline = call("reinforce_pp_baseline", &input, || {
            reinforce_pp_baseline(&rewards, groups, &cu, &mask, config.singleton, config.non_finite, WhitenConfig { eps })
        })?;
        if let Ok(a) = baseline {
            prop_assert_eq!(a.len(), mask.len());
            prop_assert!(all_finite(&a));
        }
    }

    #[test]
    fn policy_loss_entry_points(
        n in 0usize..10, values in prop::collection::vec(float(), 50), lens in prop::collection::vec(prop_oneof![8 => Just(0usize), 1 => 0usize..12], 7),
        mask in prop::collection::vec(any::<bool>(), 10), cu in cu_seqlens(), with_ref in any::<bool>(),
        with_entropy in any::<bool>(), config in loss_config(), derive in prop::bool::weighted(0.8), cut in 0usize..10,
    ) {
        let cu = if derive { vec![0, cut.min(n) as u32, n as u32] } else { cu };
        // Five per-token inputs of length n, each sometimes of another length.
        let len = |i: usize| if lens[i] == 0 { n } else { lens[i] - 1 };
        let take = |i: usize| values[i * 10..i * 10 + len(i).min(10)].to_vec();
        let (new, old, reference, adv, entropy) = (take(0), take(1), take(2), take(3), take(4));
        let mask = mask[..len(5).min(10)].to_vec();
        let inputs = PolicyLossInputs {
            new_logp: &new, old_logp: &old, ref_logp: with_ref.then_some(&reference[..]), advantages: &adv,
            loss_mask: &mask, cu_seqlens: &cu, entropy: with_entropy.then_some(&entropy[..]),
        };
        let input = (&inputs, &config);
        let out = call("policy_loss", &input, || policy_loss(&inputs, &config))?;
        let mut grad = vec![0.0f32; len(6).min(12)];
        let into = call("policy_loss_into", &input, || policy_loss_into(&inputs, &config, &mut grad))?;
        let mut grad2 = vec![0.0f32; new.len()];
        let mut token_loss = vec![0.0f32; new.len()];
        let with_tl = call("policy_loss_with_token_loss_into", &input, || {
            policy_loss_with_token_loss_into(&inputs, &config, &mut grad2, &mut token_loss)
        })?;
        let _ = call("count_loss_tokens_and_seqs", &input, || count_loss_tokens_and_seqs(&mask, &cu))?;
        let _ = call("PolicyLossConfig::validate", &config, || config.validate())?;
        if let Ok(o) = &out {
            prop_assert!(o.loss.is_finite() && all_finite(&o.grad_new_logp) && all_finite(&o.token_loss));
            prop_assert_eq!((o.grad_new_logp.len(), o.token_loss.len()), (new.len(), new.len()));
            prop_assert_eq!(with_tl.as_ref().ok(), Some(&(o.loss, o.metrics)));
            prop_assert_eq!(&grad2, &o.grad_new_logp);
            prop_assert_eq!(&token_loss, &o.token_loss);
            if grad.len() == new.len() {
                prop_assert_eq!(into.as_ref().ok(), Some(&(o.loss, o.metrics)));
            }
            let tame = [&new, &old, &reference, &adv].iter().all(|v| moderate(v))
                && config.kl.is_none_or(|k| k.beta.abs() <= 5.0)
                && config.denominators.tokens.is_none_or(|d| d >= 1.0)
                && config.denominators.seqs.is_none_or(|d| d >= 1.0)
                && !matches!(config.aggregation, Aggregation::SeqMeanTokenSumNorm { budget } if budget < 1.0);
            if tame {
                let (loss, want) = squid_optim::policy_loss::naive::policy_loss(&inputs, &config);
                let scale: f64 = want.iter().map(|g| g.abs()).sum::<f64>() + 1.0;
                prop_assert!((f64::from(o.loss) - loss).abs() <= 1e-3 * scale.max(loss.abs()), "loss {} vs {}", o.loss, loss);
            }
        } else {
            prop_assert!(with_tl.is_err());
        }
    }

    #[test]
    fn optimizer_entry_points(
        params in prop::collection::vec(floats(5), 0..3), other_grads in prop::collection::vec(floats(5), 0..3),
        grad_values in prop::collection::vec(float(), 15), same_shape in prop::bool::weighted(0.85),
        beta1 in float(), beta2 in float(), eps in float(), weight_decay in float(), amsgrad in any::<bool>(),
        max_grad_norm in prop::option::of(float()), lr in float(), steps in 1usize..4,
    ) {
        // Mostly gradients of the parameters' shapes, so steps get past the shape checks.
        let grads: Vec<Vec<f32>> = if same_shape {
            params.iter().enumerate().map(|(i, p)| grad_values[i * 5..i * 5 + p.len()].to_vec()).collect()
        } else {
            other_grads
        };
        let config = AdamWConfig { beta1: beta1.abs() % 1.0, beta2: beta2.abs() % 1.0, eps, weight_decay, amsgrad, max_grad_norm };
        let views: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
        let input = (&params, &grads, &config, lr);
        let Ok(made) = call("AdamW::new", &input, || AdamW::new(config, &views))? else { return Ok(()) };
        let mut opt = made;
        let mut p = params.clone();
        let gviews: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut reference: Vec<NaiveAdamW> = params.iter().map(|p| NaiveAdamW::new(p)).collect();
        for _ in 0..steps {
            let before = (bits(&p), opt.clone());
            let result = call("AdamW::step", &input, || {
                let mut pm: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
                opt.step(&mut pm, &gviews, lr)
            })?;
            match result {
                Ok(report) => {
                    prop_assert!(p.iter().all(|x| all_finite(x)), "step succeeded with non-finite parameters");
                    for i in 0..p.len() {
                        let (m, v) = opt.moments(i).unwrap();
                        prop_assert!(all_finite(m) && all_finite(v));
                    }
                    prop_assert!(report.grad_norm.is_finite() && report.clip_scale.is_finite());
                    let tame = params.iter().chain(&grads).all(|x| moderate(x)) && eps >= 1e-8 && lr.abs() <= 5.0
                        && weight_decay.abs() <= 5.0;
                    if tame {
                        for (r, g) in reference.iter_mut().zip(&grads) {
                            let g: Vec<f32> = g.iter().map(|&x| x * report.clip_scale).collect();
                            r.step(&g, f64::from(lr), f64::from(config.beta1), f64::from(config.beta2),
                                f64::from(eps), f64::from(weight_decay), amsgrad);
                        }
                        for (x, r) in p.iter().zip(&reference) {
                            for (a, b) in x.iter().zip(&r.p) {
                                prop_assert!((f64::from(*a) - b).abs() <= 1e-3 * (1.0 + b.abs()), "{} vs {}", a, b);
                            }
                        }
                    }
                }
                Err(_) => {
                    prop_assert_eq!(&(bits(&p), opt.clone()), &before, "a refused step changed something");
                    break;
                }
            }
        }
        // Save and load into a fresh optimizer: everything comes back.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let views: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
        if call("AdamW::save", &input, || opt.save(&path, &views))?.is_ok() {
            let mut fresh = AdamW::new(config, &views).unwrap();
            let mut q: Vec<Vec<f32>> = p.iter().map(|x| vec![0.0; x.len()]).collect();
            let loaded = call("AdamW::load", &input, || {
                let mut qm: Vec<&mut [f32]> = q.iter_mut().map(|x| x.as_mut_slice()).collect();
                fresh.load(&path, &mut qm)
            })?;
            prop_assert!(loaded.is_ok(), "{:?}", loaded);
            prop_assert_eq!((bits(&q), &fresh), (bits(&p), &opt));
        }
    }

    #[test]
    fn clip_and_schedule_entry_points(
        grads in prop::collection::vec(floats(6), 0..3), max_norm in float(),
        lr in float(), warmup in prop_oneof![0u64..5, Just(u64::MAX)], total in prop_oneof![0u64..10, Just(u64::MAX)],
        min_ratio in float(), step in prop_oneof![0u64..12, Just(u64::MAX)], x in float(),
    ) {
        let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let norm = call("global_grad_norm", &grads, || global_grad_norm(&views))?;
        if let Ok(n) = norm {
            let want = squid_optim::clip::naive_global_grad_norm(&views);
            prop_assert!(n.is_finite() && (n - want).abs() <= 1e-6 * want, "{} vs {}", n, want);
        }
        let mut clipped = grads.clone();
        let input = (&grads, max_norm);
        let result = call("clip_grad_norm", &input, || {
            let mut gm: Vec<&mut [f32]> = clipped.iter_mut().map(|g| g.as_mut_slice()).collect();
            clip_grad_norm(&mut gm, max_norm)
        })?;
        match result {
            Ok(n) => {
                prop_assert_eq!(Ok(n), norm);
                let after = squid_optim::clip::naive_global_grad_norm(&clipped.iter().map(|g| g.as_slice()).collect::<Vec<_>>());
                prop_assert!(after <= f64::from(max_norm).max(n) * (1.0 + 1e-5), "norm {} after clipping to {}", after, max_norm);
                prop_assert!(n == 0.0 || after > 0.0 || max_norm <= 1e-30, "clipping zeroed finite gradients");
            }
            Err(_) => prop_assert_eq!(bits(&clipped), bits(&grads)),
        }
        let input = (lr, warmup, total, min_ratio, step);
        for schedule in [
            call("LrSchedule::constant", &input, || LrSchedule::constant(lr))?,
            call("LrSchedule::linear_warmup", &input, || LrSchedule::linear_warmup(lr, warmup))?,
            call("LrSchedule::cosine", &input, || LrSchedule::cosine(lr, warmup, total, min_ratio))?,
        ].into_iter().flatten() {
            let rate = call("LrSchedule::lr_at", &input, || schedule.lr_at(step))?;
            prop_assert!(rate.is_finite() && rate >= 0.0 && rate <= lr, "{} from {:?}", rate, schedule);
        }
        let e = call("exp_fast", &x, || squid_optim::math::exp_fast(x))?;
        prop_assert!(e.is_nan() == x.is_nan() && (x.is_nan() || e > 0.0));
    }
}
