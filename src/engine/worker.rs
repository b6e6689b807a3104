//! The engine thread: admits queued requests at step boundaries, runs one batched forward
//! pass per step over every running sequence (decodes first, then prompt chunks under a token
//! budget so a long prompt does not stall running streams), samples, and streams events.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::sampling::{SampledToken, Sampler};
use super::stop::StopMatcher;
use super::tokenizer::{IncrementalDecoder, TextTokenizer};
use std::sync::atomic::Ordering;

use super::{EngineHandle, EngineStats, FinishReason, SeqEvent, Submission, TokenLogprob};
use crate::model::{BatchItem, Llama, SeqCache};

/// Scheduling limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for admission; more are refused (HTTP 429).
    pub queue_capacity: usize,
    /// Sequences run together in one step; more wait in the queue.
    pub max_running: usize,
    /// Tokens per step across all sequences: decodes take one each, prompts are chunked
    /// into what remains.
    pub step_token_budget: usize,
    /// Threads and kernels for the model's matrix products.
    pub model: crate::model::LoadOptions,
    /// Where the time each request waited is reported.
    pub telemetry: Option<crate::telemetry::Telemetry>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            max_running: 32,
            step_token_budget: 512,
            model: Default::default(),
            telemetry: None,
        }
    }
}

/// Starts the engine thread, which owns `model` from now on.
pub fn spawn_engine(
    model: Llama,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
) -> EngineHandle {
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    let queue_capacity = cfg.queue_capacity;
    let stats = Arc::new(EngineStats::default());
    let engine_stats = stats.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            Engine {
                model,
                tokenizer,
                cfg,
                rx,
                running: Vec::new(),
                waiting: Default::default(),
                stats: engine_stats,
            }
            .run()
        })
        .expect("spawning the engine thread (only fails when the OS is out of threads)");
    EngineHandle {
        tx,
        queue_capacity,
        stats,
    }
}

struct Sequence {
    choice: usize,
    prompt: Arc<Vec<u32>>,
    cache: SeqCache,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    max_tokens: usize,
    ignore_eos: bool,
    generated: usize,
    /// The last sampled token: the input of the next decode step.
    last: u32,
    events: mpsc::UnboundedSender<SeqEvent>,
    /// The HTTP request's id, for log lines.
    request_id: Arc<str>,
}

impl Sequence {
    fn prefilled(&self) -> bool {
        self.cache.len() >= self.prompt.len()
    }
}

struct Engine {
    model: Llama,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Submission>,
    running: Vec<Sequence>,
    waiting: std::collections::VecDeque<Submission>,
    stats: Arc<EngineStats>,
}

impl Engine {
    fn publish_stats(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats.busy.store(
            !self.running.is_empty() || !self.waiting.is_empty(),
            Ordering::Release,
        );
        self.stats.kv_tokens.store(
            self.running.iter().map(|s| s.cache.len()).sum(),
            Ordering::Relaxed,
        );
    }

    fn run(mut self) {
        tracing::info!(max_running = self.cfg.max_running, "engine started");
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish_stats();
                match self.rx.blocking_recv() {
                    Some(s) => self.receive(s),
                    None => break,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.receive(s);
            }
            self.admit();
            self.publish_stats();
            if self.running.is_empty() {
                continue;
            }
            if catch_unwind(AssertUnwindSafe(|| self.step())).is_err() {
                tracing::error!("engine step panicked; failing the running requests");
                for seq in self.running.drain(..) {
                    let _ = seq.events.send(SeqEvent::Failed {
                        message: "internal error in the engine".into(),
                    });
                }
            }
        }
        tracing::info!("engine stopped: every handle was dropped");
    }

    /// Takes a submission off the channel; busy is published before the channel count drops,
    /// so the engine never looks idle while a request is on its way in.
    fn receive(&mut self, s: Submission) {
        self.waiting.push_back(s);
        self.stats.busy.store(true, Ordering::Release);
        self.stats.in_channel.fetch_sub(1, Ordering::AcqRel);
    }

    /// Moves waiting requests into the running set, all choices of a request together.
    fn admit(&mut self) {
        while let Some(sub) = self.waiting.front() {
            if sub.events.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            if !self.running.is_empty() && self.running.len() + sub.request.n > self.cfg.max_running
            {
                break;
            }
            let sub = self.waiting.pop_front().expect("front exists");
            let waited = sub.submitted_at.elapsed();
            if let Some(t) = &self.cfg.telemetry {
                t.queued(waited.as_secs_f64());
            }
            tracing::debug!(request_id = %sub.request.request_id, queued_ms = waited.as_millis() as u64, prompt_tokens = sub.request.prompt.len(), n = sub.request.n, "request admitted to the running batch");
            let prompt = Arc::new(sub.request.prompt);
            let request_id: Arc<str> = sub.request.request_id.into();
            for choice in 0..sub.request.n {
                self.running.push(Sequence {
                    choice,
                    prompt: prompt.clone(),
                    cache: self.model.new_cache(),
                    sampler: Sampler::new(
                        sub.request.params.clone(),
                        &prompt,
                        self.model.config().vocab_size,
                        choice as u64,
                    ),
                    decoder: IncrementalDecoder::new(),
                    stop: StopMatcher::new(sub.request.stop.clone()),
                    max_tokens: sub.request.max_tokens,
                    ignore_eos: sub.request.ignore_eos,
                    generated: 0,
                    last: 0,
                    events: sub.events.clone(),
                    request_id: request_id.clone(),
                });
            }
        }
    }

    fn step(&mut self) {
        // Sequences whose client has gone are dropped before any work is spent on them.
        self.running.retain(|s| !s.events.is_closed());
        let mut budget = self.cfg.step_token_budget.max(self.running.len());
        // (index into running, number of tokens this step); decodes first.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, _) in self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.prefilled())
        {
            plan.push((i, 1));
            budget -= 1;
        }
        for (i, s) in self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.prefilled())
        {
            let chunk = (s.prompt.len() - s.cache.len()).min(budget);
            if chunk == 0 {
                break;
            }
            plan.push((i, chunk));
            budget -= chunk;
            self.stats
                .prefilled_tokens
                .fetch_add(chunk as u64, Ordering::Relaxed);
        }
        plan.sort_unstable();
        let mut items = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            let Some(&(_, count)) = planned.next_if(|(j, _)| *j == i) else {
                continue;
            };
            let Sequence {
                prompt,
                cache,
                last,
                ..
            } = s;
            let start = cache.len();
            let tokens = if start >= prompt.len() {
                std::slice::from_ref(&*last)
            } else {
                &prompt[start..start + count]
            };
            items.push(BatchItem { tokens, cache });
        }
        let logits = match self
            .model
            .forward(&mut items)
            .and_then(|l| Ok(l.to_vec2::<f32>()?))
        {
            Ok(l) => l,
            Err(e) => {
                let ids: Vec<&str> = plan
                    .iter()
                    .map(|&(i, _)| &*self.running[i].request_id)
                    .collect();
                tracing::error!(error = %e, request_ids = ?ids, "forward pass failed; failing the batch");
                for &(i, _) in &plan {
                    let _ = self.running[i].events.send(SeqEvent::Failed {
                        message: format!("inference failed: {e}"),
                    });
                }
                let mut failed = vec![false; self.running.len()];
                plan.iter().for_each(|&(i, _)| failed[i] = true);
                self.remove_marked(&failed);
                return;
            }
        };
        let mut done = vec![false; self.running.len()];
        for (&(i, _), mut row) in plan.iter().zip(logits) {
            let seq = &mut self.running[i];
            if !seq.prefilled() {
                continue; // a prompt chunk that does not reach the end yet
            }
            let tok = seq.sampler.sample(&mut row);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            done[i] = emit_token(seq, tok, &self.tokenizer);
        }
        self.remove_marked(&done);
    }

    /// Drops the running sequences whose flag in `marked` (by index) is set.
    fn remove_marked(&mut self, marked: &[bool]) {
        let mut idx = 0;
        self.running.retain(|_| {
            idx += 1;
            !marked[idx - 1]
        });
    }
}

/// Sends the events for one sampled token; returns whether the sequence is finished (or
/// its client is gone).
fn emit_token(seq: &mut Sequence, tok: SampledToken, tokenizer: &TextTokenizer) -> bool {
    seq.generated += 1;
    seq.last = tok.id;
    let choice = seq.choice;
    if !seq.ignore_eos && tokenizer.is_end_of_generation(tok.id) {
        return finish(seq, tokenizer, FinishReason::Stop);
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
    let delta = seq.decoder.push(tokenizer, tok.id).unwrap_or_default();
    let out = seq.stop.push(&delta);
    if seq
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
        let _ = seq.events.send(SeqEvent::Finished {
            choice,
            reason: FinishReason::Stop,
            completion_tokens: seq.generated,
        });
        return true;
    }
    if seq.generated >= seq.max_tokens {
        return finish(seq, tokenizer, FinishReason::Length);
    }
    false
}

/// Flushes held-back text (a partial character, a partial stop string that never completed)
/// and sends the final event.
fn finish(seq: &mut Sequence, tokenizer: &TextTokenizer, reason: FinishReason) -> bool {
    let mut tail = seq
        .decoder
        .finish(tokenizer)
        .map(|d| seq.stop.push(&d))
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
        tail.emit.push_str(&seq.stop.finish());
    }
    if !tail.emit.is_empty() {
        let _ = seq.events.send(SeqEvent::Token {
            choice: seq.choice,
            text: tail.emit,
            logprob: None,
        });
    }
    let _ = seq.events.send(SeqEvent::Finished {
        choice: seq.choice,
        reason,
        completion_tokens: seq.generated,
    });
    true
}
