//! The engine's planning of one step: which sequences run and how many tokens each, within
//! the token budget and the KV pool. Decodes first (their streams must not stall), then prompt
//! chunks in rank order; a full pool pre-empts the lowest-ranked work, never a higher-ranked
//! prompt, so that no sequence waits for ever behind lower-ranked ones. Deferred work's
//! guaranteed share rides in interactive steps (a deferred row beside twenty interactive
//! ones costs them little) and holds KV blocks too: owed deferred work may pre-empt
//! unplanned interactive sequences, and the first deferred sequence, while it needs no more
//! of the pool than its share, is not pre-empted by interactive work (else each owed step
//! would recompute it).

use std::sync::atomic::Ordering;

use super::{Engine, DEFERRED_CHUNK};
use crate::engine::{FinishReason, SeqEvent, ServiceTier};

impl Engine {
    /// This step's work as (index into running, tokens): sequences of `tier`, then, in a
    /// `mixed` step (an interactive step in which deferred work is owed its share), deferred
    /// sequences too. For each tier, one token for each sequence that decodes, then prompt
    /// chunks under the token budget, in rank order. Every planned sequence has its KV
    /// blocks; when the pool runs out, the lowest-ranked sequences not yet planned are
    /// pre-empted: their blocks are freed, and they resume later from what the prefix cache
    /// still holds.
    pub(super) fn schedule(&mut self, tier: ServiceTier, mixed: bool) -> Vec<(usize, usize)> {
        let protected = match tier {
            ServiceTier::Interactive => self.protected_deferred(),
            ServiceTier::Deferred => None,
        };
        let mut plan = Vec::new();
        // Deferred prompts go in small chunks: a step in the gaps can only give way between
        // layers, and a layer of a small chunk is short (on a CPU, a 512-token chunk's layer
        // takes tens of milliseconds; an arriving interactive request would wait that long).
        let budget = match tier {
            ServiceTier::Interactive => self.cfg.step_token_budget,
            ServiceTier::Deferred => self.cfg.step_token_budget.min(DEFERRED_CHUNK),
        };
        let mut left = self.plan_tier(tier, false, protected, budget, &mut plan);
        if let Some(p) = protected {
            // Nothing interactive fits beside the protected deferred sequence: it gives its
            // blocks up after all (an interactive request is never ended for it).
            if plan.is_empty() && self.running[p].cache.holds_blocks() {
                self.preempt(
                    p,
                    "KV cache full: pre-empting the deferred sequence for interactive work",
                );
                left = self.plan_tier(tier, false, None, budget, &mut plan);
            }
        }
        if mixed {
            let budget = left.min(DEFERRED_CHUNK);
            self.plan_tier(ServiceTier::Deferred, true, None, budget, &mut plan);
        }
        plan.sort_unstable();
        plan
    }

    /// Whether the KV pool has room for `n` new interactive sequences of `prompt` tokens at
    /// `priority` beside the rest of what the running sequences ranked above them need for
    /// their tokens; the blocks of those ranked below (deferred ones, worse priorities) count
    /// as room, as they would be pre-empted for it. Always, without a bounded pool.
    pub(super) fn kv_room_for(&self, priority: i64, prompt: usize, n: usize) -> bool {
        let Some((used, total, per_block)) = self.model.kv_usage() else {
            return true;
        };
        let blocks = |tokens: usize| tokens.div_ceil(per_block);
        let (mut need, mut room) = (n * blocks(prompt + 1), total.saturating_sub(used));
        for s in &self.running {
            if s.tier == ServiceTier::Deferred || s.priority > priority {
                room += blocks(s.cache.len());
            } else {
                need += blocks(s.tokens.len() + 1).saturating_sub(blocks(s.cache.len()));
            }
        }
        need <= room
    }

    /// The first-ranked deferred sequence, when deferred work has a share and the sequence
    /// needs no more of the KV pool than that share.
    fn protected_deferred(&self) -> Option<usize> {
        if !self.share.enabled() {
            return None;
        }
        let p = self
            .running
            .iter()
            .position(|s| s.tier == ServiceTier::Deferred)?;
        let s = &self.running[p];
        let (_, blocks, per_block) = self.model.kv_usage()?;
        let share = self.share.share(s.submitted_at.elapsed());
        (s.tokens.len() as f64 <= share * (blocks * per_block) as f64).then_some(p)
    }

    /// Adds the work of `tier` to `plan` within `budget` tokens (at least one per decoder):
    /// the budget left. `owed`: deferred work owed its share, which may pre-empt unplanned
    /// interactive sequences for KV blocks.
    fn plan_tier(
        &mut self,
        tier: ServiceTier,
        owed: bool,
        protected: Option<usize>,
        budget: usize,
        plan: &mut Vec<(usize, usize)>,
    ) -> usize {
        let decoding = self
            .running
            .iter()
            .filter(|s| s.tier == tier && s.pending() == 1)
            .count();
        let mut budget = budget.max(decoding);
        for decode_pass in [true, false] {
            for i in 0..self.running.len() {
                if self.running[i].tier != tier {
                    continue;
                }
                let pending = self.running[i].pending();
                let want = match (decode_pass, pending) {
                    (true, 1) => 1,
                    (false, p) if p > 1 => p.min(budget),
                    _ => continue,
                };
                if want == 0 {
                    continue;
                }
                let got = if self.make_room(i, want, plan, owed, protected) {
                    want
                } else if decode_pass {
                    continue; // a decoder waits a step
                } else {
                    self.largest_chunk(i, want, plan, &mut budget)
                };
                if got > 0 {
                    plan.push((i, got));
                    budget -= got;
                }
            }
        }
        budget
    }

    fn preempt(&mut self, j: usize, why: &str) {
        let v = &mut self.running[j];
        tracing::info!(request_id = %v.request_id, tokens = v.tokens.len(), "{why}; it resumes by recomputing");
        self.model.kv_release(&mut v.cache);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    /// A prompt whose whole chunk does not fit even with every unplanned lower-ranked
    /// sequence pre-empted takes the largest chunk that does. If not even one token fits,
    /// the lowest-ranked sequences already planned below it (decoders, planned first) are
    /// taken out of the plan and pre-empted until some room is free: lower-ranked work can
    /// never hold a higher-ranked prompt back for ever (it used to wait while lower-ranked
    /// decoders and short prompts took every block, or be ended as "too long" when the
    /// step planned nothing). Returns the chunk's tokens (0: none this step).
    fn largest_chunk(
        &mut self,
        i: usize,
        want: usize,
        plan: &mut Vec<(usize, usize)>,
        budget: &mut usize,
    ) -> usize {
        loop {
            let base = self.running[i].cache.len();
            // Reservations are all or nothing and grow only: the largest that succeeds is
            // what the sequence holds afterwards. A length known to fit, one known not to
            // (`want` itself is tried too: a pre-emption may have made room for all of it).
            let (mut fits, mut fails) = (0, want + 1);
            while fails - fits > 1 {
                let mid = fits + (fails - fits) / 2;
                if self
                    .model
                    .kv_reserve(&mut self.running[i].cache, base + mid)
                {
                    fits = mid;
                } else {
                    fails = mid;
                }
            }
            if fits > 0 {
                return fits;
            }
            let lowest = plan
                .iter()
                .enumerate()
                .filter(|(_, &(j, _))| j > i)
                .max_by_key(|(_, &(j, _))| j)
                .map(|(at, _)| at);
            let Some(at) = lowest else {
                return 0;
            };
            let (j, tokens) = plan.swap_remove(at);
            *budget += tokens;
            self.preempt(
                j,
                "KV cache full: pre-empting a lower-ranked sequence for a higher-ranked prompt",
            );
        }
    }

    /// Reserves KV blocks for `want` more tokens of sequence `i`, pre-empting unplanned
    /// sequences while the pool is short: lower-ranked ones, from the lowest, except the
    /// `protected` one; for `owed` deferred work then interactive ones too, the shortest
    /// first. `false`: it waits this step.
    fn make_room(
        &mut self,
        i: usize,
        want: usize,
        plan: &[(usize, usize)],
        owed: bool,
        protected: Option<usize>,
    ) -> bool {
        loop {
            let need = self.running[i].cache.len() + want;
            if self.model.kv_reserve(&mut self.running[i].cache, need) {
                return true;
            }
            let running = &self.running;
            let unplanned = |j: &usize| {
                running[*j].cache.holds_blocks()
                    && Some(*j) != protected
                    && !plan.iter().any(|&(p, _)| p == *j)
            };
            let lower = (i + 1..running.len()).rev().find(unplanned);
            // Of the interactive sequences, the one that loses least: the shortest cache
            // (a long prompt waiting for a block would recompute all of it), then the
            // lowest-ranked.
            let interactive = || {
                (0..i)
                    .filter(|&j| running[j].tier == ServiceTier::Interactive)
                    .filter(unplanned)
                    .min_by_key(|&j| (running[j].cache.len(), std::cmp::Reverse(j)))
            };
            let victim = lower.or_else(|| owed.then(interactive).flatten());
            let Some(j) = victim else {
                return false;
            };
            self.preempt(j, "KV cache full: pre-empting the lowest-ranked sequence");
        }
    }

    /// Nothing could be scheduled: the first-ranked sequence needs more KV cache than the
    /// whole pool holds even with every other sequence pre-empted. It ends: with what it
    /// has generated when it was decoding, else with an error.
    pub(super) fn unblock(&mut self, tier: ServiceTier) {
        let Some(first) = self.running.iter().position(|s| s.tier == tier) else {
            return;
        };
        let mut ended = vec![false; self.running.len()];
        ended[first] = true;
        let seq = &mut self.running[first];
        tracing::warn!(request_id = %seq.request_id, tokens = seq.tokens.len(), "sequence longer than the whole KV cache (--kv-cache-mb); ending it");
        if seq.generated > 0 {
            seq.finish(&self.tokenizer, FinishReason::Length);
        } else {
            let _ = seq.events.send(SeqEvent::Failed {
                message: "the prompt needs more KV cache than the server has (--kv-cache-mb)"
                    .into(),
            });
        }
        self.remove_marked(&ended);
    }
}
