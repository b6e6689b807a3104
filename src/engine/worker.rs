//! The engine thread: admits queued requests at step boundaries, runs one batched forward
//! pass per step over every running sequence (decodes first, then prompt chunks under a token
//! budget so a long prompt does not stall running streams), samples, and streams events.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tokio::sync::mpsc;

use std::sync::atomic::Ordering;

use super::sampling::Sampler;
use super::sequence::Sequence;
use super::stop::StopMatcher;
use super::tiers::{may_admit, step_tier, DeferredShare, TierLoad};
use super::tokenizer::{IncrementalDecoder, TextTokenizer};
use super::ServiceTier;
use super::{EngineHandle, EngineStats, FinishReason, SeqEvent, Submission};
use crate::model::{BatchItem, Decoder};

/// Prompt tokens of deferred work per step (see `schedule`).
const DEFERRED_CHUNK: usize = 64;

/// Scheduling limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for admission; more are refused (HTTP 429).
    pub queue_capacity: usize,
    /// Deferred requests (flex, batch lines) that may wait; more are refused (HTTP 429
    /// `resource_unavailable`).
    pub deferred_queue_capacity: usize,
    /// Sequences run together in one step; more wait in the queue.
    pub max_running: usize,
    /// Tokens per step across all sequences: decodes take one each, prompts are chunked
    /// into what remains.
    pub step_token_budget: usize,
    /// Threads and kernels for the model's matrix products.
    pub model: crate::model::LoadOptions,
    /// Where the time each request waited is reported.
    pub telemetry: Option<crate::telemetry::Telemetry>,
    /// The share of step time deferred work is guaranteed while interactive work keeps the
    /// engine busy (0: only the gaps), and the wait that doubles it (see `tiers`).
    pub deferred_min_share: f64,
    pub deferred_aging: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            deferred_queue_capacity: 256,
            max_running: 32,
            step_token_budget: 512,
            model: Default::default(),
            telemetry: None,
            deferred_min_share: 0.05,
            deferred_aging: std::time::Duration::from_secs(60),
        }
    }
}

/// Starts the engine thread, which owns `model` from now on.
pub fn spawn_engine(
    model: Decoder,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
) -> EngineHandle {
    let queue_capacity = [cfg.queue_capacity, cfg.deferred_queue_capacity];
    let (tx, rx) = mpsc::channel(queue_capacity.iter().sum::<usize>().max(1));
    let stats = Arc::new(EngineStats::default());
    let engine = Engine {
        model,
        tokenizer,
        share: DeferredShare::new(cfg.deferred_min_share, cfg.deferred_aging),
        cfg,
        rx,
        running: Vec::new(),
        waiting: Default::default(),
        stats: stats.clone(),
        next_order: 0,
    };
    // Published before the handle exists, so `/v1/status` never shows an empty cache
    // (0 blocks of 0) in the moment before the engine thread first runs.
    engine.publish_stats();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run())
        .expect("spawning the engine thread (only fails when the OS is out of threads)");
    EngineHandle {
        tx,
        queue_capacity,
        stats,
    }
}

struct Engine {
    model: Decoder,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Submission>,
    running: Vec<Sequence>,
    waiting: std::collections::VecDeque<Submission>,
    stats: Arc<EngineStats>,
    /// Admission counter: ties in priority run oldest first.
    next_order: u64,
    /// Deferred work's guaranteed share of the steps.
    share: DeferredShare,
}

impl Engine {
    /// Running sequences and waiting requests of each tier, as the scheduler sees them.
    fn tier_load(&self) -> TierLoad {
        let interactive = |t: ServiceTier| t == ServiceTier::Interactive;
        let running = self.running.iter().filter(|s| interactive(s.tier)).count();
        TierLoad {
            interactive_running: running,
            interactive_waiting: self
                .waiting
                .iter()
                .filter(|s| interactive(s.request.tier))
                .count()
                + self.stats.in_channel[ServiceTier::Interactive as usize].load(Ordering::Acquire),
            deferred_running: self.running.len() - running,
            interactive_arriving: self.stats.arrivals.any(),
        }
    }

    fn publish_stats(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        for tier in ServiceTier::ALL {
            let t = tier as usize;
            let running = self.running.iter().filter(|s| s.tier == tier).count();
            let waiting = self.waiting.iter().filter(|s| s.request.tier == tier);
            self.stats.running_by_tier[t].store(running, Ordering::Release);
            self.stats.waiting_by_tier[t].store(waiting.count(), Ordering::Release);
        }
        self.stats.busy.store(
            !self.running.is_empty() || !self.waiting.is_empty(),
            Ordering::Release,
        );
        self.stats.kv_tokens.store(
            self.running.iter().map(|s| s.cache.len()).sum(),
            Ordering::Relaxed,
        );
        if let Some((used, total, _)) = self.model.kv_usage() {
            self.stats.kv_blocks_used.store(used, Ordering::Relaxed);
            self.stats.kv_blocks_total.store(total, Ordering::Relaxed);
        }
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
                for seq in &self.running {
                    let _ = seq.events.send(SeqEvent::Failed {
                        message: "internal error in the engine".into(),
                    });
                }
                let all = vec![true; self.running.len()];
                self.remove_marked(&all);
            }
        }
        tracing::info!("engine stopped: every handle was dropped");
    }

    /// Takes a submission off the channel; busy is published before the channel count drops,
    /// so the engine never looks idle while a request is on its way in.
    fn receive(&mut self, s: Submission) {
        let tier = s.request.tier as usize;
        self.waiting.push_back(s);
        self.stats.busy.store(true, Ordering::Release);
        self.stats.waiting_by_tier[tier].fetch_add(1, Ordering::AcqRel);
        self.stats.in_channel[tier].fetch_sub(1, Ordering::AcqRel);
    }

    /// Moves waiting requests into the running set, all choices of a request together:
    /// interactive before deferred, best priority first (lower value), then in order of
    /// arrival. Deferred requests wait while any interactive request does, except one at a
    /// time while deferred work has a guaranteed share.
    fn admit(&mut self) {
        loop {
            self.waiting.retain(|s| !s.events.is_closed());
            let best_of = |tiers: &[ServiceTier]| {
                (0..self.waiting.len())
                    .filter(|&i| tiers.contains(&self.waiting[i].request.tier))
                    .min_by_key(|&i| {
                        let r = &self.waiting[i].request;
                        (r.tier, r.priority, i)
                    })
            };
            let load = self.tier_load();
            let (total, max) = (self.running.len(), self.cfg.max_running);
            // An interactive request joins running interactive work only when the KV pool
            // holds its prompt beside what that work still needs: admitting more than the
            // pool holds only makes them pre-empt each other and recompute, over and over.
            // Requests behind it wait their turn, so a long prompt is not overtaken for ever.
            let fits = |i: &usize| {
                let r = &self.waiting[*i].request;
                may_admit(r.tier, r.n, load, total, max, self.share.enabled())
                    && (r.tier == ServiceTier::Deferred
                        || load.interactive_running == 0
                        || self.kv_room_for(r.priority, r.prompt.len(), r.n))
            };
            // The best request, or, when it must wait, the best deferred one (its guaranteed
            // share lets one run whatever interactive work waits).
            let Some(best) = best_of(&ServiceTier::ALL)
                .filter(fits)
                .or_else(|| best_of(&[ServiceTier::Deferred]).filter(fits))
            else {
                return;
            };
            let n = self.waiting[best].request.n;
            let sub = self.waiting.remove(best).expect("index in range");
            let waited = sub.submitted_at.elapsed();
            if let Some(t) = &self.cfg.telemetry {
                t.queued(waited.as_secs_f64());
            }
            tracing::debug!(request_id = %sub.request.request_id, queued_ms = waited.as_millis() as u64, prompt_tokens = sub.request.prompt.len(), n, "request admitted to the running batch");
            let request_id: Arc<str> = sub.request.request_id.as_str().into();
            // Building a request's sequences (its sampler, a copy of its grammar for each
            // choice) runs request-supplied state: a panic there fails this request alone,
            // and the engine thread goes on.
            let built = catch_unwind(AssertUnwindSafe(|| self.sequences(&sub, &request_id)));
            match built {
                Ok(seqs) => {
                    for seq in seqs {
                        // The running set stays sorted by rank: scheduling and pre-emption
                        // read it so.
                        let at = self.running.partition_point(|s| s.rank() <= seq.rank());
                        self.running.insert(at, seq);
                    }
                }
                Err(panic) => {
                    let why = panic_message(&*panic);
                    tracing::error!(request_id = %request_id, panic = %why, "admitting a request panicked; failing it alone");
                    let _ = sub.events.send(SeqEvent::Failed {
                        message: format!(
                            "internal error in the engine while admitting the request: {why}"
                        ),
                    });
                }
            }
        }
    }

    /// The running sequences of one submission, a choice each.
    fn sequences(&mut self, sub: &Submission, request_id: &Arc<str>) -> Vec<Sequence> {
        #[cfg(test)]
        injected_panic(request_id, "admit");
        let n = sub.request.n;
        let mut seqs = Vec::with_capacity(n);
        {
            for choice in 0..n {
                let r = &sub.request;
                let seq = Sequence {
                    choice,
                    tokens: r.prompt.clone(),
                    cache: self.model.new_cache(),
                    cached_tokens: None,
                    sampler: Sampler::new(
                        r.params.clone(),
                        &r.prompt,
                        self.model.config().vocab_size,
                        choice as u64,
                    ),
                    decoder: IncrementalDecoder::new(),
                    stop: StopMatcher::new(r.stop.clone()),
                    constraint: r.constraint.clone(),
                    max_tokens: r.max_tokens,
                    ignore_eos: r.ignore_eos,
                    generated: 0,
                    events: sub.events.clone(),
                    request_id: request_id.clone(),
                    priority: r.priority,
                    tier: r.tier,
                    order: self.next_order,
                    submitted_at: sub.submitted_at,
                };
                self.next_order += 1;
                seqs.push(seq);
            }
        }
        seqs
    }

    fn step(&mut self) {
        // Sequences whose client has gone are dropped before any work is spent on them.
        let gone: Vec<bool> = self.running.iter().map(|s| s.events.is_closed()).collect();
        self.remove_marked(&gone);
        for s in &mut self.running {
            if s.cache.is_empty() {
                let hit = self.model.kv_match_prefix(&mut s.cache, &s.tokens);
                s.cached_tokens.get_or_insert(hit);
            }
        }
        let load = self.tier_load();
        let Some(tier) = step_tier(load) else {
            // Deferred work waits for interactive work on its way in; it comes within
            // milliseconds (or goes away), so a short nap is enough, and frees the cores.
            std::thread::sleep(std::time::Duration::from_micros(200));
            return;
        };
        // Deferred work owed its share rides in this interactive step.
        let mixed =
            tier == ServiceTier::Interactive && load.deferred_running > 0 && self.share.owed();
        let t0 = std::time::Instant::now();
        let result = self.run_step(tier, mixed);
        self.account(tier, result.as_ref().map(|r| &r.0), t0.elapsed());
        let Some((plan, result)) = result else {
            return;
        };
        let logits = match result {
            Ok(l) => l,
            Err(crate::model::ModelError::Interrupted) => {
                self.stats
                    .deferred_interruptions
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                let ids: Vec<&str> = plan
                    .iter()
                    .map(|&(i, _)| &*self.running[i].request_id)
                    .collect();
                tracing::error!(error = %e, request_ids = ?ids, "forward pass failed; failing the batch");
                let mut failed = vec![false; self.running.len()];
                for &(i, _) in &plan {
                    let _ = self.running[i].events.send(SeqEvent::Failed {
                        message: format!("inference failed: {e}"),
                    });
                    failed[i] = true;
                }
                self.remove_marked(&failed);
                return;
            }
        };
        let mut done = vec![false; self.running.len()];
        for (&(i, count), mut row) in plan.iter().zip(logits) {
            let seq = &mut self.running[i];
            self.model.kv_commit(&mut seq.cache, &seq.tokens);
            if count > 1 {
                self.stats
                    .prefilled_tokens
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
            if seq.pending() > 0 {
                continue; // a prompt chunk that does not reach the end yet
            }
            // Sampling, the grammar's mask, stop matching and the events run per sequence
            // under a guard of their own: a panic there fails this sequence alone (the others
            // of the step, finished or not, are untouched).
            let (tokenizer, stats) = (&self.tokenizer, &self.stats);
            let next = catch_unwind(AssertUnwindSafe(|| {
                next_token(seq, &mut row, tokenizer, stats)
            }));
            done[i] = match next {
                Ok(ended) => ended,
                Err(panic) => {
                    let why = panic_message(&*panic);
                    tracing::error!(request_id = %seq.request_id, choice = seq.choice, panic = %why, "a sequence panicked while sampling; failing it alone");
                    let _ = seq.events.send(SeqEvent::Failed {
                        message: format!("internal error in the engine while sampling: {why}"),
                    });
                    true
                }
            };
        }
        for (s, _) in self.running.iter().zip(&done).filter(|(_, &d)| d) {
            if s.tier == ServiceTier::Deferred && s.generated > 0 {
                // Finished deferred work: its prompt and output, once, however often it
                // was recomputed.
                self.stats
                    .deferred_tokens
                    .fetch_add(s.tokens.len() as u64, Ordering::Relaxed);
            }
        }
        self.remove_marked(&done);
    }

    /// Plans and runs one forward pass of `tier`: the plan and the logits, or `None` when
    /// nothing could be planned.
    #[allow(clippy::type_complexity)]
    fn run_step(
        &mut self,
        tier: ServiceTier,
        mixed: bool,
    ) -> Option<(
        Vec<(usize, usize)>,
        Result<Vec<Vec<f32>>, crate::model::ModelError>,
    )> {
        let plan = self.schedule(tier, mixed);
        if plan.is_empty() {
            self.unblock(tier);
            return None;
        }
        let mut items = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            let Some(&(_, count)) = planned.next_if(|(j, _)| *j == i) else {
                continue;
            };
            let start = s.cache.len();
            items.push(BatchItem {
                tokens: &s.tokens[start..start + count],
                cache: &mut s.cache,
            });
        }
        // A deferred step in the gaps gives way, between two layers, to an interactive
        // request that arrives while it runs; the layers it finished are kept, and it
        // resumes from there.
        let stats = self.stats.clone();
        let interrupt = move || {
            tier == ServiceTier::Deferred && (stats.arrivals.any() || stats.interactive_arriving())
        };
        let t0 = std::time::Instant::now();
        let result = self
            .model
            .forward_interruptible(&mut items, &interrupt)
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        tracing::trace!(
            ?tier,
            mixed,
            rows = plan.len(),
            tokens = plan.iter().map(|p| p.1).sum::<usize>(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            ok = result.is_ok(),
            "step"
        );
        Some((plan, result))
    }

    /// Tells the deferred share what a step of `tier` that took `elapsed` gave each tier:
    /// its time split by the planned tokens of each (deferred rows in an interactive step
    /// are owed time; a step in the gaps costs interactive work nothing).
    fn account(
        &mut self,
        tier: ServiceTier,
        plan: Option<&Vec<(usize, usize)>>,
        elapsed: std::time::Duration,
    ) {
        let oldest_deferred = self
            .running
            .iter()
            .filter(|s| s.tier == ServiceTier::Deferred)
            .map(|s| s.submitted_at.elapsed())
            .max();
        let (mut interactive, mut deferred) = (0, 0);
        for &(i, n) in plan.into_iter().flatten() {
            match self.running[i].tier {
                ServiceTier::Interactive => interactive += n,
                ServiceTier::Deferred => deferred += n,
            }
        }
        if tier == ServiceTier::Deferred || interactive + deferred == 0 {
            return;
        }
        if deferred > 0 {
            self.stats
                .deferred_owed_steps
                .fetch_add(1, Ordering::Relaxed);
        }
        let owed = elapsed.mul_f64(deferred as f64 / (interactive + deferred) as f64);
        self.share.record(elapsed - owed, owed, oldest_deferred);
    }

    /// Drops the running sequences whose flag in `marked` (by index), giving back their KV
    /// blocks.
    fn remove_marked(&mut self, marked: &[bool]) {
        let mut idx = 0;
        let model = &mut self.model;
        self.running.retain_mut(|s| {
            idx += 1;
            if marked[idx - 1] {
                model.kv_release(&mut s.cache);
            }
            !marked[idx - 1]
        });
    }
}

/// Samples, checks and sends `seq`'s next token; `true` when the choice has ended.
fn next_token(
    seq: &mut Sequence,
    row: &mut [f32],
    tokenizer: &TextTokenizer,
    stats: &EngineStats,
) -> bool {
    #[cfg(test)]
    injected_panic(&seq.request_id, "sample");
    let (tok, complete) = match sample_constrained(seq, row) {
        Ok(sampled) => sampled,
        Err(e) => {
            // The output so far stands as it is; it is never a server error.
            tracing::warn!(request_id = %seq.request_id, error = %e, "the output's grammar failed; ending the choice");
            return seq.finish(tokenizer, FinishReason::Stop);
        }
    };
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let finished = seq.emit_token(tok, tokenizer);
    // A complete output (the grammar allows nothing more) ends the choice.
    finished || (complete && seq.finish(tokenizer, FinishReason::Stop))
}

/// What a panic said (its `&str` or `String` payload).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The tests' fault injection: a request whose id is `inject-panic:PLACE` panics there.
#[cfg(test)]
fn injected_panic(request_id: &str, place: &str) {
    if request_id.strip_prefix("inject-panic:") == Some(place) {
        panic!("injected panic in {place}");
    }
}

#[path = "planning.rs"]
mod planning;

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;

/// Samples `seq`'s next token from `row`, under its grammar when it has one: the logits the
/// grammar rules out are masked first, and the token is committed to the grammar after.
/// Returns the token and whether the output is now complete.
fn sample_constrained(
    seq: &mut Sequence,
    row: &mut [f32],
) -> Result<(super::SampledToken, bool), String> {
    let Some(constraint) = seq.constraint.as_mut() else {
        return Ok((seq.sampler.sample(row), false));
    };
    constraint.mask(row)?;
    let tok = seq.sampler.sample(row);
    let complete = constraint.commit(tok.id)?;
    Ok((tok, complete))
}
