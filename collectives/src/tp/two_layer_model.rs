// A 2-layer transformer block sharded over any `Communicator`, shared (through `include!`) by
// the tp tests (`src/tp/tests.rs`, local backend, against an f64 reference) and the MPI check
// (`examples/mpi_check.rs`, over `mpirun` ranks). The includer brings into scope the tp layers
// (`ColumnParallelLinear`, `RowParallelLinear`, `ParallelAttention`, `AttentionWeights`,
// `VocabParallelEmbedding`, `VocabParallelCrossEntropy`, `TpRank`, `TpError`) and
// `Communicator`.
//
// The model: vocab-parallel embedding, then per layer `h = x + attention(x)`,
// `x' = h + W2 gelu(W1 h + b1) + b2` (W1 column-parallel, W2 row-parallel), then a
// column-parallel LM head and the vocab-parallel cross-entropy.

/// Named slices of one flat parameter vector (so finite differences see every parameter).
struct Params {
    ranges: Vec<(&'static str, usize, usize)>,
    len: usize,
}

impl Params {
    fn new(sizes: &[(&'static str, usize)]) -> Self {
        let mut ranges = Vec::new();
        let mut len = 0;
        for &(name, n) in sizes {
            ranges.push((name, len, n));
            len += n;
        }
        Self { ranges, len }
    }

    fn get<'a>(&self, all: &'a [f64], name: &str) -> &'a [f64] {
        let &(_, start, n) = self.ranges.iter().find(|r| r.0 == name).expect("known parameter");
        &all[start..start + n]
    }
}

const VOCAB: usize = 16;
const D_MODEL: usize = 8;
const FFN: usize = 16;
/// (q heads, kv heads, head dim): 2 kv heads, so 4 ranks replicate them and 2 ranks split them.
const HEADS: (usize, usize, usize) = (4, 2, 2);
const LAYERS: usize = 2;
const MODEL_SEQS: [u32; 4] = [0, 4, 5, 9];
const NAMES: [[&str; 8]; LAYERS] = [
    ["wq0", "wk0", "wv0", "wo0", "w1_0", "b1_0", "w2_0", "b2_0"],
    ["wq1", "wk1", "wv1", "wo1", "w1_1", "b1_1", "w2_1", "b2_1"],
];

fn model_params() -> Params {
    let (hq, hkv, hd) = HEADS;
    let mut sizes = vec![("emb", VOCAB * D_MODEL)];
    for names in NAMES {
        let shapes = [
            hq * hd * D_MODEL,
            hkv * hd * D_MODEL,
            hkv * hd * D_MODEL,
            D_MODEL * hq * hd,
            FFN * D_MODEL,
            FFN,
            D_MODEL * FFN,
            D_MODEL,
        ];
        sizes.extend(names.into_iter().zip(shapes));
    }
    sizes.push(("head", VOCAB * D_MODEL));
    Params::new(&sizes)
}

fn gelu(x: f32) -> f32 {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

fn gelu_grad(x: f32) -> f32 {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    let t = (c * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// One rank's layers and weight shards of the model.
struct ShardedLayer {
    attn: ParallelAttention,
    w: AttentionWeights,
    mlp_in: ColumnParallelLinear,
    w1: Vec<f32>,
    b1: Vec<f32>,
    mlp_out: RowParallelLinear,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// The model sharded over `comm`'s ranks: forward, loss, backward, and every gradient gathered
/// back to full size, in the order of [`model_params`]. Returns (logprobs, loss, gradients).
fn sharded_model<C: Communicator>(
    comm: &C,
    p: &Params,
    full: &[f32],
    ids: &[u32],
    targets: &[u32],
) -> std::result::Result<(Vec<f32>, f32, Vec<f32>), TpError> {
    let tp = TpRank::of(comm);
    let get = |name: &str| {
        let &(_, start, n) = p.ranges.iter().find(|r| r.0 == name).unwrap();
        &full[start..start + n]
    };
    let tokens = ids.len();
    let (hq, hkv, hd) = HEADS;
    let emb = VocabParallelEmbedding::new(VOCAB, D_MODEL, tp)?;
    let emb_w = emb.shard_table(get("emb"))?;
    let mut layers = Vec::new();
    for [wq, wk, wv, wo, w1, b1, w2, b2] in NAMES {
        let attn = ParallelAttention::new(D_MODEL, hq, hkv, hd, tp)?;
        let mlp_in = ColumnParallelLinear::new(D_MODEL, FFN, true, tp)?;
        let mlp_out = RowParallelLinear::new(FFN, D_MODEL, true, tp)?;
        layers.push(ShardedLayer {
            w: attn.shard(get(wq), get(wk), get(wv), get(wo))?,
            attn,
            w1: mlp_in.shard_weight(get(w1))?,
            b1: mlp_in.shard_bias(get(b1))?,
            mlp_in,
            w2: mlp_out.shard_weight(get(w2))?,
            b2: get(b2).to_vec(),
            mlp_out,
        });
    }
    let head = ColumnParallelLinear::new(D_MODEL, VOCAB, false, tp)?;
    let head_w = head.shard_weight(get("head"))?;
    let ce = VocabParallelCrossEntropy::new(VOCAB, tp)?;

    // Forward, keeping what backward reads.
    let width = tokens * D_MODEL;
    let mut x = vec![0.0; width];
    emb.forward(comm, ids, &emb_w, &mut x)?;
    let mut saved = Vec::new();
    for l in &layers {
        let mut a = vec![0.0; width];
        let cache = l.attn.forward(comm, &x, &MODEL_SEQS, &l.w, &mut a)?;
        let h = add(&x, &a);
        let mut u = vec![0.0; tokens * l.mlp_in.local_out()];
        l.mlp_in.forward(&h, &l.w1, Some(&l.b1), &mut u)?;
        let g: Vec<f32> = u.iter().map(|&v| gelu(v)).collect();
        let mut m = vec![0.0; width];
        l.mlp_out.forward(comm, &g, &l.w2, Some(&l.b2), &mut m)?;
        let next = add(&h, &m);
        saved.push((x, cache, h, u, g));
        x = next;
    }
    let mut logits = vec![0.0; tokens * head.local_out()];
    head.forward(&x, &head_w, None, &mut logits)?;
    let out = ce.forward(comm, &logits, targets)?;

    // Backward.
    let mut dlogits = vec![0.0; logits.len()];
    ce.backward(&logits, targets, &out.lse, &VocabParallelCrossEntropy::mean_loss_grad(tokens), &mut dlogits)?;
    let mut dx = vec![0.0; width];
    let mut d_head = vec![0.0; head_w.len()];
    head.backward(comm, &x, &head_w, &dlogits, &mut dx, &mut d_head, None)?;
    let mut layer_grads = Vec::new();
    for (l, (x, cache, h, u, g)) in layers.iter().zip(&saved).rev() {
        // x' = h + mlp(h): dh = dx' + mlp backward.
        let (mut dg, mut dw2, mut db2) = (vec![0.0; g.len()], vec![0.0; l.w2.len()], vec![0.0; D_MODEL]);
        l.mlp_out.backward(g, &l.w2, &dx, &mut dg, &mut dw2, Some(&mut db2))?;
        let du: Vec<f32> = dg.iter().zip(u).map(|(d, &u)| d * gelu_grad(u)).collect();
        let (mut dh_mlp, mut dw1, mut db1) = (vec![0.0; width], vec![0.0; l.w1.len()], vec![0.0; l.b1.len()]);
        l.mlp_in.backward(comm, h, &l.w1, &du, &mut dh_mlp, &mut dw1, Some(&mut db1))?;
        let dh = add(&dx, &dh_mlp);
        // h = x + attention(x): dx = dh + attention backward.
        let mut dx_attn = vec![0.0; width];
        let mut dw = l.attn.zeros()?;
        l.attn.backward(comm, x, &MODEL_SEQS, &l.w, cache, &dh, &mut dx_attn, &mut dw)?;
        dx = add(&dh, &dx_attn);
        let dw = l.attn.gather(comm, &dw)?;
        layer_grads.push([
            dw.wq,
            dw.wk,
            dw.wv,
            dw.wo,
            l.mlp_in.gather_weight(comm, &dw1)?,
            l.mlp_in.gather_bias(comm, &db1)?,
            l.mlp_out.gather_weight(comm, &dw2)?,
            db2,
        ]);
    }
    let mut d_emb = vec![0.0; emb_w.len()];
    emb.backward(ids, &dx, &mut d_emb)?;

    let mut grads = emb.gather_table(comm, &d_emb)?;
    for layer in layer_grads.into_iter().rev() {
        for g in layer {
            grads.extend(g);
        }
    }
    grads.extend(head.gather_weight(comm, &d_head)?);
    Ok((out.logprobs, out.loss, grads))
}
