//! `hyperdas train`: one HyperDAS run from a TOML configuration (src/experiment/run.rs);
//! `hyperdas baseline das|mdas`: the same run with a baseline's method and preset.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::experiment::run::{resolve_config, run as run_config};
use crate::hypernet::interpreter::Method;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML configuration (omit to use the defaults; see `--show-config`).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a setting: `--set train.lr=1e-4 --set data.train=x.jsonl`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (must not exist or be empty) [default: runs/<method>-<date>-N, the first N free; --resume needs it].
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint (same configuration; the result equals an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    show_config: bool,
    /// Device for the target and everything the run allocates: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`); the same as `--set model.device=...`.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args, Debug)]
pub struct BaselineArgs {
    /// `das` (trained on causal rows only) or `mdas` (causal + isolate rows: RAVEL's multi-task DAS).
    method: String,
    #[command(flatten)]
    train: TrainArgs,
}

pub fn run(a: &TrainArgs) -> Result<()> {
    run_with(a, Method::HyperDas)
}

pub fn baseline(a: &BaselineArgs) -> Result<()> {
    let method = Method::parse(&a.method)?;
    if !method.is_baseline() {
        anyhow::bail!("`hyperdas baseline` trains das or mdas; HyperDAS itself is `hyperdas train`");
    }
    run_with(&a.train, method)
}

fn run_with(a: &TrainArgs, method: Method) -> Result<()> {
    let cfg = resolve_config(method, a.config.as_deref(), None, &super::with_device(&a.set, a.device.as_deref())?)?;
    if a.show_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let out = match (&a.out, a.resume) {
        (Some(o), _) => o.clone(),
        (None, true) => anyhow::bail!("--resume continues a run: name it with --out DIR"),
        (None, false) => crate::experiment::run::fresh_run_dir(method.name()),
    };
    let Some(results) = run_config(&cfg, &out, a.resume, super::progress())? else {
        let cmd = if method.is_baseline() { format!("baseline {}", method.name()) } else { "train".into() };
        if super::json() {
            return super::print_json(&serde_json::json!({"run": out, "stopped_early": true, "results": null}));
        }
        println!("stopped early (train.stop_after_steps); continue with: hyperdas {cmd} --resume --out {} [same --config/--set]", out.display());
        return Ok(());
    };
    if super::json() {
        return super::print_json(&serde_json::json!({"run": out, "results": results}));
    }
    println!("{}", super::results_table(&results));
    println!(
        "run directory: {} (results.json, results.csv, results.by_attribute.{{json,csv}}, metrics.jsonl, events.out.tfevents.* for TensorBoard, run.json, config.resolved.toml, checkpoint/)",
        out.display()
    );
    Ok(())
}
