//! `hyperdas eval`: score a trained run on a dataset, per inference mode.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::intervention::selection::InferenceMode;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The run directory (`hyperdas train --out`).
    #[arg(long)]
    run: PathBuf,
    /// A .jsonl file or datasets save_to_disk directory [default: the run's own test set, data.test].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Inference modes, comma-separated (default: every mode; a wrong name lists the valid ones).
    #[arg(long, value_delimiter = ',', value_parser = InferenceMode::parse)]
    modes: Vec<InferenceMode>,
    /// Skip (and count) malformed or over-long rows instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Device to load the run onto: `cpu`, `cuda` or `cuda:N` [default: the run's own model.device] (checkpoints are device-independent).
    #[arg(long)]
    device: Option<String>,
    /// Precision of the clean passes: `f32` or `bf16` [default: the one the run trained with, its run.json].
    #[arg(long)]
    clean_matmul: Option<crate::model::CleanMatmul>,
    /// Precision of the intervened pass: `f32` or `bf16` [default: the one the run trained with].
    #[arg(long)]
    intervened_matmul: Option<crate::model::CleanMatmul>,
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let modes: Vec<InferenceMode> = if a.modes.is_empty() { InferenceMode::ALL.to_vec() } else { a.modes.clone() };
    let data = crate::experiment::run::data_or_test_set(&a.run, a.data.as_deref())?;
    let results = crate::experiment::run::eval_run_on(
        &a.run,
        crate::experiment::run::Reload { device: a.device.as_deref(), clean_matmul: a.clean_matmul, intervened_matmul: a.intervened_matmul },
        &data,
        &modes,
        a.skip_bad_rows,
        super::progress(),
    )?;
    if super::json() {
        return super::print_json(&serde_json::json!({"run": a.run, "data": data, "results": results}));
    }
    println!("{}", super::results_table(&results));
    println!("written to {}/eval/ (results.json, results.csv, positions.jsonl per dataset)", a.run.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The run directory (`hyperdas train --out`).
    #[arg(long)]
    run: PathBuf,
    /// The test set to draw heatmap examples from (a .jsonl file or save_to_disk directory) [default: the run's own test set, data.test].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Heading of the page.
    #[arg(long, default_value = "")]
    title: String,
    /// Baseline runs (`hyperdas baseline`) to compare with, in a table beside this run's soft
    /// and bidding_argmax scores; repeatable.
    #[arg(long = "compare", value_name = "RUN_DIR")]
    compare: Vec<PathBuf>,
    /// Device to load the run onto: `cpu`, `cuda` or `cuda:N` [default: the run's own model.device] (checkpoints are device-independent).
    #[arg(long)]
    device: Option<String>,
}

/// `hyperdas report`: write `report.html` (+ `heatmaps.json`) into a finished run directory.
pub fn report(a: &ReportArgs) -> Result<()> {
    let comparison = if a.compare.is_empty() {
        String::new()
    } else {
        let runs: Vec<_> = std::iter::once(&a.run).chain(&a.compare).map(|d| crate::report::compare::read_run(d)).collect::<std::result::Result<_, _>>()?;
        crate::report::compare::html(&crate::report::compare::compare(&runs, &["soft".into(), "bidding_argmax".into()])?)?
    };
    let data = crate::experiment::run::data_or_test_set(&a.run, a.data.as_deref())?;
    let path = crate::report::write_report_on(&a.run, a.device.as_deref(), &data, &crate::report::ReportExtras { title: a.title.clone(), notes: Vec::new(), comparison })?;
    if super::json() {
        return super::print_json(&serde_json::json!({"run": a.run, "data": data, "report": path}));
    }
    println!("report: {}", path.display());
    Ok(())
}
