//! `idlerig bench gpu-check`: everything the GPU half needs proven, in one run and one JSON
//! document, for the first machine with an NVIDIA GPU (no Rust or network needed there; see
//! `scripts/gpu-check`). It reports the device, the kernel's compile figures, its correctness
//! on real blocks and against the CPU, its hashrate at three flag intervals, pre-emption
//! latency with lost and duplicate nonces counted, serving figures when a model is given, and
//! power. Without a GPU it says so (`"gpu": null`), runs the kernel checks on the CPU
//! stand-in at small sizes, and succeeds.

pub mod kernel;
mod power;
pub mod serving;

use serde_json::{json, Value};

use crate::config::BenchGpuCheckArgs;
use crate::mining::gpu::{CpuGridLauncher, Geometry, ScanLauncher};
pub use kernel::Sizes;

/// The launcher to check: CUDA on GPU `ordinal` when this build and machine have one, else
/// the CPU stand-in. The second value says why there is no GPU.
fn launcher(ordinal: usize) -> (Box<dyn ScanLauncher>, Option<Value>, Option<String>) {
    #[cfg(feature = "cuda")]
    {
        use crate::mining::gpu::cuda::{CudaConfig, CudaLauncher};
        match CudaLauncher::new(ordinal, CudaConfig::default()) {
            Ok(l) => {
                let info = serde_json::to_value(l.info()).unwrap_or(Value::Null);
                return (Box::new(l), Some(info), None);
            }
            Err(e) => return (stand_in(), None, Some(e.to_string())),
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

/// Runs every check; the figures as one JSON document.
pub async fn run(args: BenchGpuCheckArgs) -> Result<Value, String> {
    let model = args.model.clone();
    let gpu = args.gpu;
    let mut doc = tokio::task::spawn_blocking(move || check(&args))
        .await
        .map_err(|e| e.to_string())?;
    let on_gpu = doc["backend"] == "cuda";
    doc["serving"] = match &model {
        Some(_) if !on_gpu => json!({"skipped": "no GPU: serving figures need CUDA"}),
        Some(model) => {
            tracing::info!("gpu-check: serving");
            serving::figures(model, gpu).await
        }
        None => json!({"skipped": "no --model given"}),
    };
    if let Some(dir) = std::env::var_os("OUT") {
        let path = std::path::Path::new(&dir).join("gpu-check.json");
        let _ = std::fs::create_dir_all(&dir);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
        )
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(doc)
}

fn check(args: &BenchGpuCheckArgs) -> Value {
    let (mut l, kernel_info, no_gpu) = launcher(args.gpu);
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
    let ceiling = kernel_info.as_ref().map(|k| ceiling_ghs(k));
    tracing::info!("gpu-check: pre-emption");
    let preempt = kernel::preempt(l, &sizes);
    json!({
        "gpu": device.filter(|_| on_gpu),
        "no_gpu_reason": no_gpu,
        "backend": if on_gpu { "cuda" } else { "cpu-grid" },
        "sizes": format!("{sizes:?}"),
        "kernel": kernel_info,
        "correctness": correctness,
        "hashrate": rates,
        "ceiling_ghs": ceiling,
        "achieved_over_ceiling": ceiling.map(|c| best_ghs / c),
        "preempt": preempt,
        "power_w": {"idle": idle_w, "mining": mining_w},
        "j_per_gh": mining_w.filter(|_| best_ghs > 0.0).map(|w| w / best_ghs),
    })
}

/// Integer-pipe operations per nonce of the scan loop, counted in its SASS for sm_90
/// (`nvcc -cubin -arch=sm_90 -O3` 13.0, `cuobjdump -sass` 13.2; README, "The CUDA kernel"):
/// the loop is 2,585 instructions a nonce, SHF 1,176 + LOP3 638 + IADD3 414 + VIADD 51 +
/// ISETP 11 of them on the integer pipe (IMAD's 201 go to the FMA pipe).
const INT_OPS_PER_NONCE: f64 = 2290.0;

/// The kernel's ceiling: multiprocessors × 64 integer lanes × clock ÷ operations per nonce.
fn ceiling_ghs(k: &Value) -> f64 {
    let sms = k["multiprocessors"].as_f64().unwrap_or(0.0);
    let mhz = k["clock_mhz"].as_f64().unwrap_or(0.0);
    sms * 64.0 * mhz * 1e6 / INT_OPS_PER_NONCE / 1e9
}
