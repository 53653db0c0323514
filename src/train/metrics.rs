//! `metrics.jsonl`: one JSON object per line, flushed as written (safe to tail while training).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
    observer: Option<Observer>,
}

/// Called with every record after it is written (a notebook's progress callback); an error
/// stops the run as a failed write would.
pub type Observer = Box<dyn FnMut(&serde_json::Value) -> Result<()>>;

impl MetricsLog {
    /// Create (truncate) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f), observer: None })
    }

    /// Append to `path` (resuming a run).
    pub fn append(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f), observer: None })
    }

    /// Keep only the records of steps ≤ `step` (resuming from a checkpoint at `step` after a
    /// crash: later records belong to steps that will run again). A line that is not JSON
    /// (a record cut by the crash) is dropped too. The file is rewritten atomically.
    pub fn keep_through(&mut self, step: usize) -> Result<()> {
        self.out.flush().map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))?;
        let text = std::fs::read_to_string(&self.path).map_err(|e| Error::file(&self.path, format!("cannot read: {e}")))?;
        let kept: Vec<&str> =
            text.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s as usize <= step)).collect();
        if kept.len() == text.lines().count() {
            return Ok(());
        }
        crate::atomic::write_file(&self.path, |w| {
            for l in &kept {
                writeln!(w, "{l}").map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))?;
            }
            Ok(())
        })?;
        let observer = self.observer.take();
        *self = MetricsLog::append(&self.path)?;
        self.observer = observer;
        Ok(())
    }

    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| Error::file(&self.path, format!("cannot write: {e}"));
        serde_json::to_writer(&mut self.out, record).map_err(|e| err(&e))?;
        self.out.write_all(b"\n").map_err(|e| err(&e))?;
        self.out.flush().map_err(|e| err(&e))?;
        match &mut self.observer {
            Some(f) => f(record),
            None => Ok(()),
        }
    }

    /// Also hand every record to `f`.
    pub fn observe(mut self, f: Observer) -> Self {
        self.observer = Some(f);
        self
    }
}
