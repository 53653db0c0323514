//! The knowledge table: which facts a model knows, per entity × template of one attribute.
//!
//! A cell `(t, e)` of attribute `a` is **known** when the frozen model, teacher-forced on
//! `<start> t(e) [" "] value_a(e)`, predicts every token of the value by arg-max: the test of
//! [`super::filter`] (the reference's `filter_dataset`). A causal row needs its source entity
//! known under the base template, an isolate row its base entity known under its template, so
//! rows sampled from known cells ([`super::sample`]) are exactly rows that filter would keep,
//! without generating and discarding the rest.
//!
//! Evaluating every cell is costly (city: 3,552 entities × 273 templates ≈ 970k prompts) and a
//! small model knows few entities, so by default each attribute is evaluated in three stages:
//!
//! 1. **pilot**: `pilot` entities (a fixed pseudo-random sample) under every train template;
//! 2. **screen**: every other entity under the `screen` train templates the pilot entities
//!    passed most often; an entity that passes none of them is *screened out*;
//! 3. **full**: the screened-in entities (pilot entities that passed any template, and at most
//!    `max_entities` in all, in the same fixed order) under every template of the wanted splits.
//!
//! `screen = 0` skips stages 1–2 (every entity, up to `max_entities`, under every template).
//! The pilot estimates the screen's **recall**: of the known cells of pilot entities, the share
//! whose entity passes the screen (the rest is what screening misses).
//!
//! Prompts of one template share their text before the entity, so each batch runs its common
//! token prefix once ([`crate::model::PrefixCache`]) and only the rest per prompt, up to the
//! last label token the check reads.
//!
//! Cells are facts about (model, dtype, start token, knowledge base): the file stores the
//! cells, not the options that chose them, so a later run evaluates only the cells it needs and
//! lacks. Cache: `<cache>/knowledge/<model sha256>/<domain>-<kb sha256>-<dtype>-start<id>/
//! <attribute>.json`, whose first line carries the sha256 of the rest; a corrupt or stale file
//! is reported, set aside and rebuilt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use super::collate::{PromptWithLabel, encode_prompt_with_label};
use super::ravel::{KnowledgeBase, Split, column_name};
use crate::error::{Error, Result};
use crate::model::{Llama, TextTokenizer};
use crate::rng::Rng;

/// The file format's name and version (first word of the first line).
const FORMAT: &str = "hyperdas-knowledge/1";
/// Seed of the fixed entity order (pilot sample, full-stage order): part of the format, not an option.
const ORDER_SEED: u64 = 0x6b6e_6f77;

/// One cell's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Not evaluated (screened out, beyond `max_entities`, or a split not asked for yet).
    Unchecked,
    Known,
    /// The model's teacher-forced answer is wrong.
    Unknown,
    /// The label cannot be separated from the prompt by the tokenizer (counts as not known).
    Unusable,
    /// The entity has no value for this attribute (never evaluated).
    NoValue,
}

impl Cell {
    fn char(self) -> char {
        match self {
            Cell::Unchecked => '.',
            Cell::Known => '1',
            Cell::Unknown => '0',
            Cell::Unusable => 'u',
            Cell::NoValue => '-',
        }
    }
    fn from_char(c: char) -> Option<Cell> {
        Some(match c {
            '.' => Cell::Unchecked,
            '1' => Cell::Known,
            '0' => Cell::Unknown,
            'u' => Cell::Unusable,
            '-' => Cell::NoValue,
            _ => return None,
        })
    }
    pub fn checked(self) -> bool {
        matches!(self, Cell::Known | Cell::Unknown | Cell::Unusable)
    }
}

/// What a table's verdicts depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableKey {
    /// [`crate::model::ModelSource::fingerprint`].
    pub model_sha256: String,
    pub dtype: String,
    /// The start token id prepended to every prompt (none: no start token).
    pub start_token: Option<u32>,
    pub domain: String,
    /// [`KnowledgeBase::fingerprint`].
    pub kb_sha256: String,
    pub attribute: String,
}

impl TableKey {
    pub fn new(model_sha256: &str, dtype: DType, tok: &TextTokenizer, kb: &KnowledgeBase, attribute: usize) -> Self {
        TableKey {
            model_sha256: model_sha256.to_string(),
            dtype: format!("{dtype:?}").to_lowercase(),
            start_token: tok.start_token,
            domain: kb.domain.clone(),
            kb_sha256: kb.fingerprint(),
            attribute: kb.attributes[attribute].clone(),
        }
    }

    /// The table's file under the cache directory `root` (`<cache>/knowledge`).
    pub fn path(&self, root: &Path) -> PathBuf {
        let start = self.start_token.map_or("none".to_string(), |s| s.to_string());
        root.join(&self.model_sha256[..self.model_sha256.len().min(16)])
            .join(format!("{}-{}-{}-start{start}", self.domain, &self.kb_sha256[..self.kb_sha256.len().min(12)], self.dtype))
            .join(format!("{}.json", column_name(&self.attribute)))
    }
}

/// One template's row of the table.
#[derive(Debug, Clone)]
pub struct TableTemplate {
    pub text: String,
    pub split: Split,
    /// Per entity (knowledge-base order).
    pub cells: Vec<Cell>,
}

/// The verdicts of one attribute: templates × entities.
#[derive(Debug, Clone)]
pub struct KnowledgeTable {
    pub key: TableKey,
    /// Entity names in knowledge-base order.
    pub entities: Vec<String>,
    /// The attribute's templates in knowledge-base order.
    pub templates: Vec<TableTemplate>,
}

#[derive(Serialize, Deserialize)]
struct FileBody {
    key: TableKey,
    entities: Vec<String>,
    templates: Vec<FileTemplate>,
}

#[derive(Serialize, Deserialize)]
struct FileTemplate {
    text: String,
    split: String,
    /// One character per entity: `1` known, `0` not, `u` unusable, `.` not evaluated, `-` no value.
    cells: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    crate::fetch::hex(&Sha256::digest(bytes))
}

impl KnowledgeTable {
    /// An empty table for attribute `a` of `kb`: every cell unchecked (or no value).
    pub fn new(kb: &KnowledgeBase, a: usize, key: TableKey) -> Self {
        let templates = kb
            .templates
            .iter()
            .filter(|t| t.attribute == a)
            .map(|t| TableTemplate { text: t.text.clone(), split: t.split, cells: kb.entities.iter().map(|e| if e.values[a].is_empty() { Cell::NoValue } else { Cell::Unchecked }).collect() })
            .collect();
        KnowledgeTable { key, entities: kb.entities.iter().map(|e| e.name.clone()).collect(), templates }
    }

    /// Whether entity `e` is known under template `t` (indices into this table).
    pub fn known(&self, t: usize, e: usize) -> bool {
        self.templates[t].cells[e] == Cell::Known
    }

    /// Indices of the templates of `splits`.
    pub fn templates_in(&self, splits: &[Split]) -> Vec<usize> {
        (0..self.templates.len()).filter(|&t| splits.contains(&self.templates[t].split)).collect()
    }

    /// The file's text: a header line `hyperdas-knowledge/1 sha256=<hex>` and a JSON body.
    pub fn to_text(&self) -> Result<String> {
        let body = FileBody {
            key: self.key.clone(),
            entities: self.entities.clone(),
            templates: self.templates.iter().map(|t| FileTemplate { text: t.text.clone(), split: t.split.name().into(), cells: t.cells.iter().map(|c| c.char()).collect() }).collect(),
        };
        let json = serde_json::to_string(&body).map_err(|e| Error::invalid(format!("cannot serialise a knowledge table: {e}")))?;
        Ok(format!("{FORMAT} sha256={}\n{json}\n", sha256_hex(json.as_bytes())))
    }

    /// Parse a file's text, checking its checksum and shape (not its key: see [`load_or_new`]).
    pub fn from_text(text: &str) -> std::result::Result<Self, String> {
        let (header, json) = text.split_once('\n').ok_or("no header line")?;
        let json = json.strip_suffix('\n').unwrap_or(json);
        let sum = header.strip_prefix(FORMAT).and_then(|r| r.trim().strip_prefix("sha256=")).ok_or_else(|| format!("the header is not `{FORMAT} sha256=...`"))?;
        if sha256_hex(json.as_bytes()) != sum {
            return Err("its checksum does not match its contents".into());
        }
        let body: FileBody = serde_json::from_str(json).map_err(|e| format!("unreadable JSON: {e}"))?;
        let n = body.entities.len();
        let mut templates = Vec::with_capacity(body.templates.len());
        for t in body.templates {
            let split = Split::parse(&t.split).ok_or_else(|| format!("template {:?} has split {:?}", t.text, t.split))?;
            let cells: Option<Vec<Cell>> = t.cells.chars().map(Cell::from_char).collect();
            let cells = cells.ok_or_else(|| format!("template {:?} has a cell that is not one of 1 0 u . -", t.text))?;
            if cells.len() != n {
                return Err(format!("template {:?} has {} cells for {n} entities", t.text, cells.len()));
            }
            templates.push(TableTemplate { text: t.text, split, cells });
        }
        Ok(KnowledgeTable { key: body.key, entities: body.entities, templates })
    }

    /// Whether this table was built for `fresh` (same key, entities and templates, in order).
    fn mismatch(&self, fresh: &KnowledgeTable) -> Option<String> {
        if self.key != fresh.key {
            return Some(format!("it was built for another model, dtype, start token or knowledge base ({:?})", self.key));
        }
        if self.entities != fresh.entities {
            return Some("its entity list differs from the knowledge base's".into());
        }
        let same = self.templates.len() == fresh.templates.len() && self.templates.iter().zip(&fresh.templates).all(|(a, b)| a.text == b.text && a.split == b.split);
        if !same {
            return Some("its templates differ from the knowledge base's".into());
        }
        let novalue = self.templates.iter().zip(&fresh.templates).any(|(a, b)| a.cells.iter().zip(&b.cells).any(|(x, y)| (*x == Cell::NoValue) != (*y == Cell::NoValue)));
        novalue.then(|| "its empty values differ from the knowledge base's".into())
    }
}

/// Load the cached table at `path` if it is sound and was built for `fresh`'s key; otherwise
/// `fresh`, with the reason the file was not used (a damaged file is renamed `*.bad`, never deleted).
pub fn load_or_new(path: &Path, fresh: KnowledgeTable) -> (KnowledgeTable, Option<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (fresh, None),
        Err(e) => return (fresh, Some(format!("{} cannot be read ({e}); rebuilding it", path.display()))),
    };
    let why = match KnowledgeTable::from_text(&text) {
        Ok(t) => match t.mismatch(&fresh) {
            None => return (t, None),
            Some(why) => format!("{} is stale: {why}", path.display()),
        },
        Err(why) => format!("{} is corrupt: {why}", path.display()),
    };
    let bad = path.with_extension("json.bad");
    let _ = std::fs::rename(path, &bad);
    (fresh, Some(format!("{why}; set aside as {} and rebuilding it", bad.display())))
}

/// How cells are chosen for evaluation (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct KnowledgeOptions {
    /// Template splits whose cells to complete for the chosen entities.
    pub splits: Vec<Split>,
    /// Screening templates per attribute; 0 evaluates entities in order without a screen.
    pub screen: usize,
    /// Entities evaluated under every train template to choose the screen.
    pub pilot: usize,
    /// Entities evaluated in full per attribute (0: every entity that passes the screen).
    pub max_entities: usize,
    /// An attribute that only supplies isolate rows is skipped after the pilot when less than
    /// this share of the pilot's cells is known (the model barely knows it).
    pub min_pilot_rate: f64,
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// Progress bars on a terminal.
    #[serde(skip)]
    pub progress: bool,
}

impl Default for KnowledgeOptions {
    fn default() -> Self {
        KnowledgeOptions { splits: vec![Split::Train, Split::Val, Split::Test], screen: 1, pilot: 32, max_entities: 300, min_pilot_rate: 0.02, batch_size: 64, progress: false }
    }
}

/// Cells run through the model in one stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageCost {
    pub cells: usize,
    /// Tokens run (each batch's shared prefix once, plus every continuation).
    pub tokens: usize,
    pub seconds: f64,
}

impl StageCost {
    fn add(&mut self, o: &StageCost) {
        self.cells += o.cells;
        self.tokens += o.tokens;
        self.seconds += o.seconds;
    }
}

/// What [`ensure`] did for one attribute.
#[derive(Debug, Clone, Serialize)]
pub struct AttributeReport {
    pub attribute: String,
    pub path: String,
    /// Why a cached file was not used (corrupt, stale), if one existed.
    pub rebuilt: Option<String>,
    /// Entities with a value for the attribute.
    pub entities_with_value: usize,
    pub pilot_entities: usize,
    /// Known share of the pilot's cells.
    pub pilot_rate: Option<f64>,
    /// Set when the attribute was skipped after the pilot (isolate-only and barely known).
    pub skipped: Option<String>,
    pub screen_templates: Vec<String>,
    /// Entities evaluated under the screen (pilot included); screening stops once
    /// `max_entities` have passed.
    pub screened: usize,
    /// Of those, entities that passed the screen (or, in the pilot, any template).
    pub screened_in: usize,
    /// Entities evaluated under every template of the wanted splits.
    pub full_entities: usize,
    /// Estimated share of known cells that the screen keeps (from the pilot), if screened.
    pub screen_recall: Option<f64>,
    pub pilot: StageCost,
    pub screen: StageCost,
    pub full: StageCost,
    /// The entities evaluated in full (indices into the knowledge base), in order.
    #[serde(skip)]
    pub full_set: Vec<usize>,
}

impl AttributeReport {
    /// All three stages together.
    pub fn total(&self) -> StageCost {
        let mut t = StageCost::default();
        for s in [&self.pilot, &self.screen, &self.full] {
            t.add(s);
        }
        t
    }
}

/// The model and tokenizer a table is evaluated with.
pub struct Evaluator<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a TextTokenizer,
    pub batch_size: usize,
    pub progress: bool,
}

/// Entities screened per step, in the fixed order, until `max_entities` have passed.
const SCREEN_CHUNK: usize = 256;

/// Make sure the table of attribute `a` has the cells `opts` asks for: load it from `root`
/// (`<cache>/knowledge`), evaluate what is missing, save it if anything changed.
/// `isolate_only`: the attribute supplies only isolate rows (it may be skipped, see
/// [`KnowledgeOptions::min_pilot_rate`]).
pub fn ensure(ev: &Evaluator, kb: &KnowledgeBase, a: usize, key: TableKey, root: &Path, opts: &KnowledgeOptions, isolate_only: bool) -> Result<(KnowledgeTable, AttributeReport)> {
    let path = key.path(root);
    let (mut table, rebuilt) = load_or_new(&path, KnowledgeTable::new(kb, a, key));
    if let Some(why) = &rebuilt {
        tracing::info!("knowledge table: {why}");
    }
    let name = kb.attributes[a].clone();
    let mut order: Vec<usize> = (0..kb.entities.len()).filter(|&e| !kb.entities[e].values[a].is_empty()).collect();
    Rng::derive(ORDER_SEED, &format!("knowledge/{}/{}", kb.domain, name)).shuffle(&mut order);
    let train = table.templates_in(&[Split::Train]);
    let wanted = table.templates_in(&opts.splits);
    let cap = if opts.max_entities == 0 { usize::MAX } else { opts.max_entities };
    let mut report = AttributeReport {
        attribute: name.clone(),
        path: path.display().to_string(),
        rebuilt,
        entities_with_value: order.len(),
        pilot_entities: 0,
        pilot_rate: None,
        skipped: None,
        screen_templates: Vec::new(),
        screened: 0,
        screened_in: 0,
        full_entities: 0,
        screen_recall: None,
        pilot: StageCost::default(),
        screen: StageCost::default(),
        full: StageCost::default(),
        full_set: Vec::new(),
    };
    let full: Vec<usize> = if opts.screen > 0 && !train.is_empty() {
        // 1. Pilot: the first entities of the fixed order under every train template.
        let pilot: Vec<usize> = order.iter().copied().take(opts.pilot).collect();
        report.pilot_entities = pilot.len();
        report.pilot = evaluate(ev, kb, a, &mut table, &cross(&train, &pilot), &format!("{name}: pilot"))?;
        let known_in = |table: &KnowledgeTable, e: usize| train.iter().filter(|&&t| table.known(t, e)).count();
        let known_pilot: usize = pilot.iter().map(|&e| known_in(&table, e)).sum();
        let rate = known_pilot as f64 / (pilot.len() * train.len()).max(1) as f64;
        report.pilot_rate = Some(rate);
        if isolate_only && rate < opts.min_pilot_rate {
            report.skipped = Some(format!("the pilot knew {known_pilot} of {} cells ({:.1}% < {:.1}%)", pilot.len() * train.len(), 100.0 * rate, 100.0 * opts.min_pilot_rate));
            save(&path, &table, report.pilot.cells > 0)?;
            return Ok((table, report));
        }
        // 2. Screen: the train templates the pilot passed most, over the next entities in
        //    order, until `cap` entities are in.
        let mut ranked: Vec<(usize, usize)> = train.iter().map(|&t| (pilot.iter().filter(|&&e| table.known(t, e)).count(), t)).collect();
        ranked.sort_by_key(|&(n, t)| (std::cmp::Reverse(n), t));
        let screen: Vec<usize> = ranked.iter().take(opts.screen).map(|&(_, t)| t).collect();
        report.screen_templates = screen.iter().map(|&t| table.templates[t].text.clone()).collect();
        let passes = |table: &KnowledgeTable, e: usize| screen.iter().any(|&t| table.known(t, e));
        let kept_pilot: usize = pilot.iter().filter(|&&e| passes(&table, e)).map(|&e| known_in(&table, e)).sum();
        report.screen_recall = (known_pilot > 0).then(|| kept_pilot as f64 / known_pilot as f64);
        let mut chosen: Vec<usize> = pilot.iter().copied().filter(|&e| known_in(&table, e) > 0).collect();
        let mut next = pilot.len();
        while chosen.len() < cap && next < order.len() {
            let chunk = &order[next..(next + SCREEN_CHUNK).min(order.len())];
            let cost = evaluate(ev, kb, a, &mut table, &cross(&screen, chunk), &format!("{name}: screen"))?;
            report.screen.add(&cost);
            chosen.extend(chunk.iter().copied().filter(|&e| passes(&table, e)));
            next += chunk.len();
        }
        report.screened = next;
        report.screened_in = chosen.len();
        chosen
    } else {
        order.clone()
    };
    // 3. Full: the chosen entities under every wanted template.
    let full: Vec<usize> = full.into_iter().take(cap).collect();
    report.full_entities = full.len();
    report.full = evaluate(ev, kb, a, &mut table, &cross(&wanted, &full), &format!("{name}: full"))?;
    report.full_set = full;
    save(&path, &table, report.total().cells > 0)?;
    Ok((table, report))
}

/// The tables of several attributes, as a builder samples from them: a cell counts as known
/// when its entity was evaluated in full and the model knows it; a skipped attribute has none.
pub struct Knowledge {
    /// Per attribute of the knowledge base: the table and the entities evaluated in full.
    tables: Vec<Option<(KnowledgeTable, Vec<bool>)>>,
    /// Global template index → (attribute, index in that attribute's table).
    local: Vec<(usize, usize)>,
}

impl Knowledge {
    /// Ensure the tables of `attributes` (`(index, isolate_only)`), keyed by the model's
    /// fingerprint, under `root`.
    pub fn build(ev: &Evaluator, kb: &KnowledgeBase, attributes: &[(usize, bool)], model_sha256: &str, root: &Path, opts: &KnowledgeOptions) -> Result<(Knowledge, Vec<AttributeReport>)> {
        let mut tables: Vec<Option<(KnowledgeTable, Vec<bool>)>> = vec![None; kb.attributes.len()];
        let mut reports = Vec::new();
        for &(a, isolate_only) in attributes {
            let key = TableKey::new(model_sha256, ev.model.dtype(), ev.tokenizer, kb, a);
            let (table, report) = ensure(ev, kb, a, key, root, opts, isolate_only)?;
            if report.skipped.is_none() {
                let mut full = vec![false; kb.entities.len()];
                report.full_set.iter().for_each(|&e| full[e] = true);
                tables[a] = Some((table, full));
            }
            reports.push(report);
        }
        Ok((Knowledge { tables, local: local_indices(kb) }, reports))
    }

    /// Whether entity `e` is a known, fully evaluated cell under template `t` (an index into `kb.templates`).
    pub fn known(&self, t: usize, e: usize) -> bool {
        let (a, lt) = self.local[t];
        self.tables[a].as_ref().is_some_and(|(table, full)| full[e] && table.known(lt, e))
    }
}

/// Global template index → (attribute, index among that attribute's templates).
fn local_indices(kb: &KnowledgeBase) -> Vec<(usize, usize)> {
    let mut seen = vec![0usize; kb.attributes.len()];
    kb.templates
        .iter()
        .map(|t| {
            let i = seen[t.attribute];
            seen[t.attribute] += 1;
            (t.attribute, i)
        })
        .collect()
}

/// Write the table if it changed.
fn save(path: &Path, table: &KnowledgeTable, changed: bool) -> Result<()> {
    if !changed {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::atomic::write_text(path, &table.to_text()?)
}

/// Every (template, entity) pair.
fn cross(templates: &[usize], entities: &[usize]) -> Vec<(usize, usize)> {
    templates.iter().flat_map(|&t| entities.iter().map(move |&e| (t, e))).collect()
}

/// Evaluate the unchecked cells among `cells` (template, entity), batched by template.
fn evaluate(ev: &Evaluator, kb: &KnowledgeBase, a: usize, table: &mut KnowledgeTable, cells: &[(usize, usize)], what: &str) -> Result<StageCost> {
    let t0 = Instant::now();
    let mut by_template: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(t, e) in cells {
        if table.templates[t].cells[e] == Cell::Unchecked {
            by_template.entry(t).or_default().push(e);
        }
    }
    let total: usize = by_template.values().map(Vec::len).sum();
    let mut cost = StageCost { cells: total, ..Default::default() };
    if total == 0 {
        return Ok(cost);
    }
    let pb = crate::progress::bar(total as u64, &format!("{what} [{{bar:30}}] {{pos}}/{{len}} prompts {{elapsed}} (eta {{eta}})"), ev.progress);
    let kb_templates: Vec<_> = kb.templates.iter().filter(|t| t.attribute == a).collect();
    let (mut done, mut last_line) = (0usize, Instant::now());
    for (t, entities) in by_template {
        let template = kb_templates[t];
        let n = entities.len();
        let mut encoded: Vec<(usize, PromptWithLabel)> = Vec::with_capacity(entities.len());
        for e in entities {
            let ent = &kb.entities[e];
            match encode_prompt_with_label(ev.tokenizer, &template.fill(&ent.name), &ent.values[a]) {
                Ok(p) => encoded.push((e, p)),
                Err(_) => table.templates[t].cells[e] = Cell::Unusable,
            }
        }
        encoded.sort_by_key(|(e, p)| (p.ids.len(), *e));
        for chunk in encoded.chunks(ev.batch_size.max(1)) {
            let prompts: Vec<&PromptWithLabel> = chunk.iter().map(|(_, p)| p).collect();
            let (verdicts, tokens) = check_batch(ev.model, &prompts)?;
            cost.tokens += tokens;
            for ((e, _), ok) in chunk.iter().zip(verdicts) {
                table.templates[t].cells[*e] = if ok { Cell::Known } else { Cell::Unknown };
            }
        }
        pb.inc(n as u64);
        done += n;
        // Without a visible bar (a batch job's log), a line every half minute.
        if pb.is_hidden() && last_line.elapsed().as_secs() >= 30 && done < total {
            let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            tracing::info!("{what}: {done}/{total} prompts, {rate:.0} prompts/s, about {:.0} s left", (total - done) as f64 / rate.max(1e-9));
            last_line = Instant::now();
        }
    }
    pb.finish_and_clear();
    cost.seconds = t0.elapsed().as_secs_f64();
    tracing::info!("{what}: {} prompts, {} tokens in {:.1} s ({:.0} prompts/s)", cost.cells, cost.tokens, cost.seconds, cost.cells as f64 / cost.seconds.max(1e-9));
    Ok(cost)
}

/// Teacher-forced check of prompts that (usually) share a prefix: run their common token prefix
/// once, then each prompt's rest up to its last label token but one. Returns, per prompt,
/// whether every label token is the arg-max, and the tokens run.
pub fn check_batch(model: &Llama, prompts: &[&PromptWithLabel]) -> Result<(Vec<bool>, usize)> {
    let first = prompts.first().ok_or_else(|| Error::invalid("no prompt to check"))?;
    // The shared prefix must stop before the first position whose logits are read.
    let mut p = prompts.iter().map(|x| x.label_start - 1).min().unwrap_or(0);
    for x in prompts {
        p = p.min(x.ids.iter().zip(&first.ids).take_while(|(a, b)| a == b).count());
    }
    let prefix = model.prefix_cache(&first.ids[..p])?;
    let rows: Vec<Vec<u32>> = prompts.iter().map(|x| x.ids[p..x.ids.len() - 1].to_vec()).collect();
    let r = rows.iter().map(Vec::len).max().unwrap_or(1);
    // Row i's label token j is predicted at continuation position label_start − 1 + j − p.
    let mut at = Vec::new();
    for (i, x) in prompts.iter().enumerate() {
        at.extend((x.label_start..x.ids.len()).map(|j| (i * r + j - 1 - p) as u32));
    }
    let normed = model.forward_after_prefix(&prefix, &rows)?; // [B, R, D]
    let d = normed.dim(2)?;
    let idx = Tensor::from_vec(at, prompts.iter().map(|x| x.ids.len() - x.label_start).sum::<usize>(), model.device())?; // [N]
    let h = normed.reshape((prompts.len() * r, d))?.index_select(&idx, 0)?.unsqueeze(0)?; // [1, N, D]
    let all = Tensor::arange(0u32, h.dim(1)? as u32, model.device())?.unsqueeze(0)?; // [1, N]
    let predicted = model.logits_at(&h, &all)?.argmax(D::Minus1)?.squeeze(0)?.to_vec1::<u32>()?; // [N]
    let mut next = 0;
    let verdicts = prompts
        .iter()
        .map(|x| {
            let n = x.ids.len() - x.label_start;
            let ok = x.ids[x.label_start..] == predicted[next..next + n];
            next += n;
            ok
        })
        .collect();
    let tokens = p + rows.iter().map(Vec::len).sum::<usize>();
    Ok((verdicts, tokens))
}

/// `<cache>/knowledge`.
pub fn cache_root() -> Result<PathBuf> {
    Ok(crate::fetch::cache_dir()?.join("knowledge"))
}

/// Counts of one attribute's table over the templates of `splits`.
#[derive(Debug, Clone, Serialize)]
pub struct SplitSummary {
    pub split: String,
    pub templates: usize,
    pub cells_checked: usize,
    pub cells_known: usize,
    /// Entities known under at least one template of the split.
    pub entities_known: usize,
    /// Per template: (text, known, checked).
    pub per_template: Vec<(String, usize, usize)>,
}

impl KnowledgeTable {
    /// Counts over the templates of `split`.
    pub fn summary(&self, split: Split) -> SplitSummary {
        let ts = self.templates_in(&[split]);
        let per_template: Vec<(String, usize, usize)> = ts
            .iter()
            .map(|&t| {
                let c = &self.templates[t].cells;
                (self.templates[t].text.clone(), c.iter().filter(|&&x| x == Cell::Known).count(), c.iter().filter(|x| x.checked()).count())
            })
            .collect();
        let entities_known = (0..self.entities.len()).filter(|&e| ts.iter().any(|&t| self.known(t, e))).count();
        SplitSummary {
            split: split.name().into(),
            templates: ts.len(),
            cells_checked: per_template.iter().map(|x| x.2).sum(),
            cells_known: per_template.iter().map(|x| x.1).sum(),
            entities_known,
            per_template,
        }
    }
}
