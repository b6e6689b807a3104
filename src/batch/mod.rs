//! Batch work: OpenAI's Files and Batches, and stored Responses. This subsystem owns the
//! uploaded files, the batches and their results, and the stored responses, kept in SQLite and
//! a data directory so that a batch (or a background response) survives a restart and resumes
//! where it stopped, and the runner that feeds batch lines to the endpoints as deferred work
//! (run by the engine only in the gaps between interactive requests, before the miner gets
//! the device).
//!
//! One thread owns the store ([`store::Store`]); the API and the runner hold a [`Batches`]
//! handle and send it closures to run there. The runner calls endpoints through an
//! [`Executor`] the HTTP layer provides, so that a batch line is validated, counted and
//! answered exactly as the same request sent over HTTP.
//!
//! Memory is bounded whatever the files hold: an input line is read and parsed only as it is
//! started (at most `concurrency` at once across all batches), the result files are streamed
//! row by row, one result is at most [`MAX_RESULT_BYTES`], and the unfinished batches are
//! capped per key and in all.

mod files;
pub mod jsonl;
pub mod objects;
pub mod results;
mod runner;
pub mod store;
pub mod stored_responses;
#[cfg(test)]
mod test_alloc;
#[cfg(test)]
mod tests;

pub use objects::{BatchObject, BatchStatus, FileObject};
pub use runner::{Executor, LineCall, LineReply};
pub use stored_responses::StoredResponse;

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{oneshot, watch, Notify};

use store::Store;

#[derive(Debug, Error)]
pub enum BatchError {
    #[error("batch database {path}: {why}")]
    Open { path: String, why: String },
    #[error("batch database: {0}")]
    Db(String),
    #[error("batch files: {0}")]
    Io(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("{0}")]
    Conflict(String),
    /// Too many unfinished batches (per key, or in all).
    #[error("{0}")]
    Limit(String),
    /// A result larger than a batch keeps.
    #[error("{0}")]
    TooLarge(String),
    #[error("the batch store has stopped")]
    Stopped,
}

impl BatchError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        BatchError::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Whose files and batches a caller sees: everyone's without API keys and for admin keys,
/// else only its own key's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    All,
    Owner(String),
}

impl Viewer {
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self {
            Viewer::All => true,
            Viewer::Owner(me) => owner == Some(me.as_str()),
        }
    }
}

/// Where and how much.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The data directory: `files/`, `tmp/`, and the database unless it is the usage one.
    pub dir: PathBuf,
    pub db_path: PathBuf,
    pub max_file_bytes: u64,
    pub max_requests: usize,
    /// Longest line of an input file, in bytes (the API's body limit).
    pub max_line_bytes: usize,
    /// Batch lines in flight at once across all batches.
    pub concurrency: usize,
    /// The completion window (`24h`), in seconds.
    pub window_s: u64,
    /// Unfinished batches one API key may have (without keys: all callers together).
    pub max_active_per_key: usize,
    /// Unfinished batches on the server.
    pub max_active: usize,
    /// Largest result body kept for one line ([`MAX_RESULT_BYTES`]).
    pub max_result_bytes: usize,
    /// How long stored responses are kept, in seconds.
    pub responses_retention_s: u64,
}

/// Largest result body a batch keeps for one line; a larger one is replaced by an error. Room
/// for an embeddings line of 2,048 inputs of 1,024 dimensions written out as JSON numbers.
pub const MAX_RESULT_BYTES: usize = 64 << 20;

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// The handle to the store's thread and the runner. Cheap to clone.
#[derive(Clone)]
pub struct Batches {
    jobs: std::sync::mpsc::Sender<Job>,
    wake: Arc<Notify>,
    pub cfg: Arc<BatchConfig>,
    /// Lines this process has run to a recorded result, by outcome (ok, failed).
    pub lines_done: Arc<[std::sync::atomic::AtomicU64; 2]>,
    /// Input lines parsed and held now (by the lines in flight): never over `concurrency`.
    pub lines_held: Arc<std::sync::atomic::AtomicUsize>,
}

impl Batches {
    /// Opens the store (a corrupt database is an error now) and starts its thread.
    pub fn open(cfg: BatchConfig) -> Result<Self, BatchError> {
        let mut store = Store::open(&cfg.dir, &cfg.db_path)?;
        store.limits = store::Limits {
            max_line_bytes: cfg.max_line_bytes,
            max_result_bytes: cfg.max_result_bytes,
            max_active_per_key: cfg.max_active_per_key,
            max_active: cfg.max_active,
        };
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("idlerig-batches".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut store);
                }
            })
            .map_err(|e| BatchError::Io(format!("cannot start the store's thread: {e}")))?;
        Ok(Self {
            jobs,
            wake: Arc::default(),
            cfg: Arc::new(cfg),
            lines_done: Arc::default(),
            lines_held: Arc::default(),
        })
    }

    /// Runs `f` on the store's thread and returns what it returns.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, BatchError> + Send + 'static,
    ) -> Result<T, BatchError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |s: &mut Store| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| BatchError::Stopped)?;
        rx.await.map_err(|_| BatchError::Stopped)?
    }

    /// Tells the runner that a batch was created or cancelled.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Starts the runner: it resumes every unfinished batch, then runs new ones, until
    /// `stop` turns true (lines in flight then are dropped, and run again at the next start).
    pub fn start_runner(&self, exec: Executor, stop: watch::Receiver<bool>) {
        tokio::spawn(runner::run(self.clone(), exec, stop));
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prefix-` and 24 random hex digits (`batch_` for batches, as OpenAI's ids look).
pub fn random_id(prefix: &str) -> String {
    let sep = if prefix == "batch" { '_' } else { '-' };
    format!("{prefix}{sep}{:024x}", rand::random::<u128>() >> 32)
}
