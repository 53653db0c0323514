//! `hyperdas compare` (finished runs side by side) and `hyperdas sweep` (a grid of runs).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::experiment::sweep::{self, Axis, SweepPlan};
use crate::report::compare;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// A finished run directory (`hyperdas train`, `hyperdas baseline`) or a sweep's directory
    /// (its runs/ are taken); repeat for each: `--run runs/a --run runs/b`.
    #[arg(long = "run", value_name = "DIR", required = true)]
    runs: Vec<PathBuf>,
    /// HyperDAS inference modes to show (comma-separated); baselines have one (the last entity token).
    #[arg(long, default_value = "soft", value_delimiter = ',')]
    modes: Vec<String>,
    /// Where compare.md and compare.html go.
    #[arg(long, short, default_value = "runs/compare")]
    out: PathBuf,
}

pub fn compare(a: &CompareArgs) -> Result<()> {
    let mut dirs = Vec::new();
    for d in &a.runs {
        if !d.join("run.json").is_file() && d.join("runs").is_dir() {
            dirs.extend(sweep::run_dirs(&d.join("runs"))?);
        } else {
            dirs.push(d.clone());
        }
    }
    let runs: Vec<_> = dirs.iter().map(|d| compare::read_run(d)).collect::<std::result::Result<_, _>>()?;
    if runs.is_empty() {
        bail!("no finished runs under {}", a.runs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    let rows = compare::compare(&runs, &a.modes)?;
    let md = compare::markdown(&rows);
    if !super::json() {
        print!("{md}");
    }
    std::fs::create_dir_all(&a.out)?;
    let note = format!(
        "Runs: {}. Cause / Isolate / Disentangle on each run's test set; layer = the residual entering that block; HyperDAS rows per inference mode, DAS and MDAS at the last entity token.",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    std::fs::write(a.out.join("compare.md"), format!("# Comparison\n\n{note}\n\n{md}"))?;
    std::fs::write(a.out.join("compare.html"), compare::html_page("Comparison", &rows, &note)?)?;
    if super::json() {
        return super::print_json(&serde_json::json!({"rows": rows, "written": [a.out.join("compare.md"), a.out.join("compare.html")]}));
    }
    println!("wrote {} and {}", a.out.join("compare.md").display(), a.out.join("compare.html").display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// TOML configuration shared by every run (data, model, training settings).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a setting for every run: `--set train.epochs=5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Device for the target and everything the run allocates: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`); the same as `--set model.device=...`.
    #[arg(long)]
    device: Option<String>,
    /// Methods to run (comma-separated: hyperdas, das, mdas).
    #[arg(long, default_value = "mdas", value_delimiter = ',')]
    methods: Vec<String>,
    /// A grid axis, repeatable: `layer=1:29:2` (END included), `rank=8,16,32`, or any
    /// configuration key with comma-separated values.
    #[arg(long = "grid", value_name = "KEY=VALUES")]
    grid: Vec<String>,
    /// Seeds: one run per seed for every other point (sets `interpreter.seed` and `train.seed`);
    /// `hyperdas compare` then shows each setting's mean ± std over them.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    /// A TOML file of named variants, each a list of `--set` assignments
    /// (`head-lr-10 = ["train.head_lr_scale=10"]`; `base = []`): one run per variant, in the
    /// file's order (an ablation table).
    #[arg(long, value_name = "FILE")]
    variants: Option<PathBuf>,
    /// HyperDAS's inference modes in sweep.csv, comma-separated (the first one in the plots and summary).
    #[arg(long, default_value = "soft", value_delimiter = ',')]
    modes: Vec<String>,
    /// Print every point's resolved configuration as TOML (one document per run) and exit.
    #[arg(long)]
    show_config: bool,
    /// Sweep directory: runs/<name>/ per point, sweep.csv, summary.md, sweep.html, *.svg.
    #[arg(long, short, default_value = "runs/sweep")]
    out: PathBuf,
}

pub fn sweep(a: &SweepArgs) -> Result<()> {
    let mut axes: Vec<Axis> = a.grid.iter().map(|g| Axis::parse(g)).collect::<std::result::Result<_, _>>()?;
    if axes.iter().any(|x| x.key == "method") {
        if a.methods != ["mdas"] {
            bail!("give the methods once: either --methods or --grid method=...");
        }
    } else {
        axes.insert(0, Axis::parse(&format!("method={}", a.methods.join(",")))?);
    }
    for m in &a.modes {
        crate::intervention::selection::InferenceMode::parse(m)?;
    }
    let (names, variants) = match &a.variants {
        Some(p) => sweep::read_variants(p)?,
        None => (Vec::new(), Default::default()),
    };
    if !names.is_empty() && !axes.iter().any(|x| x.key == "variant") {
        axes.push(Axis::parse(&format!("variant={}", names.join(",")))?);
    }
    if !a.seeds.is_empty() {
        if axes.iter().any(|x| x.key == "seed") {
            bail!("give the seeds once: either --seeds or --grid seed=...");
        }
        axes.push(Axis::parse(&format!("seed={}", a.seeds.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")))?);
    }
    let sets = super::with_device(&a.set, a.device.as_deref())?;
    let plan = SweepPlan { config: a.config.as_deref(), variants: &variants, sets: &sets, axes: &axes, out: &a.out, progress: super::progress() };
    if a.show_config {
        for p in sweep::points(&axes)? {
            println!("# run {} ({})\n{}", p.name, p.method.label(), toml::to_string_pretty(&sweep::point_config(&plan, &p)?)?);
        }
        return Ok(());
    }
    let points = sweep::run(&plan)?;
    let runs = crate::report::sweep::write(&crate::report::sweep::SweepSummary { axes: &axes, points: &points, out: &a.out, hyperdas_modes: &a.modes, progress: super::progress() })?;
    if super::json() {
        let runs: Vec<serde_json::Value> = points.iter().zip(&runs).map(|((p, dir), r)| serde_json::json!({"name": p.name, "method": p.method.name(), "values": p.values.iter().map(|(_, v)| v).collect::<Vec<_>>(), "dir": dir, "layer": r.info.layer, "rank": r.info.rank, "scores": r.groups})).collect();
        return super::print_json(&serde_json::json!({"sweep": a.out, "axes": axes.iter().map(|x| &x.key).collect::<Vec<_>>(), "runs": runs}));
    }
    print!("{}", std::fs::read_to_string(a.out.join("summary.md"))?);
    println!("{} runs in {}; sweep.csv, summary.md, sweep.html and the plots are there", runs.len(), a.out.display());
    Ok(())
}
