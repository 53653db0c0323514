//! `hyperdas data ...`: the RAVEL knowledge base, dataset building, inspection and conversion.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use super::LoadArgs;
use crate::data::build::{BuildRequest, attribute_indices, output_paths, prepare, splits_or_default, stem, summary_path, template_splits_of};
use crate::data::collate::{CollateOptions, encode_rows};
use crate::data::filter::group_counts;
use crate::data::generate::{DataSplit, EntityPolicy};
use crate::data::io::{ReadOptions, read_dataset, write_dataset};
use crate::data::knowledge::{AttributeReport, Evaluator, KnowledgeOptions, KnowledgeTable, TableKey, cache_root, ensure, load_or_new};
use crate::data::ravel::{KnowledgeBase, Split, builtin_domains};

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing would only add noise
pub enum DataCommand {
    /// Build RAVEL counterfactual train/val/test sets from what the target model knows (its knowledge table), write JSONL (or Arrow) + a summary.
    Build(BuildArgs),
    /// The knowledge table of a model: which entity × template facts it knows, per attribute and split (cached; --build fills it).
    Knowledge(KnowledgeCmdArgs),
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
    /// Target model whose knowledge decides the rows: HF dir, .gguf, fetched name (smollm2-135m), `toy`, `toy:tiny` or hub id. Required unless --no-filter.
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
    /// Attribute(s) the instruction names (repeat or comma-separate), e.g. Country,Continent.
    #[arg(long = "attribute", short = 'a', value_delimiter = ',', default_value = "Country")]
    attributes: Vec<String>,
    /// Split(s) to build, each from its own RAVEL templates: train, val, test, or heldout (val + test). Repeat or comma-separate. Default: train, val and test (those the knowledge base has templates for).
    #[arg(long, value_delimiter = ',')]
    split: Vec<String>,
    /// Causal rows per target attribute and split.
    #[arg(long, default_value_t = 1000)]
    causal: usize,
    /// Isolate rows per target attribute and split, spread over the other attributes in proportion to their known cells.
    #[arg(long, default_value_t = 1000)]
    isolate: usize,
    /// Attributes isolate rows ask for (repeat or comma-separate; default: every attribute but the target).
    #[arg(long, value_delimiter = ',')]
    isolate_from: Vec<String>,
    /// Entities: `all` (the reference; only templates are held out) or `by-split` (each split uses its own RAVEL entities).
    #[arg(long, default_value = "all")]
    entities: String,
    /// Seed of the sampled rows (the knowledge table does not depend on it).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory; files are named {domain}_{attribute}_{split}.jsonl (or a directory with --format arrow).
    #[arg(long, short, default_value = "data/generated")]
    out: PathBuf,
    /// Output format: jsonl, or arrow (a datasets save_to_disk directory, as the reference ships).
    #[arg(long, default_value = "jsonl")]
    format: String,
    /// Treat every fact as known (no model, no knowledge table).
    #[arg(long)]
    no_filter: bool,
    #[command(flatten)]
    knowledge: KnowledgeArgs,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
}

/// How the knowledge table chooses the cells it evaluates (docs/data.md).
#[derive(Args, Debug, Clone)]
pub struct KnowledgeArgs {
    /// Screening templates per attribute (0: no screen; entities are evaluated in full in a fixed order).
    #[arg(long, default_value_t = 1)]
    screen: usize,
    /// Entities evaluated under every train template to choose the screening template and estimate its recall.
    #[arg(long, default_value_t = 32)]
    pilot: usize,
    /// Entities evaluated under every template per attribute (0: every entity that passes the screen).
    #[arg(long, default_value_t = 300)]
    max_entities: usize,
    /// Skip an attribute that only supplies isolate rows when the pilot knows less than this share of its cells.
    #[arg(long, default_value_t = 0.02)]
    min_pilot_rate: f64,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Directory of knowledge tables (default: <cache>/knowledge, see `hyperdas fetch --help` for <cache>).
    #[arg(long)]
    table_dir: Option<PathBuf>,
}

impl KnowledgeArgs {
    fn options(&self, splits: Vec<Split>, progress: bool) -> KnowledgeOptions {
        KnowledgeOptions { splits, screen: self.screen, pilot: self.pilot, max_entities: self.max_entities, min_pilot_rate: self.min_pilot_rate, batch_size: self.batch_size, progress }
    }
    fn root(&self) -> Result<PathBuf> {
        Ok(match &self.table_dir {
            Some(d) => d.clone(),
            None => cache_root()?,
        })
    }
}

#[derive(Args, Debug)]
pub struct KnowledgeCmdArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// RAVEL domain: city or nobel_prize_winner (alias nobel).
    #[arg(long, default_value = "city")]
    domain: String,
    /// Read the domain from a directory instead of the embedded data (default with `-m toy`: the toy world's).
    #[arg(long)]
    kb_dir: Option<PathBuf>,
    /// Attribute(s) to show (default: every attribute of the domain).
    #[arg(long = "attribute", short = 'a', value_delimiter = ',')]
    attributes: Vec<String>,
    /// Evaluate missing cells first (for the given splits), as `data build` would for these attributes as targets; without it, only the cached tables are read.
    #[arg(long)]
    build: bool,
    /// Template splits to complete with --build.
    #[arg(long, value_delimiter = ',', default_value = "train,val,test")]
    split: Vec<String>,
    #[command(flatten)]
    knowledge: KnowledgeArgs,
    /// Also list every template with its known / evaluated cells.
    #[arg(long)]
    per_template: bool,
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
        DataCommand::Knowledge(a) => knowledge(a),
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
    let mut out = Vec::new();
    for d in domains {
        let kb = load_kb(&d, a.kb_dir.as_deref())?;
        let n = |s: Split| kb.entities.iter().filter(|e| e.split == s).count();
        if super::json() {
            let attrs: Vec<serde_json::Value> = kb
                .attributes
                .iter()
                .enumerate()
                .map(|(i, attr)| {
                    let t = |s: Split| kb.templates_of(i, &[s]).len();
                    let known = kb.entities.iter().filter(|e| !e.values[i].is_empty()).count();
                    serde_json::json!({"attribute": attr, "values": kb.num_values(i), "entities_with_value": known, "templates": {"train": t(Split::Train), "val": t(Split::Val), "test": t(Split::Test)}})
                })
                .collect();
            out.push(
                serde_json::json!({"domain": kb.domain, "entities": {"train": n(Split::Train), "val": n(Split::Val), "test": n(Split::Test)}, "templates": kb.templates.len(), "attributes": attrs}),
            );
            continue;
        }
        println!("{}: {} entities (train {} / val {} / test {}), {} templates", kb.domain, kb.entities.len(), n(Split::Train), n(Split::Val), n(Split::Test), kb.templates.len());
        println!("  {:<18} {:>7} {:>9}  templates train/val/test  example template", "attribute", "values", "entities");
        for (i, attr) in kb.attributes.iter().enumerate() {
            let t = |s: Split| kb.templates_of(i, &[s]).len();
            let known = kb.entities.iter().filter(|e| !e.values[i].is_empty()).count();
            let example = kb.templates_of(i, &[Split::Train]).first().map(|t| t.text.clone()).unwrap_or_default();
            println!("  {:<18} {:>7} {:>9}  {:>5}/{}/{:<12} {:?}", attr, kb.num_values(i), known, t(Split::Train), t(Split::Val), t(Split::Test), example);
        }
    }
    if super::json() {
        return super::print_json(&serde_json::json!({"domains": out, "source": "RAVEL (Huang et al., ACL 2024), MIT license"}));
    }
    println!("\nsource: RAVEL (Huang et al., ACL 2024), MIT license; see data/ravel/PROVENANCE.md");
    Ok(())
}

/// The knowledge base of `--domain`/`--kb-dir`, or with `-m toy` (and no `--kb-dir`) the toy world's.
fn kb_for(model: Option<&str>, domain: &str, kb_dir: Option<&Path>) -> Result<KnowledgeBase> {
    Ok(crate::experiment::run::knowledge_base(model, domain, kb_dir)?)
}

/// One line per attribute: what its table holds and what evaluating it cost.
fn print_report(r: &AttributeReport) {
    let cost = r.total();
    let run = if cost.cells == 0 {
        "cached, nothing to evaluate".to_string()
    } else {
        format!("{} prompts, {} tokens in {:.1} s ({:.0} prompts/s)", cost.cells, cost.tokens, cost.seconds, cost.cells as f64 / cost.seconds.max(1e-9))
    };
    if let Some(why) = &r.skipped {
        tracing::warn!("{}: skipped for isolate rows: {why}; {run}", r.attribute);
        return;
    }
    let screen = match (r.screen_templates.first(), r.screen_recall) {
        (Some(t), recall) => format!(
            "pilot {} entities ({:.1}% of cells known), screen {t:?} (recall {}), {} screened, {} in; ",
            r.pilot_entities,
            100.0 * r.pilot_rate.unwrap_or(0.0),
            recall.map_or("n/a".into(), |x| format!("{x:.2}")),
            r.screened,
            r.screened_in
        ),
        (None, _) => String::new(),
    };
    tracing::info!("  {}: {} entities with a value; {screen}{} evaluated in full; {run}", r.attribute, r.entities_with_value, r.full_entities);
}

fn build(a: &BuildArgs) -> Result<()> {
    let kb = kb_for(a.model.as_deref(), &a.domain, a.kb_dir.as_deref())?;
    let targets = attribute_indices(&kb, &a.attributes)?;
    let asked: Vec<DataSplit> = a.split.iter().map(|s| DataSplit::parse(s)).collect::<crate::Result<_>>()?;
    let mut notes = Vec::new();
    let splits = splits_or_default(&kb, &targets, &asked, &mut notes);
    notes.iter().for_each(|n| tracing::info!("note: {n}"));
    let arrow = match a.format.as_str() {
        "jsonl" => false,
        "arrow" => true,
        f => bail!("unknown --format `{f}`: use jsonl or arrow"),
    };
    if a.model.is_none() && !a.no_filter {
        bail!("--model is required to sample rows from what the model knows (e.g. --model smollm2-135m); pass --no-filter to treat every fact as known");
    }
    // Output paths first: refuse to overwrite before spending minutes on the model.
    output_paths(&a.out, &stem(&kb, &targets), &splits, arrow, a.force)?;
    let lm = match (&a.model, a.no_filter) {
        (Some(m), false) => Some(a.load.load(m)?),
        _ => None,
    };
    let req = BuildRequest {
        attributes: a.attributes.clone(),
        splits: splits.clone(),
        causal: a.causal,
        isolate: a.isolate,
        isolate_from: a.isolate_from.clone(),
        entities: EntityPolicy::parse(&a.entities)?,
        seed: a.seed,
        knowledge: a.knowledge.options(template_splits_of(&splits), super::progress()),
        table_dir: a.knowledge.table_dir.clone(),
    };
    if let Some(lm) = &lm {
        tracing::info!("knowledge tables of {} (model sha256 {}), {} domain:", lm.description, &lm.source.fingerprint()?[..16], kb.domain);
    }
    let t0 = Instant::now();
    let prepared = prepare(&kb, lm.as_ref(), &req)?;
    prepared.reports.iter().for_each(print_report);
    let built = prepared.sample()?;
    let paths = built.write(&a.out, arrow, a.force)?;
    let mut written = Vec::new();
    for (s, path) in built.splits.iter().zip(&paths) {
        tracing::info!("{} {}: {:<40} {:>7} {:>11} {:>10}", kb.domain, s.split.name(), "group", "rows", "known cells", "cells used");
        for g in &s.groups {
            tracing::info!("  {:<47} {:>7} {:>11} {:>10}", format!("{}/{} (instruction: {})", g.attribute_type, g.attribute, g.target), g.rows, g.known_cells, g.cells_used);
        }
        tracing::info!(
            "  balance: {} entities (largest share {:.2}%), {} templates (largest share {:.2}%)",
            s.balance.entities,
            100.0 * s.balance.max_entity_share,
            s.balance.templates,
            100.0 * s.balance.max_template_share
        );
        let causal_rows = s.rows.iter().filter(|r| r.is_causal()).count();
        written.push(serde_json::json!({"split": s.split.name(), "path": path, "summary": summary_path(path), "rows": s.rows.len(), "causal": causal_rows, "isolate": s.rows.len() - causal_rows}));
        if super::json() {
            continue;
        }
        println!(
            "wrote {} rows ({} causal, {} isolate) to {} in {:.1} s; summary: {}",
            s.rows.len(),
            causal_rows,
            s.rows.len() - causal_rows,
            path.display(),
            s.sample_seconds,
            summary_path(path).display()
        );
    }
    if super::json() {
        return super::print_json(&serde_json::json!({"domain": built.domain, "targets": built.targets, "splits": written, "notes": built.notes, "seconds": t0.elapsed().as_secs_f64()}));
    }
    println!("data build: {:.1} s in all ({:.1} s for the knowledge tables)", t0.elapsed().as_secs_f64(), built.knowledge_seconds);
    Ok(())
}

fn knowledge(a: &KnowledgeCmdArgs) -> Result<()> {
    let kb = kb_for(Some(&a.model.model), &a.domain, a.kb_dir.as_deref())?;
    let attributes: Vec<usize> = if a.attributes.is_empty() { (0..kb.attributes.len()).collect() } else { a.attributes.iter().map(|x| kb.attribute(x)).collect::<crate::Result<_>>()? };
    let splits: Vec<DataSplit> = a.split.iter().map(|s| DataSplit::parse(s)).collect::<crate::Result<_>>()?;
    let lm = a.model.load.load(&a.model.model)?;
    let sha = lm.source.fingerprint()?;
    let root = a.knowledge.root()?;
    let mut tables = Vec::new();
    if a.build {
        let kopts = a.knowledge.options(template_splits_of(&splits), super::progress());
        let ev = Evaluator { model: &lm.model, tokenizer: &lm.tokenizer, batch_size: kopts.batch_size, progress: kopts.progress };
        for &x in &attributes {
            let (t, r) = ensure(&ev, &kb, x, TableKey::new(&sha, lm.model.dtype(), &lm.tokenizer, &kb, x), &root, &kopts, false)?;
            print_report(&r);
            tables.push((x, Some(t)));
        }
    } else {
        for &x in &attributes {
            let key = TableKey::new(&sha, lm.model.dtype(), &lm.tokenizer, &kb, x);
            let path = key.path(&root);
            let (t, why) = load_or_new(&path, KnowledgeTable::new(&kb, x, key));
            if let Some(why) = why {
                tracing::info!("{why}");
            }
            tables.push((x, path.exists().then_some(t)));
        }
    }
    let all = [Split::Train, Split::Val, Split::Test];
    if super::json() {
        let out: Vec<serde_json::Value> = tables
            .iter()
            .map(|(x, t)| match t {
                Some(t) => serde_json::json!({"attribute": kb.attributes[*x], "path": t.key.path(&root), "splits": all.iter().map(|&s| t.summary(s)).collect::<Vec<_>>()}),
                None => serde_json::json!({"attribute": kb.attributes[*x], "path": null}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"model": lm.description, "model_sha256": sha, "domain": kb.domain, "tables": out}))?);
        return Ok(());
    }
    println!("knowledge of {} (sha256 {}), {} domain, start token {}", lm.description, &sha[..16], kb.domain, lm.tokenizer.start_token_reason);
    println!("{:<12} {:<6} {:>9} {:>14} {:>14} {:>16}", "attribute", "split", "templates", "cells checked", "cells known", "entities known");
    for (x, t) in &tables {
        let Some(t) = t else {
            println!("{:<12} not built yet (hyperdas data knowledge --build -a {0}, or data build)", kb.attributes[*x]);
            continue;
        };
        for s in all {
            let m = t.summary(s);
            println!("{:<12} {:<6} {:>9} {:>14} {:>14} {:>16}", kb.attributes[*x], m.split, m.templates, m.cells_checked, m.cells_known, m.entities_known);
            if a.per_template {
                for (text, known, checked) in &m.per_template {
                    println!("    {known:>6} / {checked:<6} {text:?}");
                }
            }
        }
    }
    Ok(())
}

fn show(a: &ShowArgs) -> Result<()> {
    let ds = read_dataset(&a.path, ReadOptions { skip_bad_rows: a.skip_bad_rows })?;
    if super::json() {
        let skipped: Vec<serde_json::Value> = ds.skipped.iter().map(|(n, why)| serde_json::json!({"row": n, "error": why})).collect();
        return super::print_json(&serde_json::json!({
            "path": a.path, "rows": ds.rows.len(), "groups": group_counts(&ds.rows), "extra_columns": ds.extra_columns,
            "head": ds.rows.iter().take(a.head).collect::<Vec<_>>(), "skipped": skipped,
        }));
    }
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
                    let role = if t >= label_start {
                        "L"
                    } else if t == entity {
                        "E"
                    } else if t >= visible {
                        "·"
                    } else {
                        ""
                    };
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
    if super::json() {
        return super::print_json(&serde_json::json!({"input": a.input, "output": a.output, "rows": ds.rows.len(), "format": if jsonl { "jsonl" } else { "arrow" }}));
    }
    println!("{}", ds.describe());
    println!("wrote {} rows to {} ({})", ds.rows.len(), a.output.display(), if jsonl { "JSONL" } else { "datasets save_to_disk directory" });
    Ok(())
}
