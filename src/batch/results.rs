//! A batch's end: its results written out as OpenAI's output file (the lines answered 200)
//! and error file (the others, and the lines that never ran when it was cancelled or
//! expired), each written to `tmp/`, synced and renamed into place before it is recorded.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::params;
use serde_json::Value;

use super::jsonl::{output_line, unrun_line, FileSummary};
use super::objects::{BatchErrors, BatchObject, BatchStatus, LineError};
use super::store::{db_err, io_err, Store};
use super::BatchError;

impl Store {
    /// Writes the output file (successes) and the error file (failures, and the lines that
    /// never ran, with `unrun_code`), records them, and moves the batch to `status`.
    pub fn finalize(
        &mut self,
        batch: &BatchObject,
        status: BatchStatus,
        unrun_code: &str,
    ) -> Result<(), BatchError> {
        use BatchStatus::*;
        // All lines done, cancelled or expired: whatever it was doing, it finishes now.
        let running = [Validating, InProgress, Cancelling, Finalizing];
        if !self.set_status(&batch.id, &running, Finalizing, None)? {
            return Ok(()); // finished already
        }
        let (mut ok, mut failed) = (String::new(), String::new());
        let mut done = HashSet::new();
        {
            let conn = self.conn()?;
            let mut stmt = conn
                .prepare(
                    "SELECT line, custom_id, status_code, request_id, body FROM batch_results
                     WHERE batch_id = ?1 ORDER BY line",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([&batch.id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u16>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .map_err(db_err)?;
            for row in rows {
                let (line, custom_id, code, request_id, body) = row.map_err(db_err)?;
                let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let id = format!("batch_req_{}_{line}", &batch.id["batch_".len()..]);
                let out = if code == 200 { &mut ok } else { &mut failed };
                out.push_str(&output_line(&id, &custom_id, code, &request_id, &body));
                out.push('\n');
                done.insert(line as usize);
            }
        }
        if done.len() < batch.request_counts.total as usize {
            let message = match status {
                BatchStatus::Expired => "the batch expired before this request ran",
                _ => "the batch was cancelled before this request ran",
            };
            for (line, l) in self.input_lines(batch)?.iter().enumerate() {
                if !done.contains(&line) {
                    let id = format!("batch_req_{}_{line}", &batch.id["batch_".len()..]);
                    failed.push_str(&unrun_line(&id, &l.custom_id, unrun_code, message));
                    failed.push('\n');
                }
            }
        }
        let owner = self.batch_owner(&batch.id)?;
        let mut written = Vec::new();
        for (text, name) in [(ok, "output"), (failed, "error")] {
            written.push(match text.is_empty() {
                true => None,
                false => Some(self.write_result_file(
                    owner.as_deref(),
                    &format!("{}_{name}.jsonl", batch.id),
                    &text,
                )?),
            });
        }
        self.conn()?
            .execute(
                "UPDATE batches SET output_file_id = ?2, error_file_id = ?3 WHERE id = ?1",
                params![batch.id, written[0], written[1]],
            )
            .map_err(db_err)?;
        self.set_status(&batch.id, &[Finalizing], status, None)?;
        Ok(())
    }

    fn write_result_file(
        &mut self,
        owner: Option<&str>,
        filename: &str,
        text: &str,
    ) -> Result<String, BatchError> {
        let tmp = self.tmp_path()?;
        write_synced(&tmp, text.as_bytes()).map_err(|e| io_err("writing a result file", e))?;
        let summary = FileSummary {
            requests: text.lines().count(),
            urls: Default::default(),
        };
        Ok(self
            .add_file(owner, filename, "batch_output", &tmp, &summary)?
            .id)
    }
}

/// Writes `bytes` and syncs them to disk before the caller renames the file into place.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
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
        let done = s.done_lines(&b.id).unwrap();
        assert_eq!(done, [0, 2].into_iter().collect());
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
