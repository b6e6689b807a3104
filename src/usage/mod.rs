//! Usage per API key: requests and prompt/completion tokens by key name and UTC day, kept in
//! an embedded SQLite database (`--usage-db`) so that they survive restarts, counted for
//! Prometheus by key name (never the key), and checked against each key's daily token quota.
//!
//! One thread owns the database connection and writes every record in order; the [`Usage`]
//! handle adds a record to today's in-memory totals at once (so a quota holds from the next
//! request on) and sends it to that thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::oneshot;

#[derive(Debug, Error)]
pub enum UsageError {
    #[error("usage database {path}: {why}")]
    Open { path: String, why: String },
    #[error("usage database: {0}")]
    Query(String),
    #[error("the usage database's writer has stopped")]
    Stopped,
}

/// The Prometheus counters by key name.
#[derive(Clone, Default)]
pub struct KeyCounters {
    pub requests: Family<KeyLabel, Counter>,
    pub prompt_tokens: Family<KeyLabel, Counter>,
    pub completion_tokens: Family<KeyLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KeyLabel {
    pub key: String,
}

/// One key's totals for one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DayUsage {
    /// The key's name.
    pub key: String,
    /// UTC day, `YYYY-MM-DD`.
    pub date: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

enum Message {
    Record {
        day: String,
        key: String,
        prompt: u64,
        completion: u64,
    },
    Query {
        from: String,
        to: String,
        reply: oneshot::Sender<Result<Vec<DayUsage>, UsageError>>,
    },
    /// Store everything sent before, close the database, and stop.
    Close { reply: oneshot::Sender<()> },
}

/// Today's figures in memory: what each key has used, and what requests still running have
/// reserved of its quota.
#[derive(Debug, Default)]
struct Today {
    day: String,
    used: HashMap<String, DayUsage>,
    reserved: HashMap<String, u64>,
}

impl Today {
    /// Starts a new day's figures when `day` is not the one held. Reservations carry over:
    /// a request that started yesterday is charged to the day it ends, so what it holds
    /// counts against the new day until it does.
    fn roll(&mut self, day: &str) {
        if self.day != day {
            self.day = day.to_string();
            self.used.clear();
        }
    }

    fn used(&self, key: &str) -> u64 {
        self.used
            .get(key)
            .map_or(0, |r| r.prompt_tokens + r.completion_tokens)
    }
}

/// The handle: today's totals, the counters, and the way to the database's thread.
#[derive(Clone)]
pub struct Usage {
    today: Arc<Mutex<Today>>,
    counters: KeyCounters,
    writer: Option<std::sync::mpsc::Sender<Message>>,
}

/// A request's claim on its key's daily quota, taken at admission: its prompt and the
/// completion tokens it may generate at most. Released when dropped, after the request's
/// real usage has been recorded, whatever ended it (finished, cancelled, failed, client gone).
#[derive(Debug)]
pub struct QuotaHold {
    today: Arc<Mutex<Today>>,
    key: String,
    tokens: u64,
}

impl Drop for QuotaHold {
    fn drop(&mut self) {
        let mut today = self.today.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = today.reserved.get_mut(&self.key) {
            *r = r.saturating_sub(self.tokens);
            if *r == 0 {
                today.reserved.remove(&self.key);
            }
        }
    }
}

/// What a key still had when a request did not fit: used today, held by requests running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaShort {
    pub used: u64,
    pub reserved: u64,
}

/// How much of a quota a request asks for: its prompt, and up to `completion` tokens for each
/// of its `choices` (none for embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaAsk {
    pub prompt: u64,
    pub choices: u64,
    pub completion: u64,
}

impl Usage {
    /// Opens (or creates) the database at `path`, in WAL mode; `None` keeps usage in memory
    /// only (counters and quotas, forgotten at restart). A file that is not a database, is
    /// corrupt or cannot be written is an error that says so.
    pub fn open(path: Option<&Path>, counters: KeyCounters) -> Result<Self, UsageError> {
        let day = utc_day(std::time::SystemTime::now());
        let mut today = HashMap::new();
        let writer = match path {
            None => None,
            Some(path) => {
                let conn = open_db(path)?;
                for row in query(&conn, &day, &day)? {
                    today.insert(row.key.clone(), row);
                }
                let (tx, rx) = std::sync::mpsc::channel();
                let shown = path.display().to_string();
                std::thread::Builder::new()
                    .name("idlerig-usage".into())
                    .spawn(move || write_loop(conn, rx, shown))
                    .map_err(|e| UsageError::Query(format!("cannot start its thread: {e}")))?;
                Some(tx)
            }
        };
        Ok(Self {
            today: Arc::new(Mutex::new(Today {
                day,
                used: today,
                reserved: HashMap::new(),
            })),
            counters,
            writer,
        })
    }

    /// Counts one finished request of key `key`.
    pub fn record(&self, key: &str, prompt: u64, completion: u64) {
        let label = KeyLabel { key: key.into() };
        self.counters.requests.get_or_create(&label).inc();
        self.counters
            .prompt_tokens
            .get_or_create(&label)
            .inc_by(prompt);
        self.counters
            .completion_tokens
            .get_or_create(&label)
            .inc_by(completion);
        let day = utc_day(std::time::SystemTime::now());
        {
            let mut today = self.today.lock().unwrap_or_else(|p| p.into_inner());
            today.roll(&day);
            let row = today
                .used
                .entry(key.to_string())
                .or_insert_with(|| DayUsage {
                    key: key.into(),
                    date: day.clone(),
                    ..DayUsage::default()
                });
            row.requests += 1;
            row.prompt_tokens += prompt;
            row.completion_tokens += completion;
        }
        if let Some(w) = &self.writer {
            let msg = Message::Record {
                day,
                key: key.into(),
                prompt,
                completion,
            };
            if w.send(msg).is_err() {
                tracing::error!(key, "usage not stored: the database's writer has stopped");
            }
        }
    }

    /// Prompt and completion tokens `key` has used today (UTC).
    pub fn tokens_today(&self, key: &str) -> u64 {
        let day = utc_day(std::time::SystemTime::now());
        let today = self.today.lock().unwrap_or_else(|p| p.into_inner());
        if today.day != day {
            return 0;
        }
        today.used(key)
    }

    /// Reserves `ask` against `key`'s daily `quota`, what is used and what other requests
    /// hold, in one step under the lock, so that requests at once cannot all see the same
    /// room. A request needs its prompt and one token for each choice; past that it gets the
    /// completion tokens it asked for, or as many as are left, shared among its choices: the
    /// returned count is each choice's new `max_tokens` (0 for embeddings).
    pub fn reserve(
        &self,
        key: &str,
        quota: u64,
        ask: QuotaAsk,
    ) -> Result<(QuotaHold, u64), QuotaShort> {
        let day = utc_day(std::time::SystemTime::now());
        let mut today = self.today.lock().unwrap_or_else(|p| p.into_inner());
        today.roll(&day);
        let used = today.used(key);
        let reserved = today.reserved.get(key).copied().unwrap_or(0);
        let left = quota.saturating_sub(used.saturating_add(reserved));
        let least = ask.prompt.saturating_add(ask.choices);
        if left < least || left == 0 {
            return Err(QuotaShort { used, reserved });
        }
        let completion = match ask.choices {
            0 => 0,
            n => ask.completion.min((left - ask.prompt) / n),
        };
        let tokens = ask.prompt + completion * ask.choices;
        *today.reserved.entry(key.to_string()).or_insert(0) += tokens;
        let hold = QuotaHold {
            today: self.today.clone(),
            key: key.to_string(),
            tokens,
        };
        Ok((hold, completion))
    }

    /// At shutdown, once no request is running: waits until every record sent so far is
    /// stored, then closes the database. Records sent after it are logged as not stored.
    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            let (reply, done) = oneshot::channel();
            if w.send(Message::Close { reply }).is_ok() {
                let _ = done.await;
            }
        }
    }

    /// Every key's totals for the days `from..=to` (`YYYY-MM-DD`), from the database (or,
    /// without one, today's in memory).
    pub async fn days(&self, from: String, to: String) -> Result<Vec<DayUsage>, UsageError> {
        let Some(w) = &self.writer else {
            let today = self.today.lock().unwrap_or_else(|p| p.into_inner());
            let mut rows: Vec<DayUsage> = if from <= today.day && today.day <= to {
                today.used.values().cloned().collect()
            } else {
                Vec::new()
            };
            rows.sort_by(|a, b| a.key.cmp(&b.key));
            return Ok(rows);
        };
        let (reply, answer) = oneshot::channel();
        w.send(Message::Query { from, to, reply })
            .map_err(|_| UsageError::Stopped)?;
        answer.await.map_err(|_| UsageError::Stopped)?
    }
}

fn open_db(path: &Path) -> Result<rusqlite::Connection, UsageError> {
    crate::sqlite::open(
        path,
        "CREATE TABLE IF NOT EXISTS usage (
            day TEXT NOT NULL,
            key TEXT NOT NULL,
            requests INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            PRIMARY KEY (day, key)
        )",
    )
    .map_err(|why| UsageError::Open {
        path: path.display().to_string(),
        why,
    })
}

fn query(conn: &rusqlite::Connection, from: &str, to: &str) -> Result<Vec<DayUsage>, UsageError> {
    let run = || -> rusqlite::Result<Vec<DayUsage>> {
        let mut stmt = conn.prepare(
            "SELECT key, day, requests, prompt_tokens, completion_tokens FROM usage
             WHERE day >= ?1 AND day <= ?2 ORDER BY day, key",
        )?;
        let rows = stmt.query_map([from, to], |r| {
            Ok(DayUsage {
                key: r.get(0)?,
                date: r.get(1)?,
                requests: r.get::<_, i64>(2)? as u64,
                prompt_tokens: r.get::<_, i64>(3)? as u64,
                completion_tokens: r.get::<_, i64>(4)? as u64,
            })
        })?;
        rows.collect()
    };
    run().map_err(|e| UsageError::Query(e.to_string()))
}

/// The database's thread: each record is added in its own small transaction (a crash loses
/// at most the one being written), in the order they came.
fn write_loop(conn: rusqlite::Connection, rx: std::sync::mpsc::Receiver<Message>, path: String) {
    for msg in rx {
        if let Message::Close { reply } = msg {
            // Closed here, before the answer: the caller may remove or replace the file next.
            drop(conn);
            let _ = reply.send(());
            return;
        }
        match msg {
            Message::Record {
                day,
                key,
                prompt,
                completion,
            } => {
                let r = conn.execute(
                    "INSERT INTO usage VALUES (?1, ?2, 1, ?3, ?4)
                     ON CONFLICT (day, key) DO UPDATE SET
                       requests = requests + 1,
                       prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                       completion_tokens = completion_tokens + excluded.completion_tokens",
                    rusqlite::params![day, key, prompt as i64, completion as i64],
                );
                if let Err(e) = r {
                    tracing::error!(error = %e, db = %path, key, "usage not stored");
                }
            }
            Message::Query { from, to, reply } => {
                let _ = reply.send(query(&conn, &from, &to));
            }
            Message::Close { .. } => unreachable!("handled above"),
        }
    }
}

/// The UTC day of `t`, `YYYY-MM-DD` (the civil-from-days algorithm of H. Hinnant).
pub fn utc_day(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The default database: `idlerig-usage.db` in the working directory.
pub fn default_path() -> PathBuf {
    PathBuf::from("idlerig-usage.db")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_days_are_civil_dates() {
        let at = |s: u64| utc_day(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01");
        assert_eq!(at(951_782_400), "2000-02-29");
        assert_eq!(at(1_798_675_199), "2026-12-30");
        assert_eq!(at(1_798_761_600), "2027-01-01");
    }

    #[test]
    fn reservations_at_once_never_spend_past_the_quota() {
        // 16 requests at once on a 120-token quota, each a 10-token prompt asking for 60:
        // admitted together (as concurrent handlers are), every one reserves before any
        // finishes. What they may spend adds up to at most the quota.
        let u = Usage::open(None, KeyCounters::default()).unwrap();
        let ask = QuotaAsk {
            prompt: 10,
            choices: 1,
            completion: 60,
        };
        let holds: Vec<_> = (0..16)
            .filter_map(|_| u.reserve("k", 120, ask).ok())
            .collect();
        let granted: u64 = holds.iter().map(|(_, c)| ask.prompt + c).sum();
        assert!(granted <= 120, "granted {granted}");
        assert_eq!(holds.len(), 2, "60+10, then the 50 left hold 10 + 40");
        assert_eq!(
            holds[1].1, 40,
            "the second request's max_tokens is cut to what is left"
        );
        // Each spends all it may, then ends: its hold goes, its usage stays.
        for (hold, completion) in holds {
            u.record("k", ask.prompt, completion);
            drop(hold);
        }
        assert_eq!(u.tokens_today("k"), 120);
        let short = u.reserve("k", 120, ask).err().expect("nothing is left");
        assert_eq!(
            short,
            QuotaShort {
                used: 120,
                reserved: 0
            }
        );
    }

    #[test]
    fn a_hold_released_unused_gives_its_tokens_back_and_choices_share_the_room() {
        let u = Usage::open(None, KeyCounters::default()).unwrap();
        let ask = |prompt, choices, completion| QuotaAsk {
            prompt,
            choices,
            completion,
        };
        let (hold, c) = u.reserve("k", 100, ask(20, 4, 50)).unwrap();
        assert_eq!(c, 20, "four choices share the 80 left after the prompt");
        assert!(
            u.reserve("k", 100, ask(1, 1, 1)).is_err(),
            "all of it is held"
        );
        // Cancelled after 3 tokens: only those (and the prompt) are charged.
        u.record("k", 20, 3);
        drop(hold);
        let (_, c) = u.reserve("k", 100, ask(0, 1, 500)).unwrap();
        assert_eq!(c, 77);
        // Embeddings ask no completion: the inputs must fit whole.
        assert!(u.reserve("j", 10, ask(11, 0, 0)).is_err());
        assert_eq!(u.reserve("j", 10, ask(10, 0, 0)).unwrap().1, 0);
        // A prompt that fits but leaves no token to generate is refused.
        assert!(u.reserve("m", 10, ask(10, 1, 5)).is_err());
    }

    #[test]
    fn usage_survives_reopening_and_a_damaged_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("idlerig-usage-{}", std::process::id()));
        let path = dir.join("usage.db");
        let _ = std::fs::remove_dir_all(&dir);
        {
            let u = Usage::open(Some(&path), KeyCounters::default()).unwrap();
            u.record("alice", 10, 5);
            u.record("alice", 1, 2);
            u.record("bob", 7, 0);
            assert_eq!(u.tokens_today("alice"), 18);
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let day = utc_day(std::time::SystemTime::now());
            let rows = rt.block_on(u.days(day.clone(), day)).unwrap();
            assert_eq!(rows.len(), 2);
        }
        let u = Usage::open(Some(&path), KeyCounters::default()).unwrap();
        assert_eq!(u.tokens_today("alice"), 18, "today's totals come back");
        assert_eq!(u.tokens_today("bob"), 7);
        drop(u);
        std::fs::write(
            dir.join("junk.db"),
            b"not a database at all, just some bytes".repeat(200),
        )
        .unwrap();
        let err = Usage::open(Some(&dir.join("junk.db")), KeyCounters::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("junk.db") && err.contains("move it aside"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
