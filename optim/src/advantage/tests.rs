use proptest::prelude::*;

use super::*;

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "index {i}: {x} vs {y} (tol {tol})");
    }
}

fn grpo(cfg: GrpoConfig) -> AdvantageConfig {
    AdvantageConfig::new(Estimator::Grpo(cfg))
}

#[test]
fn grpo_by_hand() {
    // Group [1, 0, 0, 1]: mean 0.5; deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3,
    // std = 0.57735; verl eps 1e-6: 0.5 / (0.57735 + 1e-6) = 0.866024.
    // Group [2, 4, 6, 8]: mean 5; deviations -3,-1,1,3; unbiased var = 20 / 3, std = 2.581989.
    let rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0];
    let a = sample_advantages(&rewards, Groups::Size(4), &grpo(GrpoConfig::verl())).unwrap();
    let s1 = 0.5 / (1.0f64 / 3.0).sqrt();
    let s2 = 1.0 / (20.0f64 / 3.0).sqrt();
    let want = [s1, -s1, -s1, s1, -3.0 * s2, -s2, s2, 3.0 * s2].map(|x| x as f32);
    close(&a, &want, 2e-6);
    // Biased std for the first group: var = 0.25, std = 0.5, so +-0.5 / (0.5 + 1e-4) = +-0.99980.
    let biased = GrpoConfig { unbiased_std: false, ..GrpoConfig::trl() };
    let a = sample_advantages(&rewards[..4], Groups::Size(4), &grpo(biased)).unwrap();
    let x = 0.5 / 0.5001;
    close(&a, &[x, -x, -x, x], 1e-6);
    // Dr. GRPO: just centred: [0.5, -0.5, -0.5, 0.5, -3, -1, 1, 3].
    let a = sample_advantages(&rewards, Groups::Size(4), &grpo(GrpoConfig::dr_grpo())).unwrap();
    assert_eq!(a, vec![0.5, -0.5, -0.5, 0.5, -3.0, -1.0, 1.0, 3.0]);
}

#[test]
fn grpo_batch_std_by_hand() {
    // TRL scale_rewards="batch": group means 0.5 and 5; batch [1,0,0,1,2,4,6,8] mean 2.75,
    // sum of squares of deviations = 3.0625*2 + 7.5625*2 + 0.5625 + 1.5625 + 10.5625 + 27.5625 = 61.5,
    // unbiased var = 61.5 / 7 = 8.785714, std = 2.964071.
    let rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0];
    let cfg = GrpoConfig { scope: StdScope::Batch, unbiased_std: true, eps: 1e-4 };
    let a = sample_advantages(&rewards, Groups::Size(4), &grpo(cfg)).unwrap();
    let d = 2.964_071_f32 + 1e-4;
    close(&a, &[0.5 / d, -0.5 / d, -0.5 / d, 0.5 / d, -3.0 / d, -1.0 / d, 1.0 / d, 3.0 / d], 1e-6);
}

#[test]
fn group_stats_are_the_ones_used() {
    // Same groups as grpo_by_hand: means 0.5 and 5, unbiased stds sqrt(1/3) and sqrt(20/3).
    let rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0];
    let out = sample_advantages_with_stats(&rewards, Groups::Size(4), &grpo(GrpoConfig::verl())).unwrap();
    assert_eq!(out.advantages, sample_advantages(&rewards, Groups::Size(4), &grpo(GrpoConfig::verl())).unwrap());
    assert_eq!(out.groups.len(), 2);
    assert_eq!((out.groups[0].count, out.groups[0].mean, out.groups[1].mean), (4, 0.5, 5.0));
    assert!((out.groups[0].std - (1.0f64 / 3.0).sqrt()).abs() < 1e-15);
    assert!((out.groups[1].std - (20.0f64 / 3.0).sqrt()).abs() < 1e-15);
    // Each advantage is (r - mean) / (std + eps) with the reported numbers.
    for (i, &r) in rewards.iter().enumerate() {
        let g = out.groups[i / 4];
        let want = (f64::from(r) - g.mean) / (g.std + 1e-6);
        assert!((f64::from(out.advantages[i]) - want).abs() < 1e-6);
    }
    // Batch scope reports the batch std (2.964071, see grpo_batch_std_by_hand) for every group.
    let batch = GrpoConfig { scope: StdScope::Batch, unbiased_std: true, eps: 1e-4 };
    let out = sample_advantages_with_stats(&rewards, Groups::Size(4), &grpo(batch)).unwrap();
    assert!(out.groups.iter().all(|g| (g.std - (61.5f64 / 7.0).sqrt()).abs() < 1e-12));
    // Ignored non-finite rewards are not counted.
    let cfg = AdvantageConfig { non_finite: NonFinitePolicy::Ignore, ..grpo(GrpoConfig::dr_grpo()) };
    let out = sample_advantages_with_stats(&[1.0, f32::NAN, 3.0], Groups::Size(3), &cfg).unwrap();
    assert_eq!((out.groups[0].count, out.groups[0].mean), (2, 2.0));
}

#[test]
fn non_finite_advantages_are_errors() {
    // A NaN advantage went through broadcast_to_tokens onto every loss token of its sequence.
    let err = broadcast_to_tokens(&[0.5, f32::NAN], &[0, 2, 4], &[true; 4]).unwrap_err();
    assert!(matches!(err, Error::NonFinite { what: "advantages", index: 1, .. }), "{err:?}");
    assert!(broadcast_to_tokens(&[0.5, f32::INFINITY], &[0, 2, 4], &[true; 4]).is_err());
    // Finite rewards whose advantage is not: RLOO on [3e38, -3e38] gives 2 * 3e38 = inf.
    let err = sample_advantages(&[3e38, -3e38], Groups::Size(2), &AdvantageConfig::new(Estimator::Rloo)).unwrap_err();
    assert!(matches!(err, Error::NonFinite { what: "computed advantage", .. }), "{err:?}");
}

#[test]
fn rloo_by_hand() {
    // [1, 2, 6]: sample 0: 1 - (2 + 6) / 2 = -3; sample 1: 2 - (1 + 6) / 2 = -1.5; sample 2: 6 - 1.5 = 4.5.
    let a = sample_advantages(&[1.0, 2.0, 6.0], Groups::Size(3), &AdvantageConfig::new(Estimator::Rloo)).unwrap();
    assert_eq!(a, vec![-3.0, -1.5, 4.5]);
}

#[test]
fn group_ids_need_not_be_contiguous() {
    // ids [7, 3, 7, 3]: group 7 = samples {0, 2} rewards [1, 0]; group 3 = {1, 3} rewards [5, 9].
    let a = sample_advantages(&[1.0, 5.0, 0.0, 9.0], Groups::Ids(&[7, 3, 7, 3]), &grpo(GrpoConfig::dr_grpo())).unwrap();
    assert_eq!(a, vec![0.5, -2.0, -0.5, 2.0]);
}

#[test]
fn edges_equal_singleton_nonfinite() {
    // All equal (0.1 three times: the f64 mean is not exactly 0.1) -> exactly 0 for every estimator.
    for est in [Estimator::Grpo(GrpoConfig::verl()), Estimator::Grpo(GrpoConfig::dr_grpo()), Estimator::Rloo] {
        let a = sample_advantages(&[0.1, 0.1, 0.1], Groups::Size(3), &AdvantageConfig::new(est)).unwrap();
        assert_eq!(a, vec![0.0; 3]);
    }
    // One-sample group: error by default, 0 or the raw score when asked.
    let mut cfg = grpo(GrpoConfig::verl());
    assert_eq!(
        sample_advantages(&[1.0, 2.0, 3.0], Groups::Ids(&[0, 0, 1]), &cfg),
        Err(Error::SingletonGroup { group: 1 })
    );
    cfg.singleton = SingletonPolicy::Zero;
    let a = sample_advantages(&[1.0, 2.0, 3.0], Groups::Ids(&[0, 0, 1]), &cfg).unwrap();
    assert_eq!(a[2], 0.0);
    cfg.singleton = SingletonPolicy::RawScore;
    let a = sample_advantages(&[1.0, 2.0, 3.0], Groups::Ids(&[0, 0, 1]), &cfg).unwrap();
    assert_eq!(a[2], 3.0);
    // NaN: error naming it, or ignored: group [1, NaN, 3] -> stats over [1, 3] (Dr. GRPO: -1, 0, 1).
    let mut cfg = grpo(GrpoConfig::dr_grpo());
    assert!(matches!(
        sample_advantages(&[1.0, f32::NAN, 3.0], Groups::Size(3), &cfg),
        Err(Error::NonFinite { index: 1, .. })
    ));
    cfg.non_finite = NonFinitePolicy::Ignore;
    assert_eq!(sample_advantages(&[1.0, f32::NAN, 3.0], Groups::Size(3), &cfg).unwrap(), vec![-1.0, 0.0, 1.0]);
    // Ignoring leaves one finite sample: that is a singleton group.
    assert_eq!(
        sample_advantages(&[1.0, f32::INFINITY], Groups::Size(2), &cfg),
        Err(Error::SingletonGroup { group: 0 })
    );
    // Shapes.
    assert!(matches!(sample_advantages(&[1.0; 5], Groups::Size(2), &cfg), Err(Error::Config { .. })));
    assert!(matches!(sample_advantages(&[1.0; 2], Groups::Ids(&[0]), &cfg), Err(Error::Length { .. })));
}

#[test]
fn dapo_filter_by_hand() {
    // Groups of 2: [1,1] dropped, [0,1] kept, [0.5,0.5] dropped, [2,0] kept.
    let f = filter_zero_variance_groups(&[1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0, 0.0], Groups::Size(2)).unwrap();
    assert_eq!(f.kept_groups, vec![false, true, false, true]);
    assert_eq!(f.kept_samples, vec![2, 3, 6, 7]);
}

#[test]
fn broadcast_by_hand() {
    // Two sequences: [p p g g] and [p g t g] (p prompt, g generated, t tool output).
    let mask = [false, false, true, true, false, true, false, true];
    let a = broadcast_to_tokens(&[2.0, -1.0], &[0, 4, 8], &mask).unwrap();
    assert_eq!(a, vec![0.0, 0.0, 2.0, 2.0, 0.0, -1.0, 0.0, -1.0]);
    assert!(matches!(broadcast_to_tokens(&[2.0], &[0, 4, 8], &mask), Err(Error::Length { .. })));
    assert!(matches!(broadcast_to_tokens(&[2.0, 1.0], &[0, 5, 4], &mask), Err(Error::CuSeqlens(_))));
}

#[test]
fn reinforce_pp_by_hand() {
    // One sequence of 4 loss tokens, outcome reward 1 on the last, gamma 0.5:
    // returns [0.125, 0.25, 0.5, 1]; mean 0.46875; deviations -0.34375 -0.21875 0.03125 0.53125;
    // squares sum 0.1181640625 + 0.0478515625 + 0.0009765625 + 0.2822265625 = 0.44921875;
    // unbiased var 0.14973958; sqrt(var + 1e-8) = 0.38696199.
    let a = reinforce_pp(&[0.0, 0.0, 0.0, 1.0], &[0, 4], &[true; 4], 0.5, WhitenConfig::default()).unwrap();
    let s = (0.44921875f64 / 3.0 + 1e-8).sqrt();
    let want = [-0.34375, -0.21875, 0.03125, 0.53125].map(|d: f64| (d / s) as f32);
    close(&a, &want, 1e-6);
    // A masked token passes the return through without a discount step and gets 0:
    // tokens [g, t, g], rewards [0, 3, 1], gamma 0.5: returns g0 = 0 + 0.5 * (1 + 3) = 2, g2 = 1.
    // whitened over {2, 1}: mean 1.5, unbiased var 0.5 -> +-0.5 / sqrt(0.5 + 1e-8).
    let a = reinforce_pp(&[0.0, 3.0, 1.0], &[0, 3], &[true, false, true], 0.5, WhitenConfig::default()).unwrap();
    let s = (0.5f64 + 1e-8).sqrt();
    close(&a, &[(0.5 / s) as f32, 0.0, (-0.5 / s) as f32], 1e-6);
    assert_eq!(
        reinforce_pp(&[1.0, 1.0], &[0, 2], &[true, false], 1.0, WhitenConfig::default()),
        Err(Error::TooFewTokens(1))
    );
}

#[test]
fn reinforce_pp_baseline_by_hand() {
    // Groups of 2 sequences: group 0 rewards [1, 0] (centred +-0.5), group 1 rewards [3, 3] (equal).
    // Sequences: s0 two loss tokens, s1 one loss token, s2 and s3 one each.
    // Loss tokens before whitening: [0.5, 0.5, -0.5, 0, 0]; mean 0.1; deviations 0.4 0.4 -0.6 -0.1 -0.1;
    // squares 0.16+0.16+0.36+0.01+0.01 = 0.7; unbiased var 0.175. Group 1 tokens stay 0.
    let a = reinforce_pp_baseline(
        &[1.0, 0.0, 3.0, 3.0],
        Groups::Size(2),
        &[0, 2, 3, 4, 5],
        &[true; 5],
        SingletonPolicy::Error,
        NonFinitePolicy::Error,
        WhitenConfig::default(),
    )
    .unwrap();
    let s = (0.175f64 + 1e-8).sqrt();
    close(&a, &[(0.4 / s) as f32, (0.4 / s) as f32, (-0.6 / s) as f32, 0.0, 0.0], 1e-6);
}

fn grouped_rewards() -> impl Strategy<Value = (Vec<f32>, usize)> {
    (1usize..6, 1usize..9).prop_flat_map(|(groups, size)| {
        let size = size.max(2);
        // Few distinct values so ties (and all-equal groups) happen.
        (prop::collection::vec(prop_oneof![Just(0.0f32), Just(1.0f32), -4.0f32..4.0], groups * size), Just(size))
    })
}

fn estimators() -> impl Strategy<Value = Estimator> {
    prop_oneof![
        Just(Estimator::Grpo(GrpoConfig::verl())),
        Just(Estimator::Grpo(GrpoConfig::trl())),
        Just(Estimator::Grpo(GrpoConfig { unbiased_std: false, ..GrpoConfig::verl() })),
        Just(Estimator::Grpo(GrpoConfig { scope: StdScope::Batch, ..GrpoConfig::trl() })),
        Just(Estimator::Grpo(GrpoConfig::dr_grpo())),
        Just(Estimator::Rloo),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Fast path vs the literal definitions; relative tolerance 1e-5 (f64 on both sides, one f32 rounding).
    #[test]
    fn fast_matches_naive((rewards, size) in grouped_rewards(), est in estimators(), nan_at in prop::option::of(0usize..64)) {
        let mut rewards = rewards;
        let mut cfg = AdvantageConfig::new(est);
        cfg.singleton = SingletonPolicy::Zero;
        if let Some(i) = nan_at {
            let i = i % rewards.len();
            rewards[i] = f32::NAN;
            cfg.non_finite = NonFinitePolicy::Ignore;
        }
        let members = Groups::Size(size).resolve(rewards.len()).unwrap();
        let fast = sample_advantages(&rewards, Groups::Size(size), &cfg).unwrap();
        let slow: Vec<f32> = naive::sample_advantages(&rewards, &members, &cfg).unwrap().iter().map(|&x| x as f32).collect();
        close(&fast, &slow, 1e-5);
    }

    /// Adding a constant to one group's rewards changes no advantage of any estimator that centres
    /// by the group (the batch-std scope changes its divisor, so it is left out).
    #[test]
    fn shift_invariance((rewards, size) in grouped_rewards(), est in estimators(), shift in -3.0f32..3.0, group in 0usize..8) {
        prop_assume!(!matches!(est, Estimator::Grpo(GrpoConfig { scope: StdScope::Batch, .. })));
        let cfg = AdvantageConfig::new(est);
        let g = group % (rewards.len() / size);
        let mut shifted = rewards.clone();
        // Shift by a power of two times a small integer so equal rewards stay equal after rounding.
        let shift = (shift * 4.0).round() / 4.0;
        for r in &mut shifted[g * size..(g + 1) * size] { *r += shift; }
        let a = sample_advantages(&rewards, Groups::Size(size), &cfg).unwrap();
        let b = sample_advantages(&shifted, Groups::Size(size), &cfg).unwrap();
        close(&a, &b, 2e-4);
    }

    /// GRPO advantages of a group sum to 0 (they are centred; the std only scales them).
    #[test]
    fn grpo_group_sums_to_zero((rewards, size) in grouped_rewards(), est in estimators()) {
        let a = sample_advantages(&rewards, Groups::Size(size), &AdvantageConfig::new(est)).unwrap();
        for (g, chunk) in a.chunks(size).enumerate() {
            let sum: f32 = chunk.iter().sum();
            let scale: f32 = chunk.iter().map(|x| x.abs()).sum::<f32>() + 1.0;
            prop_assert!(sum.abs() <= 1e-5 * scale, "group {} sums to {}", g, sum);
        }
    }

    /// RLOO by its definition: r_i minus the mean of the other samples, summed here in f64.
    #[test]
    fn rloo_definition((rewards, size) in grouped_rewards()) {
        let a = sample_advantages(&rewards, Groups::Size(size), &AdvantageConfig::new(Estimator::Rloo)).unwrap();
        for (i, &adv) in a.iter().enumerate() {
            let g = i / size;
            let group = &rewards[g * size..(g + 1) * size];
            let others: f64 = group.iter().enumerate().filter(|(j, _)| g * size + j != i).map(|(_, &r)| f64::from(r)).sum();
            let mut want = f64::from(rewards[i]) - others / (size - 1) as f64;
            if group.iter().all(|&r| r == group[0]) { want = 0.0; }
            prop_assert!((f64::from(adv) - want).abs() <= 1e-5 * (1.0 + want.abs()), "{} vs {}", adv, want);
        }
    }

    /// REINFORCE++ (fast) against the literal sum over later tokens, on many short sequences.
    #[test]
    fn reinforce_pp_matches_naive(lens in prop::collection::vec(1usize..9, 1..12), seed in any::<u64>(), gamma in 0.0f32..=1.0) {
        let mut cu = vec![0u32];
        for l in &lens { cu.push(cu.last().unwrap() + *l as u32); }
        let t = *cu.last().unwrap() as usize;
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
        let rewards: Vec<f32> = (0..t).map(|_| (next() % 7) as f32 - 3.0).collect();
        let mask: Vec<bool> = (0..t).map(|_| next() % 4 != 0).collect();
        let fast = reinforce_pp(&rewards, &cu, &mask, gamma, WhitenConfig::default());
        let n = mask.iter().filter(|&&m| m).count();
        if n < 2 {
            prop_assert_eq!(fast, Err(Error::TooFewTokens(n)));
        } else {
            let slow: Vec<f32> = naive::reinforce_pp(&rewards, &cu, &mask, gamma, 1e-8).iter().map(|&x| x as f32).collect();
            close(&fast.unwrap(), &slow, 1e-4);
        }
    }
}
