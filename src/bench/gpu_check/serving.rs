//! gpu-check's serving and speed figures on GPU `N`: the log-probabilities on CUDA against the
//! CPU twin of the CUDA path (candle's quantized kernels, dense caches) for the tiny model of
//! every architecture (`tests/reference/arch/*.gguf`, which travel with the working tree) at
//! batches of 1 and 9 and for the given model at 1, 8, 9 and 32; then `bench infer` (decode at
//! 1, 8 and 32 streams, prefill at 512 tokens, TTFT) and `bench preempt` (the same schedule
//! with the GPU miner in the gaps and without).

use std::path::Path;

use candle_core::Device;
use clap::Parser;
use serde_json::{json, Value};

use super::power::Sampler;
use crate::config::{BenchCommand, Cli, Command};
use crate::model::{BatchItem, Decoder, LoadOptions, ModelFiles};

/// Two implementations that round 8-bit activations differently move the log-probabilities
/// of the 20 likeliest tokens by about 0.1 on average (idlerig's paged and dense CPU paths,
/// tests/kv_cache.rs), and llama.cpp moves its own by up to 0.48 when only its KV precision
/// changes (tests/reference): twice that is the bound on the largest difference. A wiring
/// fault moves them by whole units.
const MEAN_TOLERANCE: f64 = 0.2;
const MAX_TOLERANCE: f64 = 1.0;
/// Below this top-2 margin, two correct implementations may pick different tokens.
const NEAR_TIE: f32 = 0.5;

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = v.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
    v.iter().map(|x| x - lse).collect()
}

/// (mean, max |Δ| over the reference's top 20, top token differs outside a near-tie).
fn compare(reference: &[f32], other: &[f32]) -> (f64, f64, bool) {
    let (r, o) = (log_softmax(reference), log_softmax(other));
    let mut top: Vec<usize> = (0..r.len()).collect();
    top.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
    let d: Vec<f64> = top[..20]
        .iter()
        .map(|&i| f64::from((r[i] - o[i]).abs()))
        .collect();
    let other_top = (0..o.len())
        .max_by(|&a, &b| o[a].total_cmp(&o[b]))
        .unwrap_or(0);
    let flipped = other_top != top[0] && r[top[0]] - r[top[1]] >= NEAR_TIE;
    (
        d.iter().sum::<f64>() / 20.0,
        d.iter().copied().fold(0.0, f64::max),
        flipped,
    )
}

/// candle's errors may carry a backtrace after their first line.
pub(super) fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn rows(t: candle_core::Tensor) -> Result<Vec<Vec<f32>>, String> {
    t.to_vec2::<f32>().map_err(|e| e.to_string())
}

/// `batch` sequences of different lengths: one batched prefill and 4 batched decode steps on
/// CUDA, each sequence alone on the CPU twin, teacher-forced with the CPU's greedy tokens.
fn agreement(cpu: &mut Decoder, gpu: &mut Decoder, batch: usize) -> Result<Value, String> {
    // Ordinary tokens of a real vocabulary (ids 1000–31000), or any of a tiny one.
    let vocab = cpu.config().vocab_size;
    let token = |x: usize| {
        if vocab > 31_000 {
            1000 + (x % 30_000) as u32
        } else {
            (x % vocab) as u32
        }
    };
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            (0..5 + 7 * (i % 9))
                .map(|j| token(i * 7919 + j * 104_729))
                .collect()
        })
        .collect();
    let mut cpu_caches: Vec<_> = (0..batch).map(|_| cpu.new_cache()).collect();
    let mut gpu_caches: Vec<_> = (0..batch).map(|_| gpu.new_cache()).collect();
    let mut inputs = prompts.clone();
    let (mut means, mut max, mut flips) = (Vec::new(), 0.0f64, 0);
    for _step in 0..5 {
        let mut want = Vec::with_capacity(batch);
        for (toks, cache) in inputs.iter().zip(cpu_caches.iter_mut()) {
            let out = cpu
                .forward(&mut [BatchItem {
                    tokens: toks,
                    cache,
                }])
                .map_err(|e| e.to_string())?;
            want.push(rows(out)?.remove(0));
        }
        let mut items: Vec<BatchItem<'_>> = inputs
            .iter()
            .zip(gpu_caches.iter_mut())
            .map(|(tokens, cache)| BatchItem { tokens, cache })
            .collect();
        let got = rows(gpu.forward(&mut items).map_err(|e| e.to_string())?)?;
        for (w, g) in want.iter().zip(&got) {
            let (mean, m, flipped) = compare(w, g);
            means.push(mean);
            max = max.max(m);
            flips += usize::from(flipped);
        }
        inputs = want
            .iter()
            .map(|w| vec![crate::engine::argmax(w) as u32])
            .collect();
    }
    let mean = means.iter().sum::<f64>() / means.len().max(1) as f64;
    Ok(json!({
        "batch": batch, "rows": means.len(), "mean_abs_dlogprob": mean, "max_abs_dlogprob": max,
        "top_token_flips_outside_near_ties": flips,
        "ok": mean <= MEAN_TOLERANCE && max <= MAX_TOLERANCE && flips == 0,
    }))
}

/// The model on `device` (with `options`) against the CPU twin, at each batch size.
pub fn agreements(
    model: &Path,
    device: &Device,
    options: LoadOptions,
    batches: &[usize],
) -> Result<Value, String> {
    let files = ModelFiles::open(model).map_err(|e| e.to_string())?;
    let twin = LoadOptions {
        own_kernels: false,
        dense_kv: true,
        ..LoadOptions::default()
    };
    let mut cpu = files
        .load_model(&Device::Cpu, twin)
        .map_err(|e| e.to_string())?;
    let mut on_gpu = files
        .load_model(device, options)
        .map_err(|e| e.to_string())?;
    let per_batch = batches
        .iter()
        .map(|&b| agreement(&mut cpu, &mut on_gpu, b))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({
        "reference": "CPU twin: candle's quantized kernels, dense KV",
        "tolerance": format!("mean |Δlogprob| of the top 20 ≤ {MEAN_TOLERANCE}, max ≤ {MAX_TOLERANCE}, same top token unless its margin < {NEAR_TIE}"),
        "batches": per_batch,
    }))
}

fn infer_args(model: &str, device: &str, prompt: usize, gen: usize, streams: usize) -> Vec<String> {
    [
        "infer",
        "--model",
        model,
        "--device",
        device,
        "--prompt-tokens",
        &prompt.to_string(),
        "--gen-tokens",
        &gen.to_string(),
        "--concurrency",
        &streams.to_string(),
        "--requests",
        &(2 * streams).to_string(),
        "--rounds",
        "1",
        "--max-running",
        "64",
    ]
    .map(String::from)
    .to_vec()
}

fn preempt_args(model: &str, device: &str) -> Vec<String> {
    [
        "preempt",
        "--model",
        model,
        "--device",
        device,
        "--requests",
        "32",
        "--rounds",
        "4",
        "--rate",
        "4",
        "--idle-seconds",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

async fn bench(argv: &[String]) -> Value {
    let mut full = vec!["idlerig".to_string(), "bench".into()];
    full.extend_from_slice(argv);
    let Ok(cli) = Cli::try_parse_from(&full) else {
        return json!({"error": format!("bad arguments {argv:?}")});
    };
    let result = match cli.command {
        Command::Bench(BenchCommand::Infer(a)) => crate::bench::infer::run(a).await,
        Command::Bench(BenchCommand::Preempt(a)) => crate::bench::preempt::run(a).await,
        _ => Err("not a benchmark".into()),
    };
    result.unwrap_or_else(|e| json!({ "error": e }))
}

/// The serving part: CUDA on GPU `gpu` against the CPU twin, on every tiny architecture
/// model and on `model` if given. Whether there is a device is decided here, by opening it
/// (not by whether the miner's launcher started). Without one the same comparisons run on the
/// CPU's own paths in CUDA's place, so the check itself is exercised, and the part says so.
/// Errors are reported in place, never fatal.
pub fn agreement_part(gpu: usize, model: Option<&Path>) -> Value {
    let (device, note) = match crate::model::device_from_name(&format!("cuda:{gpu}")) {
        Ok(d) => (d, "CUDA against the CPU twin".to_string()),
        Err(e) => (
            Device::Cpu,
            format!(
                "no CUDA device ({}): the CPU's paged path stands in for CUDA",
                first_line(&e.to_string())
            ),
        ),
    };
    let on_gpu = device.is_cuda();
    let architectures = architecture_agreements(&device);
    // The real model's larger batches only where they mean something: on the GPU.
    let model_check = model.map(|m| {
        let batches: &[usize] = if on_gpu { &[1, 8, 9, 32] } else { &[1, 9] };
        agreements(m, &device, LoadOptions::default(), batches)
            .unwrap_or_else(|e| json!({ "error": e }))
    });
    json!({
        "gpu": on_gpu.then_some(gpu),
        "device": if on_gpu { format!("cuda:{gpu}") } else { "cpu (stand-in)".into() },
        "device_note": note,
        "architectures": architectures,
        "model": model_check,
    })
}

/// The speed part on GPU `gpu`: decode at 1, 8 and 32 streams, prefill at 512 tokens, and the
/// same schedule with the GPU miner in the gaps and without. Errors are reported in place.
pub async fn speed(model: &Path, gpu: usize) -> Value {
    let (m, dev) = (model.display().to_string(), format!("cuda:{gpu}"));
    let infer = |prompt: usize, gen: usize, c: usize| infer_args(&m, &dev, prompt, gen, c);
    let mut decode = Vec::new();
    let mut serving_w = None;
    for streams in [1, 8, 32] {
        let sampler = Sampler::start(true);
        decode.push(json!({"streams": streams, "figures": bench(&infer(128, 64, streams)).await}));
        let w = sampler.finish();
        if streams == 32 {
            serving_w = w;
        }
    }
    let prefill = bench(&infer(512, 8, 1)).await;
    let with_miner = bench(&preempt_args(&m, &dev)).await;
    json!({
        "decode": decode,
        "prefill_512": prefill,
        "mining_in_the_gaps": with_miner,
        "power_w_serving_32_streams": serving_w,
    })
}

/// Each tiny architecture model under `tests/reference/arch` (the working tree's, where
/// gpu-check runs) on `device` against its CPU twin, at batches of 1 and 9.
fn architecture_agreements(device: &Device) -> Value {
    let dir = Path::new("tests/reference/arch");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return json!({"error": format!("{} is not here (run from the repository)", dir.display())});
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    paths.sort();
    let per_model: serde_json::Map<String, Value> = paths
        .iter()
        .map(|p| {
            let name = p
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into());
            let v = agreements(p, device, LoadOptions::default(), &[1, 9])
                .unwrap_or_else(|e| json!({ "error": e }));
            (name, v)
        })
        .collect();
    Value::Object(per_model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_command_lines_parse() {
        for argv in [
            infer_args("m.gguf", "cuda:0", 512, 8, 1),
            preempt_args("m.gguf", "cuda:0"),
        ] {
            let mut full = vec!["idlerig".to_string(), "bench".into()];
            full.extend(argv);
            assert!(Cli::try_parse_from(&full).is_ok(), "{full:?}");
        }
    }

    /// The comparison itself, run with the CPU's paged path in the GPU's place: it passes the
    /// stated tolerance there, as the GPU must.
    #[test]
    fn the_agreement_check_passes_the_cpus_own_paths() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(crate::config::DEFAULT_MODEL_RELATIVE);
        let v = agreements(&model, &Device::Cpu, LoadOptions::default(), &[1, 9]).unwrap();
        for b in v["batches"].as_array().unwrap() {
            assert_eq!(b["ok"], true, "{b}");
        }
        assert_eq!(v["batches"][1]["rows"], 9 * 5);
        // And every architecture's tiny model (prompts within its 320-token vocabulary).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/arch");
        for arch in ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"] {
            let path = dir.join(format!("{arch}.gguf"));
            let v = agreements(&path, &Device::Cpu, LoadOptions::default(), &[1, 9]).unwrap();
            for b in v["batches"].as_array().unwrap() {
                assert_eq!(b["ok"], true, "{arch}: {b}");
            }
        }
    }
}
