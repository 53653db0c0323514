//! `metrics.jsonl`: one JSON object per line, flushed as written (safe to tail while training).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Create (truncate) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f) })
    }

    /// Append to `path` (resuming a run).
    pub fn append(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f) })
    }

    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| Error::file(&self.path, format!("cannot write: {e}"));
        serde_json::to_writer(&mut self.out, record).map_err(|e| err(&e))?;
        self.out.write_all(b"\n").map_err(|e| err(&e))?;
        self.out.flush().map_err(|e| err(&e))
    }
}
