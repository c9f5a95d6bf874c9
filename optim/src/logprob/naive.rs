//! Log-softmax, gather, entropy and their backward in f64, one row at a time with the
//! probabilities materialised: the reference.

use squid_cuda::dtype::Element;

/// Probabilities of one row (max-subtracted), in f64.
pub fn softmax<T: Element>(row: &[T]) -> Vec<f64> {
    let x: Vec<f64> = row.iter().map(|v| f64::from(v.to_f32())).collect();
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// `(logp of target, entropy, lse)` per row.
pub fn forward<T: Element>(logits: &[T], vocab: usize, targets: &[u32]) -> Vec<(f64, f64, f64)> {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(row, &y)| {
            let x: Vec<f64> = row.iter().map(|v| f64::from(v.to_f32())).collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let p = softmax(row);
            let entropy = -x.iter().zip(&p).map(|(v, p)| if *p > 0.0 { p * (v - lse) } else { 0.0 }).sum::<f64>();
            (x[y as usize] - lse, entropy, lse)
        })
        .collect()
}

/// d(sum_t g_t logp_t + h_t H_t) / d logits, materialising p.
pub fn backward<T: Element>(logits: &[T], vocab: usize, targets: &[u32], g: &[f32], h: Option<&[f32]>) -> Vec<f64> {
    let fwd = forward(logits, vocab, targets);
    let mut out = Vec::with_capacity(logits.len());
    for (t, row) in logits.chunks(vocab).enumerate() {
        let p = softmax(row);
        let (_, entropy, lse) = fwd[t];
        let (gt, ht) = (f64::from(g[t]), h.map_or(0.0, |h| f64::from(h[t])));
        for (v, &pv) in p.iter().enumerate() {
            let onehot = if v == targets[t] as usize { 1.0 } else { 0.0 };
            let logp = f64::from(row[v].to_f32()) - lse;
            out.push(gt * (onehot - pv) - ht * pv * (logp + entropy));
        }
    }
    out
}
