//! One choice of one request inside the engine: its tokens, its KV cache, its sampler and
//! text state, and the events it sends as tokens are sampled.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::sampling::{SampledToken, Sampler};
use super::stop::StopMatcher;
use super::tokenizer::{IncrementalDecoder, TextTokenizer};
use super::{FinishReason, SeqEvent, TokenLogprob};
use crate::model::SeqCache;

pub(super) struct Sequence {
    pub choice: usize,
    /// The prompt, then every sampled token. The cache holds the first `cache.len()` of them;
    /// the rest are what the next steps run (a prompt, a chunk of it, the last sampled
    /// token, or everything again after a pre-emption).
    pub tokens: Vec<u32>,
    pub cache: SeqCache,
    /// Prompt tokens found in the prefix cache when the sequence was first admitted.
    pub cached_tokens: Option<usize>,
    pub sampler: Sampler,
    pub decoder: IncrementalDecoder,
    pub stop: StopMatcher,
    /// The output's grammar, when the request has one.
    pub constraint: Option<super::Constraint>,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub generated: usize,
    pub events: mpsc::UnboundedSender<SeqEvent>,
    /// The HTTP request's id, for log lines.
    pub request_id: Arc<str>,
    /// Scheduling rank: lower runs first; ties by admission order.
    pub priority: i64,
    pub tier: super::ServiceTier,
    pub order: u64,
    /// When the request was submitted: how long deferred work has waited (its aging).
    pub submitted_at: std::time::Instant,
}

impl Sequence {
    /// Tokens not yet in the cache.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Interactive before deferred, then by priority, then oldest first.
    pub fn rank(&self) -> (super::ServiceTier, i64, u64) {
        (self.tier, self.priority, self.order)
    }

    /// Sends the events for one sampled token; returns whether the sequence is finished (or
    /// its client is gone).
    pub fn emit_token(&mut self, tok: SampledToken, tokenizer: &TextTokenizer) -> bool {
        self.generated += 1;
        self.tokens.push(tok.id);
        let choice = self.choice;
        if !self.ignore_eos && tokenizer.is_end_of_generation(tok.id) {
            return self.finish(tokenizer, FinishReason::Stop);
        }
        let logprob = tok.logprob.map(|lp| TokenLogprob {
            token: tokenizer.token_text(tok.id),
            logprob: lp,
            top: tok
                .top
                .iter()
                .map(|&(id, lp)| (tokenizer.token_text(id), lp))
                .collect(),
        });
        let delta = self.decoder.push(tokenizer, tok.id).unwrap_or_default();
        let out = self.stop.push(&delta);
        if self
            .events
            .send(SeqEvent::Token {
                choice,
                text: out.emit,
                logprob,
            })
            .is_err()
        {
            return true;
        }
        if out.stopped {
            self.send_finished(FinishReason::Stop);
            return true;
        }
        if self.generated >= self.max_tokens {
            return self.finish(tokenizer, FinishReason::Length);
        }
        false
    }

    /// Flushes held-back text (a partial character, a partial stop string that never
    /// completed) and sends the final event.
    pub fn finish(&mut self, tokenizer: &TextTokenizer, reason: FinishReason) -> bool {
        let mut tail = self
            .decoder
            .finish(tokenizer)
            .map(|d| self.stop.push(&d))
            .unwrap_or(super::StopOutcome {
                emit: String::new(),
                stopped: false,
            });
        let reason = if tail.stopped {
            FinishReason::Stop
        } else {
            reason
        };
        if !tail.stopped {
            tail.emit.push_str(&self.stop.finish());
        }
        if !tail.emit.is_empty() {
            let _ = self.events.send(SeqEvent::Token {
                choice: self.choice,
                text: tail.emit,
                logprob: None,
            });
        }
        self.send_finished(reason);
        true
    }

    fn send_finished(&self, reason: FinishReason) {
        let _ = self.events.send(SeqEvent::Finished {
            choice: self.choice,
            reason,
            completion_tokens: self.generated,
            cached_tokens: self.cached_tokens.unwrap_or(0),
            stop: self.stop.matched().map(str::to_string),
        });
    }
}
