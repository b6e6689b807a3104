//! Compiles the CPU stand-in of the CUDA scan kernel (`kernels/cpu_grid.cpp`, which includes
//! `kernels/sha256d.cu` itself) so that the GPU miner's host protocol runs in every build,
//! with or without a GPU. The CUDA build compiles the same kernel source at run time (NVRTC).

fn main() {
    println!("cargo:rerun-if-changed=kernels/sha256d.cu");
    println!("cargo:rerun-if-changed=kernels/cpu_grid.cpp");
    cc::Build::new()
        .cpp(true)
        .file("kernels/cpu_grid.cpp")
        .flag_if_supported("-std=c++17")
        // The kernel's `#pragma unroll` is for nvcc and NVRTC.
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(3)
        .compile("idlerig_cpu_grid");
}
