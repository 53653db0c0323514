//! Synthetic targets (`synthetic:llama3-8b`, `synthetic:<config.json>`): random weights of an
//! exact configuration, for measuring memory and speed at a model's size without its weights.

mod common;

use candle_core::DType;
use common::*;
use hyperdas::hypernet::interpreter::Method;
use hyperdas::model::{LoadOptions, ModelSource};

#[test]
fn llama3_8b_is_known_with_its_exact_configuration() {
    let src = hyperdas::model::load::resolve("synthetic:llama3-8b").unwrap();
    let ModelSource::Synthetic { config, .. } = &src else { panic!("{src}") };
    let value: serde_json::Value = serde_json::from_str(config).unwrap();
    let c = hyperdas::model::LlamaConfig::from_hf_json(&value, std::path::Path::new("llama3-8b")).unwrap();
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size), (32, 4096, 14336, 32, 8, 128_256));
    assert_eq!(c.rope.theta, 500_000.0);
    assert_eq!(c.num_parameters(), 8_030_261_248, "Meta-Llama-3-8B's parameter count");
    let e = hyperdas::model::load::resolve("synthetic:llama9").unwrap_err().to_string();
    assert!(e.contains("llama3-8b") && e.contains("config.json"), "{e}");
}

#[test]
fn a_synthetic_model_is_seeded_sized_and_trains() {
    let spec = format!("synthetic:{}", fixture("tiny-llama").join("config.json").display());
    let a = hyperdas::model::load(&spec, &LoadOptions::default()).unwrap();
    let b = hyperdas::model::load(&spec, &LoadOptions::default()).unwrap();
    // The same weights on every load; the tokenizer covers the configured vocabulary.
    for ((na, ta), (_, tb)) in a.model.named_tensors().iter().zip(b.model.named_tensors().iter()) {
        assert_eq!(max_abs_diff(ta, tb), 0.0, "{na}");
    }
    assert_eq!(a.tokenizer.vocab_size(), a.model.config.vocab_size);
    let ids = a.tokenizer.encode_prompt("Paris is a city in the country of").unwrap();
    assert_eq!(ids.len(), 1 + "Paris is a city in the country of".len(), "BOS + one token per byte");
    // HyperDAS and MDAS train on it (in bf16 too, the frozen target's dtype on a GPU).
    for dtype in [DType::F32, DType::BF16] {
        let lm = hyperdas::model::load(&spec, &LoadOptions { dtype, ..Default::default() }).unwrap();
        for method in [Method::HyperDas, Method::Mdas] {
            let losses = six_steps(&lm, method, 1, 1);
            assert!(losses.iter().all(|l| l.is_finite()), "{dtype:?} {method:?}: {losses:?}");
        }
    }
}
