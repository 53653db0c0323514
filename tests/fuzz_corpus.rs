//! Every committed fuzz seed (`fuzz/corpus/<target>/`) and every crash reproducer
//! (`fuzz/regressions/<target>/`) through the fuzz targets' bodies, on stable Rust: the
//! libFuzzer runs (docs/reliability.md) need nightly, this keeps what they found fixed in CI.

#[path = "../fuzz/fuzz_targets/bodies.rs"]
mod bodies;

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in [root.join("corpus").join(target), root.join("regressions").join(target)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            eprintln!("{target}: {}", f.display());
            body(&bytes);
            // And a few truncations of it, as a cheap stand-in for the fuzzer's mutations.
            for cut in [0, 1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len().saturating_sub(1)] {
                body(&bytes[..cut.min(bytes.len())]);
            }
            n += 1;
        }
    }
    assert!(n > 0, "no seeds for {target} under {}", root.display());
}

#[test]
fn config_json() {
    replay("config_json", bodies::config_json);
}

#[test]
fn safetensors() {
    replay("safetensors", bodies::safetensors);
}

#[test]
fn safetensors_index() {
    replay("safetensors_index", bodies::safetensors_index);
}

#[test]
fn gguf() {
    replay("gguf", bodies::gguf);
}

#[test]
fn tokenizer_json() {
    replay("tokenizer_json", bodies::tokenizer_json);
}

#[test]
fn jsonl() {
    replay("jsonl", bodies::jsonl);
}

#[test]
fn arrow() {
    replay("arrow", bodies::arrow);
}

#[test]
fn toml_config() {
    replay("toml_config", bodies::toml_config);
}
