//! TensorBoard event files: `events.out.tfevents.<time>.<host>` in the run directory, one
//! scalar per numeric `metrics.jsonl` field per step (`loss`, `lr`, `eval/soft/causal`, …), so
//! `tensorboard --logdir runs/` plots every run beside the others.
//!
//! The format is TensorFlow's: a file of TFRecord frames
//! `[len: u64 LE][masked CRC-32C of len: u32][Event protobuf][masked CRC-32C of it: u32]`,
//! each an `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 (string) |
//! summary = 5 { value = 1 { tag = 1 (string), simple_value = 2 (float) } } }`, the first one
//! carrying `file_version: "brain.Event:2"`. Five protobuf fields do not earn a protobuf
//! dependency; they are written (and read back, [`read_scalars`]) by hand below.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

/// One scalar read back: `(tag, step, value)`.
pub type Scalar = (String, i64, f32);

impl EventWriter {
    /// A new event file in `dir` (a resumed run adds a second file; TensorBoard reads both).
    pub fn create(dir: &Path) -> Result<Self> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let host = crate::profile::host_name().replace(['/', '\\'], "_");
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        // Two writers in one second (a sweep's quick runs share no directory, but a test might).
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{n}", now as u64));
            n += 1;
        }
        let f = File::create(&path).map_err(|e| Error::file(&path, format!("cannot create: {e}")))?;
        let mut w = EventWriter { path, out: BufWriter::new(f) };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `scalars` (tag, value) at `step`, and flush (TensorBoard reads a live run).
    pub fn scalars(&mut self, step: i64, scalars: &[(&str, f32)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            v.push(2 << 3 | 5); // simple_value: fixed32
            v.extend_from_slice(&value.to_le_bytes());
            put_bytes(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall);
        put_varint(&mut event, 2 << 3);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)?;
        self.out.flush().map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc(&len).to_le_bytes());
        frame.extend_from_slice(data);
        frame.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out.write_all(&frame).map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(out, field << 3 | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, v: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// Every scalar in an event file, checking each frame's checksums (a test's read-back, and a
/// way to look into a run without TensorBoard).
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let bad = |what: &str, at: usize| Error::file(path, format!("not a TensorBoard event file: {what} at byte {at}"));
    let mut out = Vec::new();
    let mut at = 0;
    let mut first = true;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or_else(|| bad("a cut frame header", at))?;
        let (len_bytes, len_crc) = head.split_at(8);
        if masked_crc(len_bytes).to_le_bytes() != len_crc {
            return Err(bad("a length checksum mismatch", at));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad("a short length", at))?) as usize;
        let data = bytes.get(at + 12..at + 12 + len).ok_or_else(|| bad("a cut record", at))?;
        let crc = bytes.get(at + 12 + len..at + 16 + len).ok_or_else(|| bad("a cut checksum", at))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("a record checksum mismatch", at));
        }
        let event = Fields::new(data).collect::<Option<Vec<_>>>().ok_or_else(|| bad("a malformed event", at))?;
        if first && !event.iter().any(|f| matches!(f, (3, Field::Bytes(b"brain.Event:2")))) {
            return Err(bad("no file_version brain.Event:2 in the first event", at));
        }
        first = false;
        let step = event.iter().find_map(|f| if let (2, Field::Varint(s)) = f { Some(*s as i64) } else { None }).unwrap_or(0);
        for (n, f) in &event {
            if let (5, Field::Bytes(summary)) = (n, f) {
                for value in Fields::new(summary) {
                    let Some((1, Field::Bytes(v))) = value else { return Err(bad("a malformed summary", at)) };
                    let fields = Fields::new(v).collect::<Option<Vec<_>>>().ok_or_else(|| bad("a malformed value", at))?;
                    let tag = fields.iter().find_map(|f| if let (1, Field::Bytes(t)) = f { Some(String::from_utf8_lossy(t).into_owned()) } else { None });
                    let val = fields.iter().find_map(|f| if let (2, Field::Fixed32(x)) = f { Some(f32::from_le_bytes(*x)) } else { None });
                    if let (Some(tag), Some(val)) = (tag, val) {
                        out.push((tag, step, val));
                    }
                }
            }
        }
        at += 16 + len;
    }
    Ok(out)
}

/// A protobuf field's value, as far as event files need.
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// The fields of one protobuf message, `None` at the first malformed one.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Self {
        Fields { data, at: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.at)?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<(u64, Field<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.data.len() {
            return None;
        }
        let parsed = (|| {
            let key = self.varint()?;
            let value = match key & 7 {
                0 => Field::Varint(self.varint()?),
                1 => {
                    self.data.get(self.at..self.at + 8)?;
                    self.at += 8;
                    Field::Fixed64
                }
                2 => {
                    let len = self.varint()? as usize;
                    let b = self.data.get(self.at..self.at.checked_add(len)?)?;
                    self.at += len;
                    Field::Bytes(b)
                }
                5 => {
                    let b: [u8; 4] = self.data.get(self.at..self.at + 4)?.try_into().ok()?;
                    self.at += 4;
                    Field::Fixed32(b)
                }
                _ => return None,
            };
            Some((key >> 3, value))
        })();
        if parsed.is_none() {
            self.at = self.data.len(); // stop after the first malformed field
        }
        Some(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_read_back_and_checksums_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("loss", 2.5), ("eval/soft/causal", 0.75)]).unwrap();
        w.scalars(300, &[("lr", 1e-4)]).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let got = read_scalars(&path).unwrap();
        assert_eq!(got, vec![("loss".into(), 1, 2.5), ("eval/soft/causal".into(), 1, 0.75), ("lr".into(), 300, 1e-4)]);
        // The CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1; // inside the last record
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_scalars(&path).unwrap_err().to_string().contains("checksum"));
    }
}
