//! AdamW over a [`ParamStore`].
//!
//! Per parameter θ with gradient g, at step t (1-based), learning rate η:
//!
//! ```text
//! m ← β1 m + (1 − β1) g          v ← β2 v + (1 − β2) g²
//! m̂ = m / (1 − β1ᵗ)             v̂ = v / (1 − β2ᵗ)
//! θ ← θ − η (m̂ / (√v̂ + ε) + λ θ)      (λ only on decayed parameters)
//! ```
//!
//! Gradients may first be clipped to a global L2 norm. Weight decay applies to matrices
//! (rank ≥ 2) only, not to norms' gains or biases, as is usual for transformers.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::params::ParamStore;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (None: no clipping).
    pub grad_clip: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: Some(1.0) }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
    /// Parameter-group overrides: a fixed learning rate and weight decay.
    group: Option<Group>,
}

/// A parameter group's own learning rate and weight decay (e.g. HyperDAS's rotation:
/// lr 1e-3, no weight decay), instead of the schedule's rate and the default decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    pub lr: f64,
    pub weight_decay: f64,
}

/// The optimizer and its state.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: usize,
    slots: Vec<Slot>,
}

/// What one step saw.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Parameters that had no gradient this step (skipped).
    pub missing: usize,
}

impl AdamW {
    pub fn new(params: &ParamStore, config: AdamWConfig) -> Result<Self> {
        Self::with_groups(params, config, |_| None)
    }

    /// Like [`new`](Self::new), with `group(name)` giving a parameter its own group.
    pub fn with_groups(params: &ParamStore, config: AdamWConfig, group: impl Fn(&str) -> Option<Group>) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params.iter() {
            let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
            slots.push(Slot { name: name.to_string(), var: var.clone(), m: zeros.clone(), v: zeros, decay: var.rank() >= 2, group: group(name) });
        }
        Ok(AdamW { config, step: 0, slots })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepInfo> {
        let c = self.config;
        // Global norm (host scalar: one small reduction per parameter).
        let mut sq = 0f64;
        let mut missing = 0;
        for s in &self.slots {
            match grads.get(s.var.as_tensor()) {
                Some(g) => sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?,
                None => missing += 1,
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::invalid(format!("non-finite gradient norm at step {} (lower the learning rate?)", self.step + 1)));
        }
        let scale = match c.grad_clip {
            Some(max) if grad_norm > max => max / grad_norm,
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            let g = g.detach().to_dtype(DType::F32)?;
            let g = if scale != 1.0 { g.affine(scale, 0.0)? } else { g };
            s.m = ((s.m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?).detach();
            s.v = ((s.v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?).detach();
            let m_hat = s.m.affine(1.0 / bc1, 0.0)?;
            let v_hat = s.v.affine(1.0 / bc2, 0.0)?;
            let theta = s.var.as_tensor().detach();
            let (lr, wd) = match s.group {
                Some(g) => (g.lr, g.weight_decay),
                None => (lr, if s.decay { c.weight_decay } else { 0.0 }),
            };
            let mut update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            if wd != 0.0 {
                update = (update + theta.affine(wd, 0.0)?)?;
            }
            let new = (theta - update.affine(lr, 0.0)?)?;
            s.var.set(&new.to_dtype(s.var.dtype())?)?;
        }
        Ok(StepInfo { grad_norm, missing })
    }

    /// Moments by name (`exp_avg.{param}`, `exp_avg_sq.{param}`), for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("exp_avg.{}", s.name), s.m.clone());
            out.insert(format!("exp_avg_sq.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restore moments saved by [`state_tensors`](Self::state_tensors) and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for s in &mut self.slots {
            for (prefix, slot) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = tensors.get(&key).ok_or_else(|| Error::invalid(format!("optimizer state has no `{key}`")))?;
                if t.dims() != slot.dims() {
                    return Err(Error::invalid(format!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), slot.dims())));
                }
                *slot = t.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on f(θ) = ½‖θ‖² checked against the update equations evaluated by hand.
    #[test]
    fn matches_the_equations() {
        let mut ps = ParamStore::new();
        let w = ps.add("w", Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap()).unwrap();
        let b = ps.add("b", Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, grad_clip: None };
        let mut opt = AdamW::new(&ps, cfg).unwrap();
        let (mut wr, mut br) = (vec![1.0f64, -2.0, 0.5, 3.0], vec![1.0f64, -1.0]);
        let (mut m, mut v) = (vec![0.0f64; 6], vec![0.0f64; 6]);
        for t in 1..=2 {
            let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap() + b.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1).unwrap();
            // Reference in f64: gradient = θ.
            for (i, th) in wr.iter_mut().chain(br.iter_mut()).enumerate() {
                let g = *th;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.99 * v[i] + 0.01 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                let decay = if i < 4 { 0.1 * *th } else { 0.0 };
                *th -= 0.1 * (mh / (vh.sqrt() + 1e-8) + decay);
            }
        }
        let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for (g, r) in got.iter().zip(&wr) {
            assert!((*g as f64 - r).abs() < 1e-6, "{got:?} vs {wr:?}");
        }
        let got: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        for (g, r) in got.iter().zip(&br) {
            assert!((*g as f64 - r).abs() < 1e-6, "{got:?} vs {br:?}");
        }
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let mut ps = ParamStore::new();
        let w = ps.add("w", Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { grad_clip: Some(1.0), weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(&ps, cfg).unwrap();
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let info = opt.step(&loss.backward().unwrap(), 0.01).unwrap();
        assert!((info.grad_norm - 5.0).abs() < 1e-6);
        // The first Adam step moves each coordinate by ~lr regardless of scale.
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!((got[0] - 2.99).abs() < 1e-4 && (got[1] - 3.99).abs() < 1e-4, "{got:?}");
    }
}
