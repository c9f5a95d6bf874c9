//! AdamW one element at a time in f64 (torch's `_single_tensor_adamw` order): the reference.

/// State of one tensor in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct NaiveAdamW {
    /// Weights.
    pub p: Vec<f64>,
    /// First moment.
    pub m: Vec<f64>,
    /// Second moment.
    pub v: Vec<f64>,
    /// Running max of v.
    pub v_max: Vec<f64>,
    /// Steps taken.
    pub step: u64,
}

impl NaiveAdamW {
    /// From initial weights.
    pub fn new(p: &[f32]) -> Self {
        let n = p.len();
        Self {
            p: p.iter().map(|&x| f64::from(x)).collect(),
            m: vec![0.0; n],
            v: vec![0.0; n],
            v_max: vec![0.0; n],
            step: 0,
        }
    }

    /// One step with the given (already clipped) gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn step(&mut self, grad: &[f32], lr: f64, beta1: f64, beta2: f64, eps: f64, wd: f64, amsgrad: bool) {
        self.step += 1;
        let t = self.step as i32;
        for (i, &g) in grad.iter().enumerate().take(self.p.len()) {
            let g = f64::from(g);
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = beta1 * self.m[i] + (1.0 - beta1) * g;
            self.v[i] = beta2 * self.v[i] + (1.0 - beta2) * g * g;
            let m_hat = self.m[i] / (1.0 - beta1.powi(t));
            let v_used = if amsgrad {
                self.v_max[i] = self.v_max[i].max(self.v[i]);
                self.v_max[i]
            } else {
                self.v[i]
            };
            let v_hat = v_used / (1.0 - beta2.powi(t));
            self.p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}
