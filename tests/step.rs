//! The efficient intervened step (clean passes reused, blocks l..L only, logits at label
//! positions only) equals a naive full-model implementation (hooked full pass, logits at every
//! position) in loss and in every parameter's gradient, on the tiny Llama fixture.

mod common;

use candle_core::{DType, Tensor};
use hyperdas::data::collate::{CollateOptions, IGNORE_INDEX, collate, encode_rows};
use hyperdas::data::io::{ReadOptions, read_dataset};
use hyperdas::experiment::loss::prediction_loss;
use hyperdas::hypernet::interpreter::{Interpreter, InterpreterConfig};
use hyperdas::hypernet::subspace::SubspaceKind;
use hyperdas::hypernet::{HyperConfig, HyperInput};
use hyperdas::intervention::mix::mix_positions;
use hyperdas::intervention::selection::InferenceMode;
use hyperdas::model::llama::softmax_last_dim;
use hyperdas::params::ParamStore;

use common::*;

const LIMIT: usize = 3;
const CAUSAL: f32 = 3.5;
const ISOLATE: f32 = 0.5;

/// The naive loss: log-softmax over the logits of every position, then the weighted mean of
/// the log-probabilities of the first `LIMIT` label tokens of each row (row `bi` weighted
/// `weight(bi)`), each read at the position before its label.
fn naive_label_loss(logits: &Tensor, batch: &hyperdas::data::CollatedBatch, weight: impl Fn(usize) -> f32) -> Tensor {
    let (b, tb, v) = logits.dims3().unwrap(); // [B, T_b, V]
    let logp = softmax_last_dim(logits).unwrap().log().unwrap(); // [B, T_b, V], a different formulation on purpose
    let mut weights = vec![0f32; b * tb * v];
    let mut count = 0f32;
    for bi in 0..b {
        let row = &batch.labels[bi * tb..(bi + 1) * tb];
        let mut taken = 0;
        for t in 0..tb {
            if row[t] != IGNORE_INDEX && taken < LIMIT {
                weights[(bi * tb + t - 1) * v + row[t] as usize] = weight(bi);
                count += 1.0;
                taken += 1;
            }
        }
    }
    let weights = Tensor::from_vec(weights, (b, tb, v), logits.device()).unwrap(); // [B, T_b, V]
    (logp * weights).unwrap().sum_all().unwrap().affine(-1.0 / count as f64, 0.0).unwrap()
}

/// (max |fast − naive|, max |naive|) of one variable's gradient.
fn gradient_gap(fast: &candle_core::backprop::GradStore, naive: &candle_core::backprop::GradStore, var: &Tensor) -> (f64, f64) {
    let (gf, gn) = (fast.get(var).unwrap(), naive.get(var).unwrap());
    let scale = gn.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    (max_abs_diff(gf, gn), scale)
}

#[test]
fn efficient_step_equals_the_naive_full_model_step() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let target = &lm.model;
    let ds = read_dataset(&fixture("ravel/city_country_test.jsonl"), ReadOptions::default()).unwrap();
    let enc = encode_rows(&lm.tokenizer, &ds.rows[..4], &CollateOptions::default(), "fixture").unwrap();
    let batch = collate(&enc.rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id());
    assert!(batch.is_causal.contains(&true) && batch.is_causal.contains(&false), "both row kinds");
    // ReflectSelect twice: the paper's one reflection, and three per instruction.
    for (kind, reflections) in
        [(SubspaceKind::ReflectSelect, 1), (SubspaceKind::ReflectSelect, 3), (SubspaceKind::Das, 1), (SubspaceKind::MaskSelect, 1), (SubspaceKind::Boundless, 1), (SubspaceKind::None, 1)]
    {
        let mut ps = ParamStore::new();
        let cfg = InterpreterConfig {
            hypernet: HyperConfig { num_blocks: 1, layer: 1, from_scratch: false, ablate_source: false, ablate_base: false, seed: 11, ..Default::default() },
            subspace: kind,
            rank: 4,
            reflections,
            method: hyperdas::hypernet::interpreter::Method::HyperDas,
            init: Default::default(),
            rotation: Default::default(),
        };
        let interp = Interpreter::new(&mut ps, target, &cfg).unwrap();

        // Efficient.
        let out = interp.forward(target, &batch, InferenceMode::Soft, LIMIT).unwrap();
        let loss_fast = prediction_loss(&out, &batch.is_causal, CAUSAL, ISOLATE).unwrap();
        let grads_fast = loss_fast.backward().unwrap();
        assert!(ps.check_gradients(&grads_fast).unwrap().missing.is_empty(), "{kind:?} ({reflections} reflections): every parameter gets a gradient");

        // Naive: recompute everything, hook the full base pass, logits at every position.
        let dev = target.device();
        let (b, tb, ts) = (batch.len(), batch.base_len, batch.source_len);
        let base = batch.base_batch(dev).unwrap();
        let source = batch.source_batch(dev).unwrap();
        let hb = target.forward_hidden(&base, None).unwrap().stacked.unwrap();
        let hs = target.forward_hidden(&source, None).unwrap().stacked.unwrap();
        let bm = hyperdas::data::CollatedBatch::mask_tensor(&batch.base_intervention_mask, b, tb, dev).unwrap();
        let sm = hyperdas::data::CollatedBatch::mask_tensor(&batch.source_intervention_mask, b, ts, dev).unwrap();
        let instr = batch.instruction_batch(dev).unwrap();
        let hyper = interp.positions.hypernet().unwrap().forward(&HyperInput { instruction: &instr, base_states: &hb, base_mask: &bm, source_states: &hs, source_mask: &sm }).unwrap();
        let s_again = target.forward_hidden(&source, Some(&[1])).unwrap().stacked.unwrap().squeeze(2).unwrap(); // source pass again
        let final_normed = target
            .forward_with_hook(&base, |layer, x| {
                if layer != 1 {
                    return Ok(None);
                }
                let m = mix_positions(&hyper.w, &s_again, x)?;
                Ok(Some(interp.subspace.apply(x, &m, &hyper.condition)?))
            })
            .unwrap();
        let logits = target.logits(&final_normed).unwrap(); // [B, T, V]
        let loss_naive = naive_label_loss(&logits, &batch, |bi| if batch.is_causal[bi] { CAUSAL } else { ISOLATE });
        let grads_naive = loss_naive.backward().unwrap();

        let (lf, ln) = (loss_fast.to_scalar::<f32>().unwrap(), loss_naive.to_scalar::<f32>().unwrap());
        assert!((lf - ln).abs() <= 1e-5 * (1.0 + ln.abs()), "{kind:?} ({reflections} reflections): loss {lf} vs naive {ln}");
        for (name, var) in ps.iter() {
            let (diff, scale) = gradient_gap(&grads_fast, &grads_naive, var.as_tensor());
            assert!(diff <= 1e-5 * (1.0 + scale), "{kind:?} ({reflections} reflections): gradient of {name} differs by {diff} (scale {scale})");
        }
    }
}

/// DAS / MDAS: the efficient pass (blocks 0..l of the clean runs, the edit, blocks l..L, logits
/// at the label positions) equals a hooked full pass that overwrites the base's last entity
/// token with `h + R Rᵀ (s − h)`, built row by row; the rotation is the only parameter and
/// gets its gradient; other positions are untouched.
#[test]
fn baseline_step_equals_a_naive_hooked_pass_at_the_last_entity_token() {
    use hyperdas::hypernet::interpreter::Method;
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let target = &lm.model;
    let ds = read_dataset(&fixture("ravel/city_country_test.jsonl"), ReadOptions::default()).unwrap();
    let enc = encode_rows(&lm.tokenizer, &ds.rows[..4], &CollateOptions::default(), "fixture").unwrap();
    let batch = collate(&enc.rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id());
    for method in [Method::Das, Method::Mdas] {
        let mut ps = ParamStore::new();
        let cfg = InterpreterConfig {
            hypernet: HyperConfig { num_blocks: 1, layer: 2, from_scratch: false, ablate_source: false, ablate_base: false, seed: 5, ..Default::default() },
            subspace: SubspaceKind::ReflectSelect, // ignored: a baseline always uses one shared basis
            rank: 4,
            reflections: 3, // ignored too
            method,
            init: Default::default(),
            rotation: Default::default(),
        };
        let interp = Interpreter::new(&mut ps, target, &cfg).unwrap();
        let names: Vec<String> = ps.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["subspace.rotation"], "a baseline has no hypernetwork");
        assert!(interp.forward(target, &batch, InferenceMode::Soft, LIMIT).is_err(), "no soft mode without a W");
        let out = interp.forward(target, &batch, InferenceMode::GroundTruth, LIMIT).unwrap();
        let loss_fast = prediction_loss(&out, &batch.is_causal, 1.0, 1.0).unwrap();
        let grads_fast = loss_fast.backward().unwrap();
        assert!(ps.check_gradients(&grads_fast).unwrap().missing.is_empty());

        let dev = target.device();
        let r = ps.get("subspace.rotation").unwrap().as_tensor().clone(); // [D, k]
        let base = batch.base_batch(dev).unwrap();
        let source = batch.source_batch(dev).unwrap();
        let s2 = target.forward_hidden(&source, Some(&[2])).unwrap().stacked.unwrap().squeeze(2).unwrap(); // [B, T_s, D]
        let final_normed = target
            .forward_with_hook(&base, |layer, x| {
                if layer != 2 {
                    return Ok(None);
                }
                let mut rows = Vec::new();
                for bi in 0..batch.len() {
                    let (pb, ps_) = (batch.base_entity_pos[bi] as usize, batch.source_entity_pos[bi] as usize);
                    let h = x.get(bi)?; // [T_b, D]
                    let hp = h.narrow(0, pb, 1)?; // [1, D]
                    let sp = s2.get(bi)?.narrow(0, ps_, 1)?; // [1, D]
                    let edit = (&hp + (sp - &hp)?.matmul(&r)?.matmul(&r.t()?)?)?; // [1, D]
                    let t = h.dim(0)?;
                    let mut parts = Vec::new();
                    if pb > 0 {
                        parts.push(h.narrow(0, 0, pb)?);
                    }
                    parts.push(edit);
                    if pb + 1 < t {
                        parts.push(h.narrow(0, pb + 1, t - pb - 1)?);
                    }
                    rows.push(Tensor::cat(&parts, 0)?);
                }
                Ok(Some(Tensor::stack(&rows, 0)?))
            })
            .unwrap();
        let logits = target.logits(&final_normed).unwrap(); // [B, T, V]
        let loss_naive = naive_label_loss(&logits, &batch, |_| 1.0);
        let grads_naive = loss_naive.backward().unwrap();
        let (lf, ln) = (loss_fast.to_scalar::<f32>().unwrap(), loss_naive.to_scalar::<f32>().unwrap());
        assert!((lf - ln).abs() <= 1e-5 * (1.0 + ln.abs()), "{method:?}: loss {lf} vs naive {ln}");
        let var = ps.get("subspace.rotation").unwrap();
        let (diff, scale) = gradient_gap(&grads_fast, &grads_naive, var.as_tensor());
        assert!(scale > 0.0 && diff <= 1e-5 * (1.0 + scale), "{method:?}: rotation gradient differs by {diff} (scale {scale})");
    }
}
