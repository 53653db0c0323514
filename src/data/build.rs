//! Building RAVEL counterfactual sets from what a target model knows: the one implementation
//! behind `hyperdas data build` and the Python `hyperdas.data.build`.
//!
//! `build` completes the model's knowledge tables for the target attributes (causal rows) and
//! the others (isolate rows), then samples each requested split from known cells only
//! ([`crate::data::sample`]); [`Built::write`] writes each split (JSONL or a `datasets`
//! save_to_disk directory) with a `.summary.json` beside it. Nothing here prints but the
//! knowledge tables' progress bars (when asked for); the caller reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::data::filter::group_counts;
use crate::data::generate::{DataSplit, EntityPolicy};
use crate::data::io::write_dataset;
use crate::data::knowledge::{AttributeReport, Evaluator, Knowledge, KnowledgeOptions, cache_root};
use crate::data::ravel::{KnowledgeBase, Split, column_name};
use crate::data::row::RavelRow;
use crate::data::sample::{Balance, GroupStats, SampleOptions, sample};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// What to build. `Default` is `data build`'s defaults (Country, 1,000 + 1,000 rows per split).
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Attribute names the instruction names (the targets), e.g. `Country`.
    pub attributes: Vec<String>,
    /// Data splits; empty means train, val and test (those the knowledge base has templates for).
    pub splits: Vec<DataSplit>,
    /// Causal rows per target attribute and split.
    pub causal: usize,
    /// Isolate rows per target attribute and split.
    pub isolate: usize,
    /// Attributes isolate rows may ask for (empty: every attribute but the targets).
    pub isolate_from: Vec<String>,
    pub entities: EntityPolicy,
    pub seed: u64,
    /// How the knowledge tables choose their cells (`splits` is filled in by [`build`]).
    pub knowledge: KnowledgeOptions,
    /// Directory of knowledge tables (default: `<cache>/knowledge`).
    pub table_dir: Option<PathBuf>,
}

impl Default for BuildRequest {
    fn default() -> Self {
        BuildRequest {
            attributes: vec!["Country".into()],
            splits: Vec::new(),
            causal: 1000,
            isolate: 1000,
            isolate_from: Vec::new(),
            entities: EntityPolicy::All,
            seed: 42,
            knowledge: KnowledgeOptions::default(),
            table_dir: None,
        }
    }
}

/// One sampled split.
pub struct BuiltSplit {
    pub split: DataSplit,
    pub rows: Vec<RavelRow>,
    pub groups: Vec<GroupStats>,
    pub balance: Balance,
    /// Seconds to sample this split.
    pub sample_seconds: f64,
}

/// Everything `build` made.
pub struct Built {
    pub domain: String,
    /// The target attributes' names, as the knowledge base spells them.
    pub targets: Vec<String>,
    /// `{domain}_{target+target}`: the stem of every file name ([`file_name`]).
    pub stem: String,
    /// The knowledge tables' reports (empty without a model).
    pub reports: Vec<AttributeReport>,
    /// Seconds to complete the knowledge tables.
    pub knowledge_seconds: f64,
    pub splits: Vec<BuiltSplit>,
    /// Notes for the user (a split left out, ...).
    pub notes: Vec<String>,
    request: BuildRequest,
    model: Option<(String, String)>,
}

/// The summary written beside each built dataset (`x.summary.json`).
#[derive(Serialize)]
struct BuildSummary<'a> {
    tool: String,
    output: String,
    domain: &'a str,
    targets: &'a [String],
    split: &'a str,
    template_splits: Vec<&'static str>,
    entities: EntityPolicy,
    seed: u64,
    causal_per_target: usize,
    isolate_per_target: usize,
    model: Option<&'a str>,
    start_token: Option<&'a str>,
    /// How the knowledge tables chose their cells (absent with no model).
    knowledge: Option<&'a KnowledgeOptions>,
    knowledge_tables: &'a [AttributeReport],
    knowledge_seconds: f64,
    sample_seconds: f64,
    groups: &'a [GroupStats],
    balance: &'a Balance,
    /// Rows written, per `attribute_type/attribute`.
    kept: BTreeMap<String, usize>,
    rows: usize,
    causal_rows: usize,
    isolate_rows: usize,
}

/// The stem of a build's file names: `{domain}_{target+target}` (`city_country+continent`).
pub fn stem(kb: &KnowledgeBase, targets: &[usize]) -> String {
    format!("{}_{}", kb.domain, targets.iter().map(|&t| column_name(&kb.attributes[t])).collect::<Vec<_>>().join("+"))
}

/// The data splits to build: `asked`, or train, val and test, leaving out (with a note) a split
/// for which some target attribute has no templates (the toy world has no val templates).
pub fn splits_or_default(kb: &KnowledgeBase, targets: &[usize], asked: &[DataSplit], notes: &mut Vec<String>) -> Vec<DataSplit> {
    if !asked.is_empty() {
        return asked.to_vec();
    }
    let mut out = Vec::new();
    for split in [DataSplit::Train, DataSplit::Val, DataSplit::Test] {
        if targets.iter().all(|&t| !kb.templates_of(t, split.template_splits()).is_empty()) {
            out.push(split);
        } else {
            notes.push(format!("the {} knowledge base has no {} templates for every target; not building that split", kb.domain, split.name()));
        }
    }
    out
}

/// The RAVEL template splits that data splits read.
pub fn template_splits_of(splits: &[DataSplit]) -> Vec<Split> {
    let mut out: Vec<Split> = splits.iter().flat_map(|s| s.template_splits().iter().copied()).collect();
    out.sort();
    out.dedup();
    out
}

/// Attribute names to indices, each error naming the attribute and the valid ones.
pub fn attribute_indices(kb: &KnowledgeBase, names: &[String]) -> Result<Vec<usize>> {
    names.iter().map(|x| kb.attribute(x)).collect()
}

/// The knowledge tables done, the sampling still to come ([`prepare`], then [`Prepared::sample`]):
/// a caller can report the tables before sampling fails for lack of known facts.
pub struct Prepared<'a> {
    kb: &'a KnowledgeBase,
    request: BuildRequest,
    targets: Vec<usize>,
    isolate_from: Option<Vec<usize>>,
    knowledge: Option<Knowledge>,
    model: Option<(String, String)>,
    /// The knowledge tables' reports (empty without a model).
    pub reports: Vec<AttributeReport>,
    pub knowledge_seconds: f64,
    /// Notes for the user (a split left out, ...).
    pub notes: Vec<String>,
}

/// Complete the knowledge tables `req` needs from `kb` for `lm` (none with `lm = None`: every
/// fact counts as known).
pub fn prepare<'a>(kb: &'a KnowledgeBase, lm: Option<&LoadedModel>, req: &BuildRequest) -> Result<Prepared<'a>> {
    if req.attributes.is_empty() {
        return Err(Error::invalid("no target attribute: name at least one (e.g. Country)"));
    }
    let targets = attribute_indices(kb, &req.attributes)?;
    let mut notes = Vec::new();
    let splits = splits_or_default(kb, &targets, &req.splits, &mut notes);
    let isolate_from = if req.isolate_from.is_empty() { None } else { Some(attribute_indices(kb, &req.isolate_from)?) };
    let t0 = Instant::now();
    // The knowledge tables: the targets (causal rows), and the other attributes (isolate rows).
    let mut attributes: Vec<(usize, bool)> = targets.iter().map(|&t| (t, false)).collect();
    if req.isolate > 0 {
        let isolate_ok = |o: &usize| isolate_from.as_ref().is_none_or(|f| f.contains(o));
        attributes.extend((0..kb.attributes.len()).filter(|o| !targets.contains(o) && isolate_ok(o)).map(|o| (o, true)));
    }
    let mut request = req.clone();
    request.splits = splits;
    request.knowledge.splits = template_splits_of(&request.splits);
    let kopts = &request.knowledge;
    let (knowledge, reports) = match lm {
        Some(lm) => {
            let ev = Evaluator { model: &lm.model, tokenizer: &lm.tokenizer, batch_size: kopts.batch_size, progress: kopts.progress };
            let sha = lm.source.fingerprint()?;
            let root = match &req.table_dir {
                Some(d) => d.clone(),
                None => cache_root()?,
            };
            let (k, reports) = Knowledge::build(&ev, kb, &attributes, &sha, &root, kopts)?;
            (Some(k), reports)
        }
        None => (None, Vec::new()),
    };
    Ok(Prepared {
        kb,
        targets,
        isolate_from,
        knowledge,
        model: lm.map(|l| (l.description.clone(), l.tokenizer.start_token_reason.clone())),
        reports,
        knowledge_seconds: t0.elapsed().as_secs_f64(),
        notes,
        request,
    })
}

impl Prepared<'_> {
    /// Sample every split from the known cells.
    pub fn sample(self) -> Result<Built> {
        let kb = self.kb;
        let req = &self.request;
        let known = |t: usize, e: usize| self.knowledge.as_ref().is_none_or(|k| k.known(t, e));
        let mut built = Vec::new();
        for &split in &req.splits {
            let t1 = Instant::now();
            let opts =
                SampleOptions { targets: self.targets.clone(), split, causal: req.causal, isolate: req.isolate, isolate_from: self.isolate_from.clone(), seed: req.seed, entities: req.entities };
            let s = sample(kb, &known, &opts).map_err(|e| Error::invalid(format!("{} {} split: {e}", kb.domain, split.name())))?;
            built.push(BuiltSplit { split, rows: s.rows, groups: s.groups, balance: s.balance, sample_seconds: t1.elapsed().as_secs_f64() });
        }
        Ok(Built {
            domain: kb.domain.clone(),
            targets: self.targets.iter().map(|&t| kb.attributes[t].clone()).collect(),
            stem: stem(kb, &self.targets),
            reports: self.reports,
            knowledge_seconds: self.knowledge_seconds,
            splits: built,
            notes: self.notes,
            request: self.request,
            model: self.model,
        })
    }
}

/// Build `req` from `kb`, keeping only facts `lm` knows ([`prepare`] then [`Prepared::sample`]).
pub fn build(kb: &KnowledgeBase, lm: Option<&LoadedModel>, req: &BuildRequest) -> Result<Built> {
    prepare(kb, lm, req)?.sample()
}

/// `{stem}_{split}.jsonl`, or `{stem}_{split}` (a directory) for Arrow.
pub fn file_name(stem: &str, split: DataSplit, arrow: bool) -> String {
    if arrow { format!("{stem}_{}", split.name()) } else { format!("{stem}_{}.jsonl", split.name()) }
}

/// `x.jsonl` → `x.summary.json`; a directory `x` → `x.summary.json` beside it.
pub fn summary_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    out.with_file_name(format!("{stem}.summary.json"))
}

/// The paths a build of `stem` writes into `dir`, failing before any work when one exists and
/// `force` is off (so that nothing is overwritten and no time is spent on the model).
pub fn output_paths(dir: &Path, stem: &str, splits: &[DataSplit], arrow: bool, force: bool) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = splits.iter().map(|&s| dir.join(file_name(stem, s, arrow))).collect();
    if !force && let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(Error::file(p, "exists; pass --force (force=True in Python) to overwrite it or choose another output directory"));
    }
    Ok(paths)
}

impl Built {
    /// Write every split into `dir` (created if needed), each with its `.summary.json`; returns
    /// the datasets' paths in split order.
    pub fn write(&self, dir: &Path, arrow: bool, force: bool) -> Result<Vec<PathBuf>> {
        let splits: Vec<DataSplit> = self.splits.iter().map(|s| s.split).collect();
        let paths = output_paths(dir, &self.stem, &splits, arrow, force)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
        for (s, path) in self.splits.iter().zip(&paths) {
            write_dataset(path, &s.rows, arrow)?;
            let text = serde_json::to_string_pretty(&self.summary(s, path)).map_err(|e| Error::invalid(e.to_string()))?;
            let sp = summary_path(path);
            crate::atomic::write_text(&sp, &text)?;
        }
        Ok(paths)
    }

    fn summary<'a>(&'a self, s: &'a BuiltSplit, path: &Path) -> BuildSummary<'a> {
        let causal_rows = s.rows.iter().filter(|r| r.is_causal()).count();
        let r = &self.request;
        BuildSummary {
            tool: format!("hyperdas {} data build", env!("CARGO_PKG_VERSION")),
            output: path.display().to_string(),
            domain: &self.domain,
            targets: &self.targets,
            split: s.split.name(),
            template_splits: s.split.template_splits().iter().map(|t| t.name()).collect(),
            entities: r.entities,
            seed: r.seed,
            causal_per_target: r.causal,
            isolate_per_target: r.isolate,
            model: self.model.as_ref().map(|m| m.0.as_str()),
            start_token: self.model.as_ref().map(|m| m.1.as_str()),
            knowledge: self.model.as_ref().map(|_| &r.knowledge),
            knowledge_tables: &self.reports,
            knowledge_seconds: self.knowledge_seconds,
            sample_seconds: s.sample_seconds,
            groups: &s.groups,
            balance: &s.balance,
            kept: group_counts(&s.rows),
            rows: s.rows.len(),
            causal_rows,
            isolate_rows: s.rows.len() - causal_rows,
        }
    }
}
