//! A small candle transformer trained on CPU twice from the same weights on the same batches:
//! once with candle's composed attention (matmul, masked softmax, `repeat_kv` for GQA) and once
//! with squid's fused attention, switched in one line (`Block::attention`). Prints both loss
//! curves' largest difference and the time per step of each.
//!
//! ```sh
//! cargo run --release -p squid-candle --example train_small -- --steps 300
//! ```
//! The task is copying: the second half of each sequence repeats the first, so only attention
//! can predict it and the loss falls well below ln(vocab) once the model has learnt to look back.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// Model and run sizes.
#[derive(Debug, Clone, Copy)]
struct Config {
    vocab: usize,
    d_model: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    seq: usize,
    batch: usize,
    steps: usize,
    lr: f64,
}

/// Deterministic numbers (a 64-bit LCG), so both runs start from the same weights and batches.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn uniform(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Vec<f32> {
        (0..shape.iter().product::<usize>()).map(|_| self.uniform() * scale).collect()
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Attention {
    Candle,
    Squid,
}

struct Block {
    wq: Var,
    wk: Var,
    wv: Var,
    wo: Var,
    w1: Var,
    w2: Var,
}

struct Model {
    cfg: Config,
    embed: Var,
    pos: Var,
    blocks: Vec<Block>,
    head: Var,
    attention: Attention,
}

fn var(data: Vec<f32>, shape: &[usize]) -> Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// `x / rms(x)` over the last dim (no learnt gain: enough for this example).
fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-6)?.sqrt()?)
}

/// candle's composed attention: `q [B, T, HQ, D]`, `k, v [B, T, HKV, D]`, causal.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, t, hq, d) = q.dims4()?;
    let hkv = k.dim(2)?;
    let repeat_kv = |x: &Tensor| -> Result<Tensor> {
        // [B, T, HKV, D] -> [B, HQ, T, D], each kv head repeated for its query heads.
        let x = x.transpose(1, 2)?.contiguous()?;
        x.unsqueeze(2)?.broadcast_as((b, hkv, hq / hkv, t, d))?.reshape((b, hq, t, d))
    };
    let q = q.transpose(1, 2)?.contiguous()?;
    let (k, v) = (repeat_kv(k)?, repeat_kv(v)?);
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (t, t), q.device())?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    p.matmul(&v)?.transpose(1, 2)
}

impl Model {
    fn new(cfg: Config, attention: Attention) -> Result<Self> {
        let mut rng = Lcg(42);
        let (dm, dh) = (cfg.d_model, cfg.d_model / cfg.heads);
        let s = 1.0 / (dm as f32).sqrt();
        let mut blocks = Vec::new();
        for _ in 0..cfg.layers {
            blocks.push(Block {
                wq: var(rng.tensor(&[dm, dm], s), &[dm, dm])?,
                wk: var(rng.tensor(&[dm, cfg.kv_heads * dh], s), &[dm, cfg.kv_heads * dh])?,
                wv: var(rng.tensor(&[dm, cfg.kv_heads * dh], s), &[dm, cfg.kv_heads * dh])?,
                wo: var(rng.tensor(&[dm, dm], s), &[dm, dm])?,
                w1: var(rng.tensor(&[dm, 4 * dm], s), &[dm, 4 * dm])?,
                w2: var(rng.tensor(&[4 * dm, dm], s / 2.0), &[4 * dm, dm])?,
            });
        }
        Ok(Self {
            cfg,
            embed: var(rng.tensor(&[cfg.vocab, dm], 1.0), &[cfg.vocab, dm])?,
            pos: var(rng.tensor(&[cfg.seq, dm], 0.5), &[cfg.seq, dm])?,
            blocks,
            head: var(rng.tensor(&[dm, cfg.vocab], s), &[dm, cfg.vocab])?,
            attention,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.embed.clone(), self.pos.clone(), self.head.clone()];
        for b in &self.blocks {
            v.extend([&b.wq, &b.wk, &b.wv, &b.wo, &b.w1, &b.w2].map(|x| x.clone()));
        }
        v
    }

    /// Logits `[B * T, vocab]` of token ids `[B, T]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let c = self.cfg;
        let (b, t) = ids.dims2()?;
        let dh = c.d_model / c.heads;
        let mut x = self.embed.as_tensor().embedding(&ids.flatten_all()?)?.reshape((b, t, c.d_model))?;
        x = x.broadcast_add(&self.pos.as_tensor().narrow(0, 0, t)?)?;
        for blk in &self.blocks {
            let h = rms_norm(&x)?.reshape((b * t, c.d_model))?;
            let q = h.matmul(blk.wq.as_tensor())?.reshape((b, t, c.heads, dh))?;
            let k = h.matmul(blk.wk.as_tensor())?.reshape((b, t, c.kv_heads, dh))?;
            let v = h.matmul(blk.wv.as_tensor())?.reshape((b, t, c.kv_heads, dh))?;
            // The one line that picks the attention: squid's fused op or candle's composed one.
            let o = match self.attention {
                Attention::Squid => squid_candle::flash_attn(&q, &k, &v, &squid_candle::AttentionOptions::causal())?,
                Attention::Candle => candle_attention(&q, &k, &v)?,
            };
            let o = o.reshape((b * t, c.d_model))?.matmul(blk.wo.as_tensor())?;
            x = (x + o.reshape((b, t, c.d_model))?)?;
            let h = rms_norm(&x)?.reshape((b * t, c.d_model))?;
            let m = h.matmul(blk.w1.as_tensor())?.gelu()?.matmul(blk.w2.as_tensor())?;
            x = (x + m.reshape((b, t, c.d_model))?)?;
        }
        rms_norm(&x)?.reshape((b * t, c.d_model))?.matmul(self.head.as_tensor())
    }
}

/// Batch `step`: `[B, T]` ids whose second half copies the first; targets are the next ids.
fn batch(cfg: &Config, step: usize) -> Result<(Tensor, Tensor)> {
    let mut rng = Lcg(1000 + step as u64);
    let half = (cfg.seq + 1).div_ceil(2);
    let mut ids: Vec<u32> = Vec::with_capacity(cfg.batch * (cfg.seq + 1));
    for _ in 0..cfg.batch {
        let first: Vec<u32> = (0..half).map(|_| (rng.next() % cfg.vocab as u64) as u32).collect();
        ids.extend(first.iter().chain(first.iter()).take(cfg.seq + 1));
    }
    let all = Tensor::from_vec(ids, (cfg.batch, cfg.seq + 1), &Device::Cpu)?;
    Ok((all.narrow(1, 0, cfg.seq)?, all.narrow(1, 1, cfg.seq)?.flatten_all()?))
}

/// Trains one model; returns its loss per step and the seconds per step (median).
fn train(cfg: Config, attention: Attention) -> Result<(Vec<f32>, f64)> {
    let model = Model::new(cfg, attention)?;
    let params = ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..ParamsAdamW::default() };
    let mut opt = AdamW::new(model.vars(), params)?;
    let (mut losses, mut times) = (Vec::new(), Vec::new());
    for step in 0..cfg.steps {
        let (ids, targets) = batch(&cfg, step)?;
        let start = Instant::now();
        let loss = candle_nn::loss::cross_entropy(&model.forward(&ids)?, &targets)?;
        opt.backward_step(&loss)?;
        times.push(start.elapsed().as_secs_f64());
        losses.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    }
    times.sort_by(f64::total_cmp);
    Ok((losses, times.get(times.len() / 2).copied().unwrap_or(0.0)))
}

fn main() -> Result<()> {
    let mut cfg =
        Config { vocab: 32, d_model: 64, heads: 4, kv_heads: 2, layers: 2, seq: 64, batch: 8, steps: 300, lr: 3e-3 };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a positive integer");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--steps" => cfg.steps = value("--steps"),
            "--seq" => cfg.seq = value("--seq").max(2),
            "--batch" => cfg.batch = value("--batch").max(1),
            _ => {
                eprintln!("usage: train_small [--steps N] [--seq T] [--batch B]");
                std::process::exit(2)
            }
        }
    }
    println!("{cfg:?}");
    let (candle_loss, candle_s) = train(cfg, Attention::Candle)?;
    let (squid_loss, squid_s) = train(cfg, Attention::Squid)?;
    let max_diff = candle_loss.iter().zip(&squid_loss).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let mut shown: Vec<usize> = (0..cfg.steps).step_by((cfg.steps / 10).max(1)).collect();
    shown.extend(cfg.steps.checked_sub(1).filter(|last| shown.last() != Some(last)));
    for step in shown {
        println!("step {step:>5}  loss candle {:.5}  squid {:.5}", candle_loss[step], squid_loss[step]);
    }
    println!("max |loss difference| over {} steps: {max_diff:.3e}", cfg.steps);
    println!(
        "median time per step: candle {:.2} ms, squid {:.2} ms, candle / squid = {:.2}",
        candle_s * 1e3,
        squid_s * 1e3,
        candle_s / squid_s
    );
    Ok(())
}
