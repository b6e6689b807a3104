//! Files and batches on disk: their records in SQLite, the files' bytes in the data
//! directory's `files/`. Every file is written to `tmp/` first and renamed into place, and a
//! batch's results are one row per line (written once: a line can never be counted twice), so
//! a crash at any moment leaves a state the next start resumes from. Only the store's own
//! thread touches it (see [`super::StoreHandle`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::jsonl::{read_lines, FileSummary, InputLine};
use super::objects::{
    BatchErrors, BatchObject, BatchStatus, BatchUsage, FileObject, RequestCounts,
};
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
    output_file_id TEXT, error_file_id TEXT, errors TEXT);
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

pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    /// Opened at start when the database or the directory exists, else at the first upload:
    /// a server nobody sends files to writes nothing.
    conn: Option<Connection>,
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
        };
        if db_path.exists() || dir.join("files").exists() {
            store.conn()?;
        }
        Ok(store)
    }

    pub(super) fn conn(&mut self) -> Result<&mut Connection, BatchError> {
        if self.conn.is_none() {
            for sub in ["files", "tmp"] {
                std::fs::create_dir_all(self.dir.join(sub))
                    .map_err(|e| io_err(&format!("creating {}", self.dir.display()), e))?;
            }
            let conn =
                crate::sqlite::open(&self.db_path, SCHEMA).map_err(|why| BatchError::Open {
                    path: self.db_path.display().to_string(),
                    why,
                })?;
            self.conn = Some(conn);
            self.tidy()?;
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Closes the database (at shutdown, once the runner has stopped), so that the file is
    /// whole and released when the server says it stopped. A later call opens it again.
    pub fn close(&mut self) {
        self.conn = None;
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

    fn file_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.jsonl"))
    }

    /// Accepts an upload written to `tmp` (renamed into place, then recorded).
    pub fn add_file(
        &mut self,
        owner: Option<&str>,
        filename: &str,
        purpose: &str,
        tmp: &Path,
        summary: &FileSummary,
    ) -> Result<FileObject, BatchError> {
        let id = random_id("file");
        let bytes = std::fs::metadata(tmp)
            .map_err(|e| io_err("the upload", e))?
            .len();
        std::fs::rename(tmp, self.file_path(&id)).map_err(|e| io_err("storing the upload", e))?;
        let urls = serde_json::to_string(&summary.urls).unwrap_or_default();
        let created = now_unix();
        self.conn()?
            .execute(
                "INSERT INTO batch_files VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    owner,
                    filename,
                    purpose,
                    bytes,
                    created,
                    summary.requests,
                    urls
                ],
            )
            .map_err(db_err)?;
        Ok(FileObject::new(id, bytes, created, filename, purpose))
    }

    fn file_row(&mut self, id: &str, viewer: &Viewer) -> Result<FileRow, BatchError> {
        let Some(conn) = self.conn.as_ref() else {
            return Err(BatchError::NotFound(format!("no file `{id}`")));
        };
        let row = conn
            .query_row(
                "SELECT owner, filename, purpose, bytes, created_at, requests, urls
                 FROM batch_files WHERE id = ?1",
                [id],
                |r| {
                    Ok(FileRow {
                        owner: r.get(0)?,
                        object: FileObject::new(
                            id.to_string(),
                            r.get(3)?,
                            r.get(4)?,
                            &r.get::<_, String>(1)?,
                            &r.get::<_, String>(2)?,
                        ),
                        requests: r.get(5)?,
                        urls: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                    })
                },
            )
            .optional()
            .map_err(db_err)?;
        row.filter(|f| viewer.sees(f.owner.as_deref()))
            .ok_or_else(|| BatchError::NotFound(format!("no file `{id}`")))
    }

    pub fn file(&mut self, id: &str, viewer: &Viewer) -> Result<FileObject, BatchError> {
        Ok(self.file_row(id, viewer)?.object)
    }

    /// The file's path on disk, for its content.
    pub fn file_content(&mut self, id: &str, viewer: &Viewer) -> Result<PathBuf, BatchError> {
        self.file_row(id, viewer)?;
        Ok(self.file_path(id))
    }

    pub fn files(
        &mut self,
        viewer: &Viewer,
        purpose: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<FileObject>, BatchError> {
        let Some(conn) = self.conn.as_ref() else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare(
                "SELECT id, owner, filename, purpose, bytes, created_at FROM batch_files
                 WHERE (?1 IS NULL OR purpose = ?1)
                   AND (?2 IS NULL OR rowid < (SELECT rowid FROM batch_files WHERE id = ?2))
                 ORDER BY rowid DESC",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![purpose, after], |r| {
                Ok((
                    r.get::<_, Option<String>>(1)?,
                    FileObject::new(
                        r.get(0)?,
                        r.get(4)?,
                        r.get(5)?,
                        &r.get::<_, String>(2)?,
                        &r.get::<_, String>(3)?,
                    ),
                ))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (owner, file) = row.map_err(db_err)?;
            if viewer.sees(owner.as_deref()) {
                out.push(file);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn delete_file(&mut self, id: &str, viewer: &Viewer) -> Result<(), BatchError> {
        self.file_row(id, viewer)?;
        let conn = self.conn()?;
        let user: Option<String> = conn
            .query_row(
                "SELECT id FROM batches WHERE input_file_id = ?1
                 AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if let Some(batch) = user {
            return Err(BatchError::Conflict(format!(
                "file `{id}` is the input of batch `{batch}`, which has not finished; cancel it first"
            )));
        }
        conn.execute("DELETE FROM batch_files WHERE id = ?1", [id])
            .map_err(db_err)?;
        let _ = std::fs::remove_file(self.file_path(id));
        Ok(())
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
        let ids = self.batch_ids(
            "status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY rowid",
            [],
        )?;
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
        let column = status.time_column();
        let errors = errors.map(|e| serde_json::to_string(e).unwrap_or_default());
        let from = from
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let moved = self
            .conn()?
            .execute(
                &format!(
                    "UPDATE batches SET status = ?2, {column} = COALESCE({column}, ?3),
                       errors = COALESCE(?4, errors) WHERE id = ?1 AND status IN ({from})"
                ),
                params![id, status.as_str(), now_unix(), errors],
            )
            .map_err(db_err)?;
        Ok(moved == 1)
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

    /// The input file's requests, in order.
    pub fn input_lines(&mut self, batch: &BatchObject) -> Result<Vec<InputLine>, BatchError> {
        let text = std::fs::read_to_string(self.file_path(&batch.input_file_id))
            .map_err(|e| io_err(&format!("reading file `{}`", batch.input_file_id), e))?;
        read_lines(&text, &[&batch.endpoint]).map_err(BatchError::Io)
    }

    /// Lines of `batch_id` with a result.
    pub fn done_lines(&mut self, batch_id: &str) -> Result<HashSet<usize>, BatchError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT line FROM batch_results WHERE batch_id = ?1")
            .map_err(db_err)?;
        let lines = stmt
            .query_map([batch_id], |r| r.get::<_, i64>(0))
            .map_err(db_err)?;
        lines
            .map(|l| l.map(|l| l as usize).map_err(db_err))
            .collect()
    }

    /// Keeps a line's result; a second result for the same line is ignored, and so is one
    /// for a batch already finalizing or finished (a line stopped by a cancel that got its
    /// answer at the last moment: the result files are written already).
    pub fn record(&mut self, batch_id: &str, r: &LineResult) -> Result<(), BatchError> {
        let usage = &r.body["usage"];
        let count = |v: &Value| v.as_u64().unwrap_or(0);
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
                    r.body.to_string(),
                    count(&usage["prompt_tokens"]),
                    count(&usage["completion_tokens"]),
                    count(&usage["prompt_tokens_details"]["cached_tokens"]),
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }
}

struct FileRow {
    owner: Option<String>,
    object: FileObject,
    requests: u64,
    urls: Vec<String>,
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
