//! Bad model input gets one clear error naming the file and the key or tensor, never a panic.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn rewrite_weights(dir: &std::path::Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

#[test]
fn missing_and_unreadable_files() {
    let e = load_err(std::path::Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model") && e.contains("no such file"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("without config.json"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    std::fs::write(dir.path().join("config.json"), b"{\"model_type\": \"llama\",").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("no tokenizer.json"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("no model.safetensors"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("weights.bin");
    std::fs::write(&f, b"x").unwrap();
    let e = load_err(&f);
    assert!(e.contains("not a .gguf file"), "{e}");
}

#[test]
fn bad_config_values_name_the_key() {
    let dir = copy_dir(&fixture("tiny-llama"));
    edit_config(dir.path(), |v| v["model_type"] = "bert".into());
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("key `model_type`") && e.contains("`bert`"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    edit_config(dir.path(), |v| v["num_attention_heads"] = (-4).into());
    let e = load_err(dir.path());
    assert!(e.contains("key `num_attention_heads`"), "{e}");
}

#[test]
fn missing_misshapen_and_mistyped_tensors_are_named() {
    let dir = copy_dir(&fixture("tiny-llama"));
    rewrite_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("tensor `model.layers.1.mlp.up_proj.weight`: missing"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    rewrite_weights(dir.path(), |t| {
        t.insert("model.layers.2.self_attn.k_proj.weight".into(), Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_err(dir.path());
    assert!(e.contains("tensor `model.layers.2.self_attn.k_proj.weight`") && e.contains("expected shape [32, 64], found [64, 64]"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    rewrite_weights(dir.path(), |t| {
        t.insert("model.norm.weight".into(), Tensor::zeros(64, DType::U8, &Device::Cpu).unwrap());
    });
    let e = load_err(dir.path());
    assert!(e.contains("tensor `model.norm.weight`") && e.contains("not supported"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    rewrite_weights(dir.path(), |t| {
        t.remove("lm_head.weight");
    });
    let e = load_err(dir.path());
    assert!(e.contains("lm_head.weight") && e.contains("tie_word_embeddings"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_dir(&fixture("tiny-llama"));
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    for cut in [bytes.len() - 4, bytes.len() / 2, 100, 4] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "cut at {cut}: {e}");
    }
}

#[test]
fn broken_shard_index_is_reported() {
    let dir = copy_dir(&fixture("tiny-llama"));
    let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors.index.json") && e.contains("model-00001-of-00002.safetensors") && e.contains("does not exist"), "{e}");

    let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("not a plain file name"), "{e}");

    let index = serde_json::json!({"weight_map": {"model.nonexistent.weight": "model.safetensors"}});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.nonexistent.weight") && e.contains("not present in this shard"), "{e}");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_a_mismatch() {
    let dir = copy_dir(&fixture("tiny-llama"));
    edit_config(dir.path(), |v| v["vocab_size"] = 100.into());
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer.json") && e.contains("320 tokens") && e.contains("only 100 rows"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    std::fs::write(dir.path().join("tokenizer_config.json"), br#"{"bos_token": "<|missing|>"}"#).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer_config.json") && e.contains("key `bos_token`") && e.contains("<|missing|>"), "{e}");

    let dir = copy_dir(&fixture("tiny-llama"));
    std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer.json") && e.contains("cannot load tokenizer"), "{e}");
}
