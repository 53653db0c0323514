//! The code paths a GPU runs, checked on the CPU. On CUDA (and for bf16/f16 anywhere) none of
//! the fused CPU kernels or the hand-written backward of `src/model/tape.rs` apply: every op
//! takes its composed candle form. Turning the fused kernels off (for this whole test binary,
//! which is its own process) sends the CPU down exactly those paths, so parity with
//! transformers and equality with the fused path are checked here without a GPU.

mod common;

use candle_core::DType;
use common::*;
use hyperdas::model::kernels;
use hyperdas::parity::{self, Reference};

fn composed() {
    kernels::set_fused(false);
    assert!(!kernels::fused_enabled());
}

fn parity_composed(model: &str, reference: &str) {
    composed();
    let lm = load(&fixture(model), DType::F32);
    let r = Reference::open(&fixture(reference)).unwrap();
    let report = parity::compare(&lm, &r).unwrap();
    assert!(!report.diffs.is_empty());
    for d in &report.diffs {
        eprintln!("{model} composed {}: max|diff| {:.3e}", d.name, d.max_abs_diff);
        let tol = d.tolerance(1e-4);
        assert!(d.max_abs_diff <= tol, "{model}: {} differs by {:e} on the composed path", d.name, d.max_abs_diff);
    }
}

#[test]
fn llama_on_the_composed_path_matches_transformers() {
    parity_composed("tiny-llama", "tiny-llama-reference.safetensors");
}

#[test]
fn gemma3_on_the_composed_path_matches_transformers() {
    parity_composed("tiny-gemma3", "tiny-gemma3-reference.safetensors");
}

#[test]
fn bf16_target_with_f32_parameters_trains_on_the_composed_path() {
    // Mixed precision as on a GPU: the frozen target in bf16, the trainable interpreter in f32.
    use hyperdas::data::collate::collate;
    use hyperdas::experiment::trainer::{TrainSettings, Trainer};
    use hyperdas::hypernet::interpreter::{Interpreter, Method};
    composed();
    for name in ["tiny-llama", "tiny-gemma3"] {
        let lm = load(&fixture(name), DType::BF16);
        let rows = fixture_rows(&lm, 4);
        let cfg = interpreter_config(Method::HyperDas, 1, 1, 4, 1);
        let mut ps = hyperdas::params::ParamStore::new();
        let mut interp = Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
        for (n, v) in ps.iter() {
            assert_eq!(v.as_tensor().dtype(), DType::F32, "{name}: trainable {n} must stay f32");
        }
        let s = TrainSettings { batch_size: 4, lr: 1e-3, ..Default::default() };
        let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 2).unwrap();
        let batch = collate(&rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id());
        // Step 0 also checks that every parameter receives a gradient through the bf16 target.
        for _ in 0..2 {
            let out = tr.step(&batch).unwrap();
            assert!(out.loss.is_finite() && out.grad_norm.is_finite() && out.grad_norm > 0.0, "{name}: {out:?}");
        }
    }
}

#[test]
fn the_gelu_gate_backward_off_the_fused_path_equals_autograd() {
    // What the taped Gemma block uses where the fused kernel does not apply (a GPU, bf16): the
    // formula from candle ops, against autograd through the composed gate.
    composed();
    let dev = candle_core::Device::Cpu;
    let g = candle_core::Var::from_tensor(&candle_core::Tensor::randn(0f32, 2.0, (3, 7), &dev).unwrap()).unwrap();
    let u = candle_core::Var::from_tensor(&candle_core::Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap()).unwrap();
    let dh = candle_core::Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
    let (dg, du) = kernels::gelu_mul_backward(g.as_tensor(), u.as_tensor(), &dh).unwrap();
    let y = kernels::gelu_mul_composed(g.as_tensor(), u.as_tensor()).unwrap();
    let grads = (y * &dh).unwrap().sum_all().unwrap().backward().unwrap();
    let (ag, au) = (grads.get(g.as_tensor()).unwrap(), grads.get(u.as_tensor()).unwrap());
    assert!(max_abs_diff(&dg, ag) < 1e-5, "dg {}", max_abs_diff(&dg, ag));
    assert!(max_abs_diff(&du, au) < 1e-6, "du {}", max_abs_diff(&du, au));
}
