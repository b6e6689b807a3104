//! The runner: one task that moves batches through their lifecycle and keeps up to
//! `concurrency` of their lines in flight, oldest batch first. Each line goes to its endpoint
//! through the [`Executor`] as deferred work; its answer is recorded once, by line, before the
//! line counts as done. A line answered "not now" (the deferred queue is full, the model is
//! loading, the server drains) is not an answer: it goes back to the queue and runs later.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::jsonl::InputLine;
use super::objects::BatchObject;
use super::results::one_error;
use super::store::LineResult;
use super::{now_unix, BatchStatus, Batches};

/// One batch line, to be run as the batch's owner would run it.
#[derive(Debug, Clone)]
pub struct LineCall {
    pub url: String,
    pub body: Value,
    /// The API key's name that created the batch, if any.
    pub owner: Option<String>,
}

/// The endpoint's answer.
#[derive(Debug, Clone)]
pub struct LineReply {
    pub status: u16,
    pub body: Value,
    pub request_id: String,
}

impl LineReply {
    /// "Not now" rather than an answer: run the line again later.
    fn is_transient(&self) -> bool {
        let code = self.body["error"]["code"].as_str();
        match self.status {
            429 => code != Some("insufficient_quota"),
            503 | 504 => true,
            _ => false,
        }
    }
}

/// Runs one line through the HTTP layer (provided by it: the batch subsystem sits below).
pub type Executor = Arc<dyn Fn(LineCall) -> BoxFuture<'static, LineReply> + Send + Sync>;

/// How long the runner waits after a "not now" before it starts more lines.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// A batch being run: its lines, those not yet started, and how many are in flight.
struct Running {
    lines: Arc<Vec<InputLine>>,
    pending: VecDeque<usize>,
    /// Lines in flight, and the handles that abort them (a cancel does).
    flying: HashMap<usize, tokio::task::AbortHandle>,
}

enum Outcome {
    Recorded(bool),
    Retry,
}

pub(super) async fn run(batches: Batches, exec: Executor, mut stop: watch::Receiver<bool>) {
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut tasks = JoinSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, usize, Outcome)>();
    let mut paused_until = tokio::time::Instant::now();
    let mut resumed_logged = false;
    // The batches' records are read again only when something may have changed them (a batch
    // created or cancelled, a batch with nothing left to run, once a second for expiry), not
    // at every line: counting a large batch's results is not free.
    let (mut active, mut refresh) = (Vec::new(), true);
    // One clock for expiry, kept across iterations: lines finishing more often than once a
    // second must not keep putting the look off.
    let mut each_second = tokio::time::interval(Duration::from_secs(1));
    each_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *stop.borrow() {
            break;
        }
        if std::mem::take(&mut refresh) {
            active = match batches.call(|s| s.active_batches()).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "batch runner: cannot read the batches; retrying");
                    Vec::new()
                }
            };
            for b in &active {
                advance(&batches, b, &mut running).await;
            }
            // A batch just moved from validating to in progress: read it again, soon, to start it.
            refresh = active.iter().any(|b| b.status == BatchStatus::Validating);
        }
        if !resumed_logged {
            resumed_logged = true;
            for b in active
                .iter()
                .filter(|b| b.status != BatchStatus::Validating)
            {
                let done = b.request_counts.completed + b.request_counts.failed;
                tracing::info!(batch = %b.id, done, total = b.request_counts.total, "resuming a batch after a restart");
            }
        }
        let in_flight: usize = running.values().map(|r| r.flying.len()).sum();
        let mut room = batches.cfg.concurrency.saturating_sub(in_flight);
        if tokio::time::Instant::now() >= paused_until {
            for b in active
                .iter()
                .filter(|b| b.status == BatchStatus::InProgress)
            {
                let Some(r) = running.get_mut(&b.id) else {
                    continue;
                };
                while room > 0 {
                    let Some(line) = r.pending.pop_front() else {
                        break;
                    };
                    room -= 1;
                    let call = LineCall {
                        url: b.endpoint.clone(),
                        body: r.lines[line].body.clone(),
                        owner: None,
                    };
                    let custom_id = r.lines[line].custom_id.clone();
                    let (batches, exec, done, id) =
                        (batches.clone(), exec.clone(), done_tx.clone(), b.id.clone());
                    let handle = tasks.spawn(async move {
                        let run = run_line(&batches, &exec, &id, line, custom_id, call);
                        // A panic on the way (a bug) must not leave the line in flight for
                        // good: it runs again after the pause, like any "not now".
                        let outcome = std::panic::AssertUnwindSafe(run)
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| {
                                tracing::error!(batch = %id, line, "a batch line panicked; it runs again");
                                Outcome::Retry
                            });
                        let _ = done.send((id, line, outcome));
                    });
                    r.flying.insert(line, handle);
                }
            }
        }
        tokio::select! {
            Some((id, line, outcome)) = done_rx.recv() => {
                if let Some(r) = running.get_mut(&id) {
                    r.flying.remove(&line);
                    if let Outcome::Retry = outcome {
                        r.pending.push_front(line);
                        paused_until = tokio::time::Instant::now() + RETRY_PAUSE;
                    }
                    // Done, or stopping and drained: the batch is finished at the next look.
                    refresh |= r.flying.is_empty() && r.pending.is_empty();
                }
                if let Outcome::Recorded(ok) = outcome {
                    batches.lines_done[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = batches.wake.notified() => refresh = true,
            _ = tokio::time::sleep(Duration::from_millis(10)), if refresh => {}
            _ = each_second.tick() => refresh = true,
            _ = tokio::time::sleep_until(paused_until), if paused_until > tokio::time::Instant::now() => {}
            _ = stop.changed() => {}
            Some(_) = tasks.join_next() => {}
        }
        // Reap what finished meanwhile without waiting.
        while let Some(Some(_)) = tasks.join_next().now_or_never() {}
    }
    // Lines in flight are dropped (their requests cancelled); they run again at the next start.
    tasks.shutdown().await;
}

/// Moves one batch along its lifecycle: starts it, loads its lines, and finishes it when
/// nothing is left to run (completed, cancelled or expired).
async fn advance(batches: &Batches, b: &BatchObject, running: &mut HashMap<String, Running>) {
    let in_flight = running.get(&b.id).map_or(0, |r| r.flying.len());
    let id = b.id.clone();
    let result = match b.status {
        BatchStatus::Validating => batches
            .call(move |s| {
                let from = [BatchStatus::Validating];
                s.set_status(&id, &from, BatchStatus::InProgress, None)
            })
            .await
            .map(drop),
        BatchStatus::InProgress if now_unix() >= b.expires_at => {
            if in_flight == 0 {
                running.remove(&b.id);
                finish(batches, b, BatchStatus::Expired).await
            } else {
                // Nothing new starts; the lines in flight finish first.
                if let Some(r) = running.get_mut(&b.id) {
                    r.pending.clear();
                }
                Ok(())
            }
        }
        BatchStatus::InProgress => match running.get(&b.id) {
            None => match load(batches, b).await {
                Ok(r) => {
                    running.insert(b.id.clone(), r);
                    Ok(())
                }
                Err(why) => {
                    tracing::error!(batch = %b.id, error = %why, "the batch's input cannot be read; it fails");
                    let errors = one_error("invalid_file", why);
                    batches
                        .call(move |s| {
                            let from = [BatchStatus::Validating, BatchStatus::InProgress];
                            s.set_status(&id, &from, BatchStatus::Failed, Some(&errors))
                        })
                        .await
                        .map(drop)
                }
            },
            Some(r) if r.pending.is_empty() && r.flying.is_empty() => {
                running.remove(&b.id);
                finish(batches, b, BatchStatus::Completed).await
            }
            Some(_) => Ok(()),
        },
        // Lines in flight are stopped (their requests dropped; the store takes no result for
        // a finished batch), and listed as cancelled with those that never started.
        BatchStatus::Cancelling => {
            if let Some(r) = running.remove(&b.id) {
                r.flying.values().for_each(|h| h.abort());
            }
            finish(batches, b, BatchStatus::Cancelled).await
        }
        // A crash during finalizing: every line is recorded or it was stopped early.
        BatchStatus::Finalizing => {
            let status =
                if b.request_counts.completed + b.request_counts.failed >= b.request_counts.total {
                    BatchStatus::Completed
                } else if now_unix() >= b.expires_at {
                    BatchStatus::Expired
                } else {
                    BatchStatus::Cancelled
                };
            finish(batches, b, status).await
        }
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::error!(batch = %b.id, error = %e, "batch runner: a step failed; it is retried");
    }
}

async fn load(batches: &Batches, b: &BatchObject) -> Result<Running, String> {
    let batch = b.clone();
    let (lines, done) = batches
        .call(move |s| Ok((s.input_lines(&batch)?, s.done_lines(&batch.id)?)))
        .await
        .map_err(|e| e.to_string())?;
    let pending = (0..lines.len()).filter(|i| !done.contains(i)).collect();
    Ok(Running {
        lines: Arc::new(lines),
        pending,
        flying: HashMap::new(),
    })
}

async fn finish(
    batches: &Batches,
    b: &BatchObject,
    status: BatchStatus,
) -> Result<(), super::BatchError> {
    let batch = b.clone();
    let code = match status {
        BatchStatus::Expired => "batch_expired",
        _ => "batch_cancelled",
    };
    batches
        .call(move |s| s.finalize(&batch, status, code))
        .await?;
    tracing::info!(batch = %b.id, status = status.as_str(), "batch finished");
    Ok(())
}

async fn run_line(
    batches: &Batches,
    exec: &Executor,
    batch_id: &str,
    line: usize,
    custom_id: String,
    mut call: LineCall,
) -> Outcome {
    let id = batch_id.to_string();
    call.owner = match batches.call(move |s| s.batch_owner(&id)).await {
        Ok(owner) => owner,
        // Without its owner the line would run as nobody: not now.
        Err(_) => return Outcome::Retry,
    };
    let reply = exec(call).await;
    if reply.is_transient() {
        return Outcome::Retry;
    }
    let ok = reply.status == 200;
    let result = LineResult {
        line,
        custom_id,
        status_code: reply.status,
        request_id: reply.request_id,
        body: reply.body,
    };
    let id = batch_id.to_string();
    match batches.call(move |s| s.record(&id, &result)).await {
        Ok(()) => Outcome::Recorded(ok),
        Err(e) => {
            tracing::error!(batch = %batch_id, line, error = %e, "cannot record a batch line's result; it runs again");
            Outcome::Retry
        }
    }
}
