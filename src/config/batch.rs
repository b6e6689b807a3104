//! The Files and Batches API's settings: where batches are kept and how large they may be.

use std::path::{Path, PathBuf};

use clap::Args;

/// Batches: OpenAI's Files and Batches API, run as deferred work in the interactive gaps.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Directory for uploaded files, batch results and (without a usage database) the
    /// batch database; created at the first upload. `none`: no Files or Batches API.
    #[arg(long, env = "IDLERIG_DATA_DIR", default_value = "idlerig-data")]
    pub data_dir: String,
    /// Largest file `POST /v1/files` accepts, in MiB.
    #[arg(long, env = "IDLERIG_BATCH_MAX_FILE_MB", default_value_t = 200)]
    pub batch_max_file_mb: u64,
    /// Most requests in one batch file.
    #[arg(long, env = "IDLERIG_BATCH_MAX_REQUESTS", default_value_t = 50_000)]
    pub batch_max_requests: usize,
    /// Batch lines in flight at once (default: --max-running, so one engine step can take
    /// them all).
    #[arg(long, env = "IDLERIG_BATCH_CONCURRENCY")]
    pub batch_concurrency: Option<usize>,
    /// Most unfinished batches one API key may have at once (without keys: all callers
    /// together); past it `POST /v1/batches` answers 429 `batch_limit_exceeded`.
    #[arg(long, env = "IDLERIG_BATCH_MAX_ACTIVE_PER_KEY", default_value_t = 8)]
    pub batch_max_active_per_key: usize,
    /// Most unfinished batches on the server at once (429 `batch_limit_exceeded` past it).
    #[arg(long, env = "IDLERIG_BATCH_MAX_ACTIVE", default_value_t = 64)]
    pub batch_max_active: usize,
    /// Days a stored response (`/v1/responses` with `store`, the default) is kept; after it,
    /// `previous_response_id` cannot continue it (OpenAI keeps them 30 days).
    #[arg(long, env = "IDLERIG_RESPONSES_RETENTION_DAYS", default_value_t = 30.0, value_parser = parse_days)]
    pub responses_retention_days: f64,
}

fn parse_days(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(d) if d.is_finite() && d > 0.0 && d <= 36_500.0 => Ok(d),
        _ => Err(format!("`{s}` is not a number of days in (0, 36500]")),
    }
}

impl BatchArgs {
    /// The data directory, or `None` with `none`.
    pub fn dir(&self) -> Option<PathBuf> {
        (self.data_dir != "none").then(|| PathBuf::from(&self.data_dir))
    }

    /// The batch database: the usage database when there is one (one file to back up),
    /// else `batches.db` in the data directory.
    pub fn db_path(&self, dir: &Path, usage_db: Option<&Path>) -> PathBuf {
        usage_db.map_or_else(|| dir.join("batches.db"), Path::to_path_buf)
    }
}
