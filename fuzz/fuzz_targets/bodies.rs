//! The fuzz targets' bodies, one function per parser of outside input. The libFuzzer targets
//! (`fuzz_targets/<name>.rs`) call them; `tests/fuzz_corpus.rs` replays every committed seed
//! and every crash reproducer through them on stable Rust, so CI runs them too.
//!
//! The loaders read files, so each input is written to a scratch directory private to this
//! process (overwritten every call). A body panics only on a real bug: an error that names
//! nothing, an accepted input that breaks an invariant, a serialisation that does not round-trip.

#![allow(dead_code)]

use candle_core::{DType, Device};
use hyperdas::data::io::{ReadOptions, read_arrow_dir, read_dataset};
use hyperdas::experiment::run::RunConfig;
use hyperdas::model::gguf::GgufFile;
use hyperdas::model::weights::{SafetensorsWeights, Weights};
use hyperdas::model::{LoadOptions, ModelSource, TextTokenizer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory for one target (created on first use; targets never share
/// one, so the replay test may run them in parallel).
pub fn scratch(target: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| std::env::temp_dir().join(format!("hyperdas-fuzz-{}", std::process::id())));
    let d = root.join(target);
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// Write `bytes` to `name` in `target`'s scratch directory and return its path.
pub fn put(target: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch(target).join(name);
    std::fs::write(&p, bytes).expect("write the input");
    p
}

/// An error must say something, and (where given) name the file it is about.
fn check_names(e: &hyperdas::Error, file: Option<&str>) {
    let s = e.to_string();
    assert!(!s.trim().is_empty(), "empty error message");
    if let Some(f) = file {
        assert!(s.contains(f), "the error does not name {f}: {s}");
    }
}

/// A tiny Llama config (vocab 16, d 8, 1 block) that the safetensors targets load models with.
pub fn tiny_config() -> hyperdas::model::LlamaConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": true
    });
    hyperdas::model::LlamaConfig::from_hf_json(&json, Path::new("config.json")).expect("valid tiny config")
}

fn check_message(e: &hyperdas::Error) {
    check_names(e, None);
}

/// HF `config.json`: any bytes either parse into a validated config or give an error naming the file.
pub fn config_json(data: &[u8]) {
    let path = put("config_json", "config.json", data);
    match hyperdas::model::LlamaConfig::from_hf_file(&path) {
        Ok(cfg) => {
            // What the loader accepts, the runtime must be able to rely on.
            assert!(cfg.validate().is_ok());
            let _ = cfg.num_parameters();
        }
        Err(e) => check_names(&e, Some("config.json")),
    }
}

/// A safetensors checkpoint: the header (lengths, offsets, dtypes, shapes) and the tensors it
/// points to; then a tiny model built from it, which checks names and shapes.
pub fn safetensors(data: &[u8]) {
    put("safetensors", "model.safetensors", data);
    let w = match SafetensorsWeights::open_dir(&scratch("safetensors")) {
        Ok(w) => Weights::Safetensors(w),
        Err(e) => return check_names(&e, Some("model.safetensors")),
    };
    // Every tensor the header lists, at the shape it claims.
    if let Ok(st) = safetensors::SafeTensors::deserialize(data) {
        for (name, view) in st.tensors() {
            let _ = w.get(&name, view.shape(), DType::F32, &Device::Cpu);
        }
    }
    let cfg = tiny_config();
    if let Err(e) = hyperdas::model::Llama::load(&w, &cfg, DType::F32, &Device::Cpu) {
        check_names(&e, Some("model.safetensors"));
    }
}

/// A sharded checkpoint's `model.safetensors.index.json`, next to one valid shard.
pub fn safetensors_index(data: &[u8]) {
    put("safetensors_index", "model-00001-of-00001.safetensors", &shard());
    let index = put("safetensors_index", "model.safetensors.index.json", data);
    match SafetensorsWeights::open_index(&index) {
        Ok(w) => {
            let w = Weights::Safetensors(w);
            let _ = w.get("a", &[2], DType::F32, &Device::Cpu);
            let _ = w.get("b", &[2, 2], DType::F32, &Device::Cpu);
        }
        Err(e) => check_names(&e, Some("model.safetensors.index.json")),
    }
}

/// One shard holding `a` [2] and `b` [2, 2] in f32.
fn shard() -> Vec<u8> {
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    for i in 0..6 {
        out.extend_from_slice(&(i as f32).to_le_bytes());
    }
    out
}

/// A GGUF file: header, metadata (the tokenizer fields included), tensor infos and data, all
/// the way to a loaded model and tokenizer.
pub fn gguf(data: &[u8]) {
    let path = put("gguf", "model.gguf", data);
    let file = match GgufFile::open(&path) {
        Ok(f) => f,
        Err(e) => return check_names(&e, Some("model.gguf")),
    };
    // Each part on its own (the full load stops at the first error).
    let _ = hyperdas::model::load::config_from_gguf(&file);
    if let Ok(tok) = TextTokenizer::from_gguf(&file) {
        let _ = tok.encode("Paris is a city in the country of");
        let _ = tok.decode(&[0, 1, 2]);
    }
    let names: Vec<String> = file.tensors.keys().cloned().collect();
    for n in names {
        let _ = file.dequantize(&n);
    }
    match hyperdas::model::load::load_source(ModelSource::Gguf(path), &LoadOptions::default()) {
        Ok(lm) => {
            let ids = lm.tokenizer.encode_prompt("Paris").unwrap_or_default();
            if !ids.is_empty() {
                let b = hyperdas::model::TokenBatch::left_padded(&[ids], lm.tokenizer.padding_id(), &candle_core::Device::Cpu);
                if let Ok(b) = b {
                    let _ = lm.model.forward_hidden(&b, Some(&[]));
                }
            }
        }
        Err(e) => check_message(&e),
    }
}

/// An HF `tokenizer.json` (with no `tokenizer_config.json`), then encoding and decoding.
pub fn tokenizer_json(data: &[u8]) {
    put("tokenizer_json", "tokenizer.json", data);
    match TextTokenizer::from_hf_dir(&scratch("tokenizer_json")) {
        Ok(t) => {
            if let Ok(ids) = t.encode_prompt("Paris is a city in the country of 12345 ünïcode") {
                let _ = t.decode(&ids);
            }
            let _ = t.padding_id();
        }
        Err(e) => check_names(&e, Some("tokenizer.json")),
    }
}

/// A RAVEL JSONL dataset, strict and with bad rows skipped.
pub fn jsonl(data: &[u8]) {
    let path = put("jsonl", "rows.jsonl", data);
    for skip_bad_rows in [false, true] {
        match read_dataset(&path, ReadOptions { skip_bad_rows }) {
            Ok(ds) => {
                let _ = ds.describe();
            }
            Err(e) => check_names(&e, Some("rows.jsonl")),
        }
    }
}

/// An HF `datasets` save_to_disk directory: the Arrow IPC data file (stream or file format).
pub fn arrow(data: &[u8]) {
    put("arrow", "state.json", br#"{"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "fuzz", "_format_type": null, "_split": null}"#);
    put("arrow", "data-00000-of-00001.arrow", data);
    for skip_bad_rows in [false, true] {
        if let Err(e) = read_arrow_dir(&scratch("arrow"), ReadOptions { skip_bad_rows }) {
            check_message(&e);
        }
    }
}

/// A TOML run config: parse (unknown keys are errors), resolve what the run resolves before
/// loading anything, and round-trip through `config.resolved.toml`'s serialisation.
pub fn toml_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let cfg: RunConfig = match hyperdas::config::load_text(text, "fuzz.toml", &[]) {
        Ok(c) => c,
        Err(e) => return check_names(&e, Some("fuzz.toml")),
    };
    let _ = cfg.interpreter.site(30);
    let _ = cfg.interpreter.resolved_layer(30);
    // What is written into a run directory must read back as the same config.
    if let Ok(out) = toml::to_string(&cfg) {
        let again: RunConfig = hyperdas::config::load_text(&out, "config.resolved.toml", &[]).expect("a serialised config reads back");
        assert_eq!(toml::to_string(&again).ok(), Some(out), "serialisation is not stable");
    }
}
