//! The model families beyond Llama and Gemma 3 as HyperDAS targets (parity with transformers is
//! in tests/parity.rs):
//! * Qwen 3: the Llama block with per-head q/k RMSNorms and a head_dim that is not
//!   hidden_size / heads;
//! * Mistral v0.1: every layer's attention limited to a sliding window;
//! * Gemma 2: Gemma 3's block without q/k norms, with soft-capped attention scores;
//! * OLMo 2: norms on the attention and MLP outputs instead of their inputs, q/k norms over the
//!   whole projections;
//! * Phi 3: fused q/k/v and gate/up projections, split at load (the fast path without a window);
//! * GPT-2 and GPT-NeoX: LayerNorms, ungated GELU MLPs, learned positions (GPT-2), RoPE over part
//!   of each head and a parallel residual (GPT-NeoX); the hypernetwork's blocks start from scratch.
//!
//! All but Phi 3 without a window run on the composed (autograd) path; the hypernetwork is
//! initialised from the target's first blocks (q/k norms included), and the baselines train on
//! them unchanged.

mod common;

use candle_core::DType;
use common::*;
use hyperdas::hypernet::interpreter::Method;
use hyperdas::model::QkNorm;

/// Six steps on the tiny model `name`: the prediction losses.
fn steps_on(name: &str, method: Method) -> Vec<f64> {
    six_steps(&load(&fixture(name), DType::F32), method, 1, 1)
}

fn assert_trains(name: &str, method: Method) {
    let losses = steps_on(name, method);
    assert!(losses.iter().all(|l| l.is_finite()), "{name} {method:?}: {losses:?}");
    assert!(losses[4] < losses[0] && losses[5] < losses[1], "{name} {method:?}: the loss should fall on repeated batches: {losses:?}");
}

#[test]
fn hyperdas_and_mdas_train_on_qwen3() {
    let c = load(&fixture("tiny-qwen3"), DType::F32).model.config;
    assert_eq!(c.architecture, hyperdas::model::Architecture::Qwen3);
    assert!(c.qk_norm == QkNorm::PerHead && c.head_dim == 16 && c.hidden_size == 48, "{c:?}");
    assert_trains("tiny-qwen3", Method::HyperDas);
    assert_trains("tiny-qwen3", Method::Mdas);
}

#[test]
fn hyperdas_and_mdas_train_on_mistral_with_a_sliding_window() {
    let c = load(&fixture("tiny-mistral"), DType::F32).model.config;
    assert_eq!((c.architecture, c.sliding_window), (hyperdas::model::Architecture::Mistral, Some(3)));
    assert_trains("tiny-mistral", Method::HyperDas);
    assert_trains("tiny-mistral", Method::Mdas);
}

#[test]
fn hyperdas_and_mdas_train_on_gemma2() {
    let c = load(&fixture("tiny-gemma2"), DType::F32).model.config;
    assert_eq!(c.architecture, hyperdas::model::Architecture::Gemma2);
    let g = c.gemma.as_ref().expect("Gemma extras");
    assert!(c.qk_norm == QkNorm::None && g.attn_logit_softcapping == Some(3.0) && g.final_logit_softcapping == Some(5.0), "{c:?}");
    assert_trains("tiny-gemma2", Method::HyperDas);
    assert_trains("tiny-gemma2", Method::Mdas);
}

#[test]
fn hyperdas_and_mdas_train_on_olmo2() {
    let lm = load(&fixture("tiny-olmo2"), DType::F32);
    let c = &lm.model.config;
    assert_eq!((c.architecture, c.qk_norm), (hyperdas::model::Architecture::Olmo2, QkNorm::Whole));
    let b = &lm.model.layers[0];
    assert!(b.input_layernorm.is_none() && b.post_attention_layernorm.is_none() && b.attn_output_norm.is_some() && b.mlp_output_norm.is_some());
    assert_trains("tiny-olmo2", Method::HyperDas);
    assert_trains("tiny-olmo2", Method::Mdas);
}

#[test]
fn hyperdas_and_mdas_train_on_phi3() {
    let c = load(&fixture("tiny-phi3"), DType::F32).model.config;
    assert_eq!((c.architecture, c.sliding_window), (hyperdas::model::Architecture::Phi3, None));
    assert!(c.is_llama_block(), "split at load, Phi 3 is the Llama block: the fast path");
    assert_trains("tiny-phi3", Method::HyperDas);
    assert_trains("tiny-phi3", Method::Mdas);
}

#[test]
fn phi3_windows_and_rope_variants() {
    let mut json = serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 2047, "original_max_position_embeddings": 4096
    });
    let parse = |j: &serde_json::Value| hyperdas::model::LlamaConfig::from_hf_json(j, std::path::Path::new("config.json"));
    let mini = parse(&json).unwrap();
    assert_eq!(mini.sliding_window, Some(2047), "Phi-3-mini-4k's window");
    assert!(!mini.is_llama_block());
    // longrope with factors of the wrong length names the key.
    json["rope_scaling"] = serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]});
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("short_factor"), "{err}");
    json["rope_scaling"] = serde_json::Value::Null;
    // Phi-4-mini: RoPE over three quarters of each 16-dimensional head.
    json["partial_rotary_factor"] = serde_json::json!(0.75);
    assert_eq!(parse(&json).unwrap().rotary_dims, 12);
    // A fraction that leaves an odd number of dimensions names the key.
    json["partial_rotary_factor"] = serde_json::json!(0.1);
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("partial_rotary_factor") && err.contains("even"), "{err}");
    // Other Llama-family configs refuse it, naming it.
    json["model_type"] = serde_json::json!("llama");
    json["partial_rotary_factor"] = serde_json::json!(0.5);
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("partial_rotary_factor") && err.contains("llama"), "{err}");
}

#[test]
fn hyperdas_and_mdas_train_on_gpt2() {
    let lm = load(&fixture("tiny-gpt2"), DType::F32);
    let c = &lm.model.config;
    assert_eq!((c.architecture, c.rotary_dims), (hyperdas::model::Architecture::Gpt2, 0));
    assert!(!c.is_llama_block() && lm.model.position_embeddings.is_some());
    assert!(matches!(lm.model.layers[0].input_layernorm, Some(hyperdas::model::llama::Norm::Layer(_))) && lm.model.layers[0].mlp.gate_proj.is_none());
    assert_trains("tiny-gpt2", Method::HyperDas);
    assert_trains("tiny-gpt2", Method::Mdas);
}

#[test]
fn hyperdas_and_mdas_train_on_gpt_neox() {
    let lm = load(&fixture("tiny-gpt-neox"), DType::F32);
    let c = &lm.model.config;
    assert_eq!((c.architecture, c.rotary_dims, c.head_dim), (hyperdas::model::Architecture::GptNeox, 4, 16));
    assert!(lm.model.layers.iter().all(|b| b.parallel));
    assert_trains("tiny-gpt-neox", Method::HyperDas);
    assert_trains("tiny-gpt-neox", Method::Mdas);
}

#[test]
fn gpt_family_configs_parse_and_count_their_parameters() {
    let parse = |j: &serde_json::Value| hyperdas::model::LlamaConfig::from_hf_json(j, std::path::Path::new("config.json"));
    // The hub's gpt2 (124M): 124,439,808 parameters, as transformers counts them (tied head).
    let gpt2 = serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 768,
        "n_layer": 12, "n_head": 12, "n_positions": 1024, "n_ctx": 1024, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256
    });
    let c = parse(&gpt2).unwrap();
    assert_eq!((c.head_dim, c.intermediate_size, c.num_parameters()), (64, 3072, 124_439_808));
    // Pythia-160m (transformers 4 spelling): 162,322,944 parameters, untied embed_out.
    let pythia = serde_json::json!({
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50304, "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 2048,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "use_parallel_residual": true,
        "hidden_act": "gelu", "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 0
    });
    let c = parse(&pythia).unwrap();
    assert_eq!((c.rotary_dims, c.num_parameters()), (16, 162_322_944));
    // Clear errors that name the key.
    let mut bad = gpt2.clone();
    bad["activation_function"] = serde_json::json!("relu");
    assert!(parse(&bad).unwrap_err().to_string().contains("activation_function"));
    let mut bad = pythia.clone();
    bad["rotary_pct"] = serde_json::json!(1.5);
    assert!(parse(&bad).unwrap_err().to_string().contains("rotary_pct"));
    // An architecture still unsupported names itself and lists the supported ones.
    let err = parse(&serde_json::json!({"model_type": "falcon", "architectures": ["FalconForCausalLM"]})).unwrap_err().to_string();
    assert!(err.contains("falcon") && err.contains("gpt2 (GPT2LMHeadModel)") && err.contains("gpt_neox"), "{err}");
}

#[test]
fn mistral_configs_v01_and_v03() {
    let mut json = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 4096
    });
    let parse = |j: &serde_json::Value| hyperdas::model::LlamaConfig::from_hf_json(j, std::path::Path::new("config.json"));
    let v01 = parse(&json).unwrap();
    assert_eq!(v01.sliding_window, Some(4096));
    assert!(!v01.is_llama_block());
    json["sliding_window"] = serde_json::Value::Null; // v0.3
    let v03 = parse(&json).unwrap();
    assert_eq!(v03.sliding_window, None);
    assert!(v03.is_llama_block(), "without a window Mistral is the plain Llama block (fast path)");
    json["sliding_window"] = serde_json::json!(0);
    assert!(parse(&json).unwrap_err().to_string().contains("sliding_window"));
}

#[test]
fn a_qwen3_config_parses_and_counts_its_norms() {
    let json = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "attention_bias": false
    });
    let c = hyperdas::model::LlamaConfig::from_hf_json(&json, std::path::Path::new("config.json")).unwrap();
    assert!(c.qk_norm == QkNorm::PerHead && !c.qkv_bias && c.head_dim == 32);
    // Per block: q 64×128, k and v 64×64 each, o 128×64, MLP 3·64·128, two norms of 64, q/k norms of 32.
    let block = 64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 32;
    assert_eq!(c.num_parameters(), 100 * 64 + 2 * block + 64);
    let mut sw = json.clone();
    sw["use_sliding_window"] = serde_json::json!(true);
    let err = hyperdas::model::LlamaConfig::from_hf_json(&sw, std::path::Path::new("config.json")).unwrap_err().to_string();
    assert!(err.contains("use_sliding_window"), "{err}");
}

#[test]
fn a_gpt2_with_an_odd_head_size_runs() {
    // GPT-2 has no RoPE, so nothing needs an even head size (sshleifer/tiny-gpt2 has head_dim 1):
    // n_embd 6 over 2 heads of 3, random weights in the checkpoint's own names.
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let (v, d, f, p) = (40usize, 6usize, 12usize, 16usize);
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": v, "n_embd": d, "n_layer": 1, "n_head": 2, "n_inner": f, "n_positions": p});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
    let mut t = std::collections::HashMap::new();
    for (name, shape) in [
        ("wte.weight", vec![v, d]),
        ("wpe.weight", vec![p, d]),
        ("ln_f.weight", vec![d]),
        ("ln_f.bias", vec![d]),
        ("h.0.ln_1.weight", vec![d]),
        ("h.0.ln_1.bias", vec![d]),
        ("h.0.ln_2.weight", vec![d]),
        ("h.0.ln_2.bias", vec![d]),
        ("h.0.attn.c_attn.weight", vec![d, 3 * d]),
        ("h.0.attn.c_attn.bias", vec![3 * d]),
        ("h.0.attn.c_proj.weight", vec![d, d]),
        ("h.0.attn.c_proj.bias", vec![d]),
        ("h.0.mlp.c_fc.weight", vec![d, f]),
        ("h.0.mlp.c_fc.bias", vec![f]),
        ("h.0.mlp.c_proj.weight", vec![f, d]),
        ("h.0.mlp.c_proj.bias", vec![d]),
    ] {
        t.insert(name.to_string(), r(&shape));
    }
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    let w = hyperdas::model::weights::Weights::Safetensors(hyperdas::model::weights::SafetensorsWeights::open_dir(dir.path()).unwrap());
    let c = hyperdas::model::LlamaConfig::from_hf_file(&dir.path().join("config.json")).unwrap();
    assert_eq!((c.head_dim, c.rotary_dims), (3, 0));
    let m = hyperdas::model::Llama::load(&w, &c, DType::F32, &dev).unwrap();
    let batch = hyperdas::model::TokenBatch::left_padded(&[vec![1, 2, 3, 4], vec![5, 6]], 0, &dev).unwrap();
    let h = m.forward_hidden(&batch, None).unwrap();
    let s = h.stacked.unwrap();
    assert_eq!(s.dims(), &[2, 4, 2, d]);
    assert!(s.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    // 20 positions do not fit its 16 learned ones: a clear error.
    let long = hyperdas::model::TokenBatch::left_padded(&[(0..20).collect()], 0, &dev).unwrap();
    let err = m.forward_hidden(&long, None).unwrap_err().to_string();
    assert!(err.contains("n_positions"), "{err}");
}
