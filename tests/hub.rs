//! `--model org/name` through the HF cache (feature `hub`), offline: a snapshot laid out the way
//! `huggingface_hub` does is found without any network access; a missing one fails clearly.
#![cfg(feature = "hub")]

mod common;

use std::process::Command;

use common::*;

fn fake_hf_cache() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--test-org--tiny-llama");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), rev).unwrap();
    home
}

#[test]
fn hub_ids_resolve_from_the_local_cache_offline() {
    let home = fake_hf_cache();
    let reference = fixture("tiny-llama-reference.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_hyperdas"))
        .args(["verify-model", "--model", "test-org/tiny-llama", "--reference", reference.to_str().unwrap(), "--tolerance", "1e-4"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("identical to the reference") && !out.contains("NOT OK"), "{out}");

    let o = Command::new(env!("CARGO_BIN_EXE_hyperdas")).args(["info", "--model", "test-org/not-downloaded"]).env("HF_HOME", home.path()).env("HF_HUB_OFFLINE", "1").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("test-org/not-downloaded") && err.contains("HF_HUB_OFFLINE") && err.contains("local model directory"), "{err}");
}
