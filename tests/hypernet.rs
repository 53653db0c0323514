//! The hypernetwork on the tiny Llama fixture: shapes and masks of W, gradient coverage of
//! every registered parameter, the factorised pointer head against the naive pair
//! construction, batch-size invariance, independent copies of the initial weights, and the
//! centred subspace input.

mod common;

use candle_core::{D, DType, Tensor};
use hyperdas::data::collate::{CollateOptions, CollatedBatch, collate, encode_rows};
use hyperdas::data::io::{ReadOptions, read_dataset};
use hyperdas::hypernet::{HyperConfig, HyperInput, HyperNetwork, SubspaceInput};
use hyperdas::model::LoadedModel;
use hyperdas::model::rope::apply_rotary;
use hyperdas::params::ParamStore;

use common::*;

fn config() -> HyperConfig {
    HyperConfig {
        num_blocks: 1,
        layer: 1,
        from_scratch: false,
        ablate_source: false,
        ablate_base: false,
        seed: 3,
        freeze: Vec::new(),
        self_bias: 0.0,
        pointer_rope: true,
        pointer_scale: 1.0,
        pointer_states: hyperdas::hypernet::PointerStates::Unit,
        subspace_input: SubspaceInput::Last,
    }
}

fn batch(lm: &LoadedModel, rows: std::ops::Range<usize>) -> CollatedBatch {
    let ds = read_dataset(&fixture("ravel/city_country_test.jsonl"), ReadOptions::default()).unwrap();
    let enc = encode_rows(&lm.tokenizer, &ds.rows[rows], &CollateOptions::default(), "fixture").unwrap();
    collate(&enc.rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id())
}

struct Inputs {
    instruction: hyperdas::model::TokenBatch,
    base_states: Tensor,
    base_mask: Tensor,
    source_states: Tensor,
    source_mask: Tensor,
}

fn inputs(lm: &LoadedModel, c: &CollatedBatch) -> Inputs {
    let dev = lm.model.device();
    let base = c.base_batch(dev).unwrap();
    let source = c.source_batch(dev).unwrap();
    Inputs {
        instruction: c.instruction_batch(dev).unwrap(),
        base_states: lm.model.forward_hidden(&base, None).unwrap().stacked.unwrap(),
        base_mask: CollatedBatch::mask_tensor(&c.base_intervention_mask, c.len(), c.base_len, dev).unwrap(),
        source_states: lm.model.forward_hidden(&source, None).unwrap().stacked.unwrap(),
        source_mask: CollatedBatch::mask_tensor(&c.source_intervention_mask, c.len(), c.source_len, dev).unwrap(),
    }
}

fn run(net: &HyperNetwork, x: &Inputs) -> hyperdas::hypernet::HyperOutput {
    net.forward(&HyperInput { instruction: &x.instruction, base_states: &x.base_states, base_mask: &x.base_mask, source_states: &x.source_states, source_mask: &x.source_mask }).unwrap()
}

#[test]
#[allow(clippy::needless_range_loop)]
fn pointer_weights_are_distributions_that_respect_the_masks() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let mut ps = ParamStore::new();
    let net = HyperNetwork::new(&mut ps, &lm.model, &config()).unwrap();
    let c = batch(&lm, 0..4);
    let x = inputs(&lm, &c);
    let out = run(&net, &x);
    let (b, ts, tb) = (c.len(), c.source_len, c.base_len);
    assert_eq!(out.z.dims(), [b, lm.model.config.hidden_size]);
    assert_eq!(out.w.dims(), [b, ts + 1, tb]);
    let sums = out.w.sum(1).unwrap().to_vec2::<f32>().unwrap();
    assert!(sums.iter().flatten().all(|s| (s - 1.0).abs() < 1e-5), "columns sum to 1");
    let w = out.w.to_vec3::<f32>().unwrap();
    for bi in 0..b {
        for j in 0..tb {
            let base_ok = c.base_intervention_mask[bi * tb + j] == 1;
            for i in 0..ts {
                let src_ok = c.source_intervention_mask[bi * ts + i] == 1;
                if !(base_ok && src_ok) {
                    assert!(w[bi][i][j] < 1e-6, "masked pair ({i}, {j}) of row {bi} has weight {}", w[bi][i][j]);
                }
            }
            if !base_ok {
                assert!((w[bi][ts][j] - 1.0).abs() < 1e-5, "a non-intervenable base column keeps itself");
            }
        }
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let mut ps = ParamStore::new();
    let net = HyperNetwork::new(&mut ps, &lm.model, &config()).unwrap();
    let c = batch(&lm, 0..3);
    let x = inputs(&lm, &c);
    let out = run(&net, &x);
    let loss = (out.w.sqr().unwrap().sum_all().unwrap() + out.z.sum_all().unwrap().sqr().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let report = ps.check_gradients(&grads).unwrap();
    assert!(report.missing.is_empty(), "{report:?}");
    // The target's weights are not parameters.
    assert!(ps.iter().all(|(n, _)| n.starts_with("hypernet.")));
}

#[test]
fn the_factorised_pointer_equals_the_naive_pair_construction() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let mut ps = ParamStore::new();
    let net = HyperNetwork::new(&mut ps, &lm.model, &config()).unwrap();
    let c = batch(&lm, 0..2);
    let x = inputs(&lm, &c);
    let out = run(&net, &x);
    // Naive: P[i,j] = q_combine([hb_j; hs_i]) with q_combine = [A | C] materialised.
    let p = &net.pointer;
    let unit = |t: &Tensor| t.broadcast_div(&(t.sqr().unwrap().sum_keepdim(D::Minus1).unwrap().sqrt().unwrap() + 1e-12).unwrap()).unwrap();
    let l = 1;
    let hb = unit(&x.base_states.narrow(2, l, 1).unwrap().squeeze(2).unwrap()); // [B, Tb, D]
    let hs = unit(&x.source_states.narrow(2, l, 1).unwrap().squeeze(2).unwrap()); // [B, Ts, D]
    let (b, tb, d) = hb.dims3().unwrap();
    let ts = hs.dim(1).unwrap();
    let q_combine = Tensor::cat(&[&p.combine_base.weight, &p.combine_source.weight], 1).unwrap(); // [D, 2D]
    let pairs = Tensor::cat(&[&hb.unsqueeze(1).unwrap().broadcast_as((b, ts, tb, d)).unwrap(), &hs.unsqueeze(2).unwrap().broadcast_as((b, ts, tb, d)).unwrap()], 3).unwrap(); // [B, Ts, Tb, 2D]
    let pf = pairs.reshape((b * ts * tb, 2 * d)).unwrap().matmul(&q_combine.t().unwrap()).unwrap().reshape((b, ts, tb, d)).unwrap();
    let all = Tensor::cat(&[&pf, &hb.unsqueeze(1).unwrap()], 1).unwrap(); // [B, Ts+1, Tb, D]
    let n = (ts + 1) * tb;
    let (h, hkv, hd) = (p.n_heads, p.n_kv_heads, p.head_dim);
    let keys = all.reshape((b * n, d)).unwrap().matmul(&p.k_proj.weight.t().unwrap()).unwrap().reshape((b, n, hkv, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let mut masks = Vec::new();
    let mut pos = Vec::new();
    for bi in 0..b {
        let mut acc = 0;
        for i in 0..=ts {
            for j in 0..tb {
                let m = if i == ts { 1 } else { u32::from(c.base_intervention_mask[bi * tb + j]) * u32::from(c.source_intervention_mask[bi * ts + i]) };
                acc += m;
                masks.push(m);
                pos.push(acc * m);
            }
        }
    }
    let rope = lm.model.rope();
    let (kc, ks) = rope.cos_sin(&pos, b, n, DType::F32, lm.model.device()).unwrap();
    let keys = apply_rotary(&keys, &kc, &ks).unwrap(); // [B, Hkv, N, hd]
    let last: Vec<u32> = c.instruction_attention.chunks(c.instruction_len).map(|r| r.iter().map(|&x| x as u32).sum()).collect();
    let q = out.z.matmul(&p.q_proj.weight.t().unwrap()).unwrap().reshape((b, h, 1, hd)).unwrap();
    let (qc, qs) = rope.cos_sin(&last, b, 1, DType::F32, lm.model.device()).unwrap();
    let q = apply_rotary(&q, &qc, &qs).unwrap();
    let rep = h / hkv;
    let keys_rep = keys.unsqueeze(2).unwrap().broadcast_as((b, hkv, rep, n, hd)).unwrap().reshape((b, h, n, hd)).unwrap();
    let scores = (q.matmul(&keys_rep.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap().squeeze(2).unwrap(); // [B, H, N]
    let mask: Vec<f32> = masks.iter().map(|&m| if m == 1 { 0.0 } else { -1e9 }).collect();
    let scores = scores.broadcast_add(&Tensor::from_vec(mask, (b, 1, n), lm.model.device()).unwrap()).unwrap().mean(1).unwrap();
    let logits = scores.reshape((b, ts + 1, tb)).unwrap();
    let naive = candle_nn::ops::softmax(&logits, 1).unwrap();
    let diff = (naive - &out.w).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "factorised vs naive pointer: {diff}");
}

#[test]
fn batch_size_one_matches_the_batched_result() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let mut ps = ParamStore::new();
    let net = HyperNetwork::new(&mut ps, &lm.model, &config()).unwrap();
    let both = batch(&lm, 0..2);
    let one = batch(&lm, 1..2);
    let wb = run(&net, &inputs(&lm, &both)).w.get(1).unwrap(); // [Ts+1, Tb] padded
    let w1 = run(&net, &inputs(&lm, &one)).w.get(0).unwrap();
    let (rows1, cols1) = w1.dims2().unwrap();
    let (rows, cols) = wb.dims2().unwrap();
    // Unpadded region: the last (rows1-1) source rows + self, the last cols1 base columns.
    let src = wb.narrow(0, rows - rows1, rows1 - 1).unwrap().narrow(1, cols - cols1, cols1).unwrap();
    let selfrow = wb.narrow(0, rows - 1, 1).unwrap().narrow(1, cols - cols1, cols1).unwrap();
    let batched = Tensor::cat(&[&src, &selfrow], 0).unwrap();
    let diff = (batched - w1).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "padding changes W by {diff}");
}

#[test]
fn initial_weights_are_independent_copies_of_the_target_block() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let mut ps = ParamStore::new();
    let net = HyperNetwork::new(&mut ps, &lm.model, &config()).unwrap();
    let target_q = lm.model.layers[0].self_attn.q_proj.weight.to_vec2::<f32>().unwrap();
    let blk = &net.blocks[0];
    for a in [&blk.self_attn, &blk.source_attn, &blk.base_attn] {
        assert_eq!(a.q_proj.weight.to_vec2::<f32>().unwrap(), target_q);
    }
    // Changing one copy changes neither the others nor the target.
    let var = ps.get("hypernet.layers.0.source_attn.q_proj.weight").unwrap();
    var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
    assert_eq!(blk.self_attn.q_proj.weight.to_vec2::<f32>().unwrap(), target_q);
    assert_eq!(blk.base_attn.q_proj.weight.to_vec2::<f32>().unwrap(), target_q);
    assert_eq!(lm.model.layers[0].self_attn.q_proj.weight.to_vec2::<f32>().unwrap(), target_q);
    assert!(blk.source_attn.q_proj.weight.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0);
    // From scratch: not the target's weights; bad settings are clear errors.
    let mut ps2 = ParamStore::new();
    let scratch = HyperNetwork::new(&mut ps2, &lm.model, &HyperConfig { from_scratch: true, ..config() }).unwrap();
    assert_ne!(scratch.blocks[0].self_attn.q_proj.weight.to_vec2::<f32>().unwrap(), target_q);
    let e = HyperNetwork::new(&mut ParamStore::new(), &lm.model, &HyperConfig { num_blocks: 9, ..config() }).err().unwrap().to_string();
    assert!(e.contains("hypernetwork blocks must be"), "{e}");
}

#[test]
fn a_centred_subspace_input_keeps_the_pointer_and_ignores_padding() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let (mut ps_last, mut ps) = (ParamStore::new(), ParamStore::new());
    let last = HyperNetwork::new(&mut ps_last, &lm.model, &config()).unwrap();
    let centred = HyperNetwork::new(&mut ps, &lm.model, &HyperConfig { subspace_input: SubspaceInput::Centered, ..config() }).unwrap();
    let c = batch(&lm, 0..4);
    let x = inputs(&lm, &c);
    assert!(x.instruction.mask().contains(&0), "the fixture's instructions differ in length: the batch has padding");
    let (a, o) = (run(&last, &x), run(&centred, &x));
    // `last`: the subspace reads z. `centered`: the pointer (z, W) is unchanged, the condition is not z.
    assert_eq!(max_abs_diff(&a.condition, &a.z), 0.0);
    assert_eq!(max_abs_diff(&a.z, &o.z), 0.0);
    assert_eq!(max_abs_diff(&a.w, &o.w), 0.0);
    assert!(max_abs_diff(&o.condition, &o.z) > 1e-3);
    // z − condition is the mean over the instruction's own tokens: each row alone (no padding)
    // gives the condition it has in the padded batch.
    let batched = o.condition.to_vec2::<f32>().unwrap(); // [B, D]
    for (i, want) in batched.iter().enumerate() {
        let alone = run(&centred, &inputs(&lm, &batch(&lm, i..i + 1))).condition.to_vec2::<f32>().unwrap();
        let diff = alone[0].iter().zip(want).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "row {i}: alone and batched differ by {diff}");
    }
    // Every parameter still gets a gradient through the condition.
    let loss = (o.w.sqr().unwrap().sum_all().unwrap() + o.condition.sqr().unwrap().sum_all().unwrap()).unwrap();
    let report = ps.check_gradients(&loss.backward().unwrap()).unwrap();
    assert!(report.missing.is_empty(), "{report:?}");
    // The run setting, and a clear error for a wrong value.
    let resolve = |v: &str| hyperdas::experiment::run::resolve_config(hyperdas::hypernet::interpreter::Method::HyperDas, None, None, &[format!("interpreter.subspace_input={v}")]);
    assert_eq!(resolve("centered").unwrap().interpreter.subspace_input, SubspaceInput::Centered);
    let e = resolve("mean").unwrap_err().to_string();
    assert!(e.contains("subspace_input") && e.contains("centered"), "{e}");
}
