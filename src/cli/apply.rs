//! `hyperdas apply`: run a trained interpreter on one new (base, source, instruction) triple and
//! show what it chose and what it changed.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{D, Tensor};
use clap::Args;

use crate::data::collate::{CollateOptions, collate, encode_row};
use crate::data::row::RavelRow;
use crate::intervention::selection::{InferenceMode, argmax};
use crate::model::llama::softmax_last_dim;

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The run directory (`hyperdas train --out`).
    #[arg(long)]
    run: PathBuf,
    /// Base prompt, e.g. "city: Paris, country:".
    #[arg(long)]
    base: String,
    /// Source (counterfactual) prompt, e.g. "city: Tokyo, country:".
    #[arg(long)]
    source: String,
    /// Instruction, e.g. "Paris ; Tokyo - Country".
    #[arg(long)]
    instruction: String,
    /// The base entity (its last occurrence ends the intervenable prefix). Default: the
    /// instruction's first name ("Paris" in "Paris ; Tokyo - Country").
    #[arg(long)]
    base_entity: Option<String>,
    /// The source entity. Default: the instruction's second name.
    #[arg(long)]
    source_entity: Option<String>,
    /// Inference mode (a wrong name lists the valid ones).
    #[arg(long, default_value = "soft", value_parser = InferenceMode::parse)]
    mode: InferenceMode,
    /// Tokens to show before and after.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

/// Split `prompt` after the last occurrence of `entity`.
fn split_at_entity(prompt: &str, entity: &str, what: &str) -> Result<(String, String)> {
    let at = prompt.rfind(entity).with_context(|| format!("the {what} entity {entity:?} does not occur in the {what} prompt {prompt:?} (pass --{what}-entity)"))?;
    let end = at + entity.len();
    Ok((prompt[..end].to_string(), prompt[end..].to_string()))
}

#[allow(clippy::needless_range_loop)] // j indexes W's columns and the base tokens alike
pub fn run(a: &ApplyArgs) -> Result<()> {
    let mode = a.mode;
    let names = a.instruction.rsplit_once(" - ").map(|(ents, _)| ents.split(" ; ").map(str::trim).map(String::from).collect::<Vec<_>>()).unwrap_or_default();
    let base_entity = a.base_entity.clone().or_else(|| names.first().cloned()).context("no base entity: pass --base-entity or an instruction like \"Paris ; Tokyo - Country\"")?;
    let source_entity = a.source_entity.clone().or_else(|| names.get(1).cloned()).context("no source entity: pass --source-entity or an instruction like \"Paris ; Tokyo - Country\"")?;
    let (bp, bs) = split_at_entity(&a.base, &base_entity, "base")?;
    let (sp, ss) = split_at_entity(&a.source, &source_entity, "source")?;
    let run = crate::experiment::run::load_run(&a.run, true)?;
    let cfg = &run.config;
    // A baseline (DAS, MDAS) has one mode: its fixed last-entity-token positions.
    let mode = if run.interpreter.supports(mode) { mode } else { run.interpreter.native_mode() };
    let tok = &run.lm.tokenizer;
    // A placeholder label: only the first label position is read, and its logits predict the
    // first token after the base prompt (teacher forcing does not reach it).
    let row = RavelRow {
        input_prefix: bp,
        input_suffix: bs,
        counterfactual_input_prefix: sp,
        counterfactual_input_suffix: ss,
        edit_instruction: a.instruction.clone(),
        entity: base_entity,
        counterfactual_entity: source_entity,
        target: "?".into(),
        counterfactual_target: "?".into(),
        attribute_type: "causal".into(),
        domain: String::new(),
        attribute: String::new(),
        verify_text: String::new(),
    };
    let opts = CollateOptions { base_suffix_visible: cfg.data.base_suffix_visible, source_suffix_visible: cfg.data.source_suffix_visible, ..Default::default() };
    let enc = encode_row(tok, &row, 0, &opts)?;
    let batch = collate(&[&enc], tok.padding_id());
    let model = &run.lm.model;
    let out = run.interpreter.forward(model, &batch, mode, 1)?;
    let after = softmax_last_dim(&out.logits.squeeze(0)?.squeeze(0)?)?; // [V]
    let base = batch.base_batch(model.device())?;
    let h = model.forward_hidden(&base, Some(&[]))?;
    let pos = Tensor::new(&[[(enc.label_start - 1) as u32]], model.device())?;
    let before = softmax_last_dim(&model.logits_at(&h.final_normed, &pos)?.squeeze(0)?.squeeze(0)?.to_dtype(candle_core::DType::F32)?)?; // [V]
    let top = |p: &Tensor| -> Result<Vec<(String, f32)>> {
        let v = p.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&x, &y| v[y].total_cmp(&v[x]));
        idx.into_iter().take(a.top.max(1)).map(|i| Ok((tok.decode(&[i as u32])?, v[i]))).collect()
    };
    let w = out.w.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?; // [T_s+1, T_b]
    let ts = batch.source_len;
    println!("mode {}; base tokens with their chosen source (weight), 'self' = unchanged:", mode.name());
    for j in 0..enc.label_start {
        let best = argmax((0..=ts).map(|i| w[i][j]));
        let weight = w[best][j];
        let bt = tok.decode(&[enc.base_ids[j]])?;
        let mark = if j < enc.base_visible { "" } else { " (not intervenable)" };
        if best < ts {
            println!("  {j:>3} {bt:?} <- source {best} {:?} ({weight:.3}){mark}", tok.decode(&[enc.source_ids[best]])?);
        } else {
            println!("  {j:>3} {bt:?} self ({weight:.3}){mark}");
        }
    }
    println!("next token before the intervention: {}", top(&before)?.iter().map(|(t, p)| format!("{t:?} {p:.3}")).collect::<Vec<_>>().join(", "));
    println!("next token after the intervention:  {}", top(&after)?.iter().map(|(t, p)| format!("{t:?} {p:.3}")).collect::<Vec<_>>().join(", "));
    if after.argmax(D::Minus1)?.to_scalar::<u32>()? == before.argmax(D::Minus1)?.to_scalar::<u32>()? {
        println!("(the top prediction did not change)");
    }
    Ok(())
}
