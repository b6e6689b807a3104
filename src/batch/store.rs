//! Files and batches on disk: their records in SQLite, the files' bytes in the data
//! directory's `files/` (see `files.rs`). Every file is written to `tmp/` first and renamed
//! into place, and a batch's results are one row per line (written once: a line can never be
//! counted twice), so a crash at any moment leaves a state the next start resumes from. Only
//! the store's own thread touches it (see [`super::Batches`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::jsonl::{InputCursor, LineSet};
use super::objects::{BatchErrors, BatchObject, BatchStatus, BatchUsage, RequestCounts};
use super::stored_responses::RESPONSES_SCHEMA;
use super::{now_unix, random_id, BatchError, Viewer};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batch_files (
    id TEXT PRIMARY KEY, owner TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, requests INTEGER NOT NULL,
    urls TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL,
    total INTEGER NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, errors TEXT,
    finalize_tries INTEGER NOT NULL DEFAULT 0, finalize_error TEXT);
CREATE TABLE IF NOT EXISTS batch_results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL,
    status_code INTEGER NOT NULL, request_id TEXT NOT NULL, body TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, PRIMARY KEY (batch_id, line));
";

/// A finished line, as the runner hands it over.
#[derive(Debug, Clone)]
pub struct LineResult {
    pub line: usize,
    pub custom_id: String,
    pub status_code: u16,
    pub request_id: String,
    pub body: Value,
}

/// Columns added since the first release, for databases made before them.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    // Finalize attempts, counted before each one, so that a crash while finalizing (out of
    // memory, say) is counted too; and the last attempt's error.
    ("finalize_tries", "INTEGER NOT NULL DEFAULT 0"),
    ("finalize_error", "TEXT"),
];

/// The statuses of a batch that has not finished.
pub(super) const ACTIVE: &str = "('validating', 'in_progress', 'finalizing', 'cancelling')";

/// How much the store keeps and reads at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest input line read back (the upload's check refused longer ones).
    pub max_line_bytes: usize,
    /// Largest result body kept for one line; a larger one is kept as an error instead.
    pub max_result_bytes: usize,
    /// Unfinished batches one owner (or, without keys, everyone) may have.
    pub max_active_per_key: usize,
    /// Unfinished batches on the server.
    pub max_active: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line_bytes: 4 << 20,
            max_result_bytes: super::MAX_RESULT_BYTES,
            max_active_per_key: usize::MAX,
            max_active: usize::MAX,
        }
    }
}

pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    /// Opened at start when the database or the directory exists, else at the first upload:
    /// a server nobody sends files to writes nothing.
    conn: Option<Connection>,
    /// Closed at shutdown: nothing opens it again.
    closed: bool,
    pub limits: Limits,
}

pub(super) fn db_err(e: rusqlite::Error) -> BatchError {
    BatchError::Db(e.to_string())
}

pub(super) fn io_err(what: &str, e: std::io::Error) -> BatchError {
    BatchError::Io(format!("{what}: {e}"))
}

impl Store {
    /// Opens the store in `dir` (the database at `db_path`). A database that is corrupt or
    /// not one is an error at once, never a surprise at the first upload.
    pub fn open(dir: &Path, db_path: &Path) -> Result<Self, BatchError> {
        let mut store = Self {
            dir: dir.to_path_buf(),
            db_path: db_path.to_path_buf(),
            conn: None,
            closed: false,
            limits: Limits::default(),
        };
        if db_path.exists() || dir.join("files").exists() {
            store.conn()?;
        }
        Ok(store)
    }

    pub(super) fn conn(&mut self) -> Result<&mut Connection, BatchError> {
        if self.closed {
            return Err(BatchError::Stopped);
        }
        if self.conn.is_none() {
            for sub in ["files", "tmp"] {
                std::fs::create_dir_all(self.dir.join(sub))
                    .map_err(|e| io_err(&format!("creating {}", self.dir.display()), e))?;
            }
            let conn = crate::sqlite::open(&self.db_path, &format!("{SCHEMA}{RESPONSES_SCHEMA}"))
                .map_err(|why| BatchError::Open {
                path: self.db_path.display().to_string(),
                why,
            })?;
            add_columns(&conn)?;
            self.conn = Some(conn);
            self.tidy()?;
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Closes the database (at shutdown, once the runner was told to stop), so that the file
    /// is whole and released when the server says it stopped. Anything the runner still sends
    /// after it is refused (a line in flight then runs again at the next start).
    pub fn close(&mut self) {
        self.conn = None;
        self.closed = true;
    }

    /// Removes what a crash can leave behind: partial uploads, and files renamed into place
    /// whose record was never committed.
    fn tidy(&mut self) -> Result<(), BatchError> {
        let known: HashSet<String> = {
            let conn = self.conn.as_ref().expect("open");
            let mut stmt = conn.prepare("SELECT id FROM batch_files").map_err(db_err)?;
            let ids = stmt.query_map([], |r| r.get(0)).map_err(db_err)?;
            ids.collect::<Result<_, _>>().map_err(db_err)?
        };
        let _ = clear_dir(&self.dir.join("tmp"), |_| true);
        let _ = clear_dir(&self.dir.join("files"), |name| {
            name.strip_suffix(".jsonl")
                .is_none_or(|id| !known.contains(id))
        });
        Ok(())
    }

    /// Where uploads are written before they are accepted.
    pub fn tmp_path(&mut self) -> Result<PathBuf, BatchError> {
        self.conn()?;
        Ok(self
            .dir
            .join("tmp")
            .join(format!("{}.part", random_id("up"))))
    }

    pub(super) fn file_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.jsonl"))
    }

    /// The database when it is open (a store nobody wrote to has none, and nothing in it).
    pub(super) fn open_conn(&self) -> Option<&Connection> {
        self.conn.as_ref()
    }

    /// Creates a batch over an uploaded file whose every line calls `endpoint`.
    pub fn create_batch(
        &mut self,
        viewer: &Viewer,
        owner: Option<&str>,
        input_file_id: &str,
        endpoint: &str,
        metadata: Option<&Value>,
        window_s: u64,
    ) -> Result<BatchObject, BatchError> {
        let file = self.file_row(input_file_id, viewer).map_err(|_| {
            BatchError::invalid(
                "input_file_id",
                format!("no file `{input_file_id}` (upload one with purpose `batch`)"),
            )
        })?;
        if file.object.purpose != "batch" {
            return Err(BatchError::invalid(
                "input_file_id",
                format!(
                    "file `{input_file_id}` has purpose `{}`; a batch's input needs purpose `batch`",
                    file.object.purpose
                ),
            ));
        }
        if let Some(other) = file.urls.iter().find(|u| *u != endpoint) {
            return Err(BatchError::invalid(
                "endpoint",
                format!("the batch's endpoint is `{endpoint}`, but lines of `{input_file_id}` call `{other}`; every line must call the batch's endpoint"),
            ));
        }
        self.check_active_limits(owner)?;
        let id = random_id("batch");
        let created = now_unix();
        let metadata = metadata.map(Value::to_string);
        self.conn()?
            .execute(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window,
                   metadata, status, total, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, '24h', ?5, 'validating', ?6, ?7, ?8)",
                params![
                    id,
                    owner,
                    endpoint,
                    input_file_id,
                    metadata,
                    file.requests,
                    created,
                    created + window_s
                ],
            )
            .map_err(db_err)?;
        self.batch(&id, &Viewer::All)
    }

    /// Refuses a new batch past `--batch-max-active-per-key` or `--batch-max-active`: each
    /// unfinished batch keeps an input file open and a place in the runner's rounds.
    fn check_active_limits(&mut self, owner: Option<&str>) -> Result<(), BatchError> {
        let (per_key, max) = (self.limits.max_active_per_key, self.limits.max_active);
        let (all, mine): (usize, usize) = self
            .conn()?
            .query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(owner IS ?1), 0) FROM batches
                     WHERE status IN {ACTIVE}"
                ),
                [owner],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db_err)?;
        if mine >= per_key {
            let whose = match owner {
                Some(name) => format!("the API key `{name}` has"),
                None => "this server's callers have".into(),
            };
            return Err(BatchError::Limit(format!(
                "{whose} {mine} unfinished batches, the most allowed at once \
                 (--batch-max-active-per-key {per_key}); wait for one to finish or cancel one"
            )));
        }
        if all >= max {
            return Err(BatchError::Limit(format!(
                "this server has {all} unfinished batches, the most it takes at once \
                 (--batch-max-active {max}); retry when one has finished"
            )));
        }
        Ok(())
    }

    pub fn batch(&mut self, id: &str, viewer: &Viewer) -> Result<BatchObject, BatchError> {
        let not_found = || BatchError::NotFound(format!("no batch `{id}`"));
        let conn = self.conn.as_ref().ok_or_else(not_found)?;
        let (owner, mut batch) = conn
            .query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"),
                [id],
                batch_of_row,
            )
            .optional()
            .map_err(db_err)?
            .ok_or_else(not_found)?;
        if !viewer.sees(owner.as_deref()) {
            return Err(not_found());
        }
        self.fill_counts(&mut batch)?;
        Ok(batch)
    }

    /// Counts and token usage from the results so far.
    fn fill_counts(&self, batch: &mut BatchObject) -> Result<(), BatchError> {
        let conn = self.conn.as_ref().expect("a batch implies a database");
        let (completed, failed, prompt, completion, cached): (u64, u64, u64, u64, u64) = conn
            .query_row(
                "SELECT COALESCE(SUM(status_code = 200), 0), COALESCE(SUM(status_code != 200), 0),
                   COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),
                   COALESCE(SUM(cached_tokens), 0)
                 FROM batch_results WHERE batch_id = ?1",
                [&batch.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .map_err(db_err)?;
        batch.request_counts.completed = completed;
        batch.request_counts.failed = failed;
        batch.usage = BatchUsage::new(prompt, completion, cached);
        Ok(())
    }

    pub fn batches(
        &mut self,
        viewer: &Viewer,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<BatchObject>, BatchError> {
        let ids = self.batch_ids(
            "(?1 IS NULL OR rowid < (SELECT rowid FROM batches WHERE id = ?1)) ORDER BY rowid DESC",
            [after],
        )?;
        let mut out = Vec::new();
        for id in ids {
            if let Ok(b) = self.batch(&id, viewer) {
                out.push(b);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn batch_ids(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<String>, BatchError> {
        let Some(conn) = self.conn.as_ref() else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare(&format!("SELECT id FROM batches WHERE {filter}"))
            .map_err(db_err)?;
        let ids = stmt.query_map(args, |r| r.get(0)).map_err(db_err)?;
        ids.collect::<Result<_, _>>().map_err(db_err)
    }

    /// Batches not yet in a final state, oldest first: the runner's work after a restart too.
    pub fn active_batches(&mut self) -> Result<Vec<BatchObject>, BatchError> {
        let ids = self.batch_ids(&format!("status IN {ACTIVE} ORDER BY rowid"), [])?;
        ids.iter().map(|id| self.batch(id, &Viewer::All)).collect()
    }

    /// Moves a batch from one of the statuses `from` to `status`, stamping its time (`errors`
    /// when it failed); whether it moved. The runner acts on what it read a moment ago, so
    /// every move names where it starts: a batch cancelled meanwhile is never put back in
    /// progress.
    pub fn set_status(
        &mut self,
        id: &str,
        from: &[BatchStatus],
        status: BatchStatus,
        errors: Option<&BatchErrors>,
    ) -> Result<bool, BatchError> {
        move_status(self.conn()?, id, from, status, errors).map_err(db_err)
    }

    /// The API key's name that created the batch.
    pub fn batch_owner(&mut self, id: &str) -> Result<Option<String>, BatchError> {
        self.conn()?
            .query_row("SELECT owner FROM batches WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .map_err(db_err)
    }

    /// Asks a batch to stop: no line starts any more, and those in flight are stopped.
    pub fn cancel(&mut self, id: &str, viewer: &Viewer) -> Result<BatchObject, BatchError> {
        let batch = self.batch(id, viewer)?;
        match batch.status {
            BatchStatus::Validating | BatchStatus::InProgress => {
                let from = [BatchStatus::Validating, BatchStatus::InProgress];
                self.set_status(id, &from, BatchStatus::Cancelling, None)?;
                self.batch(id, viewer)
            }
            BatchStatus::Cancelling | BatchStatus::Cancelled => Ok(batch),
            s => Err(BatchError::Conflict(format!(
                "batch `{id}` is {} and cannot be cancelled",
                s.as_str()
            ))),
        }
    }

    /// A cursor over the input file's requests that have no result yet, in order.
    pub fn open_input(&mut self, batch: &BatchObject) -> Result<InputCursor, BatchError> {
        let done = self.done_lines(batch)?;
        self.input_cursor(batch, done)
    }

    /// A cursor over the input file's requests not in `skip`.
    pub(super) fn input_cursor(
        &mut self,
        batch: &BatchObject,
        skip: LineSet,
    ) -> Result<InputCursor, BatchError> {
        let path = self.file_path(&batch.input_file_id);
        InputCursor::open(&path, skip, self.limits.max_line_bytes)
            .map_err(|e| io_err(&format!("reading file `{}`", batch.input_file_id), e))
    }

    /// Lines of `batch` with a result.
    pub fn done_lines(&mut self, batch: &BatchObject) -> Result<LineSet, BatchError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT line FROM batch_results WHERE batch_id = ?1 AND line < ?2")
            .map_err(db_err)?;
        let lines = stmt
            .query_map(params![batch.id, batch.request_counts.total], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db_err)?;
        let mut done = LineSet::default();
        for l in lines {
            done.insert(usize::try_from(l.map_err(db_err)?).unwrap_or(0));
        }
        Ok(done)
    }

    /// Keeps a line's result; a second result for the same line is ignored, and so is one
    /// for a batch already finalizing or finished (a line stopped by a cancel that got its
    /// answer at the last moment: the result files are written already).
    /// A body over `max_result_bytes` is refused (the runner keeps an error in its place).
    pub fn record(&mut self, batch_id: &str, r: &LineResult) -> Result<(), BatchError> {
        let usage = &r.body["usage"];
        let count = |v: &Value| v.as_u64().unwrap_or(0);
        let body = r.body.to_string();
        let max = self.limits.max_result_bytes;
        if body.len() > max {
            return Err(BatchError::TooLarge(format!(
                "the result is {} bytes; a batch keeps at most {max} per line",
                body.len()
            )));
        }
        self.conn()?
            .execute(
                "INSERT OR IGNORE INTO batch_results
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 WHERE EXISTS (
                   SELECT 1 FROM batches WHERE id = ?1
                   AND status IN ('validating', 'in_progress', 'cancelling'))",
                params![
                    batch_id,
                    r.line as i64,
                    r.custom_id,
                    r.status_code,
                    r.request_id,
                    body,
                    count(&usage["prompt_tokens"]),
                    count(&usage["completion_tokens"]),
                    count(&usage["prompt_tokens_details"]["cached_tokens"]),
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }
}

/// [`Store::set_status`] on a connection (or a transaction).
pub(super) fn move_status(
    conn: &Connection,
    id: &str,
    from: &[BatchStatus],
    status: BatchStatus,
    errors: Option<&BatchErrors>,
) -> rusqlite::Result<bool> {
    let column = status.time_column();
    let errors = errors.map(|e| serde_json::to_string(e).unwrap_or_default());
    let from = from
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let moved = conn.execute(
        &format!(
            "UPDATE batches SET status = ?2, {column} = COALESCE({column}, ?3),
               errors = COALESCE(?4, errors) WHERE id = ?1 AND status IN ({from})"
        ),
        params![id, status.as_str(), now_unix(), errors],
    )?;
    Ok(moved == 1)
}

/// Adds the [`ADDED_COLUMNS`] a database made by an older version lacks.
fn add_columns(conn: &Connection) -> Result<(), BatchError> {
    let have: HashSet<String> = {
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info('batches')")
            .map_err(db_err)?;
        let names = stmt.query_map([], |r| r.get(0)).map_err(db_err)?;
        names.collect::<Result<_, _>>().map_err(db_err)?
    };
    for (name, decl) in ADDED_COLUMNS {
        if !have.contains(*name) {
            conn.execute_batch(&format!("ALTER TABLE batches ADD COLUMN {name} {decl}"))
                .map_err(db_err)?;
        }
    }
    Ok(())
}

const BATCH_COLUMNS: &str = "id, owner, endpoint, input_file_id, completion_window, metadata, \
    status, total, created_at, expires_at, in_progress_at, finalizing_at, completed_at, \
    failed_at, expired_at, cancelling_at, cancelled_at, output_file_id, error_file_id, errors";

fn batch_of_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Option<String>, BatchObject)> {
    let json = |i: usize| -> rusqlite::Result<Option<Value>> {
        Ok(r.get::<_, Option<String>>(i)?
            .and_then(|s| serde_json::from_str(&s).ok()))
    };
    let errors = json(19)?.and_then(|v| serde_json::from_value::<BatchErrors>(v).ok());
    Ok((
        r.get(1)?,
        BatchObject {
            id: r.get(0)?,
            object: "batch",
            endpoint: r.get(2)?,
            errors,
            input_file_id: r.get(3)?,
            completion_window: r.get(4)?,
            status: BatchStatus::parse(&r.get::<_, String>(6)?),
            output_file_id: r.get(17)?,
            error_file_id: r.get(18)?,
            created_at: r.get(8)?,
            in_progress_at: r.get(10)?,
            expires_at: r.get(9)?,
            finalizing_at: r.get(11)?,
            completed_at: r.get(12)?,
            failed_at: r.get(13)?,
            expired_at: r.get(14)?,
            cancelling_at: r.get(15)?,
            cancelled_at: r.get(16)?,
            request_counts: RequestCounts {
                total: r.get(7)?,
                completed: 0,
                failed: 0,
            },
            metadata: json(5)?,
            usage: BatchUsage::default(),
        },
    ))
}

fn clear_dir(dir: &Path, remove: impl Fn(&str) -> bool) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if remove(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
