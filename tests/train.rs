//! Shared training infrastructure: a run interrupted after a checkpoint and resumed from it
//! ends bit-identical to an uninterrupted run (parameters and AdamW moments restored).

use candle_core::{Device, Tensor};
use hyperdas::model::TokenBatch;
use hyperdas::toy::train::{init_params, model_from_params};
use hyperdas::train::checkpoint;
use hyperdas::train::{AdamW, AdamWConfig};

fn tiny_config() -> hyperdas::model::LlamaConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    hyperdas::model::LlamaConfig::from_hf_json(&json, std::path::Path::new("config.json")).unwrap()
}

/// One step of next-token loss on a fixed batch.
fn step(model: &hyperdas::model::Llama, opt: &mut AdamW, lr: f64) {
    let batch = TokenBatch::left_padded(&[vec![1, 5, 7, 9, 2], vec![3, 4, 8]], 0, &Device::Cpu).unwrap();
    let h = model.forward_hidden(&batch, Some(&[])).unwrap();
    let logits = model.logits(&h.final_normed).unwrap(); // [B, T, V]
    let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &Tensor::new(&[5u32, 7, 9, 2, 0, 0, 0, 4, 8, 1], &Device::Cpu).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    opt.step(&grads, lr).unwrap();
}

fn snapshot(ps: &hyperdas::params::ParamStore) -> Vec<Vec<f32>> {
    ps.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn resuming_from_a_checkpoint_is_exact() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let adam = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    // Uninterrupted: 4 steps.
    let ps = init_params(&cfg, 7, &dev).unwrap();
    let model = model_from_params(&ps, &cfg, &dev).unwrap();
    let mut opt = AdamW::new(&ps, adam).unwrap();
    for _ in 0..4 {
        step(&model, &mut opt, 1e-2);
    }
    let straight = snapshot(&ps);

    // 2 steps, checkpoint, then a fresh process state resumes for 2 more.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("step-2");
    let ps1 = init_params(&cfg, 7, &dev).unwrap();
    let model1 = model_from_params(&ps1, &cfg, &dev).unwrap();
    let mut opt1 = AdamW::new(&ps1, adam).unwrap();
    step(&model1, &mut opt1, 1e-2);
    step(&model1, &mut opt1, 1e-2);
    checkpoint::save(&ck, &ps1, Some(&opt1), &serde_json::json!({"note": "test"})).unwrap();
    for f in ["params.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    let ps2 = init_params(&cfg, 99, &dev).unwrap(); // different init: everything must come from the checkpoint
    let model2 = model_from_params(&ps2, &cfg, &dev).unwrap();
    let mut opt2 = AdamW::new(&ps2, adam).unwrap();
    let state = checkpoint::load(&ck, &ps2, Some(&mut opt2), &dev).unwrap();
    assert_eq!(state["step"], 2);
    assert_eq!(state["meta"]["note"], "test");
    assert_eq!(opt2.step, 2);
    step(&model2, &mut opt2, 1e-2);
    step(&model2, &mut opt2, 1e-2);
    assert_eq!(snapshot(&ps2), straight);
    // Without the optimizer state the run diverges (the moments matter).
    let ps3 = init_params(&cfg, 7, &dev).unwrap();
    let model3 = model_from_params(&ps3, &cfg, &dev).unwrap();
    let mut opt3 = AdamW::new(&ps3, adam).unwrap();
    checkpoint::load(&ck, &ps3, None, &dev).unwrap();
    step(&model3, &mut opt3, 1e-2);
    step(&model3, &mut opt3, 1e-2);
    assert_ne!(snapshot(&ps3), straight);
}

#[test]
fn a_checkpoint_that_does_not_fit_is_a_clear_error() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let ps = init_params(&cfg, 1, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    checkpoint::save(&ck, &ps, None, &serde_json::json!({})).unwrap();
    let mut other = cfg.clone();
    other.hidden_size = 32;
    other.head_dim = 16;
    let ps2 = init_params(&other, 1, &dev).unwrap();
    let e = checkpoint::load(&ck, &ps2, None, &dev).unwrap_err().to_string();
    assert!(e.contains("params.safetensors") && e.contains("model.embed_tokens.weight") && e.contains("shape"), "{e}");
}

#[test]
fn the_shipped_toy_run_config_loads_and_names_the_standard_toy() {
    // configs/toy.toml is the documented toy run (README, docs/hyperdas.md): it must parse
    // against the current settings (unknown keys are errors) and keep its documented values.
    let cfg: hyperdas::train::run::RunConfig = hyperdas::config::load(Some(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/toy.toml"))), &[]).unwrap();
    assert_eq!(cfg.model.path, "toy");
    assert_eq!(cfg.interpreter.config(3).unwrap().hypernet.layer, 1);
    assert!(cfg.interpreter.from_scratch);
    assert_eq!((cfg.interpreter.rank, cfg.train.epochs, cfg.train.batch_size), (16, 2, 32));
    assert_eq!((cfg.train.causal_weight, cfg.train.isolate_weight, cfg.train.lr), (1.0, 1.0, 1e-3));
    assert_eq!(cfg.data.train, "data/toy/city_country_train.jsonl");
    // The standard toy plants Country (and Continent) at the layer this config intervenes on.
    let toy = hyperdas::toy::ToyConfig::standard();
    assert_eq!((toy.plant_attributes.as_slice(), toy.plant_layer), (&["Country".to_string(), "Continent".to_string()][..], 1));
    toy.validate().unwrap();
}
