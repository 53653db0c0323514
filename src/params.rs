//! One registry of trainable parameters, so the optimizer, checkpoints and gradient checks all
//! see the same set. Only what is registered here is trainable; target-model weights are plain
//! tensors and never are.
//!
//! [`ParamStore::check_gradients`] is the guard the project keeps against silently detached
//! graphs: candle's fused ops (`softmax_last_dim`, `rms_norm`, `rope`) return outputs with no
//! backward, so a parameter behind one gets *no* gradient and no error. After a backward pass,
//! every registered parameter must have a gradient.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Named trainable variables, in registration order.
#[derive(Default)]
pub struct ParamStore {
    entries: Vec<(String, Var)>,
    index: HashMap<String, usize>,
}

/// Which parameters a backward pass missed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GradientReport {
    /// No gradient at all: the parameter is disconnected from the loss.
    pub missing: Vec<String>,
    /// A gradient that is exactly zero everywhere (suspicious, sometimes legitimate).
    pub all_zero: Vec<String>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a trainable parameter initialised to `init` (a float tensor).
    pub fn add(&mut self, name: impl Into<String>, init: Tensor) -> Result<Var> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::invalid(format!("parameter `{name}` is registered twice")));
        }
        if !init.dtype().is_float() {
            return Err(Error::invalid(format!("parameter `{name}` must be a float tensor, got {:?}", init.dtype())));
        }
        let var = Var::from_tensor(&init)?;
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push((name, var.clone()));
        Ok(var)
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|(_, v)| v.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Which parameters got no gradient, or an all-zero one.
    pub fn gradient_report(&self, grads: &GradStore) -> Result<GradientReport> {
        let mut report = GradientReport::default();
        for (name, var) in &self.entries {
            match grads.get(var.as_tensor()) {
                None => report.missing.push(name.clone()),
                Some(g) => {
                    let max = g.abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                    if max == 0.0 {
                        report.all_zero.push(name.clone());
                    }
                }
            }
        }
        Ok(report)
    }

    /// Fail, naming them, if any registered parameter received no gradient.
    pub fn check_gradients(&self, grads: &GradStore) -> Result<GradientReport> {
        let report = self.gradient_report(grads)?;
        if !report.missing.is_empty() {
            return Err(Error::invalid(format!(
                "{} of {} trainable parameters received no gradient (a detached op on their path?): {}",
                report.missing.len(),
                self.entries.len(),
                report.missing.join(", ")
            )));
        }
        Ok(report)
    }
}
