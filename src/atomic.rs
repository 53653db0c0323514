//! Writing files and directories so that they are complete or absent: the content goes to a
//! temporary name beside the target (`.<name>.partial-<pid>`) and is renamed into place, so a
//! crash or an error never leaves a half-written dataset, model or checkpoint under its final
//! name. Partial files are removed on error.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn partial_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Write a file through a buffered temporary file, then rename it to `path`.
pub fn write_file(path: &Path, body: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, format!("cannot create directory: {e}")))?;
    }
    let tmp = partial_name(path);
    let result = (|| {
        let f = File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
        let mut w = BufWriter::new(f);
        body(&mut w)?;
        w.flush().map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot move {} into place: {e}", tmp.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fill a temporary directory with `body(tmp)`, then replace `dir` with it.
pub fn write_dir<T>(dir: &Path, body: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, format!("cannot create: {e}")))?;
    }
    let tmp = partial_name(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    let result = body(&tmp).and_then(|value| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot replace: {e}")))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::file(dir, format!("cannot move {} into place: {e}", tmp.display())))?;
        Ok(value)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
