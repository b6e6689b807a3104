//! What one request's answer took, as the client saw it: time to the first token, the gaps
//! between tokens, end to end. The record goes to telemetry when the answer ends, however it
//! ends (a client that leaves mid-stream is counted as an abort).

use std::time::Instant;

use std::sync::Arc;

use super::auth::KeyIdentity;
use crate::engine::{FinishReason, SeqEvent};
use crate::telemetry::{Outcome, RequestRecord, Telemetry};
use crate::usage::{QuotaHold, Usage};

pub struct RequestTimer {
    telemetry: Option<Telemetry>,
    /// Where the request's tokens are counted, and to whom.
    usage: Option<(Usage, Arc<KeyIdentity>)>,
    /// Its reservation of the key's quota: dropped after the usage is recorded (fields drop
    /// after `Drop::drop`), so the tokens are never counted free in between.
    _quota: Option<QuotaHold>,
    started: Instant,
    last_token: Option<Instant>,
    record: RequestRecord,
    /// Per choice: tokens seen so far, and the engine's count once it finished. A choice cut
    /// short (client gone, timeout, shutdown) is charged for the tokens it did generate.
    seen: Vec<usize>,
    finished: Vec<Option<usize>>,
}

impl RequestTimer {
    /// `started`: when the request arrived.
    pub fn new(telemetry: Option<Telemetry>, started: Instant, prompt_tokens: usize) -> Self {
        Self {
            telemetry,
            usage: None,
            _quota: None,
            started,
            last_token: None,
            seen: Vec::new(),
            finished: Vec::new(),
            record: RequestRecord {
                prompt_tokens,
                ..RequestRecord::default()
            },
        }
    }

    /// Counts the request's tokens to `who` when it ends, then releases its `quota` hold.
    pub fn with_usage(
        mut self,
        usage: Option<(Usage, Arc<KeyIdentity>)>,
        quota: Option<QuotaHold>,
    ) -> Self {
        self.usage = usage;
        self._quota = quota;
        self
    }

    /// Notes one engine event.
    pub fn observe(&mut self, event: &SeqEvent) {
        match *event {
            SeqEvent::Token { choice, .. } => {
                if self.seen.len() <= choice {
                    self.seen.resize(choice + 1, 0);
                }
                self.seen[choice] += 1;
            }
            SeqEvent::Finished {
                choice,
                completion_tokens,
                ..
            } => {
                if self.finished.len() <= choice {
                    self.finished.resize(choice + 1, None);
                }
                self.finished[choice] = Some(completion_tokens);
            }
            SeqEvent::Failed { .. } => {}
        }
        match event {
            SeqEvent::Token { .. } => {
                let now = Instant::now();
                match self.last_token.replace(now) {
                    None => self.record.ttft_s = Some((now - self.started).as_secs_f64()),
                    Some(prev) => self.record.inter_token_s.push((now - prev).as_secs_f32()),
                }
            }
            SeqEvent::Finished {
                reason,
                completion_tokens,
                ..
            } => {
                self.record.completion_tokens += completion_tokens;
                self.record.outcome = match reason {
                    FinishReason::Stop => Outcome::Stop,
                    FinishReason::Length => Outcome::Length,
                };
            }
            SeqEvent::Failed { .. } => self.record.outcome = Outcome::Error,
        }
    }

    /// The answer was cut short (timeout, shutdown, client gone) after some choices finished.
    pub fn aborted(&mut self) {
        self.record.outcome = Outcome::Abort;
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        if let Some((usage, who)) = self.usage.take() {
            // Each choice's count from the engine when it finished, else the tokens it sent
            // before it was cut short: what a request generated is charged however it ended.
            let choices = self.seen.len().max(self.finished.len());
            let completion: usize = (0..choices)
                .map(|c| match self.finished.get(c).copied().flatten() {
                    Some(n) => n,
                    None => self.seen.get(c).copied().unwrap_or(0),
                })
                .sum();
            usage.record(
                &who.name,
                self.record.prompt_tokens as u64,
                completion as u64,
            );
        }
        if let Some(t) = self.telemetry.take() {
            self.record.e2e_s = self.started.elapsed().as_secs_f64();
            t.finished(std::mem::take(&mut self.record));
        }
    }
}
