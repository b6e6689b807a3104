//! The GPU half on a real GPU (`cargo test --release --features cuda --test gpu_cuda` on a
//! machine with an NVIDIA GPU and a Rust toolchain). Each test skips, saying so, when no
//! device answers. CI compiles them; scripts/gpu-check runs the same checks from the binary
//! on GPU machines that have no Rust.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use idlerig::bench::gpu_check::kernel::{known_block, random_agreement};
use idlerig::mining::gpu::cuda::{CudaConfig, CudaLauncher};
use idlerig::mining::gpu::{GpuMiner, GpuMinerConfig};
use idlerig::mining::job::Job;
use idlerig::mining::{Miner, PreemptFlag, WorkSource, U256};

fn cuda() -> Option<CudaLauncher> {
    match CudaLauncher::new(0, CudaConfig::default()) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device answered ({e})");
            None
        }
    }
}

#[test]
fn the_kernel_finds_known_nonces_and_agrees_with_the_cpu() {
    let Some(mut l) = cuda() else { return };
    eprintln!("{:?}", l.info());
    for block in ["genesis", "125552"] {
        let r = known_block(&mut l, block, 1 << 20);
        assert_eq!(r["ok"], true, "{block}: {r}");
    }
    let r = random_agreement(&mut l, 1 << 24);
    assert_eq!(r["equal"], true, "{r}");
}

#[test]
fn every_nonce_is_reported_exactly_once_under_random_preemptions() {
    let Some(l) = cuda() else { return };
    const SPACE: u64 = 1 << 22;
    let job = Job {
        job_id: "cuda".into(),
        prevhash: [1; 32],
        coinb1: vec![1],
        coinb2: vec![2],
        merkle_branch: vec![],
        version: 0x2000_0000,
        nbits: 0x1703_4219,
        ntime: 0x6650_0000,
        clean_jobs: true,
    };
    // Every nonce is a share: the shares are the nonces hashed, with multiplicity.
    let (tx, mut rx) = idlerig::mining::share_channel(1 << 20);
    let flag = PreemptFlag::default();
    flag.raise();
    let cfg = GpuMinerConfig {
        waves_per_launch: 64,
        check_every: 1,
        nonce_space: SPACE,
    };
    let m = GpuMiner::start(Box::new(l), cfg, flag, tx);
    let stats = m.stats();
    m.set_work(WorkSource::new(job, vec![7; 4], 4, U256::MAX, 0));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut x = 88172645463325252u64;
    while stats.units_done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline);
        m.resume();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let until = Instant::now() + Duration::from_micros(x % 3000);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        m.preempt_flag().raise();
        while m.active_workers() > 0 {
            std::hint::spin_loop();
        }
    }
    let mut by_unit: BTreeMap<Vec<u8>, Vec<u32>> = BTreeMap::new();
    for s in std::iter::from_fn(|| rx.try_recv()) {
        by_unit.entry(s.extranonce2).or_default().push(s.nonce);
    }
    for unit in [vec![0u8, 0, 0, 0], vec![1, 0, 0, 0]] {
        let mut got = by_unit.remove(&unit).unwrap_or_default();
        got.sort_unstable();
        assert!(
            got == (0..SPACE as u32).collect::<Vec<_>>(),
            "unit {unit:?}: {} nonces",
            got.len()
        );
    }
    let latencies = m.take_preempt_latencies();
    eprintln!("{} pre-emptions measured", latencies.len());
}

#[test]
fn serving_on_the_gpu_agrees_with_the_cpu_twin() {
    let Ok(device) = idlerig::model::device_from_name("cuda:0") else {
        eprintln!("SKIPPED: no CUDA device answered");
        return;
    };
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(idlerig::config::DEFAULT_MODEL_RELATIVE);
    let v = idlerig::bench::gpu_check::serving::agreements(
        &model,
        &device,
        Default::default(),
        &[1, 8, 9, 32],
    )
    .unwrap();
    for b in v["batches"].as_array().unwrap() {
        assert_eq!(b["ok"], true, "{b}");
    }
}

/// NVRTC needs no GPU: the kernel compiles here for the H100's architecture, and both images
/// come out, the cubin (an ELF for sm_90, loaded first) and the PTX (the fallback, chosen when
/// it is asked for: `IDLERIG_KERNEL_IMAGE=ptx`). Skips, saying so, where no libnvrtc loads.
#[test]
fn nvrtc_gives_the_cubin_first_and_the_ptx_when_forced() {
    use idlerig::mining::gpu::nvrtc::{compile, version, ImageKind};
    if let Err(e) = version() {
        eprintln!("SKIPPED: NVRTC did not load ({e})");
        return;
    }
    let source = idlerig::mining::gpu::cuda::KERNEL_SOURCE;
    let c = compile(source, "sha256d.cu", "sm_90").expect("the kernel compiles for sm_90");
    eprintln!(
        "NVRTC {} compiled the kernel in {:.0} ms",
        c.nvrtc_version, c.compile_ms
    );
    let (kind, cubin) = c.image(ImageKind::Cubin).unwrap();
    assert_eq!(kind, ImageKind::Cubin);
    assert!(cubin.starts_with(b"\x7fELF"), "a cubin is an ELF image");
    let (kind, ptx) = c.image(ImageKind::Ptx).unwrap();
    assert_eq!(kind, ImageKind::Ptx);
    let ptx = String::from_utf8_lossy(ptx);
    assert!(
        ptx.contains(".target sm_90") && ptx.contains("sha256d_scan"),
        "{}",
        &ptx[..400.min(ptx.len())]
    );
    assert!(
        ptx.ends_with('\0'),
        "NUL-terminated, as the driver's loader reads it"
    );
    // A source that does not compile: NVRTC's log, as the error.
    let err = compile("this is not CUDA", "bad.cu", "sm_90")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("bad.cu"), "{err}");
}
