//! `idlerig bench gpu-check`: everything the GPU half needs proven, for the first machine
//! with an NVIDIA GPU (no Rust or network needed there; see `scripts/gpu-check`). It runs in
//! parts, each written to `$OUT/gpu-check-PART.json` the moment it is done and summed up in
//! one line on stderr, so that a part that hangs or fails (and the script's timeout for it)
//! loses nothing of those before it:
//! - `kernel`: the device, the kernel's compile figures (NVRTC and driver versions, cubin or
//!   PTX), its correctness on real blocks and against the CPU, its hashrate at three flag
//!   intervals against the ceiling, pre-emption latency with lost and duplicate nonces counted,
//!   power, and where each CUDA library was loaded from. No model needed.
//! - `serving`: whether a CUDA device exists (decided on its own, not by the miner's launcher:
//!   an NVRTC fault does not hide serving), then CUDA against the CPU twin on the tiny model of
//!   every architecture (`tests/reference/arch`, which travel with the tree) and on `--model`.
//!   Without a device the same comparison runs on the CPU's own paths, as a stand-in.
//! - `speed`: `bench infer` and `bench preempt` on `--model`, on the GPU.
//!
//! Without a GPU it says so (`"gpu": null`), runs the kernel checks on the CPU stand-in at
//! small sizes, and succeeds.

pub mod kernel;
mod power;
pub mod serving;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{BenchGpuCheckArgs, GpuCheckSection};
use crate::mining::gpu::{CpuGridLauncher, Geometry, ScanLauncher};
pub use kernel::Sizes;

/// A fault injected for the tests (`IDLERIG_GPU_CHECK_INJECT=launcher` or `serving`): the
/// launcher fails to start, or the serving part panics, as a driver or NVRTC fault would.
fn injected(part: &str) -> bool {
    std::env::var("IDLERIG_GPU_CHECK_INJECT").is_ok_and(|v| v.split(',').any(|p| p == part))
}

/// The launcher to check: CUDA on GPU `ordinal` when this build and machine have one, else
/// the CPU stand-in. The second value is the kernel's facts; the third why there is no GPU
/// launcher (a driver without a device, or NVRTC or the driver refusing the kernel).
fn launcher(ordinal: usize) -> (Box<dyn ScanLauncher>, Option<Value>, Option<String>) {
    if injected("launcher") {
        return (stand_in(), None, Some("injected launcher failure".into()));
    }
    #[cfg(feature = "cuda")]
    {
        use crate::mining::gpu::cuda::{CudaConfig, CudaLauncher};
        match CudaLauncher::new(ordinal, CudaConfig::default()) {
            Ok(l) => {
                let info = serde_json::to_value(l.info()).unwrap_or(Value::Null);
                (Box::new(l), Some(info), None)
            }
            Err(e) => (stand_in(), None, Some(e.to_string())),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        (
            stand_in(),
            None,
            Some("this build has no CUDA support (built without --features cuda)".into()),
        )
    }
}

fn stand_in() -> Box<dyn ScanLauncher> {
    let g = Geometry {
        blocks: 2,
        threads_per_block: 16,
    };
    Box::new(CpuGridLauncher::new(g, 1024).expect("a valid stand-in grid"))
}

/// Runs the parts asked for, each written as it completes; the figures as one document
/// (one part's own document, or `{"kernel": …, "serving": …, "speed": …}` for `all`).
pub async fn run(args: BenchGpuCheckArgs) -> Result<Value, String> {
    let parts: &[GpuCheckSection] = match args.section {
        GpuCheckSection::All => &[
            GpuCheckSection::Kernel,
            GpuCheckSection::Serving,
            GpuCheckSection::Speed,
        ],
        GpuCheckSection::Kernel => &[GpuCheckSection::Kernel],
        GpuCheckSection::Serving => &[GpuCheckSection::Serving],
        GpuCheckSection::Speed => &[GpuCheckSection::Speed],
    };
    let mut all = serde_json::Map::new();
    for &part in parts {
        let name = part_name(part);
        tracing::info!("gpu-check: {name}");
        let started = std::time::Instant::now();
        // A part that panics is reported in its own file; the parts after it still run.
        let a = args.clone();
        let mut doc = match part {
            GpuCheckSection::Kernel => tokio::task::spawn_blocking(move || kernel_part(&a)).await,
            GpuCheckSection::Serving => tokio::spawn(serving_part(a)).await,
            GpuCheckSection::Speed => tokio::spawn(speed_part(a)).await,
            GpuCheckSection::All => unreachable!("expanded above"),
        }
        .unwrap_or_else(|e| json!({"error": format!("the {name} part failed: {e}")}));
        doc["seconds"] = json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        if let Some(dir) = &args.out {
            write_part(dir, name, &doc)?;
        }
        eprintln!("gpu-check: {name}: {}", summary(part, &doc));
        all.insert(name.into(), doc);
    }
    Ok(match (args.section, all.len()) {
        (GpuCheckSection::All, _) | (_, 0) => Value::Object(all),
        _ => all
            .into_iter()
            .next()
            .map(|(_, v)| v)
            .unwrap_or(Value::Null),
    })
}

fn part_name(part: GpuCheckSection) -> &'static str {
    match part {
        GpuCheckSection::Kernel => "kernel",
        GpuCheckSection::Serving => "serving",
        GpuCheckSection::Speed => "speed",
        GpuCheckSection::All => "all",
    }
}

/// `DIR/gpu-check-NAME.json`, written whole (a temporary file renamed into place), so a
/// reader never sees half of one.
fn write_part(dir: &Path, name: &str, doc: &Value) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(format!("gpu-check-{name}.json"));
    let tmp = dir.join(format!(".gpu-check-{name}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(doc).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// One line per part, for the log: what a reader needs first.
fn summary(part: GpuCheckSection, d: &Value) -> String {
    if let Some(e) = d.get("error") {
        return format!("ERROR {e}");
    }
    match part {
        GpuCheckSection::Kernel => {
            let c = &d["correctness"];
            let p = &d["preempt"];
            format!(
                "backend {} (launcher: {}), genesis {}, 125552 {}, random_vs_cpu {}, best {:.3} GH/s \
                 ({} of the ceiling), pre-emption p50/p99 {}/{} µs, lost {} duplicates {}",
                d["backend"],
                d["launcher_error"].as_str().unwrap_or("ok"),
                c["genesis"]["ok"],
                c["block_125552"]["ok"],
                c["random_vs_cpu"]["equal"],
                d["best_ghs"].as_f64().unwrap_or(0.0),
                d["achieved_over_ceiling"],
                p["p50_us"],
                p["p99_us"],
                p["lost"],
                p["duplicates"]
            )
        }
        GpuCheckSection::Serving => {
            let ok = |v: &Value| {
                v["batches"]
                    .as_array()
                    .is_some_and(|b| !b.is_empty() && b.iter().all(|x| x["ok"] == true))
            };
            let archs: Vec<String> = d["architectures"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {}", if ok(v) { "ok" } else { "FAIL" }))
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "device {} ({}), architectures: {}; model: {}",
                d["device"],
                d["device_note"].as_str().unwrap_or(""),
                archs.join(", "),
                match &d["model"] {
                    Value::Null => "none given".to_string(),
                    m if ok(m) => "ok".to_string(),
                    m => format!("FAIL {m}"),
                }
            )
        }
        GpuCheckSection::Speed => match d.get("skipped") {
            Some(why) => format!("skipped: {why}"),
            None => format!(
                "decode 1/8/32 streams: {}/{}/{} tok/s, prefill 512: {} tok/s, TTFT ratio with the miner {}",
                d["decode"][0]["figures"]["decode_tok_s"],
                d["decode"][1]["figures"]["decode_tok_s"],
                d["decode"][2]["figures"]["decode_tok_s"],
                d["prefill_512"]["prefill_tok_s"],
                d["mining_in_the_gaps"]["ttft_ratio_p99"]
            ),
        },
        GpuCheckSection::All => String::new(),
    }
}

/// The CUDA libraries this process has loaded, from where (`/proc/self/maps`): which
/// `libcuda`, `libnvrtc`, `libcublas`, … each name resolved to.
fn loaded_cuda_libraries() -> Value {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Value::Null;
    };
    let mut paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            let file = p.rsplit('/').next().unwrap_or("");
            [
                "libcuda",
                "libnvrtc",
                "libcublas",
                "libcudart",
                "libcurand",
                "libnvidia-ml",
            ]
            .iter()
            .any(|n| file.starts_with(n))
        })
        .collect();
    paths.sort_unstable();
    paths.dedup();
    json!(paths)
}

fn kernel_part(args: &BenchGpuCheckArgs) -> Value {
    let (mut l, kernel_info, launcher_error) = launcher(args.gpu);
    let on_gpu = kernel_info.is_some();
    let sizes = if on_gpu && !args.quick {
        Sizes::GPU
    } else {
        Sizes::STAND_IN
    };
    let device = power::device_facts();
    let idle_w = power::Sampler::start(on_gpu).finish_after(std::time::Duration::from_secs(2));
    tracing::info!(backend = l.name(), "gpu-check: correctness");
    let correctness = json!({
        "genesis": kernel::known_block(l.as_mut(), "genesis", sizes.around_known),
        "block_125552": kernel::known_block(l.as_mut(), "125552", sizes.around_known),
        "random_vs_cpu": kernel::random_agreement(l.as_mut(), sizes.random_nonces),
    });
    tracing::info!("gpu-check: hashrate");
    let sampler = power::Sampler::start(on_gpu);
    let rates: Vec<Value> = [1, 4, 16]
        .into_iter()
        .map(|every| kernel::hashrate(l.as_mut(), &sizes, every))
        .collect();
    let mining_w = sampler.finish();
    let best_ghs = rates
        .iter()
        .filter_map(|r| r["ghs"].as_f64())
        .fold(0.0, f64::max);
    let ceiling = kernel_info.as_ref().map(ceiling_ghs);
    tracing::info!("gpu-check: pre-emption");
    let preempt = kernel::preempt(l, &sizes);
    json!({
        "gpu": device.filter(|_| on_gpu),
        "launcher_error": launcher_error,
        "backend": if on_gpu { "cuda" } else { "cpu-grid" },
        "sizes": format!("{sizes:?}"),
        "kernel": kernel_info,
        "correctness": correctness,
        "hashrate": rates,
        "best_ghs": best_ghs,
        "ceiling_ghs": ceiling,
        "achieved_over_ceiling": ceiling.map(|c| best_ghs / c),
        "preempt": preempt,
        "power_w": {"idle": idle_w, "mining": mining_w},
        "j_per_gh": mining_w.filter(|_| best_ghs > 0.0).map(|w| w / best_ghs),
        "libraries": loaded_cuda_libraries(),
    })
}

async fn serving_part(args: BenchGpuCheckArgs) -> Value {
    if injected("serving") {
        panic!("injected serving failure");
    }
    let gpu = args.gpu;
    let model = args.model.clone();
    tokio::task::spawn_blocking(move || {
        let mut doc = serving::agreement_part(gpu, model.as_deref());
        doc["libraries"] = loaded_cuda_libraries();
        doc
    })
    .await
    .unwrap_or_else(|e| json!({"error": e.to_string()}))
}

async fn speed_part(args: BenchGpuCheckArgs) -> Value {
    let Some(model) = &args.model else {
        return json!({"skipped": "no --model given"});
    };
    match crate::model::device_from_name(&format!("cuda:{}", args.gpu)) {
        Ok(_) => serving::speed(model, args.gpu).await,
        Err(e) => {
            json!({"skipped": format!("no CUDA device: {}", serving::first_line(&e.to_string()))})
        }
    }
}

/// Integer-pipe operations per nonce of the scan loop, counted in its SASS for sm_90
/// (`nvcc -cubin -arch=sm_90 -O3` 13.0, `cuobjdump -sass` 13.2; docs/src/gpu.md, "The CUDA kernel"):
/// the loop is 2,585 instructions a nonce, SHF 1,176 + LOP3 638 + IADD3 414 + VIADD 51 +
/// ISETP 11 of them on the integer pipe (IMAD's 201 go to the FMA pipe).
const INT_OPS_PER_NONCE: f64 = 2290.0;

/// The kernel's ceiling: multiprocessors × 64 integer lanes × clock ÷ operations per nonce.
fn ceiling_ghs(k: &Value) -> f64 {
    let sms = k["multiprocessors"].as_f64().unwrap_or(0.0);
    let mhz = k["clock_mhz"].as_f64().unwrap_or(0.0);
    sms * 64.0 * mhz * 1e6 / INT_OPS_PER_NONCE / 1e9
}
