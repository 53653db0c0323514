//! The HyperDAS objective, in one place (docs/method.md §5):
//!
//! `L = L_pred + λ(step) · R(W)`, with
//!
//! * `L_pred = (1/#label tokens) Σ_rows w_row Σ_t CE(logits_t, label_t)`, `w_row` =
//!   `causal_weight` on causal rows and `isolate_weight` on isolate rows ([`prediction_loss`]);
//! * `R` the regulariser on the pointer's soft weights `W [B, T_s+1, T_b]` ([`Regularizer`]):
//!   `sparsity` (the authors' code: `mean_b Σ_i r_bi · [r_bi > 1]`, `r_bi = Σ_j W[b,i,j]` over
//!   source rows, weight scheduled by [`sparsity_weight`]), `entropy` (a constant weight on the
//!   mean row entropy) or `none`. The baselines' positions are fixed: their objective is `L_pred`.
//!
//! and, beyond the paper, an optional pointer guide `+ γ(step) · G(W)` ([`guide_loss`]):
//! `G = mean_b ( −log W[b, i*, j*] + mean_{j ≠ j*} −log W[b, self, j] )`, the cross-entropy
//! of `W` against the ground-truth selection (the base's last entity token `j*` takes the
//! source's `i*`, every other visible base token keeps itself), with `γ` fading linearly from
//! `pointer_guide_weight` to 0 over the first `pointer_guide_steps` steps ([`guide_weight`]).
//! It supervises the pointer with the entity positions the data carries, which the paper's
//! HyperDAS does not use; 0 (the default) leaves the objective the paper's.
//!
//! and, also beyond the paper, an optional subspace separation term `+ σ · S` ([`separation_loss`]):
//! `S = mean_{(i, j): a_i ≠ a_j} ‖B_iᵀ B_j‖²_F / k` over the ordered pairs of batch rows whose
//! instructions name different attributes `a`, `B_i [D, k]` the basis row `i` intervenes in
//! (1: the same subspace, 0: orthogonal ones). It pushes the subspaces of different attributes
//! apart, as separately trained MDAS models are; the constant weight is
//! `train.separation_weight` (0, the default: no term).
//!
//! To add a loss term: a function of [`Intervened`] here, its weight in [`Terms`] (filled from
//! a `train.*` setting in `TrainSettings::terms`), and one line in [`objective`].

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::collate::CollatedBatch;
use crate::error::Result;
use crate::hypernet::interpreter::Intervened;
use crate::hypernet::subspace::SubspaceModule;
use crate::intervention::selection::ground_truth;
use crate::train::share_of;

/// The regulariser on `W`'s source rows (`train.regularizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Regularizer {
    /// The authors' code: scheduled `sparsity_start → sparsity_end`, zero for the first
    /// `sparsity_warmup_ratio` of the steps.
    Sparsity,
    /// A co-author's fork: a constant `entropy_weight` on the mean entropy of the source rows.
    Entropy,
    None,
}

/// `(1/#label tokens) Σ w_row · CE`, `w_row` = `causal_weight` on causal rows and
/// `isolate_weight` on isolate rows.
pub fn prediction_loss(out: &Intervened, is_causal: &[bool], causal_weight: f32, isolate_weight: f32) -> Result<Tensor> {
    let weights: Vec<f32> = out.valid.iter().enumerate().map(|(i, &v)| v * if is_causal[i / out.k] { causal_weight } else { isolate_weight }).collect();
    let n: f32 = out.valid.iter().sum();
    crate::train::loss::weighted_cross_entropy(&out.logits, &out.targets, &weights, n.max(1.0)) // []
}

/// The sparsity regulariser: with `r[b,i] = Σ_j W[b,i,j]` over the source rows,
/// `mean_b Σ_i r[b,i] · [r[b,i] > 1]` (the whole row sum once it exceeds 1).
pub fn sparsity_loss(w: &Tensor) -> Result<Tensor> {
    let ts = w.dim(1)? - 1;
    let r = w.narrow(1, 0, ts)?.sum(2)?; // [B, T_s]
    let over = r.gt(1.0)?.to_dtype(r.dtype())?.detach(); // [B, T_s], constant indicator
    Ok((r * over)?.sum(1)?.mean(0)?) // []
}

/// The entropy penalty: `mean_{b,i} (−Σ_j W[b,i,j] log(W[b,i,j] + 1e-8))` over source rows.
pub fn entropy_loss(w: &Tensor) -> Result<Tensor> {
    let ts = w.dim(1)? - 1;
    let ws = w.narrow(1, 0, ts)?; // [B, T_s, T_b]
    Ok((ws.clone() * (ws + 1e-8)?.log()?)?.sum(2)?.neg()?.mean_all()?) // []
}

/// The pointer guide: the cross-entropy of `W [B, T_s+1, T_b]` against the ground-truth
/// selection, `mean_b ( −log W[b, i*, j*] + mean_{j ≠ j*} −log W[b, self, j] )` over the
/// visible base columns `j` (`base_visible [B·T_b]`, 0/1): the selection the `groundtruth`
/// mode uses ([`ground_truth`]: the base's last entity token `j*` takes the source's `i*`,
/// `base_entity[b]`, `source_entity[b]`, padded positions; every other base token keeps
/// itself), each column weighted. The entity column weighs as much as all the others together.
/// Pointing the entity column alone is not enough: the pointer's pair scores are a base part
/// plus a source part, so a pull on one cell raises the source's whole row.
pub fn guide_loss(w: &Tensor, source_entity: &[u32], base_entity: &[u32], base_visible: &[u8]) -> Result<Tensor> {
    let (b, rows, tb) = w.dims3()?;
    let target = ground_truth(b, rows - 1, tb, base_entity, source_entity, w.dtype(), w.device())?; // [B, T_s+1, T_b], one-hot per column
    // Column weights: 1 on the entity column, the others' 1 / (their count), 0 where not visible.
    let mut col = vec![0f32; b * tb];
    for (bi, &j) in base_entity.iter().enumerate() {
        let j = j as usize;
        let visible = |c: &usize| *c != j && base_visible[bi * tb + c] > 0;
        let n = (0..tb).filter(visible).count();
        for c in (0..tb).filter(visible) {
            col[bi * tb + c] = 1.0 / n as f32;
        }
        col[bi * tb + j] = 1.0;
    }
    let col = Tensor::from_vec(col, (b, 1, tb), w.device())?.to_dtype(w.dtype())?; // [B, 1, T_b]
    let nll = (w + 1e-8)?.log()?.neg()?; // [B, T_s+1, T_b]
    Ok((nll * target.broadcast_mul(&col)?)?.sum((1, 2))?.mean(0)?) // []
}

/// The separation term: with `bases [B, D, k]` (row `i`'s basis `B_i`) and `attributes[i]` the
/// attribute row `i`'s instruction names, `mean_{(i, j): a_i ≠ a_j} ‖B_iᵀ B_j‖²_F / k` over
/// ordered pairs (both orders: the mean is the same). `None` when every row names the same
/// attribute (no pair to separate).
pub fn separation_loss(bases: &Tensor, attributes: &[String]) -> Result<Option<Tensor>> {
    let (b, d, k) = bases.dims3()?;
    if attributes.len() != b {
        return Err(crate::error::Error::invalid(format!("separation loss: {b} bases but {} attributes", attributes.len())));
    }
    let pairs: Vec<f32> = (0..b * b).map(|p| if attributes[p / b] != attributes[p % b] { 1.0 } else { 0.0 }).collect();
    let n: f32 = pairs.iter().sum();
    if n == 0.0 {
        return Ok(None);
    }
    let mask = Tensor::from_vec(pairs, (b, b), bases.device())?.to_dtype(bases.dtype())?; // [B, B]
    let cols = bases.transpose(1, 2)?.contiguous()?.reshape((b * k, d))?; // [B·k, D]: row i·k + c is column c of B_i
    let gram = cols.matmul(&cols.t()?)?; // [B·k, B·k]: block (i, j) is B_iᵀ B_j
    let blocks = gram.sqr()?.reshape((b, k, b, k))?.sum(3)?.sum(1)?; // [B, B]: ‖B_iᵀ B_j‖²_F
    Ok(Some((blocks * mask)?.sum_all()?.affine(1.0 / (n as f64 * k as f64), 0.0)?)) // []
}

/// The guide's weight at `step`: `weight · (1 − step / steps)`, 0 from step `steps` on (and
/// when either is 0).
pub fn guide_weight(step: usize, steps: usize, weight: f64) -> f64 {
    if steps == 0 || step >= steps { 0.0 } else { weight * (1.0 - step as f64 / steps as f64) }
}

/// The sparsity weight at `step` of `total`: `linspace(start, end, total + 1)[step]`, zero for
/// the first `⌊warmup_ratio · total⌋` steps (the authors' defaults 0.15 → 1.5, warm-up 0.5).
pub fn sparsity_weight(step: usize, total: usize, start: f64, end: f64, warmup_ratio: f64) -> f64 {
    if step < share_of(warmup_ratio, total) {
        return 0.0;
    }
    if total == 0 {
        return start;
    }
    start + (end - start) * (step.min(total) as f64 / total as f64)
}

/// The weights of the objective's terms (from the `train.*` settings of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    pub causal_weight: f32,
    pub isolate_weight: f32,
    pub regularizer: Regularizer,
    pub sparsity_start: f64,
    pub sparsity_end: f64,
    pub sparsity_warmup_ratio: f64,
    pub entropy_weight: f64,
    /// The pointer guide's initial weight and fade-out length (0: no guide).
    pub guide_weight: f64,
    pub guide_steps: usize,
    /// The separation term's constant weight σ (0: no term).
    pub separation_weight: f64,
}

/// A regulariser on `W [B, T_s+1, T_b]`, giving a scalar.
type Penalty = fn(&Tensor) -> Result<Tensor>;

/// One step's objective.
pub struct Objective {
    /// `L`, with its graph.
    pub loss: Tensor,
    /// `L_pred`, with its graph.
    pub prediction: Tensor,
    /// `λ(step)` (0 when there is no regulariser).
    pub lambda: f64,
    /// `γ(step)`, the pointer guide's weight (0 without a guide).
    pub guide: f64,
    /// `S`, the separation term's value (None without the term, or with one attribute in the batch).
    pub separation: Option<f64>,
}

/// The objective of step `step` of `total` on the intervened pass `out` of `batch`.
/// `fixed_positions` (the baselines): `L_pred` alone. `subspace` gives each row's basis for the
/// separation term (only when `s.separation_weight > 0`).
pub fn objective(out: &Intervened, batch: &CollatedBatch, step: usize, total: usize, s: &Terms, fixed_positions: bool, subspace: &SubspaceModule) -> Result<Objective> {
    let prediction = prediction_loss(out, &batch.is_causal, s.causal_weight, s.isolate_weight)?; // []
    let (lambda, penalty): (f64, Option<Penalty>) = match s.regularizer {
        _ if fixed_positions => (0.0, None),
        Regularizer::Sparsity => (sparsity_weight(step, total, s.sparsity_start, s.sparsity_end, s.sparsity_warmup_ratio), Some(sparsity_loss)),
        Regularizer::Entropy => (s.entropy_weight, Some(entropy_loss)),
        Regularizer::None => (0.0, None),
    };
    let loss = match penalty {
        Some(r) if lambda > 0.0 => (&prediction + r(&out.w_soft)?.affine(lambda, 0.0)?)?, // []
        _ => prediction.clone(),
    };
    let guide = if fixed_positions { 0.0 } else { guide_weight(step, s.guide_steps, s.guide_weight) };
    let loss = if guide > 0.0 {
        (loss + guide_loss(&out.w_soft, &batch.source_entity_pos, &batch.base_entity_pos, &batch.base_intervention_mask)?.affine(guide, 0.0)?)? // []
    } else {
        loss
    };
    let sep = if s.separation_weight > 0.0 && !fixed_positions {
        let bases = subspace.basis(Some(&out.condition), batch.len())?; // [B, D, k]
        separation_loss(&bases, &batch.target_attribute)? // []
    } else {
        None
    };
    let (loss, separation) = match sep {
        Some(sep) => ((loss + sep.affine(s.separation_weight, 0.0)?)?, Some(sep.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)), // []
        None => (loss, None),
    };
    Ok(Objective { loss, prediction, lambda, guide, separation })
}
