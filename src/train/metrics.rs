//! `metrics.jsonl`: one JSON object per line, flushed as written (safe to tail while training).
//!
//! Keys are flat, as wandb and TensorBoard name scalars: `step`, `loss`, `lr`, `grad_norm`, …
//! and each periodic evaluation as `eval/<mode>/<metric>` (`eval/soft/causal`). Runs written
//! before 0.2 nest the evaluation (`"eval_soft": {"causal": …}`); [`eval_metric`] reads both.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Write `scores` into `record` as flat keys under `prefix` (`eval/soft` → `eval/soft/causal`,
/// `…/isolate`, `…/disentangle`, `…/loss`, `…/rows`).
pub fn put_scores<S: serde::Serialize>(record: &mut serde_json::Value, prefix: &str, scores: &S) {
    if let (Some(obj), Ok(serde_json::Value::Object(fields))) = (record.as_object_mut(), serde_json::to_value(scores)) {
        for (k, v) in fields {
            obj.insert(format!("{prefix}/{k}"), v);
        }
    }
}

/// The periodic evaluation's `metric` (`causal`, `isolate`, `disentangle`, `loss`) in a record,
/// with the mode it was scored in: flat (`eval/soft/causal`) or the nested form of older runs
/// (`eval_soft.causal`).
pub fn eval_metric(record: &serde_json::Value, metric: &str) -> Option<(String, f64)> {
    let obj = record.as_object()?;
    obj.iter().find_map(|(k, v)| {
        if let Some(mode) = k.strip_prefix("eval/").and_then(|r| r.strip_suffix(metric)).and_then(|r| r.strip_suffix('/')) {
            return Some((mode.to_string(), v.as_f64()?));
        }
        let mode = k.strip_prefix("eval_")?;
        Some((mode.to_string(), v.get(metric)?.as_f64()?))
    })
}

pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
    observer: Option<Observer>,
    tensorboard: Option<super::tensorboard::EventWriter>,
}

/// Called with every record after it is written (a notebook's progress callback); an error
/// stops the run as a failed write would.
pub type Observer = Box<dyn FnMut(&serde_json::Value) -> Result<()>>;

impl MetricsLog {
    /// Create (truncate) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f), observer: None, tensorboard: None })
    }

    /// Append to `path` (resuming a run).
    pub fn append(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f), observer: None, tensorboard: None })
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
        let (observer, tensorboard) = (self.observer.take(), self.tensorboard.take());
        *self = MetricsLog::append(&self.path)?;
        (self.observer, self.tensorboard) = (observer, tensorboard);
        Ok(())
    }

    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| Error::file(&self.path, format!("cannot write: {e}"));
        serde_json::to_writer(&mut self.out, record).map_err(|e| err(&e))?;
        self.out.write_all(b"\n").map_err(|e| err(&e))?;
        self.out.flush().map_err(|e| err(&e))?;
        if let (Some(tb), Some(step), Some(fields)) = (&mut self.tensorboard, record.get("step").and_then(|s| s.as_i64()), record.as_object()) {
            let scalars: Vec<(&str, f32)> = fields.iter().filter(|(k, _)| !matches!(k.as_str(), "step" | "seconds")).filter_map(|(k, v)| Some((k.as_str(), v.as_f64()? as f32))).collect();
            tb.scalars(step, &scalars)?;
        }
        match &mut self.observer {
            Some(f) => f(record),
            None => Ok(()),
        }
    }

    /// Also write every record's numeric fields (but `step` and `seconds`) as TensorBoard
    /// scalars at its step, into a new event file in `dir`.
    pub fn with_tensorboard(mut self, dir: &Path) -> Result<Self> {
        self.tensorboard = Some(super::tensorboard::EventWriter::create(dir)?);
        Ok(self)
    }

    /// Also hand every record to `f`.
    pub fn observe(mut self, f: Observer) -> Self {
        self.observer = Some(f);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keys_and_the_old_nested_form() {
        let mut rec = serde_json::json!({"step": 5, "loss": 1.5});
        put_scores(&mut rec, "eval/soft", &serde_json::json!({"causal": 0.75, "isolate": 0.5}));
        assert_eq!(rec["eval/soft/causal"], 0.75);
        assert_eq!(eval_metric(&rec, "isolate"), Some(("soft".into(), 0.5)));
        let old = serde_json::json!({"step": 5, "eval_groundtruth": {"causal": 0.25, "isolate": 1.0}});
        assert_eq!(eval_metric(&old, "causal"), Some(("groundtruth".into(), 0.25)));
        assert_eq!(eval_metric(&serde_json::json!({"step": 1, "loss": 2.0}), "causal"), None);
    }
}
