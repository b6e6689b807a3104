//! Embedding models: a sentence-transformers directory (BERT weights, `tokenizer.json`, its
//! pooling and normalisation modules) served for `/v1/embeddings`. One thread owns the
//! encoder; the [`Embedder`] handle tokenizes on the caller's side and sends token ids, and
//! the thread batches whatever interactive requests are waiting into padded forward passes,
//! and runs deferred ones (batch lines) a pass at a time in the gaps between them.

mod bert;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

pub use bert::{Bert, BertConfig};

use crate::engine::ServiceTier;

/// Why an embedding model could not be loaded or run.
#[derive(Debug, Error)]
pub enum EmbedError {
    #[error("embedding model: {0}")]
    Load(String),
    #[error("embedding failed: {0}")]
    Failed(String),
    #[error("the embedding model has stopped")]
    Stopped,
    #[error("the embedding queue is full; retry shortly")]
    Busy,
}

/// How token states become one vector (sentence-transformers' `1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

/// Tokens of padded batch (inputs × longest) one forward pass takes at most.
const BATCH_TOKENS: usize = 8192;
/// Requests waiting for the encoder thread; past this, senders wait their turn.
const QUEUE: usize = 256;

/// The sentence-transformers pipeline around the encoder: pooling, normalisation, the
/// longest input it was trained for.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_tokens: usize,
}

impl Pipeline {
    /// Reads `1_Pooling/config.json`, `modules.json` and `sentence_bert_config.json`; a
    /// directory without them is pooled by mean and normalised, as sentence-transformers does
    /// for a plain BERT.
    pub fn read(dir: &Path, cfg: &BertConfig) -> Result<Self, EmbedError> {
        let json = |name: &str| -> Result<Option<serde_json::Value>, EmbedError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(EmbedError::Load(format!("{}: {e}", path.display()))),
            }
        };
        let pooling = match json("1_Pooling/config.json")? {
            None => Pooling::Mean,
            Some(p) => {
                let on = |k: &str| p.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
                match (
                    on("pooling_mode_mean_tokens"),
                    on("pooling_mode_cls_token"),
                    on("pooling_mode_max_tokens"),
                ) {
                    (true, false, false) => Pooling::Mean,
                    (false, true, false) => Pooling::Cls,
                    (false, false, true) => Pooling::Max,
                    _ => {
                        return Err(EmbedError::Load(
                            "1_Pooling/config.json: idlerig pools by exactly one of mean, CLS \
                             or max"
                                .into(),
                        ))
                    }
                }
            }
        };
        let normalize = match json("modules.json")? {
            None => true,
            Some(m) => m.as_array().is_some_and(|mods| {
                mods.iter().any(|x| {
                    x.get("type").and_then(|t| t.as_str())
                        == Some("sentence_transformers.models.Normalize")
                })
            }),
        };
        let max_tokens = json("sentence_bert_config.json")?
            .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
            .map_or(cfg.max_position_embeddings, |m| m as usize)
            .min(cfg.max_position_embeddings);
        Ok(Self {
            pooling,
            normalize,
            max_tokens,
        })
    }

    /// One vector per input from the encoder's states `[b, t, h]` and mask `[b, t]`.
    fn pool(&self, states: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let m = mask.unsqueeze(D::Minus1)?; // [b, t, 1]
        let pooled = match self.pooling {
            Pooling::Mean => states
                .broadcast_mul(&m)?
                .sum(1)?
                .broadcast_div(&m.sum(1)?)?,
            Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Max => {
                // Padding can never be the maximum.
                let hide = ((m.ones_like()? - &m)? * -1e30)?;
                states.broadcast_add(&hide)?.max(1)?
            }
        };
        if !self.normalize {
            return Ok(pooled);
        }
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        pooled.broadcast_div(&norm)
    }
}

/// One request's inputs (token ids), its tier, and where its vectors go.
struct Job {
    inputs: Vec<Vec<u32>>,
    tier: ServiceTier,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>,
}

/// The handle the API holds: the model's facts, its tokenizer, and the way to its thread.
#[derive(Clone)]
pub struct Embedder {
    pub id: String,
    pub dimensions: usize,
    pub max_tokens: usize,
    pub vocab_size: usize,
    tokenizer: Arc<tokenizers::Tokenizer>,
    jobs: mpsc::Sender<Job>,
    /// Forward passes the encoder's thread has run (tests wait on it).
    passes: Arc<AtomicU64>,
}

impl Embedder {
    /// Loads the model in `dir` on `device` and starts its thread.
    pub fn load(dir: &Path, id: String, device: &Device) -> Result<Self, EmbedError> {
        let cfg = BertConfig::read(dir)?;
        let pipeline = Pipeline::read(dir, &cfg)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", tok_path.display())))?;
        // Its file pads and truncates to 128; idlerig pads per batch and refuses what is too
        // long instead of cutting it.
        tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        tokenizer.with_padding(None);
        let model = Bert::load(dir, cfg.clone(), device)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let max_tokens = pipeline.max_tokens;
        let passes = Arc::new(AtomicU64::new(0));
        let encoder = Encoder {
            model,
            pipeline,
            passes: passes.clone(),
        };
        std::thread::Builder::new()
            .name("idlerig-embed".into())
            .spawn(move || run(encoder, rx))
            .map_err(|e| EmbedError::Load(format!("cannot start its thread: {e}")))?;
        Ok(Self {
            id,
            dimensions: cfg.hidden_size,
            max_tokens,
            vocab_size: cfg.vocab_size,
            tokenizer: Arc::new(tokenizer),
            jobs: tx,
            passes,
        })
    }

    /// The token ids of `text`, with the model's special tokens ([CLS] … [SEP]).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EmbedError::Failed(format!("tokenizer: {e}")))
    }

    /// `ids` (the model's ordinary tokens) between the special tokens its tokenizer adds to
    /// a text ([CLS] … [SEP] for BERT), so that a text and its token ids embed alike.
    pub fn with_special_tokens(&self, ids: &[u32]) -> Vec<u32> {
        let empty = self
            .tokenizer
            .encode("", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        match empty.as_slice() {
            [first, last] => [&[*first], ids, &[*last]].concat(),
            [first] => [&[*first], ids].concat(),
            _ => ids.to_vec(),
        }
    }

    /// One vector per input, in order. Inputs must be non-empty, within `max_tokens` and
    /// the vocabulary (the API checks). A full queue is [`EmbedError::Busy`] at once.
    /// Deferred work (batch lines) runs one forward pass at a time, and only while no
    /// interactive request waits.
    pub async fn embed(
        &self,
        inputs: Vec<Vec<u32>>,
        tier: ServiceTier,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job {
                inputs,
                tier,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => EmbedError::Busy,
                mpsc::error::TrySendError::Closed(_) => EmbedError::Stopped,
            })?;
        answer.await.map_err(|_| EmbedError::Stopped)?
    }

    /// Forward passes run so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }
}

/// The model and its pipeline, owned by the encoder's thread.
struct Encoder {
    model: Bert,
    pipeline: Pipeline,
    passes: Arc<AtomicU64>,
}

impl Encoder {
    /// One padded forward pass over `batch`: one vector per input. A panic is an error of
    /// this pass only.
    fn encode(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        self.passes.fetch_add(1, Ordering::Relaxed);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model
                .encode(batch)
                .and_then(|(states, mask)| self.pipeline.pool(&states, &mask))
                .and_then(|v| v.to_vec2::<f32>())
                .map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| Err("the encoder panicked".into()))
    }
}

/// Where the padded batch that starts at `start` of inputs sorted by length ends: as many as
/// fit [`BATCH_TOKENS`] padded to the last (longest) one, and at least one.
fn span_end(lengths: &[usize], start: usize) -> usize {
    let mut end = start + 1;
    while end < lengths.len() && (end + 1 - start) * lengths[end] <= BATCH_TOKENS {
        end += 1;
    }
    end
}

/// A deferred request under way: its inputs in order of length, how far it has got, and
/// the vectors so far.
struct Deferred {
    job: Job,
    order: Vec<usize>,
    next: usize,
    vectors: Vec<Vec<f32>>,
}

impl Deferred {
    fn new(job: Job) -> Self {
        let mut order: Vec<usize> = (0..job.inputs.len()).collect();
        order.sort_by_key(|&i| job.inputs[i].len());
        let vectors = vec![Vec::new(); job.inputs.len()];
        Self {
            job,
            order,
            next: 0,
            vectors,
        }
    }

    /// Runs its next forward pass; `Some` with the answer once it is complete (or failed).
    fn step(&mut self, encoder: &Encoder) -> Option<Result<Vec<Vec<f32>>, EmbedError>> {
        if self.job.reply.is_closed() {
            return Some(Err(EmbedError::Stopped)); // its caller has gone
        }
        if self.next >= self.order.len() {
            return Some(Ok(std::mem::take(&mut self.vectors))); // no inputs at all
        }
        let lengths: Vec<usize> = self
            .order
            .iter()
            .map(|&i| self.job.inputs[i].len())
            .collect();
        let end = span_end(&lengths, self.next);
        let span = &self.order[self.next..end];
        let batch: Vec<&[u32]> = span
            .iter()
            .map(|&i| self.job.inputs[i].as_slice())
            .collect();
        match encoder.encode(&batch) {
            Ok(vectors) => {
                for (&i, v) in span.iter().zip(vectors) {
                    self.vectors[i] = v;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, inputs = span.len(), "an embedding batch failed");
                return Some(Err(EmbedError::Failed(e)));
            }
        }
        self.next = end;
        (self.next >= self.order.len()).then(|| Ok(std::mem::take(&mut self.vectors)))
    }
}

/// The encoder's thread. Interactive requests go first: whenever some wait, it takes every
/// one waiting and runs them together ([`run_together`]). Deferred requests (batch lines)
/// run in turn, one forward pass at a time, and the queue is looked at again between two
/// passes, so an interactive request waits for one pass at most, never for a whole batch
/// line of thousands of inputs. Ends when every handle is dropped.
fn run(encoder: Encoder, mut rx: mpsc::Receiver<Job>) {
    let mut interactive: Vec<Job> = Vec::new();
    let mut deferred: std::collections::VecDeque<Deferred> = Default::default();
    loop {
        if interactive.is_empty() && deferred.is_empty() {
            match rx.blocking_recv() {
                Some(job) => take(job, &mut interactive, &mut deferred),
                None => return,
            }
        }
        let mut queued: usize = interactive
            .iter()
            .flat_map(|j| &j.inputs)
            .map(Vec::len)
            .sum();
        while queued < 4 * BATCH_TOKENS {
            match rx.try_recv() {
                Ok(job) => {
                    if job.tier == ServiceTier::Interactive {
                        queued += job.inputs.iter().map(Vec::len).sum::<usize>();
                    }
                    take(job, &mut interactive, &mut deferred);
                }
                Err(_) => break,
            }
        }
        if !interactive.is_empty() {
            run_together(&encoder, std::mem::take(&mut interactive));
            continue;
        }
        // Deferred requests whose caller has gone (a cancelled batch, a timeout) are dropped
        // now, not when they reach the front.
        deferred.retain(|d| !d.job.reply.is_closed());
        if let Some(front) = deferred.front_mut() {
            if let Some(result) = front.step(&encoder) {
                if let Some(done) = deferred.pop_front() {
                    let _ = done.job.reply.send(result);
                }
            }
        }
    }
}

fn take(job: Job, interactive: &mut Vec<Job>, deferred: &mut std::collections::VecDeque<Deferred>) {
    match job.tier {
        ServiceTier::Interactive => interactive.push(job),
        ServiceTier::Deferred => deferred.push_back(Deferred::new(job)),
    }
}

/// Runs the inputs of `jobs` sorted by length in padded batches of at most [`BATCH_TOKENS`],
/// and answers each. A batch that fails (or panics) fails only the requests with an input in
/// it; requests whose caller has gone are skipped.
fn run_together(encoder: &Encoder, mut jobs: Vec<Job>) {
    jobs.retain(|j| !j.reply.is_closed());
    let mut order: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.inputs.len()).map(move |i| (j, i)))
        .collect();
    order.sort_by_key(|&(j, i)| jobs[j].inputs[i].len());
    let lengths: Vec<usize> = order
        .iter()
        .map(|&(j, i)| jobs[j].inputs[i].len())
        .collect();
    let mut results: Vec<Result<Vec<Vec<f32>>, EmbedError>> = jobs
        .iter()
        .map(|j| Ok(vec![Vec::new(); j.inputs.len()]))
        .collect();
    let mut start = 0;
    while start < order.len() {
        let end = span_end(&lengths, start);
        let span = &order[start..end];
        start = end;
        if span.iter().all(|&(j, _)| results[j].is_err()) {
            continue;
        }
        let batch: Vec<&[u32]> = span
            .iter()
            .map(|&(j, i)| jobs[j].inputs[i].as_slice())
            .collect();
        match encoder.encode(&batch) {
            Ok(vectors) => {
                for (&(j, i), v) in span.iter().zip(vectors) {
                    if let Ok(r) = &mut results[j] {
                        r[i] = v;
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, inputs = span.len(), "an embedding batch failed");
                for &(j, _) in span {
                    results[j] = Err(EmbedError::Failed(e.clone()));
                }
            }
        }
    }
    for (job, result) in jobs.into_iter().zip(results) {
        // A caller that went away no longer wants its answer.
        let _ = job.reply.send(result);
    }
}
