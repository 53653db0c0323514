//! Where weights come from: an HF safetensors checkpoint (one file, or shards with
//! `model.safetensors.index.json`) or a GGUF file. Both are addressed by HF tensor names;
//! every lookup checks the shape and names the file and tensor when something is wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::Architecture;
use super::gguf::{self, GgufFile};
use crate::error::{Error, Result};

/// A set of named weights.
pub enum Weights {
    Safetensors(SafetensorsWeights),
    Gguf(GgufWeights),
    /// In-memory tensors by HF name, e.g. the `Var`s of a model being trained: a model built
    /// from them shares their storage, so optimizer updates are seen by the model and
    /// gradients reach the variables.
    Tensors(HashMap<String, Tensor>),
    /// Random weights of whatever shape is asked for (synthetic models).
    Random(RandomWeights),
}

/// Seeded random weights for a synthetic model: every matrix N(0, 0.02) from a generator derived
/// from the seed and the tensor's name (the same name always gives the same values), norm scales
/// at one (Gemma's `1 + w` spelling: w = 0), biases at zero.
pub struct RandomWeights {
    seed: u64,
    gemma_norms: bool,
}

impl RandomWeights {
    pub fn new(seed: u64, gemma_norms: bool) -> Self {
        RandomWeights { seed, gemma_norms }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<(Tensor, PathBuf)> {
        let path = PathBuf::from("<synthetic weights>");
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with("norm.weight") || name.contains(".ln_") {
            vec![if self.gemma_norms { 0.0 } else { 1.0 }; n]
        } else {
            let mut rng = crate::rng::Rng::derive(self.seed, name);
            (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| Error::tensor(&path, name, e.to_string()))?;
        Ok((t, path))
    }
}

impl Weights {
    /// Load `name`, check it has `shape`, convert to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (t, path) = match self {
            Weights::Safetensors(w) => w.get(name, shape)?,
            Weights::Gguf(w) => w.get(name, shape)?,
            Weights::Random(w) => w.get(name, shape)?,
            Weights::Tensors(m) => {
                let path = PathBuf::from("<in-memory weights>");
                let t = m.get(name).ok_or_else(|| Error::tensor(&path, name, "missing"))?;
                if t.dims() != shape {
                    return Err(Error::tensor(&path, name, format!("has shape {:?}, expected {shape:?}", t.dims())));
                }
                (t.clone(), path)
            }
        };
        let t = t.to_dtype(dtype).and_then(|t| t.to_device(device)).map_err(|e| Error::tensor(path, name, e.to_string()))?;
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors(w) => w.routing.contains_key(w.stored(name)),
            Weights::Gguf(w) => gguf::gguf_name_for(name, w.arch).is_some_and(|g| w.file.tensors.contains_key(&g)),
            Weights::Tensors(m) => m.contains_key(name),
            Weights::Random(_) => true,
        }
    }

    /// The file a tensor would be read from (for messages).
    pub fn path_of(&self, name: &str) -> PathBuf {
        match self {
            Weights::Safetensors(w) => w.routing.get(w.stored(name)).map(|&i| w.files[i].0.clone()).unwrap_or_else(|| w.describe_path.clone()),
            Weights::Gguf(w) => w.file.path.clone(),
            Weights::Tensors(_) => PathBuf::from("<in-memory weights>"),
            Weights::Random(_) => PathBuf::from("<synthetic weights>"),
        }
    }

    /// How many tensors the source holds.
    pub fn len(&self) -> usize {
        match self {
            Weights::Safetensors(w) => w.routing.len(),
            Weights::Gguf(w) => w.file.tensors.len(),
            Weights::Tensors(m) => m.len(),
            Weights::Random(_) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// HF safetensors weights, memory-mapped.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Stored tensor name → file.
    routing: HashMap<String, usize>,
    /// HF text-decoder name → stored name, for checkpoints that nest the decoder (a multimodal
    /// Gemma 3 stores `language_model.model.layers.0...` or `model.language_model.layers.0...`
    /// for our `model.layers.0...`).
    aliases: HashMap<String, String>,
    describe_path: PathBuf,
}

impl SafetensorsWeights {
    /// Open the checkpoint in an HF model directory: `model.safetensors.index.json` with its
    /// shards, or `model.safetensors`, or (failing both) the single `*.safetensors` file present.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(std::slice::from_ref(&single), &single);
        }
        let mut found: Vec<PathBuf> =
            std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
        found.sort();
        match found.len() {
            0 => Err(Error::file(dir, "no model.safetensors, no model.safetensors.index.json and no other *.safetensors file")),
            1 => Self::open_files(&found, &found[0]),
            n => Err(Error::file(dir, format!("{n} *.safetensors files but no model.safetensors.index.json saying which tensor is where"))),
        }
    }

    /// Open shards listed in a `model.safetensors.index.json`.
    pub fn open_index(index: &Path) -> Result<Self> {
        let dir = index.parent().unwrap_or(Path::new("."));
        let v = crate::error::read_json(index)?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::key(index, "weight_map", "missing or not an object"))?;
        let mut shard_names: BTreeMap<String, usize> = BTreeMap::new();
        let mut wanted: Vec<(String, String)> = Vec::with_capacity(map.len());
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::key(index, format!("weight_map.{tensor}"), "expected a file name"))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(Error::key(index, format!("weight_map.{tensor}"), format!("`{file}` is not a plain file name")));
            }
            let n = shard_names.len();
            shard_names.entry(file.to_string()).or_insert(n);
            wanted.push((tensor.clone(), file.to_string()));
        }
        let mut paths = vec![PathBuf::new(); shard_names.len()];
        for (name, &i) in &shard_names {
            let p = dir.join(name);
            if !p.is_file() {
                return Err(Error::key(index, "weight_map", format!("shard `{name}` is listed but {} does not exist", p.display())));
            }
            paths[i] = p;
        }
        let mut w = Self::open_files(&paths, index)?;
        // The index is authoritative: every tensor it lists must be in the shard it names.
        for (tensor, file) in wanted {
            let i = shard_names[&file];
            match w.routing.get(&tensor) {
                Some(&j) if j == i => {}
                _ => return Err(Error::tensor(&paths[i], &tensor, format!("listed in {} but not present in this shard", index.display()))),
            }
        }
        w.describe_path = index.to_path_buf();
        Ok(w)
    }

    fn open_files(paths: &[PathBuf], describe: &Path) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            // SAFETY: the file is memory-mapped read-only; modifying it while hyperdas runs is
            // undefined behaviour, as for every mmap-based loader (safetensors, candle, torch).
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| Error::file(p, format!("not a valid safetensors file: {}", root_message(&e))))?;
            for (name, _) in st.tensors() {
                if let Some(&prev) = routing.get(&name) {
                    let prev_path: &PathBuf = &paths[prev];
                    return Err(Error::tensor(p, &name, format!("also present in {}", prev_path.display())));
                }
                routing.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        let mut w = SafetensorsWeights { files, routing, aliases: HashMap::new(), describe_path: describe.to_path_buf() };
        w.alias_nested_text_decoder();
        Ok(w)
    }

    /// When the checkpoint nests a text decoder (a multimodal model), address its tensors by the
    /// plain decoder's names; the other parts (a vision tower, a projector) stay unused.
    fn alias_nested_text_decoder(&mut self) {
        if self.routing.contains_key("model.embed_tokens.weight") {
            return;
        }
        // GPT-2 checkpoints saved from GPT2Model (the hub's `gpt2` itself) lack GPT2LMHeadModel's
        // `transformer.` prefix.
        if self.routing.contains_key("wte.weight") && !self.routing.contains_key("transformer.wte.weight") {
            for stored in self.routing.keys() {
                self.aliases.insert(format!("transformer.{stored}"), stored.clone());
            }
            return;
        }
        const NESTED: [(&str, &str); 4] = [("language_model.model.", "model."), ("model.language_model.", "model."), ("language_model.lm_head.", "lm_head."), ("model.lm_head.", "lm_head.")];
        for stored in self.routing.keys() {
            for (from, to) in NESTED {
                if let Some(rest) = stored.strip_prefix(from) {
                    self.aliases.insert(format!("{to}{rest}"), stored.clone());
                }
            }
        }
    }

    /// The stored name of the HF tensor `name`.
    fn stored<'a>(&'a self, name: &'a str) -> &'a str {
        self.aliases.get(name).map_or(name, String::as_str)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<(Tensor, PathBuf)> {
        let name = self.stored(name);
        let &i = self.routing.get(name).ok_or_else(|| Error::tensor(&self.describe_path, name, "missing"))?;
        let (path, st) = &self.files[i];
        let view = st.get(name).map_err(|e| Error::tensor(path, name, e.to_string()))?;
        if view.shape() != shape {
            return Err(Error::tensor(path, name, format!("expected shape {shape:?}, found {:?}", view.shape())));
        }
        use safetensors::Dtype as S;
        if !matches!(view.dtype(), S::F32 | S::F16 | S::BF16 | S::F64) {
            return Err(Error::tensor(path, name, format!("dtype {:?} is not supported for weights (use F32, F16, BF16 or F64)", view.dtype())));
        }
        let t = st.load(name, &Device::Cpu).map_err(|e| Error::tensor(path, name, e.to_string()))?;
        Ok((t, path.clone()))
    }
}

/// Weights from a GGUF file, dequantized to f32 on demand and renamed to HF names, with HF
/// values and layouts, undoing what llama.cpp's converter did:
///
/// * `llama`: q/k rows permuted to interleaved pairs → back to HF's rotate-half layout;
/// * `gemma2`, `gemma3`: the +1 baked into every RMSNorm weight → taken out again;
/// * `gpt2`: Conv1D weights transposed to `[out, in]` → back to HF's `[in, out]`;
/// * `gptneox`: the fused q/k/v rows regrouped as `[q; k; v]` → back to HF's per-head `[q_h; k_h; v_h]`.
pub struct GgufWeights {
    pub file: GgufFile,
    arch: Architecture,
    /// (n_heads, n_kv_heads).
    heads: (usize, usize),
}

impl GgufWeights {
    pub fn new(file: GgufFile, arch: Architecture, heads: (usize, usize)) -> Self {
        GgufWeights { file, arch, heads }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<(Tensor, PathBuf)> {
        let g = gguf::gguf_name_for(name, self.arch).ok_or_else(|| Error::tensor(&self.file.path, name, "has no GGUF equivalent"))?;
        let found = self.file.shape(&g).map_err(|_| Error::tensor(&self.file.path, &g, format!("missing (needed for HF tensor `{name}`)")))?;
        let conv1d = self.arch == Architecture::Gpt2 && found.len() == 2 && [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"].iter().any(|s| name.ends_with(s));
        let expect: Vec<usize> = if conv1d { shape.iter().rev().copied().collect() } else { shape.to_vec() };
        if found != expect {
            return Err(Error::tensor(&self.file.path, &g, format!("expected shape {expect:?}, found {found:?}")));
        }
        let at = |e: candle_core::Error| Error::tensor(&self.file.path, &g, e.to_string());
        let mut t = self.file.dequantize(&g)?;
        let (heads, kv_heads) = self.heads;
        match self.arch {
            Architecture::Gemma2 | Architecture::Gemma3 if g.ends_with("norm.weight") => t = t.affine(1.0, -1.0).map_err(at)?,
            Architecture::Llama if g.contains(".attn_q.") => t = gguf::unpermute_rows(&t, heads)?,
            Architecture::Llama if g.contains(".attn_k.") => t = gguf::unpermute_rows(&t, kv_heads)?,
            Architecture::Gpt2 if conv1d => t = t.t().and_then(|t| t.contiguous()).map_err(at)?,
            Architecture::GptNeox if g.contains(".attn_qkv.") => {
                // [3, H, hd, ..] → [H, 3, hd, ..]
                let dims = t.dims().to_vec();
                let hd = dims[0] / 3 / heads.max(1);
                let cols: Vec<usize> = dims[1..].to_vec();
                let mut grouped = vec![3, heads, hd];
                grouped.extend(&cols);
                t = t.reshape(grouped).and_then(|x| x.transpose(0, 1)).and_then(|x| x.contiguous()).and_then(|x| x.reshape(dims.clone())).map_err(at)?;
            }
            _ => {}
        }
        Ok((t, self.file.path.clone()))
    }
}

/// The innermost message of a candle error (drops "with backtrace" wrappers).
pub(crate) fn root_message(e: &candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").to_string()
}
