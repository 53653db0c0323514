//! The library's error type. Every variant that comes from user input names the file and the
//! key, tensor or row at fault, so a user can fix the input without reading our source.

use std::path::{Path, PathBuf};

/// Errors from loading, running and fetching models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A JSON file did not parse.
    #[error("{}: invalid JSON: {err}", path.display())]
    Json { path: PathBuf, err: serde_json::Error },

    /// A configuration or metadata key is missing or has an unusable value.
    #[error("{}: key `{key}`: {msg}", path.display())]
    Key { path: PathBuf, key: String, msg: String },

    /// A weight tensor is missing, misshapen or of an unsupported type.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor { path: PathBuf, name: String, msg: String },

    /// A file is malformed in a way that is not about one key or tensor.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A `--model` argument that names nothing we can load.
    #[error("model `{spec}`: {msg}")]
    ModelSpec { spec: String, msg: String },

    /// A download failed (network, HTTP status, checksum).
    #[error("{url}: {msg}")]
    Download { url: String, msg: String },

    /// An argument outside its valid range (batch size 0, layer out of range, ...).
    #[error("{0}")]
    Invalid(String),

    /// A loss or gradient became NaN or infinite (training stops, or skips the batch when
    /// `train.skip_nonfinite` is set).
    #[error("{0}")]
    NonFinite(String),

    /// A tensor operation failed. With valid inputs this is a bug in hyperdas.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), err }
    }
    pub fn key(path: impl AsRef<Path>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Key { path: path.as_ref().to_path_buf(), key: key.into(), msg: msg.into() }
    }
    pub fn tensor(path: impl AsRef<Path>, name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.as_ref().to_path_buf(), name: name.into(), msg: msg.into() }
    }
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Read a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Read and parse a JSON file, naming it in the error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|err| Error::Json { path: path.to_path_buf(), err })
}
