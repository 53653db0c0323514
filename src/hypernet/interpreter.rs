//! The interpreter: hypernetwork + subspace module acting on a frozen target, and the
//! efficient intervened forward pass used for training and evaluation.
//!
//! Per batch (hyperdas-method.md §1.2, without the reference's redundant work):
//!
//! 1. one clean pass of the base and one of the source, keeping every hidden state
//!    `[B, T, L+1, D]` (read by the hypernetwork; the target is frozen, so these carry no
//!    gradient);
//! 2. the hypernetwork gives `z [B, D]` and `W [B, T_s+1, T_b]` (discretised per inference mode);
//! 3. at layer l: `m = mix(W, S_l, H_l)`, `H'_l = subspace(H_l, m, z)`;
//! 4. only blocks `l..L` run again, from `H'_l`, and only the label positions go through lm_head.
//!
//! The reference runs the full target four times and lm_head over every position; the result
//! is the same (tested against a naive full-model implementation).

use candle_core::Tensor;

use super::subspace::{SubspaceKind, SubspaceModule};
use super::{HyperConfig, HyperInput, HyperNetwork, Registrar};
use crate::data::collate::CollatedBatch;
use crate::error::{Error, Result};
use crate::intervention::mix::mix_positions;
use crate::intervention::selection::{InferenceMode, discretize, ground_truth};
use crate::model::Llama;
use crate::params::ParamStore;
use crate::rng::Rng;
use crate::train::cache::{CacheStats, StateCache};

/// Interpreter settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InterpreterConfig {
    pub hypernet: HyperConfig,
    pub subspace: SubspaceKind,
    /// Subspace rank k.
    pub rank: usize,
}

/// The intervened forward pass of a batch.
pub struct Intervened {
    /// `[B, K, V]` logits predicting the first K label tokens.
    pub logits: Tensor,
    /// `B·K` target tokens and 0/1 validity (rows with fewer label tokens are padded).
    pub targets: Vec<u32>,
    pub valid: Vec<f32>,
    pub k: usize,
    /// `[B, T_s+1, T_b]` the position weights used.
    pub w: Tensor,
    /// `[B, T_s+1, T_b]` the soft weights (for regularisers).
    pub w_soft: Tensor,
}

pub struct Interpreter {
    pub config: InterpreterConfig,
    pub hypernet: HyperNetwork,
    pub subspace: SubspaceModule,
    /// Clean hidden states per prompt, reused across steps ([`Interpreter::set_cache`]).
    cache: std::cell::RefCell<Option<StateCache>>,
}

impl Interpreter {
    /// Build and register every trainable parameter in `ps`.
    pub fn new(ps: &mut ParamStore, target: &Llama, config: &InterpreterConfig) -> Result<Self> {
        let hypernet = HyperNetwork::new(ps, target, &config.hypernet)?;
        let c = &target.config;
        let mut r = Registrar { ps, rng: Rng::derive(config.hypernet.seed, "subspace/init"), device: target.device().clone() };
        let subspace = SubspaceModule::new(&mut r, config.subspace, c.hidden_size, c.intermediate_size, config.rank, config.hypernet.seed, c.rms_norm_eps)?;
        Ok(Interpreter { config: config.clone(), hypernet, subspace, cache: std::cell::RefCell::new(None) })
    }

    /// Serve the clean passes from `cache` from now on (`None`: compute every batch).
    pub fn set_cache(&self, cache: Option<StateCache>) {
        *self.cache.borrow_mut() = cache;
    }

    /// Register the prompts of `rows` with the cache (if any): every dataset a run will use, in
    /// a fixed order, before the first step (see [`StateCache::register`]).
    pub fn register_prompts(&self, rows: &[crate::data::collate::EncodedRow]) {
        if let Some(c) = self.cache.borrow_mut().as_mut() {
            c.register(rows.iter().flat_map(|r| [r.base_ids.as_slice(), r.source_ids.as_slice()]));
        }
    }

    /// The cache's hits, misses and size, if there is one.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.borrow().as_ref().map(|c| c.stats())
    }

    /// The efficient intervened pass; `label_limit` caps the label tokens scored per row.
    pub fn forward(&self, target: &Llama, batch: &CollatedBatch, mode: InferenceMode, label_limit: usize) -> Result<Intervened> {
        let dev = target.device();
        let l = self.config.hypernet.layer;
        if l >= target.num_layers() {
            return Err(Error::invalid(format!("intervention layer {l}: the target has {} blocks (use 0..{})", target.num_layers(), target.num_layers())));
        }
        let base = batch.base_batch(dev)?;
        let source = batch.source_batch(dev)?;
        let ctx = target.context(&base)?;
        let (b, ts, tb) = (batch.len(), batch.source_len, batch.base_len);
        let mut cache = self.cache.borrow_mut();
        let hb = match cache.as_mut() {
            Some(c) => c.states(target, &batch.base_ids, &batch.base_attention, b, tb)?,
            None => target.forward_hidden(&base, None)?.stacked.ok_or_else(|| Error::invalid("no hidden states"))?,
        }
        .detach(); // [B, T_b, L+1, D]
        crate::profile::mark("clean base");
        let hs = match cache.as_mut() {
            Some(c) => c.states(target, &batch.source_ids, &batch.source_attention, b, ts)?,
            None => target.forward_hidden(&source, None)?.stacked.ok_or_else(|| Error::invalid("no hidden states"))?,
        }
        .detach(); // [B, T_s, L+1, D]
        drop(cache);
        crate::profile::mark("clean source");
        let base_mask = CollatedBatch::mask_tensor(&batch.base_intervention_mask, b, tb, dev)?;
        let source_mask = CollatedBatch::mask_tensor(&batch.source_intervention_mask, b, ts, dev)?;
        let instruction = batch.instruction_batch(dev)?;
        let out = self.hypernet.forward(&HyperInput { instruction: &instruction, base_states: &hb, base_mask: &base_mask, source_states: &hs, source_mask: &source_mask })?;
        crate::profile::mark("hypernetwork");
        let w = match mode {
            InferenceMode::Soft => out.w.clone(),
            InferenceMode::GroundTruth => ground_truth(b, ts, tb, &batch.base_entity_pos, &batch.source_entity_pos, out.w.dtype(), dev)?,
            other => discretize(&out.w, other)?,
        };
        let h = hb.narrow(2, l, 1)?.squeeze(2)?.to_dtype(candle_core::DType::F32)?; // [B, T_b, D]
        let s = hs.narrow(2, l, 1)?.squeeze(2)?.to_dtype(candle_core::DType::F32)?; // [B, T_s, D]
        let m = mix_positions(&w, &s, &h)?; // [B, T_b, D]
        let new = self.subspace.apply(&h, &m, &out.z)?.to_dtype(target.dtype())?; // [B, T_b, D]
        let (k, pos, targets, valid) = batch.label_targets(label_limit);
        let positions = Tensor::from_vec(pos, (b, k), dev)?; // [B, K]
        let logits = target.logits_from(l, &new, &ctx, &positions)?.to_dtype(candle_core::DType::F32)?; // [B, K, V]
        crate::profile::mark("intervened");
        Ok(Intervened { logits, targets, valid: valid.iter().map(|&v| v as f32).collect(), k, w, w_soft: out.w })
    }
}

/// HyperDAS's prediction loss: `(1/#label tokens) Σ w_row · CE`, `w_row` = `causal_weight` on
/// causal rows and `isolate_weight` on isolate rows.
pub fn prediction_loss(out: &Intervened, is_causal: &[bool], causal_weight: f32, isolate_weight: f32) -> Result<Tensor> {
    let weights: Vec<f32> = out.valid.iter().enumerate().map(|(i, &v)| v * if is_causal[i / out.k] { causal_weight } else { isolate_weight }).collect();
    let n: f32 = out.valid.iter().sum();
    crate::train::loss::weighted_cross_entropy(&out.logits, &out.targets, &weights, n.max(1.0))
}
