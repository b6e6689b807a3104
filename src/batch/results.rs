//! A batch's end: its results streamed out as OpenAI's output file (the lines answered 200)
//! and error file (the others, and the lines that never ran when it was cancelled or
//! expired), one result row and one input line at a time, each file written to `tmp/` and
//! synced; both are then renamed into place and recorded with the batch's new status in one
//! transaction, so a failure at any step leaves no file behind. A batch whose results cannot
//! be written fails after [`MAX_FINALIZE_TRIES`] attempts, counted in the database so that a
//! crash while finalizing (out of memory, say) cannot loop across restarts.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use rusqlite::params;

use super::files::insert_file;
use super::jsonl::{custom_id_of, unrun_line, write_output_line, FileSummary, LineSet};
use super::objects::{BatchErrors, BatchObject, BatchStatus, LineError};
use super::store::{db_err, io_err, move_status, Store};
use super::BatchError;

/// Finalize attempts before the batch fails instead.
pub const MAX_FINALIZE_TRIES: u32 = 3;

impl Store {
    /// Writes the output file (successes) and the error file (failures, and the lines that
    /// never ran, with `unrun_code`), records them, and moves the batch to `status`: the
    /// status it ends in (`failed` when its results could not be written, after
    /// [`MAX_FINALIZE_TRIES`]). An error means the attempt failed and the next may succeed.
    pub fn finalize(
        &mut self,
        batch: &BatchObject,
        status: BatchStatus,
        unrun_code: &str,
    ) -> Result<BatchStatus, BatchError> {
        use BatchStatus::*;
        // All lines done, cancelled or expired: whatever it was doing, it finishes now.
        let running = [Validating, InProgress, Cancelling, Finalizing];
        if !self.set_status(&batch.id, &running, Finalizing, None)? {
            return Ok(self.batch(&batch.id, &super::Viewer::All)?.status); // finished already
        }
        // Counted before the attempt: one that never returns (the process dies) counts too.
        let (tries, last_error): (u32, Option<String>) = self
            .conn()?
            .query_row(
                "UPDATE batches SET finalize_tries = finalize_tries + 1 WHERE id = ?1
                 RETURNING finalize_tries, finalize_error",
                [&batch.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db_err)?;
        if tries > MAX_FINALIZE_TRIES {
            let why = last_error.unwrap_or_else(|| "the server stopped while writing them".into());
            return self.fail_finalize(batch, why);
        }
        match self.write_results(batch, status, unrun_code) {
            Ok(()) => Ok(status),
            Err(e) => {
                let why = e.to_string();
                self.conn()?
                    .execute(
                        "UPDATE batches SET finalize_error = ?2 WHERE id = ?1",
                        params![batch.id, why],
                    )
                    .map_err(db_err)?;
                if tries >= MAX_FINALIZE_TRIES {
                    self.fail_finalize(batch, why)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Ends a batch whose results could not be written as `failed`, saying why. Its results
    /// stay counted; no file was kept.
    fn fail_finalize(
        &mut self,
        batch: &BatchObject,
        why: String,
    ) -> Result<BatchStatus, BatchError> {
        let message =
            format!("the batch's results could not be written ({MAX_FINALIZE_TRIES} tries): {why}");
        tracing::error!(batch = %batch.id, error = %why, "a batch's results cannot be written; it fails");
        let errors = one_error("finalize_failed", message);
        let from = [BatchStatus::Finalizing];
        self.set_status(&batch.id, &from, BatchStatus::Failed, Some(&errors))?;
        Ok(BatchStatus::Failed)
    }

    /// One attempt: both files streamed to `tmp/`, then placed and recorded together.
    fn write_results(
        &mut self,
        batch: &BatchObject,
        status: BatchStatus,
        unrun_code: &str,
    ) -> Result<(), BatchError> {
        let mut ok = ResultFile::new(self.tmp_path()?);
        let mut failed = ResultFile::new(self.tmp_path()?);
        let prefix = batch
            .id
            .strip_prefix("batch_")
            .unwrap_or(&batch.id)
            .to_string();
        let done = self.stream_results(batch, &prefix, &mut ok, &mut failed)?;
        if done.len() < batch.request_counts.total as usize {
            let message = match status {
                BatchStatus::Expired => "the batch expired before this request ran",
                BatchStatus::Cancelled => "the batch was cancelled before this request ran",
                _ => "this request ran, but its result could not be stored",
            };
            let code = match status {
                BatchStatus::Expired | BatchStatus::Cancelled => unrun_code,
                _ => "result_not_stored",
            };
            // The input again, one line at a time, for the custom ids of those never run.
            let mut input = self.input_cursor(batch, done)?;
            let read = |e| io_err(&format!("reading file `{}`", batch.input_file_id), e);
            while let Some(req) = input.next_request().map_err(read)? {
                let custom_id = custom_id_of(&req.text).unwrap_or_default();
                let id = format!("batch_req_{prefix}_{}", req.line);
                failed.line(|w| writeln!(w, "{}", unrun_line(&id, &custom_id, code, message)))?;
            }
        }
        let owner = self.batch_owner(&batch.id)?;
        // Placed files are removed again unless their records commit (and a crash between the
        // two leaves files the next open's tidying removes).
        let mut placed = Placed(Vec::new());
        let mut ids = [None, None];
        for (i, (file, name)) in [(ok, "output"), (failed, "error")].into_iter().enumerate() {
            if let Some((tmp, lines)) = file.finish()? {
                let (id, bytes) = self.place_file(&tmp).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })?;
                placed.0.push(self.file_path(&id));
                ids[i] = Some((id, bytes, format!("{}_{name}.jsonl", batch.id), lines));
            }
        }
        let conn = self.conn()?;
        let tx = conn.transaction().map_err(db_err)?;
        for (id, bytes, filename, lines) in ids.iter().flatten() {
            let summary = FileSummary {
                requests: *lines,
                urls: Default::default(),
            };
            insert_file(
                &tx,
                id,
                *bytes,
                owner.as_deref(),
                filename,
                "batch_output",
                &summary,
            )?;
        }
        let id_of = |i: usize| ids[i].as_ref().map(|f| f.0.clone());
        tx.execute(
            "UPDATE batches SET output_file_id = ?2, error_file_id = ?3 WHERE id = ?1",
            params![batch.id, id_of(0), id_of(1)],
        )
        .map_err(db_err)?;
        move_status(&tx, &batch.id, &[BatchStatus::Finalizing], status, None).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        placed.0.clear();
        Ok(())
    }

    /// Writes every recorded result to `ok` or `failed`, one row at a time (the body copied as
    /// stored, never parsed); the lines they cover.
    fn stream_results(
        &mut self,
        batch: &BatchObject,
        prefix: &str,
        ok: &mut ResultFile,
        failed: &mut ResultFile,
    ) -> Result<LineSet, BatchError> {
        let total = batch.request_counts.total as usize;
        let mut done = LineSet::default();
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT line, custom_id, status_code, request_id, body FROM batch_results
                 WHERE batch_id = ?1 ORDER BY line",
            )
            .map_err(db_err)?;
        let mut rows = stmt.query([&batch.id]).map_err(db_err)?;
        while let Some(r) = rows.next().map_err(db_err)? {
            let line: i64 = r.get(0).map_err(db_err)?;
            let custom_id: String = r.get(1).map_err(db_err)?;
            let code: u16 = r.get(2).map_err(db_err)?;
            let request_id: String = r.get(3).map_err(db_err)?;
            let body = r.get_ref(4).map_err(db_err)?.as_str().unwrap_or("null");
            // Stored from a JSON value; anything else (a hand-edited database) reads as null
            // rather than break the file's JSON.
            let valid = serde_json::from_str::<serde::de::IgnoredAny>(body).is_ok();
            let body = if valid { body } else { "null" };
            let id = format!("batch_req_{prefix}_{line}");
            let out = if code == 200 { &mut *ok } else { &mut *failed };
            out.line(|w| write_output_line(w, &id, &custom_id, code, &request_id, body))?;
            match usize::try_from(line) {
                Ok(l) if l < total => done.insert(l),
                _ => {}
            }
        }
        Ok(done)
    }
}

/// A result file being written to `tmp/`: created at its first line, removed when dropped
/// unless it was finished and handed on.
struct ResultFile {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    lines: usize,
}

impl ResultFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            out: None,
            lines: 0,
        }
    }

    fn line(
        &mut self,
        write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> Result<(), BatchError> {
        let err = |e| io_err("writing a result file", e);
        if self.out.is_none() {
            self.out = Some(BufWriter::new(File::create(&self.path).map_err(err)?));
        }
        write(self.out.as_mut().expect("created above")).map_err(err)?;
        self.lines += 1;
        Ok(())
    }

    /// Flushed and synced: its path and line count, or `None` when it has no line.
    fn finish(mut self) -> Result<Option<(PathBuf, usize)>, BatchError> {
        let Some(out) = self.out.take() else {
            return Ok(None);
        };
        let err = |e| io_err("writing a result file", e);
        let file = out.into_inner().map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(err)?;
        // Handed on: the caller renames it into place, or removes it.
        Ok(Some((std::mem::take(&mut self.path), self.lines)))
    }
}

impl Drop for ResultFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Files renamed into place whose records are not committed yet: removed when dropped.
struct Placed(Vec<PathBuf>);

impl Drop for Placed {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes `bytes` and syncs them to disk before the caller renames the file into place.
pub fn write_synced(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A failed batch's errors, from one message.
pub fn one_error(code: &str, message: String) -> BatchErrors {
    BatchErrors {
        object: "list",
        data: vec![LineError {
            code: code.into(),
            message,
            param: None,
            line: None,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::super::jsonl::JsonlCheck;
    use super::super::store::{LineResult, Store};
    use super::super::{BatchStatus, Viewer};
    use serde_json::json;

    fn store(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("idlerig-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::open(&dir, &dir.join("batches.db")).unwrap(), dir)
    }

    fn upload(s: &mut Store, lines: usize) -> String {
        let text: String = (0..lines)
            .map(|i| {
                format!(
                    "{}\n",
                    json!({"custom_id": format!("c{i}"), "method": "POST",
                           "url": "/v1/completions", "body": {"prompt": "x"}})
                )
            })
            .collect();
        let mut check = JsonlCheck::new(vec!["/v1/completions"], 100, 1000);
        check.push(text.as_bytes());
        let summary = check.finish().unwrap();
        let tmp = s.tmp_path().unwrap();
        super::write_synced(&tmp, text.as_bytes()).unwrap();
        s.add_file(Some("alice"), "in.jsonl", "batch", &tmp, &summary)
            .unwrap()
            .id
    }

    fn result(line: usize, code: u16) -> LineResult {
        LineResult {
            line,
            custom_id: format!("c{line}"),
            status_code: code,
            request_id: format!("req-{line}"),
            body: json!({"usage": {"prompt_tokens": 3, "completion_tokens": 5}}),
        }
    }

    #[test]
    fn a_line_is_recorded_once_and_a_reopened_store_resumes_where_it_stopped() {
        let (mut s, dir) = store("once");
        let file = upload(&mut s, 4);
        let alice = Viewer::Owner("alice".into());
        let b = s
            .create_batch(
                &alice,
                Some("alice"),
                &file,
                "/v1/completions",
                None,
                86_400,
            )
            .unwrap();
        s.record(&b.id, &result(0, 200)).unwrap();
        s.record(&b.id, &result(0, 500)).unwrap(); // a second answer for line 0 is ignored
        s.record(&b.id, &result(2, 400)).unwrap();
        drop(s);
        let mut s = Store::open(&dir, &dir.join("batches.db")).unwrap();
        let again = s.batch(&b.id, &alice).unwrap();
        assert_eq!(
            (again.request_counts.completed, again.request_counts.failed),
            (1, 1)
        );
        assert_eq!(again.usage.output_tokens, 10);
        let done = s.done_lines(&again).unwrap();
        assert!(done.len() == 2 && done.contains(0) && done.contains(2));
        assert!(
            s.batch(&b.id, &Viewer::Owner("bob".into())).is_err(),
            "bob sees nothing"
        );
        assert_eq!(s.active_batches().unwrap().len(), 1);

        // Cancelled with lines 1 and 3 never run: the error file lists them.
        s.finalize(&again, BatchStatus::Cancelled, "batch_cancelled")
            .unwrap();
        let end = s.batch(&b.id, &alice).unwrap();
        assert_eq!(end.status, BatchStatus::Cancelled);
        assert!(s.active_batches().unwrap().is_empty());
        let read = |s: &mut Store, id: &Option<String>| {
            std::fs::read_to_string(s.file_content(id.as_deref().unwrap(), &alice).unwrap())
                .unwrap()
        };
        let output = read(&mut s, &end.output_file_id);
        let errors = read(&mut s, &end.error_file_id);
        assert_eq!(output.lines().count(), 1);
        let ids: Vec<String> = errors
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["custom_id"].to_string())
            .collect();
        assert_eq!(ids, [r#""c2""#, r#""c1""#, r#""c3""#]);
        assert!(errors.contains("batch_cancelled"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_cancelled_while_the_runner_starts_it_stays_cancelled() {
        let (mut s, dir) = store("race");
        let file = upload(&mut s, 2);
        let b = s
            .create_batch(&Viewer::All, None, &file, "/v1/completions", None, 86_400)
            .unwrap();
        // The runner read `validating`; the cancel comes before it moves the batch on.
        s.cancel(&b.id, &Viewer::All).unwrap();
        let from = [BatchStatus::Validating];
        assert!(!s
            .set_status(&b.id, &from, BatchStatus::InProgress, None)
            .unwrap());
        assert_eq!(
            s.batch(&b.id, &Viewer::All).unwrap().status,
            BatchStatus::Cancelling
        );
        s.finalize(&b, BatchStatus::Cancelled, "batch_cancelled")
            .unwrap();
        s.finalize(&b, BatchStatus::Completed, "batch_cancelled")
            .unwrap();
        assert_eq!(
            s.batch(&b.id, &Viewer::All).unwrap().status,
            BatchStatus::Cancelled,
            "a finished batch is not finished again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stray_files_from_a_crash_are_removed_at_the_next_open() {
        let (mut s, dir) = store("tidy");
        let file = upload(&mut s, 1);
        let stray = dir.join("files").join("file-never-recorded.jsonl");
        let partial = dir.join("tmp").join("up-partial.part");
        std::fs::write(&stray, "x").unwrap();
        std::fs::write(&partial, "x").unwrap();
        drop(s);
        let mut s = Store::open(&dir, &dir.join("batches.db")).unwrap();
        assert!(!stray.exists() && !partial.exists());
        assert!(s.file(&file, &Viewer::All).is_ok(), "recorded files stay");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
