//! `hyperdas demo`: the embedded default. Builds (or loads) the toy world, builds its city
//! Country counterfactual data, trains HyperDAS with `configs/toy.toml` (embedded in the
//! binary), evaluates every inference mode, trains the MDAS baseline on the same data, layer
//! and rank, checks the chosen positions against the toy's
//! answer key (the city's token), writes `report.html`, and prints a score table, the run
//! directory and the time.
//!
//! `--model X` runs the same pipeline on a real model (a fetched name such as `smollm2-135m`,
//! fetched if needed; an HF directory; a .gguf; a hub id) with the embedded RAVEL city data.
//! SmolLM2-135M and Gemma-3-270M train with their recommended settings (`configs/smollm2-city.toml`,
//! `configs/gemma3-city.toml`, embedded; docs/results.md), for [`REAL_STEPS`] steps; any other
//! model with the real-model defaults (`hyperdas train --show-config`) for 2 epochs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::data::collate::encode_rows;
use crate::data::filter::{FilterOptions, filter_rows};
use crate::data::generate::{DataSplit, EntityPolicy, GenerateOptions, generate};
use crate::data::io::{ReadOptions, read_dataset, write_jsonl};
use crate::data::ravel::KnowledgeBase;
use crate::experiment::run::RunConfig;
use crate::experiment::trainer::Selection;
use crate::hypernet::interpreter::Method;
use crate::intervention::selection::InferenceMode;
use crate::report::svg::esc;

/// A step line: on stdout, or on stderr as a log line under `--json` (stdout is the result).
macro_rules! say {
    ($($t:tt)*) => {
        if super::json() { tracing::info!($($t)*) } else { println!($($t)*) }
    };
}

/// The toy run's settings, as shipped in `configs/toy.toml`.
const TOY_RUN: &str = include_str!("../../configs/toy.toml");

/// The recommended settings of the real models docs/results.md measured: (fetched name, the
/// configuration, its file).
const MODEL_RUNS: [(&str, &str, &str); 2] =
    [("smollm2-135m", include_str!("../../configs/smollm2-city.toml"), "configs/smollm2-city.toml"), ("gemma3-270m", include_str!("../../configs/gemma3-city.toml"), "configs/gemma3-city.toml")];

/// The demo's budget on a real model with recommended settings: optimizer steps of 16 rows
/// (the data cycles). The recommended settings were measured at larger budgets on far more
/// data (docs/results.md); this keeps the demo to about 13 min on 2 cores (one run: 12 min 29 s
/// on a 2-vCPU Xeon, docs/results.md).
const REAL_STEPS: usize = 120;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Target model: `toy` (the default), or a real model: a fetched name (smollm2-135m; fetched
    /// if needed), an HF directory, a .gguf file or a hub id. About 13 min for SmolLM2-135M on 2 cores.
    #[arg(long, short, default_value = "toy")]
    model: String,
    /// Run directory [default: runs/demo-<date>-N, the first N free].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a run setting of configs/toy.toml (`train.epochs=3`; keys as `hyperdas train --config configs/toy.toml --show-config` prints them); repeatable.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Device for the target and everything the run allocates: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`); the same as `--set model.device=...`.
    #[arg(long)]
    device: Option<String>,
    /// The same pipeline on the tiny test toy with little data and one epoch (a smoke test of
    /// a few seconds; its scores mean nothing).
    #[arg(long)]
    tiny: bool,
}

/// (split, file label, causal per target, isolate per other attribute) before filtering; the
/// test set uses the val + test templates.
const SIZES: [(DataSplit, &str, usize, usize); 2] = [(DataSplit::Train, "train", 2000, 400), (DataSplit::Heldout, "test", 300, 60)];

pub fn demo(a: &DemoArgs) -> Result<()> {
    let device = super::parse_device(a.device.as_deref().unwrap_or("cpu"))?;
    let t0 = Instant::now();
    let progress = super::progress();
    let tiny = a.tiny || a.model == "toy:tiny";
    let out = match &a.out {
        Some(p) => p.clone(),
        None => crate::experiment::run::fresh_run_dir("demo"),
    };
    if out.exists() && std::fs::read_dir(&out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty: choose another --out or remove it", out.display());
    }
    let target_name = if tiny || crate::experiment::run::toy_config(&a.model).is_some() { "the toy world".to_string() } else { a.model.clone() };
    say!("hyperdas {} demo: HyperDAS (Sun et al., ICLR 2025) on {target_name}, RAVEL city", env!("CARGO_PKG_VERSION"));
    say!("run directory: {}", out.display());

    // 1. The target: the toy world (cached after the first time) or a real model.
    let toy_target = tiny || crate::experiment::run::toy_config(&a.model).is_some();
    let toy_cfg = if tiny { crate::toy::ToyConfig::tiny() } else { crate::toy::ToyConfig::standard() };
    let t = Instant::now();
    let (lm, kb, toy) = if toy_target {
        let toy = crate::toy::ensure(&toy_cfg, false, progress)?;
        say!(
            "[1/5] toy model {} in {:.1} s: {} cities, {} blocks{}",
            if toy.cached { "loaded from the cache" } else { "trained" },
            t.elapsed().as_secs_f64(),
            toy.report.cities,
            toy_cfg.layers,
            if toy.report.planted.is_empty() { String::new() } else { format!("; {}", crate::toy::planted_summary(&toy.report.planted)) }
        );
        let lm = crate::model::load(&toy.dir.display().to_string(), &crate::model::LoadOptions { device: device.clone(), ..Default::default() })?;
        (lm, KnowledgeBase::from_dir(&toy.dir.join("ravel"), "city")?, Some(toy))
    } else {
        if let Some(known) = crate::fetch::known_model(&a.model)
            && !crate::fetch::cached_path(known)?.is_file()
        {
            tracing::info!("fetching {} ...", known.name);
            crate::fetch::fetch(known, None, progress)?;
        }
        let lm = crate::model::load(&a.model, &crate::model::LoadOptions { progress, device: device.clone(), ..Default::default() }).with_context(|| format!("cannot load model `{}`", a.model))?;
        say!("[1/5] model loaded in {:.1} s: {}", t.elapsed().as_secs_f64(), lm.description);
        (lm, KnowledgeBase::builtin("city")?, None)
    };

    // 2. Counterfactual data, filtered by what the model knows.
    let t = Instant::now();
    // The toy plants Country and Continent: train on both (as the paper's per-domain models
    // train on several attributes). A real model: Country only, to keep the run short.
    let target_names: Vec<&str> = if toy.is_some() && !tiny { vec!["Country", "Continent"] } else { vec!["Country"] };
    let targets: Vec<usize> = target_names.iter().map(|n| kb.attribute(n)).collect::<crate::Result<_>>()?;
    // One naming rule with `data build`: `city_country+continent_train.jsonl`.
    let stem = crate::data::build::stem(&kb, &targets);
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut paths = Vec::new();
    for (split, label, causal, isolate) in SIZES {
        let (causal, isolate) = match (toy.is_some(), tiny) {
            (_, true) => (causal / 20, isolate / 20),
            (true, false) => (causal / targets.len(), isolate / targets.len()),
            // A real model knows far fewer facts: the `data build` defaults (docs/data.md).
            (false, false) => (1000, 200),
        };
        let g = generate(&kb, &GenerateOptions { targets: targets.clone(), split, causal, isolate, seed: 42, entities: EntityPolicy::All })?;
        let (rows, _) = filter_rows(&lm.model, &lm.tokenizer, g.rows, &FilterOptions { batch_size: 32, progress })?;
        if rows.is_empty() {
            bail!("{}: the model answers none of the {label} prompts correctly, so there is nothing to intervene on", a.model);
        }
        let path = data_dir.join(format!("{stem}_{label}.jsonl"));
        write_jsonl(&path, &rows)?;
        let n_causal = rows.iter().filter(|r| r.is_causal()).count();
        say!("      {label} rows: {} causal, {} isolate -> {}", n_causal, rows.len() - n_causal, path.display());
        paths.push(path);
    }
    say!("[2/5] data built in {:.1} s", t.elapsed().as_secs_f64());

    // 3. HyperDAS training and evaluation: configs/toy.toml on the toy; the real-model
    // defaults (2 epochs) otherwise. Data paths are set here.
    let t = Instant::now();
    let mut sets = vec![format!("data.train={:?}", paths[0].display().to_string()), format!("data.test={:?}", paths[1].display().to_string())];
    if tiny {
        sets.extend(["model.path=\"toy:tiny\"", "interpreter.layer=0", "interpreter.num_blocks=1", "train.epochs=1"].map(String::from));
    }
    let recommended = MODEL_RUNS.iter().find(|(name, _, _)| toy.is_none() && *name == a.model);
    if toy.is_none() {
        sets.push(format!("model.path={:?}", a.model));
        match recommended {
            // The configuration's data are the large built sets: the demo's own replace them above.
            Some(_) => sets.extend([format!("train.steps={REAL_STEPS}"), "data.max_train_rows=0".into(), "data.max_test_rows=0".into()]),
            None => sets.push("train.epochs=2".into()),
        }
    }
    sets.extend(super::with_device(&a.sets, a.device.as_deref())?);
    let cfg: RunConfig = match (&toy, recommended) {
        (Some(_), _) => crate::config::load_text(TOY_RUN, "configs/toy.toml (embedded)", &sets)?,
        (None, Some((_, text, file))) => crate::config::load_text(text, &format!("{file} (embedded)"), &sets)?,
        (None, None) => crate::config::load(None, &sets)?,
    };
    let settings_note = match recommended {
        Some((_, _, file)) => format!("with the recommended settings of <code>{file}</code> for {REAL_STEPS} steps"),
        None => "with the real-model defaults and 2 epochs".to_string(),
    };
    let run_dir = out.join("hyperdas");
    crate::experiment::run::run(&cfg, &run_dir, false, progress)?.context("the run stopped before its end")?;
    say!("[3/5] HyperDAS trained and evaluated in {:.1} s", t.elapsed().as_secs_f64());

    // 4. The MDAS baseline on the same data, layer and rank (RAVEL's multi-task DAS).
    let t = Instant::now();
    let mdas_dir = out.join("mdas");
    crate::experiment::run::run(&cfg.as_baseline(Method::Mdas), &mdas_dir, false, progress)?.context("the MDAS run stopped before its end")?;
    let runs = [crate::report::compare::read_run(&run_dir)?, crate::report::compare::read_run(&mdas_dir)?];
    let comparison = crate::report::compare::compare(&runs, &["soft".into(), "bidding_argmax".into()])?;
    say!("[4/5] MDAS baseline trained and evaluated in {:.1} s", t.elapsed().as_secs_f64());

    // 5. Where the chosen positions land, against the answer key (the city's last token), and the report.
    let t = Instant::now();
    let modes = [InferenceMode::Soft, InferenceMode::parse("bidding_argmax")?];
    crate::experiment::run::eval_run(&run_dir, &paths[1], &modes, false, false)?;
    let landing = entity_landing(&run_dir, &paths[1], &lm.tokenizer, &cfg)?;
    let layer = cfg.interpreter.config(lm.model.num_layers())?.hypernet.layer;
    let target = match &toy {
        Some(toy) => format!(
            "The toy world (docs/toy.md): a {}-block Llama trained from scratch on {} RAVEL cities{}. HyperDAS intervenes on the residual entering block {layer}, trained with <code>configs/toy.toml</code>.",
            toy_cfg.layers,
            toy.report.cities,
            if toy.report.planted.is_empty() { String::new() } else { format!(", with {}, each in a known subspace (the answer key)", crate::toy::planted_summary(&toy.report.planted)) },
        ),
        None => format!("Target: {} ({}). HyperDAS intervenes on the residual entering block {layer} of {}, {settings_note}.", esc(&a.model), esc(&lm.description), lm.model.num_layers()),
    };
    let mut notes = vec![format!(
        "{target} Data: {} training and {} test rows of city {} counterfactuals (causal and isolate) that the model answers correctly.",
        landing.train_rows,
        landing.rows,
        target_names.join(" and ")
    )];
    for l in &landing.by_mode {
        notes.push(l.sentence(toy.is_some()));
    }
    let what = target_name;
    let extras =
        crate::report::ReportExtras { title: format!("hyperdas demo: HyperDAS on {what}, city {}", target_names.join(" and ")), notes, comparison: crate::report::compare::html(&comparison)? };
    let report = crate::report::write_report(&run_dir, &paths[1], &extras)?;
    say!("[5/5] positions checked and report written in {:.1} s", t.elapsed().as_secs_f64());

    let by_attr: std::collections::BTreeMap<String, Vec<crate::experiment::trainer::GroupScores>> = {
        let p = run_dir.join("results.by_attribute.json");
        serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?).with_context(|| format!("{}", p.display()))?
    };
    if super::json() {
        let landing_json: Vec<serde_json::Value> = landing.by_mode.iter().map(|l| serde_json::json!({"sentence": l.sentence(toy.is_some())})).collect();
        return super::print_json(&serde_json::json!({
            "run": run_dir, "mdas": mdas_dir, "report": report, "layer": layer, "rank": cfg.interpreter.rank,
            "test_rows": landing.rows, "by_attribute": by_attr, "comparison": comparison, "positions": landing_json,
            "seconds": t0.elapsed().as_secs_f64(),
        }));
    }
    println!();
    println!("HyperDAS per inference mode ({what}, RAVEL city, {} test rows):", landing.rows);
    let mut t = super::table(&["mode", "attribute", "Cause", "Isolate", "Disentangle"], 2);
    // Per intervened attribute, and their mean when there are several.
    for (mode, groups) in &by_attr {
        for g in groups.iter().filter(|g| g.attribute != "mean" || target_names.len() > 1) {
            t.add_row(vec![mode.clone(), g.attribute.clone(), format!("{:.3}", g.causal), format!("{:.3}", g.isolate), format!("{:.3}", g.disentangle)]);
        }
    }
    println!("{t}");
    println!();
    println!("HyperDAS beside the MDAS baseline (layer {layer}, rank {}):", cfg.interpreter.rank);
    let mut t = super::table(&["method", "attribute", "Cause", "Isolate", "Disentangle"], 2);
    for r in comparison.iter().filter(|r| r.scores.attribute != "mean" || target_names.len() > 1) {
        t.add_row(vec![r.label.clone(), r.scores.attribute.clone(), format!("{:.3}", r.scores.causal), format!("{:.3}", r.scores.isolate), format!("{:.3}", r.scores.disentangle)]);
    }
    println!("{t}");
    println!();
    for l in &landing.by_mode {
        println!("{}", l.sentence(toy.is_some()));
    }
    println!();
    println!("run directory: {} (results.json, metrics.jsonl, eval/*.positions.jsonl, heatmaps.json, checkpoint/); MDAS: {}", run_dir.display(), mdas_dir.display());
    println!("report: {}", report.display());
    println!("total time: {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Where one mode's selections land on causal rows.
struct ModeLanding {
    mode: String,
    /// Share of rows whose base city column takes the source city token.
    city_takes_city: f64,
    /// Mean number of other base positions that take some source token.
    others: f64,
}

impl ModeLanding {
    /// The finding in words; on the toy world the city's token is the answer key.
    fn sentence(&self, toy: bool) -> String {
        format!(
            "{}: on {:.1}% of causal test rows the base city's last token takes the source city's last token{}; {:.1} other base tokens per row also take a source token",
            self.mode,
            100.0 * self.city_takes_city,
            if toy { " (the toy world's answer key)" } else { "" },
            self.others
        )
    }
}

struct Landing {
    rows: usize,
    train_rows: usize,
    by_mode: Vec<ModeLanding>,
}

fn entity_landing(run_dir: &Path, test: &Path, tok: &crate::model::TextTokenizer, cfg: &RunConfig) -> Result<Landing> {
    let ds = read_dataset(test, ReadOptions::default())?;
    let enc = encode_rows(tok, &ds.rows, &cfg.data.collate_options(false), &test.display().to_string())?;
    let train_rows = read_dataset(Path::new(&cfg.data.train), ReadOptions::default())?.rows.len();
    let by_row: std::collections::HashMap<usize, &crate::data::collate::EncodedRow> = enc.rows.iter().map(|r| (r.row, r)).collect();
    let name = test.file_name().map(|n| n.to_string_lossy().trim_end_matches(".jsonl").to_string()).unwrap_or_default();
    let path = run_dir.join("eval").join(format!("{name}.positions.jsonl"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    // The share of causal rows whose base city token takes the source city token is the
    // evaluation's own `entity_position` score (one definition, in `Scores`); what the positions
    // file adds is how many other base tokens take a source token.
    let results_path = run_dir.join("eval").join(format!("{name}.results.json"));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results_path).with_context(|| format!("cannot read {}", results_path.display()))?)
        .with_context(|| format!("{} is not valid JSON", results_path.display()))?;
    // mode → (other selected positions, causal rows)
    let mut tally: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (i, line) in text.lines().enumerate() {
        let s: Selection = serde_json::from_str(line).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        if !s.causal {
            continue;
        }
        let Some(row) = by_row.get(&s.row) else { continue };
        let e = tally.entry(s.mode.clone()).or_default();
        e.0 += s.selected.iter().filter(|&&(b, _, _)| b != row.base_entity_pos).count();
        e.1 += 1;
    }
    let by_mode = tally
        .into_iter()
        .map(|(mode, (o, n))| {
            let city_takes_city = results[&mode]["accs"]["entity_position"].as_f64().unwrap_or(0.0);
            ModeLanding { mode, city_takes_city, others: o as f64 / n.max(1) as f64 }
        })
        .collect();
    Ok(Landing { rows: enc.rows.len(), train_rows, by_mode })
}
