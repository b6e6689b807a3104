//! Loading a model for serving: weights, tokenizer, chat template, and the engine thread.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use tokio::sync::mpsc;

use super::{
    spawn_engine, ChatTemplate, EngineConfig, EngineError, EngineHandle, EngineStats, SeqEvent,
    TextTokenizer, ValidRequest,
};
use crate::model::ModelFiles;

/// What accepts validated requests: the engine, or a stand-in in tests of the HTTP layer.
pub trait Backend: Send + Sync + 'static {
    fn submit(
        &self,
        request: ValidRequest,
    ) -> Result<mpsc::UnboundedReceiver<SeqEvent>, EngineError>;
}

impl Backend for EngineHandle {
    fn submit(
        &self,
        request: ValidRequest,
    ) -> Result<mpsc::UnboundedReceiver<SeqEvent>, EngineError> {
        EngineHandle::submit(self, request)
    }
}

/// A model ready to serve: what the API needs to validate requests, and where to send them.
pub struct ServedModel {
    pub id: String,
    pub tokenizer: Arc<TextTokenizer>,
    /// `None` when the model ships no chat template: chat requests are refused.
    pub template: Option<ChatTemplate>,
    pub context_length: usize,
    /// Compiles the requests' output formats; `None` when the tokenizer's vocabulary cannot
    /// be read as bytes (such requests are refused).
    pub grammar: Option<Arc<super::GrammarFactory>>,
    pub backend: Arc<dyn Backend>,
    /// The engine's counters (running sequences, tokens, busy).
    pub stats: Arc<EngineStats>,
}

/// Opens the model at `path`, loads it onto `device` and starts the engine thread.
pub fn load_model(
    path: &Path,
    device: &Device,
    cfg: EngineConfig,
) -> Result<ServedModel, EngineError> {
    load_model_reporting(path, device, cfg, &mut |_| {})
}

/// As [`load_model`], telling `progress` the fraction of the weights loaded.
pub fn load_model_reporting(
    path: &Path,
    device: &Device,
    cfg: EngineConfig,
    progress: &mut dyn FnMut(f32),
) -> Result<ServedModel, EngineError> {
    let files = ModelFiles::open(path)?;
    let tokenizer = if files.dir().join("tokenizer.json").exists() {
        TextTokenizer::from_hf_dir(files.dir())?
    } else {
        match files.gguf_metadata() {
            Some(md) => TextTokenizer::from_gguf(md)?,
            None => {
                return Err(EngineError::Tokenizer(format!(
                    "no tokenizer.json in {}",
                    files.dir().display()
                )))
            }
        }
    };
    let template_source = match files
        .gguf_metadata()
        .and_then(|md| md.get("tokenizer.chat_template"))
    {
        Some(v) => v.to_string().ok().cloned(),
        None => std::fs::read_to_string(files.dir().join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            }),
    };
    let template = template_source
        .map(|src| ChatTemplate::new(&src, tokenizer.bos_text(), tokenizer.eos_text()))
        .transpose()?;
    let tokenizer = Arc::new(tokenizer);
    let model = files.load_model_reporting(device, cfg.model, progress)?;
    // A sequence longer than the KV pool could never run: the pool bounds the window too.
    let mut context_length = model.config().context_length;
    if let Some((_, blocks, per_block)) = model.kv_usage() {
        if blocks * per_block < context_length {
            tracing::warn!(
                pool_tokens = blocks * per_block,
                context_length,
                "the KV cache holds fewer tokens than the model's context window; longer requests are refused (raise --kv-cache-mb)"
            );
            context_length = blocks * per_block;
        }
    }
    let grammar = match super::GrammarFactory::new(&tokenizer, model.config().vocab_size) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            tracing::warn!(error = %e, "constrained decoding is unavailable for this model (response_format and structured_outputs are refused)");
            None
        }
    };
    let handle = spawn_engine(model, tokenizer.clone(), cfg);
    let stats = handle.stats().clone();
    Ok(ServedModel {
        id: files.model_id(),
        tokenizer,
        template,
        context_length,
        grammar,
        backend: Arc::new(handle),
        stats,
    })
}
