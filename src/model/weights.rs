//! Finding and opening model weights: a GGUF file (quantized, with its tokenizer and chat
//! template in the metadata) or a Hugging Face directory (`config.json`, `*.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`). Both end up as the same [`Decoder`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::ThreadPool;
use serde::Deserialize;

use super::config::{derived_head_dim, ModelConfig};
use super::decoder::Decoder;
use super::quant::{self as quant, unpack, Linear, Unpacked};
use super::ModelError;

/// How the weights are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Threads for the CPU matrix products (the pool is the model's own).
    pub threads: usize,
    /// Our quantized CPU kernels (`true`), or candle's (`false`, for comparison).
    pub own_kernels: bool,
    /// Size of the paged KV pool on the CPU, or of the dense caches' budget, in MiB (0: dense
    /// per-sequence caches without a limit).
    pub kv_cache_mb: usize,
    /// Dense per-sequence caches under a budget even on the CPU: the layout CUDA serves with,
    /// so that its logic runs in CI (the "CPU twin" of the CUDA path).
    pub dense_kv: bool,
    /// The type a safetensors checkpoint's weights and activations run in; `None`: its own
    /// (`torch_dtype`: f16 or bf16) on CUDA, f32 on the CPU.
    pub dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            own_kernels: true,
            kv_cache_mb: 1024,
            dense_kv: false,
            dtype: None,
        }
    }
}

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

/// A model on disk, located and its header read, weights not yet loaded.
pub struct ModelFiles {
    path: PathBuf,
    format: ModelFormat,
    gguf: Option<gguf_file::Content>,
    config: ModelConfig,
    hf_tie_embeddings: bool,
    /// The checkpoint's own type (`torch_dtype` of config.json), when it is f16 or bf16.
    hf_dtype: Option<DType>,
}

impl ModelFiles {
    /// Opens `path`: a `.gguf` file, or a directory holding either one `.gguf` file or
    /// `config.json` with safetensors.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            if path.join("config.json").exists() {
                return Self::open_hf(path);
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Self::open_gguf(one),
                [] => Err(ModelError::Unsupported(format!(
                    "{} holds neither config.json nor a .gguf file",
                    path.display()
                ))),
                _ => Err(ModelError::Unsupported(format!(
                    "{} holds several .gguf files; name one",
                    path.display()
                ))),
            };
        }
        Self::open_gguf(path)
    }

    fn open_gguf(path: &Path) -> Result<Self, ModelError> {
        let mut file = File::open(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            // candle's message, without the backtrace it may carry.
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            match first
                .strip_prefix("unknown dtype for tensor ")
                .and_then(|n| n.trim().parse::<u32>().ok())
            {
                Some(id) => ModelError::Unsupported(format!(
                    "{}: tensor type {} (GGML type {id}) is not supported; idlerig runs F32,                      F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K types Q2_K to Q6_K                      (requantize the model, e.g. with llama-quantize to Q4_K_M)",
                    path.display(),
                    ggml_type_name(id)
                )),
                None => ModelError::Metadata(format!(
                    "{} is not a readable GGUF file: {first}",
                    path.display()
                )),
            }
        })?;
        let rope_freqs = rope_factors(&content, &mut file, path)?;
        let config = ModelConfig::from_gguf(&content.metadata, rope_freqs)?;
        Ok(Self {
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            gguf: Some(content),
            config,
            hf_tie_embeddings: false,
            hf_dtype: None,
        })
    }

    fn open_hf(dir: &Path) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            path: cfg_path.display().to_string(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Metadata(format!("{}: {e}", cfg_path.display())))?;
        let config = hf.to_config()?;
        Ok(Self {
            path: dir.to_path_buf(),
            format: ModelFormat::Safetensors,
            gguf: None,
            config,
            hf_tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            hf_dtype: match hf.torch_dtype.as_deref() {
                Some("float16") => Some(DType::F16),
                Some("bfloat16") => Some(DType::BF16),
                _ => None,
            },
        })
    }

    pub fn format(&self) -> ModelFormat {
        self.format
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The directory beside the weights, where `tokenizer.json` and friends may sit.
    pub fn dir(&self) -> &Path {
        if self.path.is_dir() {
            &self.path
        } else {
            self.path.parent().unwrap_or(Path::new("."))
        }
    }

    /// A short name for `/v1/models`: the file stem or the directory name.
    pub fn model_id(&self) -> String {
        let name = if self.path.is_dir() {
            self.path.file_name()
        } else {
            self.path.file_stem()
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// GGUF key/value metadata (tokenizer, chat template), if the model is a GGUF file.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        self.gguf.as_ref().map(|c| &c.metadata)
    }

    /// Loads every weight onto `device` and builds the model.
    pub fn load_model(&self, device: &Device, options: LoadOptions) -> Result<Decoder, ModelError> {
        self.load_model_reporting(device, options, &mut |_| {})
    }

    /// As [`Self::load_model`], telling `progress` the fraction loaded as it goes.
    pub fn load_model_reporting(
        &self,
        device: &Device,
        options: LoadOptions,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Decoder, ModelError> {
        let pool = match (device, options.own_kernels) {
            (Device::Cpu, true) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(options.threads.max(1))
                    .thread_name(|i| format!("idlerig-matmul-{i}"))
                    .build()
                    .map_err(|e| ModelError::Unsupported(format!("matmul thread pool: {e}")))?,
            )),
            _ => None,
        };
        let weights = match &self.gguf {
            Some(content) => {
                let file = File::open(&self.path).map_err(|source| ModelError::Io {
                    path: self.path.display().to_string(),
                    source,
                })?;
                Weights::Gguf {
                    content,
                    file,
                    device: device.clone(),
                    config: self.config.clone(),
                    pool,
                }
            }
            None => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
                    .map_err(|source| ModelError::Io {
                        path: self.path.display().to_string(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(ModelError::Unsupported(format!(
                        "no .safetensors file in {}",
                        self.path.display()
                    )));
                }
                // SAFETY: the files are memory-mapped read-only; idlerig never writes them and
                // documents that they must not change while the server runs.
                let dtype = options
                    .dtype
                    .unwrap_or(match (device.is_cuda(), self.hf_dtype) {
                        (true, Some(own)) => own,
                        _ => DType::F32,
                    });
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
                Weights::Safetensors {
                    vb,
                    tie: self.hf_tie_embeddings,
                    config: self.config.clone(),
                }
            }
        };
        Decoder::load(
            weights,
            device,
            options.kv_cache_mb,
            options.dense_kv,
            progress,
        )
    }
}

/// Opened weights, handed to the model's `load` functions, which name each tensor in both
/// conventions (GGUF's `blk.N.attn_q`, Hugging Face's `model.layers.N.self_attn.q_proj`).
pub(crate) enum Weights<'a> {
    Gguf {
        content: &'a gguf_file::Content,
        file: File,
        device: Device,
        config: ModelConfig,
        /// Set when our CPU kernels run the quantized matrices.
        pool: Option<Arc<ThreadPool>>,
    },
    Safetensors {
        vb: VarBuilder<'a>,
        tie: bool,
        config: ModelConfig,
    },
}

impl Weights<'_> {
    /// The pool of our CPU kernels, when they are in use.
    pub(crate) fn pool(&self) -> Option<Arc<ThreadPool>> {
        match self {
            Weights::Gguf { pool, .. } => pool.clone(),
            Weights::Safetensors { .. } => None,
        }
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        match self {
            Weights::Gguf { config, .. } | Weights::Safetensors { config, .. } => config,
        }
    }

    /// Whether the weights are a GGUF file's.
    pub(crate) fn is_gguf(&self) -> bool {
        matches!(self, Weights::Gguf { .. })
    }

    /// Whether a GGUF file holds tensor `name` (always `false` for safetensors).
    pub(crate) fn has_gguf_tensor(&self, name: &str) -> bool {
        match self {
            Weights::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Weights::Safetensors { .. } => false,
        }
    }

    /// A GGUF vector of `len` that a file may leave out (biases), as f32.
    pub(crate) fn optional_vector(
        &mut self,
        name: &str,
        len: usize,
    ) -> Result<Option<Tensor>, ModelError> {
        if !self.has_gguf_tensor(name) {
            return Ok(None);
        }
        self.vector(name, "", len).map(Some)
    }

    fn gguf_tensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor, ModelError> {
        match self {
            Weights::Gguf {
                content,
                file,
                device,
                ..
            } => content
                .tensor(file, name, device)
                .map_err(|e| ModelError::Metadata(format!("tensor {name}: {e}"))),
            Weights::Safetensors { .. } => {
                unreachable!("gguf_tensor is only called on GGUF weights")
            }
        }
    }

    /// Weight matrices used as `x @ W^T`, stacked into one whose output is theirs side by
    /// side; each is named in both conventions without the `.weight`, with the shape
    /// `[out, in]` the configuration gives it (a file that disagrees is refused by name).
    pub(crate) fn linear(
        &mut self,
        parts: &[(&str, &str, [usize; 2])],
    ) -> Result<Linear, ModelError> {
        match self {
            Weights::Gguf { .. } => {
                let tensors = parts
                    .iter()
                    .map(|(gguf, _, want)| {
                        let name = format!("{gguf}.weight");
                        let t = self.gguf_tensor(&name)?;
                        check_shape(&name, t.shape().dims(), want)?;
                        Ok(t)
                    })
                    .collect::<Result<Vec<_>, ModelError>>()?;
                self.quantized_linear(tensors)
            }
            Weights::Safetensors { vb, .. } => Ok(Linear::Candle(
                parts
                    .iter()
                    .map(|(_, hf, want)| {
                        let name = format!("{hf}.weight");
                        let t = vb.get_unchecked(&name)?;
                        check_shape(&name, t.dims(), want)?;
                        Ok(QMatMul::Tensor(t))
                    })
                    .collect::<Result<Vec<_>, ModelError>>()?,
            )),
        }
    }

    /// Our kernels where the pool is set and every part's format has one, else candle's.
    fn quantized_linear(
        &self,
        tensors: Vec<candle_core::quantized::QTensor>,
    ) -> Result<Linear, ModelError> {
        let pool = match self {
            Weights::Gguf { pool: Some(p), .. } => Some(p.clone()),
            _ => None,
        };
        let all_supported = tensors.iter().all(|t| unpack::supported(t.dtype()));
        let pool = match pool {
            Some(pool) if all_supported => pool,
            _ => {
                if pool.is_some() {
                    let kinds: Vec<_> =
                        tensors.iter().map(|t| format!("{:?}", t.dtype())).collect();
                    tracing::debug!(formats = ?kinds, "no idlerig kernel for this format; using candle's");
                }
                return Ok(Linear::Candle(
                    tensors
                        .into_iter()
                        .map(QMatMul::from_qtensor)
                        .collect::<Result<_, _>>()?,
                ));
            }
        };
        let parts = tensors
            .iter()
            .map(|t| {
                let (n, k) = t.shape().dims2()?;
                Ok(unpack::unpack(t.dtype(), &t.data()?, n, k)?)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let isa = quant::Isa::best();
        Ok(Linear::Packed {
            parts: Unpacked::stack_runs(parts)?
                .into_iter()
                .map(|w| quant::Packed::for_isa(w, isa))
                .collect(),
            pool,
        })
    }

    /// A vector of `len` (norm weights), in the activations' type (f32 for GGUF).
    pub(crate) fn vector(
        &mut self,
        gguf: &str,
        hf: &str,
        len: usize,
    ) -> Result<Tensor, ModelError> {
        let (name, t) = match self {
            Weights::Gguf { device, .. } => {
                let device = device.clone();
                (gguf, self.gguf_tensor(gguf)?.dequantize(&device)?)
            }
            Weights::Safetensors { vb, .. } => (hf, vb.get_unchecked(hf)?),
        };
        check_shape(name, t.dims(), &[len])?;
        Ok(t)
    }

    /// Input embeddings (dense, for row lookup) and the output head (quantized when the file
    /// is, tied to the embeddings when the model has no separate output matrix).
    pub(crate) fn embeddings(&mut self) -> Result<(Tensor, Linear), ModelError> {
        match self {
            Weights::Gguf {
                content, device, ..
            } => {
                let device = device.clone();
                let has_output = content.tensor_infos.contains_key("output.weight");
                let embd = self.gguf_tensor("token_embd.weight")?;
                let dense = embd.dequantize(&device)?;
                let head = if has_output {
                    self.gguf_tensor("output.weight")?
                } else {
                    embd
                };
                Ok((dense, self.quantized_linear(vec![head])?))
            }
            Weights::Safetensors { vb, tie, .. } => {
                let embed = vb.get_unchecked("model.embed_tokens.weight")?;
                let head = if *tie || !vb.contains_tensor("lm_head.weight") {
                    embed.clone()
                } else {
                    vb.get_unchecked("lm_head.weight")?
                };
                Ok((embed, Linear::Candle(vec![QMatMul::Tensor(head)])))
            }
        }
    }
}

/// A tensor whose shape is not what the configuration says is refused, naming both.
fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<(), ModelError> {
    if got == want {
        Ok(())
    } else {
        Err(ModelError::Metadata(format!(
            "tensor `{name}` has shape {got:?}; the model's configuration needs {want:?}"
        )))
    }
}

/// The per-frequency rotary factors a GGUF file carries: Llama 3.1's `rope_freqs.weight`, or
/// Phi-3's `rope_factors_short.weight` (the ones for contexts within the original; see
/// [`ModelConfig::from_gguf`]).
fn rope_factors(
    content: &gguf_file::Content,
    file: &mut File,
    path: &Path,
) -> Result<Option<Vec<f32>>, ModelError> {
    for name in ["rope_freqs.weight", "rope_factors_short.weight"] {
        if content.tensor_infos.contains_key(name) {
            let t = content
                .tensor(file, name, &Device::Cpu)
                .and_then(|t| t.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| {
                    ModelError::Metadata(format!("{}: tensor {name}: {e}", path.display()))
                })?;
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// GGML's name for tensor type `id` (ggml.h's `ggml_type`), for the types a file may hold.
fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [(u32, &str); 32] = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (30, "BF16"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == id)
        .map_or("unknown", |(_, name)| name)
}

/// Any GGUF integer value as `usize` (writers differ in the width they use for counts).
pub fn gguf_int(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value::*;
    match *v {
        U8(x) => Some(x as usize),
        I8(x) => usize::try_from(x).ok(),
        U16(x) => Some(x as usize),
        I16(x) => usize::try_from(x).ok(),
        U32(x) => Some(x as usize),
        I32(x) => usize::try_from(x).ok(),
        U64(x) => usize::try_from(x).ok(),
        I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}

/// The fields of a Hugging Face llama `config.json` that the model uses.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    rope_scaling: Option<serde_json::Value>,
}

impl HfConfig {
    fn to_config(&self) -> Result<ModelConfig, ModelError> {
        match self.model_type.as_deref() {
            Some("llama") | Some("mistral") | None => {}
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "model_type `{other}`; idlerig runs llama-family models"
                )))
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ModelError::Unsupported(
                "rope_scaling in config.json is not supported yet".into(),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => derived_head_dim(
                self.hidden_size,
                self.num_attention_heads,
                "hidden_size",
                "num_attention_heads",
            )?,
        };
        let config = ModelConfig::llama(
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            self.vocab_size,
            self.rms_norm_eps,
            self.rope_theta.unwrap_or(10_000.0),
            self.max_position_embeddings,
            false,
        );
        config.validate(None)?;
        Ok(config)
    }
}
