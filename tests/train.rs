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
    let cfg: hyperdas::experiment::run::RunConfig = hyperdas::config::load(Some(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/toy.toml"))), &[]).unwrap();
    assert_eq!(cfg.model.path, "toy");
    assert_eq!(cfg.interpreter.config(3).unwrap().hypernet.layer, 1);
    assert!(cfg.interpreter.from_scratch);
    assert_eq!((cfg.interpreter.rank, cfg.train.epochs, cfg.train.batch_size), (16, 3, 32));
    assert_eq!((cfg.train.causal_weight, cfg.train.isolate_weight, cfg.train.lr), (1.0, 1.0, 1e-3));
    assert_eq!(cfg.data.train, "data/toy/city_country_train.jsonl");
    // The standard toy plants Country (and Continent) at the layer this config intervenes on.
    let toy = hyperdas::toy::ToyConfig::standard();
    assert_eq!((toy.plant_attributes.as_slice(), toy.plant_layer), (&["Country".to_string(), "Continent".to_string()][..], 1));
    toy.validate().unwrap();
}

#[path = "common/mod.rs"]
mod common;

/// Parameters after six HyperDAS steps on the fixture rows: without the state cache, or with
/// it (its canonical groups registered from all rows; `prewarm` first serves every batch once
/// without training, so the cache is full before step 1).
fn hyperdas_params_after(cache: bool, prewarm: bool) -> (Vec<Vec<f32>>, Option<hyperdas::model::cache::CacheStats>) {
    hyperdas_params_with_budget(cache.then_some(1 << 30), prewarm)
}

/// [`hyperdas_params_after`] with a cache of `budget` bytes (`None`: no cache).
fn hyperdas_params_with_budget(budget: Option<usize>, prewarm: bool) -> (Vec<Vec<f32>>, Option<hyperdas::model::cache::CacheStats>) {
    use hyperdas::data::collate::collate;
    use hyperdas::experiment::trainer::{TrainSettings, Trainer};
    use hyperdas::hypernet::interpreter::Interpreter;
    use hyperdas::intervention::selection::InferenceMode;
    let lm = common::load(&common::fixture("tiny-llama"), candle_core::DType::F32);
    let rows = common::fixture_rows(&lm, 12);
    let cfg = common::interpreter_config(hyperdas::hypernet::interpreter::Method::HyperDas, 1, 1, 4, 3);
    let mut ps = hyperdas::params::ParamStore::new();
    let mut interp = Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
    if let Some(budget) = budget {
        interp.set_cache(Some(hyperdas::model::cache::StateCache::new(budget, candle_core::DType::F32).unwrap()));
        interp.register_prompts(&rows);
    }
    let s = TrainSettings { batch_size: 4, lr: 1e-3, ..Default::default() };
    // Batches of different compositions, so cached rows are reassembled with other padding.
    let orders: [&[usize]; 6] = [&[0, 1, 2, 3], &[4, 5, 6, 7], &[8, 9, 10, 11], &[3, 8, 0, 5], &[11, 2, 6, 9], &[7, 1, 10, 4]];
    let batches: Vec<_> = orders.iter().map(|o| collate(&o.iter().map(|&i| &rows[i]).collect::<Vec<_>>(), lm.tokenizer.padding_id())).collect();
    if prewarm {
        for batch in batches.iter().rev() {
            interp.forward(&lm.model, batch, InferenceMode::Soft, 3).unwrap();
        }
    }
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 6).unwrap();
    for batch in &batches {
        tr.step(batch).unwrap();
    }
    (snapshot(&ps), interp.cache_stats())
}

#[test]
fn cached_states_are_canonical_and_agree_with_the_uncached_path() {
    let (plain, none) = hyperdas_params_after(false, false);
    let (cold, stats) = hyperdas_params_after(true, false);
    let (warm, _) = hyperdas_params_after(true, true);
    assert!(none.is_none());
    let stats = stats.unwrap();
    assert!(stats.hits > 0 && stats.misses > 0, "later batches must hit the cache: {stats:?}");
    assert_eq!(stats.computed as usize, stats.entries, "each distinct prompt is run through the target once");
    // What was cached before does not matter: the states are computed in fixed groups. This is
    // what makes a resumed run (empty cache) continue bit for bit.
    assert_eq!(cold, warm);
    // Against the uncached path (states computed inside each training batch): equal to float
    // tolerance (a matmul's rounding may depend on how many rows it runs on).
    for (a, b) in cold.iter().zip(&plain) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}

#[test]
fn a_cache_smaller_than_the_prompts_keeps_the_most_used_and_computes_each_needed_prompt_once() {
    // tiny-llama: 4 hidden states of 64 floats = 1 KiB per token; fixture prompts are about
    // 20–40 tokens, so 60 KiB holds a couple of prompts and most must be recomputed.
    let budget = 60 << 10;
    let (cold, stats) = hyperdas_params_with_budget(Some(budget), false);
    let (warm, _) = hyperdas_params_with_budget(Some(budget), true);
    let (plain, _) = hyperdas_params_with_budget(None, false);
    let stats = stats.unwrap();
    assert!(stats.bytes <= budget && stats.entries > 0, "{stats:?}");
    // Each look-up that misses runs its prompt once, plus at most one run of each kept prompt
    // (computed with its group); before, every miss ran a whole group of up to 16 prompts.
    assert!(stats.computed <= stats.misses + stats.entries as u64, "{stats:?}");
    // Deterministic whatever was served before (a resumed run replays the same batches), and
    // equal to the uncached path to float tolerance.
    assert_eq!(cold, warm);
    for (a, b) in cold.iter().zip(&plain) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}

#[test]
fn a_corrupt_or_missing_latest_checkpoint_falls_back_to_the_previous_one() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let adam = AdamWConfig::default();
    let ps = init_params(&cfg, 7, &dev).unwrap();
    let model = model_from_params(&ps, &cfg, &dev).unwrap();
    let mut opt = AdamW::new(&ps, adam).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint");
    step(&model, &mut opt, 1e-2);
    checkpoint::save(&ck, &ps, Some(&opt), &serde_json::json!({})).unwrap();
    let at_one = snapshot(&ps);
    step(&model, &mut opt, 1e-2);
    checkpoint::save(&ck, &ps, Some(&opt), &serde_json::json!({})).unwrap();
    let prev = hyperdas::atomic::previous(&ck);
    assert!(prev.join("state.json").is_file(), "the replaced checkpoint is kept as {}", prev.display());
    let fresh = || {
        let ps = init_params(&cfg, 99, &dev).unwrap();
        let opt = AdamW::new(&ps, adam).unwrap();
        (ps, opt)
    };
    // Intact: the latest.
    let (ps2, mut opt2) = fresh();
    assert_eq!(checkpoint::load_latest(&ck, &ps2, Some(&mut opt2), &dev).unwrap()["step"], 2);
    // One flipped byte in the latest parameters: detected by the checksum, the previous is used.
    let p = ck.join("params.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let err = checkpoint::verify(&ck).unwrap_err().to_string();
    assert!(err.contains("params.safetensors") && err.contains("corrupt"), "{err}");
    let (ps3, mut opt3) = fresh();
    assert_eq!(checkpoint::load_latest(&ck, &ps3, Some(&mut opt3), &dev).unwrap()["step"], 1);
    assert_eq!(snapshot(&ps3), at_one);
    assert_eq!(opt3.step, 1);
    // The latest gone entirely (a crash between the two renames): the previous.
    std::fs::remove_dir_all(&ck).unwrap();
    assert!(checkpoint::exists(&ck));
    let (ps4, _) = fresh();
    assert_eq!(checkpoint::load_latest(&ck, &ps4, None, &dev).unwrap()["step"], 1);
    // Both gone: a clear error.
    std::fs::remove_dir_all(&prev).unwrap();
    assert!(!checkpoint::exists(&ck));
    assert!(checkpoint::load_latest(&ck, &ps4, None, &dev).unwrap_err().to_string().contains("no checkpoint"));
}

#[test]
fn the_shipped_real_model_configs_load_for_every_method() {
    use hyperdas::experiment::run::RunConfig;
    use hyperdas::hypernet::interpreter::Method;
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"));
    let load = |file: &str, m: Method| -> RunConfig { hyperdas::config::load_over(&RunConfig::preset(m), Some(&dir.join(file)), &[]).unwrap() };
    // The recommended settings: every method at the same step budget (a fair comparison).
    for (file, model) in [
        ("smollm2-city.toml", "smollm2-135m"),
        ("gemma3-city.toml", "gemma3-270m"),
        ("archive/smollm2-city-2026-12-04.toml", "smollm2-135m"),
        ("archive/smollm2-city-2026-12-06.toml", "smollm2-135m"),
        ("archive/gemma3-city-2026-12-05.toml", "gemma3-270m"),
    ] {
        let budgets: Vec<usize> = [Method::HyperDas, Method::Mdas, Method::Das]
            .into_iter()
            .map(|m| {
                let cfg = load(file, m);
                assert_eq!((cfg.model.path.as_str(), cfg.interpreter.method), (model, m), "{file}");
                cfg.train.validate().unwrap();
                cfg.train.total_steps(10_000)
            })
            .collect();
        assert!(budgets[0] > 0 && budgets.iter().all(|&b| b == budgets[0]), "{file}: equal budgets, got {budgets:?}");
    }
    // The archived settings of earlier results: each method keeps its preset's length.
    for file in ["archive/smollm2-city-2026-12-02.toml", "archive/gemma3-city-2026-12-02.toml"] {
        for m in [Method::HyperDas, Method::Mdas, Method::Das] {
            let cfg = load(file, m);
            assert_eq!(cfg.interpreter.method, m);
            assert_eq!(cfg.train.epochs, if m.is_baseline() { 5 } else { 3 }, "{file}");
        }
    }
}
