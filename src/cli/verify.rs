//! `hyperdas verify-model`: next-token top-k for a few prompts, and parity against a
//! transformers reference dump.

use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::{D, DType};
use clap::Args;

use super::ModelArgs;
use crate::model::TokenBatch;
use crate::parity::{self, Reference};

const DEFAULT_PROMPTS: &[&str] = &["Paris is a city in the country of", "Berlin is a city in the country of", "The capital of France is", "Tokyo is the capital of"];

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A reference dump from tools/make_fixtures.py; prints the max abs difference per tensor.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Fail (exit 1) when a difference exceeds this (gradients: this or 5e-6 of their largest
    /// value, whichever is looser; see `TensorDiff::tolerance`).
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f64,
    /// A prompt to complete (repeatable; default: four capital/country prompts).
    #[arg(long = "prompt", short)]
    prompts: Vec<String>,
    /// How many next tokens to show.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

pub fn run(a: &VerifyArgs) -> Result<()> {
    // Text lines, unless `--json` (then one document at the end).
    macro_rules! text {
        ($($t:tt)*) => {
            if !super::json() { println!($($t)*) }
        };
    }
    let mut completions = Vec::new();
    let mut parity_json = serde_json::Value::Null;
    let lm = a.model.load()?;
    let tok = &lm.tokenizer;
    text!("model:      {}", lm.description);
    text!("source:     {}", lm.source);
    let start = match tok.start_token {
        Some(id) => format!("{:?} (id {id})", tok.decode(&[id])?),
        None => "none".to_string(),
    };
    text!("tokenizer:  {} tokens, start token {start}: {}", tok.vocab_size(), tok.start_token_reason);

    let prompts: Vec<String> = if a.prompts.is_empty() { DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect() } else { a.prompts.clone() };
    let rows = prompts.iter().map(|p| tok.encode_prompt(p)).collect::<crate::error::Result<Vec<_>>>()?;
    if let Some(i) = rows.iter().position(Vec::is_empty) {
        bail!("prompt {:?} encodes to no tokens", prompts[i]);
    }
    let batch = TokenBatch::left_padded(&rows, tok.padding_id(), lm.model.device())?;
    let hs = lm.model.forward_hidden(&batch, Some(&[]))?;
    let probs = candle_nn::ops::softmax(&lm.model.logits_last(&hs.final_normed)?.to_dtype(DType::F32)?, D::Minus1)?; // [B, V]
    let probs: Vec<Vec<f32>> = probs.to_vec2()?;
    for ((p, ids), row) in prompts.iter().zip(&rows).zip(&probs) {
        text!();
        text!("{p:?}  ({} tokens: {ids:?})", ids.len());
        let mut order: Vec<usize> = (0..row.len()).collect();
        let k = a.top_k.min(row.len());
        order.select_nth_unstable_by(k.saturating_sub(1), |&x, &y| row[y].total_cmp(&row[x]));
        order.truncate(k);
        order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        let top: Vec<serde_json::Value> = order.iter().map(|&id| Ok(serde_json::json!({"id": id, "token": tok.decode(&[id as u32])?, "p": row[id]}))).collect::<Result<_>>()?;
        completions.push(serde_json::json!({"prompt": p, "ids": ids, "top": top}));
        for (rank, &id) in order.iter().enumerate() {
            text!("  {:>2}. {:<20} {:.3}  (id {id})", rank + 1, format!("{:?}", tok.decode(&[id as u32])?), row[id]);
        }
    }

    if let Some(path) = &a.reference {
        text!();
        let r = Reference::open(path)?;
        let report = parity::compare(&lm, &r)?;
        text!("parity against {}:", path.display());
        if let Some(m) = r.metadata.get("transformers") {
            text!("  (reference made with transformers {m})");
        }
        let mut failed = false;
        for d in &report.diffs {
            let ok = d.within(a.tolerance);
            failed |= !ok;
            text!("  {:<16} max|diff| {:.3e}   max|ref| {:.3e}   {} values   {}", d.name, d.max_abs_diff, d.max_abs_ref, d.compared, if ok { "OK" } else { "NOT OK" });
        }
        match &report.token_mismatches {
            None => text!("  token ids        (no prompts recorded in the reference)"),
            Some(m) if m.is_empty() => text!("  token ids        identical to the reference for every prompt   OK"),
            Some(m) => {
                failed = true;
                for mm in m {
                    text!("  token ids differ for {:?}: ours {:?}, reference {:?}   NOT OK", mm.prompt, mm.ours, mm.reference);
                }
            }
        }
        parity_json = serde_json::json!({
            "reference": path,
            "tolerance": a.tolerance,
            "diffs": report.diffs.iter().map(|d| serde_json::json!({"name": d.name, "max_abs_diff": d.max_abs_diff, "max_abs_ref": d.max_abs_ref, "compared": d.compared, "ok": d.within(a.tolerance)})).collect::<Vec<_>>(),
            "token_ids_match": report.token_mismatches.as_ref().map(|m| m.is_empty()),
            "ok": !failed,
        });
        if failed && super::json() {
            super::print_json(&serde_json::json!({"model": lm.description, "completions": completions, "parity": parity_json}))?;
        }
        if failed {
            bail!("parity check failed (tolerance {:e})", a.tolerance);
        }
    }
    if super::json() {
        super::print_json(&serde_json::json!({"model": lm.description, "source": lm.source.to_string(), "completions": completions, "parity": parity_json}))?;
    }
    Ok(())
}
