//! `hyperdas train`: one HyperDAS run from a TOML configuration (src/train/run.rs).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::train::run::{RunConfig, run as run_config};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML configuration (omit to use the defaults; see `--show-config`).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a setting: `--set train.lr=1e-4 --set data.train=x.jsonl`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (must not exist or be empty).
    #[arg(long, short, default_value = "runs/hyperdas")]
    out: PathBuf,
    /// Continue the run in --out from its checkpoint (same configuration; the result equals an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    show_config: bool,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let cfg: RunConfig = crate::config::load(a.config.as_deref(), &a.set)?;
    if a.show_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let Some(results) = run_config(&cfg, &a.out, a.resume, !a.quiet)? else {
        println!("stopped early (train.stop_after_steps); continue with: hyperdas train --resume --out {} [same --config/--set]", a.out.display());
        return Ok(());
    };
    println!("{:<16} {:>7} {:>8} {:>12} {:>10}", "mode", "cause", "isolate", "disentangle", "test loss");
    for (mode, r) in &results {
        println!("{mode:<16} {:>7.3} {:>8.3} {:>12.3} {:>10.3}", r.accs["causal"], r.accs["isolate"], r.accs["disentangle"], r.test_loss);
    }
    println!("run directory: {} (results.json, results.csv, results.by_attribute.{{json,csv}}, metrics.jsonl, config.resolved.toml, checkpoint/)", a.out.display());
    Ok(())
}
