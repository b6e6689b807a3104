//! Model code of our own, on candle-core and candle-nn: one decoder, configured per family
//! (Llama, Qwen2/3, Phi-3, Gemma 2/3), that runs a batch of sequences, each at its own
//! position with its own KV cache, and the loaders that build it from a GGUF file or a
//! Hugging Face safetensors directory.
//!
//! Nothing here knows about requests, tokenizers or HTTP; the engine owns a [`Decoder`] and the
//! [`SeqCache`]s of its sequences and calls [`Decoder::forward`] once per step.

mod cache;
pub mod config;
mod decoder;
mod dense;
pub mod paged;
pub mod quant;
mod residual_norm;
mod rope;
mod suspend;
mod swiglu;
mod weights;

pub use cache::SeqCache;
pub use config::{Arch, ModelConfig};
pub use decoder::{BatchItem, Decoder};
pub use weights::{gguf_int, LoadOptions, ModelFiles, ModelFormat};

use thiserror::Error;

/// Why a model could not be loaded or run.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The step was abandoned between two layers (interactive work arrived).
    #[error("the step was interrupted")]
    Interrupted,
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    #[error("the KV cache is full (raise --kv-cache-mb)")]
    KvCacheFull,
}

/// The candle device for a `--device` value: `cpu` or `cuda:N`.
pub fn device_from_name(name: &str) -> Result<candle_core::Device, ModelError> {
    match cuda_ordinal(name)? {
        None => Ok(candle_core::Device::Cpu),
        // One explicit stream for every thread: the model loads on one thread and runs on
        // another, and candle's default per-thread streams would not order the two.
        Some(idx) if cfg!(feature = "cuda") => {
            let device = candle_core::Device::new_cuda_with_stream(idx)?;
            #[cfg(feature = "cuda")]
            if let candle_core::Device::Cuda(d) = &device {
                // candle serves on this one stream: with event tracking on (cudarc's default
                // once a context has a stream of its own), every allocation records an event
                // and every use of an operand waits on one, for nothing.
                // SAFETY: nothing is allocated on this device yet, and candle uses no stream
                // but this one (the miner has a context handle and stream of its own).
                unsafe { d.disable_event_tracking() };
            }
            Ok(device)
        }
        Some(_) => Err(ModelError::Unsupported(format!(
            "device `{name}`: this build has no CUDA support (build with --features cuda)"
        ))),
    }
}

/// The GPU ordinal a `--device` names (`cuda`, `cuda:N`), or `None` for `cpu`.
pub fn cuda_ordinal(name: &str) -> Result<Option<usize>, ModelError> {
    if name == "cpu" {
        return Ok(None);
    }
    match name
        .strip_prefix("cuda:")
        .or((name == "cuda").then_some("0"))
    {
        Some(idx) => idx
            .parse()
            .map(Some)
            .map_err(|_| ModelError::Unsupported(format!("device `{name}`: expected cuda:N"))),
        None => Err(ModelError::Unsupported(format!(
            "device `{name}`: expected `cpu` or `cuda:N`"
        ))),
    }
}
