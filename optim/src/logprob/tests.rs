use half::bf16;
use proptest::prelude::*;

use super::*;

#[test]
fn by_hand() {
    // Row [0, ln 2, ln 5] (probabilities 1/8, 2/8, 5/8), target 1:
    // lse = ln 8 = 2.0794415; logp = ln 2 - ln 8 = -1.3862944;
    // H = -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8) = 0.2599302 + 0.3465736 + 0.2937523 = 0.9002561.
    // Backward with g = 1, h = 0: [-1/8, 1 - 2/8, -5/8].
    let (l2, l5) = (2.0f32.ln(), 5.0f32.ln());
    let out = logprobs(&[0.0, l2, l5], 3, &[1]).unwrap();
    assert!((out.lse[0] - 8.0f32.ln()).abs() < 1e-6);
    assert!((out.logp[0] + 1.386_294_4).abs() < 1e-6);
    assert!((out.entropy[0] - 0.900_256_1).abs() < 1e-6, "{}", out.entropy[0]);
    let mut grad = [0.0f32; 3];
    logprobs_backward(&[0.0, l2, l5], 3, &[1], &out, &[1.0], None, &mut grad).unwrap();
    for (g, want) in grad.iter().zip([-0.125, 0.75, -0.625]) {
        assert!((g - want).abs() < 1e-6, "{g} vs {want}");
    }
}

#[test]
fn edges() {
    // Vocabulary of one: logp 0, entropy 0.
    let out = logprobs(&[3.5f32], 1, &[0]).unwrap();
    assert_eq!((out.logp[0], out.entropy[0]), (0.0, 0.0));
    // -inf entries (masked vocabulary), also a whole first chunk of them: they get probability 0.
    let mut row = vec![f32::NEG_INFINITY; VOCAB_CHUNK + 2];
    row[VOCAB_CHUNK] = 0.0;
    row[VOCAB_CHUNK + 1] = 0.0;
    let out = logprobs(&row, row.len(), &[VOCAB_CHUNK as u32]).unwrap();
    assert!((out.logp[0] + 2.0f32.ln()).abs() < 1e-6 && (out.entropy[0] - 2.0f32.ln()).abs() < 1e-6);
    let mut grad = vec![0.0f32; row.len()];
    logprobs_backward(&row, row.len(), &[VOCAB_CHUNK as u32], &out, &[1.0], Some(&[1.0]), &mut grad).unwrap();
    assert!(grad.iter().all(|g| g.is_finite()));
    assert!(grad[0].abs() < 1e-30 && (grad[VOCAB_CHUNK] - 0.5).abs() < 1e-6);
    // Errors: NaN row, target out of range, wrong length.
    assert!(matches!(logprobs(&[0.0, f32::NAN, 1.0, 2.0], 2, &[0, 1]), Err(Error::NonFinite { index: 0, .. })));
    assert!(matches!(logprobs(&[0.0, 1.0], 2, &[2]), Err(Error::TargetOutOfRange { id: 2, .. })));
    assert!(matches!(logprobs(&[0.0, 1.0, 2.0], 2, &[0]), Err(Error::Length { .. })));
}

#[test]
fn sizes_that_wrap_are_errors_not_panics() {
    // 2 tokens * 2^63 vocab wraps to 0 = the length of empty logits: it passed the length check and
    // panicked; now the product is checked.
    let huge = 1usize << (usize::BITS - 1);
    assert!(matches!(logprobs::<f32>(&[], huge, &[0, 0]), Err(Error::Size { .. })));
    assert!(matches!(logprobs::<f32>(&[], usize::MAX, &[0, 1, 2]), Err(Error::Size { .. })));
    // No tokens and any vocabulary: an empty result (the chunk size saturates instead of wrapping).
    for vocab in [1, huge, usize::MAX, usize::MAX / 4 + 1] {
        assert_eq!(logprobs::<f32>(&[], vocab, &[]).unwrap(), LogprobOutput::default());
    }
    let mut g = [0.0f32; 0];
    assert!(matches!(
        logprobs_backward::<f32, f32>(&[], huge, &[0, 0], &LogprobOutput::default(), &[0.0; 2], None, &mut g),
        Err(Error::Size { .. })
    ));
    // A forward output edited to NaN, or a NaN entropy gradient: typed errors, not NaN gradients.
    let logits = [0.0f32, 1.0];
    let mut fwd = logprobs(&logits, 2, &[1]).unwrap();
    let mut dx = [0.0f32; 2];
    assert!(matches!(
        logprobs_backward(&logits, 2, &[1], &fwd, &[1.0], Some(&[f32::NAN]), &mut dx),
        Err(Error::NonFinite { what: "grad_entropy", .. })
    ));
    fwd.lse[0] = f32::NAN;
    assert!(matches!(
        logprobs_backward(&logits, 2, &[1], &fwd, &[1.0], None, &mut dx),
        Err(Error::NonFinite { what: "forward.lse", .. })
    ));
}

#[test]
fn naive_backward_matches_finite_differences() {
    // Loss = sum_t g_t logp_t + h_t H_t on a 3 x 7 batch; central differences (step 1e-5) of that
    // loss written out in f64 here, against the analytic backward of the reference.
    let vocab = 7;
    let logits: Vec<f32> = (0..21).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
    let targets = [2u32, 0, 6];
    let (g, h) = ([0.7f32, -1.3, 0.4], [0.5f32, 0.25, -2.0]);
    let grad = naive::backward(&logits, vocab, &targets, &g, Some(&h));
    let loss = |x: &[f64]| -> f64 {
        x.chunks(vocab)
            .enumerate()
            .map(|(t, row)| {
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let ent: f64 = -row.iter().map(|v| (v - lse).exp() * (v - lse)).sum::<f64>();
                f64::from(g[t]) * (row[targets[t] as usize] - lse) + f64::from(h[t]) * ent
            })
            .sum()
    };
    let base: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let step = 1e-5;
    for i in 0..base.len() {
        let (mut p, mut m) = (base.clone(), base.clone());
        p[i] += step;
        m[i] -= step;
        let fd = (loss(&p) - loss(&m)) / (2.0 * step);
        assert!((fd - grad[i]).abs() < 1e-8, "logit {i}: {} vs fd {fd}", grad[i]);
    }
}

fn rows() -> impl Strategy<Value = (usize, Vec<f32>, Vec<u32>)> {
    (1usize..6, prop_oneof![Just(1usize), 2usize..40, Just(VOCAB_CHUNK + 1), 3000usize..5000]).prop_flat_map(
        |(t, v)| (Just(v), prop::collection::vec(-12.0f32..12.0, t * v), prop::collection::vec(0..v as u32, t)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The AVX2 + FMA copies (where the CPU has them) and the portable ones agree bit for bit.
    #[test]
    fn simd_copies_agree_bitwise((vocab, logits, targets) in rows()) {
        let g: Vec<f32> = (0..targets.len()).map(|i| 0.5 - 0.1 * i as f32).collect();
        let run = || {
            let fwd = logprobs(&logits, vocab, &targets).unwrap();
            let mut grad = vec![0.0f32; logits.len()];
            logprobs_backward(&logits, vocab, &targets, &fwd, &g, Some(&g), &mut grad).unwrap();
            (fwd, grad)
        };
        let portable = crate::math::with_portable(run);
        prop_assert_eq!(portable, run());
    }

    /// Fast vs f64 reference, f32 and bf16 logits: logp and lse to 2e-6 (1 + |value|) absolute,
    /// entropy to 2e-6 (1 + H), gradients to 2e-6 absolute (each is at most 1 + |h| (1 + ...) in size).
    #[test]
    fn fast_matches_naive((vocab, logits, targets) in rows(), use_bf16 in any::<bool>()) {
        let t = targets.len();
        let g: Vec<f32> = (0..t).map(|i| 1.0 - 0.3 * i as f32).collect();
        let h: Vec<f32> = (0..t).map(|i| 0.2 * i as f32 - 0.3).collect();
        let check = |fwd: &LogprobOutput, want: &[(f64, f64, f64)], grad: &[f32], want_grad: &[f64]| -> Result<(), TestCaseError> {
            for (k, &(lp, ent, lse)) in want.iter().enumerate() {
                prop_assert!((f64::from(fwd.logp[k]) - lp).abs() <= 2e-6 * (1.0 + lp.abs()), "logp {} vs {}", fwd.logp[k], lp);
                prop_assert!((f64::from(fwd.lse[k]) - lse).abs() <= 2e-6 * (1.0 + lse.abs()));
                prop_assert!((f64::from(fwd.entropy[k]) - ent).abs() <= 2e-6 * (1.0 + ent), "H {} vs {}", fwd.entropy[k], ent);
            }
            for (i, (&a, &b)) in grad.iter().zip(want_grad).enumerate() {
                prop_assert!((f64::from(a) - b).abs() <= 2e-6, "grad[{}] {} vs {}", i, a, b);
            }
            Ok(())
        };
        if use_bf16 {
            let x: Vec<bf16> = logits.iter().map(|&v| bf16::from_f32(v)).collect();
            let fwd = logprobs(&x, vocab, &targets).unwrap();
            let mut grad = vec![0.0f32; x.len()];
            logprobs_backward(&x, vocab, &targets, &fwd, &g, Some(&h), &mut grad).unwrap();
            check(&fwd, &naive::forward(&x, vocab, &targets), &grad, &naive::backward(&x, vocab, &targets, &g, Some(&h)))?;
        } else {
            let fwd = logprobs(&logits, vocab, &targets).unwrap();
            let mut grad = vec![0.0f32; logits.len()];
            logprobs_backward(&logits, vocab, &targets, &fwd, &g, Some(&h), &mut grad).unwrap();
            check(&fwd, &naive::forward(&logits, vocab, &targets), &grad, &naive::backward(&logits, vocab, &targets, &g, Some(&h)))?;
        }
    }
}
