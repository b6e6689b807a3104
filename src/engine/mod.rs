//! The engine owns the model, every sequence's KV cache and the batching schedule, on a
//! thread of its own. Others hold an [`EngineHandle`]: they submit a [`ValidRequest`]
//! (built only by the API's validation) and read [`SeqEvent`]s from the request's own
//! channel. Dropping that channel cancels the request at the next step.

mod chat_template;
mod grammar;
mod load;
mod sampling;
mod sequence;
mod spm;
mod stop;
mod tiers;
mod tokenizer;
mod worker;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use grammar::{lark_after_reasoning, Constraint, GrammarFactory, OutputFormat};
pub use load::{load_model, load_model_reporting, Backend, ServedModel};
pub use sampling::{argmax, SampledToken, Sampler, SamplingParams};
pub use stop::{StopMatcher, StopOutcome};
pub use tiers::MAX_DEFERRED_SHARE;
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
pub use worker::{spawn_engine, EngineConfig};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;

/// Errors of the engine and of the text front end (tokenizer, chat template).
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the model has no chat template; use /v1/completions or a model that ships one")]
    NoChatTemplate,
    #[error("the engine's queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the deferred (flex and batch) queue is full ({0} requests waiting); retry later")]
    DeferredQueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// A request the API has validated: prompt tokenized and within the context window, every
/// parameter in range. The engine trusts it.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Number of independent choices to generate.
    pub n: usize,
    pub stop: Vec<String>,
    pub params: SamplingParams,
    /// Generate `max_tokens` tokens even past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// The HTTP request's `x-request-id`, for the engine's log lines about it.
    pub request_id: String,
    /// Scheduling priority: lower values are admitted first and pre-empted last (vLLM's
    /// convention); 0 by default.
    pub priority: i64,
    /// The grammar every choice's output must follow (compiled by the API's validation;
    /// each choice takes its own copy).
    pub constraint: Option<Constraint>,
    /// Interactive, or deferred (flex and batch work, run only in the interactive gaps).
    pub tier: ServiceTier,
}

/// The two classes of work the engine schedules. Interactive requests always go first: deferred
/// work is admitted only while no interactive request waits, runs only in steps without
/// interactive work, and yields to an arriving interactive request between two layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceTier {
    #[default]
    Interactive = 0,
    Deferred = 1,
}

impl ServiceTier {
    pub const ALL: [ServiceTier; 2] = [ServiceTier::Interactive, ServiceTier::Deferred];

    /// The name OpenAI's `service_tier` field uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Interactive => "default",
            ServiceTier::Deferred => "flex",
        }
    }
}

/// Interactive requests the HTTP layer has admitted and not yet handed to an engine (they
/// are being read, parsed, tokenized). Deferred work gives way to them at once, before they
/// reach the engine: on a CPU their parsing needs the cores a deferred step would hold.
#[derive(Debug, Clone, Default)]
pub struct InteractiveArrivals(Arc<AtomicUsize>);

/// Counts one arrival until dropped.
#[derive(Debug)]
pub struct ArrivalGuard(Arc<AtomicUsize>);

impl Drop for ArrivalGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InteractiveArrivals {
    pub fn enter(&self) -> ArrivalGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        ArrivalGuard(self.0.clone())
    }

    pub fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Log-probability of a generated token and its top alternatives, as text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the engine tells a request, in order, for each of its choices.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// One generated token: the text it completes (possibly empty while held back for UTF-8
    /// or a possible stop string) and, when asked, its log-probability.
    Token {
        choice: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The choice is complete; `completion_tokens` counts every token it generated,
    /// `cached_tokens` the prompt tokens whose keys and values came from the prefix cache.
    Finished {
        choice: usize,
        reason: FinishReason,
        completion_tokens: usize,
        cached_tokens: usize,
        /// The stop string that ended it, when one did (Anthropic's `stop_sequence`).
        stop: Option<String>,
    },
    /// The request failed inside the engine; no more events follow.
    Failed { message: String },
}

/// Counters the engine thread writes and anyone may read: its only shared state, all atomics
/// with one writer, so readers never wait on the engine.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Requests waiting for admission, as the engine last saw them.
    pub waiting: AtomicUsize,
    /// Tokens sampled since start.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens pre-filled since start.
    pub prefilled_tokens: AtomicU64,
    /// Tokens held in the running sequences' KV caches.
    pub kv_tokens: AtomicUsize,
    /// Blocks of the paged KV pool in use (held, or cached for prefixes and not evictable)
    /// and in all; 0 in all without a paged pool.
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Sequences pre-empted because the KV pool was full.
    pub preemptions: AtomicU64,
    /// Whether the engine has work (the arbiter's signal that the device is needed).
    pub busy: AtomicBool,
    /// Submitted but not yet taken from the channel by the engine, by tier: busy too, so
    /// there is no instant between `submit` and the engine waking when the device looks idle.
    pub in_channel: [AtomicUsize; 2],
    /// Requests waiting for admission and sequences running, by tier.
    pub waiting_by_tier: [AtomicUsize; 2],
    pub running_by_tier: [AtomicUsize; 2],
    /// Deferred steps abandoned between two layers because interactive work arrived.
    pub deferred_interruptions: AtomicU64,
    /// Tokens of finished deferred work (flex and batch): prompt and output, once each.
    pub deferred_tokens: AtomicU64,
    /// Deferred steps that ran beside interactive work, as its guaranteed share.
    pub deferred_owed_steps: AtomicU64,
    /// Interactive requests for this engine on their way in (the HTTP layer counts them):
    /// its deferred steps in the gaps give way to them.
    pub arrivals: InteractiveArrivals,
}

impl EngineStats {
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn generated_tokens(&self) -> u64 {
        self.generated_tokens.load(Ordering::Relaxed)
    }

    pub fn is_busy(&self) -> bool {
        ServiceTier::ALL.iter().any(|&t| self.is_busy_with(t))
    }

    /// Whether the engine has work of `tier`: submitted, waiting or running.
    pub fn is_busy_with(&self, tier: ServiceTier) -> bool {
        let t = tier as usize;
        self.in_channel[t].load(Ordering::Acquire) > 0
            || self.waiting_by_tier[t].load(Ordering::Acquire) > 0
            || self.running_by_tier[t].load(Ordering::Acquire) > 0
    }

    /// An interactive request is on its way in: a deferred step stops at the next layer.
    pub fn interactive_arriving(&self) -> bool {
        self.in_channel[ServiceTier::Interactive as usize].load(Ordering::Acquire) > 0
    }
}

pub(crate) struct Submission {
    pub request: ValidRequest,
    pub submitted_at: std::time::Instant,
    pub events: mpsc::UnboundedSender<SeqEvent>,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    /// How many requests of each tier may wait.
    queue_capacity: [usize; 2],
    stats: Arc<EngineStats>,
}

impl EngineHandle {
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Queues `request`; its events arrive on the returned receiver. Fails at once, never
    /// waits, when the queue is full.
    pub fn submit(
        &self,
        request: ValidRequest,
    ) -> Result<mpsc::UnboundedReceiver<SeqEvent>, EngineError> {
        // The engine drains the channel into its own waiting list at every step, so the
        // channel alone does not bound the queue: both together are held to the capacity.
        // The place is taken first and checked after, so that two submissions racing for the
        // last place cannot both get it. Each tier has its own queue and capacity.
        let (kind, tier) = (request.tier, request.tier as usize);
        let (in_channel, capacity) = (&self.stats.in_channel[tier], self.queue_capacity[tier]);
        let full = move || match kind {
            ServiceTier::Interactive => EngineError::QueueFull(capacity),
            ServiceTier::Deferred => EngineError::DeferredQueueFull(capacity),
        };
        let before = in_channel.fetch_add(1, Ordering::SeqCst);
        if before + self.stats.waiting_by_tier[tier].load(Ordering::SeqCst) >= capacity {
            in_channel.fetch_sub(1, Ordering::SeqCst);
            return Err(full());
        }
        let (events, rx) = mpsc::unbounded_channel();
        self.tx
            .try_send(Submission {
                request,
                submitted_at: std::time::Instant::now(),
                events,
            })
            .map_err(|e| {
                in_channel.fetch_sub(1, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => full(),
                    mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
                }
            })?;
        Ok(rx)
    }
}
