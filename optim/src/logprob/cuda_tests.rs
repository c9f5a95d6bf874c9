//! The device log-prob forward and backward against the f64 reference (and the CPU path's
//! errors), on the test device (the simulator without a GPU).

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use squid_cuda::launch::{DeviceCopy, Gpu};
use squid_cuda::testing::test_device;

use super::cuda::{self as dev, ForwardViews, LogprobViews, CHUNK};
use super::*;

/// Forward outputs downloaded: (logp, entropy, lse).
fn forward_dev<T: Element + DeviceCopy>(gpu: &Gpu, x: &[T], vocab: usize, y: &[u32]) -> Result<[Vec<f32>; 3], Error> {
    let n = y.len();
    let (dx, dy) = (gpu.upload(x).unwrap(), gpu.upload(y).unwrap());
    let (mut lp, mut en, mut ls) = (gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    dev::logprobs(
        gpu,
        &dx,
        vocab,
        &dy,
        LogprobViews { logp: (&mut lp).into(), entropy: (&mut en).into(), lse: (&mut ls).into() },
    )?;
    Ok([gpu.download(&lp).unwrap(), gpu.download(&en).unwrap(), gpu.download(&ls).unwrap()])
}

#[allow(clippy::too_many_arguments)]
fn backward_dev<T: Element + DeviceCopy, G: Element + DeviceCopy>(
    gpu: &Gpu,
    x: &[T],
    vocab: usize,
    y: &[u32],
    lse: &[f32],
    entropy: &[f32],
    g: &[f32],
    h: Option<&[f32]>,
) -> Result<Vec<G>, Error> {
    let (dx, dy) = (gpu.upload(x).unwrap(), gpu.upload(y).unwrap());
    let (dl, de, dg) = (gpu.upload(lse).unwrap(), gpu.upload(entropy).unwrap(), gpu.upload(g).unwrap());
    let dh = h.map(|h| gpu.upload(h).unwrap());
    let mut out = gpu.upload(&vec![G::from_f32(7.0); x.len()]).unwrap();
    let fwd = ForwardViews { lse: (&dl).into(), entropy: (&de).into() };
    dev::logprobs_backward(gpu, &dx, vocab, &dy, fwd, &dg, dh.as_ref().map(|h| h.into()), &mut out)?;
    Ok(gpu.download(&out).unwrap())
}

/// Forward within 2e-5 (1 + |ref|) of the f64 reference (f32 sums of at most vocab / 256 + 8
/// terms per thread plus the approximate `expf`/`logf` at their worst-case error: about 1e-6
/// relative on S, W), and the backward within 2e-5 absolute in f32 (probabilities are <= 1),
/// plus half an ulp of the storage type when the gradient is bf16/f16.
fn check<T: Element + DeviceCopy>(gpu: &Gpu, xf: &[f32], vocab: usize, y: &[u32], g: &[f32], h: Option<&[f32]>) {
    let x: Vec<T> = xf.iter().map(|&v| T::from_f32(v)).collect();
    let want = naive::forward(&x, vocab, y);
    let [lp, en, ls] = forward_dev(gpu, &x, vocab, y).unwrap();
    for (t, &(wl, we, ws)) in want.iter().enumerate() {
        for (got, w, what) in [(lp[t], wl, "logp"), (en[t], we, "entropy"), (ls[t], ws, "lse")] {
            assert!(
                (f64::from(got) - w).abs() <= 2e-5 * (1.0 + w.abs()),
                "{what} row {t}: {got} vs {w} (vocab {vocab})"
            );
        }
    }
    let want = naive::backward(&x, vocab, y, g, h);
    let d32: Vec<f32> = backward_dev::<T, f32>(gpu, &x, vocab, y, &ls, &en, g, h).unwrap();
    let dt: Vec<T> = backward_dev::<T, T>(gpu, &x, vocab, y, &ls, &en, g, h).unwrap();
    let ulp = match T::DTYPE {
        squid_cuda::DType::F32 => 0.0,
        squid_cuda::DType::BF16 => 1.0 / 256.0,
        squid_cuda::DType::F16 => 1.0 / 2048.0,
    };
    let scale = 1.0 + f64::from(g.iter().chain(h.unwrap_or(&[])).fold(0.0f32, |a, b| a.max(b.abs())));
    for (i, &w) in want.iter().enumerate() {
        let (a, b) = (f64::from(d32[i]), f64::from(dt[i].to_f32()));
        assert!((a - w).abs() <= 2e-5 * scale, "grad {i}: {a} vs {w} (vocab {vocab})");
        assert!((b - w).abs() <= 2e-5 * scale + ulp * w.abs(), "grad in storage type {i}: {b} vs {w} (vocab {vocab})");
    }
}

#[test]
fn by_hand_edges_and_errors() {
    let Some(gpu) = test_device() else { return };
    // Row [0, ln 2, ln 5], target 1 (logprob::tests::by_hand): lse ln 8, logp -ln 4, H 0.9002561.
    let (l2, l5) = (2.0f32.ln(), 5.0f32.ln());
    let [lp, en, ls] = forward_dev(&gpu, &[0.0f32, l2, l5], 3, &[1]).unwrap();
    assert!(
        (ls[0] - 8.0f32.ln()).abs() < 1e-5 && (lp[0] + 4.0f32.ln()).abs() < 1e-5 && (en[0] - 0.900_256_1).abs() < 1e-5
    );
    let grad: Vec<f32> = backward_dev(&gpu, &[0.0f32, l2, l5], 3, &[1], &ls, &en, &[1.0], None).unwrap();
    for (g, want) in grad.iter().zip([-0.125, 0.75, -0.625]) {
        assert!((g - want).abs() < 1e-5, "{g} vs {want}");
    }
    // Vocabulary of one; a row of -inf but two entries, the live ones past the first chunk.
    let [lp, en, _] = forward_dev(&gpu, &[3.5f32], 1, &[0]).unwrap();
    // 0 up to the approximate logf's error (ln 1 comes back as ~2e-7 at its documented bound).
    assert!(lp[0].abs() < 1e-6 && en[0].abs() < 1e-6, "{lp:?} {en:?}");
    let v = CHUNK + 2;
    let mut row = vec![f32::NEG_INFINITY; v];
    row[CHUNK] = 0.0;
    row[CHUNK + 1] = 0.0;
    let [lp, en, ls] = forward_dev(&gpu, &row, v, &[CHUNK as u32]).unwrap();
    assert!((lp[0] + 2.0f32.ln()).abs() < 1e-6 && (en[0] - 2.0f32.ln()).abs() < 1e-6);
    let grad: Vec<f32> = backward_dev(&gpu, &row, v, &[CHUNK as u32], &ls, &en, &[1.0], Some(&[1.0])).unwrap();
    assert!(grad.iter().all(|g| g.is_finite()) && grad[0].abs() < 1e-30 && (grad[CHUNK] - 0.5).abs() < 1e-5);
    // (A -inf logit gets p = e^-87 ~ 1e-38 from the clamp, as on the CPU: about 0.)
    // The CPU path's errors: a NaN row, a target outside the vocabulary, lengths, bad backward inputs.
    assert!(matches!(
        forward_dev(&gpu, &[0.0f32, 1.0, f32::NAN, 2.0], 2, &[0, 1]),
        Err(Error::NonFinite { what: "logits row log-sum-exp", index: 1, .. })
    ));
    assert_eq!(
        forward_dev(&gpu, &[0.0f32, 1.0], 2, &[2]).err(),
        Some(Error::TargetOutOfRange { index: 0, id: 2, vocab: 2 })
    );
    assert!(matches!(forward_dev(&gpu, &[0.0f32, 1.0, 2.0], 2, &[0]), Err(Error::Length { .. })));
    assert!(matches!(forward_dev(&gpu, &[0.0f32; 0], 0, &[]), Err(Error::Config { .. })));
    let x = [0.0f32, 1.0, 2.0, 3.0];
    let err = backward_dev::<f32, f32>(&gpu, &x, 2, &[0, 1], &[1.0, 1.0], &[0.5, 0.5], &[1.0, f32::NAN], None);
    assert!(matches!(err, Err(Error::NonFinite { what: "grad_logp", index: 1, .. })), "{err:?}");
    let err = backward_dev::<f32, f32>(
        &gpu,
        &x,
        2,
        &[0, 1],
        &[1.0, f32::INFINITY],
        &[0.5, 0.5],
        &[1.0, 1.0],
        Some(&[0.0, f32::NAN]),
    );
    assert!(matches!(err, Err(Error::NonFinite { what: "forward.lse", index: 1, .. })), "{err:?}");
    let err =
        backward_dev::<f32, f32>(&gpu, &x, 2, &[0, 1], &[1.0, 1.0], &[0.5, 0.5], &[1.0, 1.0], Some(&[0.0, f32::NAN]));
    assert!(matches!(err, Err(Error::NonFinite { what: "grad_entropy", index: 1, .. })), "{err:?}");
    let err = backward_dev::<f32, bf16>(&gpu, &x, 2, &[0, 1], &[1.0, 1.0], &[0.5, 0.5], &[1.0, 1.0], None);
    assert!(matches!(err, Err(Error::Config { .. })), "f32 logits with bf16 gradients is not compiled: {err:?}");
}

#[test]
fn generated_rows_match_reference() {
    let Some(gpu) = test_device() else { return };
    // Vocabularies around the block (256) and the backward chunk (2048), and odd ones; 1 to 4 rows.
    let vocabs = [1usize, 2, 31, 255, 257, 1000, 2047, 2049, 4100];
    let strategy = (1usize..5, 0..vocabs.len(), any::<u64>(), 0usize..3, any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 18, ..Config::default() });
    runner
        .run(&strategy, |(rows, v, seed, dtype, with_h)| {
            let vocab = vocabs[v];
            let mut s = seed | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            // Logits in [-8, 8); every sixth row peaked (one large logit) so entropies near 0 occur.
            let mut x: Vec<f32> =
                (0..rows * vocab).map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 16.0).collect();
            if seed % 6 == 0 {
                let at = (next() as usize) % x.len();
                x[at] = 30.0;
            }
            let y: Vec<u32> = (0..rows).map(|_| (next() % vocab as u64) as u32).collect();
            let g: Vec<f32> = (0..rows).map(|_| ((next() % 200) as f32 - 100.0) / 50.0).collect();
            let h: Vec<f32> = (0..rows).map(|_| ((next() % 200) as f32 - 100.0) / 100.0).collect();
            let h = with_h.then_some(&h[..]);
            match dtype {
                0 => check::<f32>(&gpu, &x, vocab, &y, &g, h),
                1 => check::<bf16>(&gpu, &x, vocab, &y, &g, h),
                _ => check::<f16>(&gpu, &x, vocab, &y, &g, h),
            }
            Ok(())
        })
        .unwrap();
}
