//! The `hyperdas` binary end to end: exit codes, output, and clean errors (no panics).

mod common;

use std::process::{Command, Output};

use common::*;

fn hyperdas(args: &[&str]) -> Output {
    // Never touch the network from tests (with the `hub` feature a hub id would try).
    Command::new(env!("CARGO_BIN_EXE_hyperdas")).args(args).env("RAYON_NUM_THREADS", "1").env("HF_HUB_OFFLINE", "1").output().expect("runs")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn verify_model_with_reference_passes_on_the_tiny_model() {
    let model = fixture("tiny-llama");
    let reference = fixture("tiny-llama-reference.safetensors");
    let o = hyperdas(&["verify-model", "--model", model.to_str().unwrap(), "--reference", reference.to_str().unwrap(), "--tolerance", "1e-4"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("hidden_states") && out.contains("grad_resid_1") && out.contains("identical to the reference"), "{out}");
    assert!(out.contains("Paris is a city in the country of"), "{out}");
    assert!(!out.contains("NOT OK"));
}

#[test]
fn verify_model_fails_when_the_reference_disagrees() {
    // The qwen2 reference against the llama model: shapes differ, a clear error.
    let model = fixture("tiny-llama");
    let reference = fixture("tiny-qwen2-reference.safetensors");
    let o = hyperdas(&["verify-model", "--model", model.to_str().unwrap(), "--reference", reference.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("error:") && err.contains("tiny-qwen2-reference.safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn smollm2_says_france() {
    let Some(path) = smollm2() else { return };
    let o = hyperdas(&["verify-model", "--model", path.to_str().unwrap(), "--prompt", "Paris is a city in the country of"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let top5: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(top5.len(), 5, "{out}");
    assert!(top5.iter().any(|l| l.contains("\" France\"")), "{out}");
}

#[test]
fn bad_model_arguments_fail_cleanly() {
    for (spec, needle) in [
        ("/definitely/not/here", "no such file or directory"),
        ("smollm2-135m-typo", "not a known model"),
        ("some-org/some-model", "hub"),
    ] {
        let o = hyperdas(&["verify-model", "--model", spec]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{spec}: {err}");
        assert!(err.to_lowercase().contains(needle) && err.contains(spec), "{spec}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = hyperdas(&["verify-model", "--model", fixture("tiny-llama").to_str().unwrap(), "--dtype", "int4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("unknown dtype `int4`"));
}

#[test]
fn info_lists_sites_with_shapes() {
    let o = hyperdas(&["info", "--model", fixture("tiny-qwen2").to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("blocks.0.hook_resid_pre") && out.contains("[B, T, 48]") && out.contains("ln_final.hook_normalized"), "{out}");
    assert!(out.contains("biases               qkv true, o false"), "{out}");
}

#[test]
fn bench_forward_reports_tokens_per_second() {
    let o = hyperdas(&["bench", "forward", "--model", fixture("tiny-llama").to_str().unwrap(), "--batch", "2", "--seq", "8", "--runs", "3", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["batch"], 2);
    assert!(v["tokens_per_s_median"].as_f64().unwrap() > 0.0);
    let o = hyperdas(&["bench", "forward", "--model", fixture("tiny-llama").to_str().unwrap(), "--runs", "0"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn demo_and_fetch_list_run() {
    let o = hyperdas(&["demo"]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("hyperdas fetch smollm2-135m"));
    let o = hyperdas(&["fetch", "--list"]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("smollm2-135m"));
    let o = hyperdas(&["fetch", "nonexistent-model"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("unknown model `nonexistent-model`"));
}
