//! `--model org/name` through the Hugging Face hub (feature `hub`).
//!
//! The local HF cache (`$HF_HOME`, as `huggingface_hub` lays it out) is consulted first, so a
//! model downloaded once (by us or by Python) loads offline. Only then, unless
//! `HF_HUB_OFFLINE=1`, are missing files downloaded. Every failure says to pass a local path.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::error::{Error, Result};

const OPTIONAL: &[&str] = &["tokenizer_config.json"];

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Resolve a hub id to a local HF directory (a snapshot in the HF cache).
pub fn resolve(id: &str) -> Result<PathBuf> {
    let fail = |msg: String| Error::ModelSpec { spec: id.to_string(), msg: format!("{msg}; pass a local model directory or .gguf file instead") };
    let cache = Cache::from_env();
    let cached = cache.repo(Repo::model(id.to_string()));
    let mut required = vec!["config.json".to_string(), "tokenizer.json".to_string()];

    // Weights: a sharded index names its shards; otherwise a single model.safetensors.
    let index_name = "model.safetensors.index.json";
    let get_cached = |f: &str| cached.get(f);
    let api = if offline() { None } else { Some(ApiBuilder::from_env().with_progress(true).build().map_err(|e| fail(format!("cannot start the hub client: {e}")))?) };
    // `Ok(None)`: not in the cache and (offline or) absent from the repository.
    let fetch_one = |f: &str, optional: bool| -> Result<Option<PathBuf>> {
        if let Some(p) = get_cached(f) {
            return Ok(Some(p));
        }
        match &api {
            None => Ok(None),
            Some(api) => match api.model(id.to_string()).get(f) {
                Ok(p) => Ok(Some(p)),
                Err(_) if optional => Ok(None),
                Err(e) => Err(fail(format!("could not download `{f}` from the hub ({e}); offline machines need a local path"))),
            },
        }
    };
    match fetch_one(index_name, true)? {
        Some(index) => {
            let v = crate::error::read_json(&index)?;
            let mut shards: Vec<String> = v.get("weight_map").and_then(|m| m.as_object()).map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect()).unwrap_or_default();
            shards.sort();
            shards.dedup();
            required.extend(shards);
        }
        None => required.push("model.safetensors".to_string()),
    }
    let mut dir: Option<PathBuf> = None;
    for f in required.iter().map(String::as_str).chain(OPTIONAL.iter().copied()) {
        match fetch_one(f, OPTIONAL.contains(&f))? {
            Some(p) => {
                if dir.is_none() {
                    dir = p.parent().map(PathBuf::from);
                }
            }
            None if OPTIONAL.contains(&f) => {}
            None if api.is_none() => {
                return Err(fail(format!("`{f}` is not in the local HF cache ({}) and HF_HUB_OFFLINE is set", cache.path().display())));
            }
            None => return Err(fail(format!("the repository has no `{f}`"))),
        }
    }
    dir.ok_or_else(|| fail("nothing found".to_string()))
}
