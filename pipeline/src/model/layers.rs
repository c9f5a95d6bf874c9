//! The element-wise layers, forward and backward written out (llm.c style). All buffers are
//! row-major f32; `rows` is the number of tokens.

/// RMSNorm forward: `y[t] = x[t] / rms(x[t]) * w`, `rms = sqrt(mean(x^2) + eps)`.
/// Writes `y [rows, d]` and keeps `inv[t] = 1 / rms(x[t])` for the backward.
pub(crate) fn rmsnorm_forward(y: &mut [f32], inv: &mut [f32], x: &[f32], w: &[f32], d: usize, eps: f32) {
    for ((yr, xr), iv) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(inv.iter_mut()) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        *iv = r;
        for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
            *o = xv * r * wv;
        }
    }
}

/// RMSNorm backward. With `g = dy * w`:
/// `dx = inv * g - x * inv^3 * sum(g * x) / d` (added to `dx`), `dw += sum_t dy * x * inv`.
pub(crate) fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    inv: &[f32],
    d: usize,
) {
    for (((dxr, dyr), xr), &r) in dx.chunks_exact_mut(d).zip(dy.chunks_exact(d)).zip(x.chunks_exact(d)).zip(inv) {
        let mut dot = 0f32;
        for i in 0..d {
            dot += dyr[i] * w[i] * xr[i];
            dw[i] += dyr[i] * xr[i] * r;
        }
        let c = r * r * r * dot / d as f32;
        for i in 0..d {
            dxr[i] += r * dyr[i] * w[i] - xr[i] * c;
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU forward: `h = silu(a) * b`, `silu(a) = a * sigmoid(a)`.
pub(crate) fn swiglu_forward(h: &mut [f32], a: &[f32], b: &[f32]) {
    for ((h, &a), &b) in h.iter_mut().zip(a).zip(b) {
        *h = a * sigmoid(a) * b;
    }
}

/// SwiGLU backward: `da = dh * b * silu'(a)`, `silu'(a) = s (1 + a (1 - s))`; `db = dh * silu(a)`.
pub(crate) fn swiglu_backward(da: &mut [f32], db: &mut [f32], dh: &[f32], a: &[f32], b: &[f32]) {
    for i in 0..dh.len() {
        let s = sigmoid(a[i]);
        da[i] = dh[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
        db[i] = dh[i] * a[i] * s;
    }
}

/// Sigmoid in place (the NSA gates).
pub(crate) fn sigmoid_in_place(x: &mut [f32]) {
    for v in x {
        *v = sigmoid(*v);
    }
}

/// Backward of [`sigmoid_in_place`] from its output `s`: `dx = dy * s * (1 - s)`, in place on `dy`.
pub(crate) fn sigmoid_backward(dy: &mut [f32], s: &[f32]) {
    for (g, &s) in dy.iter_mut().zip(s) {
        *g *= s * (1.0 - s);
    }
}

/// Embedding lookup: `x[t] = table[tokens[t]]` (tokens already checked against the vocab).
pub(crate) fn embed_forward(x: &mut [f32], table: &[f32], tokens: &[u32], d: usize) {
    for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
        row.copy_from_slice(&table[t as usize * d..][..d]);
    }
}

/// Embedding backward: `dtable[tokens[t]] += dx[t]`.
pub(crate) fn embed_backward(dtable: &mut [f32], dx: &[f32], tokens: &[u32], d: usize) {
    for (row, &t) in dx.chunks_exact(d).zip(tokens) {
        for (g, v) in dtable[t as usize * d..][..d].iter_mut().zip(row) {
            *g += v;
        }
    }
}

/// `a += b`.
pub(crate) fn add_into(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}
