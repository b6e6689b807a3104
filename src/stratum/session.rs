//! The client side of a Stratum session as a pure state machine: it takes decoded messages,
//! connection events and found shares, and answers with [`Action`]s (lines to send, work for
//! the miner). It decides what is submitted: each share once, only while its job and
//! extranonce1 are current; shares found while disconnected wait for the next session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::{
    encode_call, encode_response, parse_difficulty, parse_subscribe_result, Message, Notify,
    RpcError,
};
use crate::log_limit::RateLimitedLog;
use crate::mining::{target_for_difficulty, Job, Share, WorkSource};

/// The lowest share difficulty the client mines at, whatever the pool asks: below it a pool
/// (hostile or broken) would have the miner submit shares by the thousand each second.
pub const MIN_SHARE_DIFFICULTY: f64 = 1e-5;

/// Jobs kept live after `clean_jobs=false` notifies: a pool that never cleans cannot grow the
/// list (a share for an older job is counted stale).
pub const MAX_LIVE_JOBS: usize = 64;
/// Shares held while disconnected or before the first job of a connection; past it the oldest
/// is dropped (counted).
pub const MAX_QUEUED_SHARES: usize = 1024;
/// Submissions the pool has not answered yet; a pool that stops answering cannot make the
/// client remember every share it ever sent. Past it a share is dropped (counted).
pub const MAX_SUBMITS_IN_FLIGHT: usize = 1024;
/// Submitted shares remembered for the duplicate check, on top of pruning by live job.
pub const MAX_REMEMBERED_SUBMITS: usize = 65_536;

/// Version bits idlerig asks to roll (BIP 310's general-purpose range).
pub const VERSION_ROLLING_MASK: u32 = 0x1fff_e000;

/// What the I/O task must do.
#[derive(Debug, Clone)]
pub enum Action {
    Send(String),
    /// Mine this from now on.
    SetWork(WorkSource),
    /// Stop mining: there is no valid work.
    ClearWork,
    /// The pool asked us to reconnect (`None` host: the same pool).
    Reconnect {
        host: Option<String>,
        port: Option<u16>,
        wait: Duration,
    },
}

/// Outcome counters of submitted and found shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShareCounts {
    pub submitted: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Found for a job the pool had already replaced (or under an old extranonce1): never sent.
    pub stale: u64,
    pub duplicates_suppressed: u64,
    /// Found but never submitted because a bound was reached (logged, rate-limited).
    pub dropped: u64,
}

#[derive(Debug)]
enum Pending {
    Configure,
    Subscribe,
    Authorize,
    ExtranonceSubscribe,
    Submit(Share),
}

type ShareKey = (String, Vec<u8>, Vec<u8>, u32, u32, Option<u32>);

fn key(s: &Share) -> ShareKey {
    (
        s.job_id.clone(),
        s.extranonce1.clone(),
        s.extranonce2.clone(),
        s.ntime,
        s.nonce,
        s.version_bits,
    )
}

/// One miner's view of its pool.
pub struct ClientSession {
    user: String,
    password: String,
    agent: String,
    version_rolling: bool,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// The pool's subscription id, offered again on reconnect to keep extranonce1.
    session_id: Option<String>,
    extranonce1: Option<Vec<u8>>,
    extranonce2_size: usize,
    difficulty: f64,
    version_mask: u32,
    job: Option<Job>,
    /// Jobs a share may still be submitted for, oldest first.
    valid_jobs: VecDeque<String>,
    connected: bool,
    authorized: bool,
    /// Since (re)connecting, no notify yet: queued shares wait to learn whether their job lives.
    awaiting_notify: bool,
    queued: VecDeque<Share>,
    /// Shares sent, by job, so that none is sent twice; a job's go when it ends.
    submitted: HashMap<String, HashSet<ShareKey>>,
    drop_log: RateLimitedLog,
    pub counts: ShareCounts,
}

impl ClientSession {
    pub fn new(user: &str, password: &str, version_rolling: bool) -> Self {
        Self {
            user: user.to_string(),
            password: password.to_string(),
            agent: format!("idlerig/{}", env!("CARGO_PKG_VERSION")),
            version_rolling,
            next_id: 1,
            pending: HashMap::new(),
            session_id: None,
            extranonce1: None,
            extranonce2_size: 4,
            difficulty: 1.0,
            version_mask: 0,
            job: None,
            valid_jobs: VecDeque::new(),
            connected: false,
            authorized: false,
            awaiting_notify: true,
            queued: VecDeque::new(),
            submitted: HashMap::new(),
            drop_log: RateLimitedLog::default(),
            counts: ShareCounts::default(),
        }
    }

    pub fn difficulty(&self) -> f64 {
        self.difficulty
    }

    /// Shares sent and not yet answered.
    pub fn pending_submits(&self) -> usize {
        self.pending
            .values()
            .filter(|p| matches!(p, Pending::Submit(_)))
            .count()
    }

    pub fn is_authorized(&self) -> bool {
        self.authorized
    }

    fn call(&mut self, method: &str, params: Value, pending: Pending) -> Action {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, pending);
        Action::Send(encode_call(Some(id), method, params))
    }

    /// The connection is up: configure, subscribe (resuming the last session), authorize.
    pub fn on_connect(&mut self) -> Vec<Action> {
        self.connected = true;
        self.authorized = false;
        self.awaiting_notify = true;
        self.pending.retain(|_, p| matches!(p, Pending::Submit(_)));
        let mut out = Vec::new();
        if self.version_rolling {
            let params = json!([["version-rolling"], {"version-rolling.mask": format!("{VERSION_ROLLING_MASK:08x}"), "version-rolling.min-bit-count": 2}]);
            out.push(self.call("mining.configure", params, Pending::Configure));
        }
        let sub = match &self.session_id {
            Some(sid) => json!([self.agent, sid]),
            None => json!([self.agent]),
        };
        out.push(self.call("mining.subscribe", sub, Pending::Subscribe));
        let auth = json!([self.user, self.password]);
        out.push(self.call("mining.authorize", auth, Pending::Authorize));
        out
    }

    /// The connection is gone. Submits in flight go back to the queue: the pool may not have
    /// seen them, and its duplicate check protects it if it did.
    pub fn on_disconnect(&mut self) -> Vec<Action> {
        self.connected = false;
        self.authorized = false;
        let pending = std::mem::take(&mut self.pending);
        for (_, p) in pending {
            if let Pending::Submit(share) = p {
                if let Some(sent) = self.submitted.get_mut(&share.job_id) {
                    sent.remove(&key(&share));
                }
                self.counts.submitted -= 1;
                self.enqueue(share);
            }
        }
        vec![Action::ClearWork]
    }

    /// A share the miner found.
    pub fn on_share(&mut self, share: Share) -> Vec<Action> {
        if self.was_submitted(&share) {
            self.counts.duplicates_suppressed += 1;
            return vec![];
        }
        if !self.connected || !self.authorized || self.awaiting_notify {
            self.enqueue(share);
            return vec![];
        }
        self.submit_if_current(share).into_iter().collect()
    }

    /// Holds a share until it can be submitted; past [`MAX_QUEUED_SHARES`] the oldest (the
    /// likeliest to be stale) makes room.
    fn enqueue(&mut self, share: Share) {
        if self.queued.len() >= MAX_QUEUED_SHARES {
            if let Some(old) = self.queued.pop_front() {
                self.record_drop(&old, "the queue of shares waiting for the pool is full");
            }
        }
        self.queued.push_back(share);
    }

    fn record_drop(&mut self, share: &Share, why: &str) {
        self.counts.dropped += 1;
        if let Some(suppressed) = self.drop_log.admit(Instant::now()) {
            tracing::warn!(job = %share.job_id, why, dropped_total = self.counts.dropped, suppressed, "share dropped");
        }
    }

    /// Shares held for a later submission.
    pub fn queued_shares(&self) -> usize {
        self.queued.len()
    }

    /// Shares remembered for the duplicate check.
    pub fn remembered_submits(&self) -> usize {
        self.submitted.values().map(HashSet::len).sum()
    }

    fn was_submitted(&self, share: &Share) -> bool {
        self.submitted
            .get(&share.job_id)
            .is_some_and(|sent| sent.contains(&key(share)))
    }

    /// Jobs a share may still be submitted for.
    pub fn live_jobs(&self) -> usize {
        self.valid_jobs.len()
    }

    /// Forgets the submitted shares of jobs that have ended: they can no longer be sent. (Not
    /// those of an earlier extranonce1: a pool may hand it back on the next connection, and the
    /// same job mined again under it must not be submitted twice.)
    fn prune_submitted(&mut self) {
        let jobs = &self.valid_jobs;
        self.submitted.retain(|job, _| jobs.contains(job));
    }

    fn share_is_current(&self, share: &Share) -> bool {
        self.valid_jobs.contains(&share.job_id)
            && self.extranonce1.as_ref() == Some(&share.extranonce1)
    }

    fn submit_if_current(&mut self, share: Share) -> Option<Action> {
        if !self.share_is_current(&share) {
            self.counts.stale += 1;
            tracing::debug!(job = %share.job_id, "share for a replaced job: not submitted (stale)");
            return None;
        }
        if self.pending_submits() >= MAX_SUBMITS_IN_FLIGHT {
            self.record_drop(&share, "the pool has not answered the last submissions");
            return None;
        }
        if self.remembered_submits() >= MAX_REMEMBERED_SUBMITS {
            // The pool's own duplicate check still stands; this only bounds memory.
            tracing::debug!("forgetting submitted shares: the duplicate check's bound was reached");
            self.submitted.clear();
        }
        if !self
            .submitted
            .entry(share.job_id.clone())
            .or_default()
            .insert(key(&share))
        {
            self.counts.duplicates_suppressed += 1;
            return None;
        }
        self.counts.submitted += 1;
        let params = super::protocol::submit_params(&self.user, &share);
        Some(self.call("mining.submit", params, Pending::Submit(share)))
    }

    fn flush_queue(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.queued)
            .into_iter()
            .filter_map(|s| self.submit_if_current(s))
            .collect()
    }

    fn work(&self) -> Vec<Action> {
        match (&self.job, &self.extranonce1) {
            (Some(job), Some(en1)) => vec![Action::SetWork(WorkSource::new(
                job.clone(),
                en1.clone(),
                self.extranonce2_size,
                target_for_difficulty(self.difficulty),
                self.version_mask,
            ))],
            _ => vec![],
        }
    }

    pub fn on_message(&mut self, msg: Message) -> Vec<Action> {
        match msg {
            Message::Response { id, result, error } => {
                let Some(pending) = id.as_u64().and_then(|id| self.pending.remove(&id)) else {
                    tracing::debug!(%id, "response to no pending request");
                    return vec![];
                };
                self.on_response(pending, result, error)
            }
            Message::Call { id, method, params } => self.on_call(id, &method, &params),
        }
    }

    fn on_response(
        &mut self,
        pending: Pending,
        result: Value,
        error: Option<RpcError>,
    ) -> Vec<Action> {
        match pending {
            Pending::Configure => {
                let granted = result
                    .get("version-rolling")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.version_mask = if granted {
                    result
                        .get("version-rolling.mask")
                        .and_then(Value::as_str)
                        .and_then(|m| u32::from_str_radix(m, 16).ok())
                        .unwrap_or(0)
                        & VERSION_ROLLING_MASK
                } else {
                    0
                };
                vec![]
            }
            Pending::Subscribe => match parse_subscribe_result(&result) {
                Ok((en1, size)) => {
                    if self.extranonce1.as_ref() != Some(&en1) {
                        self.job = None;
                    }
                    self.extranonce1 = Some(en1);
                    self.extranonce2_size = size;
                    self.prune_submitted();
                    self.session_id = result
                        .get(0)
                        .and_then(|subs| subs.as_array())
                        .and_then(|subs| subs.iter().find_map(|s| s.get(1).and_then(Value::as_str)))
                        .map(str::to_string);
                    let mut out = vec![self.call(
                        "mining.extranonce.subscribe",
                        json!([]),
                        Pending::ExtranonceSubscribe,
                    )];
                    out.extend(self.work());
                    out
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pool's subscribe answer is unusable");
                    vec![]
                }
            },
            Pending::Authorize => {
                self.authorized = result.as_bool().unwrap_or(false) && error.is_none();
                if self.authorized {
                    tracing::info!(worker = %self.user, "authorized by the pool");
                } else {
                    tracing::error!(worker = %self.user, reason = ?error.map(|e| e.message), "the pool refused the worker's credentials");
                }
                vec![]
            }
            Pending::ExtranonceSubscribe => vec![],
            Pending::Submit(share) => {
                if result.as_bool() == Some(true) && error.is_none() {
                    self.counts.accepted += 1;
                    tracing::debug!(job = %share.job_id, difficulty = share.difficulty, "share accepted");
                } else {
                    self.counts.rejected += 1;
                    let reason = error
                        .map(|e| format!("{} ({})", e.message, e.code))
                        .unwrap_or_else(|| "no reason given".into());
                    tracing::info!(job = %share.job_id, %reason, "share rejected by the pool");
                }
                vec![]
            }
        }
    }

    fn on_call(&mut self, id: Option<Value>, method: &str, params: &[Value]) -> Vec<Action> {
        match method {
            "mining.notify" => match Notify::from_params(params).and_then(|n| n.to_job()) {
                Ok(job) => {
                    if job.clean_jobs {
                        self.valid_jobs.clear();
                    }
                    // A job sent again is the newest again: the job being mined is never the
                    // first to be evicted.
                    self.valid_jobs.retain(|j| *j != job.job_id);
                    if self.valid_jobs.len() >= MAX_LIVE_JOBS {
                        self.valid_jobs.pop_front();
                    }
                    self.valid_jobs.push_back(job.job_id.clone());
                    self.prune_submitted();
                    self.job = Some(job);
                    let mut out = self.work();
                    if self.awaiting_notify && self.authorized {
                        self.awaiting_notify = false;
                        out.extend(self.flush_queue());
                    }
                    out
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed mining.notify");
                    vec![]
                }
            },
            "mining.set_difficulty" => match parse_difficulty(params) {
                Ok(d) => {
                    if d < MIN_SHARE_DIFFICULTY {
                        tracing::warn!(
                            asked = d,
                            floor = MIN_SHARE_DIFFICULTY,
                            "the pool asked for a share difficulty below the floor; mining at the floor"
                        );
                    }
                    self.difficulty = d.max(MIN_SHARE_DIFFICULTY);
                    self.work()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a bad mining.set_difficulty");
                    vec![]
                }
            },
            "mining.set_extranonce" => {
                match (
                    params.first().and_then(Value::as_str).map(hex::decode),
                    params.get(1).and_then(Value::as_u64),
                ) {
                    (Some(Ok(en1)), Some(size)) if (1..=16).contains(&size) => {
                        self.extranonce1 = Some(en1);
                        self.extranonce2_size = size as usize;
                        self.prune_submitted();
                        self.work()
                    }
                    _ => {
                        tracing::warn!(?params, "ignoring a bad mining.set_extranonce");
                        vec![]
                    }
                }
            }
            "mining.set_version_mask" => {
                if let Some(mask) = params
                    .first()
                    .and_then(Value::as_str)
                    .and_then(|m| u32::from_str_radix(m, 16).ok())
                {
                    self.version_mask = if self.version_rolling {
                        mask & VERSION_ROLLING_MASK
                    } else {
                        0
                    };
                }
                self.work()
            }
            "client.reconnect" => vec![Action::Reconnect {
                host: params
                    .first()
                    .and_then(Value::as_str)
                    .filter(|h| !h.is_empty())
                    .map(str::to_string),
                port: params
                    .get(1)
                    .and_then(|p| {
                        p.as_u64()
                            .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
                    })
                    // A port that is not one is ignored (the current one stays), not truncated.
                    .and_then(|p| u16::try_from(p).ok().filter(|&p| p != 0)),
                wait: Duration::from_secs(
                    params.get(2).and_then(Value::as_u64).unwrap_or(0).min(600),
                ),
            }],
            "client.get_version" => id
                .map(|id| Action::Send(encode_response(&id, json!(self.agent), None)))
                .into_iter()
                .collect(),
            "client.show_message" => {
                tracing::info!(message = ?params.first(), "message from the pool");
                id.map(|id| Action::Send(encode_response(&id, json!(true), None)))
                    .into_iter()
                    .collect()
            }
            other => {
                tracing::debug!(method = other, "unsupported call from the pool");
                id.map(|id| {
                    Action::Send(encode_response(
                        &id,
                        Value::Null,
                        Some(&RpcError {
                            code: 20,
                            message: format!("unsupported method {other}"),
                        }),
                    ))
                })
                .into_iter()
                .collect()
            }
        }
    }
}

impl std::fmt::Debug for ClientSession {
    // The password never appears in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("difficulty", &self.difficulty)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
