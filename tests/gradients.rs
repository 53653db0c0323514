//! Gradients flow through the frozen target to the residual stream, exactly; the frozen
//! target stores none; the no-gradient guard catches detached parameters; and the centred
//! subspace input differentiates exactly.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use common::*;
use hyperdas::model::TokenBatch;
use hyperdas::params::ParamStore;

fn batch(lm: &hyperdas::model::LoadedModel) -> TokenBatch {
    let rows: Vec<Vec<u32>> = ["Paris is a city in the country of", "Tokyo is in"].iter().map(|p| lm.tokenizer.encode_prompt(p).unwrap()).collect();
    TokenBatch::left_padded(&rows, lm.tokenizer.padding_id(), &Device::Cpu).unwrap()
}

/// loss(resid) = Σ logits[last two positions] ⊙ w, with resid entering block `layer`.
fn loss_from(lm: &hyperdas::model::LoadedModel, b: &TokenBatch, layer: usize, resid: &Tensor, w: &Tensor) -> Tensor {
    let ctx = lm.model.context(b).unwrap();
    let out = lm.model.forward_from(layer, resid, &ctx).unwrap();
    let t = b.dims().1 as u32;
    let positions = Tensor::new(&[[t - 2, t - 1], [t - 2, t - 1]], &Device::Cpu).unwrap();
    lm.model.logits_at(&out, &positions).unwrap().mul(w).unwrap().sum_all().unwrap()
}

#[test]
fn finite_differences_match_backprop_through_two_frozen_blocks() {
    finite_differences_match_backprop(&load(&fixture("tiny-llama"), DType::F64), 1);
}

#[test]
fn finite_differences_match_backprop_through_gemma3_blocks() {
    // Sliding and global layers, q/k norms, GeGLU, and the final norm (blocks 1..6).
    finite_differences_match_backprop(&load(&fixture("tiny-gemma3"), DType::F64), 1);
}

#[test]
fn finite_differences_match_backprop_through_gemma3_with_rope_scaling_and_soft_capped_logits() {
    let dir = copy_dir(&fixture("tiny-gemma3"));
    std::fs::copy(fixture("tiny-gemma3-variant-config.json"), dir.path().join("config.json")).unwrap();
    finite_differences_match_backprop(&load(dir.path(), DType::F64), 2);
}

#[test]
fn finite_differences_match_backprop_through_the_other_families_blocks() {
    // Gemma 2's capped scores (tanh), OLMo 2's output and whole-projection q/k norms, Qwen 3's
    // per-head q/k norms, Mistral's window, Phi 3's split projections.
    for name in ["tiny-gemma2", "tiny-olmo2", "tiny-qwen3", "tiny-mistral", "tiny-phi3"] {
        finite_differences_match_backprop(&load(&fixture(name), DType::F64), 1);
    }
}

fn finite_differences_match_backprop(lm: &hyperdas::model::LoadedModel, layer: usize) {
    // f64 end to end, so central differences are accurate to ~1e-9.
    let b = batch(lm);
    let (bs, t) = b.dims();
    let clean = lm.model.forward_hidden(&b, Some(&[layer])).unwrap().stacked.unwrap().squeeze(2).unwrap(); // [B, T, D]
    let w = Tensor::randn(0f64, 1.0, (bs, 2, lm.model.config.vocab_size), &Device::Cpu).unwrap();
    let var = Var::from_tensor(&clean).unwrap();
    let grads = loss_from(lm, &b, layer, var.as_tensor(), &w).backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient reaches the residual stream");
    let g: Vec<Vec<Vec<f64>>> = g.to_vec3().unwrap();
    let base: Vec<f64> = clean.flatten_all().unwrap().to_vec1().unwrap();
    let d = lm.model.hidden_size();
    let eps = 1e-5;
    let mut checked = 0;
    let mut max_grad: f64 = 0.0;
    // Positions: the first real token of row 1 (after its padding), mid and last of row 0,
    // and a pad position of row 1 (gradient exactly 0).
    let pad_row1 = b.mask()[t..].iter().take_while(|&&m| m == 0).count();
    for (row, pos) in [(0, 0), (0, t / 2), (0, t - 1), (1, pad_row1), (1, t - 1), (1, 0)] {
        for dim in [0, 7, d / 2, d - 1] {
            let idx = (row * t + pos) * d + dim;
            let bump = |s: f64| {
                let mut v = base.clone();
                v[idx] += s;
                let x = Tensor::from_vec(v, (bs, t, d), &Device::Cpu).unwrap();
                loss_from(lm, &b, layer, &x, &w).to_scalar::<f64>().unwrap()
            };
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
            let an = g[row][pos][dim];
            max_grad = max_grad.max(an.abs());
            assert!((fd - an).abs() <= 1e-6 * an.abs().max(1.0), "row {row} pos {pos} dim {dim}: finite difference {fd} vs backprop {an}");
            checked += 1;
        }
    }
    assert!(pad_row1 > 0, "row 1 should be padded");
    assert!(max_grad > 1e-3, "gradients are suspiciously small ({max_grad})");
    assert_eq!(checked, 24);
}

#[test]
fn frozen_target_has_no_variables_and_receives_no_gradients() {
    let lm = load(&fixture("tiny-qwen2"), DType::F32);
    let b = batch(&lm);
    let named = lm.model.named_tensors();
    assert!(named.len() > 10);
    for (name, t) in &named {
        assert!(!t.is_variable(), "{name} is a Var: the target must be frozen");
    }
    let clean = lm.model.forward_hidden(&b, Some(&[1])).unwrap().stacked.unwrap().squeeze(2).unwrap();
    let var = Var::from_tensor(&clean).unwrap();
    let w = Tensor::randn(0f32, 1.0, (2, 2, lm.model.config.vocab_size), &Device::Cpu).unwrap();
    let grads = loss_from(&lm, &b, 1, var.as_tensor(), &w).backward().unwrap();
    assert!(grads.get(var.as_tensor()).is_some());
    for (name, t) in &named {
        assert!(grads.get(t).is_none(), "a gradient was stored for frozen weight {name}");
    }
}

/// A miniature intervention with two trainable parameters: a vector written into the residual
/// at chosen positions, and a gate mixing it with the clean value. Both must get gradients.
#[test]
fn every_trainable_parameter_receives_a_gradient() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let b = batch(&lm);
    let (bs, t) = b.dims();
    let d = lm.model.hidden_size();
    let mut params = ParamStore::new();
    let v = params.add("intervention.vector", Tensor::randn(0f32, 1.0, d, &Device::Cpu).unwrap()).unwrap();
    let gate = params.add("intervention.gate", Tensor::new(&[0.3f32], &Device::Cpu).unwrap()).unwrap();
    assert_eq!(params.num_elements(), d + 1);

    let layer = 1;
    let clean = lm.model.forward_hidden(&b, Some(&[layer])).unwrap().stacked.unwrap().squeeze(2).unwrap(); // [B, T, D]
    let mut m = vec![0u8; bs * t];
    m[t - 1] = 1;
    m[2 * t - 1] = 1;
    let pos_mask = Tensor::from_vec(m, (bs, t, 1), &Device::Cpu).unwrap().broadcast_as((bs, t, d)).unwrap();
    let g = candle_nn::ops::sigmoid(gate.as_tensor()).unwrap(); // [1]
    let written = v.as_tensor().reshape((1, 1, d)).unwrap().broadcast_mul(&g.reshape((1, 1, 1)).unwrap()).unwrap().broadcast_as((bs, t, d)).unwrap();
    let resid = pos_mask.where_cond(&written, &clean).unwrap(); // [B, T, D]
    let w = Tensor::randn(0f32, 1.0, (bs, 2, lm.model.config.vocab_size), &Device::Cpu).unwrap();
    let grads = loss_from(&lm, &b, layer, &resid, &w).backward().unwrap();
    let report = params.check_gradients(&grads).expect("all parameters get gradients");
    assert!(report.all_zero.is_empty(), "{report:?}");
}

/// The guard must be able to fail: a parameter behind candle's fused softmax (no backward),
/// and one that is never used, are both reported by name.
#[test]
fn the_gradient_guard_catches_detached_and_unused_parameters() {
    let mut params = ParamStore::new();
    let ok = params.add("used", Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
    let fused = params.add("behind_fused_softmax", Tensor::new(&[[0.1f32, 0.2, 0.3]], &Device::Cpu).unwrap()).unwrap();
    let _unused = params.add("unused", Tensor::new(&[5f32], &Device::Cpu).unwrap()).unwrap();
    let detached = candle_nn::ops::softmax_last_dim(fused.as_tensor()).unwrap(); // no backward in candle 0.11
    let composed_ok = candle_nn::ops::softmax(fused.as_tensor(), D::Minus1).unwrap();
    let loss = (ok.as_tensor().sqr().unwrap().sum_all().unwrap() + detached.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let err = params.check_gradients(&grads).unwrap_err().to_string();
    assert!(err.contains("behind_fused_softmax") && err.contains("unused") && !err.contains("used,"), "{err}");
    assert!(err.contains("2 of 3"), "{err}");
    // With the composed softmax the same parameter is connected.
    let loss2 = (composed_ok.mul(&Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap() + ok.as_tensor().sum_all().unwrap()).unwrap();
    let report = params.gradient_report(&loss2.backward().unwrap()).unwrap();
    assert_eq!(report.missing, vec!["unused".to_string()]);
    // Registering a name twice, or an integer tensor, is refused.
    assert!(params.add("used", Tensor::new(&[1f32], &Device::Cpu).unwrap()).is_err());
    assert!(params.add("ints", Tensor::new(&[1u32], &Device::Cpu).unwrap()).is_err());
}

#[test]
fn finite_differences_match_backprop_through_the_centred_subspace_input() {
    // `interpreter.subspace_input = "centered"`: z − the mean of the instruction's visible
    // states (hypernet::centered_last), in f64 so central differences are accurate to ~1e-9.
    let (bs, t, d) = (2, 5, 3);
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f64, 1.0, (bs, t, d), &dev).unwrap(); // [B, T, D]
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &dev).unwrap(); // [B, T], row 1 left-padded
    let r = Tensor::randn(0f64, 1.0, (bs, d), &dev).unwrap(); // [B, D]
    let loss = |x: &Tensor| hyperdas::hypernet::centered_last(x, &mask).unwrap().mul(&r).unwrap().sum_all().unwrap();
    let var = Var::from_tensor(&x0).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g: Vec<f64> = grads.get(var.as_tensor()).expect("gradient reaches the instruction states").flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-5;
    for (idx, an) in g.iter().enumerate() {
        let bump = |s: f64| {
            let mut v = base.clone();
            v[idx] += s;
            loss(&Tensor::from_vec(v, (bs, t, d), &dev).unwrap()).to_scalar::<f64>().unwrap()
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        assert!((fd - an).abs() <= 1e-8, "element {idx}: finite difference {fd} vs backprop {an}");
    }
    // Exactly what it should be: the padding gets no gradient; a visible non-last state of row 1
    // gets −r/3, its last state r·(1 − 1/3).
    let at = |row: usize, pos: usize, dim: usize| g[(row * t + pos) * d + dim];
    let rv: Vec<Vec<f64>> = r.to_vec2().unwrap();
    for (dim, (r0, r1)) in rv[0].iter().zip(&rv[1]).enumerate() {
        assert_eq!(at(1, 0, dim), 0.0);
        assert_eq!(at(1, 1, dim), 0.0);
        assert!((at(1, 2, dim) + r1 / 3.0).abs() < 1e-12);
        assert!((at(1, 4, dim) - r1 * 2.0 / 3.0).abs() < 1e-12);
        assert!((at(0, 0, dim) + r0 / 5.0).abs() < 1e-12);
    }
}
