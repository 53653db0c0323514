//! Gemma 3 as a HyperDAS target: the interventions, the hypernetwork (initialised from the
//! target's first blocks, q/k norms included) and the baselines train on it unchanged.

mod common;

use candle_core::DType;
use common::*;
use hyperdas::hypernet::interpreter::Method;

fn steps_on_tiny_gemma(method: Method) -> Vec<f64> {
    let lm = load(&fixture("tiny-gemma3"), DType::F32);
    assert_eq!(lm.model.config.architecture, hyperdas::model::Architecture::Gemma3);
    // The hypernetwork's blocks copy the target's q/k norms: `six_steps` checks each is a parameter.
    six_steps(&lm, method, 3, 2)
}

#[test]
fn hyperdas_trains_on_gemma3() {
    let losses = steps_on_tiny_gemma(Method::HyperDas);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[4] < losses[0] && losses[5] < losses[1], "the loss should fall on repeated batches: {losses:?}");
}

#[test]
fn the_mdas_baseline_trains_on_gemma3() {
    let losses = steps_on_tiny_gemma(Method::Mdas);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[4] < losses[0] && losses[5] < losses[1], "the loss should fall on repeated batches: {losses:?}");
}

#[test]
fn sliding_layers_see_only_their_window() {
    // Changing a token more than `window` positions back must not change a sliding layer's
    // output at the last position, but must change the full model's (through the global layer).
    let lm = load(&fixture("tiny-gemma3"), DType::F32);
    let window = lm.model.config.gemma.as_ref().unwrap().sliding_window;
    let base = lm.tokenizer.encode_prompt("Paris is a city in the country of France and").unwrap();
    assert!(base.len() > window + 2);
    let mut edited = base.clone();
    edited[1] = if edited[1] == 10 { 11 } else { 10 };
    let b = hyperdas::model::TokenBatch::left_padded(&[base, edited], lm.tokenizer.padding_id(), &candle_core::Device::Cpu).unwrap();
    let ctx = lm.model.context(&b).unwrap();
    let h = lm.model.forward_hidden(&b, Some(&[0])).unwrap();
    let x = h.stacked.unwrap().squeeze(2).unwrap(); // [2, T, D]
    assert!(lm.model.layers[0].sliding, "layer 0 is a sliding layer");
    let y = lm.model.block(0, &x, &ctx).unwrap(); // [2, T, D]
    let t = b.dims().1;
    let last = |r: usize| y.get(r).unwrap().get(t - 1).unwrap();
    assert!(max_abs_diff(&last(0), &last(1)) < 1e-6, "a sliding layer looked beyond its window");
    let near = |r: usize| y.get(r).unwrap().get(2).unwrap();
    assert!(max_abs_diff(&near(0), &near(1)) > 1e-4, "a position inside the window must see the edit");
    let logits = lm.model.logits_last(&h.final_normed).unwrap();
    assert!(max_abs_diff(&logits.get(0).unwrap(), &logits.get(1).unwrap()) > 1e-4, "the global layer sees the whole prefix");
}
