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
//!
//! Our own rather than candle-nn's `AdamW`: that one has one learning rate and one decay for all
//! its variables and no state to save, while a run needs parameter groups (the rotation's and the
//! mask's learning rates, decay on matrices only), global clipping, and moments in checkpoints
//! for an exact `--resume`.

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
    /// Decay vectors too (norm gains, biases), as the reference's single AdamW group does.
    pub decay_vectors: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: Some(1.0), decay_vectors: false }
    }
}

struct Slot {
    name: String,
    var: Var,
    moments: Moments,
    decay: bool,
    /// Parameter-group overrides: a fixed learning rate and weight decay.
    group: Option<Group>,
}

/// First and second moments: on the host for CPU f32 parameters (updated in place by one
/// fused pass, [`FusedUpdate`]), else as tensors (updated by composed ops).
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Tensors { m: Tensor, v: Tensor },
}

impl Moments {
    fn new(var: &Var) -> Result<Self> {
        let t = var.as_tensor();
        if crate::model::kernels::fused_enabled() && t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
            let n = t.elem_count();
            return Ok(Moments::Host { m: vec![0.0; n], v: vec![0.0; n] });
        }
        let zeros = t.zeros_like()?.to_dtype(DType::F32)?;
        Ok(Moments::Tensors { m: zeros.clone(), v: zeros })
    }

    fn tensors(&self, shape: &[usize], device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (Tensor::from_slice(m, shape, device)?, Tensor::from_slice(v, shape, device)?),
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }
}

/// The AdamW update of one CPU f32 parameter in one pass over `θ, g, m, v`, with the same
/// f32 arithmetic, in the same order, as the composed path.
struct FusedUpdate<'a> {
    m: std::cell::RefCell<&'a mut [f32]>,
    v: std::cell::RefCell<&'a mut [f32]>,
    scale: f32,
    beta1: f32,
    beta2: f32,
    /// 1 − β1, 1 − β2 (rounded from f64, as the composed path's scalars are).
    one_b1: f32,
    one_b2: f32,
    /// 1 / (1 − β1ᵗ), 1 / (1 − β2ᵗ).
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    lr: f32,
    wd: f32,
}

impl candle_core::InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "hyperdas-adamw"
    }

    fn cpu_fwd(&self, dst: &mut candle_core::CpuStorage, dst_l: &candle_core::Layout, gs: &candle_core::CpuStorage, gl: &candle_core::Layout) -> candle_core::Result<()> {
        let (candle_core::CpuStorage::F32(theta), candle_core::CpuStorage::F32(g)) = (dst, gs) else { candle_core::bail!("fused AdamW: f32 only") };
        let (Some((t0, t1)), Some((g0, g1))) = (dst_l.contiguous_offsets(), gl.contiguous_offsets()) else { candle_core::bail!("fused AdamW: not contiguous") };
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if theta.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            candle_core::bail!("fused AdamW: size mismatch");
        }
        use rayon::prelude::*;
        const C: usize = 1 << 16;
        let (scale, beta1, beta2, inv_bc1, inv_bc2, eps, lr, wd) = (self.scale, self.beta1, self.beta2, self.inv_bc1, self.inv_bc2, self.eps, self.lr, self.wd);
        let (one_b1, one_b2) = (self.one_b1, self.one_b2);
        theta.par_chunks_mut(C).zip(g.par_chunks(C)).zip(m.par_chunks_mut(C).zip(v.par_chunks_mut(C))).for_each(|((th, g), (m, v))| {
            for (((th, &g), m), v) in th.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = if scale != 1.0 { g * scale + 0.0 } else { g };
                *m = (*m * beta1 + 0.0) + (g * one_b1 + 0.0);
                *v = (*v * beta2 + 0.0) + (g * g * one_b2 + 0.0);
                let m_hat = *m * inv_bc1 + 0.0;
                let v_hat = *v * inv_bc2 + 0.0;
                let mut update = m_hat / (v_hat.sqrt() + eps);
                if wd != 0.0 {
                    update += *th * wd + 0.0;
                }
                *th -= update * lr + 0.0;
            }
        });
        Ok(())
    }
}

/// Σ g² in f64 over a fixed split of `g` (deterministic whatever the thread count).
fn host_sum_sq(g: &Tensor) -> Result<Option<f64>> {
    if !(crate::model::kernels::fused_enabled() && g.device().is_cpu() && g.dtype() == DType::F32) {
        return Ok(None);
    }
    let g = g.contiguous()?;
    let (st, l) = g.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)), Some((a, b))) = (&*st, l.contiguous_offsets()) else { return Ok(None) };
    use rayon::prelude::*;
    let parts: Vec<f64> = all[a..b].par_chunks(1 << 16).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).collect();
    Ok(Some(parts.iter().sum()))
}

/// A parameter group's own learning rate and weight decay (e.g. HyperDAS's rotation:
/// lr 1e-3, no weight decay), instead of the schedule's rate and the default decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    pub lr: GroupLr,
    pub weight_decay: f64,
}

/// A group's learning rate: its own, or a multiple of the rate the step is given (the schedule's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GroupLr {
    Fixed(f64),
    Scaled(f64),
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
            slots.push(Slot { name: name.to_string(), var: var.clone(), moments: Moments::new(var)?, decay: config.decay_vectors || var.rank() >= 2, group: group(name) });
        }
        Ok(AdamW { config, step: 0, slots })
    }

    /// Count a step without an update (a skipped non-finite batch), so the step counter, which
    /// checkpoints record and resumes replay the data order from, stays the loop's.
    pub fn skip_step(&mut self) {
        self.step += 1;
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepInfo> {
        let c = self.config;
        // Global norm (host scalar: one small reduction per parameter).
        let mut sq = 0f64;
        let mut missing = 0;
        let mut bad: Vec<&str> = Vec::new();
        for s in &self.slots {
            match grads.get(s.var.as_tensor()) {
                Some(g) => {
                    let x = match host_sum_sq(g)? {
                        Some(x) => x,
                        None => g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?,
                    };
                    if !x.is_finite() {
                        bad.push(&s.name);
                    }
                    sq += x;
                }
                None => missing += 1,
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            // Name the groups and (some of) the parameters, so the user knows where to look.
            let group_of = |n: &str| if self.slots.iter().any(|s| s.name == n && s.group.is_some()) { "its own group" } else { "the default group" };
            let named: Vec<String> = bad.iter().take(4).map(|n| format!("{n} ({})", group_of(n))).collect();
            let more = if bad.len() > 4 { format!(" and {} more", bad.len() - 4) } else { String::new() };
            return Err(Error::NonFinite(format!(
                "non-finite gradient at step {} in {}{more}; nothing was updated (lower the learning rate, or set train.skip_nonfinite = true to skip such batches)",
                self.step + 1,
                if named.is_empty() { "the global norm".to_string() } else { named.join(", ") }
            )));
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
            let (lr, wd) = match s.group {
                Some(Group { lr: GroupLr::Fixed(x), weight_decay }) => (x, weight_decay),
                Some(Group { lr: GroupLr::Scaled(x), weight_decay }) => (lr * x, weight_decay),
                None => (lr, if s.decay { c.weight_decay } else { 0.0 }),
            };
            match &mut s.moments {
                Moments::Host { m, v } if g.dtype() == DType::F32 && g.device().is_cpu() => {
                    let op = FusedUpdate {
                        m: std::cell::RefCell::new(m.as_mut_slice()),
                        v: std::cell::RefCell::new(v.as_mut_slice()),
                        scale: scale as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        one_b1: (1.0 - c.beta1) as f32,
                        one_b2: (1.0 - c.beta2) as f32,
                        inv_bc1: (1.0 / bc1) as f32,
                        inv_bc2: (1.0 / bc2) as f32,
                        eps: c.eps as f32,
                        lr: lr as f32,
                        wd: wd as f32,
                    };
                    s.var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                moments => {
                    let (m0, v0) = moments.tensors(s.var.dims(), s.var.device())?;
                    let g = g.detach().to_dtype(DType::F32)?;
                    let g = if scale != 1.0 { g.affine(scale, 0.0)? } else { g };
                    let m = ((m0.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?).detach();
                    let v = ((v0.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?).detach();
                    let m_hat = m.affine(1.0 / bc1, 0.0)?;
                    let v_hat = v.affine(1.0 / bc2, 0.0)?;
                    let theta = s.var.as_tensor().detach();
                    let mut update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    if wd != 0.0 {
                        update = (update + theta.affine(wd, 0.0)?)?;
                    }
                    let new = (theta - update.affine(lr, 0.0)?)?;
                    s.var.set(&new.to_dtype(s.var.dtype())?)?;
                    *moments = Moments::Tensors { m, v };
                }
            }
        }
        Ok(StepInfo { grad_norm, missing })
    }

    /// Moments by name (`exp_avg.{param}`, `exp_avg_sq.{param}`), for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            // Host moments become tensors here (a copy); only checkpoints ask for them.
            if let Ok((m, v)) = s.moments.tensors(s.var.dims(), s.var.device()) {
                out.insert(format!("exp_avg.{}", s.name), m);
                out.insert(format!("exp_avg_sq.{}", s.name), v);
            }
        }
        out
    }

    /// Restore moments saved by [`state_tensors`](Self::state_tensors) and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for s in &mut self.slots {
            let mut loaded = Vec::with_capacity(2);
            for prefix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{prefix}.{}", s.name);
                let t = tensors.get(&key).ok_or_else(|| Error::invalid(format!("optimizer state has no `{key}`")))?;
                if t.dims() != s.var.dims() {
                    return Err(Error::invalid(format!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), s.var.dims())));
                }
                loaded.push(t.to_dtype(DType::F32)?.to_device(s.var.device())?);
            }
            let (m, v) = (loaded.remove(0), loaded.remove(0));
            s.moments = match &s.moments {
                Moments::Host { .. } => Moments::Host { m: m.flatten_all()?.to_vec1()?, v: v.flatten_all()?.to_vec1()? },
                Moments::Tensors { .. } => Moments::Tensors { m, v },
            };
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_non_finite_gradient_names_the_parameter_and_updates_nothing() {
        let mut ps = ParamStore::new();
        ps.add("subspace.rotation", Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap()).unwrap();
        ps.add("hypernet.embed", Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap()).unwrap();
        let rot = ps.get("subspace.rotation").unwrap().clone();
        let emb = ps.get("hypernet.embed").unwrap().clone();
        let before = rot.as_tensor().to_vec2::<f32>().unwrap();
        let bad = Tensor::new(&[[f32::NAN, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let loss = ((rot.as_tensor() * &bad).unwrap().sum_all().unwrap() + emb.as_tensor().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = AdamW::with_groups(&ps, AdamWConfig::default(), |n| (n == "subspace.rotation").then_some(Group { lr: GroupLr::Fixed(1e-3), weight_decay: 0.0 })).unwrap();
        let err = opt.step(&grads, 1e-3).unwrap_err();
        assert!(matches!(err, Error::NonFinite(_)));
        let msg = err.to_string();
        assert!(msg.contains("step 1") && msg.contains("subspace.rotation (its own group)") && !msg.contains("hypernet.embed") && msg.contains("skip_nonfinite"), "{msg}");
        assert_eq!(rot.as_tensor().to_vec2::<f32>().unwrap(), before, "nothing updated");
        assert_eq!(opt.step, 0);
        opt.skip_step();
        assert_eq!(opt.step, 1);
    }

    /// Two steps on f(θ) = ½‖θ‖² checked against the update equations evaluated by hand.
    #[test]
    fn matches_the_equations() {
        let mut ps = ParamStore::new();
        let w = ps.add("w", Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap()).unwrap();
        let b = ps.add("b", Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, grad_clip: None, decay_vectors: false };
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
    fn fused_host_update_equals_the_composed_update() {
        // Same parameters, gradients and settings; one optimizer on host moments (one fused
        // pass), one on tensor moments (composed ops): identical after a few clipped steps.
        let init = Tensor::new(&[[0.3f32, -1.2, 2.0], [0.7, -0.1, 0.05]], &Device::Cpu).unwrap();
        let run = |composed: bool| -> (Vec<f32>, f64) {
            let mut ps = ParamStore::new();
            let w = ps.add("w", init.copy().unwrap()).unwrap();
            let b = ps.add("b", Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap()).unwrap();
            let cfg = AdamWConfig { grad_clip: Some(0.5), weight_decay: 0.1, ..Default::default() };
            let mut opt = AdamW::with_groups(&ps, cfg, |n| (n == "b").then_some(Group { lr: GroupLr::Fixed(0.03), weight_decay: 0.0 })).unwrap();
            if composed {
                for s in &mut opt.slots {
                    let z = s.var.as_tensor().zeros_like().unwrap();
                    s.moments = Moments::Tensors { m: z.clone(), v: z };
                }
            } else {
                assert!(opt.slots.iter().all(|s| matches!(s.moments, Moments::Host { .. })));
            }
            let mut norm = 0.0;
            for _ in 0..4 {
                let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap() * 1.5).unwrap() + b.as_tensor().sum_all().unwrap()).unwrap();
                norm = opt.step(&loss.backward().unwrap(), 0.01).unwrap().grad_norm;
            }
            let mut out: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            out.extend(b.as_tensor().to_vec1::<f32>().unwrap());
            let state = opt.state_tensors();
            let mut keys: Vec<&String> = state.keys().collect();
            keys.sort();
            for k in keys {
                out.extend(state[k].flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            (out, norm)
        };
        let (fused, nf) = run(false);
        let (composed, nc) = run(true);
        assert!((nf - nc).abs() < 1e-9 * nc);
        assert_eq!(fused.len(), composed.len());
        for (a, b) in fused.iter().zip(&composed) {
            assert!((a - b).abs() <= 1e-7 * b.abs().max(1.0), "{fused:?} vs {composed:?}");
        }
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
