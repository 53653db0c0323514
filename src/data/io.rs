//! Reading and writing datasets of [`RavelRow`]s.
//!
//! Two formats:
//! * JSONL: one JSON object per line with the 13 columns ([`COLUMNS`]); extra keys are allowed
//!   and counted.
//! * The HF `datasets` `save_to_disk` directory the reference ships: `state.json` (lists the
//!   data files), `dataset_info.json` (features), and `data-XXXXX-of-NNNNN.arrow` files in the
//!   Arrow IPC *stream* format (the file format is accepted too). Read and written natively.
//!
//! A malformed row (missing column, entity not at the end of its prefix, empty label, ...) is
//! an error naming the file and the row, unless the caller asks to skip bad rows; skipped rows
//! are always counted and reported, never dropped silently.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use arrow_schema::{DataType, Field, Schema};

use super::row::{COLUMNS, RavelRow};
use crate::error::{Error, Result};

/// How to treat malformed rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Skip (and count) malformed rows instead of failing on the first one.
    pub skip_bad_rows: bool,
}

/// A loaded dataset and what was skipped on the way.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub rows: Vec<RavelRow>,
    /// Where the rows came from.
    pub source: PathBuf,
    /// `(row number, 1-based, as in the error messages; reason)` of every skipped row.
    pub skipped: Vec<(usize, String)>,
    /// Keys present in the input beyond the 13 columns (kept out of the rows).
    pub extra_columns: Vec<String>,
}

impl Dataset {
    /// One line: `N rows (C causal, I isolate)`, plus skipped rows if any.
    pub fn describe(&self) -> String {
        let causal = self.rows.iter().filter(|r| r.is_causal()).count();
        let mut s = format!("{} rows ({} causal, {} isolate) from {}", self.rows.len(), causal, self.rows.len() - causal, self.source.display());
        if !self.skipped.is_empty() {
            s += &format!("; skipped {} malformed rows (first: row {}: {})", self.skipped.len(), self.skipped[0].0, self.skipped[0].1);
        }
        s
    }
}

/// Read a dataset: a `.jsonl` file or a `save_to_disk` directory (or a single `.arrow` file).
/// sha256 (hex) of a dataset: of the file, or for a save_to_disk directory of its files, each
/// hashed by relative name and content in name order. A run records it to tell later whether
/// it is being evaluated on the same data.
pub fn fingerprint(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return crate::fetch::sha256_file(path);
    }
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = entry.map_err(|e| Error::io(dir, e))?.path();
            if p.is_dir() { walk(&p, out)? } else { out.push(p) }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    files.sort();
    let named: Vec<(String, PathBuf)> = files.into_iter().map(|f| (f.strip_prefix(path).unwrap_or(&f).to_string_lossy().into_owned(), f)).collect();
    crate::fetch::sha256_named(&named)
}

pub fn read_dataset(path: &Path, opts: ReadOptions) -> Result<Dataset> {
    if path.is_dir() {
        read_arrow_dir(path, opts)
    } else if path.extension().is_some_and(|e| e == "arrow") {
        let mut ds = Dataset { source: path.to_path_buf(), ..Default::default() };
        read_arrow_file(path, opts, &mut ds)?;
        Ok(ds)
    } else if path.exists() {
        read_jsonl(path, opts)
    } else {
        Err(Error::file(path, "no such file or directory (expected a .jsonl file or a datasets save_to_disk directory)"))
    }
}

/// Check a row and either keep it, record it as skipped, or fail.
fn admit(ds: &mut Dataset, path: &Path, row_no: usize, row: std::result::Result<RavelRow, String>, opts: ReadOptions) -> Result<()> {
    let problem = match row {
        Ok(r) => match r.problem() {
            None => {
                ds.rows.push(r);
                return Ok(());
            }
            Some(p) => p,
        },
        Err(p) => p,
    };
    if opts.skip_bad_rows {
        ds.skipped.push((row_no, problem));
        Ok(())
    } else {
        Err(Error::file(path, format!("row {row_no}: {problem} (pass --skip-bad-rows to skip such rows with a count)")))
    }
}

/// Read a JSONL file (row numbers are line numbers; blank lines are ignored).
pub fn read_jsonl(path: &Path, opts: ReadOptions) -> Result<Dataset> {
    let file = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let mut ds = Dataset { source: path.to_path_buf(), ..Default::default() };
    let mut extra = std::collections::BTreeSet::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::file(path, format!("line {}: cannot read: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_json_row(&line, &mut extra);
        admit(&mut ds, path, i + 1, row, opts)?;
    }
    ds.extra_columns = extra.into_iter().collect();
    Ok(ds)
}

/// Rows given as JSON objects (a notebook's list of dicts), checked as a JSONL file's are;
/// `source` names them in errors and row numbers count from 1.
pub fn read_json_rows(source: &Path, rows: &[serde_json::Value], opts: ReadOptions) -> Result<Dataset> {
    let mut ds = Dataset { source: source.to_path_buf(), ..Default::default() };
    let mut extra = std::collections::BTreeSet::new();
    for (i, v) in rows.iter().enumerate() {
        let row = parse_json_value(v, &mut extra);
        admit(&mut ds, source, i + 1, row, opts)?;
    }
    ds.extra_columns = extra.into_iter().collect();
    Ok(ds)
}

fn parse_json_row(line: &str, extra: &mut std::collections::BTreeSet<String>) -> std::result::Result<RavelRow, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    parse_json_value(&v, extra)
}

fn parse_json_value(v: &serde_json::Value, extra: &mut std::collections::BTreeSet<String>) -> std::result::Result<RavelRow, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let mut vals: [String; 13] = Default::default();
    for (slot, col) in vals.iter_mut().zip(COLUMNS) {
        *slot = match obj.get(col) {
            None => return Err(format!("missing column `{col}`")),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("column `{col}` is not a string: {other}")),
        };
    }
    for k in obj.keys() {
        if !COLUMNS.contains(&k.as_str()) {
            extra.insert(k.clone());
        }
    }
    Ok(RavelRow::from_values(vals))
}

/// Write rows as JSONL (atomically: a temporary file renamed into place).
pub fn write_jsonl(path: &Path, rows: &[RavelRow]) -> Result<()> {
    crate::atomic::write_file(path, |w| {
        for r in rows {
            serde_json::to_writer(&mut *w, r).map_err(|e| Error::file(path, format!("cannot serialise a row: {e}")))?;
            w.write_all(b"\n").map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// HF datasets save_to_disk

/// The data files of a `save_to_disk` directory, from `state.json` (else every `*.arrow`).
fn arrow_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let state = dir.join("state.json");
    if state.is_file() {
        let v = crate::error::read_json(&state)?;
        let files = v.get("_data_files").and_then(|f| f.as_array()).ok_or_else(|| Error::file(&state, "no `_data_files` list"))?;
        files.iter().map(|f| f.get("filename").and_then(|n| n.as_str()).map(|n| dir.join(n)).ok_or_else(|| Error::file(&state, "a `_data_files` entry has no `filename`"))).collect()
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::file(dir, format!("cannot list: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "arrow"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::file(dir, "not a datasets save_to_disk directory: no state.json and no .arrow files"));
        }
        Ok(files)
    }
}

/// Read a `save_to_disk` directory.
pub fn read_arrow_dir(dir: &Path, opts: ReadOptions) -> Result<Dataset> {
    let mut ds = Dataset { source: dir.to_path_buf(), ..Default::default() };
    for file in arrow_files(dir)? {
        read_arrow_file(&file, opts, &mut ds)?;
    }
    Ok(ds)
}

/// A string column of any Arrow string layout.
enum StrCol<'a> {
    Utf8(&'a StringArray),
    Large(&'a LargeStringArray),
    View(&'a StringViewArray),
}

impl StrCol<'_> {
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            StrCol::Utf8(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// The record batches of an Arrow IPC stream, or of the stream inside the file format, decoded
/// message by message. Every buffer of a record batch is checked to lie inside its message body
/// before arrow-ipc sees it: arrow-ipc 60 slices buffers unchecked and panics on a file that
/// claims otherwise (found by the `arrow` fuzz target).
fn ipc_batches(bytes: &[u8], path: &Path) -> Result<Vec<RecordBatch>> {
    use arrow_ipc::MessageHeader;
    let ferr = |m: String| Error::file(path, format!("cannot read Arrow data: {m}"));
    let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    // The file format is magic + padding, the stream, a footer: the stream part is all we need.
    let mut pos = if bytes.starts_with(b"ARROW1") { 8 } else { 0 };
    let mut schema: Option<Arc<Schema>> = None;
    let mut out = Vec::new();
    loop {
        let Some(mut len) = word(pos) else {
            if pos >= bytes.len() {
                break; // a stream may end without its end-of-stream marker
            }
            return Err(ferr(format!("truncated message header at byte {pos}")));
        };
        pos += 4;
        if len == 0xFFFF_FFFF {
            len = word(pos).ok_or_else(|| ferr(format!("truncated message header at byte {pos}")))?;
            pos += 4;
        }
        if len == 0 {
            break; // end of stream
        }
        let meta_end =
            pos.checked_add(len as usize).filter(|&e| e <= bytes.len()).ok_or_else(|| ferr(format!("the message at byte {pos} claims {len} bytes of metadata, past the end of the file")))?;
        let message = arrow_ipc::root_as_message(&bytes[pos..meta_end]).map_err(|e| ferr(format!("invalid message at byte {pos}: {e}")))?;
        let body_len = usize::try_from(message.bodyLength()).map_err(|_| ferr(format!("the message at byte {pos} has a negative body length")))?;
        let body_end =
            meta_end.checked_add(body_len).filter(|&e| e <= bytes.len()).ok_or_else(|| ferr(format!("the message at byte {pos} claims a {body_len}-byte body, past the end of the file")))?;
        match message.header_type() {
            MessageHeader::Schema => {
                let fb = message.header_as_schema().ok_or_else(|| ferr(format!("the schema message at byte {pos} has no schema")))?;
                schema = Some(Arc::new(arrow_ipc::convert::try_fb_to_schema(fb).map_err(|e| ferr(format!("invalid schema at byte {pos}: {e}")))?));
            }
            MessageHeader::RecordBatch => {
                let batch = message.header_as_record_batch().ok_or_else(|| ferr(format!("the record-batch message at byte {pos} has no batch")))?;
                let schema = schema.clone().ok_or_else(|| ferr(format!("a record batch at byte {pos} comes before the schema")))?;
                for (i, b) in batch.buffers().into_iter().flatten().enumerate() {
                    let inside = b.offset() >= 0 && b.length() >= 0 && (b.offset() as u64).checked_add(b.length() as u64).is_some_and(|e| e <= body_len as u64);
                    if !inside {
                        return Err(ferr(format!("buffer {i} of the record batch at byte {pos} (offset {}, length {}) lies outside its {body_len}-byte body", b.offset(), b.length())));
                    }
                }
                check_layout(&schema, &batch).map_err(|m| ferr(format!("the record batch at byte {pos}: {m}")))?;
                if batch.compression().is_some() {
                    return Err(ferr(format!("the record batch at byte {pos} is compressed; save the dataset uncompressed")));
                }
                let body = arrow_buffer::Buffer::from(bytes[meta_end..body_end].to_vec());
                let rb = arrow_ipc::reader::read_record_batch(&body, batch, schema, &HashMap::new(), None, &message.version()).map_err(|e| ferr(format!("record batch at byte {pos}: {e}")))?;
                out.push(rb);
            }
            MessageHeader::DictionaryBatch => {
                return Err(ferr("dictionary-encoded columns are not supported; save the dataset with plain string columns".into()));
            }
            other => return Err(ferr(format!("unexpected message type {other:?} at byte {pos}"))),
        }
        pos = body_end;
    }
    if schema.is_none() {
        return Err(ferr("no schema message (not an Arrow IPC stream or file)".into()));
    }
    Ok(out)
}

/// Check a record batch's buffers against its schema before arrow-ipc builds arrays from them:
/// the count per column, and whole elements in every fixed-width buffer (arrow-data 60 asserts
/// this and panics otherwise; found by the `arrow` fuzz target). Columns must be flat:
/// strings (what the dataset needs), or numbers, booleans and nulls among extra columns.
fn check_layout(schema: &Schema, batch: &arrow_ipc::RecordBatch) -> std::result::Result<(), String> {
    let nodes = batch.nodes().map(|n| n.len()).unwrap_or(0);
    if nodes != schema.fields().len() {
        return Err(format!("{nodes} field nodes for {} columns", schema.fields().len()));
    }
    let buffers: Vec<i64> = batch.buffers().into_iter().flatten().map(|b| b.length()).collect();
    let mut variadic = batch.variadicBufferCounts().into_iter().flatten();
    let mut at = 0usize;
    for f in schema.fields() {
        // (element width of each buffer after the validity bitmap; 0 = bytes or bits)
        let widths: Vec<usize> = match f.data_type() {
            DataType::Null => Vec::new(),
            DataType::Boolean => vec![1, 0],
            DataType::Int8 | DataType::UInt8 => vec![1, 1],
            DataType::Int16 | DataType::UInt16 | DataType::Float16 => vec![1, 2],
            DataType::Int32 | DataType::UInt32 | DataType::Float32 | DataType::Date32 => vec![1, 4],
            DataType::Int64 | DataType::UInt64 | DataType::Float64 | DataType::Date64 | DataType::Timestamp(..) => vec![1, 8],
            DataType::Utf8 | DataType::Binary => vec![1, 4, 1],
            DataType::LargeUtf8 | DataType::LargeBinary => vec![1, 8, 1],
            DataType::Utf8View | DataType::BinaryView => {
                let extra = variadic.next().ok_or("a view column without its variadic buffer count")?;
                let extra = usize::try_from(extra).ok().filter(|&n| n <= buffers.len()).ok_or("an impossible variadic buffer count")?;
                let mut w = vec![1, 16];
                w.extend(std::iter::repeat_n(1, extra));
                w
            }
            other => return Err(format!("column `{}` has type {other}; only flat string, number, boolean and null columns are read", f.name())),
        };
        for (k, w) in widths.iter().enumerate() {
            let len = *buffers.get(at + k).ok_or_else(|| format!("column `{}` is missing buffer {k}", f.name()))?;
            if *w > 1 && !(len as usize).is_multiple_of(*w) {
                return Err(format!("buffer {k} of column `{}` holds {len} bytes, not a whole number of {w}-byte elements", f.name()));
            }
        }
        at += widths.len();
    }
    if at != buffers.len() {
        return Err(format!("{} buffers for columns that use {at}", buffers.len()));
    }
    Ok(())
}

/// Append the rows of one `.arrow` file (stream or file format) to `ds`.
fn read_arrow_file(path: &Path, opts: ReadOptions, ds: &mut Dataset) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let batches = ipc_batches(&bytes, path)?;
    let mut schema_checked = false;
    for batch in batches {
        let schema = batch.schema();
        if !schema_checked {
            let missing: Vec<&str> = COLUMNS.iter().copied().filter(|c| schema.column_with_name(c).is_none()).collect();
            if !missing.is_empty() {
                return Err(Error::file(
                    path,
                    format!("missing column(s) {} (columns present: {})", missing.join(", "), schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")),
                ));
            }
            for f in schema.fields() {
                if !COLUMNS.contains(&f.name().as_str()) && !ds.extra_columns.contains(f.name()) {
                    ds.extra_columns.push(f.name().clone());
                }
            }
            schema_checked = true;
        }
        let mut cols = Vec::with_capacity(13);
        for c in COLUMNS {
            let arr = batch.column_by_name(c).ok_or_else(|| Error::file(path, format!("missing column `{c}`")))?;
            let col = match arr.data_type() {
                DataType::Utf8 => arr.as_any().downcast_ref::<StringArray>().map(StrCol::Utf8),
                DataType::LargeUtf8 => arr.as_any().downcast_ref::<LargeStringArray>().map(StrCol::Large),
                DataType::Utf8View => arr.as_any().downcast_ref::<StringViewArray>().map(StrCol::View),
                _ => None,
            }
            .ok_or_else(|| Error::file(path, format!("column `{c}` has type {}, expected a string column", arr.data_type())))?;
            cols.push(col);
        }
        for i in 0..batch.num_rows() {
            let row_no = ds.rows.len() + ds.skipped.len() + 1;
            let mut vals: [String; 13] = Default::default();
            let mut null = None;
            for (k, col) in cols.iter().enumerate() {
                match col.get(i) {
                    Some(s) => vals[k] = s.to_string(),
                    None => null = Some(COLUMNS[k]),
                }
            }
            let row = match null {
                Some(c) => Err(format!("column `{c}` is null")),
                None => Ok(RavelRow::from_values(vals)),
            };
            admit(ds, path, row_no, row, opts)?;
        }
    }
    Ok(())
}

/// Features JSON of the 13 string columns, as `datasets` writes it.
fn features_json() -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for c in COLUMNS {
        m.insert(c.to_string(), serde_json::json!({"dtype": "string", "_type": "Value"}));
    }
    serde_json::Value::Object(m)
}

/// Write a `save_to_disk` directory that `datasets.load_from_disk` and our reader both open:
/// one Arrow IPC stream shard, `dataset_info.json` and `state.json`.
pub fn write_arrow_dir(dir: &Path, rows: &[RavelRow]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
    let hf_meta = serde_json::json!({"info": {"features": features_json()}}).to_string();
    let fields: Vec<Field> = COLUMNS.iter().map(|c| Field::new(*c, DataType::Utf8, true)).collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, HashMap::from([("huggingface".to_string(), hf_meta)])));
    let shard = "data-00000-of-00001.arrow";
    let path = dir.join(shard);
    let aerr = |e: arrow_schema::ArrowError| Error::file(&path, format!("cannot write Arrow data: {e}"));
    crate::atomic::write_file(&path, |w| {
        let mut writer = arrow_ipc::writer::StreamWriter::try_new(w, &schema).map_err(aerr)?;
        for chunk in rows.chunks(1000) {
            let arrays: Vec<ArrayRef> = (0..13).map(|k| Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| r.values()[k]))) as ArrayRef).collect();
            let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(aerr)?;
            writer.write(&batch).map_err(aerr)?;
        }
        writer.finish().map_err(aerr)
    })?;
    // A content fingerprint (datasets uses a random/hash string; any hex string is accepted).
    let fingerprint = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for r in rows {
            for v in r.values() {
                h.update(v.as_bytes());
                h.update([0]);
            }
        }
        format!("{:x}", h.finalize())[..16].to_string()
    };
    let info = serde_json::json!({"citation": "", "description": "", "features": features_json(), "homepage": "", "license": ""});
    let state = serde_json::json!({
        "_data_files": [{"filename": shard}],
        "_fingerprint": fingerprint,
        "_format_columns": null,
        "_format_kwargs": {},
        "_format_type": null,
        "_output_all_columns": false,
        "_split": null
    });
    for (name, v) in [("dataset_info.json", info), ("state.json", state)] {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::file(&p, e.to_string()))?;
        std::fs::write(&p, text).map_err(|e| Error::file(&p, format!("cannot write: {e}")))?;
    }
    Ok(())
}

/// Write rows to `path`: a directory (save_to_disk format) when `path` has no `.jsonl`
/// extension and `arrow` is requested, JSONL otherwise.
pub fn write_dataset(path: &Path, rows: &[RavelRow], arrow: bool) -> Result<()> {
    if arrow { write_arrow_dir(path, rows) } else { write_jsonl(path, rows) }
}
