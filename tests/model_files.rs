//! Damaged or hostile model files: each is refused at load with a message that names the
//! field, never a panic or a server stuck at "loading". The files are real GGUFs, written with
//! candle's GGUF writer, whose metadata says what no real model says.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{self, Value};
use idlerig::model::ModelFiles;

mod common;

/// A llama GGUF with these metadata overrides (no tensors: validation comes first).
fn gguf(name: &str, overrides: &[(&str, Value)]) -> std::path::PathBuf {
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.embedding_length".into(), Value::U32(64)),
        ("llama.feed_forward_length".into(), Value::U32(128)),
        ("llama.block_count".into(), Value::U32(2)),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
        ("llama.context_length".into(), Value::U32(256)),
        ("llama.vocab_size".into(), Value::U32(100)),
    ];
    for (k, v) in overrides {
        md.retain(|(key, _)| key != k);
        md.push((k.to_string(), v.clone()));
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_files");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
    path
}

fn refused(path: &std::path::Path) -> String {
    match ModelFiles::open(path) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn impossible_metadata_is_refused_by_name() {
    let cases = [
        ("zero-heads", "llama.attention.head_count", Value::U32(0)),
        (
            "zero-kv-heads",
            "llama.attention.head_count_kv",
            Value::U32(0),
        ),
        (
            "kv-heads-not-dividing",
            "llama.attention.head_count_kv",
            Value::U32(3),
        ),
        ("odd-head-dim", "llama.rope.dimension_count", Value::U32(15)),
        ("huge-context", "llama.context_length", Value::U64(1 << 40)),
        ("huge-vocab", "llama.vocab_size", Value::U32(u32::MAX)),
        ("zero-layers", "llama.block_count", Value::U32(0)),
        (
            "heads-not-dividing-hidden",
            "llama.attention.head_count",
            Value::U32(6),
        ),
    ];
    for (name, key, value) in cases {
        let msg = refused(&gguf(name, &[(key, value)]));
        assert!(
            msg.contains(key),
            "{name}: the message names `{key}`: {msg}"
        );
    }
    // The same file with sane values opens.
    assert!(ModelFiles::open(&gguf("sane", &[])).is_ok());
}

/// Runs `idlerig serve` on `path` (no mining) until it exits, which it must within a minute;
/// its status, standard error and how long it took.
fn serve_until_exit(path: &std::path::Path) -> (std::process::ExitStatus, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_idlerig"))
        .args(["serve", "--port", "0", "--no-mine", "--model"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let what = format!("serve should exit on {}", path.display());
    let (status, err) = common::wait_for_exit(&mut child, Duration::from_secs(60), &what);
    (status, err, t.elapsed())
}

#[test]
fn serve_exits_non_zero_within_seconds_on_a_model_with_zero_heads() {
    let path = gguf(
        "serve-zero-heads",
        &[("llama.attention.head_count", Value::U32(0))],
    );
    let (status, err, took) = serve_until_exit(&path);
    assert!(!status.success());
    assert!(err.contains("llama.attention.head_count"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    eprintln!("exited in {took:?}: {}", err.lines().last().unwrap_or(""));
}

/// A file whose metadata is sane but whose tensors are missing fails in the background load:
/// the server must not stay up answering "failed" or "loading"; it exits non-zero, naming
/// what is missing.
#[test]
fn serve_exits_non_zero_when_the_background_load_fails() {
    let (status, err, _) = serve_until_exit(&gguf("serve-no-tensors", &[]));
    assert!(!status.success());
    assert!(err.contains("the model failed to load"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
