//! The training levers of docs/results.md's ablation table, each on the tiny Llama fixture:
//! the pointer's keep-the-base bias (`interpreter.self_bias`), the pointer without RoPE
//! (`interpreter.pointer_rope`), centred pointer states (`interpreter.pointer_states`), frozen
//! copies (`interpreter.freeze`), the ground-truth curriculum (`train.groundtruth_steps`), the
//! heads' learning-rate multiples (`train.head_lr_scale`, `train.subspace_lr_scale`), the step
//! budget (`train.steps`), the entity → entity share, and the pointer guide
//! (`train.pointer_guide_weight`, `train.pointer_guide_steps`).

mod common;

use candle_core::DType;
use common::*;
use hyperdas::data::collate::{CollatedBatch, collate};
use hyperdas::experiment::trainer::{TrainSettings, Trainer, evaluate_detailed};
use hyperdas::hypernet::Frozen;
use hyperdas::hypernet::interpreter::{Interpreter, InterpreterConfig, Method};
use hyperdas::intervention::selection::InferenceMode;
use hyperdas::model::LoadedModel;
use hyperdas::params::ParamStore;

fn tiny() -> LoadedModel {
    load(&fixture("tiny-llama"), DType::F32)
}

fn batch(lm: &LoadedModel, n: usize) -> CollatedBatch {
    let rows = fixture_rows(lm, n);
    collate(&rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id())
}

fn build(lm: &LoadedModel, edit: impl Fn(&mut InterpreterConfig)) -> (ParamStore, Interpreter) {
    let mut cfg = interpreter_config(Method::HyperDas, 1, 1, 4, 5);
    edit(&mut cfg);
    let mut ps = ParamStore::new();
    let interp = Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
    (ps, interp)
}

/// `W`'s weight on "self" in every visible base column, per row: `[B][visible columns]`.
fn self_weights(lm: &LoadedModel, interp: &Interpreter, b: &CollatedBatch) -> Vec<f32> {
    let out = interp.forward(&lm.model, b, InferenceMode::Soft, 3).unwrap();
    let w = out.w.to_vec3::<f32>().unwrap(); // [B, T_s+1, T_b]
    let ts = b.source_len;
    let tb = b.base_len;
    let mut v = Vec::new();
    for (bi, wb) in w.iter().enumerate() {
        for (j, x) in wb[ts].iter().enumerate() {
            if b.base_intervention_mask[bi * tb + j] > 0 {
                v.push(*x);
            }
        }
    }
    v
}

#[test]
fn a_self_bias_starts_the_pointer_at_keep_the_base_and_is_learned() {
    let lm = tiny();
    let b = batch(&lm, 4);
    let (_, plain) = build(&lm, |_| {});
    let (ps, biased) = build(&lm, |c| c.hypernet.self_bias = 6.0);
    let plain_self = self_weights(&lm, &plain, &b);
    let biased_self = self_weights(&lm, &biased, &b);
    // Untrained, the pointer is near uniform over the source tokens and self; with the bias,
    // self takes almost everything.
    assert!(plain_self.iter().all(|&x| x < 0.5), "{plain_self:?}");
    assert!(biased_self.iter().all(|&x| x > 0.85), "{biased_self:?}");
    // The bias is a parameter, and it gets a gradient (Trainer::step checks every parameter at
    // step 0 of soft training).
    assert!(ps.get("hypernet.pointer.self_bias").is_some());
    let s = TrainSettings { batch_size: 4, lr: 1e-2, ..Default::default() };
    let mut interp = biased;
    let bias = |ps: &ParamStore| ps.get("hypernet.pointer.self_bias").unwrap().as_tensor().to_vec1::<f32>().unwrap()[0];
    let before = bias(&ps);
    assert_eq!(before, 6.0);
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 3).unwrap();
    tr.step(&b).unwrap();
    let after = bias(&ps);
    assert!((after - before).abs() > 1e-3, "the bias moved: {before} → {after}");
    // Without the setting there is no such parameter (the reference's pointer).
    let (ps0, _) = build(&lm, |_| {});
    assert!(ps0.get("hypernet.pointer.self_bias").is_none());
}

#[test]
fn the_pointer_without_rope_differs_and_trains() {
    pointer_option_differs_and_trains(|c| c.hypernet.pointer_rope = false, "RoPE changes the pointer's scores");
}

/// A pointer option (`edit` on the default interpreter): another `W` from the same weights,
/// and a finite training step with it.
fn pointer_option_differs_and_trains(edit: impl Fn(&mut InterpreterConfig), what: &str) {
    let lm = tiny();
    let b = batch(&lm, 4);
    let (_, default) = build(&lm, |_| {});
    let (ps, mut changed) = build(&lm, edit);
    let w1 = default.forward(&lm.model, &b, InferenceMode::Soft, 3).unwrap().w;
    let w0 = changed.forward(&lm.model, &b, InferenceMode::Soft, 3).unwrap().w;
    assert!(max_abs_diff(&w1, &w0) > 1e-6, "{what}");
    let s = TrainSettings { batch_size: 4, lr: 1e-3, ..Default::default() };
    let mut tr = Trainer::new(&lm.model, &mut changed, &ps, &s, 2).unwrap();
    assert!(tr.step(&b).unwrap().loss.is_finite());
}

#[test]
fn centred_pointer_states_remove_what_the_visible_positions_share() {
    use hyperdas::hypernet::{PointerStates, centered_rows};
    // One prompt, three positions, the last not visible: the visible mean (0.5, 0.5) is removed
    // from every position, then each is unit-normalised.
    let dev = candle_core::Device::Cpu;
    let u = candle_core::Tensor::new(&[[[1f32, 0.], [0., 1.], [1., 0.]]], &dev).unwrap(); // [1, 3, 2]
    let mask = candle_core::Tensor::new(&[[1u8, 1, 0]], &dev).unwrap(); // [1, 3]
    let c = centered_rows(&u, &mask).unwrap().to_vec3::<f32>().unwrap();
    let h = std::f32::consts::FRAC_1_SQRT_2;
    for (got, want) in c[0].iter().zip([[h, -h], [-h, h], [h, -h]]) {
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{c:?}");
    }
    // A prompt with a single visible position has nothing left there (0, not NaN).
    let one = centered_rows(&u, &candle_core::Tensor::new(&[[0u8, 1, 0]], &dev).unwrap()).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(one[0][1], vec![0.0, 0.0]);
    // In the interpreter: another W from the same weights, and a training step.
    pointer_option_differs_and_trains(|c| c.hypernet.pointer_states = PointerStates::Centered, "centring changes the pointer's scores");
    // The run setting, and a clear error for a wrong value.
    let resolve = |v: &str| hyperdas::experiment::run::resolve_config(Method::HyperDas, None, None, &[format!("interpreter.pointer_states={v}")]);
    assert_eq!(resolve("centered").unwrap().interpreter.pointer_states, PointerStates::Centered);
    let e = resolve("middle").unwrap_err().to_string();
    assert!(e.contains("pointer_states") && e.contains("centered"), "{e}");
}

#[test]
fn a_pointer_scale_sharpens_the_untrained_pointer() {
    let lm = tiny();
    let b = batch(&lm, 4);
    let w = |scale: f64| {
        let (_, interp) = build(&lm, |c| c.hypernet.pointer_scale = scale);
        interp.forward(&lm.model, &b, InferenceMode::Soft, 3).unwrap().w
    };
    // The untrained scores are small: W's departure from uniform (scale → 0) grows with the scale.
    let uniform = w(1e-6);
    let (one, fifty) = (max_abs_diff(&w(1.0), &uniform), max_abs_diff(&w(50.0), &uniform));
    assert!(one > 0.0 && fifty > 10.0 * one, "scaled scores move W from uniform: {one} vs {fifty}");
    let mut ps = ParamStore::new();
    let mut cfg = interpreter_config(Method::HyperDas, 1, 1, 4, 5);
    cfg.hypernet.pointer_scale = 0.0;
    assert!(Interpreter::new(&mut ps, &lm.model, &cfg).err().unwrap().to_string().contains("interpreter.pointer_scale"));
}

#[test]
fn frozen_copies_are_not_parameters_and_keep_the_targets_values() {
    let lm = tiny();
    let (all, _) = build(&lm, |_| {});
    let (ps, mut interp) = build(&lm, |c| c.hypernet.freeze = vec![Frozen::Embedding, Frozen::Mlps]);
    let names: Vec<&str> = ps.iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.starts_with("hypernet.embed_tokens") || (n.starts_with("hypernet.layers.") && n.contains(".mlp."))), "{names:?}");
    assert!(names.iter().any(|n| n.contains("self_attn.q_proj")), "attention still trains: {names:?}");
    assert!(ps.num_elements() < all.num_elements());
    let (blocks, _) = build(&lm, |c| c.hypernet.freeze = vec![Frozen::Blocks]);
    assert!(!blocks.iter().any(|(n, _)| n.starts_with("hypernet.layers.")));
    // Training works and leaves the frozen embedding at the target's values.
    let b = batch(&lm, 4);
    let s = TrainSettings { batch_size: 4, lr: 1e-2, ..Default::default() };
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 2).unwrap();
    tr.step(&b).unwrap();
    let h = interp.positions.hypernet().unwrap();
    assert_eq!(max_abs_diff(&h.embed_tokens, &lm.model.embed_tokens), 0.0);
    // Frozen is spelled in configurations as a list of names.
    let cfg: hyperdas::experiment::run::RunConfig = hyperdas::config::load(None, &["interpreter.freeze=[\"embedding\", \"blocks\"]".into()]).unwrap();
    assert_eq!(cfg.interpreter.freeze, vec![Frozen::Embedding, Frozen::Blocks]);
    let e = hyperdas::config::load::<hyperdas::experiment::run::RunConfig>(None, &["interpreter.freeze=[\"attention\"]".into()]).unwrap_err().to_string();
    assert!(e.contains("interpreter.freeze") || e.contains("attention"), "{e}");
}

#[test]
fn the_curriculum_trains_the_subspace_first_and_the_pointer_after() {
    let lm = tiny();
    let b = batch(&lm, 4);
    let (ps, mut interp) = build(&lm, |_| {});
    let s = TrainSettings { batch_size: 4, lr: 1e-2, groundtruth_steps: 2, ..Default::default() };
    assert_eq!((s.mode_at(0, 4), s.mode_at(1, 4), s.mode_at(2, 4)), (InferenceMode::GroundTruth, InferenceMode::GroundTruth, InferenceMode::Soft));
    let pointer = |ps: &ParamStore| ps.get("hypernet.pointer.q_proj.weight").unwrap().as_tensor().copy().unwrap();
    let rotation = |ps: &ParamStore| ps.get("subspace.rotation").unwrap().as_tensor().copy().unwrap();
    let (p0, r0) = (pointer(&ps), rotation(&ps));
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 4).unwrap();
    tr.step(&b).unwrap();
    tr.step(&b).unwrap();
    // Ground-truth positions: the pointer head is not in the loss; the subspace learns.
    assert_eq!(max_abs_diff(&pointer(&ps), &p0), 0.0, "the pointer is untouched during the curriculum");
    assert!(max_abs_diff(&rotation(&ps), &r0) > 1e-5, "the rotation moves");
    tr.step(&b).unwrap();
    assert!(max_abs_diff(&pointer(&ps), &p0) > 1e-5, "soft training moves the pointer");
    // Only soft and ground-truth positions train.
    let bad = TrainSettings { train_mode: InferenceMode::GlobalArgmax, ..Default::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("train.train_mode"));
    let cfg: hyperdas::experiment::run::RunConfig = hyperdas::config::load(None, &["train.train_mode=\"groundtruth\"".into()]).unwrap();
    assert_eq!(cfg.train.train_mode, InferenceMode::GroundTruth);
}

#[test]
fn the_heads_learning_rate_is_a_multiple_of_the_schedules() {
    let lm = tiny();
    let b = batch(&lm, 4);
    // Adam's first step moves every weight with a gradient by about its learning rate.
    let moved = |scale: f64| -> (f64, f64) {
        let (ps, mut interp) = build(&lm, |_| {});
        let get = |n: &str| ps.get(n).unwrap().as_tensor().copy().unwrap();
        let (p0, q0) = (get("hypernet.pointer.q_proj.weight"), get("hypernet.layers.0.self_attn.q_proj.weight"));
        let s = TrainSettings { batch_size: 4, lr: 1e-4, weight_decay: 0.0, grad_clip: 0.0, head_lr_scale: scale, ..Default::default() };
        let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 3).unwrap();
        tr.step(&b).unwrap();
        (max_abs_diff(&get("hypernet.pointer.q_proj.weight"), &p0), max_abs_diff(&get("hypernet.layers.0.self_attn.q_proj.weight"), &q0))
    };
    let (head1, block1) = moved(1.0);
    let (head10, block10) = moved(10.0);
    assert!((head1 - 1e-4).abs() < 2e-5 && (block1 - 1e-4).abs() < 2e-5, "{head1} {block1}");
    assert!((head10 - 1e-3).abs() < 2e-4, "the head moves 10× as far: {head10}");
    assert!((block10 - block1).abs() < 1e-6, "the copied blocks keep the schedule's rate: {block10} vs {block1}");
}

#[test]
fn the_subspace_mlp_can_learn_at_its_own_rate() {
    let lm = tiny();
    let b = batch(&lm, 4);
    // Adam's first step moves every weight with a gradient by about its learning rate: the
    // pointer head at head_lr_scale, the subspace MLP at subspace_lr_scale (0: the head's).
    let moved = |subspace: f64| -> (f64, f64, f64) {
        let (ps, mut interp) = build(&lm, |_| {});
        let get = |n: &str| ps.get(n).unwrap().as_tensor().copy().unwrap();
        let names = ["hypernet.pointer.q_proj.weight", "subspace.mlp.up_proj.weight", "hypernet.layers.0.self_attn.q_proj.weight"];
        let before: Vec<_> = names.iter().map(|n| get(n)).collect();
        let s = TrainSettings { batch_size: 4, lr: 1e-4, weight_decay: 0.0, grad_clip: 0.0, head_lr_scale: 10.0, subspace_lr_scale: subspace, ..Default::default() };
        let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 3).unwrap();
        tr.step(&b).unwrap();
        let d: Vec<f64> = names.iter().zip(&before).map(|(n, t0)| max_abs_diff(&get(n), t0)).collect();
        (d[0], d[1], d[2])
    };
    let (head, mlp, block) = moved(0.0);
    assert!((head - 1e-3).abs() < 2e-4 && (mlp - 1e-3).abs() < 2e-4, "0: the MLP shares the head's rate: {head} {mlp}");
    assert!((block - 1e-4).abs() < 2e-5, "{block}");
    let (head2, mlp2, block2) = moved(2.0);
    assert!((head2 - head).abs() < 1e-6, "the pointer keeps head_lr_scale: {head2} vs {head}");
    assert!((mlp2 - 2e-4).abs() < 4e-5, "the MLP moves at 2 × lr: {mlp2}");
    assert!((block2 - block).abs() < 1e-6, "the copied blocks keep the schedule's rate: {block2} vs {block}");
    let bad = TrainSettings { subspace_lr_scale: -1.0, ..Default::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("train.subspace_lr_scale"));
    let cfg: hyperdas::experiment::run::RunConfig = hyperdas::config::load(None, &["train.subspace_lr_scale=3".into()]).unwrap();
    assert_eq!(cfg.train.subspace_lr_scale, 3.0);
}

#[test]
fn a_step_budget_cycles_the_data() {
    let s = TrainSettings { batch_size: 16, epochs: 3, ..Default::default() };
    assert_eq!((s.total_steps(100), s.passes(100)), (21, 3));
    let s = TrainSettings { steps: 50, ..s };
    assert_eq!((s.total_steps(100), s.passes(100)), (50, 8), "7 batches a pass: 8 passes, the last cut short");
}

#[test]
fn the_entity_share_is_one_at_the_ground_truth_positions() {
    let lm = tiny();
    let rows = fixture_rows(&lm, 8);
    let (_, interp) = build(&lm, |_| {});
    let e = evaluate_detailed(&lm.model, &interp, &rows, InferenceMode::GroundTruth, 4, 3, lm.tokenizer.padding_id(), false).unwrap();
    let causal = rows.iter().filter(|r| r.is_causal).count();
    assert!(causal > 0);
    assert_eq!((e.scores.entity_selected, e.scores.entity_position), (Some(1.0), Some(1.0)));
    // Soft, untrained: the entity token's column is near uniform and its arg-max rarely the
    // source entity.
    let soft = evaluate_detailed(&lm.model, &interp, &rows, InferenceMode::Soft, 4, 3, lm.tokenizer.padding_id(), false).unwrap();
    assert!(soft.scores.entity_position.unwrap() < 1.0);
    assert!(soft.scores.entity_selected.unwrap() >= soft.scores.entity_position.unwrap());
    // Only isolate rows: not measured.
    let isolate: Vec<_> = rows.iter().filter(|r| !r.is_causal).cloned().collect();
    if !isolate.is_empty() {
        let e = evaluate_detailed(&lm.model, &interp, &isolate, InferenceMode::Soft, 4, 3, lm.tokenizer.padding_id(), false).unwrap();
        assert_eq!((e.scores.entity_selected, e.scores.entity_position), (None, None));
    }
}

#[test]
fn the_pointer_guide_teaches_the_entity_pair_during_the_curriculum_and_fades_out() {
    let lm = tiny();
    let rows = fixture_rows(&lm, 8);
    let b = collate(&rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id());
    let pad = lm.tokenizer.padding_id();
    let share = |interp: &Interpreter| evaluate_detailed(&lm.model, interp, &rows, InferenceMode::Soft, 8, 3, pad, false).unwrap().scores.entity_position.unwrap();
    let (ps, mut interp) = build(&lm, |_| {});
    let before = share(&interp);
    assert!(before < 1.0, "untrained, the entity token's column does not point at the source entity everywhere");
    let pointer = |ps: &ParamStore| ps.get("hypernet.pointer.q_proj.weight").unwrap().as_tensor().copy().unwrap();
    let p0 = pointer(&ps);
    // Ground-truth positions throughout: without the guide the pointer gets no gradient (the
    // curriculum test above); with it, the pointer learns the pair ground truth uses.
    let steps = 40;
    let s = TrainSettings {
        batch_size: 8,
        lr: 1e-2,
        warmup_steps: 0,
        lr_decay: hyperdas::train::Decay::Constant,
        groundtruth_steps: steps,
        pointer_guide_weight: 1.0,
        pointer_guide_steps: steps,
        ..Default::default()
    };
    s.validate().unwrap();
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, steps).unwrap();
    let mut weights = Vec::new();
    for _ in 0..steps {
        weights.push(tr.step(&b).unwrap().guide_weight);
    }
    drop(tr);
    assert!(max_abs_diff(&pointer(&ps), &p0) > 1e-3, "the guide moves the pointer at ground-truth positions");
    assert_eq!(weights[0], 1.0);
    assert!(weights.windows(2).all(|w| w[1] < w[0]) && weights[steps - 1] > 0.0, "the weight fades linearly: {weights:?}");
    let after = share(&interp);
    assert_eq!(after, 1.0, "after {steps} guided steps every causal row's entity token takes the source entity (from {before})");
    // A negative weight is refused, naming the key.
    let bad = TrainSettings { pointer_guide_weight: -1.0, ..Default::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("train.pointer_guide_weight"));
}

#[test]
fn the_curriculum_and_the_guide_given_as_shares_scale_with_the_run() {
    // groundtruth_ratio = 0.5: the first half of whatever the run's length is.
    let s = TrainSettings { groundtruth_ratio: 0.5, pointer_guide_weight: 1.0, pointer_guide_ratio: 1.0, ..Default::default() };
    s.validate().unwrap();
    // Rounded down, as train.sparsity_warmup_ratio is: 3.5 steps of 7 are 3.
    assert_eq!((s.groundtruth_len(500), s.groundtruth_len(120), s.groundtruth_len(7)), (250, 60, 3));
    assert_eq!((s.mode_at(59, 120), s.mode_at(60, 120)), (InferenceMode::GroundTruth, InferenceMode::Soft));
    assert_eq!((s.mode_at(249, 500), s.mode_at(250, 500)), (InferenceMode::GroundTruth, InferenceMode::Soft));
    assert_eq!((s.terms(500).guide_steps, s.terms(120).guide_steps), (500, 120));
    // The same schedule given in steps, at 500 steps.
    let steps = TrainSettings { groundtruth_steps: 250, pointer_guide_weight: 1.0, pointer_guide_steps: 500, ..Default::default() };
    assert!((0..500).all(|i| steps.mode_at(i, 500) == s.mode_at(i, 500)));
    assert_eq!(steps.terms(500), s.terms(500));
    // Both forms at once, or a share outside [0, 1], are refused, naming the keys.
    let both = TrainSettings { groundtruth_ratio: 0.5, groundtruth_steps: 10, ..Default::default() };
    let e = both.validate().unwrap_err().to_string();
    assert!(e.contains("train.groundtruth_ratio") && e.contains("train.groundtruth_steps"), "{e}");
    let both = TrainSettings { pointer_guide_ratio: 0.5, pointer_guide_steps: 10, ..Default::default() };
    assert!(both.validate().unwrap_err().to_string().contains("train.pointer_guide_steps"));
    for bad in [1.5, -0.1, f64::NAN] {
        let e = TrainSettings { groundtruth_ratio: bad, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("train.groundtruth_ratio"), "{e}");
    }
    // The guide may fade over more than the run: ratio 2 is the same schedule as a guide of
    // 2 × total steps, whose weight is still 1/2 at the run's end.
    let held = TrainSettings { pointer_guide_weight: 1.0, pointer_guide_ratio: 2.0, ..Default::default() };
    held.validate().unwrap();
    let held_steps = TrainSettings { pointer_guide_weight: 1.0, pointer_guide_steps: 1000, ..Default::default() };
    assert_eq!((held.terms(500), held.terms(500).guide_steps), (held_steps.terms(500), 1000));
    assert_eq!(held.terms(120).guide_steps, 240);
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        let e = TrainSettings { pointer_guide_ratio: bad, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("train.pointer_guide_ratio"), "{e}");
    }
}

#[test]
fn the_separation_term_moves_the_attributes_subspaces_apart() {
    use hyperdas::experiment::loss::separation_loss;
    let lm = tiny();
    let pad = lm.tokenizer.padding_id();
    // Eight fixture rows, the last four relabelled as another attribute's instructions.
    let mut rows = fixture_rows(&lm, 8);
    for r in &mut rows[4..] {
        r.target_attribute = "Continent".into();
    }
    let b = collate(&rows.iter().collect::<Vec<_>>(), pad);
    let overlap = |interp: &Interpreter| separation_loss(&interp.basis(&lm.model, &b).unwrap(), &b.target_attribute).unwrap().unwrap().to_scalar::<f32>().unwrap();
    let steps = 15;
    let run = |weight: f64| {
        let (ps, mut interp) = build(&lm, |c| c.reflections = 2);
        let before = overlap(&interp);
        let s = TrainSettings { batch_size: 8, lr: 1e-2, warmup_steps: 0, lr_decay: hyperdas::train::Decay::Constant, separation_weight: weight, ..Default::default() };
        s.validate().unwrap();
        let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, steps).unwrap();
        let logged: Vec<Option<f64>> = (0..steps).map(|_| tr.step(&b).unwrap().separation).collect();
        drop(tr);
        (before, overlap(&interp), logged)
    };
    let (before, plain, logged) = run(0.0);
    assert!(logged.iter().all(Option::is_none), "no term, nothing logged");
    let (same_start, separated, logged) = run(5.0);
    assert_eq!(before, same_start, "both runs start from the same interpreter");
    let first = logged[0].expect("the term's value is logged");
    assert!((first - before as f64).abs() < 1e-5, "step 0 logs the overlap of the untrained bases: {first} vs {before}");
    assert!(separated < 0.5 * before && separated < 0.5 * plain, "the term moves the subspaces apart: {before} → {separated} (without it: {plain})");
    // A batch of one attribute has no pair to separate: no term.
    let one = batch(&lm, 4);
    let (ps, mut interp) = build(&lm, |c| c.reflections = 2);
    let s = TrainSettings { batch_size: 4, separation_weight: 5.0, ..Default::default() };
    assert_eq!(Trainer::new(&lm.model, &mut interp, &ps, &s, 1).unwrap().step(&one).unwrap().separation, None);
    // A negative weight is refused, naming the key; so is a module whose rows share one basis.
    let bad = TrainSettings { separation_weight: -1.0, ..Default::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("train.separation_weight"));
    let (ps, mut das) = build(&lm, |c| c.subspace = hyperdas::hypernet::subspace::SubspaceKind::Das);
    let e = Trainer::new(&lm.model, &mut das, &ps, &s, 1).err().expect("das has one basis").to_string();
    assert!(e.contains("train.separation_weight") && e.contains("\"das\""), "{e}");
    let (ps, mut masked) = build(&lm, |c| c.subspace = hyperdas::hypernet::subspace::SubspaceKind::MaskSelect);
    let e = Trainer::new(&lm.model, &mut masked, &ps, &s, 1).err().expect("mask_select's bases are scaled by the mask").to_string();
    assert!(e.contains("train.separation_weight") && e.contains("\"mask_select\""), "{e}");
}
