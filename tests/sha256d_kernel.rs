//! The CUDA scan kernel's arithmetic, checked without a GPU: `kernels/sha256d.cu` compiles as
//! C++ as well, so its per-nonce function (all of the hashing: the host's per-job
//! precomputation in `GpuJob`, rounds 3..63 of the header's second block, the second hash to
//! round 60 and the early test on the last word) runs here against idlerig's own SHA-256d, on
//! the genesis block and on random headers. The launch, the pre-emption flag and NVRTC need a
//! GPU and are tested behind the `cuda` feature on one.

use std::io::Write;
use std::process::{Command, Stdio};

use idlerig::mining::gpu::GpuJob;
use idlerig::mining::sha256::{hash_header_words, header_tail, midstate};

const HARNESS: &str = r#"
#include KERNEL
#include <stdio.h>
int main(void) {
    Job j;
    unsigned *w = (unsigned *)&j;
    for (unsigned i = 0; i < sizeof(Job) / 4; i++) if (scanf("%u", &w[i]) != 1) return 2;
    unsigned start, count;
    if (scanf("%u %u", &start, &count) != 2) return 2;
    for (unsigned i = 0; i < count; i++) {
        unsigned n = start + i;
        unsigned top = sha256d_top(j, n);
        printf("%u %u\n", top, top <= j.target_hi);
    }
    return 0;
}
"#;

/// Compiles the harness around the kernel source with the system's C++ compiler, once for
/// all the tests of this file.
fn harness() -> std::path::PathBuf {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(compile).clone()
}

fn compile() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sha256d-kernel");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/sha256d.cu");
    let src = dir.join("harness.cpp");
    std::fs::write(
        &src,
        HARNESS.replace("KERNEL", &format!("\"{}\"", kernel.display())),
    )
    .unwrap();
    let exe = dir.join("harness");
    let out = Command::new("g++")
        .args(["-O2", "-std=c++17", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("g++ (Debian's g++) is needed to compile the kernel as C++");
    assert!(
        out.status.success(),
        "the kernel does not compile as C++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The kernel's (top word, candidate) for `count` nonces from `start`.
fn run(exe: &std::path::Path, job: &GpuJob, start: u32, count: u32) -> Vec<(u32, bool)> {
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input: Vec<String> = job.words().iter().map(u32::to_string).collect();
    input.push(format!("{start} {count}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.join(" ").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            let top = it.next().unwrap().parse().unwrap();
            (top, it.next() == Some("1"))
        })
        .collect()
}

fn genesis_header() -> [u8; 80] {
    let hex = "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c";
    let bytes: Vec<u8> = (0..80)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

#[test]
fn the_kernel_finds_the_genesis_nonce_and_only_it() {
    let exe = harness();
    let header = genesis_header();
    const NONCE: u32 = 2_083_236_893;
    // Difficulty 1: the hash's top 32 bits must be zero.
    let job = GpuJob::new(&midstate(&header), &header_tail(&header), 0);
    let out = run(&exe, &job, NONCE - 2000, 4001);
    let found: Vec<u32> = out
        .iter()
        .enumerate()
        .filter(|(_, (_, c))| *c)
        .map(|(i, _)| NONCE - 2000 + i as u32)
        .collect();
    assert_eq!(found, vec![NONCE]);
}

#[test]
fn the_kernel_agrees_with_the_cpu_on_random_headers() {
    let exe = harness();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for case in 0..4 {
        let header: [u8; 80] = std::array::from_fn(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        });
        let (mid, tail) = (midstate(&header), header_tail(&header));
        // An easy target (one nonce in 16 is a candidate), so the test is exercised both ways.
        let target_hi = 0x0FFF_FFFF;
        let job = GpuJob::new(&mid, &tail, target_hi);
        let start = (x >> 7) as u32;
        let out = run(&exe, &job, start, 3000);
        let mut candidates = 0;
        for (i, (top, candidate)) in out.iter().enumerate() {
            let nonce = start.wrapping_add(i as u32);
            let want = hash_header_words(&mid, &tail, nonce)[7].swap_bytes();
            assert_eq!(*top, want, "case {case}, nonce {nonce:#x}");
            assert_eq!(*candidate, want <= target_hi);
            candidates += usize::from(*candidate);
        }
        assert!(candidates > 0, "case {case}: no candidate in 3000 nonces");
    }
}
