//! Benchmarks behind `idlerig bench …`: each runs the real code paths (the HTTP server, the
//! engine, the miner) and prints one JSON line of figures.

pub mod flex;
pub mod gpu_check;
pub mod grammar;
pub mod infer;
pub mod llama_cpp;
pub mod mine;
pub mod preempt;
pub mod saturate;
