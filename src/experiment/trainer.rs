//! HyperDAS training and evaluation loops over encoded RAVEL rows (docs/method.md §5–7).
//!
//! Loss per step: `L = L_pred + λ_sp(step) · sparsity(W)` with
//! `L_pred = (1/#label tokens) Σ w_row CE` (causal rows `causal_weight`, isolate rows
//! `isolate_weight`). Optimizer: AdamW with two groups: the rotation (fixed `rotation_lr`, no
//! weight decay) and everything else (`lr` with warm-up + cosine, `weight_decay`); global
//! gradient clipping; the rotation is retracted to orthonormal after every step.
//!
//! Scores: a row is correct when the arg-max at each of its first `label_limit` label tokens is
//! the label token (teacher-forced, one pass). Cause = accuracy on causal rows, Isolate on
//! isolate rows, Disentangle = their mean (Cause alone when there are no isolate rows).

use std::time::Instant;

use candle_core::D;
use serde::{Deserialize, Serialize};

use super::loss::{Regularizer, Terms, objective, prediction_loss};
use crate::data::collate::{CollatedBatch, EncodedRow, collate};
use crate::error::{Error, Result};
use crate::hypernet::interpreter::Interpreter;
use crate::hypernet::subspace::{SubspaceKind, temperature};
use crate::intervention::selection::{InferenceMode, argmax};
use crate::model::Llama;
use crate::params::ParamStore;
use crate::rng::Rng;
use crate::train::{AdamW, AdamWConfig, Decay, Group, GroupLr, MetricsLog, Schedule, share_of};

/// How the state cache stores hidden states (`train.state_cache_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    /// Exact: training is bit-identical with and without the cache.
    F32,
    F16,
    Bf16,
}

/// Training settings (`[train]`; docs/hyperdas.md lists the defaults and their sources).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    pub epochs: usize,
    /// The budget in optimizer steps (0: `epochs` passes over the training rows). When set, it
    /// replaces `epochs`: the data is cycled (a fresh seeded order each pass) until this many
    /// steps are done, and every schedule's horizon is this number. Equal budgets for methods
    /// compared mean equal `steps × batch_size`.
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub rotation_lr: f64,
    pub warmup_steps: usize,
    /// After the warm-up: `cosine` (to 0 at the last step), `linear` (to 0) or `constant` (the
    /// reference: no schedule).
    pub lr_decay: Decay,
    /// Global gradient-norm clipping (0: none, as the reference's MDAS).
    pub grad_clip: f64,
    pub causal_weight: f32,
    pub isolate_weight: f32,
    /// Regulariser on the source rows of W: `sparsity` (reference A, scheduled), `entropy`
    /// (reference B, constant `entropy_weight`) or `none`.
    pub regularizer: Regularizer,
    /// Sparsity weight: linear from start to end, zero for the first `warmup_ratio` of steps.
    pub sparsity_start: f64,
    pub sparsity_end: f64,
    pub sparsity_warmup_ratio: f64,
    pub entropy_weight: f64,
    /// Label tokens scored per row (evaluation, and the training loss unless
    /// `loss_label_limit` says otherwise).
    pub label_limit: usize,
    /// Label tokens the training loss reads per row (0: every label token, as the reference;
    /// default: `label_limit`'s 3).
    pub loss_label_limit: usize,
    /// Mask temperature of mask_select and boundless: linear from `temperature_start` at step 0
    /// to `temperature_end` at the last step (the reference's 50 → 0.1); evaluation after
    /// training uses `temperature_end`.
    pub temperature_start: f64,
    pub temperature_end: f64,
    /// Fixed learning rate of the mask parameters (mask_select's MLP, boundless's boundary; the
    /// reference's `boundary_lr`).
    pub mask_lr: f64,
    /// Apply weight decay to vectors (norm gains) too, as the reference (default: matrices only).
    pub decay_norms: bool,
    /// Score the test set (soft mode; a baseline at its fixed positions) at step 0 and every
    /// this many steps (0: only after the last step).
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// When stderr is not a terminal (a batch job): one log line every this many steps (step,
    /// loss, lr, examples/s, ETA) and one at each evaluation (0: only the evaluations).
    pub log_every: usize,
    /// Stop after this many steps in total (0: run all epochs). For time-boxed runs: continue
    /// later with `--resume`; the result equals an uninterrupted run.
    pub stop_after_steps: usize,
    pub seed: u64,
    /// Memory for the clean hidden states of prompts already seen, reused instead of running
    /// the target again (0: no cache). The states of one prompt take `T × (L+1) × D` values:
    /// 2.1 MB in f32 for a 30-token SmolLM2 prompt.
    pub state_cache_gb: f64,
    /// How cached states are stored: `f32` (exact: training is bit-identical with and without
    /// the cache), or `f16` / `bf16` (half the memory, rounded states).
    pub state_cache_dtype: CacheDtype,
    /// On a NaN/inf loss or gradient: `false` stops the run (naming the step and the
    /// parameters; the last good checkpoint is kept), `true` skips the batch without an update
    /// and counts it (`skipped_nonfinite` in metrics.jsonl).
    pub skip_nonfinite: bool,
    /// Positions used in training: `soft` (HyperDAS: the pointer's `W`) or `groundtruth` (the
    /// last entity token of base and source, as MDAS: the subspace alone; the pointer head gets
    /// no gradient).
    pub train_mode: InferenceMode,
    /// A position curriculum: the first this many steps train at the ground-truth positions
    /// (the subspace learns where the answer is known to be), the rest in `train_mode`.
    pub groundtruth_steps: usize,
    /// The curriculum as a share of the run's steps (0.5: the first half), so that it scales
    /// with `steps` / `epochs`; exclusive with `groundtruth_steps` (0: not used).
    pub groundtruth_ratio: f64,
    /// The learning rate of the modules HyperDAS adds (the pointer head, the subspace module's
    /// MLP; not the rotation, which has `rotation_lr`, nor the mask) as a multiple of the
    /// scheduled `lr` (1: the same rate as the copied blocks). These start from random
    /// weights, the copied blocks from pretrained ones.
    pub head_lr_scale: f64,
    /// The subspace module's MLP and norm alone at this multiple of `lr` (0: the same
    /// `head_lr_scale` as the pointer head), so that the pointer and the subspace can learn at
    /// different rates.
    pub subspace_lr_scale: f64,
    /// Beyond the paper: the initial weight `γ₀` of the pointer guide, the cross-entropy of
    /// `W` against the ground-truth selection (the base's last entity token takes the source's,
    /// every other base token keeps itself; [`super::loss::guide_loss`]), fading linearly to 0
    /// over `pointer_guide_steps` (0: no guide, the paper's objective). It supervises the
    /// pointer with the entity positions the data carries, in soft and in ground-truth training
    /// alike.
    pub pointer_guide_weight: f64,
    /// The steps over which the pointer guide fades out (0: no guide).
    pub pointer_guide_steps: usize,
    /// The guide's fade-out as a share of the run's steps (1: over the whole run, ending at 0;
    /// 2: over twice the run, so it ends at half weight); exclusive with `pointer_guide_steps`
    /// (0: not used).
    pub pointer_guide_ratio: f64,
    /// Beyond the paper: the constant weight σ of the subspace separation term, the mean
    /// overlap `‖B_iᵀ B_j‖²_F / k` of the bases of batch rows whose instructions name different
    /// attributes ([`super::loss::separation_loss`]; 0: no term, the paper's objective). For
    /// ReflectSelect, whose per-instruction bases are orthonormal; the baselines, with one
    /// subspace per model, ignore it.
    pub separation_weight: f64,
}

impl TrainSettings {
    /// Optimizer steps for `rows` training rows: batches per epoch × epochs.
    pub fn total_steps(&self, rows: usize) -> usize {
        if self.steps > 0 { self.steps } else { self.batches_per_epoch(rows) * self.epochs.max(1) }
    }

    /// Batches in one pass over `rows` training rows.
    pub fn batches_per_epoch(&self, rows: usize) -> usize {
        rows.div_ceil(self.batch_size.max(1))
    }

    /// Passes over the data a run of [`total_steps`](Self::total_steps) makes (the last one
    /// possibly cut short).
    pub fn passes(&self, rows: usize) -> usize {
        self.total_steps(rows).div_ceil(self.batches_per_epoch(rows).max(1))
    }

    /// The curriculum's length in a run of `total` steps (`groundtruth_steps`, or
    /// `groundtruth_ratio × total` rounded down).
    pub fn groundtruth_len(&self, total: usize) -> usize {
        share_or_steps(self.groundtruth_ratio, self.groundtruth_steps, total)
    }

    /// The pointer guide's fade-out length in a run of `total` steps (`pointer_guide_steps`,
    /// or `pointer_guide_ratio × total` rounded down).
    pub fn guide_len(&self, total: usize) -> usize {
        share_or_steps(self.pointer_guide_ratio, self.pointer_guide_steps, total)
    }

    /// The positions training uses at `step` of `total` (the curriculum, then `train_mode`).
    pub fn mode_at(&self, step: usize, total: usize) -> InferenceMode {
        if step < self.groundtruth_len(total) { InferenceMode::GroundTruth } else { self.train_mode }
    }

    /// Checks what serde cannot: the training modes that exist, positive scales, the
    /// curriculum's share in [0, 1] and the guide's >= 0, each given in one form only.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.train_mode, InferenceMode::Soft | InferenceMode::GroundTruth) {
            return Err(Error::invalid(format!("train.train_mode = \"{}\": training uses `soft` or `groundtruth` positions (the argmax modes have no gradient)", self.train_mode.name())));
        }
        if !(self.head_lr_scale > 0.0 && self.head_lr_scale.is_finite()) {
            return Err(Error::invalid(format!("train.head_lr_scale = {}: use a positive multiple of train.lr", self.head_lr_scale)));
        }
        if !(self.subspace_lr_scale >= 0.0 && self.subspace_lr_scale.is_finite()) {
            return Err(Error::invalid(format!("train.subspace_lr_scale = {}: use a positive multiple of train.lr (0: train.head_lr_scale)", self.subspace_lr_scale)));
        }
        if !(self.pointer_guide_weight >= 0.0 && self.pointer_guide_weight.is_finite()) {
            return Err(Error::invalid(format!("train.pointer_guide_weight = {}: use a weight >= 0 (0: no guide)", self.pointer_guide_weight)));
        }
        if !(self.separation_weight >= 0.0 && self.separation_weight.is_finite()) {
            return Err(Error::invalid(format!("train.separation_weight = {}: use a weight >= 0 (0: no separation term)", self.separation_weight)));
        }
        // The curriculum cannot outlast the run; the guide may fade over more than the run
        // (2: it ends at half weight).
        if !(0.0..=1.0).contains(&self.groundtruth_ratio) {
            return Err(Error::invalid(format!("train.groundtruth_ratio = {}: use a share of the run's steps in [0, 1] (0: not used)", self.groundtruth_ratio)));
        }
        if !(self.pointer_guide_ratio >= 0.0 && self.pointer_guide_ratio.is_finite()) {
            return Err(Error::invalid(format!(
                "train.pointer_guide_ratio = {}: use a finite share >= 0 of the run's steps (1: the guide fades over the run; 2: over twice the run, ending at half weight; 0: not used)",
                self.pointer_guide_ratio
            )));
        }
        for (name, ratio, steps_name, steps) in [
            ("groundtruth_ratio", self.groundtruth_ratio, "groundtruth_steps", self.groundtruth_steps),
            ("pointer_guide_ratio", self.pointer_guide_ratio, "pointer_guide_steps", self.pointer_guide_steps),
        ] {
            if ratio > 0.0 && steps > 0 {
                return Err(Error::invalid(format!("train.{name} = {ratio} and train.{steps_name} = {steps}: set one of the two (the other to 0)")));
            }
        }
        Ok(())
    }

    /// AdamW over `ps` with HyperDAS's groups: the rotation (either parametrisation) at the
    /// fixed `rotation_lr` without weight decay; the mask parameters of `kind` (mask_select's
    /// MLP, boundless's boundary) at the fixed `mask_lr`; the pointer head at `head_lr_scale`
    /// and the subspace module's other parameters at `subspace_lr_scale` (0:
    /// `head_lr_scale`) times the scheduled rate; everything else at the scheduled rate; all
    /// but the rotation with `weight_decay`.
    pub fn optimizer(&self, ps: &ParamStore, kind: SubspaceKind) -> Result<AdamW> {
        let adam = AdamWConfig { weight_decay: self.weight_decay, grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip), decay_vectors: self.decay_norms, ..Default::default() };
        let rotation_group = Group { lr: GroupLr::Fixed(self.rotation_lr), weight_decay: 0.0 };
        let mask_group = Group { lr: GroupLr::Fixed(self.mask_lr), weight_decay: self.weight_decay };
        let scaled = |scale: f64| (scale != 1.0).then_some(Group { lr: GroupLr::Scaled(scale), weight_decay: self.weight_decay });
        let head_group = scaled(self.head_lr_scale);
        let subspace_group = scaled(if self.subspace_lr_scale > 0.0 { self.subspace_lr_scale } else { self.head_lr_scale });
        let is_mask = |name: &str| match kind {
            SubspaceKind::MaskSelect => name.starts_with("subspace.mlp."),
            SubspaceKind::Boundless => name == "subspace.boundary",
            _ => false,
        };
        AdamW::with_groups(ps, adam, |name| match name {
            "subspace.rotation" | "subspace.rotation_householder" => Some(rotation_group),
            n if is_mask(n) => Some(mask_group),
            n if n.starts_with("hypernet.pointer.") => head_group,
            n if n.starts_with("subspace.") => subspace_group,
            _ => None,
        })
    }

    /// The training loss's label-token limit (`usize::MAX` for every token).
    pub fn loss_label_tokens(&self) -> usize {
        if self.loss_label_limit == 0 { usize::MAX } else { self.loss_label_limit }
    }

    /// The objective's weights in a run of `total` steps.
    pub fn terms(&self, total: usize) -> Terms {
        Terms {
            causal_weight: self.causal_weight,
            isolate_weight: self.isolate_weight,
            regularizer: self.regularizer,
            sparsity_start: self.sparsity_start,
            sparsity_end: self.sparsity_end,
            sparsity_warmup_ratio: self.sparsity_warmup_ratio,
            entropy_weight: self.entropy_weight,
            guide_weight: self.pointer_guide_weight,
            guide_steps: self.guide_len(total),
            separation_weight: self.separation_weight,
        }
    }

    /// The state cache these settings ask for (`None` when `state_cache_gb` is 0).
    pub fn state_cache(&self) -> Result<Option<crate::model::cache::StateCache>> {
        if !(self.state_cache_gb >= 0.0 && self.state_cache_gb.is_finite()) {
            return Err(Error::invalid(format!("train.state_cache_gb = {}: use a size in GB (0 turns the cache off)", self.state_cache_gb)));
        }
        if self.state_cache_gb == 0.0 {
            return Ok(None);
        }
        let dtype = match self.state_cache_dtype {
            CacheDtype::F32 => candle_core::DType::F32,
            CacheDtype::F16 => candle_core::DType::F16,
            CacheDtype::Bf16 => candle_core::DType::BF16,
        };
        Ok(Some(crate::model::cache::StateCache::new((self.state_cache_gb * 1e9) as usize, dtype)?))
    }

    /// The learning-rate schedule of a run of `total` steps.
    pub fn schedule(&self, total: usize) -> Schedule {
        Schedule { peak: self.lr, warmup_steps: self.warmup_steps, total_steps: total, decay: self.lr_decay, min_ratio: 0.0 }
    }
}

/// A schedule length: [`share_of`] the run where `ratio > 0` (rounded down, as
/// `sparsity_warmup_ratio`), else `steps`.
fn share_or_steps(ratio: f64, steps: usize, total: usize) -> usize {
    if ratio > 0.0 { share_of(ratio, total) } else { steps }
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            epochs: 3,
            steps: 0,
            batch_size: 16,
            lr: 4e-5,
            weight_decay: 0.01,
            rotation_lr: 1e-3,
            warmup_steps: 0,
            lr_decay: Decay::Cosine,
            grad_clip: 4.0,
            causal_weight: 3.5,
            isolate_weight: 0.5,
            regularizer: Regularizer::Sparsity,
            sparsity_start: 0.15,
            sparsity_end: 1.5,
            sparsity_warmup_ratio: 0.5,
            entropy_weight: 0.0,
            label_limit: 3,
            loss_label_limit: 3,
            temperature_start: 50.0,
            temperature_end: 0.1,
            mask_lr: 1e-2,
            decay_norms: false,
            eval_every: 200,
            log_every: 10,
            checkpoint_every: 0,
            stop_after_steps: 0,
            seed: 0,
            state_cache_gb: 2.0,
            state_cache_dtype: CacheDtype::F32,
            skip_nonfinite: false,
            train_mode: InferenceMode::Soft,
            groundtruth_steps: 0,
            groundtruth_ratio: 0.0,
            head_lr_scale: 1.0,
            subspace_lr_scale: 0.0,
            pointer_guide_weight: 0.0,
            pointer_guide_steps: 0,
            pointer_guide_ratio: 0.0,
            separation_weight: 0.0,
        }
    }
}

/// Cause / Isolate / Disentangle and the unweighted test loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub causal: f64,
    pub isolate: f64,
    pub disentangle: f64,
    pub loss: f64,
    pub rows: usize,
    /// The share of causal rows on which the base's last entity token takes the source's last
    /// entity token (the arg-max of its column of `W`): where MDAS intervenes. `None` without
    /// causal rows (and in results written before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_position: Option<f64>,
    /// The share of causal rows on which the base's last entity token takes any source token
    /// (the arg-max of its column is a source row, not "self"): the selected base position is the
    /// entity's. `None` without causal rows (and in results written before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_selected: Option<f64>,
}

/// Scores of the rows of one domain whose instruction intervenes on one attribute: a row of
/// the reference's main table. `causal` / `isolate` are NaN when the group has no such rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupScores {
    pub domain: String,
    pub attribute: String,
    pub causal: f64,
    pub isolate: f64,
    pub disentangle: f64,
    pub causal_rows: usize,
    pub isolate_rows: usize,
}

impl GroupScores {
    fn from_counts(domain: &str, attribute: &str, hit: [usize; 2], n: [usize; 2]) -> Self {
        let (causal, isolate, disentangle) = rates(hit, n);
        GroupScores { domain: domain.into(), attribute: attribute.into(), causal, isolate, disentangle, causal_rows: n[0], isolate_rows: n[1] }
    }

    /// The mean over `groups` of one domain (the reference's per-domain figure: attributes
    /// weigh equally, whatever their row counts), labelled `attribute = "mean"`.
    pub fn domain_mean(domain: &str, groups: &[&GroupScores]) -> Self {
        let mean = |f: &dyn Fn(&GroupScores) -> f64| {
            let v: Vec<f64> = groups.iter().map(|g| f(g)).filter(|x| !x.is_nan()).collect();
            if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
        };
        GroupScores {
            domain: domain.into(),
            attribute: "mean".into(),
            causal: mean(&|g| g.causal),
            isolate: mean(&|g| g.isolate),
            disentangle: mean(&|g| g.disentangle),
            causal_rows: groups.iter().map(|g| g.causal_rows).sum(),
            isolate_rows: groups.iter().map(|g| g.isolate_rows).sum(),
        }
    }
}

/// (Cause, Isolate, Disentangle) from hits and row counts, each `[causal, isolate]`. A score
/// without rows is NaN; Disentangle is the mean of the two, or either alone when the other has
/// no rows.
fn rates(hit: [usize; 2], n: [usize; 2]) -> (f64, f64, f64) {
    let acc = |i: usize| if n[i] == 0 { f64::NAN } else { hit[i] as f64 / n[i] as f64 };
    let (causal, isolate) = (acc(0), acc(1));
    let disentangle = if n[1] == 0 {
        causal
    } else if n[0] == 0 {
        isolate
    } else {
        0.5 * (causal + isolate)
    };
    (causal, isolate, disentangle)
}

/// Everything one evaluation pass measures.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub scores: Scores,
    /// Per (domain, intervened attribute), sorted by domain then attribute.
    pub groups: Vec<GroupScores>,
    /// Each row's selected positions (when asked for).
    pub selections: Vec<Selection>,
}

/// Score `rows` with inference `mode`.
pub fn evaluate(target: &Llama, interp: &Interpreter, rows: &[EncodedRow], mode: InferenceMode, batch_size: usize, label_limit: usize, pad: u32) -> Result<Scores> {
    Ok(evaluate_detailed(target, interp, rows, mode, batch_size, label_limit, pad, false)?.scores)
}

/// Which positions an example's intervention used: `(base position, source position, weight)`
/// for every base position whose largest weight is on a source token (not "self"). Positions
/// count the row's own tokens (start token = 0), without padding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Selection {
    /// Index of the row in the evaluated dataset (after encoding).
    pub row: usize,
    pub mode: String,
    pub causal: bool,
    pub correct: bool,
    pub selected: Vec<(usize, usize, f32)>,
}

/// [`evaluate`], optionally with each row's [`Selection`].
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // j indexes W's columns and the positions alike
pub fn evaluate_detailed(target: &Llama, interp: &Interpreter, rows: &[EncodedRow], mode: InferenceMode, batch_size: usize, label_limit: usize, pad: u32, selections: bool) -> Result<Evaluation> {
    // (domain, attribute) → (hits, rows), each [causal, isolate].
    type Tally = ([usize; 2], [usize; 2]);
    let mut by_group: std::collections::BTreeMap<(&str, &str), Tally> = Default::default();
    let (mut loss_sum, mut tokens) = (0f64, 0f64);
    let mut picked = Vec::new();
    let (mut landed, mut selected, mut causal_rows) = (0usize, 0usize, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let batch = collate(&chunk.iter().collect::<Vec<_>>(), pad);
        let out = interp.forward(target, &batch, mode, label_limit)?;
        let pred = out.logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?; // [B·K]
        let ntok: f32 = out.valid.iter().sum();
        let loss = prediction_loss(&out, &batch.is_causal, 1.0, 1.0)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * ntok as f64;
        tokens += ntok as f64;
        let w = out.w.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?; // [B, T_s+1, T_b]
        let (ts, tb) = (batch.source_len, batch.base_len);
        for (bi, causal) in batch.is_causal.iter().enumerate() {
            let ok = (0..out.k).all(|j| out.valid[bi * out.k + j] == 0.0 || pred[bi * out.k + j] == out.targets[bi * out.k + j]);
            let kind = usize::from(!*causal);
            let g = by_group.entry((chunk[bi].domain.as_str(), chunk[bi].target_attribute.as_str())).or_default();
            g.1[kind] += 1;
            g.0[kind] += usize::from(ok);
            // Left padding: the row's own position p is column p + pad of the batch.
            let (pad_s, pad_b) = (ts - chunk[bi].source_ids.len(), tb - chunk[bi].base_ids.len());
            if *causal {
                let j = chunk[bi].base_entity_pos + pad_b;
                causal_rows += 1;
                let best = if j < tb { argmax((0..=ts).map(|i| w[bi][i][j])) } else { ts };
                selected += usize::from(best < ts);
                landed += usize::from(best == chunk[bi].source_entity_pos + pad_s);
            }
            if selections {
                let mut selected = Vec::new();
                for j in pad_b..tb {
                    let best = argmax((0..=ts).map(|i| w[bi][i][j]));
                    if best < ts && best >= pad_s {
                        selected.push((j - pad_b, best - pad_s, w[bi][best][j]));
                    }
                }
                picked.push(Selection { row: chunk[bi].row, mode: mode.name().into(), causal: *causal, correct: ok, selected });
            }
        }
    }
    // The overall scores are the sum of the groups' tallies.
    let (mut hit, mut n) = ([0usize; 2], [0usize; 2]);
    for (h, c) in by_group.values() {
        for k in 0..2 {
            hit[k] += h[k];
            n[k] += c[k];
        }
    }
    let (causal, isolate, disentangle) = rates(hit, n);
    let entity_position = (causal_rows > 0).then(|| landed as f64 / causal_rows as f64);
    let entity_selected = (causal_rows > 0).then(|| selected as f64 / causal_rows as f64);
    let scores = Scores { causal, isolate, disentangle, loss: if tokens > 0.0 { loss_sum / tokens } else { 0.0 }, rows: rows.len(), entity_position, entity_selected };
    let groups = by_group.into_iter().map(|((d, a), (h, c))| GroupScores::from_counts(d, a, h, c)).collect();
    Ok(Evaluation { scores, groups, selections: picked })
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub loss: f64,
    pub prediction_loss: f64,
    pub sparsity_weight: f64,
    /// The pointer guide's weight at this step (0 without a guide).
    pub guide_weight: f64,
    /// The separation term's value `S` (None without the term or with one attribute in the batch).
    pub separation: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
}

/// A training run in progress: the frozen target, the interpreter and its parameters, the
/// optimizer and schedule, and the step counter. A training step is one call,
/// [`Trainer::step`]`(batch)`.
pub struct Trainer<'a> {
    pub target: &'a Llama,
    pub interp: &'a mut Interpreter,
    pub ps: &'a ParamStore,
    pub settings: &'a TrainSettings,
    pub opt: AdamW,
    pub schedule: Schedule,
    /// Steps done: the index of the next step.
    pub step: usize,
    /// Steps in the whole run (the schedules' horizon).
    pub total: usize,
}

impl<'a> Trainer<'a> {
    /// A trainer at step 0 of `total`, with the optimizer groups and the learning-rate schedule
    /// of `settings`.
    pub fn new(target: &'a Llama, interp: &'a mut Interpreter, ps: &'a ParamStore, settings: &'a TrainSettings, total: usize) -> Result<Self> {
        let kind = interp.subspace.kind;
        // The term compares orthonormal per-instruction bases: DAS and Boundless DAS give every
        // row one basis, and MaskSelect's columns are scaled by its mask, so there the overlap
        // would fall by switching columns off rather than by moving the subspaces apart.
        if settings.separation_weight > 0.0 && !interp.positions.is_fixed() && kind != SubspaceKind::ReflectSelect {
            return Err(Error::invalid(format!(
                "train.separation_weight = {} applies to subspace = \"reflect_select\" only, not {:?} (das and boundless give every row the same basis; mask_select's bases are scaled by the mask, which the term would push to 0). Set it to 0",
                settings.separation_weight,
                kind.name()
            )));
        }
        let opt = settings.optimizer(ps, kind)?;
        let schedule = settings.schedule(total);
        Ok(Trainer { target, interp, ps, settings, opt, schedule, step: 0, total })
    }

    /// One optimizer step on `batch`: the intervened forward pass, the objective
    /// ([`objective`]), the backward pass, AdamW and the rotation's retraction; then the
    /// counter moves on. A non-finite loss is an error naming the step (nothing is updated and
    /// the counter stays: [`Trainer::skip`] moves past it). At step 0 of soft-mode training
    /// every registered parameter must receive a gradient.
    pub fn step(&mut self, batch: &CollatedBatch) -> Result<StepOutcome> {
        let (s, step, total) = (self.settings, self.step, self.total);
        // Fixed positions (the baselines): no W to learn, nothing to regularise.
        let fixed = self.interp.positions.is_fixed();
        let mode = if fixed { InferenceMode::GroundTruth } else { s.mode_at(step, total) };
        self.interp.subspace.temperature = temperature(step, total, s.temperature_start, s.temperature_end);
        let out = self.interp.forward(self.target, batch, mode, s.loss_label_tokens())?;
        let obj = objective(&out, batch, step, total, &s.terms(total), fixed, &self.interp.subspace)?;
        let value = obj.loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "the loss became {value} at step {}; nothing was updated. The last good checkpoint (if any) is kept; lower the learning rate and resume or restart, or set train.skip_nonfinite = true to skip such batches",
                step + 1
            )));
        }
        crate::profile::mark("loss");
        let grads = obj.loss.backward()?;
        crate::profile::mark("backward (hypernetwork)");
        // Fixed positions (ground-truth training) leave the pointer head out of the loss; a
        // baseline has no pointer head, so all its parameters must get gradients.
        if step == 0 && (mode == InferenceMode::Soft || fixed) {
            self.ps.check_gradients(&grads)?;
        }
        let lr = self.schedule.lr(step);
        let info = self.opt.step(&grads, lr)?;
        self.interp.subspace.retract()?;
        crate::profile::mark("optimizer");
        self.step += 1;
        Ok(StepOutcome {
            loss: value,
            prediction_loss: obj.prediction.to_scalar::<f32>()? as f64,
            sparsity_weight: obj.lambda,
            guide_weight: obj.guide,
            separation: obj.separation,
            lr,
            grad_norm: info.grad_norm,
        })
    }

    /// Count a step without an update (a skipped non-finite batch): the data order and the
    /// schedules stay those of a run without the fault.
    pub fn skip(&mut self) {
        self.opt.skip_step();
        self.step += 1;
    }

    /// Scores on `rows` in the interpreter's native mode (soft; a baseline at its fixed
    /// positions), with the mask temperature of the current step.
    pub fn evaluate(&mut self, rows: &[EncodedRow], pad: u32) -> Result<Scores> {
        let s = self.settings;
        self.interp.subspace.temperature = temperature(self.step, self.total, s.temperature_start, s.temperature_end);
        evaluate(self.target, self.interp, rows, self.interp.native_mode(), s.batch_size, s.label_limit, pad)
    }
}

/// Where checkpoints go, and whether to start from the latest one.
pub struct CheckpointPlan<'a> {
    /// `None`: no checkpoints during training.
    pub dir: Option<&'a std::path::Path>,
    pub resume: bool,
    /// Saved into `state.json` (the run's configuration).
    pub meta: serde_json::Value,
}

/// The rows of a training run: what it trains on, what it scores on, and the padding id.
pub struct TrainData<'a> {
    pub train: &'a [EncodedRow],
    pub test: &'a [EncodedRow],
    pub pad: u32,
}

impl Trainer<'_> {
    /// The whole run: every epoch of `data.train` in the seeded order (from the checkpoint's
    /// step with `plan.resume`), scoring `data.test` (soft mode; a baseline at its fixed
    /// positions) at step 0, every `eval_every` steps and at the end, logging each step to `log`
    /// and checkpointing as `plan` says. Returns the last scores and the optimizer (for the
    /// checkpoint). The trainer's horizon must be `settings.total_steps(data.train.len())`.
    pub fn fit(self, data: &TrainData, log: &mut MetricsLog, plan: &CheckpointPlan, progress: bool) -> Result<(Option<Scores>, AdamW)> {
        let mut tr = self;
        let (train, test, pad, s) = (data.train, data.test, data.pad, tr.settings);
        let (target, ps) = (tr.target, tr.ps);
        if train.is_empty() {
            return Err(Error::invalid("no training rows"));
        }
        let total = s.total_steps(train.len());
        if tr.total != total {
            return Err(Error::invalid(format!(
                "the trainer's horizon is {} steps, but {} rows in batches of {} for {} epochs (or train.steps = {}) take {total}",
                tr.total,
                train.len(),
                s.batch_size,
                s.epochs,
                s.steps
            )));
        }
        let mut rng = Rng::derive(s.seed, "hyperdas/batches");
        // Resume: parameters, AdamW moments and the step; the data order is replayed from the seed.
        let mut start = 0;
        if plan.resume {
            let dir = plan.dir.ok_or_else(|| Error::invalid("--resume needs a run directory"))?;
            if !crate::train::checkpoint::exists(dir) {
                return Err(Error::file(dir, "no checkpoint to resume from"));
            }
            crate::train::checkpoint::load_latest(dir, ps, Some(&mut tr.opt), target.device())?;
            start = tr.opt.step;
            tr.step = start;
            log.keep_through(start)?;
            if start > total {
                return Err(Error::file(dir, format!("the checkpoint is at step {start}, past this run's {total} steps")));
            }
        }
        let stop = if s.stop_after_steps == 0 { total } else { s.stop_after_steps.min(total) };
        let save = |opt: &AdamW| -> Result<()> {
            match plan.dir {
                Some(dir) => crate::train::checkpoint::save(dir, ps, Some(opt), &plan.meta),
                None => Ok(()),
            }
        };
        let what = tr.interp.method().label();
        let pb = crate::progress::bar(total as u64, &format!("training {what} [{{bar:30}}] {{pos}}/{{len}} steps ({{per_sec}}) {{elapsed}} (eta {{eta}}) {{msg}}"), progress);
        let t0 = Instant::now();
        let batch_log = progress && crate::progress::batch_log();
        let line = StepLine { what, total, start, batch_size: s.batch_size, t0 };
        // Periodic scores: soft mode for HyperDAS, the fixed positions for a baseline
        // (`eval/soft/causal`, … / `eval/groundtruth/causal`, … in metrics.jsonl).
        let eval_key = format!("eval/{}", tr.interp.native_mode().name());
        pb.set_position(start as u64);
        let mut skipped = 0usize;
        let mut last = None;
        if start == 0 && s.eval_every > 0 {
            // The untrained interpreter's scores: the baseline that training must beat.
            let sc = tr.evaluate(test, pad)?;
            let mut rec = serde_json::json!({"step": 0, "seconds": t0.elapsed().as_secs_f64()});
            crate::train::metrics::put_scores(&mut rec, &eval_key, &sc);
            log.log(&rec)?;
            pb.set_message(format!("step 0: cause {:.2} iso {:.2}", sc.causal, sc.isolate));
            if batch_log {
                tracing::info!("{}", line.eval(0, &eval_key, &sc));
            }
        }
        let mut seen = 0; // batches of the replayed order, including those done before a resume
        'epochs: for _epoch in 0..s.passes(train.len()) {
            let mut order: Vec<usize> = (0..train.len()).collect();
            rng.shuffle(&mut order);
            for chunk in order.chunks(s.batch_size.max(1)) {
                if seen < start {
                    seen += 1; // already done before the checkpoint: same data order, skipped
                    continue;
                }
                if tr.step >= stop {
                    break 'epochs;
                }
                seen += 1;
                let rows: Vec<&EncodedRow> = chunk.iter().map(|&i| &train[i]).collect();
                let batch = collate(&rows, pad);
                let o = match tr.step(&batch) {
                    Err(Error::NonFinite(msg)) if s.skip_nonfinite => {
                        // No update: the step still counts (the data order and the schedule stay
                        // those of a run without the fault), and so does the skip.
                        skipped += 1;
                        tr.skip();
                        log.log(&serde_json::json!({"step": tr.step, "skipped_nonfinite": skipped, "reason": msg, "seconds": t0.elapsed().as_secs_f64()}))?;
                        pb.inc(1);
                        continue;
                    }
                    other => other?,
                };
                let step = tr.step;
                let (value, lambda, lr) = (o.loss, o.sparsity_weight, o.lr);
                let mut rec = serde_json::json!({"step": step, "loss": value, "prediction_loss": o.prediction_loss, "sparsity_weight": lambda, "lr": lr, "grad_norm": o.grad_norm, "seconds": t0.elapsed().as_secs_f64()});
                if o.guide_weight > 0.0 {
                    rec["guide_weight"] = o.guide_weight.into();
                }
                if let Some(sep) = o.separation {
                    rec["separation"] = sep.into();
                }
                if let Some(c) = tr.interp.cache_stats() {
                    rec["state_cache_hit_rate"] = serde_json::json!(c.hit_rate());
                }
                let scored = if (s.eval_every > 0 && step.is_multiple_of(s.eval_every)) || step == total {
                    let sc = tr.evaluate(test, pad)?;
                    crate::train::metrics::put_scores(&mut rec, &eval_key, &sc);
                    pb.set_message(format!("loss {value:.3} | cause {:.2} iso {:.2}", sc.causal, sc.isolate));
                    last = Some(sc);
                    Some(sc)
                } else {
                    if step.is_multiple_of(5) {
                        pb.set_message(format!("loss {value:.3}"));
                    }
                    None
                };
                log.log(&rec)?;
                if batch_log && s.log_every > 0 && (step.is_multiple_of(s.log_every) || step == total) {
                    tracing::info!("{}", line.step(step, value, lr));
                } else {
                    tracing::debug!("{}", line.step(step, value, lr));
                }
                if let (true, Some(sc)) = (batch_log, scored) {
                    tracing::info!("{}", line.eval(step, &eval_key, &sc));
                }
                if s.checkpoint_every > 0
                    && step.is_multiple_of(s.checkpoint_every)
                    && let Err(e) = save(&tr.opt)
                {
                    // The run's state is in memory and intact: report, keep training, retry at the
                    // next interval (the previous checkpoint on disk is still complete). The final
                    // checkpoint, below, must succeed.
                    pb.suspend(|| tracing::warn!("the checkpoint at step {step} could not be written ({e}); training continues and retries at step {}", step + s.checkpoint_every));
                    log.log(&serde_json::json!({"step": step, "checkpoint_error": e.to_string()}))?;
                }
                pb.inc(1);
            }
        }
        save(&tr.opt)?;
        pb.finish_and_clear();
        Ok((last, tr.opt))
    }
}

/// The log lines of a training run without a terminal (see [`TrainSettings::log_every`]).
struct StepLine<'a> {
    what: &'a str,
    total: usize,
    /// The step this process started from (a resumed run's rate counts its own steps only).
    start: usize,
    batch_size: usize,
    t0: Instant,
}

impl StepLine<'_> {
    /// `training HyperDAS step 120/375 loss 2.3141 lr 3.20e-5 | 13.8 examples/s, eta 4 min`
    fn step(&self, step: usize, loss: f64, lr: f64) -> String {
        let secs = self.t0.elapsed().as_secs_f64();
        let done = step.saturating_sub(self.start);
        let rate = (done * self.batch_size) as f64 / secs.max(1e-9);
        let eta = secs / done.max(1) as f64 * self.total.saturating_sub(step) as f64;
        format!("training {} step {step}/{} loss {loss:.4} lr {lr:.2e} | {rate:.1} examples/s, eta {}", self.what, self.total, crate::progress::duration(eta))
    }

    /// `evaluation at step 120 (eval/soft): cause 0.812 isolate 0.644 disentangle 0.728 loss 1.204`
    fn eval(&self, step: usize, key: &str, sc: &Scores) -> String {
        format!("evaluation at step {step} ({key}): cause {:.3} isolate {:.3} disentangle {:.3} loss {:.3}", sc.causal, sc.isolate, sc.disentangle, sc.loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_scores_and_domain_means() {
        let a = GroupScores::from_counts("city", "Country", [3, 1], [4, 2]); // 0.75 / 0.5
        assert_eq!((a.causal, a.isolate, a.disentangle), (0.75, 0.5, 0.625));
        let b = GroupScores::from_counts("city", "Continent", [1, 0], [1, 0]); // no isolate rows
        assert!(b.isolate.is_nan());
        assert_eq!(b.disentangle, 1.0);
        // Attributes weigh equally (not rows); NaN isolate scores are left out of the mean.
        let m = GroupScores::domain_mean("city", &[&a, &b]);
        assert_eq!((m.causal, m.isolate, m.disentangle), (0.875, 0.5, 0.8125));
        assert_eq!((m.causal_rows, m.isolate_rows, m.attribute.as_str()), (5, 2, "mean"));
    }
}
