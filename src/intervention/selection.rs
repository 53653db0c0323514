//! Token-position selection: the inference modes that turn the pointer head's soft weights
//! `W [B, T_s+1, T_b]` into discrete choices, and the ground-truth weights (docs/method.md §3;
//! the regularisers on `W` are part of the objective, in `experiment::loss`). Row `T_s` of `W` is "self" (keep the base vector); each column
//! `j` is a distribution over {source tokens} ∪ {self}.
//!
//! Every mode works at batch size 1 (the reference's argmax branches crash there). Ties break
//! towards the lowest index, as `torch.argmax` does.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// How `W` is used at evaluation. In configurations and on the command line it is its name
/// ([`InferenceMode::parse`] reads the aliases too).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum InferenceMode {
    /// `W` as computed ("Soft Intervention", the paper's main table).
    #[default]
    Soft,
    /// Per base column, one-hot at the arg-max row (self may win): "One-to-Many".
    ColumnArgmax,
    /// Each source row bids on its best column; self is floored at `threshold`; each column
    /// takes the best surviving bid or self: "One-to-One" (reference threshold 0.1).
    BiddingArgmax { threshold: f32 },
    /// One (source, base) pair: the global arg-max over the source rows; every other column keeps self.
    GlobalArgmax,
    /// The last entity token of the source into the last entity token of the base (MDAS's choice).
    GroundTruth,
}

impl InferenceMode {
    /// Every mode, in the order tables list them (the one list: defaults and help texts use it).
    pub const ALL: [InferenceMode; 5] = [InferenceMode::Soft, InferenceMode::ColumnArgmax, InferenceMode::BiddingArgmax { threshold: 0.1 }, InferenceMode::GlobalArgmax, InferenceMode::GroundTruth];

    /// The names of [`InferenceMode::ALL`], comma-separated (for help texts and errors).
    pub fn all_names() -> String {
        InferenceMode::ALL.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
    }

    /// Names accepted on the command line (the reference's, and the paper's).
    pub fn parse(s: &str) -> Result<InferenceMode> {
        Ok(match s {
            "soft" | "default" => InferenceMode::Soft,
            "column_argmax" | "one-to-many" => InferenceMode::ColumnArgmax,
            "bidding_argmax" | "one-to-one" => InferenceMode::BiddingArgmax { threshold: 0.1 },
            "global_argmax" => InferenceMode::GlobalArgmax,
            "groundtruth" | "ground-truth" => InferenceMode::GroundTruth,
            _ => {
                return Err(Error::invalid(format!("unknown inference mode `{s}`; valid: {} (one-to-many = column_argmax, one-to-one = bidding_argmax)", InferenceMode::all_names())));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            InferenceMode::Soft => "soft",
            InferenceMode::ColumnArgmax => "column_argmax",
            InferenceMode::BiddingArgmax { .. } => "bidding_argmax",
            InferenceMode::GlobalArgmax => "global_argmax",
            InferenceMode::GroundTruth => "groundtruth",
        }
    }
}

impl TryFrom<String> for InferenceMode {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        InferenceMode::parse(&s)
    }
}

impl From<InferenceMode> for String {
    fn from(m: InferenceMode) -> String {
        m.name().to_string()
    }
}

/// Index of the largest value (first on ties, as `torch.argmax`).
pub fn argmax(v: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Discretise soft weights `w [B, T_s+1, T_b]` (any float dtype) for a mode. `Soft` returns
/// `w` itself; `GroundTruth` needs [`ground_truth`] instead. The result has no gradient.
pub fn discretize(w: &Tensor, mode: InferenceMode) -> Result<Tensor> {
    let (b, rows, tb) = w.dims3()?;
    let ts = rows.checked_sub(1).ok_or_else(|| Error::invalid("W needs at least the self row"))?;
    match mode {
        InferenceMode::Soft => return Ok(w.clone()),
        InferenceMode::GroundTruth => return Err(Error::invalid("the groundtruth mode builds W from entity positions: use ground_truth()")),
        _ => {}
    }
    let v = w.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let mut out = vec![0f32; b * rows * tb];
    let at = |bi: usize, i: usize, j: usize| bi * rows * tb + i * tb + j;
    for (bi, wb) in v.iter().enumerate() {
        match mode {
            InferenceMode::ColumnArgmax => {
                for j in 0..tb {
                    out[at(bi, argmax((0..rows).map(|i| wb[i][j])), j)] = 1.0;
                }
            }
            InferenceMode::BiddingArgmax { threshold } => {
                // (1) each source row keeps only its best column.
                let mut bids = vec![vec![0f32; tb]; rows];
                for i in 0..ts {
                    let j = argmax(wb[i].iter().copied());
                    bids[i][j] = wb[i][j];
                }
                // (2) the self row, floored at the threshold.
                bids[ts] = wb[ts].iter().map(|&x| x.max(threshold)).collect();
                // (3) each column: arg-max over surviving bids and self.
                for j in 0..tb {
                    out[at(bi, argmax((0..rows).map(|i| bids[i][j])), j)] = 1.0;
                }
            }
            InferenceMode::GlobalArgmax => {
                let flat = argmax((0..ts).flat_map(|i| (0..tb).map(move |j| (i, j))).map(|(i, j)| wb[i][j]));
                let (gi, gj) = if ts == 0 { (ts, 0) } else { (flat / tb, flat % tb) };
                for j in 0..tb {
                    out[at(bi, if j == gj { gi } else { ts }, j)] = 1.0;
                }
            }
            InferenceMode::Soft | InferenceMode::GroundTruth => unreachable!("handled above"),
        }
    }
    Ok(Tensor::from_vec(out, (b, rows, tb), w.device())?.to_dtype(w.dtype())?)
}

/// Ground-truth weights: source position `source_pos[b]` into base position `base_pos[b]`,
/// self everywhere else. Positions are in padded coordinates (as collation gives them).
pub fn ground_truth(b: usize, ts: usize, tb: usize, base_pos: &[u32], source_pos: &[u32], dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    if base_pos.len() != b || source_pos.len() != b {
        return Err(Error::invalid(format!("ground_truth: {} base and {} source positions for a batch of {b}", base_pos.len(), source_pos.len())));
    }
    let rows = ts + 1;
    let mut out = vec![0f32; b * rows * tb];
    for bi in 0..b {
        let (pb, ps) = (base_pos[bi] as usize, source_pos[bi] as usize);
        if pb >= tb || ps >= ts {
            return Err(Error::invalid(format!("ground_truth: row {bi} has base position {pb} (of {tb}) / source position {ps} (of {ts})")));
        }
        for j in 0..tb {
            let i = if j == pb { ps } else { ts };
            out[bi * rows * tb + i * tb + j] = 1.0;
        }
    }
    Ok(Tensor::from_vec(out, (b, rows, tb), device)?.to_dtype(dtype)?)
}
