//! Checkpoints: `params.safetensors` (every registered parameter by name),
//! `optimizer.safetensors` (AdamW moments) and `state.json` (step + caller's settings).
//! Written through [`crate::atomic::write_dir`], so a checkpoint is complete or absent.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::optim::AdamW;
use crate::error::{Error, Result};
use crate::params::ParamStore;

/// Save parameters, optimizer state and `meta` into `dir` (replacing it, atomically).
pub fn save(dir: &Path, params: &ParamStore, optimizer: Option<&AdamW>, meta: &serde_json::Value) -> Result<()> {
    crate::atomic::write_dir(dir, |tmp| {
        save_params(params, &tmp.join("params.safetensors"))?;
        let mut state = serde_json::json!({ "meta": meta });
        if let Some(opt) = optimizer {
            candle_core::safetensors::save(&opt.state_tensors(), tmp.join("optimizer.safetensors"))?;
            state["step"] = serde_json::json!(opt.step);
            state["optimizer"] = serde_json::to_value(opt.config).map_err(|e| Error::invalid(e.to_string()))?;
        }
        let state_path = tmp.join("state.json");
        let text = serde_json::to_string_pretty(&state).map_err(|e| Error::invalid(e.to_string()))?;
        std::fs::write(&state_path, text).map_err(|e| Error::file(&state_path, format!("cannot write: {e}")))
    })
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
