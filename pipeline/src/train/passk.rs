//! pass@k (Chen et al. 2021, the Codex paper): with `n` sampled attempts of which `c` pass,
//! the unbiased estimate of "at least one of k attempts passes" is `1 - C(n-c, k) / C(n, k)`,
//! computed as a running product so it stays exact in f64 for any n.

/// Unbiased pass@k from `n` attempts with `c` passing (`k <= n`; a `k > n` is clamped to `n`).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    let k = k.min(n);
    if k == 0 || c == 0 {
        return 0.0;
    }
    if n - c < k {
        return 1.0;
    }
    // C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    let mut fail = 1.0f64;
    for i in (n - c + 1)..=n {
        fail *= 1.0 - k as f64 / i as f64;
    }
    1.0 - fail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binomial(n: u64, k: u64) -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn matches_the_binomial_definition() {
        for n in 1..=12usize {
            for c in 0..=n {
                for k in 1..=n {
                    let want = 1.0 - binomial((n - c) as u64, k as u64) / binomial(n as u64, k as u64);
                    let got = pass_at_k(n, c, k);
                    assert!((got - want).abs() < 1e-12, "n={n} c={c} k={k}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn edge_cases() {
        assert_eq!(pass_at_k(8, 0, 4), 0.0);
        assert_eq!(pass_at_k(8, 8, 1), 1.0);
        assert!((pass_at_k(8, 2, 1) - 0.25).abs() < 1e-12, "pass@1 is the pass fraction");
        assert_eq!(pass_at_k(4, 1, 9), 1.0, "k > n clamps to n");
        assert_eq!(pass_at_k(0, 0, 1), 0.0);
    }
}
