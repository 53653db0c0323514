//! Checkpoints: `params.safetensors` (every registered parameter by name),
//! `optimizer.safetensors` (AdamW moments) and `state.json` (step, caller's settings, and the
//! sha256 of both tensor files).
//!
//! Crash safety: a checkpoint is written to a temporary directory, flushed to the disk and
//! renamed into place, and the one it replaces is kept as `<dir>.prev`
//! ([`crate::atomic::write_dir_keeping`]): a kill at any moment leaves a complete latest or a
//! complete previous checkpoint. [`load_latest`] verifies the checksums and falls back to the
//! previous checkpoint, with a warning, when the latest is missing, unreadable or corrupt.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::optim::AdamW;
use crate::error::{Error, Result};
use crate::params::ParamStore;

/// Save parameters, optimizer state and `meta` into `dir` (replacing it, atomically).
pub fn save(dir: &Path, params: &ParamStore, optimizer: Option<&AdamW>, meta: &serde_json::Value) -> Result<()> {
    crate::atomic::write_dir_keeping(dir, true, |tmp| {
        save_params(params, &tmp.join("params.safetensors"))?;
        let mut state = serde_json::json!({ "meta": meta });
        let mut sums = serde_json::Map::new();
        sums.insert("params.safetensors".into(), sha256_file(&tmp.join("params.safetensors"))?.into());
        if let Some(opt) = optimizer {
            candle_core::safetensors::save(&opt.state_tensors(), tmp.join("optimizer.safetensors"))?;
            sums.insert("optimizer.safetensors".into(), sha256_file(&tmp.join("optimizer.safetensors"))?.into());
            state["step"] = serde_json::json!(opt.step);
            state["optimizer"] = serde_json::to_value(opt.config).map_err(|e| Error::invalid(e.to_string()))?;
        }
        state["sha256"] = serde_json::Value::Object(sums);
        let state_path = tmp.join("state.json");
        let text = serde_json::to_string_pretty(&state).map_err(|e| Error::invalid(e.to_string()))?;
        std::fs::write(&state_path, text).map_err(|e| Error::file(&state_path, format!("cannot write: {e}")))
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    Ok(crate::fetch::hex(&Sha256::digest(&bytes)))
}

/// Check a checkpoint's files against the sha256 sums in its `state.json` (checkpoints from
/// before the sums pass unchecked).
pub fn verify(dir: &Path) -> Result<()> {
    let s = dir.join("state.json");
    if !s.is_file() {
        return Err(Error::file(dir, "no checkpoint here (no state.json)"));
    }
    let state = crate::error::read_json(&s)?;
    if let Some(sums) = state.get("sha256").and_then(|v| v.as_object()) {
        for (name, want) in sums {
            let got = sha256_file(&dir.join(name))?;
            if Some(got.as_str()) != want.as_str() {
                return Err(Error::file(dir.join(name), "is corrupt: its sha256 differs from the one recorded in state.json"));
            }
        }
    }
    Ok(())
}

/// Whether `dir` or its previous version holds a checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join("state.json").is_file() || crate::atomic::previous(dir).join("state.json").is_file()
}

/// The step the checkpoint in `dir` was written at (its `state.json`), if one is readable.
pub fn step_of_latest(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("step")?.as_u64().map(|s| s as usize)
}

/// [`load`] from `dir` after [`verify`]ing it; when the latest checkpoint is missing, corrupt
/// or does not load, the previous one (`dir.prev`) with a warning on stderr. Returns the state
/// of the checkpoint used.
pub fn load_latest(dir: &Path, params: &ParamStore, mut optimizer: Option<&mut AdamW>, device: &Device) -> Result<serde_json::Value> {
    let latest = verify(dir).and_then(|_| load(dir, params, optimizer.as_deref_mut(), device));
    match latest {
        Ok(state) => Ok(state),
        Err(e) => {
            let prev = crate::atomic::previous(dir);
            if !prev.join("state.json").is_file() {
                return Err(e);
            }
            tracing::warn!("the latest checkpoint cannot be used ({e}); falling back to the previous one, {}", prev.display());
            verify(&prev)?;
            load(&prev, params, optimizer, device)
        }
    }
}

/// Every registered parameter, by name, as one safetensors file.
pub fn save_params(params: &ParamStore, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = params.iter().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, path).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

/// Load parameter values saved by [`save`] into `params` (every parameter must be present
/// with the same shape), the optimizer moments if given, and return `state.json`.
pub fn load(dir: &Path, params: &ParamStore, optimizer: Option<&mut AdamW>, device: &Device) -> Result<serde_json::Value> {
    let p = dir.join("params.safetensors");
    let saved = candle_core::safetensors::load(&p, device).map_err(|e| Error::file(&p, format!("cannot read: {e}")))?;
    for (name, var) in params.iter() {
        let t = saved.get(name).ok_or_else(|| Error::tensor(&p, name, "missing from the checkpoint"))?;
        if t.dims() != var.dims() {
            return Err(Error::tensor(&p, name, format!("has shape {:?}, the model expects {:?}", t.dims(), var.dims())));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    let s = dir.join("state.json");
    let state = crate::error::read_json(&s)?;
    if let Some(opt) = optimizer {
        let o = dir.join("optimizer.safetensors");
        let tensors = candle_core::safetensors::load(&o, device).map_err(|e| Error::file(&o, format!("cannot read: {e}")))?;
        let step = state.get("step").and_then(|v| v.as_u64()).ok_or_else(|| Error::key(&s, "step", "missing"))? as usize;
        opt.load_state(&tensors, step).map_err(|e| Error::file(&o, e.to_string()))?;
    }
    Ok(state)
}
