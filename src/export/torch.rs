//! Writing a PyTorch `state_dict` file (`torch.save`'s zip format) without PyTorch.
//!
//! The file is a zip archive (entries stored, aligned to 64 bytes as torch writes them) under
//! one top directory `{name}/`: `data.pkl` (a protocol-2 pickle of an `OrderedDict` whose values
//! are `torch._utils._rebuild_tensor_v2(persistent_load(("storage", torch.FloatStorage, key,
//! "cpu", numel)), 0, size, stride, False, OrderedDict())`), one `data/{key}` of raw
//! little-endian bytes per tensor, `version` ("3") and `byteorder` ("little"). Written by hand:
//! no maintained crate writes this format, and a pickle of plain tensors needs a dozen opcodes.
//! `torch.load` and candle's pickle reader both read it (tests/export.rs reads it back).

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// A tensor to save: f32 or i64 values, row-major (contiguous) `shape`.
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One entry of a state dict.
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Values,
}

impl Entry {
    pub fn f32(name: &str, shape: &[usize], values: Vec<f32>) -> Entry {
        Entry { name: name.into(), shape: shape.to_vec(), values: Values::F32(values) }
    }
    pub fn i64_scalar(name: &str, v: i64) -> Entry {
        Entry { name: name.into(), shape: Vec::new(), values: Values::I64(vec![v]) }
    }
    fn numel(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.len(),
            Values::I64(v) => v.len(),
        }
    }
}

/// A protocol-2 pickle, built opcode by opcode.
struct Pickle(Vec<u8>);

impl Pickle {
    fn str(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        match v {
            0..=0xff => self.0.extend_from_slice(&[b'K', v as u8]), // BININT1
            0x100..=0xffff => {
                self.0.push(b'M'); // BININT2
                self.0.extend_from_slice(&(v as u16).to_le_bytes());
            }
            _ => {
                self.0.push(b'J'); // BININT
                self.0.extend_from_slice(&(v as i32).to_le_bytes());
            }
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c'); // GLOBAL
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn tuple(&mut self, items: &[usize]) {
        self.0.push(b'('); // MARK
        items.iter().for_each(|&i| self.int(i));
        self.0.push(b't'); // TUPLE
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R"); // EMPTY_TUPLE, REDUCE
    }
}

/// The pickle of `entries` (storages keyed by their index).
fn pickle(entries: &[Entry]) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.ordered_dict();
    p.0.push(b'('); // MARK
    for (i, e) in entries.iter().enumerate() {
        p.str(&e.name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'('); // MARK: the arguments
        p.0.push(b'('); // MARK: the persistent id
        p.str("storage");
        p.global("torch", if matches!(e.values, Values::F32(_)) { "FloatStorage" } else { "LongStorage" });
        p.str(&i.to_string());
        p.str("cpu");
        p.int(e.numel());
        p.0.extend_from_slice(b"tQ"); // TUPLE, BINPERSID
        p.int(0); // storage offset
        p.tuple(&e.shape);
        let mut stride = vec![1usize; e.shape.len()];
        for d in (0..e.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * e.shape[d + 1];
        }
        p.tuple(&stride);
        p.0.push(0x89); // NEWFALSE: requires_grad
        p.ordered_dict(); // backward hooks
        p.0.extend_from_slice(b"tR"); // TUPLE, REDUCE
    }
    p.0.extend_from_slice(b"u."); // SETITEMS, STOP
    p.0
}

/// Write `entries` to `path` as `torch.save(state_dict)` would; `name` is the archive's top
/// directory (torch uses the file's stem).
pub fn save(path: &Path, name: &str, entries: &[Entry]) -> Result<()> {
    for e in entries {
        if e.shape.iter().product::<usize>() != e.numel() {
            return Err(Error::invalid(format!("state dict entry `{}`: shape {:?} does not hold {} values", e.name, e.shape, e.numel())));
        }
    }
    let err = |e: &dyn std::fmt::Display| Error::file(path, format!("cannot write: {e}"));
    crate::atomic::write_file(path, |w| {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).with_alignment(64);
            let mut put = |file: &str, bytes: &[u8]| -> Result<()> {
                z.start_file(format!("{name}/{file}"), opts).map_err(|e| err(&e))?;
                z.write_all(bytes).map_err(|e| err(&e))
            };
            put("data.pkl", &pickle(entries))?;
            put("byteorder", b"little")?;
            for (i, e) in entries.iter().enumerate() {
                let bytes: Vec<u8> = match &e.values {
                    Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    Values::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                };
                put(&format!("data/{i}"), &bytes)?;
            }
            put("version", b"3\n")?;
            z.finish().map_err(|e| err(&e))?;
        }
        w.write_all(buf.get_ref()).map_err(|e| err(&e))
    })
}
