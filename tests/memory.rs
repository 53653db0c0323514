//! `hyperdas bench train --dry-run`: the memory estimate of a training step
//! (`hyperdas::experiment::memory`) against what a step really takes.

mod common;

use std::process::Command;

use common::*;
use hyperdas::experiment::memory::trainable_parameters;
use hyperdas::hypernet::Frozen;
use hyperdas::hypernet::interpreter::{Interpreter, Method};
use hyperdas::hypernet::subspace::{RotationParam, SubspaceInit, SubspaceKind};
use hyperdas::model::LoadOptions;

/// The analytic parameter count is the interpreter's, for every family layout (biases, q/k
/// norms, blocks from scratch) and subspace module.
#[test]
fn trainable_parameters_are_counted_exactly() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-olmo2", "tiny-gpt2", "tiny-gpt-neox"] {
        let lm = hyperdas::model::load(&fixture(name).display().to_string(), &LoadOptions::default()).unwrap();
        for (method, kind, init, rotation, reflections) in [
            (Method::HyperDas, SubspaceKind::ReflectSelect, SubspaceInit::Ours, RotationParam::Retraction, 1),
            (Method::HyperDas, SubspaceKind::ReflectSelect, SubspaceInit::Ours, RotationParam::Retraction, 3),
            (Method::HyperDas, SubspaceKind::MaskSelect, SubspaceInit::Ours, RotationParam::Householder, 1),
            (Method::HyperDas, SubspaceKind::Boundless, SubspaceInit::Ours, RotationParam::Retraction, 1),
            (Method::HyperDas, SubspaceKind::None, SubspaceInit::Ours, RotationParam::Retraction, 1),
            (Method::HyperDas, SubspaceKind::Das, SubspaceInit::Ours, RotationParam::Retraction, 1),
            (Method::Mdas, SubspaceKind::Das, SubspaceInit::Ours, RotationParam::Retraction, 4),
        ] {
            for (self_bias, freeze) in [(0.0, vec![]), (5.0, vec![Frozen::Embedding]), (0.0, vec![Frozen::Mlps]), (0.0, vec![Frozen::Embedding, Frozen::Blocks])] {
                let mut cfg = interpreter_config(method, 1, 2, 4, 0);
                cfg.subspace = kind;
                cfg.init = init;
                cfg.rotation = rotation;
                cfg.reflections = reflections;
                cfg.hypernet.self_bias = self_bias;
                cfg.hypernet.freeze = freeze.clone();
                let mut ps = hyperdas::params::ParamStore::new();
                Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
                assert_eq!(trainable_parameters(&lm.model.config, &cfg), ps.num_elements(), "{name} {method:?} {kind:?} ×{reflections} self_bias {self_bias} freeze {freeze:?}");
            }
        }
    }
}

/// A synthetic Llama configuration written to a temporary file: `[D, L, V, F, H, H_kv]`.
fn synthetic_config(dir: &std::path::Path, name: &str, [d, layers, vocab, f, heads, kv]: [usize; 6]) -> String {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": d, "intermediate_size": f, "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    format!("synthetic:{}", path.display())
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hyperdas")).arg("--json").args(["bench", "train"]).args(args).output().unwrap();
    assert!(out.status.success(), "bench train {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The dry run's peak is within 15 % of the peak RSS of the same steps run for real, on small
/// synthetic targets in f32 and bf16 (the bar; docs/gpu.md gives the measured errors).
#[test]
fn the_dry_run_estimate_is_within_15_percent_of_the_measured_peak() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (synthetic_config(dir.path(), "narrow", [256, 4, 8000, 768, 4, 2]), "f32", "16"),
        (synthetic_config(dir.path(), "wide-kv", [256, 4, 8000, 768, 4, 4]), "f32", "8"),
        (synthetic_config(dir.path(), "deep", [256, 8, 16000, 768, 4, 1]), "bf16", "8"),
    ];
    for (model, dtype, batch) in &cases {
        let args = ["--model", model.as_str(), "--dtype", dtype, "--batch", batch, "--no-cache", "--steps", "2", "--warmup", "0", "--layer", "2", "--max-tokens", "120"];
        let mut dry = args.to_vec();
        dry.push("--dry-run");
        let estimate = bench_json(&dry)["peak_bytes"].as_f64().unwrap();
        let measured = bench_json(&args)["peak_rss_bytes"].as_f64().unwrap();
        let err = (estimate - measured) / measured;
        eprintln!("{model} {dtype} batch {batch}: estimate {:.3} GB, measured {:.3} GB ({:+.1} %)", estimate / 1e9, measured / 1e9, 100.0 * err);
        assert!(err.abs() <= 0.15, "{model} {dtype} batch {batch}: estimate {estimate:.3e} B against a measured peak of {measured:.3e} B ({:+.1} %)", 100.0 * err);
    }
}

/// The paper's shape: the dry run reads no weights, so `synthetic:llama3-8b` is estimated on any
/// machine, at the lengths given.
#[test]
fn llama3_8b_is_estimated_without_its_weights() {
    let v = bench_json(&["--model", "synthetic:llama3-8b", "--dtype", "bf16", "--batch", "16", "--layer", "15", "--dry-run", "--lengths", "30,30,12", "--no-cache"]);
    let e = &v["estimate"];
    assert_eq!(e["target_weights"].as_f64().unwrap(), 8_030_261_248.0 * 2.0, "bf16 weights");
    let peak = v["peak_bytes"].as_f64().unwrap();
    assert!((20e9..60e9).contains(&peak), "{peak}");
    let out = Command::new(env!("CARGO_BIN_EXE_hyperdas")).args(["bench", "train", "--model", "synthetic:llama3-8b", "--dry-run", "--lengths", "30,30"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("base,source,instruction"), "{}", String::from_utf8_lossy(&out.stderr));
}
