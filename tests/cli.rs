//! The `idlerig` binary as an operator runs it: JSON logs that name each request's id and
//! never a secret, SIGTERM ending in a clean exit with the miner stopped and the pool session
//! closed, and `config --print` merging flags, environment and a --config file, redacted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_idlerig");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_tag_requests_hide_secrets_and_sigterm_exits_cleanly() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--local-pool-port",
            "0",
            "--mine-threads",
            "1",
            "--api-key",
            "sk-secret-abc",
            "--usage-db",
            "none",
            "--pass",
            "pool-secret-xyz",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info,idlerig=debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log: Vec<String> = Vec::new();
    let t = Instant::now();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its address");
        log.push(line.clone());
        let v: Value = serde_json::from_str(&line).expect("every log line is JSON");
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("idlerig listening"))
        {
            break v["fields"]["addr"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(60));
    };
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    while http
        .get(format!("{base}/health"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(t.elapsed() < Duration::from_secs(90), "model did not load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = http
        .post(format!("{base}/v1/completions"))
        .bearer_auth("sk-secret-abc")
        .header("x-request-id", "cli-req-7")
        .json(&json!({"prompt": "Hello", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .post(format!("{base}/v1/completions"))
        .bearer_auth("sk-secret-abd")
        .json(&json!({"prompt": "Hello", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    reader.join().unwrap();
    log.extend(rx.try_iter());
    let all = log.join("\n");
    assert!(status.success(), "exit {status:?}\n{all}");
    assert!(!all.contains("sk-secret-ab"), "an API key reached the log");
    assert!(
        !all.contains("pool-secret-xyz"),
        "the pool password reached the log"
    );
    let lines: Vec<Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let message = |v: &Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    let tagged: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["span"]["request_id"] == "cli-req-7" || v["fields"]["request_id"] == "cli-req-7"
        })
        .collect();
    assert!(
        tagged
            .iter()
            .any(|v| message(v) == "request admitted to the running batch"),
        "the engine's line names the request:\n{all}"
    );
    assert!(
        tagged
            .iter()
            .any(|v| message(v) == "request answered" && v["fields"]["status"] == 200),
        "the access line names the request:\n{all}"
    );
    for expected in [
        "shutting down",
        "miner stopped and pool session closed",
        "idlerig stopped",
    ] {
        assert!(
            lines.iter().any(|v| message(v).starts_with(expected)),
            "missing `{expected}`:\n{all}"
        );
    }
}

#[test]
fn config_print_merges_file_environment_and_flags_with_secrets_redacted() {
    let file = std::env::temp_dir().join(format!("idlerig-config-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "port = 9100\nmax-running = 3\nqueue_capacity = 7\napi-key = [\"sk-file-key\"]\npass = \"pool-pw\"\npower-price = 0.05\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "config",
            "--print",
            "--config",
            file.to_str().unwrap(),
            "--port",
            "9200",
        ])
        .env("IDLERIG_MAX_RUNNING", "5")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "port = 9200  # command line",
        "max-running = 5  # env IDLERIG_MAX_RUNNING",
        "queue-capacity = 7  # config file",
        "api-key = [\"<redacted>\"]  # config file",
        "pass = \"<redacted>\"  # config file",
        "power-price = 0.05  # config file",
        "step-token-budget = 512  # default",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(!text.contains("sk-file-key") && !text.contains("pool-pw"));

    std::fs::write(&file, "prot = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown setting `prot`"), "{err}");
    let _ = std::fs::remove_file(file);
}

/// Runs the binary with `args` until it exits (it must, within a deadline), returning its
/// status and standard error.
fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let what = format!("`idlerig {}` should exit", args.join(" "));
    common::wait_for_exit(&mut child, Duration::from_secs(60), &what)
}

#[test]
fn mining_on_a_gpu_that_is_not_there_exits_with_a_clear_message() {
    for args in [
        &[
            "serve",
            "--port",
            "0",
            "--local-pool-port",
            "0",
            "--mine-device",
            "cuda",
        ][..],
        &["mine", "--local-pool-port", "0", "--device", "cuda"][..],
    ] {
        let (status, stderr) = run_to_exit(args);
        assert!(!status.success(), "{args:?} exited 0:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("mining device") && stderr.contains("cuda"),
            "{args:?} names the device and the reason:\n{stderr}"
        );
    }
}
