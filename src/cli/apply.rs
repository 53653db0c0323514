//! `hyperdas apply`: run a trained interpreter on one new (base, source, instruction) triple and
//! show what it chose and what it changed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::experiment::apply::{Query, apply};
use crate::intervention::selection::InferenceMode;

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
    /// Inference modes, comma-separated, each shown in turn (a wrong name lists the valid ones).
    #[arg(long, default_value = "soft", value_delimiter = ',', value_parser = InferenceMode::parse)]
    modes: Vec<InferenceMode>,
    /// Tokens to show before and after.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Device to load the run onto: `cpu`, `cuda` or `cuda:N` [default: the run's own model.device] (checkpoints are device-independent).
    #[arg(long)]
    device: Option<String>,
}

pub fn run(a: &ApplyArgs) -> Result<()> {
    let run = crate::experiment::run::load_run_on(&a.run, crate::experiment::run::Reload { device: a.device.as_deref(), ..Default::default() }, true)?;
    let q = Query { base: a.base.clone(), source: a.source.clone(), instruction: a.instruction.clone(), base_entity: a.base_entity.clone(), source_entity: a.source_entity.clone() };
    let applied: Vec<_> = a.modes.iter().map(|&m| apply(&run, &q, m, a.top)).collect::<std::result::Result<_, _>>()?;
    if super::json() {
        return super::print_json(&serde_json::to_value(&applied)?);
    }
    for r in &applied {
        print_applied(r);
    }
    Ok(())
}

fn print_applied(r: &crate::experiment::apply::Applied) {
    println!("mode {}; base tokens with their chosen source (weight), 'self' = unchanged:", r.mode.name());
    for c in &r.choices {
        let mark = if c.intervenable { "" } else { " (not intervenable)" };
        match (c.source_index, &c.source_token) {
            (Some(i), Some(t)) => println!("  {:>3} {:?} <- source {i} {t:?} ({:.3}){mark}", c.base_index, c.base_token, c.weight),
            _ => println!("  {:>3} {:?} self ({:.3}){mark}", c.base_index, c.base_token, c.weight),
        }
    }
    let show = |v: &[(String, f32)]| v.iter().map(|(t, p)| format!("{t:?} {p:.3}")).collect::<Vec<_>>().join(", ");
    println!("next token before the intervention: {}", show(&r.before));
    println!("next token after the intervention:  {}", show(&r.after));
    if !r.changed() {
        println!("(the top prediction did not change)");
    }
}
