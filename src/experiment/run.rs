//! One HyperDAS training run from a [`RunConfig`]: load the target, read and encode the data,
//! build the interpreter, train, evaluate every inference mode, and write the run directory:
//!
//! | file | content |
//! |---|---|
//! | `config.resolved.toml` | the configuration after defaults, file and `--set` |
//! | `metrics.jsonl` | one record per step (losses, lr, gradient norm, periodic soft-mode scores) |
//! | `results.json` | `{mode: {accs: {causal, isolate, disentangle, entity_selected, entity_position}, test_loss}}` (the reference's shape, plus the shares of causal rows whose base entity token takes a source token / the source entity token) |
//! | `results.csv` | the same as a table |
//! | `results.by_attribute.json`, `.csv` | per mode, domain and intervened attribute, plus each domain's mean over its attributes (the reference's main table) |
//! | `run.json` | method, resolved layer, rank, model, row counts ([`RunInfo`]) |
//! | `checkpoint/` | parameters, AdamW moments, step and config ([`super::checkpoint`]) |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::trainer::{CheckpointPlan, GroupScores, Selection, TrainData, TrainSettings, Trainer, evaluate_detailed};
use crate::data::collate::{CollateOptions, encode_rows};
use crate::data::io::{ReadOptions, read_dataset};
use crate::error::{Error, Result};
use crate::hypernet::interpreter::{Interpreter, InterpreterConfig, Method};
use crate::hypernet::subspace::{RotationParam, SubspaceInit, SubspaceKind};
use crate::hypernet::{Frozen, HyperConfig, PointerStates, SubspaceInput};
use crate::intervention::selection::InferenceMode;
use crate::model::{CleanMatmul, LoadOptions, Site, StartToken};
use crate::params::ParamStore;
use crate::train::MetricsLog;

/// `[model]`: the frozen target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// An HF directory, a .gguf, a fetched name (`smollm2-135m`), `toy` (the cached standard
    /// toy model, trained if needed) or `toy:tiny`.
    pub path: String,
    pub dtype: String,
    pub start_token: String,
    /// `cpu`, `cuda` or `cuda:N`: where the target and everything the run allocates live
    /// (checkpoints are device-independent: a run trained on one device evaluates on another).
    pub device: String,
    /// Matmul precision of the clean passes (no gradient): `auto` (bf16 on CPUs with AVX-512
    /// BF16 and an f32 target, else f32), `f32` or `bf16` ([`CleanMatmul`]; docs/benchmarks.md
    /// measures its speed and its effect on scores).
    pub clean_matmul: CleanMatmul,
    /// Matmul precision of the intervened pass through the frozen blocks, forward and input
    /// gradient: `auto` (as `clean_matmul`), `f32` or `bf16` (docs/benchmarks.md).
    pub intervened_matmul: CleanMatmul,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection { path: "toy".into(), dtype: "f32".into(), start_token: "auto".into(), device: "cpu".into(), clean_matmul: CleanMatmul::Auto, intervened_matmul: CleanMatmul::Auto }
    }
}

/// `[data]`: JSONL files or datasets save_to_disk directories.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub train: String,
    pub test: String,
    pub skip_bad_rows: bool,
    /// 0: the collation default (128 tokens).
    pub max_len: usize,
    pub base_suffix_visible: bool,
    pub source_suffix_visible: bool,
    /// sha256 of `train` (of a save_to_disk directory's files by name), recorded by the run in
    /// `config.resolved.toml`; set in a configuration, the run checks the data against it.
    pub train_sha256: String,
    /// sha256 of `test`, as `train_sha256`; `eval` and `report` on the run's own test set warn
    /// when the file there no longer matches it.
    pub test_sha256: String,
    /// Keep only the rows whose instruction names one of these attributes (both sets; empty:
    /// every row). RAVEL's per-attribute MDAS is a run per attribute with one name here: that
    /// attribute's causal rows and the isolate rows that protect the others from it.
    pub attributes: Vec<String>,
    /// Use at most the first this many training rows (after `attributes`; 0: all). Built sets
    /// are shuffled, so the first rows are a random sample.
    pub max_train_rows: usize,
    /// Score at most the first this many test rows (0: all), e.g. a validation sample.
    pub max_test_rows: usize,
}

/// `[interpreter]`: the hypernetwork and the subspace module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InterpreterSection {
    pub num_blocks: usize,
    /// The intervention layer l (the residual entering block l): a number, or `"middle"` =
    /// ⌊(L − 1) / 2⌋ of the target's L blocks (15 for Llama-3-8B, the paper's layer; 14 for
    /// SmolLM2-135M; 0 for the 2-block toy).
    pub layer: LayerChoice,
    /// The intervention site in the [`Site`] vocabulary (`blocks.15.hook_resid_pre`,
    /// `block_output.14`, `hidden_states.15`, …); when given, it replaces `layer` and
    /// `layer_convention`. Empty: use `layer`.
    pub site: String,
    pub from_scratch: bool,
    pub subspace: SubspaceKind,
    pub rank: usize,
    /// Householder reflections per instruction in ReflectSelect: 1 (the paper's module) or up
    /// to `rank`. With `n`, the subspaces of two instructions can differ in `n` directions
    /// instead of one (docs/method.md §4.2).
    pub reflections: usize,
    pub ablate_source: bool,
    pub ablate_base: bool,
    pub seed: u64,
    /// `hyperdas`, or a baseline: `das` (causal rows only) or `mdas` (causal + isolate rows),
    /// which intervene at the last entity token with one learned basis of rank `rank`
    /// (`hyperdas baseline das|mdas` sets this).
    pub method: Method,
    /// How `layer` counts: `resid_pre` (ours: the residual entering block `layer`,
    /// `hidden_states[layer]`) or `block_output` (pyvene's, as the reference MDAS: the output
    /// of block `layer`, `hidden_states[layer + 1]` = our `layer + 1`).
    pub layer_convention: LayerConvention,
    /// The subspace module's new weights: `ours` (MLP width = the target's FFN width,
    /// N(0, 1/√in)) or `reference` (width 14336, U(±1/√in), as the authors' code).
    pub init: SubspaceInit,
    /// How the rotation stays orthonormal: `retraction` (ours: polar factor after each step) or
    /// `householder` (the authors' `torch` orthogonal parametrisation).
    pub rotation: RotationParam,
    /// Copied hypernetwork weights kept at the target's values: any of `embedding`, `mlps`,
    /// `blocks` (default: none; everything trains, as the reference).
    pub freeze: Vec<Frozen>,
    /// The pointer head's initial "keep the base" logit, learned (0: none, the reference).
    pub self_bias: f64,
    /// RoPE in the pointer head (the reference: true).
    pub pointer_rope: bool,
    /// A fixed factor on the pointer head's scores (1: the reference; `√D` makes the untrained
    /// scores O(1)).
    pub pointer_scale: f64,
    /// What the pointer head compares: `unit` (the reference) or `centered` (each prompt's
    /// shared component removed; see [`PointerStates`]).
    pub pointer_states: PointerStates,
    /// What conditions the subspace module: `last` (the last instruction token's state, the
    /// reference) or `centered` (that state less the instruction's mean; see [`SubspaceInput`]).
    pub subspace_input: SubspaceInput,
}

impl Default for InterpreterSection {
    fn default() -> Self {
        InterpreterSection {
            num_blocks: 2,
            layer: LayerChoice::Name("middle".into()),
            site: String::new(),
            from_scratch: false,
            subspace: SubspaceKind::ReflectSelect,
            rank: 32,
            reflections: 1,
            ablate_source: false,
            ablate_base: false,
            seed: 0,
            method: Method::HyperDas,
            layer_convention: LayerConvention::ResidPre,
            init: SubspaceInit::Ours,
            rotation: RotationParam::Retraction,
            freeze: Vec::new(),
            self_bias: 0.0,
            pointer_rope: true,
            pointer_scale: 1.0,
            pointer_states: PointerStates::Unit,
            subspace_input: SubspaceInput::Last,
        }
    }
}

/// `interpreter.layer_convention`: how `interpreter.layer` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerConvention {
    /// Ours and TransformerLens's: the residual entering block `layer` (`hidden_states[layer]`).
    ResidPre,
    /// pyvene's (the reference MDAS): the output of block `layer` = our `layer + 1`.
    BlockOutput,
}

/// `interpreter.layer`: an index or a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerChoice {
    Index(usize),
    Name(String),
}

impl LayerChoice {
    /// The layer index for a target of `num_layers` blocks.
    pub fn resolve(&self, num_layers: usize) -> Result<usize> {
        match self {
            LayerChoice::Index(l) => Ok(*l),
            LayerChoice::Name(n) if n == "middle" => Ok(num_layers.saturating_sub(1) / 2),
            LayerChoice::Name(n) => Err(Error::invalid(format!("interpreter.layer = {n:?}: use a layer number or \"middle\""))),
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    pub modes: Vec<InferenceMode>,
    /// Rows per evaluation batch. 16 (the training batch): on SmolLM2-135M, 64 took 3× the
    /// memory (7.96 GB against 2.49 GB peak RSS) and was slower (66 s against 46 s for 272 rows).
    pub batch_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { modes: InferenceMode::ALL.to_vec(), batch_size: 16 }
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub interpreter: InterpreterSection,
    pub train: TrainSettings,
    pub eval: EvalSection,
}

impl RunConfig {
    /// The defaults for `method`: [`RunConfig::default`] for HyperDAS; for DAS and MDAS the
    /// reference MDAS trainer's settings (docs/method.md §9.1): 5 epochs of batch 16,
    /// weights 1 / 1, no regulariser, no clipping, the rotation's learning rate constant; one
    /// mode (`groundtruth`, the last entity token). The rotation lr stays 1e-3 (ours, with the
    /// polar retraction), not pyvene's 1e-4 for its Householder parametrisation: set
    /// `train.rotation_lr` to change it.
    pub fn preset(method: Method) -> RunConfig {
        let mut c = RunConfig::default();
        if method.is_baseline() {
            c.interpreter.method = method;
            c.interpreter.subspace = SubspaceKind::Das;
            c.train.epochs = 5;
            c.train.causal_weight = 1.0;
            c.train.isolate_weight = 1.0;
            c.train.regularizer = super::loss::Regularizer::None;
            c.train.grad_clip = 0.0;
            c.eval.modes = vec![InferenceMode::GroundTruth];
        }
        c
    }
}

impl RunConfig {
    /// This HyperDAS configuration turned into `method`'s baseline on the same model, data,
    /// layer, rank, epochs and batch: the changes of [`RunConfig::preset`] that make it the
    /// reference MDAS trainer (weights 1 / 1, no regulariser, no clipping, the fixed positions).
    pub fn as_baseline(&self, method: Method) -> RunConfig {
        let preset = RunConfig::preset(method);
        let mut c = self.clone();
        c.interpreter.method = preset.interpreter.method;
        c.interpreter.subspace = preset.interpreter.subspace;
        c.train.causal_weight = preset.train.causal_weight;
        c.train.isolate_weight = preset.train.isolate_weight;
        c.train.regularizer = preset.train.regularizer;
        c.train.grad_clip = preset.train.grad_clip;
        c.eval.modes = preset.eval.modes;
        c
    }
}

impl ModelSection {
    /// Load the target (training the toy model first if `path` names it and it is not cached).
    pub fn load(&self, progress: bool) -> Result<crate::model::LoadedModel> {
        let spec = model_spec(&self.path, progress)?;
        let opts = LoadOptions {
            dtype: crate::model::load::parse_dtype(&self.dtype)?,
            clean_matmul: self.clean_matmul,
            intervened_matmul: self.intervened_matmul,
            device: crate::model::load::parse_device(&self.device)?,
            start_token: self.start_token.parse::<StartToken>()?,
            progress,
        };
        crate::model::load(&spec, &opts)
    }
}

/// At most the first `limit` rows (0: all).
fn first<T>(mut rows: Vec<T>, limit: usize) -> Vec<T> {
    if limit > 0 && rows.len() > limit {
        rows.truncate(limit);
    }
    rows
}

impl DataSection {
    /// The training rows a run uses of `rows` (read from `path`): those whose instruction names
    /// one of `attributes` (all when empty), then at most the first `limit` (0: all).
    pub fn select(&self, rows: Vec<crate::data::collate::EncodedRow>, limit: usize, path: &str) -> Result<Vec<crate::data::collate::EncodedRow>> {
        let rows = self.with_attributes(rows, path, "")?;
        Ok(first(rows, limit))
    }

    /// The test rows a run is scored on: the first `limit` rows (0: all), then those naming one
    /// of `attributes`. Limiting first makes runs over different attributes (RAVEL's
    /// per-attribute MDAS) score exactly the rows a run over all of them scores, split by
    /// attribute: their merged scores are row for row comparable.
    pub fn select_test(&self, rows: Vec<crate::data::collate::EncodedRow>, limit: usize, path: &str) -> Result<Vec<crate::data::collate::EncodedRow>> {
        let scope = if limit > 0 && rows.len() > limit { format!(" among its first {limit} rows (data.max_test_rows)") } else { String::new() };
        self.with_attributes(first(rows, limit), path, &scope)
    }

    /// The rows whose instruction names one of `attributes` (all when empty); none is an error,
    /// whose message says which rows were searched (`scope`, e.g. " among its first 400 rows").
    fn with_attributes(&self, mut rows: Vec<crate::data::collate::EncodedRow>, path: &str, scope: &str) -> Result<Vec<crate::data::collate::EncodedRow>> {
        if !self.attributes.is_empty() {
            let present: std::collections::BTreeSet<String> = rows.iter().map(|r| r.target_attribute.clone()).collect();
            rows.retain(|r| self.attributes.contains(&r.target_attribute));
            if rows.is_empty() {
                return Err(Error::file(
                    path,
                    format!("no row's instruction names {} (data.attributes){scope}; those rows name {}", self.attributes.join(", "), present.into_iter().collect::<Vec<_>>().join(", ")),
                ));
            }
        }
        Ok(rows)
    }

    /// These paths made absolute (from the current directory, as the run reads them) with each
    /// dataset's sha256 recorded; a sha256 already set must match the data.
    pub fn pinned(&self) -> Result<DataSection> {
        let mut d = self.clone();
        for (path, sha, key) in [(&mut d.train, &mut d.train_sha256, "data.train"), (&mut d.test, &mut d.test_sha256, "data.test")] {
            let p = std::path::absolute(Path::new(path.as_str())).map_err(|e| Error::file(path.as_str(), format!("{key}: {e}")))?;
            if !p.exists() {
                return Err(Error::file(&p, format!("{key}: not found")));
            }
            let now = crate::data::io::fingerprint(&p)?;
            if !sha.is_empty() && *sha != now {
                return Err(Error::file(&p, format!("{key} has sha256 {now}, not the {key}_sha256 = {sha} the configuration expects (the data changed)")));
            }
            *path = p.display().to_string();
            *sha = now;
        }
        Ok(d)
    }

    /// Collation settings of this run; `skip_unusable` from the caller (training uses
    /// `skip_bad_rows`, `hyperdas eval` its own flag).
    pub fn collate_options(&self, skip_unusable: bool) -> CollateOptions {
        CollateOptions {
            base_suffix_visible: self.base_suffix_visible,
            source_suffix_visible: self.source_suffix_visible,
            max_len: if self.max_len == 0 { CollateOptions::default().max_len } else { self.max_len },
            skip_unusable,
        }
    }
}

impl InterpreterSection {
    /// The interpreter configuration for a target of `num_layers` blocks.
    pub fn config(&self, num_layers: usize) -> Result<InterpreterConfig> {
        Ok(InterpreterConfig {
            hypernet: HyperConfig {
                num_blocks: self.num_blocks,
                layer: self.resolved_layer(num_layers)?,
                from_scratch: self.from_scratch,
                ablate_source: self.ablate_source,
                ablate_base: self.ablate_base,
                seed: self.seed,
                freeze: self.freeze.clone(),
                self_bias: self.self_bias,
                pointer_rope: self.pointer_rope,
                pointer_scale: self.pointer_scale,
                pointer_states: self.pointer_states,
                subspace_input: self.subspace_input,
            },
            subspace: self.subspace,
            rank: self.rank,
            reflections: self.reflections,
            method: self.method,
            init: self.init,
            rotation: self.rotation,
        })
    }

    /// The intervention site for a target of `num_layers` blocks: `blocks.{l}.hook_resid_pre`
    /// with `l` = [`InterpreterSection::resolved_layer`].
    pub fn site(&self, num_layers: usize) -> Result<Site> {
        Ok(Site::ResidPre(self.resolved_layer(num_layers)?))
    }

    /// The intervention layer in our convention (the residual entering that block): from
    /// `site` when given, else `layer` read in `layer_convention`. Whether the target has that
    /// block is checked when the interpreter is built.
    pub fn resolved_layer(&self, num_layers: usize) -> Result<usize> {
        let site = if self.site.is_empty() {
            let l = self.layer.resolve(num_layers)?;
            match self.layer_convention {
                LayerConvention::ResidPre => Site::ResidPre(l),
                LayerConvention::BlockOutput => Site::ResidPost(l),
            }
        } else {
            self.site.parse::<Site>().map_err(|e| Error::invalid(format!("interpreter.site: {e}")))?
        };
        match site {
            Site::ResidPre(l) | Site::HiddenState(l) => Ok(l),
            Site::ResidPost(l) => Ok(l + 1),
            Site::FinalNorm => Err(Error::invalid(format!("interpreter.site = {site}: the final norm's output is not a residual the blocks run from; use blocks.{{l}}.hook_resid_pre"))),
        }
    }
}

/// `run.json`: what a finished run was, resolved (the layer as an index in our convention), so
/// `hyperdas compare` and `hyperdas sweep` need not load the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub method: String,
    /// The residual entering this block (`resid_pre`).
    pub layer: usize,
    pub num_layers: usize,
    pub rank: usize,
    pub subspace: String,
    pub model: String,
    pub train_rows: usize,
    pub test_rows: usize,
    /// Who made the run, where and when (absent in runs from before 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// `run.json`'s `provenance`: what a reader of a shared run directory needs to reproduce it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    /// hyperdas's version.
    pub version: String,
    /// The git commit the tool was built from (`-dirty`: with uncommitted changes), when known.
    pub commit: Option<String>,
    /// When this process started the run (RFC 3339, UTC), and when it finished.
    pub started: String,
    pub finished: String,
    /// The step this process started from (> 0: resumed from a checkpoint).
    pub resumed_from_step: usize,
    pub host: String,
    /// CPU model, logical cores and SIMD level.
    pub cpu: String,
    /// Where the target ran (`cpu`, `cuda:0`).
    pub device: String,
    /// Compute threads (rayon's pool: `RAYON_NUM_THREADS`, else every core).
    pub threads: usize,
    /// Precision the clean passes' matmuls ran in (`model.clean_matmul` resolved: `f32`, `bf16`;
    /// absent in runs from before it existed, which ran in f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_matmul: Option<String>,
    /// The same for the intervened pass (`model.intervened_matmul` resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intervened_matmul: Option<String>,
    /// The full command line (under Python: the interpreter's).
    pub command: Vec<String>,
}

impl Provenance {
    /// This process, for a run that started at `started` from `resumed_from_step`.
    pub fn now(started: chrono::DateTime<chrono::Utc>, resumed_from_step: usize, model: &crate::model::Llama) -> Provenance {
        let device = model.device();
        let rfc = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        Provenance {
            version: env!("CARGO_PKG_VERSION").into(),
            commit: option_env!("HYPERDAS_GIT_COMMIT").map(str::to_string),
            started: rfc(started),
            finished: rfc(chrono::Utc::now()),
            resumed_from_step,
            host: crate::profile::host_name(),
            cpu: crate::profile::machine_description(),
            device: match device.location() {
                candle_core::DeviceLocation::Cpu => "cpu".into(),
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            },
            threads: rayon::current_num_threads(),
            clean_matmul: Some(if model.clean_bf16() { "bf16".into() } else { format!("{:?}", model.dtype()).to_lowercase() }),
            intervened_matmul: Some(if model.intervened_bf16() { "bf16".into() } else { format!("{:?}", model.dtype()).to_lowercase() }),
            command: std::env::args().collect(),
        }
    }
}

/// Scores of one mode in the reference's `results.json` shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModeResult {
    pub accs: BTreeMap<String, f64>,
    pub test_loss: f64,
}

/// A new run directory when none is named (`hyperdas train` without `--out`, `hyperdas.train`
/// without `out`): `runs/<prefix>-<YYYY-MM-DD>-N` (UTC date) from the current directory, the
/// first N ≥ 1 not taken.
pub fn fresh_run_dir(prefix: &str) -> PathBuf {
    let day = chrono::Utc::now().format("%Y-%m-%d");
    (1..).map(|n| PathBuf::from("runs").join(format!("{prefix}-{day}-{n}"))).find(|p| !p.exists()).unwrap_or_else(|| PathBuf::from("runs").join(prefix))
}

/// The toy model a model name stands for: `toy` (the standard toy world) or `toy:tiny`.
pub fn toy_config(path: &str) -> Option<crate::toy::ToyConfig> {
    match path {
        "toy" => Some(crate::toy::ToyConfig::standard()),
        "toy:tiny" => Some(crate::toy::ToyConfig::tiny()),
        _ => None,
    }
}

/// Resolve a model name to something [`crate::model::load`] takes: `toy` and `toy:tiny` become
/// the cached toy model's directory (training it first if needed); anything else is unchanged.
pub fn model_spec(path: &str, progress: bool) -> Result<String> {
    match toy_config(path) {
        Some(cfg) => Ok(crate::toy::ensure(&cfg, false, progress)?.dir.display().to_string()),
        None => Ok(path.to_string()),
    }
}

/// Run `cfg` into the directory `out` (which must not exist yet, or be empty). With `resume`,
/// continue the run in `out` from its checkpoint (its `config.resolved.toml` must equal `cfg`
/// apart from `model.device`, `train.stop_after_steps`, `train.checkpoint_every` and `train.log_every`).
pub fn run(cfg: &RunConfig, out: &Path, resume: bool, progress: bool) -> Result<Option<BTreeMap<String, ModeResult>>> {
    run_sharing(cfg, out, resume, progress, &mut None)
}

/// [`run`], handing every `metrics.jsonl` record (each step's loss, each evaluation) to
/// `observer` as it is written: a notebook's progress callback.
pub fn run_observed(cfg: &RunConfig, out: &Path, resume: bool, progress: bool, observer: crate::train::metrics::Observer) -> Result<Option<BTreeMap<String, ModeResult>>> {
    guarded(out, resume, || run_in(cfg, out, resume, progress, &mut None, Some(observer)))
}

/// A state cache handed from run to run (a sweep), with the settings it was made for.
pub type SharedCache = Option<((ModelSection, String, super::trainer::CacheDtype), crate::model::cache::StateCache)>;

/// [`run`], reusing `shared`'s clean states when it was made for the same model and cache
/// settings (the cache holds every layer, so any method and layer may use it; results are
/// identical to a fresh cache's, since its groups are canonical), and leaving this run's cache
/// in `shared` afterwards.
pub fn run_sharing(cfg: &RunConfig, out: &Path, resume: bool, progress: bool, shared: &mut SharedCache) -> Result<Option<BTreeMap<String, ModeResult>>> {
    guarded(out, resume, || run_in(cfg, out, resume, progress, shared, None))
}

/// Run `f`, removing `out` again when `f` created it and failed before training anything.
fn guarded<T>(out: &Path, resume: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let created_here = !resume && !out.exists();
    let result = f();
    if result.is_err() && created_here && out.is_dir() {
        // Failed before anything worth keeping (no optimizer step logged, no checkpoint): a
        // bad input leaves no half-made run directory behind.
        let trained = std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|t| t.contains("\"loss\"")) || crate::train::checkpoint::exists(&out.join("checkpoint"));
        if !trained {
            let _ = std::fs::remove_dir_all(out);
        }
    }
    result
}

fn run_in(cfg: &RunConfig, out: &Path, resume: bool, progress: bool, shared: &mut SharedCache, observer: Option<crate::train::metrics::Observer>) -> Result<Option<BTreeMap<String, ModeResult>>> {
    let started = chrono::Utc::now();
    if cfg.train.batch_size == 0 || cfg.train.epochs == 0 || cfg.eval.batch_size == 0 || cfg.train.label_limit == 0 {
        return Err(Error::invalid(format!(
            "train.batch_size, train.epochs, eval.batch_size and train.label_limit must be at least 1 (got {}, {}, {}, {})",
            cfg.train.batch_size, cfg.train.epochs, cfg.eval.batch_size, cfg.train.label_limit
        )));
    }
    if cfg.data.train.is_empty() || cfg.data.test.is_empty() {
        return Err(Error::invalid("data.train and data.test must name datasets (JSONL files or save_to_disk directories; `hyperdas data build` makes them)"));
    }
    cfg.train.validate()?;
    let method = cfg.interpreter.method;
    let modes = modes_for(method, &cfg.eval.modes)?;
    cfg.interpreter.resolved_layer(0)?; // a bad layer name or convention fails before the model loads
    let cfg = &RunConfig { data: cfg.data.pinned()?, ..cfg.clone() };
    if resume {
        let saved: RunConfig = crate::config::load(Some(&out.join("config.resolved.toml")), &[])?;
        for (key, was, now) in [("data.train", &saved.data.train_sha256, &cfg.data.train_sha256), ("data.test", &saved.data.test_sha256, &cfg.data.test_sha256)] {
            if !was.is_empty() && was != now {
                return Err(Error::file(out.join("config.resolved.toml"), format!("{key} changed since the run started (sha256 {was}, now {now}); resume with the same data")));
            }
        }
        // Runs from before data paths were absolute and hashed compare by their absolute paths.
        let same = |c: &RunConfig| {
            let data = DataSection {
                train: std::path::absolute(&c.data.train).map(|p| p.display().to_string()).unwrap_or_default(),
                test: std::path::absolute(&c.data.test).map(|p| p.display().to_string()).unwrap_or_default(),
                train_sha256: String::new(),
                test_sha256: String::new(),
                ..c.data.clone()
            };
            let model = ModelSection { device: String::new(), ..c.model.clone() };
            RunConfig { data, model, train: TrainSettings { stop_after_steps: 0, checkpoint_every: 0, log_every: 0, ..c.train.clone() }, ..c.clone() }
        };
        if same(&saved) != same(cfg) {
            return Err(Error::file(
                out.join("config.resolved.toml"),
                "differs from this run's configuration; resume with the same settings (only model.device, train.stop_after_steps, train.checkpoint_every and train.log_every may change)",
            ));
        }
    } else {
        if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(Error::file(out, "the run directory exists and is not empty (choose another --out, remove it, or --resume)"));
        }
        std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create: {e}")))?;
    }
    // A read-only or full disk fails here, before any training, not at the first checkpoint.
    let probe = out.join(".write-probe");
    std::fs::write(&probe, vec![0u8; 1 << 16])
        .and_then(|_| std::fs::File::open(&probe)?.sync_all())
        .map_err(|e| Error::file(out, format!("cannot write into the run directory (read-only or full?): {e}")))?;
    let _ = std::fs::remove_file(&probe);
    crate::config::write_resolved(cfg, &out.join("config.resolved.toml"))?;

    let mut lm = cfg.model.load(progress)?;
    let collate = cfg.data.collate_options(cfg.data.skip_bad_rows);
    let read = ReadOptions { skip_bad_rows: cfg.data.skip_bad_rows };
    let mut sets = Vec::new();
    for path in [&cfg.data.train, &cfg.data.test] {
        let ds = read_dataset(&PathBuf::from(path), read)?;
        let enc = encode_rows(&lm.tokenizer, &ds.rows, &collate, path)?;
        if progress {
            tracing::info!(
                "{}; {} encoded{}",
                ds.describe(),
                enc.rows.len(),
                if enc.skipped.is_empty() { String::new() } else { format!(", {} skipped (first: row {}: {})", enc.skipped.len(), enc.skipped[0].0 + 1, enc.skipped[0].1) }
            );
        }
        if enc.rows.is_empty() {
            return Err(Error::file(path, if ds.rows.is_empty() { "has no rows" } else { "has no usable rows (every row was skipped; see the messages above)" }));
        }
        let rows = if sets.is_empty() { cfg.data.select(enc.rows, cfg.data.max_train_rows, path)? } else { cfg.data.select_test(enc.rows, cfg.data.max_test_rows, path)? };
        let limit = if sets.is_empty() { cfg.data.max_train_rows } else { cfg.data.max_test_rows };
        if progress && (!cfg.data.attributes.is_empty() || limit > 0) {
            tracing::info!("using {} rows of {path} (data.attributes = [{}], limit {})", rows.len(), cfg.data.attributes.join(", "), if limit == 0 { "none".to_string() } else { limit.to_string() });
        }
        sets.push(rows);
    }
    if !method.trains_on_isolate_rows() {
        let before = sets[0].len();
        sets[0].retain(|r| r.is_causal);
        if progress {
            tracing::info!("{}: training on the {} causal rows of {before} (isolate rows are scored, not trained on)", method.label(), sets[0].len());
        }
        if sets[0].is_empty() {
            return Err(Error::file(&cfg.data.train, "DAS trains on causal rows and this dataset has none"));
        }
    }
    let icfg = cfg.interpreter.config(lm.model.num_layers())?;
    if progress {
        match method {
            Method::HyperDas => tracing::info!("intervention layer {} of {} blocks; {} hypernetwork blocks", icfg.hypernet.layer, lm.model.num_layers(), icfg.hypernet.num_blocks),
            _ => tracing::info!("{}: intervention layer {} of {} blocks (the residual entering it), last entity token, rank {}", method.label(), icfg.hypernet.layer, lm.model.num_layers(), icfg.rank),
        }
    }
    let mut ps = ParamStore::new();
    let mut interp = Interpreter::new(&mut ps, &lm.model, &icfg)?;
    // Blocks below the intervention layer run only in clean passes: with those in bf16 the f32
    // copies of their weights are not needed (the hypernetwork has copied what it copies).
    let freed = lm.model.release_f32_below(icfg.hypernet.layer)?;
    if progress && freed > 0 {
        tracing::info!(
            "clean passes in bf16{}: the f32 weights of blocks 0..{} freed ({:.0} MB)",
            if lm.model.intervened_bf16() { " and the intervened pass" } else { "" },
            if lm.model.intervened_bf16() { lm.model.num_layers() } else { icfg.hypernet.layer },
            freed as f64 / 1e6
        );
    }
    let key = (cfg.model.clone(), format!("{}", cfg.train.state_cache_gb), cfg.train.state_cache_dtype);
    match shared.take() {
        Some((k, c)) if k == key => interp.set_cache(Some(c)),
        _ => interp.set_cache(cfg.train.state_cache()?),
    }
    interp.register_prompts(&sets[0]);
    interp.register_prompts(&sets[1]);
    let pad = lm.tokenizer.padding_id();
    let log = if resume { MetricsLog::append(&out.join("metrics.jsonl"))? } else { MetricsLog::create(&out.join("metrics.jsonl"))? };
    let mut log = log.with_tensorboard(out)?;
    let total = cfg.train.total_steps(sets[0].len());
    if let Some(mut f) = observer {
        // The observer also learns the horizon (`total_steps`, not written to the file).
        log = log.observe(Box::new(move |r| {
            let mut r = r.clone();
            r["total_steps"] = total.into();
            f(&r)
        }));
    }
    let plan = CheckpointPlan { dir: Some(&out.join("checkpoint")), resume, meta: serde_json::to_value(cfg).map_err(|e| Error::invalid(e.to_string()))? };
    let resumed_from = if resume { crate::train::checkpoint::step_of_latest(&out.join("checkpoint")).unwrap_or(0) } else { 0 };
    let trainer = Trainer::new(&lm.model, &mut interp, &ps, &cfg.train, total)?;
    let (_, opt) = trainer.fit(&TrainData { train: &sets[0], test: &sets[1], pad }, &mut log, &plan, progress)?;
    if opt.step < total {
        if progress {
            tracing::info!("stopped after step {} of {total} (train.stop_after_steps); continue with --resume", opt.step);
        }
        return Ok(None);
    }

    let scored = score_modes(&lm.model, &interp, &sets[1], &modes, cfg, pad, false)?;
    write_results(out, "", &scored)?;
    let info = RunInfo {
        method: method.name().into(),
        layer: icfg.hypernet.layer,
        num_layers: lm.model.num_layers(),
        rank: icfg.rank,
        subspace: icfg.subspace.name().into(),
        model: cfg.model.path.clone(),
        train_rows: sets[0].len(),
        test_rows: sets[1].len(),
        provenance: Some(Provenance::now(started, resumed_from, &lm.model)),
    };
    let info_path = out.join("run.json");
    let text = serde_json::to_string_pretty(&info).map_err(|e| Error::invalid(e.to_string()))?;
    crate::atomic::write_text(&info_path, &text)?;
    if progress {
        tracing::info!("{}", scored.table().trim_end());
        if let Some(c) = interp.cache_stats() {
            tracing::info!(
                "state cache (since it was made): {:.1}% of {} prompt look-ups served from {} cached prompts ({:.2} GB); {} prompts run through the target",
                100.0 * c.hit_rate(),
                c.hits + c.misses,
                c.entries,
                c.bytes as f64 / 1e9,
                c.computed
            );
        }
    }
    *shared = interp.take_cache().map(|c| (key, c));
    Ok(Some(scored.results))
}

/// The inference modes `names` asks for, as a `method` can be scored: every mode for HyperDAS;
/// for a baseline only `groundtruth` (its fixed last-entity-token positions), whatever the list.
pub fn modes_for(method: Method, modes: &[InferenceMode]) -> Result<Vec<InferenceMode>> {
    if method.is_baseline() {
        return Ok(vec![InferenceMode::GroundTruth]);
    }
    if modes.is_empty() {
        return Err(Error::invalid(format!("eval.modes is empty: name at least one inference mode ({})", InferenceMode::all_names())));
    }
    Ok(modes.to_vec())
}

/// Every mode's scores on one dataset.
pub struct Scored {
    /// `results.json`: `{mode: {accs, test_loss}}`.
    pub results: BTreeMap<String, ModeResult>,
    /// Per mode: every (domain, intervened attribute) group, then each domain's mean.
    pub groups: BTreeMap<String, Vec<GroupScores>>,
    /// Each row's selected positions, when asked for.
    pub selections: Vec<Selection>,
}

impl Scored {
    /// A plain-text table: one line per mode, domain and attribute.
    pub fn table(&self) -> String {
        let pct = |x: f64| if x.is_nan() { "    -".to_string() } else { format!("{:5.1}", 100.0 * x) };
        let mut out = format!("{:<15} {:<8} {:<12} {:>5} {:>5} {:>5}  rows (causal/isolate)\n", "mode", "domain", "attribute", "Cause", "Iso", "Dis");
        for (mode, groups) in &self.groups {
            for g in groups {
                out += &format!("{mode:<15} {:<8} {:<12} {} {} {}  {}/{}\n", g.domain, g.attribute, pct(g.causal), pct(g.isolate), pct(g.disentangle), g.causal_rows, g.isolate_rows);
            }
        }
        out
    }
}

/// Score `rows` in every mode.
fn score_modes(target: &crate::model::Llama, interp: &Interpreter, rows: &[crate::data::collate::EncodedRow], modes: &[InferenceMode], cfg: &RunConfig, pad: u32, selections: bool) -> Result<Scored> {
    let mut scored = Scored { results: BTreeMap::new(), groups: BTreeMap::new(), selections: Vec::new() };
    for &mode in modes {
        let e = evaluate_detailed(target, interp, rows, mode, cfg.eval.batch_size, cfg.train.label_limit, pad, selections)?;
        let s = e.scores;
        let mut accs = BTreeMap::from([("causal".to_string(), s.causal), ("isolate".to_string(), s.isolate), ("disentangle".to_string(), s.disentangle)]);
        // Not accuracies: the shares of causal rows whose base entity token takes a source
        // token, and the source entity token.
        if let Some(x) = s.entity_selected {
            accs.insert("entity_selected".to_string(), x);
        }
        if let Some(x) = s.entity_position {
            accs.insert("entity_position".to_string(), x);
        }
        scored.results.insert(mode.name().to_string(), ModeResult { accs, test_loss: s.loss });
        let domains: std::collections::BTreeSet<&str> = e.groups.iter().map(|g| g.domain.as_str()).collect();
        let means: Vec<GroupScores> = domains.into_iter().map(|d| GroupScores::domain_mean(d, &e.groups.iter().filter(|g| g.domain == d).collect::<Vec<_>>())).collect();
        let mut groups = e.groups;
        groups.extend(means);
        scored.groups.insert(mode.name().to_string(), groups);
        scored.selections.extend(e.selections);
    }
    Ok(scored)
}

/// Write `{stem}results.json`, `.csv`, `{stem}results.by_attribute.json` and `.csv` into `dir`.
fn write_results(dir: &Path, stem: &str, scored: &Scored) -> Result<()> {
    // Attribute and domain names come from user files: the csv crate quotes what needs it.
    let csv_text = |rows: Vec<Vec<String>>| -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in rows {
            w.write_record(&r).map_err(|e| Error::invalid(format!("results CSV: {e}")))?;
        }
        String::from_utf8(w.into_inner().map_err(|e| Error::invalid(format!("results CSV: {e}")))?).map_err(|e| Error::invalid(format!("results CSV: {e}")))
    };
    let head = |h: &[&str]| h.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut rows = vec![head(&["mode", "causal", "isolate", "disentangle", "test_loss"])];
    for (mode, r) in &scored.results {
        rows.push(vec![mode.clone(), r.accs["causal"].to_string(), r.accs["isolate"].to_string(), r.accs["disentangle"].to_string(), r.test_loss.to_string()]);
    }
    let csv = csv_text(rows)?;
    let mut rows = vec![head(&["mode", "domain", "attribute", "causal", "isolate", "disentangle", "causal_rows", "isolate_rows"])];
    for (mode, groups) in &scored.groups {
        for g in groups {
            let n = [g.causal, g.isolate, g.disentangle].map(|x| x.to_string());
            rows.push(vec![mode.clone(), g.domain.clone(), g.attribute.clone(), n[0].clone(), n[1].clone(), n[2].clone(), g.causal_rows.to_string(), g.isolate_rows.to_string()]);
        }
    }
    let by_csv = csv_text(rows)?;
    let to_text = |v: &dyn Fn() -> serde_json::Result<String>| v().map_err(|e| Error::invalid(e.to_string()));
    let files = [
        (format!("{stem}results.json"), to_text(&|| serde_json::to_string_pretty(&scored.results))?),
        (format!("{stem}results.csv"), csv),
        (format!("{stem}results.by_attribute.json"), to_text(&|| serde_json::to_string_pretty(&scored.groups))?),
        (format!("{stem}results.by_attribute.csv"), by_csv),
    ];
    for (name, text) in files {
        let path = dir.join(&name);
        crate::atomic::write_text(&path, &text)?;
    }
    Ok(())
}

/// A trained run loaded from its directory: configuration, target, parameters.
pub struct LoadedRun {
    pub config: RunConfig,
    pub lm: crate::model::LoadedModel,
    pub params: ParamStore,
    pub interpreter: Interpreter,
}

/// The resolved configuration of the run in `dir` (its `config.resolved.toml`).
pub fn run_config(dir: &Path) -> Result<RunConfig> {
    let cfg_path = dir.join("config.resolved.toml");
    if !cfg_path.is_file() {
        return Err(Error::file(dir, "not a run directory (no config.resolved.toml)"));
    }
    crate::config::load(Some(&cfg_path), &[])
}

/// The precision to reload a run's clean (`intervened` false) or intervened passes with: an
/// explicit `f32` / `bf16` as configured; for `auto`, the one the run trained with (its
/// `run.json`; runs from before the setting, and unfinished ones, trained in f32), so that a
/// run is scored as it was trained on any machine (bf16 falls back to f32, with a note, on a
/// CPU without AVX-512 BF16).
fn trained_matmul(dir: &Path, model: &ModelSection, configured: CleanMatmul, intervened: bool) -> CleanMatmul {
    if configured != CleanMatmul::Auto {
        return configured;
    }
    // The bf16 kernels serve an f32 target on the CPU only; a bf16 target records its own dtype
    // ("bf16") here, which is not a kernel choice, and a run moved to a GPU runs its own dtype.
    let fits = crate::model::load::parse_dtype(&model.dtype).is_ok_and(|d| CleanMatmul::fits(d, model.device == "cpu"));
    if !fits {
        return CleanMatmul::F32;
    }
    let provenance = std::fs::read_to_string(dir.join("run.json")).ok().and_then(|s| serde_json::from_str::<RunInfo>(&s).ok()).and_then(|i| i.provenance);
    let recorded = provenance.and_then(|p| if intervened { p.intervened_matmul } else { p.clean_matmul });
    match recorded.as_deref() {
        Some("bf16") if crate::model::kernels::bf16_matmul_available() => CleanMatmul::Bf16,
        Some("bf16") => {
            tracing::info!("note: {} trained in bf16; this CPU has no AVX-512 BF16, so it runs in f32 here", dir.display());
            CleanMatmul::F32
        }
        _ => CleanMatmul::F32,
    }
}

/// Reload a run from `dir` (its `config.resolved.toml` and `checkpoint/`), nothing else needed.
pub fn load_run(dir: &Path, progress: bool) -> Result<LoadedRun> {
    load_run_on(dir, Reload::default(), progress)
}

/// What a reloaded run may run differently from how it trained.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reload<'a> {
    /// `cpu`, `cuda`, `cuda:N` instead of the run's own `model.device`.
    pub device: Option<&'a str>,
    /// The clean passes' precision instead of the one the run trained with.
    pub clean_matmul: Option<CleanMatmul>,
    /// The intervened pass's precision instead of the one the run trained with.
    pub intervened_matmul: Option<CleanMatmul>,
}

/// [`load_run`] with `reload`'s changes.
pub fn load_run_on(dir: &Path, reload: Reload, progress: bool) -> Result<LoadedRun> {
    let mut config = run_config(dir)?;
    if let Some(d) = reload.device {
        config.model.device = d.to_string();
    }
    config.model.clean_matmul = reload.clean_matmul.unwrap_or_else(|| trained_matmul(dir, &config.model, config.model.clean_matmul, false));
    config.model.intervened_matmul = reload.intervened_matmul.unwrap_or_else(|| trained_matmul(dir, &config.model, config.model.intervened_matmul, true));
    let lm = config.model.load(progress)?;
    let mut params = ParamStore::new();
    let mut interpreter = Interpreter::new(&mut params, &lm.model, &config.interpreter.config(lm.model.num_layers())?)?;
    interpreter.set_cache(config.train.state_cache()?);
    crate::train::checkpoint::load_latest(&dir.join("checkpoint"), &params, None, lm.model.device())?;
    // A trained mask (mask_select, boundless) is used at the temperature training ended at.
    interpreter.subspace.temperature = config.train.temperature_end;
    Ok(LoadedRun { config, lm, params, interpreter })
}

/// Score `ds` with a loaded run in `modes` (a baseline: its own mode), keeping each row's
/// selected positions.
pub fn evaluate(run: &LoadedRun, ds: &crate::data::io::Dataset, modes: &[InferenceMode], skip_bad_rows: bool, progress: bool) -> Result<Scored> {
    let cfg = &run.config;
    let modes = &modes_for(run.interpreter.method(), modes)?[..];
    let mut enc = encode_rows(&run.lm.tokenizer, &ds.rows, &cfg.data.collate_options(skip_bad_rows), &ds.source.display().to_string())?;
    if progress {
        tracing::info!("{}; {} encoded, {} skipped", ds.describe(), enc.rows.len(), enc.skipped.len());
    }
    if enc.rows.is_empty() {
        return Err(Error::file(&ds.source, "no rows to evaluate"));
    }
    // The run's own test set is scored as the run scored it (its data.max_test_rows); other
    // data in full. A run trained for some attributes (per-attribute MDAS) is scored on those.
    let own = std::path::absolute(&ds.source).ok().is_some_and(|p| p == Path::new(&cfg.data.test));
    let limit = if own { cfg.data.max_test_rows } else { 0 };
    if !cfg.data.attributes.is_empty() || limit > 0 {
        enc.rows = cfg.data.select_test(enc.rows, limit, &ds.source.display().to_string())?;
        if progress {
            tracing::info!(
                "scoring {} rows (the run's data.attributes = [{}], data.max_test_rows = {} on its own test set)",
                enc.rows.len(),
                cfg.data.attributes.join(", "),
                if own { cfg.data.max_test_rows.to_string() } else { "not applied".into() }
            );
        }
    }
    run.interpreter.register_prompts(&enc.rows);
    let scored = score_modes(&run.lm.model, &run.interpreter, &enc.rows, modes, cfg, run.lm.tokenizer.padding_id(), true)?;
    if progress {
        tracing::info!("{}", scored.table().trim_end());
    }
    Ok(scored)
}

/// Write `scored` as `{dir}/eval/{name}.{results.json,csv,by_attribute.*,positions.jsonl}`.
pub fn write_eval(dir: &Path, name: &str, scored: &Scored) -> Result<()> {
    let out = dir.join("eval");
    std::fs::create_dir_all(&out).map_err(|e| Error::file(&out, format!("cannot create: {e}")))?;
    write_results(&out, &format!("{name}."), scored)?;
    let mut positions = String::new();
    for p in &scored.selections {
        positions += &serde_json::to_string(&p).map_err(|e| Error::invalid(e.to_string()))?;
        positions.push('\n');
    }
    crate::atomic::write_text(&out.join(format!("{name}.positions.jsonl")), &positions)
}

/// The name a dataset's results go under in `eval/`: its file name without `.jsonl`.
pub fn eval_name(data: &Path) -> String {
    data.file_name().map(|n| n.to_string_lossy().trim_end_matches(".jsonl").to_string()).unwrap_or_else(|| "data".into())
}

/// The test set a run was trained with (its `data.test`), for commands that default to it. A
/// relative path is read from the current directory, as the run read it; when it is not there,
/// the error says so and how to name the data instead.
pub fn run_test_set(dir: &Path) -> Result<PathBuf> {
    let config = run_config(dir)?;
    let cfg_path = dir.join("config.resolved.toml");
    if config.data.test.is_empty() {
        return Err(Error::file(&cfg_path, "the run names no test set (data.test): pass --data"));
    }
    let p = PathBuf::from(&config.data.test);
    if !p.exists() {
        return Err(Error::file(&cfg_path, format!("the run's test set {} (data.test) is not found from this directory: pass --data", p.display())));
    }
    if !config.data.test_sha256.is_empty() {
        let now = crate::data::io::fingerprint(&p)?;
        if now != config.data.test_sha256 {
            tracing::warn!("{} has changed since the run was trained (sha256 {now}, the run recorded {}): the scores are not on the run's own test set", p.display(), config.data.test_sha256);
        }
    }
    Ok(p)
}

/// `data` when given, else the run's own test set ([`run_test_set`]).
pub fn data_or_test_set(dir: &Path, data: Option<&Path>) -> Result<PathBuf> {
    match data {
        Some(d) => Ok(d.to_path_buf()),
        None => run_test_set(dir),
    }
}

/// Evaluate a run on `data` with `modes`; writes `eval/<data name>.{results.json,csv,positions.jsonl}`
/// into the run directory and returns the scores.
pub fn eval_run(dir: &Path, data: &Path, modes: &[InferenceMode], skip_bad_rows: bool, progress: bool) -> Result<BTreeMap<String, ModeResult>> {
    eval_run_on(dir, Reload::default(), data, modes, skip_bad_rows, progress)
}

/// [`eval_run`] with the run loaded onto `device` (its own `model.device` when `None`).
pub fn eval_run_on(dir: &Path, reload: Reload, data: &Path, modes: &[InferenceMode], skip_bad_rows: bool, progress: bool) -> Result<BTreeMap<String, ModeResult>> {
    let run = load_run_on(dir, reload, progress)?;
    let ds = read_dataset(data, ReadOptions { skip_bad_rows })?;
    let scored = evaluate(&run, &ds, modes, skip_bad_rows, progress)?;
    write_eval(dir, &eval_name(data), &scored)?;
    Ok(scored.results)
}

/// The configuration of a `method` run: its preset, then `file`, then `user` (a table, e.g. a
/// notebook's dict), then `sets`. An `interpreter.method` naming another method is an error.
pub fn resolve_config(method: Method, file: Option<&Path>, user: Option<toml::Table>, sets: &[String]) -> Result<RunConfig> {
    let preset = RunConfig::preset(method);
    let mut cfg: RunConfig = match user {
        Some(table) => {
            let over_file: RunConfig = crate::config::load_over(&preset, file, &[])?;
            crate::config::load_table_over(&over_file, table, "the configuration given", sets)?
        }
        None => crate::config::load_over(&preset, file, sets)?,
    };
    let asked = cfg.interpreter.method;
    if asked != method {
        let other =
            if asked.is_baseline() { format!("`hyperdas baseline {}` (Python: hyperdas.baseline({:?}, ...))", asked.name(), asked.name()) } else { "`hyperdas train` (Python: hyperdas.train)".into() };
        return Err(Error::invalid(format!("interpreter.method = {:?} contradicts the command, which trains {}; drop the setting or use {other}", asked.name(), method.label())));
    }
    cfg.interpreter.method = method;
    Ok(cfg)
}

/// The knowledge base of `domain` (or the one in `kb_dir`); with a toy model (`toy`,
/// `toy:tiny`) and no `kb_dir`, the toy world's own.
pub fn knowledge_base(model: Option<&str>, domain: &str, kb_dir: Option<&Path>) -> Result<crate::data::KnowledgeBase> {
    let toy_kb = match (model, kb_dir) {
        (Some(m), None) if toy_config(m).is_some() => Some(PathBuf::from(model_spec(m, true)?).join("ravel")),
        _ => None,
    };
    match kb_dir.or(toy_kb.as_deref()) {
        Some(dir) => crate::data::KnowledgeBase::from_dir(dir, domain),
        None => crate::data::KnowledgeBase::builtin(domain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_run_uses_the_bf16_kernels_only_where_it_trained_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let write = |clean: &str| {
            let p = Provenance {
                version: "0".into(),
                commit: None,
                started: String::new(),
                finished: String::new(),
                resumed_from_step: 0,
                host: String::new(),
                cpu: String::new(),
                device: "cpu".into(),
                threads: 1,
                clean_matmul: Some(clean.into()),
                intervened_matmul: Some("f32".into()),
                command: vec![],
            };
            let info = RunInfo { method: "hyperdas".into(), layer: 0, num_layers: 2, rank: 1, subspace: "x".into(), model: "toy".into(), train_rows: 1, test_rows: 1, provenance: Some(p) };
            std::fs::write(dir.path().join("run.json"), serde_json::to_string(&info).unwrap()).unwrap();
        };
        let f32_cpu = ModelSection::default();
        let bf16_target = ModelSection { dtype: "bf16".into(), ..ModelSection::default() };
        let on_gpu = ModelSection { device: "cuda".into(), ..ModelSection::default() };
        // A bf16 target records its own dtype ("bf16"); that is no kernel choice (the CI failure
        // of 2026-12-05: its reload asked for the bf16 kernel on a bf16 target).
        write("bf16");
        assert_eq!(trained_matmul(dir.path(), &bf16_target, CleanMatmul::Auto, false), CleanMatmul::F32);
        assert_eq!(trained_matmul(dir.path(), &on_gpu, CleanMatmul::Auto, false), CleanMatmul::F32);
        let expect = if crate::model::kernels::bf16_matmul_available() { CleanMatmul::Bf16 } else { CleanMatmul::F32 };
        assert_eq!(trained_matmul(dir.path(), &f32_cpu, CleanMatmul::Auto, false), expect);
        assert_eq!(trained_matmul(dir.path(), &f32_cpu, CleanMatmul::Auto, true), CleanMatmul::F32);
        // An explicit choice wins; a run without provenance trained in f32.
        assert_eq!(trained_matmul(dir.path(), &bf16_target, CleanMatmul::Bf16, false), CleanMatmul::Bf16);
        write("f32");
        assert_eq!(trained_matmul(dir.path(), &f32_cpu, CleanMatmul::Auto, false), CleanMatmul::F32);
        std::fs::remove_file(dir.path().join("run.json")).unwrap();
        assert_eq!(trained_matmul(dir.path(), &f32_cpu, CleanMatmul::Auto, false), CleanMatmul::F32);
        // Whatever the reload picks for a bf16 target resolves without error.
        for m in [CleanMatmul::Auto, CleanMatmul::F32] {
            assert!(!m.resolve(candle_core::DType::BF16, &candle_core::Device::Cpu).unwrap());
        }
    }

    #[test]
    fn layer_is_a_number_or_middle() {
        let load = |v: &str| crate::config::load::<RunConfig>(None, &[format!("interpreter.layer={v}")]);
        assert_eq!(load("3").unwrap().interpreter.layer.resolve(30).unwrap(), 3);
        let middle = load("middle").unwrap().interpreter.layer;
        // ⌊(L − 1)/2⌋: the paper's 15 on Llama-3-8B (32 blocks), 14 on SmolLM2 (30), 0 on the 2-block toy.
        assert_eq!([32, 30, 2, 1].map(|l| middle.resolve(l).unwrap()), [15, 14, 0, 0]);
        assert_eq!(RunConfig::default().interpreter.layer, middle);
        // pyvene's convention (the reference MDAS): block_output of l is our l + 1.
        let pyvene = crate::config::load::<RunConfig>(None, &["interpreter.layer=15".into(), "interpreter.layer_convention=block_output".into()]).unwrap();
        assert_eq!(pyvene.interpreter.resolved_layer(30).unwrap(), 16);
        let bad = crate::config::load::<RunConfig>(None, &["interpreter.layer_convention=pyvene".into()]).unwrap_err().to_string();
        assert!(bad.contains("layer_convention") && bad.contains("block_output"), "{bad}");
        // The site vocabulary: the same layer three ways; it replaces `layer`.
        for s in ["blocks.15.hook_resid_pre", "block_output.14", "hidden_states.15", "blocks.14.hook_resid_post"] {
            let c = crate::config::load::<RunConfig>(None, &["interpreter.layer=3".into(), format!("interpreter.site={s}")]).unwrap();
            assert_eq!(c.interpreter.resolved_layer(30).unwrap(), 15, "{s}");
        }
        let final_norm = crate::config::load::<RunConfig>(None, &["interpreter.site=ln_final.hook_normalized".into()]).unwrap();
        assert!(final_norm.interpreter.resolved_layer(30).is_err());
        let typo = crate::config::load::<RunConfig>(None, &["interpreter.site=blocks.3.resid".into()]).unwrap();
        assert!(typo.interpreter.resolved_layer(30).unwrap_err().to_string().contains("interpreter.site"));
        let err = load("top").unwrap().interpreter.layer.resolve(30).unwrap_err().to_string();
        assert!(err.contains("interpreter.layer") && err.contains("middle"), "{err}");
    }
}
