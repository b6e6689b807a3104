//! Uploaded files and batch results on disk: their bytes under the data directory's `files/`
//! (each written to `tmp/` first and renamed into place) and their records. A file renamed
//! into place whose record never committed is removed at the next open.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::jsonl::FileSummary;
use super::objects::FileObject;
use super::store::{db_err, io_err, Store};
use super::{now_unix, random_id, BatchError, Viewer};

impl Store {
    /// Accepts an upload written to `tmp` (renamed into place, then recorded).
    pub fn add_file(
        &mut self,
        owner: Option<&str>,
        filename: &str,
        purpose: &str,
        tmp: &Path,
        summary: &FileSummary,
    ) -> Result<FileObject, BatchError> {
        let (id, bytes) = self.place_file(tmp)?;
        let file = self
            .conn()
            .and_then(|c| insert_file(c, &id, bytes, owner, filename, purpose, summary));
        if file.is_err() {
            let _ = std::fs::remove_file(self.file_path(&id));
        }
        file
    }

    /// Renames a file written to `tmp` into place under a new id: the id and its size. Until
    /// its record is committed, the next open's tidying removes it.
    pub(super) fn place_file(&mut self, tmp: &Path) -> Result<(String, u64), BatchError> {
        let id = random_id("file");
        let bytes = std::fs::metadata(tmp)
            .map_err(|e| io_err("the upload", e))?
            .len();
        std::fs::rename(tmp, self.file_path(&id)).map_err(|e| io_err("storing a file", e))?;
        Ok((id, bytes))
    }

    pub(super) fn file_row(&mut self, id: &str, viewer: &Viewer) -> Result<FileRow, BatchError> {
        let Some(conn) = self.open_conn() else {
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
        let Some(conn) = self.open_conn() else {
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
}

/// Records a file placed by [`Store::place_file`].
pub(super) fn insert_file(
    conn: &Connection,
    id: &str,
    bytes: u64,
    owner: Option<&str>,
    filename: &str,
    purpose: &str,
    summary: &FileSummary,
) -> Result<FileObject, BatchError> {
    let urls = serde_json::to_string(&summary.urls).unwrap_or_default();
    let created = now_unix();
    conn.execute(
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
    Ok(FileObject::new(
        id.into(),
        bytes,
        created,
        filename,
        purpose,
    ))
}

pub(super) struct FileRow {
    pub owner: Option<String>,
    pub object: FileObject,
    pub requests: u64,
    pub urls: Vec<String>,
}
