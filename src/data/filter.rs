//! Knowledge filtering with the target model (the reference's `filter_dataset`): keep a row only
//! if the frozen model, teacher-forced on `verify_text + [" "] + label`, predicts every label
//! token by arg-max. The label is the value the intervened model must produce (the source's for
//! causal rows, the base's own for isolate rows), so a kept row asks only for facts the model
//! knows. Unlike the reference this runs once: our forward pass is deterministic, so filtering
//! again would change nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::D;
use serde::Serialize;

use super::collate::{encode_prompt_with_label, label_batch};
use super::row::RavelRow;
use crate::error::Result;
use crate::model::{Llama, TextTokenizer};

#[derive(Debug, Clone)]
pub struct FilterOptions {
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// Show a progress bar (on a terminal only).
    pub progress: bool,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions { batch_size: 32, progress: false }
    }
}

/// Counts for one `(attribute_type, attribute)` group.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GroupCounts {
    /// Rows before filtering.
    pub candidates: usize,
    /// Rows the model passed.
    pub kept: usize,
    /// Rows whose label could not be separated from the prompt by the tokenizer (failed).
    pub unusable: usize,
    /// `kept / candidates`.
    pub pass_rate: f64,
}

/// What the filter did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FilterStats {
    /// Keyed `"causal/Country"`, `"isolate/Continent"`, ...
    pub groups: BTreeMap<String, GroupCounts>,
    /// Distinct (verify_text, label) pairs run through the model.
    pub unique_checks: usize,
    /// Tokens run through the model (padding excluded).
    pub tokens: usize,
    pub seconds: f64,
}

/// Group key of a row.
pub fn group_key(r: &RavelRow) -> String {
    format!("{}/{}", r.attribute_type, r.attribute)
}

/// Rows per group key (`causal/Country`, ...).
pub fn group_counts(rows: &[RavelRow]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in rows {
        *counts.entry(group_key(r)).or_insert(0) += 1;
    }
    counts
}

/// Run the model over every distinct `(verify_text, label)` and keep the rows it gets right.
pub fn filter_rows(model: &Llama, tok: &TextTokenizer, rows: Vec<RavelRow>, opts: &FilterOptions) -> Result<(Vec<RavelRow>, FilterStats)> {
    let t0 = Instant::now();
    // Distinct checks.
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut checks: Vec<(String, String)> = Vec::new();
    let row_check: Vec<usize> = rows
        .iter()
        .map(|r| {
            let key = (r.verify_text.clone(), r.label().to_string());
            *index.entry(key.clone()).or_insert_with(|| {
                checks.push(key);
                checks.len() - 1
            })
        })
        .collect();
    // Tokenise; a label that cannot be separated from its prompt fails the check.
    let mut passed = vec![false; checks.len()];
    let mut unusable = vec![false; checks.len()];
    let mut encoded = Vec::new();
    for (i, (text, label)) in checks.iter().enumerate() {
        match encode_prompt_with_label(tok, text, label) {
            Ok(e) => encoded.push((i, e)),
            Err(_) => unusable[i] = true,
        }
    }
    // Shortest first, so batches hold similar lengths (little padding).
    encoded.sort_by_key(|(i, e)| (e.ids.len(), *i));
    let tokens: usize = encoded.iter().map(|(_, e)| e.ids.len()).sum();
    let pb = crate::progress::bar(encoded.len() as u64, "filtering with the model [{bar:30}] {pos}/{len} prompts {elapsed} (eta {eta})", opts.progress);
    let device = model.device().clone();
    let pad = tok.padding_id();
    for chunk in encoded.chunks(opts.batch_size.max(1)) {
        let seqs: Vec<(&[u32], usize)> = chunk.iter().map(|(_, e)| (e.ids.as_slice(), e.label_start)).collect();
        let lb = label_batch(&seqs, None, pad, &device)?;
        let (k, targets) = (lb.k, lb.targets);
        let hidden = model.forward_hidden(&lb.tokens, Some(&[]))?;
        let logits = model.logits_at(&hidden.final_normed, &lb.positions)?; // [B, K, V]
        let predicted = logits.argmax(D::Minus1)?.to_vec2::<u32>()?; // [B, K]
        for (row, (i, _)) in chunk.iter().enumerate() {
            passed[*i] = predicted[row].iter().zip(&targets[row * k..(row + 1) * k]).all(|(p, t)| p == t);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();

    let mut stats = FilterStats { unique_checks: checks.len(), tokens, ..Default::default() };
    let mut kept = Vec::new();
    for (r, c) in rows.into_iter().zip(row_check) {
        let g = stats.groups.entry(group_key(&r)).or_default();
        g.candidates += 1;
        g.unusable += usize::from(unusable[c]);
        if passed[c] {
            g.kept += 1;
            kept.push(r);
        }
    }
    for g in stats.groups.values_mut() {
        g.pass_rate = if g.candidates == 0 { 0.0 } else { g.kept as f64 / g.candidates as f64 };
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok((kept, stats))
}
