//! One miner's connection to the embedded pool: its subscription, authorization, difficulty,
//! the jobs sent to it, and the validation of every share it submits.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};

use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::pool::{ConnectionSlot, NotRecorded, PoolCommand, PoolJob, Shared};
use super::protocol::{
    codes, encode_call, encode_response, parse_line, Message, RpcError, Submit, MAX_LINE_BYTES,
};
use crate::log_limit::RateLimitedLog;
use crate::mining::job::{roll_version, Job};
use crate::mining::sha256::sha256d;
use crate::mining::target::{difficulty_of_hash, meets_target, target_for_difficulty, U256};

/// Lines that fail to parse before the pool hangs up on a peer.
const MAX_BAD_LINES: u32 = 10;
/// How far into the future a share's ntime may be rolled.
const MAX_NTIME_ROLL_SECS: u32 = 7200;

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    session_id: String,
    extranonce1: Vec<u8>,
    subscribed: bool,
    /// Worker names authorized on this connection: a share is credited only to one of them.
    workers: HashSet<String>,
    /// Rejections logged at info, at most one a second (the others are counted).
    rejection_log: RateLimitedLog,
    version_mask: u32,
    difficulty: f64,
    /// Jobs sent to this miner and the lowest difficulty in force for each.
    jobs: HashMap<String, (Arc<PoolJob>, f64)>,
    last_job: Option<Arc<PoolJob>>,
    vardiff_since: Instant,
    vardiff_shares: u32,
    out: Vec<String>,
}

fn reject(code: i64, message: &str) -> RpcError {
    RpcError {
        code,
        message: message.to_string(),
    }
}

/// Sessions remembered for resumption; past it one no connection holds is forgotten.
const MAX_RESUMABLE_SESSIONS: usize = 4096;

/// Worker names one connection may authorize.
const MAX_WORKERS_PER_CONNECTION: usize = 16;

impl Session {
    fn authorized(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Sends `job`. `clean`: `Some(true)` forces `clean_jobs` (new extranonce1), `Some(false)`
    /// resends a job already sent (new difficulty) without invalidating anything, `None` sends
    /// it as the template says.
    fn notify_job(&mut self, job: &Arc<PoolJob>, clean: Option<bool>) {
        let clean = clean.unwrap_or(job.notify.clean_jobs);
        if clean {
            self.jobs.clear();
        }
        // A job keeps the lowest difficulty it was sent under, so work done before a
        // difficulty rise is still accepted.
        let entry = self
            .jobs
            .entry(job.notify.job_id.clone())
            .or_insert((job.clone(), self.difficulty));
        entry.1 = entry.1.min(self.difficulty);
        let mut notify = job.notify.clone();
        notify.clean_jobs = clean;
        self.out
            .push(encode_call(None, "mining.notify", notify.to_params()));
        self.last_job = Some(job.clone());
    }

    fn set_difficulty(&mut self, d: f64) {
        self.difficulty = d.max(self.shared.cfg.min_difficulty);
        self.out.push(encode_call(
            None,
            "mining.set_difficulty",
            json!([self.difficulty]),
        ));
        // The new difficulty applies from the next notify: resend the current job under it
        // (older work stays acceptable at the lower of the two difficulties).
        if let Some(job) = self.last_job.clone() {
            self.notify_job(&job, Some(false));
        }
    }

    fn handle_call(&mut self, id: Option<Value>, method: &str, params: &[Value]) {
        let reply = |s: &mut Self, result: Value, err: Option<RpcError>| {
            if let Some(id) = &id {
                s.out.push(encode_response(id, result, err.as_ref()));
            }
        };
        match method {
            "mining.configure" => {
                let wants = params
                    .first()
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|e| e == "version-rolling"));
                let asked = params
                    .get(1)
                    .and_then(|o| o.get("version-rolling.mask"))
                    .and_then(Value::as_str)
                    .and_then(|m| u32::from_str_radix(m, 16).ok())
                    .unwrap_or(u32::MAX);
                if wants {
                    self.version_mask = asked & self.shared.cfg.version_mask;
                    reply(
                        self,
                        json!({"version-rolling": true, "version-rolling.mask": format!("{:08x}", self.version_mask)}),
                        None,
                    );
                } else {
                    reply(self, json!({}), None);
                }
            }
            "mining.subscribe" => {
                // A session is resumed (same extranonce1, so its work stays valid) only when
                // no live connection holds it: an extranonce1 in use cannot be taken over.
                let mut live = self
                    .shared
                    .live_sessions
                    .lock()
                    .expect("live sessions lock");
                let resumed = params
                    .get(1)
                    .and_then(Value::as_str)
                    .filter(|sid| !live.contains(*sid))
                    .and_then(|sid| {
                        self.shared
                            .sessions
                            .lock()
                            .expect("sessions lock")
                            .get(sid)
                            .cloned()
                            .map(|en1| (sid.to_string(), en1))
                    });
                if let Some((sid, en1)) = resumed {
                    live.remove(&self.session_id);
                    self.session_id = sid;
                    self.extranonce1 = en1;
                }
                live.insert(self.session_id.clone());
                {
                    // Locked after `live`, as above: one order, no deadlock.
                    let mut sessions = self.shared.sessions.lock().expect("sessions lock");
                    if sessions.len() >= MAX_RESUMABLE_SESSIONS
                        && !sessions.contains_key(&self.session_id)
                    {
                        // A peer reconnecting without end cannot grow the table: a session
                        // no connection holds is forgotten (it can no longer be resumed).
                        if let Some(old) = sessions.keys().find(|k| !live.contains(*k)).cloned() {
                            sessions.remove(&old);
                        }
                    }
                    sessions.insert(self.session_id.clone(), self.extranonce1.clone());
                }
                drop(live);
                self.subscribed = true;
                let result = json!([
                    [
                        ["mining.set_difficulty", self.session_id],
                        ["mining.notify", self.session_id]
                    ],
                    hex::encode(&self.extranonce1),
                    self.shared.cfg.extranonce2_size
                ]);
                reply(self, result, None);
            }
            "mining.extranonce.subscribe" => reply(self, json!(true), None),
            "mining.authorize" => {
                let user = params.first().and_then(Value::as_str).unwrap_or("");
                if user.is_empty() {
                    reply(
                        self,
                        json!(false),
                        Some(reject(codes::UNAUTHORIZED, "a worker name is required")),
                    );
                    return;
                }
                if self.workers.len() >= MAX_WORKERS_PER_CONNECTION && !self.workers.contains(user)
                {
                    reply(
                        self,
                        json!(false),
                        Some(reject(
                            codes::UNAUTHORIZED,
                            "too many workers on one connection",
                        )),
                    );
                    return;
                }
                self.workers.insert(user.to_string());
                reply(self, json!(true), None);
                let d = self.difficulty;
                self.out
                    .push(encode_call(None, "mining.set_difficulty", json!([d])));
            }
            "mining.suggest_difficulty" => {
                // Honoured upwards only: a miner may ask for fewer, harder shares, never for
                // a flood of easy ones below what vardiff set.
                if let Some(d) = params
                    .first()
                    .and_then(Value::as_f64)
                    .filter(|d| d.is_finite())
                {
                    self.difficulty = self.difficulty.max(d);
                }
                reply(self, json!(true), None);
            }
            "mining.submit" => {
                let result = self.check_submit(params);
                let stats = &self.shared.stats;
                match &result {
                    Ok(diff) => {
                        stats.accepted.fetch_add(1, Ordering::Relaxed);
                        stats
                            .accepted_work_milli
                            .fetch_add((diff * 1000.0) as u64, Ordering::Relaxed);
                        self.vardiff_shares += 1;
                    }
                    Err(e) => {
                        let counter = match e.code {
                            codes::JOB_NOT_FOUND => &stats.rejected_stale,
                            codes::DUPLICATE => &stats.rejected_duplicate,
                            codes::LOW_DIFFICULTY => &stats.rejected_low_difficulty,
                            _ => &stats.rejected_other,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.rejection_log.admit(Instant::now()) {
                            tracing::info!(peer = %self.peer, code = e.code, reason = %e.message, suppressed, "pool: share rejected");
                        }
                    }
                }
                match result {
                    Ok(_) => reply(self, json!(true), None),
                    Err(e) => reply(self, Value::Null, Some(e)),
                }
            }
            other => reply(
                self,
                Value::Null,
                Some(reject(codes::OTHER, &format!("unknown method {other}"))),
            ),
        }
    }

    /// Validates a share by rebuilding its header; returns the share's difficulty.
    fn check_submit(&mut self, params: &[Value]) -> Result<f64, RpcError> {
        if !self.subscribed {
            return Err(reject(codes::NOT_SUBSCRIBED, "not subscribed"));
        }
        if !self.authorized() {
            return Err(reject(codes::UNAUTHORIZED, "unauthorized worker"));
        }
        let s = Submit::from_params(params).map_err(|e| reject(codes::OTHER, &e.to_string()))?;
        if !self.workers.contains(&s.worker) {
            return Err(reject(
                codes::UNAUTHORIZED,
                "worker not authorized on this connection",
            ));
        }
        let (job, job_diff) = self
            .jobs
            .get(&s.job_id)
            .cloned()
            .ok_or_else(|| reject(codes::JOB_NOT_FOUND, "job not found (stale)"))?;
        let (hash, version) = validate_share(
            &job.job,
            &self.extranonce1,
            self.shared.cfg.extranonce2_size,
            self.version_mask,
            job_diff,
            &s,
        )?;
        let key = (
            self.extranonce1.clone(),
            s.job_id.clone(),
            s.extranonce2.clone(),
            s.ntime,
            s.nonce,
            version,
        );
        let recorded = self
            .shared
            .submitted
            .lock()
            .expect("submitted lock")
            .insert(job.job.prevhash, &key);
        match recorded {
            Ok(()) => {}
            Err(NotRecorded::Duplicate) => return Err(reject(codes::DUPLICATE, "duplicate share")),
            Err(NotRecorded::Full) => {
                return Err(reject(
                    codes::OTHER,
                    "too many shares for this block: raise the difficulty",
                ))
            }
        }
        if meets_target(&hash, &U256::from_compact(job.job.nbits)) {
            self.shared.stats.blocks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %self.peer, "pool: a share meets the network target (a block; this local pool cannot broadcast it)");
        }
        Ok(difficulty_of_hash(&hash))
    }

    /// Moves the difficulty towards one share every `target_share_secs`.
    fn vardiff(&mut self) {
        let cfg = &self.shared.cfg;
        let elapsed = self.vardiff_since.elapsed().as_secs_f64();
        if !cfg.vardiff || !self.authorized() || elapsed < cfg.target_share_secs * 3.0 {
            return;
        }
        let rate_ratio =
            (self.vardiff_shares as f64 * cfg.target_share_secs / elapsed).clamp(0.25, 4.0);
        self.vardiff_since = Instant::now();
        self.vardiff_shares = 0;
        if !(0.67..=1.5).contains(&rate_ratio) {
            self.set_difficulty(self.difficulty * rate_ratio);
        }
    }
}

/// Rebuilds a submitted share's header and checks it against the job and the difficulty it
/// was sent under; returns the hash and the rolled version. Pure: the tests and the session
/// use the same check.
pub(super) fn validate_share(
    job: &Job,
    extranonce1: &[u8],
    extranonce2_size: usize,
    version_mask: u32,
    difficulty: f64,
    s: &Submit,
) -> Result<([u8; 32], u32), RpcError> {
    if s.extranonce2.len() != extranonce2_size {
        return Err(reject(codes::OTHER, "invalid extranonce2 size"));
    }
    if s.ntime < job.ntime || s.ntime > job.ntime + MAX_NTIME_ROLL_SECS {
        return Err(reject(codes::OTHER, "ntime out of range"));
    }
    let version = match s.version_bits {
        Some(bits) if bits & !version_mask != 0 => {
            return Err(reject(codes::OTHER, "invalid version bits"))
        }
        Some(bits) => roll_version(job.version, version_mask, bits),
        None => job.version,
    };
    let root = job.merkle_root(extranonce1, &s.extranonce2);
    let hash = sha256d(&job.header(&root, s.ntime, version, s.nonce));
    if !meets_target(&hash, &target_for_difficulty(difficulty)) {
        return Err(reject(codes::LOW_DIFFICULTY, "low difficulty share"));
    }
    Ok((hash, version))
}

pub(super) async fn run_session(
    stream: TcpStream,
    peer: SocketAddr,
    _slot: ConnectionSlot,
    shared: Arc<Shared>,
    mut jobs: watch::Receiver<Option<Arc<PoolJob>>>,
    mut commands: broadcast::Receiver<PoolCommand>,
) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let en1 = shared.next_extranonce1.fetch_add(1, Ordering::Relaxed) as u32;
    let mut s = Session {
        session_id: format!("{:016x}", rand::random::<u64>()),
        extranonce1: en1.to_be_bytes().to_vec(),
        difficulty: shared.cfg.difficulty,
        shared: shared.clone(),
        peer,
        subscribed: false,
        workers: HashSet::new(),
        rejection_log: RateLimitedLog::default(),
        version_mask: 0,
        jobs: HashMap::new(),
        last_job: None,
        vardiff_since: Instant::now(),
        vardiff_shares: 0,
        out: Vec::new(),
    };
    let (read, mut write) = stream.into_split();
    // Framed with a maximum length: an endless line is refused as it arrives, not buffered.
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
    let mut bad_lines = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let opened = Instant::now();
    loop {
        let was_authorized = s.authorized();
        tokio::select! {
            line = lines.next() => match line {
                Some(Ok(line)) => match parse_line(&line) {
                    Ok(Message::Call { id, method, params }) => s.handle_call(id, &method, &params),
                    Ok(Message::Response { .. }) => {} // answers to client.get_version
                    Err(e) => {
                        bad_lines += 1;
                        tracing::debug!(%peer, error = %e, "pool: unreadable line");
                        if bad_lines >= MAX_BAD_LINES {
                            break;
                        }
                    }
                },
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    tracing::info!(%peer, limit = MAX_LINE_BYTES, "pool: a line over the size limit; disconnecting");
                    break;
                }
                _ => break, // closed or failed
            },
            changed = jobs.changed() => {
                if changed.is_err() {
                    break;
                }
                let job = jobs.borrow_and_update().clone();
                if let (true, Some(job)) = (s.authorized(), job) {
                    s.notify_job(&job, None);
                }
            }
            cmd = commands.recv() => match cmd {
                Ok(PoolCommand::SetDifficulty(d)) => s.set_difficulty(d),
                Ok(PoolCommand::NewExtranonce) => {
                    let en1 = shared.next_extranonce1.fetch_add(1, Ordering::Relaxed) as u32;
                    s.extranonce1 = en1.to_be_bytes().to_vec();
                    // A resumed session gets the extranonce1 in use now, not the first one:
                    // the old one's work was mined already.
                    shared
                        .sessions
                        .lock()
                        .expect("sessions lock")
                        .insert(s.session_id.clone(), s.extranonce1.clone());
                    s.out.push(encode_call(None, "mining.set_extranonce", json!([hex::encode(&s.extranonce1), shared.cfg.extranonce2_size])));
                    // Work under the old extranonce1 is void: a clean job follows, under an id
                    // of its own. A share found under the old extranonce1 and already on its way
                    // names the old id, which the clean notify voided: it is stale. Under the
                    // same id it would be rebuilt with the new extranonce1 and fail as "low
                    // difficulty", blaming the miner for the pool's change.
                    if let Some(job) = s.last_job.clone() {
                        let mut notify = job.notify.clone();
                        notify.job_id = format!("{}{}", notify.job_id, hex::encode(&s.extranonce1));
                        let mut template = job.job.clone();
                        template.job_id = notify.job_id.clone();
                        let renamed = Arc::new(PoolJob { notify, job: template });
                        s.notify_job(&renamed, Some(true));
                    }
                }
                Ok(PoolCommand::Reconnect { wait_secs }) => {
                    s.out.push(encode_call(None, "client.reconnect", json!([shared_addr_host(&write), shared_addr_port(&write), wait_secs])));
                }
                Ok(PoolCommand::SendGarbage) => s.out.push("this is not json {{{\n".into()),
                Ok(PoolCommand::DropConnections) => break,
                Ok(PoolCommand::NewBlock) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                if !s.subscribed && opened.elapsed() > shared.cfg.subscribe_timeout {
                    tracing::info!(%peer, "pool: no mining.subscribe in time; disconnecting");
                    break;
                }
                s.vardiff();
            }
        }
        if s.authorized() && !was_authorized {
            if let Some(job) = jobs.borrow().clone() {
                s.notify_job(&job, Some(true));
            }
        }
        let mut failed = false;
        for line in s.out.drain(..) {
            if write.write_all(line.as_bytes()).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
    }
    shared
        .live_sessions
        .lock()
        .expect("live sessions lock")
        .remove(&s.session_id);
    shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
}

fn shared_addr_host(w: &tokio::net::tcp::OwnedWriteHalf) -> String {
    w.local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

fn shared_addr_port(w: &tokio::net::tcp::OwnedWriteHalf) -> u16 {
    w.local_addr().map(|a| a.port()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mining::cpu::scan_unit;
    use crate::mining::WorkSource;
    use crate::stratum::pool::{make_job, PoolConfig};
    use crate::stratum::protocol::submit_params;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Shares the CPU miner finds on random pool jobs (random height, transactions,
        /// extranonces, rolled version bits) pass the pool's own validation at exactly the
        /// difficulty the miner computed, and the same share with another nonce does not.
        #[test]
        fn cpu_found_shares_pass_the_pools_validation(
            height in 1u32..5_000_000,
            txs in 0usize..12,
            en1 in proptest::array::uniform4(any::<u8>()),
            roll in 0u32..64,
            start in 0u64..(1u64 << 31),
        ) {
            let cfg = PoolConfig::default();
            let prev: [u8; 32] = rand::random();
            let txids: Vec<[u8; 32]> = (0..txs).map(|_| rand::random()).collect();
            let job = make_job(&cfg, height, &prev, &txids, 0, true).job;
            let difficulty = 1e-5; // about one share per 43,000 nonces
            let mask = cfg.version_mask;
            let mut source = WorkSource::new(job.clone(), en1.to_vec(), cfg.extranonce2_size, target_for_difficulty(difficulty), mask);
            for _ in 0..roll {
                source.next_work(0);
            }
            // A unit of rolled versions, as the CPU miner takes them: shares of every one.
            let work = source.next_work_versions(0, crate::mining::SHARED_SCHEDULE_VERSIONS);
            let found = scan_unit(&work, start, start + 400_000, crate::mining::ScanPath::on_this_cpu()[0], &|_| false);
            let shares: Vec<_> = found.candidates.iter().filter_map(|&(v, n)| Some((v, work.check_header(v, n)?))).collect();
            prop_assert!(!shares.is_empty(), "400,000 nonces at difficulty 1e-5 hold shares");
            prop_assert!(shares.iter().any(|(v, _)| *v > 0), "shares of rolled siblings");
            for (which, share) in shares {
                let submit = Submit::from_params(submit_params("w", &share).as_array().unwrap()).unwrap();
                let (hash, _) = validate_share(&job, &en1, cfg.extranonce2_size, mask, difficulty, &submit)
                    .map_err(|e| TestCaseError::fail(format!("pool rejected a CPU share: {}", e.message)))?;
                prop_assert_eq!(hash, share.hash);
                prop_assert!((difficulty_of_hash(&hash) - share.difficulty).abs() < 1e-12);
                let mut wrong = submit.clone();
                wrong.nonce = wrong.nonce.wrapping_add(1);
                if work.check_header(which, wrong.nonce).is_none() {
                    prop_assert_eq!(validate_share(&job, &en1, cfg.extranonce2_size, mask, difficulty, &wrong).unwrap_err().code, codes::LOW_DIFFICULTY);
                }
            }
        }
    }
}
