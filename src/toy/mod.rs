//! `hyperdas toy`: a small Llama trained from scratch on RAVEL city facts — the fast, offline
//! target model for development, tests and the demo. We control this world, so we know what
//! the model knows.
//!
//! * [`world`]: cities, templates (training / held-out), sentences, the word-level tokenizer;
//! * [`train`]: initialisation, the pre-training loop (shared `crate::train` AdamW, schedule,
//!   metrics), first-token accuracy, the HF export.
//!
//! The result is an HF directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`) that our loader and transformers load, plus `toy.json` (settings,
//! accuracy, timing), `metrics.jsonl` (the pre-training curve), `world.json`, and `ravel/`: the
//! toy world as a RAVEL knowledge base (`hyperdas data build --kb-dir <dir>/ravel --domain city`).
//! It is cached under `<cache>/toy/<key>`, the key a hash of the settings, so later commands
//! reuse it.

pub mod config;
pub mod plant;
pub mod train;
pub mod world;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{LlamaConfig, TextTokenizer};
pub use config::ToyConfig;
pub use train::AttributeAccuracy;
use world::World;

/// Bumped whenever the world, the tokenizer or the training code changes what a config produces.
pub const TOY_FORMAT: u32 = 6;

/// Accuracy targets: first-token accuracy per attribute.
pub const TARGET_TRAIN: f64 = 0.98;
pub const TARGET_HELD_OUT: f64 = 0.90;

/// `toy.json`: what was trained and how well it knows its facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToyReport {
    pub format: u32,
    pub config: ToyConfig,
    pub key: String,
    pub cities: usize,
    pub vocab_size: usize,
    pub parameters: usize,
    pub train_examples: usize,
    pub held_out_examples: usize,
    pub accuracy: Vec<AttributeAccuracy>,
    /// Accuracy of every template, training and held-out.
    pub templates: Vec<train::TemplateAccuracy>,
    pub train_seconds: f64,
    pub threads: usize,
    /// Each planted subspace's interchange accuracy (empty when the config plants none).
    #[serde(default)]
    pub planted: Vec<PlantedReport>,
}

/// How well a planted subspace carries its attribute, on held-out templates: the basis is in
/// `planted_basis.safetensors` (a tensor named after the attribute, `[D, k]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlantedReport {
    pub attribute: String,
    pub layer: usize,
    pub dims: usize,
    /// Share of swaps asking the planted attribute that answer the source's value.
    pub cause: f64,
    /// Share of swaps asking another attribute that keep the base's value.
    pub isolate: f64,
    pub pairs: usize,
}

impl ToyReport {
    /// Does every attribute meet the targets?
    pub fn meets_targets(&self) -> bool {
        self.accuracy.iter().all(|a| a.train >= TARGET_TRAIN && a.held_out >= TARGET_HELD_OUT)
    }
}

/// "Country and Continent planted in 8 dimensions each at block 1" (empty when nothing is planted).
pub fn planted_summary(planted: &[PlantedReport]) -> String {
    match planted {
        [] => String::new(),
        [p] => format!("{} planted in {} dimensions at block {}", p.attribute, p.dims, p.layer),
        [first, ..] => {
            let names: Vec<&str> = planted.iter().map(|p| p.attribute.as_str()).collect();
            format!("{} and {} planted in {} dimensions each at block {}", names[..names.len() - 1].join(", "), names[names.len() - 1], first.dims, first.layer)
        }
    }
}

/// A trained toy model on disk.
#[derive(Debug, Clone)]
pub struct ToyModel {
    pub dir: PathBuf,
    pub report: ToyReport,
    /// Loaded from the cache rather than trained now.
    pub cached: bool,
}

/// Cache key of a configuration.
pub fn cache_key(cfg: &ToyConfig) -> String {
    use sha2::Digest;
    let text = format!("toy-format-{TOY_FORMAT}:{}", serde_json::to_string(cfg).unwrap_or_default());
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))[..12].to_string()
}

/// Where a configuration is cached.
pub fn cache_path(cfg: &ToyConfig) -> Result<PathBuf> {
    Ok(crate::fetch::cache_dir()?.join("toy").join(cache_key(cfg)))
}

fn read_report(dir: &Path) -> Option<ToyReport> {
    let text = std::fs::read_to_string(dir.join("toy.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The cached model for `cfg`, training it first if needed (or if `force`).
pub fn ensure(cfg: &ToyConfig, force: bool, progress: bool) -> Result<ToyModel> {
    cfg.validate()?;
    let dir = cache_path(cfg)?;
    if !force
        && let Some(report) = read_report(&dir).filter(|r| r.config == *cfg && r.format == TOY_FORMAT)
        && dir.join("model.safetensors").is_file()
        && dir.join("tokenizer.json").is_file()
    {
        return Ok(ToyModel { dir, report, cached: true });
    }
    let report = build_into(cfg, &dir, progress)?;
    Ok(ToyModel { dir, report, cached: false })
}

/// Build the world, train, evaluate and write everything into `dir` (atomically).
pub fn build_into(cfg: &ToyConfig, dir: &Path, progress: bool) -> Result<ToyReport> {
    cfg.validate()?;
    crate::atomic::write_dir(dir, |tmp| write_toy(cfg, tmp, &cache_key(cfg), progress))
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::invalid(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

fn write_toy(cfg: &ToyConfig, dir: &Path, key: &str, progress: bool) -> Result<ToyReport> {
    let world = World::build_in(cfg.cities, cfg.countries, cfg.seed)?;
    let tokenizer = world.tokenizer()?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer.save(&tok_path, true).map_err(|e| Error::file(&tok_path, format!("cannot write: {e}")))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": world::BOS, "eos_token": world::EOS, "pad_token": world::PAD, "unk_token": world::UNK,
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, "clean_up_tokenization_spaces": false}),
    )?;
    write_json(&dir.join("world.json"), &world)?;
    write_ravel_kb(&world, &dir.join("ravel"))?;
    let tok = TextTokenizer::from_hf_dir(dir)?;
    let vocab_size = tok.vocab_size();
    let config_json = cfg.llama_config(vocab_size);
    let llama = LlamaConfig::from_hf_json(&config_json, &dir.join("config.json"))?;
    let mut log = crate::train::MetricsLog::create(&dir.join("metrics.jsonl"))?;
    let t0 = Instant::now();
    let (params, frozen, model) = train::pretrain(cfg, &world, &tok, &llama, &mut log, progress)?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let accuracy = train::evaluate(&model, &tok, &world)?;
    let templates = train::evaluate_templates(&model, &tok, &world)?;
    train::save_hf(dir, &config_json, &params, &frozen)?;
    let mut planted = Vec::new();
    if let Some(p) = plant::Plant::new(cfg, &world, model.device())? {
        let held = world::encode_examples(&tok, &world.examples(false))?;
        let pairs = plant::draw_pairs(&mut crate::rng::Rng::derive(cfg.seed, "toy/plant-report"), &held, world.cities.len(), &p.attributes, 1000 * p.attributes.len());
        let acc = plant::interchange_accuracy(&model, &p, &held, &pairs, tok.padding_id())?;
        let path = dir.join("planted_basis.safetensors");
        let named: std::collections::HashMap<String, candle_core::Tensor> = cfg.plant_attributes.iter().cloned().zip(p.bases.iter().cloned()).collect();
        candle_core::safetensors::save(&named, &path).map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
        for (w, (name, (cause, isolate))) in cfg.plant_attributes.iter().zip(acc).enumerate() {
            let n = pairs.iter().filter(|q| q.2 == w).count();
            planted.push(PlantedReport { attribute: name.clone(), layer: p.layer, dims: cfg.plant_dims, cause, isolate, pairs: n });
        }
    }
    let report = ToyReport {
        format: TOY_FORMAT,
        config: cfg.clone(),
        key: key.to_string(),
        cities: world.cities.len(),
        vocab_size,
        parameters: params.num_elements(),
        train_examples: world.examples(true).len(),
        held_out_examples: world.examples(false).len(),
        accuracy,
        templates,
        train_seconds,
        threads: candle_core::utils::get_num_threads(),
        planted,
    };
    write_json(&dir.join("toy.json"), &report)?;
    Ok(report)
}

/// The toy world as a RAVEL knowledge base (`entities.tsv`, `templates.json`,
/// `template_splits.json`): training templates are `train`, held-out ones `test`; every
/// city is a `train` entity (the toy world holds out phrasings, not facts).
fn write_ravel_kb(world: &World, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let mut tsv = String::from("entity\tsplit");
    for a in &world.attributes {
        tsv += &format!("\t{}", crate::data::ravel::column_name(a));
    }
    tsv.push('\n');
    let mut cities = world.cities.clone();
    cities.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, values) in &cities {
        tsv += &format!("{name}\ttrain\t{}\n", values.join("\t"));
    }
    let p = dir.join("entities.tsv");
    std::fs::write(&p, tsv).map_err(|e| Error::file(&p, format!("cannot write: {e}")))?;
    let mut templates = serde_json::Map::new();
    let mut splits = serde_json::Map::new();
    for (i, a) in world.attributes.iter().enumerate() {
        let list: Vec<serde_json::Value> = world.templates.iter().filter(|t| t.attribute == i).map(|t| serde_json::Value::String(t.text.clone())).collect();
        templates.insert(a.clone(), serde_json::Value::Array(list));
    }
    for t in &world.templates {
        splits.insert(t.text.clone(), serde_json::Value::String(if t.train { "train" } else { "test" }.into()));
    }
    write_json(&dir.join("templates.json"), &templates)?;
    write_json(&dir.join("template_splits.json"), &splits)
}
