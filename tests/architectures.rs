//! Every architecture idlerig runs, against llama.cpp, on tiny random-weight models of each
//! family: `tests/reference/make_arch_reference.py` wrote the GGUFs (with llama.cpp's own
//! writer and quantizer, in the quantization real files of that family use) and recorded
//! llama.cpp's log-probabilities at every position of a fixed token sequence, at f32 KV and
//! again at its default f16 KV (how far llama.cpp moves from itself).
//!
//! The sequence is fed to idlerig (teacher forcing) in three ways at once, so that every
//! position is checked after a whole prefill, a chunked one and plain decoding: one sequence
//! prefills 20 tokens and then decodes, one decodes from the first token, one prefills in
//! chunks of 7. Each runs alone (batch 1) and all three share every step (batched), on the
//! paged cache with our kernels, and on the CUDA path's CPU twin (dense caches, candle's
//! kernels). At every position:
//! - idlerig picks llama.cpp's top token wherever llama.cpp's top-1/top-2 margin is at least
//!   [`NEAR_TIE`];
//! - the mean |Δ log-probability| over llama.cpp's top 8 tokens and the next token stays within
//!   twice llama.cpp's own f32/f16 spread, and the largest within twice its largest.

mod common;

use idlerig::model::{BatchItem, LoadOptions, ModelFiles, SeqCache};
use serde_json::Value;

const NEAR_TIE: f64 = 0.5;

fn reference() -> Value {
    serde_json::from_str(include_str!("reference/arch_reference.json")).expect("reference JSON")
}

/// The chunk sizes each of the three sequences feeds per step.
fn schedules(len: usize) -> Vec<Vec<usize>> {
    let chunks = |first: usize, rest: usize| {
        let mut v = vec![first.min(len)];
        while v.iter().sum::<usize>() < len {
            let left = len - v.iter().sum::<usize>();
            v.push(rest.min(left));
        }
        v
    };
    vec![chunks(20, 1), chunks(1, 1), chunks(7, 7)]
}

/// Runs the schedules (alone or sharing steps) and returns, per position, idlerig's
/// log-probabilities there (from whichever sequence computed it last).
fn run(
    files: &ModelFiles,
    options: LoadOptions,
    tokens: &[u32],
    batched: bool,
) -> Vec<Vec<Option<Vec<f64>>>> {
    let mut model = files
        .load_model(&candle_core::Device::Cpu, options)
        .expect("the tiny model loads");
    let plans = schedules(tokens.len());
    let mut out = vec![vec![None; tokens.len()]; plans.len()];
    let groups: Vec<Vec<usize>> = if batched {
        vec![(0..plans.len()).collect()]
    } else {
        (0..plans.len()).map(|s| vec![s]).collect()
    };
    for group in groups {
        let mut caches: Vec<SeqCache> = group.iter().map(|_| model.new_cache()).collect();
        let mut steps = vec![0usize; group.len()];
        loop {
            let (mut items, mut spans) = (Vec::new(), Vec::new());
            for (g, cache) in caches.iter_mut().enumerate() {
                let s = group[g];
                if let Some(&n) = plans[s].get(steps[g]) {
                    let start: usize = plans[s][..steps[g]].iter().sum();
                    items.push(BatchItem {
                        tokens: &tokens[start..start + n],
                        cache,
                    });
                    spans.push((g, s, start, n));
                }
            }
            if spans.is_empty() {
                break;
            }
            let logits = model.forward(&mut items).expect("forward");
            let rows = logits.to_vec2::<f32>().expect("logits");
            for (&(g, s, start, n), row) in spans.iter().zip(rows) {
                out[s][start + n - 1] = Some(common::log_softmax(&row));
                steps[g] += 1;
            }
        }
        for mut c in caches {
            model.kv_release(&mut c);
        }
    }
    out
}

fn check(name: &str, options: LoadOptions, path_kind: &str) {
    let reference = reference();
    let tokens: Vec<u32> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    let case = &reference["models"][name];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let path = root.join(case["file"].as_str().unwrap());
    let bytes = std::fs::read(&path).expect("the tiny model is committed");
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    assert_eq!(
        digest,
        case["sha256"].as_str().unwrap(),
        "{name}: the GGUF is not the one the reference was made from"
    );
    let files = ModelFiles::open(&path).expect("the tiny model opens");
    let spread_mean = case["self_spread"]["mean"].as_f64().unwrap();
    let spread_max = case["self_spread"]["max"].as_f64().unwrap();
    let positions = case["positions"].as_array().unwrap();
    for batched in [false, true] {
        let ours = run(&files, options, &tokens, batched);
        let (mut sum, mut count, mut worst) = (0.0f64, 0usize, 0.0f64);
        let mut flips = Vec::new();
        for (seq, per_pos) in ours.iter().enumerate() {
            for (p, lp) in per_pos.iter().enumerate() {
                let Some(lp) = lp else { continue };
                let r = &positions[p];
                let top: Vec<usize> = serde_json::from_value(r["top"].clone()).unwrap();
                let top_lp: Vec<f64> = serde_json::from_value(r["top_logprobs"].clone()).unwrap();
                let mut ids: Vec<(usize, f64)> = top.iter().copied().zip(top_lp).collect();
                ids.push((
                    r["next"].as_u64().unwrap() as usize,
                    r["next_logprob"].as_f64().unwrap(),
                ));
                for (id, want) in ids {
                    let d = (lp[id] - want).abs();
                    sum += d;
                    count += 1;
                    worst = worst.max(d);
                }
                let argmax = (0..lp.len())
                    .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
                    .unwrap();
                if r["margin"].as_f64().unwrap() >= NEAR_TIE && argmax != top[0] {
                    flips.push((seq, p, argmax, top[0]));
                }
            }
        }
        let mean = sum / count as f64;
        eprintln!(
            "{name} ({path_kind}, {}): mean |Δlogprob| {mean:.4} (llama.cpp f32/f16 spread {spread_mean:.4}), \
             max {worst:.4} (spread {spread_max:.4}), {count} compared",
            if batched { "batched" } else { "batch 1" }
        );
        assert!(
            flips.is_empty(),
            "{name} ({path_kind}): tokens differ where llama.cpp is sure (seq, pos, ours, theirs): {flips:?}"
        );
        assert!(
            mean <= 2.0 * spread_mean,
            "{name} ({path_kind}): mean |Δlogprob| {mean} exceeds twice llama.cpp's spread {spread_mean}"
        );
        assert!(
            worst <= 2.0 * spread_max,
            "{name} ({path_kind}): max |Δlogprob| {worst} exceeds twice llama.cpp's spread {spread_max}"
        );
    }
}

fn paged() -> LoadOptions {
    LoadOptions {
        threads: 2,
        kv_cache_mb: 64,
        ..LoadOptions::default()
    }
}

fn cuda_twin() -> LoadOptions {
    LoadOptions {
        threads: 2,
        own_kernels: false,
        dense_kv: true,
        kv_cache_mb: 64,
        ..LoadOptions::default()
    }
}

macro_rules! arch_tests {
    ($($arch:ident),*) => {
        $(
            mod $arch {
                #[test]
                fn paged_path_agrees_with_llama_cpp() {
                    super::check(stringify!($arch), super::paged(), "paged, our kernels");
                }

                #[test]
                fn cuda_twin_agrees_with_llama_cpp() {
                    super::check(stringify!($arch), super::cuda_twin(), "dense, candle's kernels");
                }
            }
        )*
    };
}

arch_tests!(llama, qwen2, qwen3, phi3, gemma2, gemma3);

/// A copy of the tiny Qwen2 model with `edit` applied to its bytes, in a fresh temporary
/// folder (removed by the caller): a file idlerig must refuse.
fn damaged_qwen2(
    file: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/arch/qwen2.gguf");
    let mut bytes = std::fs::read(src).unwrap();
    edit(&mut bytes);
    let dir = std::env::temp_dir().join(format!("idlerig-{file}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A family idlerig does not run is named in the error, with the ones it runs.
#[test]
fn an_unknown_architecture_is_refused_by_name() {
    // Rename the architecture in place: "qwen2" → "mamba" (same length), key prefixes too.
    let (dir, path) = damaged_qwen2("mamba.gguf", |bytes| {
        let from = b"qwen2";
        let mut i = 0;
        while i + from.len() <= bytes.len() {
            if &bytes[i..i + from.len()] == from {
                bytes[i..i + from.len()].copy_from_slice(b"mamba");
            }
            i += 1;
        }
    });
    let err = ModelFiles::open(&path).err().expect("refused").to_string();
    assert!(err.contains("`mamba`"), "{err}");
    assert!(
        err.contains("qwen3"),
        "the error lists what is supported: {err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A tensor type without a kernel (here IQ4_NL, GGML type 20) is refused at start-up with its
/// name and what to do, not a bare number.
#[test]
fn an_unsupported_tensor_type_is_refused_by_name() {
    // The tensor's entry in the header: name, dimension count (u32), dimensions (u64 each),
    // then its type (u32).
    let (dir, path) = damaged_qwen2("iq4nl.gguf", |bytes| {
        let name = b"blk.0.attn_q.weight";
        let at = bytes
            .windows(name.len())
            .position(|w| w == name)
            .expect("the tensor is listed")
            + name.len();
        let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let ty = at + 4 + 8 * dims;
        bytes[ty..ty + 4].copy_from_slice(&20u32.to_le_bytes());
    });
    let err = ModelFiles::open(&path).err().expect("refused").to_string();
    assert!(err.contains("IQ4_NL"), "{err}");
    assert!(err.contains("llama-quantize"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}
