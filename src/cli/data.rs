//! `hyperdas data ...`: the RAVEL knowledge base, dataset building, inspection and conversion.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::LoadArgs;
use crate::data::collate::{CollateOptions, encode_rows};
use crate::data::filter::{FilterOptions, FilterStats, filter_rows, group_counts};
use crate::data::generate::{DataSplit, EntityPolicy, GenerateOptions, Generated, GroupPlan, generate};
use crate::data::io::{ReadOptions, read_dataset, write_dataset};
use crate::data::ravel::{KnowledgeBase, Split, builtin_domains, column_name};

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing would only add noise
pub enum DataCommand {
    /// Build RAVEL counterfactual train/test sets: generate pairs, filter them with the target model, write JSONL (or Arrow) + a summary.
    Build(BuildArgs),
    /// Show the knowledge base: domains, attributes, entities and templates per split.
    Kb(KbArgs),
    /// Read and check a dataset (.jsonl or a datasets save_to_disk directory); print counts and rows; with --model, the tokenisation.
    Show(ShowArgs),
    /// Convert between JSONL and the datasets save_to_disk (Arrow) format.
    Convert(ConvertArgs),
}

#[derive(Args, Debug)]
pub struct KbArgs {
    /// Domain (default: all embedded domains).
    #[arg(long)]
    domain: Option<String>,
    /// Read the domain from a directory with entities.tsv, templates.json, template_splits.json.
    #[arg(long)]
    kb_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Target model for filtering: HF dir, .gguf, fetched name (smollm2-135m), `toy`, `toy:tiny` or hub id. Required unless --no-filter.
    #[arg(long, short)]
    model: Option<String>,
    #[command(flatten)]
    load: LoadArgs,
    /// RAVEL domain: city or nobel_prize_winner (alias nobel).
    #[arg(long, default_value = "city")]
    domain: String,
    /// Read the domain from a directory (entities.tsv, templates.json, template_splits.json) instead of the embedded data (default with `-m toy`: the toy world's).
    #[arg(long)]
    kb_dir: Option<PathBuf>,
    /// Attribute(s) the instruction names (repeat or comma-separate), e.g. Country. Default: Country.
    #[arg(long = "attribute", short = 'a', value_delimiter = ',', default_value = "Country")]
    attributes: Vec<String>,
    /// Split(s) to build: train (RAVEL train templates), test (val + test templates). Repeat or comma-separate.
    #[arg(long, value_delimiter = ',', default_value = "train,test")]
    split: Vec<String>,
    /// Causal rows per target attribute, before filtering.
    #[arg(long, default_value_t = 1000)]
    causal: usize,
    /// Isolate rows per (target attribute, other attribute), before filtering.
    #[arg(long, default_value_t = 200)]
    isolate: usize,
    /// Entities: `all` (the reference; only templates are held out) or `by-split` (train entities for train, val+test entities for test).
    #[arg(long, default_value = "all")]
    entities: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory; files are named {domain}_{attribute}_{split}.jsonl (or a directory with --format arrow).
    #[arg(long, short, default_value = "data/generated")]
    out: PathBuf,
    /// Output format: jsonl, or arrow (a datasets save_to_disk directory, as the reference ships).
    #[arg(long, default_value = "jsonl")]
    format: String,
    /// Keep every generated row (no model, no knowledge filter).
    #[arg(long)]
    no_filter: bool,
    /// Prompts per forward pass while filtering.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// A .jsonl file or a datasets save_to_disk directory.
    path: PathBuf,
    /// Rows to print.
    #[arg(long, default_value_t = 3)]
    head: usize,
    /// Skip (and count) malformed rows instead of failing on the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Also tokenise with this model's tokenizer and show token roles (E entity, L label, · not intervenable).
    #[arg(long, short)]
    model: Option<String>,
    #[command(flatten)]
    load: LoadArgs,
    /// Let the intervention see the base suffix (for the token view).
    #[arg(long)]
    base_suffix_visible: bool,
    /// Let the intervention read the source suffix (for the token view).
    #[arg(long)]
    source_suffix_visible: bool,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input: .jsonl file or save_to_disk directory.
    input: PathBuf,
    /// Output: a path ending in .jsonl writes JSONL, anything else a save_to_disk directory.
    output: PathBuf,
    /// Skip (and count) malformed rows instead of failing on the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Overwrite the output if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: &DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Build(a) => build(a),
        DataCommand::Kb(a) => kb(a),
        DataCommand::Show(a) => show(a),
        DataCommand::Convert(a) => convert(a),
    }
}

fn load_kb(domain: &str, kb_dir: Option<&Path>) -> Result<KnowledgeBase> {
    Ok(match kb_dir {
        Some(dir) => KnowledgeBase::from_dir(dir, domain)?,
        None => KnowledgeBase::builtin(domain)?,
    })
}

fn kb(a: &KbArgs) -> Result<()> {
    let domains: Vec<String> = match &a.domain {
        Some(d) => vec![d.clone()],
        None if a.kb_dir.is_some() => bail!("--kb-dir needs --domain (the name to give the domain)"),
        None => builtin_domains().into_iter().map(String::from).collect(),
    };
    for d in domains {
        let kb = load_kb(&d, a.kb_dir.as_deref())?;
        let n = |s: Split| kb.entities.iter().filter(|e| e.split == s).count();
        println!("{}: {} entities (train {} / val {} / test {}), {} templates", kb.domain, kb.entities.len(), n(Split::Train), n(Split::Val), n(Split::Test), kb.templates.len());
        println!("  {:<18} {:>7} {:>9}  templates train/val/test  example template", "attribute", "values", "entities");
        for (i, attr) in kb.attributes.iter().enumerate() {
            let t = |s: Split| kb.templates_of(i, &[s]).len();
            let known = kb.entities.iter().filter(|e| !e.values[i].is_empty()).count();
            let example = kb.templates_of(i, &[Split::Train]).first().map(|t| t.text.clone()).unwrap_or_default();
            println!("  {:<18} {:>7} {:>9}  {:>5}/{}/{:<12} {:?}", attr, kb.num_values(i), known, t(Split::Train), t(Split::Val), t(Split::Test), example);
        }
    }
    println!("\nsource: RAVEL (Huang et al., ACL 2024), MIT license; see data/ravel/PROVENANCE.md");
    Ok(())
}

/// The summary written next to each built dataset.
#[derive(Serialize)]
struct BuildSummary<'a> {
    tool: String,
    output: String,
    domain: &'a str,
    targets: Vec<String>,
    split: &'a str,
    template_splits: Vec<&'static str>,
    entities: EntityPolicy,
    seed: u64,
    causal_per_target: usize,
    isolate_per_pair: usize,
    model: Option<String>,
    start_token: Option<String>,
    generated: &'a [GroupPlan],
    filter: Option<&'a FilterStats>,
    /// Rows written, per `attribute_type/attribute`.
    kept: std::collections::BTreeMap<String, usize>,
    rows: usize,
    causal_rows: usize,
    isolate_rows: usize,
}

fn build(a: &BuildArgs) -> Result<()> {
    // `-m toy` without `--kb-dir`: the toy world's own knowledge base.
    let toy_kb = match (&a.model, &a.kb_dir) {
        (Some(m), None) if crate::train::run::toy_config(m).is_some() => Some(PathBuf::from(crate::train::run::model_spec(m, true)?).join("ravel")),
        _ => None,
    };
    let kb = load_kb(&a.domain, a.kb_dir.as_deref().or(toy_kb.as_deref()))?;
    let targets: Vec<usize> = a.attributes.iter().map(|x| kb.attribute(x)).collect::<crate::Result<_>>()?;
    let splits: Vec<DataSplit> = a.split.iter().map(|s| DataSplit::parse(s)).collect::<crate::Result<_>>()?;
    let entities = EntityPolicy::parse(&a.entities)?;
    let arrow = match a.format.as_str() {
        "jsonl" => false,
        "arrow" => true,
        f => bail!("unknown --format `{f}`: use jsonl or arrow"),
    };
    if a.model.is_none() && !a.no_filter {
        bail!("--model is required to filter rows by what the model knows (e.g. --model smollm2-135m); pass --no-filter to keep every generated row");
    }
    // Output paths first: refuse to overwrite before spending minutes on the model.
    let stem = format!("{}_{}", kb.domain, targets.iter().map(|&t| column_name(&kb.attributes[t])).collect::<Vec<_>>().join("+"));
    let outputs: Vec<(DataSplit, PathBuf)> = splits
        .iter()
        .map(|&s| (s, a.out.join(if arrow { format!("{stem}_{}", s.name()) } else { format!("{stem}_{}.jsonl", s.name()) })))
        .collect();
    for (_, p) in &outputs {
        if p.exists() && !a.force {
            bail!("{} exists; pass --force to overwrite it or choose another --out", p.display());
        }
    }
    let lm = match (&a.model, a.no_filter) {
        (Some(m), false) => Some(
            a.load.load(m)?,
        ),
        _ => None,
    };
    for (split, path) in outputs {
        let t0 = Instant::now();
        let opts = GenerateOptions { targets: targets.clone(), split, causal: a.causal, isolate: a.isolate, seed: a.seed, entities };
        let Generated { rows: candidates, groups: generated } = generate(&kb, &opts)?;
        eprintln!("{} {}: generated {} candidate rows", kb.domain, split.name(), candidates.len());
        let (rows, stats) = match &lm {
            Some(lm) => {
                let (rows, stats) = filter_rows(&lm.model, &lm.tokenizer, candidates, &FilterOptions { batch_size: a.batch_size, progress: !a.quiet })?;
                (rows, Some(stats))
            }
            None => (candidates, None),
        };
        if let Some(s) = &stats {
            eprintln!(
                "  filter: {} distinct prompts, {} tokens in {:.1} s ({:.0} tok/s)",
                s.unique_checks,
                s.tokens,
                s.seconds,
                s.tokens as f64 / s.seconds.max(1e-9)
            );
            eprintln!("  {:<28} {:>10} {:>6} {:>9}", "group", "candidates", "kept", "pass rate");
            for (g, c) in &s.groups {
                eprintln!("  {:<28} {:>10} {:>6} {:>8.1}%", g, c.candidates, c.kept, 100.0 * c.pass_rate);
            }
        }
        if rows.is_empty() {
            bail!("no row survived the filter for {} {}: the model knows none of these facts (try another model or attribute; --no-filter keeps all rows)", kb.domain, split.name());
        }
        write_dataset(&path, &rows, arrow)?;
        let kept = group_counts(&rows);
        let causal_rows = rows.iter().filter(|r| r.is_causal()).count();
        let summary = BuildSummary {
            tool: format!("hyperdas {} data build", env!("CARGO_PKG_VERSION")),
            output: path.display().to_string(),
            domain: &kb.domain,
            targets: targets.iter().map(|&t| kb.attributes[t].clone()).collect(),
            split: split.name(),
            template_splits: split.template_splits().iter().map(|s| s.name()).collect(),
            entities,
            seed: a.seed,
            causal_per_target: a.causal,
            isolate_per_pair: a.isolate,
            model: lm.as_ref().map(|l| l.description.clone()),
            start_token: lm.as_ref().map(|l| l.tokenizer.start_token_reason.clone()),
            generated: &generated,
            filter: stats.as_ref(),
            kept,
            rows: rows.len(),
            causal_rows,
            isolate_rows: rows.len() - causal_rows,
        };
        let summary_path = summary_path(&path);
        std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?).with_context(|| format!("cannot write {}", summary_path.display()))?;
        println!(
            "wrote {} rows ({} causal, {} isolate) to {} in {:.1} s; summary: {}",
            rows.len(),
            causal_rows,
            rows.len() - causal_rows,
            path.display(),
            t0.elapsed().as_secs_f64(),
            summary_path.display()
        );
    }
    Ok(())
}

/// `x.jsonl` → `x.summary.json`; a directory `x` → `x.summary.json` beside it.
pub fn summary_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    out.with_file_name(format!("{stem}.summary.json"))
}

fn show(a: &ShowArgs) -> Result<()> {
    let ds = read_dataset(&a.path, ReadOptions { skip_bad_rows: a.skip_bad_rows })?;
    println!("{}", ds.describe());
    if !ds.extra_columns.is_empty() {
        println!("extra columns (ignored): {}", ds.extra_columns.join(", "));
    }
    for (g, n) in &group_counts(&ds.rows) {
        println!("  {g:<28} {n:>7}");
    }
    let lm = match &a.model {
        Some(m) => Some(a.load.load(m)?),
        None => None,
    };
    for (i, r) in ds.rows.iter().take(a.head).enumerate() {
        println!("\n[{i}] {} ({}; instruction {:?})", r.attribute_type, r.attribute, r.edit_instruction);
        println!("  base   {:?} + {:?} -> {:?}", r.input_prefix, r.input_suffix, r.label());
        println!("  source {:?} + {:?}", r.counterfactual_input_prefix, r.counterfactual_input_suffix);
        if let Some(lm) = &lm {
            let opts = CollateOptions { base_suffix_visible: a.base_suffix_visible, source_suffix_visible: a.source_suffix_visible, ..Default::default() };
            let set = encode_rows(&lm.tokenizer, std::slice::from_ref(r), &opts, &a.path.display().to_string())?;
            let e = &set.rows[0];
            let view = |ids: &[u32], visible: usize, entity: usize, label_start: usize| -> Result<String> {
                let mut s = String::new();
                for (t, &id) in ids.iter().enumerate() {
                    let piece = lm.tokenizer.decode(&[id])?;
                    let role = if t >= label_start { "L" } else if t == entity { "E" } else if t >= visible { "·" } else { "" };
                    s += &format!("[{piece:?}{role}]");
                }
                Ok(s)
            };
            println!("  base tokens   {}", view(&e.base_ids, e.base_visible, e.base_entity_pos, e.label_start)?);
            println!("  source tokens {}", view(&e.source_ids, e.source_visible, e.source_entity_pos, usize::MAX)?);
        }
    }
    if !ds.skipped.is_empty() {
        println!("\nskipped rows:");
        for (n, why) in ds.skipped.iter().take(10) {
            println!("  row {n}: {why}");
        }
        if ds.skipped.len() > 10 {
            println!("  ... and {} more", ds.skipped.len() - 10);
        }
    }
    Ok(())
}

fn convert(a: &ConvertArgs) -> Result<()> {
    let ds = read_dataset(&a.input, ReadOptions { skip_bad_rows: a.skip_bad_rows })?;
    if a.output.exists() && !a.force {
        bail!("{} exists; pass --force to overwrite it", a.output.display());
    }
    let jsonl = a.output.extension().is_some_and(|e| e == "jsonl");
    write_dataset(&a.output, &ds.rows, !jsonl)?;
    println!("{}", ds.describe());
    println!("wrote {} rows to {} ({})", ds.rows.len(), a.output.display(), if jsonl { "JSONL" } else { "datasets save_to_disk directory" });
    Ok(())
}
