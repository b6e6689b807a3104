//! `idlerig bench gpu-check` in parts, as the GPU proof runs it, here without a GPU: each part
//! is written to `--out` the moment it is done, a part that fails leaves the ones before it
//! written and the ones after it running, and a miner launcher that cannot start does not stop
//! the serving part (which decides by itself whether a device exists, and without one runs the
//! same comparison on the CPU's paths in CUDA's place).

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_idlerig");

/// Runs every part with `inject` (a fault), the parts' files, and stderr.
fn run_parts(name: &str, inject: &str) -> (std::path::PathBuf, String) {
    let out = std::env::temp_dir().join(format!("idlerig-gpu-parts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(BIN)
        .args(["bench", "gpu-check", "--quick", "--out"])
        .arg(&out)
        .env("IDLERIG_GPU_CHECK_INJECT", inject)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    (out, stderr)
}

fn part(out: &std::path::Path, name: &str) -> Value {
    let path = out.join(format!("gpu-check-{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_serving_failure_leaves_the_kernel_part_written_and_the_speed_part_runs() {
    let (out, stderr) = run_parts("serving", "serving");
    let kernel = part(&out, "kernel");
    assert_eq!(kernel["gpu"], Value::Null);
    assert_eq!(kernel["correctness"]["genesis"]["ok"], true, "{kernel}");
    assert_eq!(kernel["preempt"]["lost"], 0, "{kernel}");
    let serving = part(&out, "serving");
    assert!(
        serving["error"]
            .as_str()
            .is_some_and(|e| e.contains("injected serving failure")),
        "{serving}"
    );
    assert!(part(&out, "speed")["skipped"].is_string());
    // Each part's line comes when it is done, in order.
    let at = |s: &str| {
        stderr
            .find(s)
            .unwrap_or_else(|| panic!("no `{s}` in:\n{stderr}"))
    };
    assert!(at("gpu-check: kernel: backend") < at("gpu-check: serving: ERROR"));
    assert!(at("gpu-check: serving: ERROR") < at("gpu-check: speed: skipped"));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_launcher_failure_still_runs_serving() {
    let (out, _) = run_parts("launcher", "launcher");
    let kernel = part(&out, "kernel");
    assert_eq!(
        kernel["launcher_error"], "injected launcher failure",
        "{kernel}"
    );
    assert_eq!(kernel["backend"], "cpu-grid");
    let serving = part(&out, "serving");
    let archs = serving["architectures"]
        .as_object()
        .expect("the serving part ran");
    assert_eq!(archs.len(), 6, "{serving}");
    for (arch, v) in archs {
        for b in v["batches"]
            .as_array()
            .unwrap_or_else(|| panic!("{arch}: {v}"))
        {
            assert_eq!(b["ok"], true, "{arch}: {b}");
        }
    }
    assert!(
        serving["device_note"]
            .as_str()
            .is_some_and(|n| n.contains("no CUDA device")),
        "{serving}"
    );
    std::fs::remove_dir_all(&out).ok();
}
