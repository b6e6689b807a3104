//! The runner: one task that moves batches through their lifecycle and keeps up to
//! `concurrency` of their lines in flight, oldest batch first. A line is read from its input
//! file and parsed only as it starts (a batch holds a cursor into its file, not its lines),
//! so at most `concurrency` parsed lines are held across all batches. Each line goes to its
//! endpoint through the [`Executor`] as deferred work; its answer is recorded once, by line,
//! before the line counts as done. A line answered "not now" (the deferred queue is full, the
//! model is loading, the server drains) is not an answer: it goes back to the queue and runs
//! later. An answer that cannot be stored is replaced by a short error: the line ran (and was
//! charged), so it never runs again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::jsonl::{parse_line, InputCursor, InputLine, RawRequest};
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

/// A batch being run: a cursor into its input, the lines to start again, those in flight.
struct Running {
    /// Shared with the blocking task that reads the next lines.
    input: Arc<Mutex<InputCursor>>,
    /// Lines answered "not now", to start again: their numbers and where they start.
    again: VecDeque<(usize, u64)>,
    /// No new line starts: the input is read to its end, or the batch expired.
    drained: bool,
    /// Lines in flight: where each starts, and the handle that aborts it (a cancel does).
    flying: HashMap<usize, Flying>,
}

struct Flying {
    offset: u64,
    abort: tokio::task::AbortHandle,
}

impl Running {
    fn idle(&self) -> bool {
        self.drained && self.again.is_empty() && self.flying.is_empty()
    }
}

/// A parsed input line on its way: counted in [`Batches::lines_held`] until dropped.
struct Held {
    line: usize,
    offset: u64,
    request: InputLine,
    count: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Outcome {
    Recorded(bool),
    Retry,
    /// It ran, but neither its answer nor an error in its place could be stored: it does not
    /// run again (the error file lists it).
    Lost,
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
                .filter(|b| b.status == BatchStatus::InProgress && now_unix() < b.expires_at)
            {
                let Some(r) = running.get_mut(&b.id) else {
                    continue;
                };
                if room == 0 || (r.drained && r.again.is_empty()) {
                    continue;
                }
                let taken = match take(&batches, r, room, &b.endpoint).await {
                    Ok(taken) => taken,
                    Err(why) => {
                        if let Some(r) = running.remove(&b.id) {
                            r.flying.values().for_each(|f| f.abort.abort());
                        }
                        fail(&batches, b, why).await;
                        refresh = true;
                        continue;
                    }
                };
                refresh |= r.idle();
                for held in taken {
                    room -= 1;
                    let (line, offset) = (held.line, held.offset);
                    let (batches, exec, done, id) =
                        (batches.clone(), exec.clone(), done_tx.clone(), b.id.clone());
                    let handle = tasks.spawn(async move {
                        let run = run_line(&batches, &exec, &id, held);
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
                    r.flying.insert(
                        line,
                        Flying {
                            offset,
                            abort: handle,
                        },
                    );
                }
            }
        }
        tokio::select! {
            Some((id, line, outcome)) = done_rx.recv() => {
                if let Some(r) = running.get_mut(&id) {
                    let flying = r.flying.remove(&line);
                    if let (Outcome::Retry, Some(f)) = (&outcome, flying) {
                        r.again.push_back((line, f.offset));
                        paused_until = tokio::time::Instant::now() + RETRY_PAUSE;
                    }
                    // Done, or stopping and drained: the batch is finished at the next look.
                    refresh |= r.idle();
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
                    r.again.clear();
                    r.drained = true;
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
                    fail(batches, b, why).await;
                    Ok(())
                }
            },
            Some(r) if r.idle() => {
                running.remove(&b.id);
                finish(batches, b, BatchStatus::Completed).await
            }
            Some(_) => Ok(()),
        },
        // Lines in flight are stopped (their requests dropped; the store takes no result for
        // a finished batch), and listed as cancelled with those that never started.
        BatchStatus::Cancelling => {
            if let Some(r) = running.remove(&b.id) {
                r.flying.values().for_each(|f| f.abort.abort());
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
    let input = batches
        .call(move |s| s.open_input(&batch))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Running {
        input: Arc::new(Mutex::new(input)),
        again: VecDeque::new(),
        drained: false,
        flying: HashMap::new(),
    })
}

/// Reads and parses up to `n` lines to start: those to run again first, then the next ones
/// from the cursor (off the runtime's threads: it is file reading). An error (the file changed
/// or went since it was accepted) fails the batch.
async fn take(
    batches: &Batches,
    r: &mut Running,
    n: usize,
    endpoint: &str,
) -> Result<Vec<Held>, String> {
    let again: Vec<(usize, u64)> = r.again.drain(..n.min(r.again.len())).collect();
    let (input, endpoint, drained) = (r.input.clone(), endpoint.to_string(), r.drained);
    let count = batches.lines_held.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<(Vec<Held>, bool), String> {
        let mut input = input
            .lock()
            .map_err(|_| "the input cursor broke".to_string())?;
        let io = |e: std::io::Error| format!("the input file cannot be read: {e}");
        let mut raw = Vec::with_capacity(n);
        for (line, offset) in again {
            let text = input.read_at(offset).map_err(io)?;
            raw.push(RawRequest { line, offset, text });
        }
        let mut end = drained;
        while !end && raw.len() < n {
            match input.next_request().map_err(io)? {
                Some(req) => raw.push(req),
                None => end = true,
            }
        }
        let mut held = Vec::with_capacity(raw.len());
        for req in raw {
            let request = parse_line(&req.text, &[&endpoint])
                .map_err(|e| format!("request {} of the input file: {e}", req.line + 1))?;
            count.fetch_add(1, Ordering::Relaxed);
            held.push(Held {
                line: req.line,
                offset: req.offset,
                request,
                count: count.clone(),
            });
        }
        Ok((held, end))
    });
    let (held, end) = read
        .await
        .map_err(|e| format!("reading the input failed: {e}"))??;
    r.drained = end;
    Ok(held)
}

/// Ends a batch whose input cannot be read as `failed`, saying why.
async fn fail(batches: &Batches, b: &BatchObject, why: String) {
    tracing::error!(batch = %b.id, error = %why, "the batch's input cannot be read; it fails");
    let (id, errors) = (b.id.clone(), one_error("invalid_file", why));
    let moved = batches
        .call(move |s| {
            let from = [BatchStatus::Validating, BatchStatus::InProgress];
            s.set_status(&id, &from, BatchStatus::Failed, Some(&errors))
        })
        .await;
    if let Err(e) = moved {
        tracing::error!(batch = %b.id, error = %e, "batch runner: a step failed; it is retried");
    }
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
    let ended = batches
        .call(move |s| s.finalize(&batch, status, code))
        .await?;
    tracing::info!(batch = %b.id, status = ended.as_str(), "batch finished");
    Ok(())
}

async fn run_line(batches: &Batches, exec: &Executor, batch_id: &str, mut held: Held) -> Outcome {
    let id = batch_id.to_string();
    let owner = match batches.call(move |s| s.batch_owner(&id)).await {
        Ok(owner) => owner,
        // Without its owner the line would run as nobody: not now.
        Err(_) => return Outcome::Retry,
    };
    // The body moves into the call (one copy); `held` counts it until the answer is in.
    let call = LineCall {
        url: std::mem::take(&mut held.request.url),
        body: std::mem::take(&mut held.request.body),
        owner,
    };
    let reply = exec(call).await;
    if reply.is_transient() {
        return Outcome::Retry;
    }
    let ok = reply.status == 200;
    let (line, custom_id) = (held.line, std::mem::take(&mut held.request.custom_id));
    drop(held);
    let (usage, request_id) = (reply.body.get("usage").cloned(), reply.request_id.clone());
    let result = LineResult {
        line,
        custom_id: custom_id.clone(),
        status_code: reply.status,
        request_id: reply.request_id,
        body: reply.body,
    };
    let id = batch_id.to_string();
    let why = match batches.call(move |s| s.record(&id, &result)).await {
        Ok(()) => return Outcome::Recorded(ok),
        Err(e) => e.to_string(),
    };
    // The request ran and was charged: it is not run again. A short error takes its answer's
    // place, with its usage, so that the batch's counts stay true.
    tracing::error!(batch = %batch_id, line, error = %why, "cannot record a batch line's result; an error is kept instead");
    let mut body = json!({"error": {
        "message": format!("the request ran, but its result could not be stored: {why}"),
        "type": "server_error", "param": null, "code": "result_not_stored"}});
    if let Some(usage) = usage {
        body["usage"] = usage;
    }
    let stand_in = LineResult {
        line,
        custom_id,
        status_code: 500,
        request_id,
        body,
    };
    let id = batch_id.to_string();
    match batches.call(move |s| s.record(&id, &stand_in)).await {
        Ok(()) => Outcome::Recorded(false),
        Err(e) => {
            tracing::error!(batch = %batch_id, line, error = %e, "cannot record a batch line's error either; it is listed as not stored");
            Outcome::Lost
        }
    }
}
