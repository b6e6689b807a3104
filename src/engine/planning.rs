//! The engine's planning of one step: which sequences run and how many tokens each, within
//! the token budget and the KV pool. Decodes first (their streams must not stall), then prompt
//! chunks in rank order; a full pool pre-empts the lowest-ranked work, never a higher-ranked
//! prompt, so that no sequence waits for ever behind lower-ranked ones.

use std::sync::atomic::Ordering;

use super::{Engine, DEFERRED_CHUNK};
use crate::engine::{FinishReason, SeqEvent, ServiceTier};

impl Engine {
    /// This step's work as (index into running, tokens), sequences of `tier` only: one token
    /// for each sequence that decodes, then prompt chunks under the token budget, in rank
    /// order. Every planned sequence has its KV blocks; when the pool runs out, the
    /// lowest-ranked sequences not yet planned (deferred ones first) are pre-empted: their
    /// blocks are freed, and they resume later from what the prefix cache still holds.
    pub(super) fn schedule(&mut self, tier: ServiceTier) -> Vec<(usize, usize)> {
        let decoding = self
            .running
            .iter()
            .filter(|s| s.tier == tier && s.pending() == 1)
            .count();
        // Deferred prompts go in small chunks: a step can only give way between layers, and
        // a layer of a small chunk is short (on a CPU, a 512-token chunk's layer takes tens
        // of milliseconds; an arriving interactive request would wait that long).
        let budget = match tier {
            ServiceTier::Interactive => self.cfg.step_token_budget,
            ServiceTier::Deferred => self.cfg.step_token_budget.min(DEFERRED_CHUNK),
        };
        let mut budget = budget.max(decoding);
        let mut plan: Vec<(usize, usize)> = Vec::new();
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
                let got = if self.make_room(i, want, &plan) {
                    want
                } else if decode_pass {
                    continue; // a decoder waits a step
                } else {
                    self.largest_chunk(i, want, &mut plan, &mut budget)
                };
                if got > 0 {
                    plan.push((i, got));
                    budget -= got;
                }
            }
        }
        plan.sort_unstable();
        plan
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
            let v = &mut self.running[j];
            tracing::info!(request_id = %v.request_id, tokens = v.tokens.len(), "KV cache full: pre-empting a lower-ranked sequence for a higher-ranked prompt; it resumes by recomputing");
            self.model.kv_release(&mut v.cache);
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reserves KV blocks for `want` more tokens of sequence `i`, pre-empting lower-ranked
    /// unplanned sequences while the pool is short. `false`: it waits this step.
    fn make_room(&mut self, i: usize, want: usize, plan: &[(usize, usize)]) -> bool {
        loop {
            let need = self.running[i].cache.len() + want;
            if self.model.kv_reserve(&mut self.running[i].cache, need) {
                return true;
            }
            let victim = (i + 1..self.running.len()).rev().find(|&j| {
                self.running[j].cache.holds_blocks() && !plan.iter().any(|&(p, _)| p == j)
            });
            let Some(j) = victim else {
                return false;
            };
            let v = &mut self.running[j];
            tracing::info!(request_id = %v.request_id, tokens = v.tokens.len(), "KV cache full: pre-empting the lowest-ranked sequence; it resumes by recomputing");
            self.model.kv_release(&mut v.cache);
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
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
