//! Paged KV against a plain model (one `Vec` per sequence and layer), over random operation
//! sequences, plus the sharing and copy-on-write facts spelled out.

use super::*;
use half::f16;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn cfg(page_size: usize, num_pages: usize) -> PagedKvConfig {
    PagedKvConfig { layers: 2, kv_heads: 2, head_dim: 3, page_size, num_pages }
}

/// `[layers, n, kv_heads, head_dim]` of distinct values derived from `seed`.
fn rows(config: &PagedKvConfig, n: usize, seed: u32) -> Vec<f32> {
    (0..config.layers * n * config.row_len()).map(|i| (seed * 1000 + i as u32) as f32).collect()
}

#[test]
fn fork_shares_pages_and_writes_copy_one_page() {
    let c = cfg(4, 16);
    let mut kv = PagedKv::<f32>::new(c).unwrap();
    let prompt = kv.allocate();
    kv.append(prompt, &rows(&c, 10, 1), &rows(&c, 10, 2)).unwrap(); // pages: 4 + 4 + 2
    assert_eq!(kv.free_pages(), 13);
    let samples: Vec<SeqId> = (0..4).map(|_| kv.fork(prompt).unwrap()).collect();
    assert_eq!(kv.free_pages(), 13, "forks take no pages");
    for &s in &samples {
        assert_eq!(kv.page_table(s).unwrap(), kv.page_table(prompt).unwrap());
    }
    assert_eq!(kv.page_refcount(kv.page_table(prompt).unwrap()[0]), 5);
    // Sample 0 generates one token: its partly filled last page is copied, nothing else.
    let before = kv.gather(prompt, 1).unwrap();
    kv.append(samples[0], &rows(&c, 1, 3), &rows(&c, 1, 4)).unwrap();
    assert_eq!(kv.free_pages(), 12);
    let (t0, tp) = (kv.page_table(samples[0]).unwrap().to_vec(), kv.page_table(prompt).unwrap().to_vec());
    assert_eq!(t0[..2], tp[..2]);
    assert_ne!(t0[2], tp[2]);
    assert_eq!(kv.gather(prompt, 1).unwrap(), before, "the prompt is unchanged");
    let (k0, _) = kv.gather(samples[0], 1).unwrap();
    assert_eq!(k0[..before.0.len()], before.0[..]);
    assert_eq!(k0[before.0.len()..], rows(&c, 1, 3)[c.row_len()..]);
    // Freeing the prompt and all samples returns every page.
    kv.free(prompt).unwrap();
    assert_eq!(kv.free_pages(), 12, "the samples still hold the prompt's pages");
    for s in samples {
        kv.free(s).unwrap();
    }
    assert_eq!(kv.free_pages(), 16);
}

#[test]
fn view_reads_pages_in_place() {
    let c = cfg(3, 8);
    let mut kv = PagedKv::<f16>::new(c).unwrap();
    let s = kv.allocate();
    let k: Vec<f16> = rows(&c, 7, 5).iter().map(|&x| f16::from_f32(x / 64.0)).collect();
    let v: Vec<f16> = rows(&c, 7, 6).iter().map(|&x| f16::from_f32(-x / 64.0)).collect();
    kv.append(s, &k, &v).unwrap();
    let view = kv.view(s, 1).unwrap();
    let row = c.row_len();
    let layer1 = 7 * row..14 * row;
    for pos in 0..7 {
        assert_eq!(view.key(pos), &k[layer1.clone()][pos * row..(pos + 1) * row]);
        assert_eq!(view.value(pos), &v[layer1.clone()][pos * row..(pos + 1) * row]);
    }
    let chunks: Vec<_> = view.chunks().map(|(start, kc, _)| (start, kc.len() / row)).collect();
    assert_eq!(chunks, vec![(0, 3), (3, 3), (6, 1)]);
    assert_eq!(view.page_table.len(), 3);
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    assert!(matches!(PagedKv::<f32>::new(cfg(0, 4)), Err(Error::InvalidConfig(_))));
    let c = cfg(4, 3);
    let mut kv = PagedKv::<f32>::new(c).unwrap();
    let s = kv.allocate();
    kv.append(s, &rows(&c, 6, 1), &rows(&c, 6, 1)).unwrap();
    let f = kv.fork(s).unwrap();
    // 6 more rows: 2 in the shared last page (copied) + 1 new page = 2 pages, 1 free.
    let err = kv.append(f, &rows(&c, 6, 2), &rows(&c, 6, 2)).unwrap_err();
    assert!(matches!(err, Error::OutOfPages { needed: 2, free: 1 }), "{err}");
    assert_eq!((kv.len(f).unwrap(), kv.free_pages()), (6, 1));
    assert!(matches!(kv.append(s, &rows(&c, 1, 1), &rows(&c, 2, 1)), Err(Error::ShapeMismatch(_))));
    assert!(matches!(kv.append(s, &[1.0; 5], &[1.0; 5]), Err(Error::ShapeMismatch(_))));
    assert!(matches!(kv.write(s, 0, 5, &[0.0; 12], &[0.0; 12]), Err(Error::OutOfRange(_))));
    assert!(matches!(kv.write(s, 2, 0, &[0.0; 6], &[0.0; 6]), Err(Error::OutOfRange(_))));
    assert!(matches!(kv.truncate(s, 7), Err(Error::OutOfRange(_))));
    assert!(matches!(kv.view(s, 2), Err(Error::OutOfRange(_))));
    kv.free(s).unwrap();
    assert!(matches!(kv.free(s), Err(Error::UnknownSequence(_))));
    assert!(matches!(kv.len(s), Err(Error::UnknownSequence(_))));
    assert!(matches!(kv.fork(s), Err(Error::UnknownSequence(_))));
    assert!(matches!(kv.append(s, &[], &[]), Err(Error::UnknownSequence(_))));
}

#[derive(Debug, Clone)]
enum Op {
    Allocate,
    Append {
        seq: usize,
        n: usize,
    },
    Fork {
        seq: usize,
    },
    Free {
        seq: usize,
    },
    /// Overwrite rows of one layer somewhere inside the sequence.
    Write {
        seq: usize,
        layer: usize,
        at: usize,
        n: usize,
    },
    Truncate {
        seq: usize,
        keep: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Allocate),
        4 => (0usize..8, 0usize..12).prop_map(|(seq, n)| Op::Append { seq, n }),
        2 => (0usize..8).prop_map(|seq| Op::Fork { seq }),
        1 => (0usize..8).prop_map(|seq| Op::Free { seq }),
        2 => (0usize..8, 0usize..2, 0usize..100, 1usize..6).prop_map(|(seq, layer, at, n)| Op::Write { seq, layer, at, n }),
        1 => (0usize..8, 0usize..100).prop_map(|(seq, keep)| Op::Truncate { seq, keep }),
    ]
}

/// The model: per sequence, per layer, contiguous K and V.
type Model = BTreeMap<SeqId, Vec<(Vec<f32>, Vec<f32>)>>;

fn check_against_model(kv: &PagedKv<f32>, model: &Model) {
    let c = kv.config();
    for (&id, layers) in model {
        for (layer, (mk, mv)) in layers.iter().enumerate() {
            assert_eq!(kv.len(id).unwrap() * c.row_len(), mk.len());
            let (k, v) = kv.gather(id, layer).unwrap();
            assert_eq!(&k, mk, "seq {id:?} layer {layer} K");
            assert_eq!(&v, mv, "seq {id:?} layer {layer} V");
        }
        assert_eq!(kv.page_table(id).unwrap().len(), kv.len(id).unwrap().div_ceil(c.page_size));
    }
    assert_eq!(kv.sequences().collect::<Vec<_>>(), model.keys().copied().collect::<Vec<_>>());
    // Page accounting: refcounts are the number of page-table entries naming each page.
    let mut uses = vec![0u32; c.num_pages];
    for id in kv.sequences() {
        for &p in kv.page_table(id).unwrap() {
            uses[p as usize] += 1;
        }
    }
    for (p, &u) in uses.iter().enumerate() {
        assert_eq!(kv.page_refcount(p as u32), u, "page {p}");
    }
    assert_eq!(kv.free_pages(), uses.iter().filter(|&&u| u == 0).count());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_match_a_vec_per_sequence(page_size in 1usize..6, num_pages in 1usize..24,
                                                  ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let c = cfg(page_size, num_pages);
        let row = c.row_len();
        let mut kv = PagedKv::<f32>::new(c).unwrap();
        let mut model = Model::new();
        // Every id ever handed out, freed ones included, so stale ids get tried too.
        let mut ids: Vec<SeqId> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let seed = step as u32 + 1;
            let pick = |i: usize| ids.get(i % ids.len().max(1)).copied();
            match op {
                Op::Allocate => {
                    let id = kv.allocate();
                    ids.push(id);
                    model.insert(id, vec![(Vec::new(), Vec::new()); c.layers]);
                }
                Op::Append { seq, n } => {
                    let Some(id) = pick(seq) else { continue };
                    let (k, v) = (rows(&c, n, seed), rows(&c, n, seed + 500));
                    let free_before = kv.free_pages();
                    match kv.append(id, &k, &v) {
                        Ok(range) => {
                            let m = model.get_mut(&id).expect("append succeeded on a live sequence");
                            prop_assert_eq!(range.len(), n);
                            for (layer, (mk, mv)) in m.iter_mut().enumerate() {
                                mk.extend_from_slice(&k[layer * n * row..(layer + 1) * n * row]);
                                mv.extend_from_slice(&v[layer * n * row..(layer + 1) * n * row]);
                            }
                        }
                        Err(Error::UnknownSequence(_)) => prop_assert!(!model.contains_key(&id)),
                        Err(Error::OutOfPages { needed, free }) => {
                            prop_assert_eq!(free, free_before);
                            prop_assert!(needed > free);
                        }
                        Err(e) => prop_assert!(false, "unexpected {}", e),
                    }
                }
                Op::Fork { seq } => {
                    let Some(id) = pick(seq) else { continue };
                    match kv.fork(id) {
                        Ok(new) => {
                            ids.push(new);
                            let copy = model[&id].clone();
                            model.insert(new, copy);
                        }
                        Err(Error::UnknownSequence(_)) => prop_assert!(!model.contains_key(&id)),
                        Err(e) => prop_assert!(false, "unexpected {}", e),
                    }
                }
                Op::Free { seq } => {
                    let Some(id) = pick(seq) else { continue };
                    let known = model.remove(&id).is_some();
                    prop_assert_eq!(kv.free(id).is_ok(), known);
                }
                Op::Write { seq, layer, at, n } => {
                    let Some(id) = pick(seq) else { continue };
                    let Some(len) = model.get(&id).map(|m| m[0].0.len() / row) else { continue };
                    if len == 0 {
                        continue;
                    }
                    let start = at % len;
                    let n = n.min(len - start);
                    let k: Vec<f32> = (0..n * row).map(|i| -((seed * 1000) as f32) - i as f32).collect();
                    let v: Vec<f32> = k.iter().map(|x| x - 0.5).collect();
                    let free_before = kv.free_pages();
                    match kv.write(id, layer, start, &k, &v) {
                        Ok(()) => {
                            let (mk, mv) = &mut model.get_mut(&id).unwrap()[layer];
                            mk[start * row..(start + n) * row].copy_from_slice(&k);
                            mv[start * row..(start + n) * row].copy_from_slice(&v);
                        }
                        Err(Error::OutOfPages { needed, free }) => {
                            prop_assert_eq!(free, free_before);
                            prop_assert!(needed > free);
                        }
                        Err(e) => prop_assert!(false, "unexpected {}", e),
                    }
                }
                Op::Truncate { seq, keep } => {
                    let Some(id) = pick(seq) else { continue };
                    let Some(len) = model.get(&id).map(|m| m[0].0.len() / row) else { continue };
                    let keep = keep % (len + 1);
                    kv.truncate(id, keep).unwrap();
                    for (mk, mv) in model.get_mut(&id).unwrap() {
                        mk.truncate(keep * row);
                        mv.truncate(keep * row);
                    }
                }
            }
            check_against_model(&kv, &model);
        }
    }
}

/// A GRPO group: one prompt prefilled once, forked to 3 samples that each append their own
/// tokens (copy on write of the shared partial page). squid-attention's paged decode over the
/// samples' views, read in place, equals dense decode over gathered contiguous copies.
#[test]
fn attention_decodes_forked_sequences_through_their_pages() {
    use squid_attention::dense::{decode, decode_paged, DenseConfig};
    use squid_attention::Heads;

    let c = PagedKvConfig { layers: 2, kv_heads: 2, head_dim: 8, page_size: 5, num_pages: 64 };
    let mut kv = PagedKv::<f32>::new(c).unwrap();
    let value =
        |i: usize, seed: u32| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0;
    let block = |n: usize, seed: u32| -> Vec<f32> { (0..c.layers * n * c.row_len()).map(|i| value(i, seed)).collect() };
    let prompt = kv.allocate();
    kv.append(prompt, &block(13, 1), &block(13, 2)).unwrap();
    let samples: Vec<SeqId> = (0..3).map(|_| kv.fork(prompt).unwrap()).collect();
    for (i, &s) in samples.iter().enumerate() {
        let n = 2 + 3 * i;
        kv.append(s, &block(n, 10 + i as u32), &block(n, 20 + i as u32)).unwrap();
    }
    let cfg = DenseConfig::causal(Heads::new(4, 2, 8, 8));
    let q: Vec<f32> = (0..samples.len() * 4 * 8).map(|i| value(i, 99)).collect();
    let cu_q: Vec<u32> = (0..=samples.len() as u32).collect();
    for layer in 0..c.layers {
        let views: Vec<_> = samples.iter().map(|&s| kv.view(s, layer).unwrap()).collect();
        let got = decode_paged(&cfg, &q, &views, &cu_q).unwrap();
        let (mut k, mut v, mut cu_k) = (Vec::new(), Vec::new(), vec![0u32]);
        for &s in &samples {
            let (ks, vs) = kv.gather(s, layer).unwrap();
            cu_k.push(cu_k.last().unwrap() + (ks.len() / c.row_len()) as u32);
            k.extend(ks);
            v.extend(vs);
        }
        let expect = decode(&cfg, &q, &k, &v, &cu_q, &cu_k).unwrap();
        assert_eq!(got, expect, "layer {layer}");
    }
}
