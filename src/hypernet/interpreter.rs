//! The interpreter: hypernetwork + subspace module acting on a frozen target, and the
//! efficient intervened forward pass used for training and evaluation.
//!
//! Per batch (docs/method.md §1.2, without the reference's redundant work):
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

use candle_core::{DType, Tensor};

use super::subspace::{RotationParam, SubspaceInit, SubspaceKind, SubspaceModule};
use super::{HyperConfig, HyperInput, HyperNetwork, Registrar};
use crate::data::collate::CollatedBatch;
use crate::error::{Error, Result};
use crate::intervention::mix::mix_positions;
use crate::intervention::selection::{InferenceMode, discretize, ground_truth};
use crate::model::cache::{CacheStats, StateCache};
use crate::model::{Llama, Site, Target};
use crate::params::ParamStore;
use crate::rng::Rng;

/// What learns the intervention (docs/method.md §9 for the baselines).
///
/// | method | positions | subspace | trained on |
/// |---|---|---|---|
/// | `hyperdas` | the hypernetwork's `W` | the configured module (ReflectSelect by default) | causal + isolate rows |
/// | `das` | the last entity token of base and of source | one learned `R [D, k]`: `h' = h + R Rᵀ (s − h)` | causal rows only |
/// | `mdas` | as `das` | as `das` | causal + isolate rows (RAVEL's multi-task DAS) |
///
/// The baselines have no hypernetwork: their only parameter is `subspace.rotation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Method {
    #[default]
    HyperDas,
    Das,
    Mdas,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "hyperdas" => Method::HyperDas,
            "das" => Method::Das,
            "mdas" => Method::Mdas,
            _ => return Err(Error::invalid(format!("unknown method `{s}`; valid: hyperdas, das, mdas"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::HyperDas => "hyperdas",
            Method::Das => "das",
            Method::Mdas => "mdas",
        }
    }

    /// The printed name (tables, plots).
    pub fn label(self) -> &'static str {
        match self {
            Method::HyperDas => "HyperDAS",
            Method::Das => "DAS",
            Method::Mdas => "MDAS",
        }
    }

    /// DAS or MDAS: fixed positions and one shared basis.
    pub fn is_baseline(self) -> bool {
        self != Method::HyperDas
    }

    /// Whether training uses the isolate rows (all but DAS).
    pub fn trains_on_isolate_rows(self) -> bool {
        self != Method::Das
    }
}

impl TryFrom<String> for Method {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Method::parse(&s)
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.name().to_string()
    }
}

/// Interpreter settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InterpreterConfig {
    pub hypernet: HyperConfig,
    /// For the baselines only `hypernet.layer` and `hypernet.seed` apply, and the subspace
    /// is always [`SubspaceKind::Das`].
    pub subspace: SubspaceKind,
    /// Subspace rank k.
    pub rank: usize,
    /// Householder reflections per instruction in ReflectSelect (1: the paper's module).
    #[serde(default = "one")]
    pub reflections: usize,
    #[serde(default)]
    pub method: Method,
    /// How the subspace module's new weights are initialised.
    #[serde(default)]
    pub init: SubspaceInit,
    /// How the rotation stays orthonormal.
    #[serde(default)]
    pub rotation: RotationParam,
}

fn one() -> usize {
    1
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
    /// `[B, D]` the subspace module's input `z` (its bases: [`SubspaceModule::basis`]).
    pub condition: Tensor,
}

/// The hypernetwork's reading of a batch: the clean states of base `[B, T_b, L+1, D]` and
/// source `[B, T_s, L+1, D]`, and its output (`z`, `W`).
fn pointer_pass(hypernet: &HyperNetwork, t: &mut Target, batch: &CollatedBatch, base: &crate::model::TokenBatch, source: &crate::model::TokenBatch) -> Result<(Tensor, Tensor, super::HyperOutput)> {
    let dev = base.input_ids.device().clone();
    let (b, ts, tb) = (batch.len(), batch.source_len, batch.base_len);
    let hb = t.clean(base)?; // [B, T_b, L+1, D]
    crate::profile::mark("clean base");
    let hs = t.clean(source)?; // [B, T_s, L+1, D]
    crate::profile::mark("clean source");
    let base_mask = CollatedBatch::mask_tensor(&batch.base_intervention_mask, b, tb, &dev)?; // [B, T_b]
    let source_mask = CollatedBatch::mask_tensor(&batch.source_intervention_mask, b, ts, &dev)?; // [B, T_s]
    let instruction = batch.instruction_batch(&dev)?;
    let out = hypernet.forward(&HyperInput { instruction: &instruction, base_states: &hb, base_mask: &base_mask, source_states: &hs, source_mask: &source_mask })?;
    crate::profile::mark("hypernetwork");
    Ok((hb, hs, out))
}

/// Where an interpreter intervenes.
pub enum Positions {
    /// HyperDAS: a hypernetwork's pointer head chooses, per example, which source tokens mix
    /// into which base tokens (`W [B, T_s+1, T_b]`).
    Pointer(Box<HyperNetwork>),
    /// DAS / MDAS: the last entity token of the source into the last entity token of the base.
    LastEntity,
}

impl Positions {
    /// The mode training evaluates in and a run is scored in first: soft for a pointer, the
    /// fixed positions (`groundtruth`) otherwise.
    pub fn native_mode(&self) -> InferenceMode {
        match self {
            Positions::Pointer(_) => InferenceMode::Soft,
            Positions::LastEntity => InferenceMode::GroundTruth,
        }
    }

    /// The inference modes it can be scored in: all for a pointer; only the fixed positions
    /// otherwise (there is no `W` to discretise).
    pub fn supports(&self, mode: InferenceMode) -> bool {
        matches!(self, Positions::Pointer(_)) || mode == InferenceMode::GroundTruth
    }

    /// Whether the positions are fixed (nothing to learn or regularise about them).
    pub fn is_fixed(&self) -> bool {
        matches!(self, Positions::LastEntity)
    }

    /// The hypernetwork, for a pointer.
    pub fn hypernet(&self) -> Option<&HyperNetwork> {
        match self {
            Positions::Pointer(h) => Some(h.as_ref()),
            Positions::LastEntity => None,
        }
    }
}

pub struct Interpreter {
    pub config: InterpreterConfig,
    pub positions: Positions,
    pub subspace: SubspaceModule,
    /// Clean hidden states per prompt, reused across steps ([`Interpreter::set_cache`]).
    cache: std::cell::RefCell<Option<StateCache>>,
}

impl Interpreter {
    /// Build and register every trainable parameter in `ps`.
    pub fn new(ps: &mut ParamStore, target: &Llama, config: &InterpreterConfig) -> Result<Self> {
        let mut config = config.clone();
        let positions = if config.method.is_baseline() {
            config.subspace = SubspaceKind::Das;
            config.reflections = 1;
            Positions::LastEntity
        } else {
            Positions::Pointer(Box::new(HyperNetwork::new(ps, target, &config.hypernet)?))
        };
        let c = &target.config;
        let mut r = Registrar { ps, rng: Rng::derive(config.hypernet.seed, "subspace/init"), device: target.device().clone(), frozen: Vec::new() };
        let subspace =
            SubspaceModule::new(&mut r, config.subspace, c.hidden_size, c.intermediate_size, config.rank, config.reflections, config.hypernet.seed, c.rms_norm_eps, config.init, config.rotation)?;
        Ok(Interpreter { config, positions, subspace, cache: std::cell::RefCell::new(None) })
    }

    pub fn method(&self) -> Method {
        self.config.method
    }

    /// The mode training evaluates in and the baselines are scored in: soft for HyperDAS, the
    /// fixed last-entity-token positions (`groundtruth`) for DAS and MDAS.
    pub fn native_mode(&self) -> InferenceMode {
        self.positions.native_mode()
    }

    /// The inference modes this interpreter can be scored in: all for HyperDAS; only the fixed
    /// positions for a baseline (it has no `W` to discretise).
    pub fn supports(&self, mode: InferenceMode) -> bool {
        self.positions.supports(mode)
    }

    /// Serve the clean passes from `cache` from now on (`None`: compute every batch).
    pub fn set_cache(&self, cache: Option<StateCache>) {
        *self.cache.borrow_mut() = cache;
    }

    /// Take the cache out (to hand it to the next run on the same model: a sweep).
    pub fn take_cache(&self) -> Option<StateCache> {
        self.cache.borrow_mut().take()
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

    /// The intervened pass of `batch`: clean states, positions (`mode` applied to the pointer's
    /// `W`, or the fixed last-entity positions), the subspace intervention at the layer, the
    /// rest of the target, logits at the first `label_limit` label tokens of each row.
    pub fn forward(&self, target: &Llama, batch: &CollatedBatch, mode: InferenceMode, label_limit: usize) -> Result<Intervened> {
        let dev = target.device();
        let l = self.config.hypernet.layer;
        if l >= target.num_layers() {
            return Err(Error::invalid(format!("intervention layer {l}: the target has {} blocks (use 0..{})", target.num_layers(), target.num_layers())));
        }
        if !self.supports(mode) {
            return Err(Error::invalid(format!("{} intervenes at the last entity token only: score it in the `groundtruth` mode, not `{}`", self.config.method.label(), mode.name())));
        }
        let site = Site::ResidPre(l);
        let base = batch.base_batch(dev)?;
        let source = batch.source_batch(dev)?;
        let ctx = target.context(&base)?;
        let (b, ts, tb) = (batch.len(), batch.source_len, batch.base_len);
        let mut cache = self.cache.borrow_mut();
        let mut t = Target::new(target, cache.as_mut());
        let (h, s, w, w_soft, condition) = match &self.positions {
            Positions::Pointer(hypernet) => {
                let (hb, hs, out) = pointer_pass(hypernet, &mut t, batch, &base, &source)?;
                let w = match mode {
                    InferenceMode::Soft => out.w.clone(),
                    InferenceMode::GroundTruth => ground_truth(b, ts, tb, &batch.base_entity_pos, &batch.source_entity_pos, out.w.dtype(), dev)?,
                    other => discretize(&out.w, other)?,
                }; // [B, T_s+1, T_b]
                let h = hb.narrow(2, l, 1)?.squeeze(2)?.to_dtype(DType::F32)?; // [B, T_b, D]
                let s = hs.narrow(2, l, 1)?.squeeze(2)?.to_dtype(DType::F32)?; // [B, T_s, D]
                (h, s, w, out.w, out.condition)
            }
            // DAS / MDAS: `h'[p_b] = h[p_b] + R Rᵀ (s[p_s] − h[p_b])`, every other position
            // untouched. Without a cache only blocks `0..l` of the clean passes run.
            Positions::LastEntity => {
                let h = t.clean_at(&base, site)?.to_dtype(DType::F32)?; // [B, T_b, D]
                crate::profile::mark("clean base");
                let s = t.clean_at(&source, site)?.to_dtype(DType::F32)?; // [B, T_s, D]
                crate::profile::mark("clean source");
                let w = ground_truth(b, ts, tb, &batch.base_entity_pos, &batch.source_entity_pos, DType::F32, dev)?; // [B, T_s+1, T_b]
                let condition = Tensor::zeros((b, h.dim(2)?), DType::F32, dev)?; // [B, D], unused by DAS
                (h, s, w.clone(), w, condition)
            }
        };
        let m = mix_positions(&w, &s, &h)?; // [B, T_b, D]
        let new = self.subspace.apply(&h, &m, &condition)?.to_dtype(target.dtype())?; // [B, T_b, D]
        let (k, pos, targets, valid) = batch.label_targets(label_limit);
        let positions = Tensor::from_vec(pos, (b, k), dev)?; // [B, K]
        let logits = t.run_from(site, &new, &ctx, &positions)?.to_dtype(DType::F32)?; // [B, K, V]
        crate::profile::mark("intervened");
        Ok(Intervened { logits, targets, valid: valid.iter().map(|&v| v as f32).collect(), k, w, w_soft, condition })
    }

    /// The instruction-conditioned basis each example of `batch` intervenes in, `[B, D, k]`
    /// (docs/method.md §3): `R` for DAS and MDAS (the same for every example), `(I − 2uuᵀ) R`
    /// for ReflectSelect, `R diag(σ)` for MaskSelect and Boundless DAS (the mask scales the
    /// columns). An error for `subspace = none`, which has no basis.
    pub fn basis(&self, target: &Llama, batch: &CollatedBatch) -> Result<Tensor> {
        let condition = match &self.positions {
            Positions::Pointer(hypernet) => {
                let dev = target.device();
                let (base, source) = (batch.base_batch(dev)?, batch.source_batch(dev)?);
                let mut cache = self.cache.borrow_mut();
                let mut t = Target::new(target, cache.as_mut());
                Some(pointer_pass(hypernet, &mut t, batch, &base, &source)?.2.condition) // [B, D]
            }
            Positions::LastEntity => None,
        };
        self.subspace.basis(condition.as_ref(), batch.len())
    }
}
