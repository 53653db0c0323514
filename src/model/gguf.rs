//! GGUF files: a bounded header reader, dequantization to f32, and the mapping from llama.cpp
//! tensor names to HF names.
//!
//! The header reader is our own (rather than candle's `gguf_file::Content`) so that every error
//! names the metadata key or tensor at fault, a tensor of an unsupported type only fails when it
//! is actually needed, and no length field in the header can make us allocate more than the
//! file holds. Dequantization uses candle's kernels (`qtensor_from_ggml` + `dequantize`).
//!
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::config::Architecture;
use crate::error::{Error, Result};

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const MAX_STRING: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 3;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer type as u64 (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|u| u as f64),
        }
    }
}

/// A tensor's entry in the header. `ggml_type` is the raw type id: unsupported types are kept
/// so that a file is readable as long as the tensors we need are supported.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Shape in PyTorch order (outermost first), the reverse of GGUF's `ne`.
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Offset from the start of the tensor data section.
    pub offset: u64,
}

/// A parsed GGUF header. Tensor data is read on demand with [`GgufFile::dequantize`].
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    data_offset: u64,
    file_size: u64,
}

/// Name of a GGML type id, for messages.
pub fn ggml_type_name(t: u32) -> String {
    let n = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("type id {t}"),
    };
    n.to_string()
}

/// The GGML types we can dequantize (candle's CPU kernels).
pub fn supported_ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

struct HeaderReader<R> {
    r: R,
    pos: u64,
    size: u64,
    path: PathBuf,
    v1: bool,
}

impl<R: Read> HeaderReader<R> {
    fn truncated(&self, what: &str) -> Error {
        Error::file(&self.path, format!("GGUF header truncated while reading {what} at byte {} (file has {} bytes)", self.pos, self.size))
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| self.truncated(what))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// A length prefix: u32 in GGUF v1, u64 later.
    fn len(&mut self, what: &str) -> Result<u64> {
        if self.v1 { Ok(self.u32(what)? as u64) } else { self.u64(what) }
    }

    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        if n > MAX_STRING || n > self.remaining() {
            return Err(Error::file(&self.path, format!("GGUF {what}: string length {n} exceeds the {} bytes left in the file (truncated or corrupt)", self.remaining())));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|_| self.truncated(what))?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| Error::file(&self.path, format!("GGUF {what}: string is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        let what = format!("value of `{key}`");
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>(&what)?[0]),
            1 => Value::I8(self.bytes::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes::<2>(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes::<2>(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(self.u32(&what)? as i32),
            6 => Value::F32(f32::from_le_bytes(self.bytes::<4>(&what)?)),
            7 => match self.bytes::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Error::key(&self.path, key, format!("boolean byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(Error::key(&self.path, key, "arrays nested too deeply"));
                }
                let elem_ty = self.u32(&what)?;
                let n = self.len(&what)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if self.v1 {
                            4
                        } else {
                            8
                        }
                    }
                    9 => {
                        if self.v1 {
                            8
                        } else {
                            12
                        }
                    }
                    t => return Err(Error::key(&self.path, key, format!("unknown array element type {t}"))),
                };
                if n.saturating_mul(min_size) > self.remaining() {
                    return Err(Error::key(&self.path, key, format!("array of {n} elements cannot fit in the {} bytes left in the file (truncated or corrupt)", self.remaining())));
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(self.u64(&what)? as i64),
            12 => Value::F64(f64::from_le_bytes(self.bytes::<8>(&what)?)),
            t => return Err(Error::key(&self.path, key, format!("unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Read and validate the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut h = HeaderReader { r: BufReader::with_capacity(1 << 16, file), pos: 0, size, path: path.to_path_buf(), v1: false };
        let magic = h.u32("magic")?;
        if magic != MAGIC {
            return Err(Error::file(path, format!("not a GGUF file (magic {magic:#010x}, expected \"GGUF\")")));
        }
        let version = h.u32("version")?;
        if !(1..=3).contains(&version) {
            return Err(Error::file(path, format!("unsupported GGUF version {version} (supported: 1, 2, 3)")));
        }
        h.v1 = version == 1;
        let n_tensors = h.len("tensor count")?;
        let n_kv = h.len("metadata count")?;
        // Each entry takes at least 8+4+1 (metadata) or 8+4+8+4 (tensor info) bytes.
        if n_kv.saturating_mul(13).saturating_add(n_tensors.saturating_mul(24)) > h.remaining() {
            return Err(Error::file(path, format!("GGUF header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold (truncated or corrupt)")));
        }
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = h.string(&format!("metadata key #{i}"))?;
            let ty = h.u32(&format!("type of `{key}`"))?;
            let value = h.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for i in 0..n_tensors {
            let name = h.string(&format!("tensor name #{i}"))?;
            let n_dims = h.u32(&format!("dimension count of `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::tensor(path, &name, format!("{n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            let mut elems: u64 = 1;
            for _ in 0..n_dims {
                let d = h.len(&format!("shape of `{name}`"))?;
                elems = elems.checked_mul(d).filter(|&e| e <= 1 << 40).ok_or_else(|| Error::tensor(path, &name, "element count overflows"))?;
                ne.push(d as usize);
            }
            let ggml_type = h.u32(&format!("type of `{name}`"))?;
            let offset = h.u64(&format!("offset of `{name}`"))?;
            ne.reverse();
            if tensors.insert(name.clone(), TensorInfo { shape: ne, ggml_type, offset }).is_some() {
                return Err(Error::tensor(path, &name, "appears twice in the header"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(Error::key(path, "general.alignment", format!("{v:?} is not a power of two"))),
            },
        };
        let data_offset = h.pos.div_ceil(alignment) * alignment;
        let file = GgufFile { path: path.to_path_buf(), version, metadata, tensors, data_offset, file_size: size };
        // Check every supported tensor lies inside the file, so truncation is reported up front.
        for (name, info) in &file.tensors {
            if let Some(dtype) = supported_ggml_type(info.ggml_type) {
                let (start, len) = file.byte_range(name, info, dtype)?;
                if start.saturating_add(len) > size {
                    return Err(Error::tensor(path, name, format!("data at bytes {start}..{} lies past the end of the file ({size} bytes): the file is truncated", start.saturating_add(len))));
                }
            }
        }
        Ok(file)
    }

    fn byte_range(&self, name: &str, info: &TensorInfo, dtype: GgmlDType) -> Result<(u64, u64)> {
        let elems: usize = info.shape.iter().product();
        let block = dtype.block_size();
        let inner = info.shape.last().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(Error::tensor(&self.path, name, format!("row length {inner} is not a multiple of the {} block size {block}", ggml_type_name(info.ggml_type))));
        }
        let len = (elems / block) as u64 * dtype.type_size() as u64;
        Ok((self.data_offset.saturating_add(info.offset), len))
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| Error::key(&self.path, key, "missing from the GGUF metadata"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(Error::key(&self.path, key, format!("expected a string, found {}", v.type_name()))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        if self.metadata.contains_key(key) { self.get_str(key).map(Some) } else { Ok(None) }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| Error::key(&self.path, key, format!("expected a non-negative integer, found {v:?}"))),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::key(&self.path, key, format!("expected a number, found {v:?}"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::key(&self.path, key, format!("expected a bool, found {}", v.type_name()))),
        }
    }

    /// A string array (tokens, merges).
    pub fn str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.get(key)? {
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(Error::key(&self.path, format!("{key}[{i}]"), format!("expected a string, found {}", v.type_name()))),
                })
                .collect(),
            v => Err(Error::key(&self.path, key, format!("expected an array, found {}", v.type_name()))),
        }
    }

    /// A numeric array (scores, token types) as f64.
    pub fn num_array(&self, key: &str) -> Result<Vec<f64>> {
        match self.get(key)? {
            Value::Array(a) => {
                a.iter().enumerate().map(|(i, v)| v.as_f64().ok_or_else(|| Error::key(&self.path, format!("{key}[{i}]"), format!("expected a number, found {}", v.type_name())))).collect()
            }
            v => Err(Error::key(&self.path, key, format!("expected an array, found {}", v.type_name()))),
        }
    }

    /// Shape of a tensor, or an error naming it.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice()).ok_or_else(|| Error::tensor(&self.path, name, "missing from the GGUF file"))
    }

    /// Read one tensor and dequantize it to f32 on the CPU (shape in PyTorch order).
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::tensor(&self.path, name, "missing from the GGUF file"))?;
        let dtype =
            supported_ggml_type(info.ggml_type).ok_or_else(|| Error::tensor(&self.path, name, format!("type {} is not supported (supported: {SUPPORTED_TYPES})", ggml_type_name(info.ggml_type))))?;
        let (start, len) = self.byte_range(name, info, dtype)?;
        if start.saturating_add(len) > self.file_size {
            return Err(Error::tensor(&self.path, name, "data lies past the end of the file: the file is truncated"));
        }
        if info.shape.contains(&0) {
            return Ok(Tensor::zeros(info.shape.clone(), candle_core::DType::F32, &Device::Cpu)?);
        }
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start(start)).map_err(|e| Error::io(&self.path, e))?;
        // candle reinterprets the bytes as blocks (`slice::from_raw_parts`), which must be aligned
        // for them: read into 8-byte-aligned storage, never a plain byte vector (found by the
        // `gguf` fuzz target).
        let len = len as usize;
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: `words` owns at least `len` initialised bytes; u8 has no alignment needs.
        let raw: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) };
        f.read_exact(raw).map_err(|e| Error::io(&self.path, e))?;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, raw, info.shape.clone(), &Device::Cpu)
            .map_err(|e| Error::tensor(&self.path, name, format!("cannot decode {} data: {e}", ggml_type_name(info.ggml_type))))?;
        let t = q.dequantize(&Device::Cpu)?;
        Ok(t)
    }
}

/// llama.cpp's name for an HF Llama tensor name, if it has one.
pub fn gguf_name(hf: &str) -> Option<String> {
    gguf_name_for(hf, Architecture::Llama)
}

/// llama.cpp's name for the HF tensor name of an `arch` model, as our loaders spell it.
///
/// Gemma 2 / 3: `post_attention_layernorm` is the attention-output norm (`post_attention_norm`),
/// the pre-MLP norm is `pre_feedforward_layernorm` (`ffn_norm`); OLMo 2 has only the output
/// norms. Phi 3 keeps its fused `attn_qkv` and `ffn_up` (= gate and up). GPT-2 and GPT-NeoX have
/// names of their own (their fused q/k/v is `attn_qkv`, their MLP `ffn_up` / `ffn_down`).
pub fn gguf_name_for(hf: &str, arch: Architecture) -> Option<String> {
    let top = match arch {
        Architecture::Gpt2 => match hf {
            "transformer.wte.weight" => Some("token_embd.weight"),
            "transformer.wpe.weight" => Some("position_embd.weight"),
            "transformer.ln_f.weight" => Some("output_norm.weight"),
            "transformer.ln_f.bias" => Some("output_norm.bias"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        },
        Architecture::GptNeox => match hf {
            "gpt_neox.embed_in.weight" => Some("token_embd.weight"),
            "gpt_neox.final_layer_norm.weight" => Some("output_norm.weight"),
            "gpt_neox.final_layer_norm.bias" => Some("output_norm.bias"),
            "embed_out.weight" => Some("output.weight"),
            _ => None,
        },
        _ => match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        },
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let blocks = match arch {
        Architecture::Gpt2 => "transformer.h.",
        Architecture::GptNeox => "gpt_neox.layers.",
        _ => "model.layers.",
    };
    let rest = hf.strip_prefix(blocks)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gemma = matches!(arch, Architecture::Gemma2 | Architecture::Gemma3);
    let m = match (arch, module) {
        (Architecture::Gpt2, "ln_1") | (Architecture::GptNeox, "input_layernorm") => "attn_norm",
        (Architecture::Gpt2, "attn.c_attn") | (Architecture::GptNeox, "attention.query_key_value") => "attn_qkv",
        (Architecture::Gpt2, "attn.c_proj") | (Architecture::GptNeox, "attention.dense") => "attn_output",
        (Architecture::Gpt2, "ln_2") | (Architecture::GptNeox, "post_attention_layernorm") => "ffn_norm",
        (Architecture::Gpt2, "mlp.c_fc") | (Architecture::GptNeox, "mlp.dense_h_to_4h") => "ffn_up",
        (Architecture::Gpt2, "mlp.c_proj") | (Architecture::GptNeox, "mlp.dense_4h_to_h") => "ffn_down",
        (Architecture::Gpt2 | Architecture::GptNeox, _) => return None,
        (Architecture::Phi3, "self_attn.qkv_proj") => "attn_qkv",
        (Architecture::Phi3, "mlp.gate_up_proj") => "ffn_up",
        (Architecture::Olmo2, "post_attention_layernorm") => "post_attention_norm",
        (Architecture::Olmo2, "post_feedforward_layernorm") => "post_ffw_norm",
        (_, "post_attention_layernorm") if gemma => "post_attention_norm",
        (_, "pre_feedforward_layernorm") if gemma => "ffn_norm",
        (_, "post_feedforward_layernorm") if gemma => "post_ffw_norm",
        (_, "self_attn.q_norm") => "attn_q_norm",
        (_, "self_attn.k_norm") => "attn_k_norm",
        (_, "input_layernorm") => "attn_norm",
        (_, "post_attention_layernorm") => "ffn_norm",
        (_, "self_attn.q_proj") => "attn_q",
        (_, "self_attn.k_proj") => "attn_k",
        (_, "self_attn.v_proj") => "attn_v",
        (_, "self_attn.o_proj") => "attn_output",
        (_, "mlp.gate_proj") => "ffn_gate",
        (_, "mlp.up_proj") => "ffn_up",
        (_, "mlp.down_proj") => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{m}.{kind}"))
}

/// Undo llama.cpp's q/k row permutation (HF rotate-half → interleaved pairs) for `n_head` heads.
/// Weights `[rows, cols]` and biases `[rows]` both work.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if !rows.is_multiple_of(2 * n_head) {
        return Err(Error::invalid(format!("cannot unpermute {rows} rows over {n_head} heads")));
    }
    let half = rows / n_head / 2;
    let out = if dims.len() == 2 {
        t.reshape((n_head, half, 2, dims[1]))?.transpose(1, 2)?.contiguous()?.reshape((rows, dims[1]))?
    } else {
        t.reshape((n_head, half, 2))?.transpose(1, 2)?.contiguous()?.reshape(rows)?
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_names() {
        let g = Architecture::Gemma3;
        assert_eq!(gguf_name_for("model.layers.3.post_attention_layernorm.weight", g).as_deref(), Some("blk.3.post_attention_norm.weight"));
        assert_eq!(gguf_name_for("model.layers.3.pre_feedforward_layernorm.weight", g).as_deref(), Some("blk.3.ffn_norm.weight"));
        assert_eq!(gguf_name_for("model.layers.0.self_attn.k_norm.weight", g).as_deref(), Some("blk.0.attn_k_norm.weight"));
        assert_eq!(gguf_name_for("model.layers.0.mlp.up_proj.weight", g).as_deref(), Some("blk.0.ffn_up.weight"));
        assert_eq!(gguf_name_for("model.layers.1.post_feedforward_layernorm.weight", Architecture::Olmo2).as_deref(), Some("blk.1.post_ffw_norm.weight"));
        assert_eq!(gguf_name_for("transformer.h.2.attn.c_attn.bias", Architecture::Gpt2).as_deref(), Some("blk.2.attn_qkv.bias"));
        assert_eq!(gguf_name_for("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", Architecture::GptNeox).as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name_for("model.layers.0.mlp.gate_up_proj.weight", Architecture::Phi3).as_deref(), Some("blk.0.ffn_up.weight"));
        assert_eq!(gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(), Some("blk.3.ffn_norm.weight"));
        assert_eq!(gguf_name("model.layers.3.pre_feedforward_layernorm.weight"), None);
    }

    #[test]
    fn names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.bias").as_deref(), Some("blk.12.attn_k.bias"));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, rows, cols) = (3, 12, 5);
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
        let permuted = w.reshape((n_head, 2, rows / n_head / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?;
        let back = unpermute_rows(&permuted, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
