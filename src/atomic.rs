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

/// [`write_file`] with the whole contents as text.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    write_file(path, |w| w.write_all(text.as_bytes()).map_err(|e| Error::file(path, format!("cannot write: {e}"))))
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
        w.get_ref().sync_all().map_err(|e| Error::file(&tmp, format!("cannot sync: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot move {} into place: {e}", tmp.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The previous version of a directory written by [`write_dir`] with `keep_previous`.
pub fn previous(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    dir.with_file_name(format!("{name}.prev"))
}

/// Flush every file of `dir` (and `dir` itself) to the disk.
fn sync_dir(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() {
            File::open(&p).and_then(|f| f.sync_all()).map_err(|e| Error::file(&p, format!("cannot sync: {e}")))?;
        }
    }
    // Directory fsync makes the entries durable; not every filesystem supports it.
    let _ = File::open(dir).and_then(|f| f.sync_all());
    Ok(())
}

/// Fill a temporary directory with `body(tmp)`, flush it to the disk, then replace `dir` with
/// it. With `keep_previous`, the replaced `dir` becomes `dir.prev` (the one before is dropped):
/// a crash at any moment leaves a complete `dir` or a complete `dir.prev`.
pub fn write_dir<T>(dir: &Path, body: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    write_dir_keeping(dir, false, body)
}

/// [`write_dir`], choosing whether the replaced version is kept as `dir.prev`.
pub fn write_dir_keeping<T>(dir: &Path, keep_previous: bool, body: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, format!("cannot create: {e}")))?;
    }
    let tmp = partial_name(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    let result = body(&tmp).and_then(|value| {
        sync_dir(&tmp)?;
        if dir.exists() {
            // Never a moment without a complete version: the old one moves aside (or to
            // `.prev`), the new one moves in, and only then is anything removed.
            let aside = if keep_previous { previous(dir) } else { partial_name(&previous(dir)) };
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(dir, &aside).map_err(|e| Error::file(dir, format!("cannot move the previous version aside: {e}")))?;
            std::fs::rename(&tmp, dir).map_err(|e| Error::file(dir, format!("cannot move {} into place: {e}", tmp.display())))?;
            if !keep_previous {
                let _ = std::fs::remove_dir_all(&aside);
            }
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| Error::file(dir, format!("cannot move {} into place: {e}", tmp.display())))?;
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|f| f.sync_all());
        }
        Ok(value)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
