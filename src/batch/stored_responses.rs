//! Stored Responses (OpenAI's Responses API with `store`): one row per response, owned by the
//! key that created it, in the same database as files and batches. A row holds the response
//! object, this turn's input items, the request it ran (so that a `background` response
//! resumes after a restart, as batch lines do) and the response it continued. A conversation
//! is rebuilt by walking `previous_response_id` back: nothing is copied from turn to turn.
//! Rows older than the retention are removed as new ones are written.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::store::{db_err, Store};
use super::{now_unix, BatchError, Viewer};

pub(super) const RESPONSES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT, created_at INTEGER NOT NULL, status TEXT NOT NULL,
    previous_response_id TEXT, request TEXT NOT NULL, input_items TEXT NOT NULL,
    response TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
";

/// The statuses of a response that has not finished.
const UNFINISHED: &str = "('queued', 'in_progress')";

/// Longest chain of `previous_response_id` a conversation may have.
pub const MAX_CHAIN: usize = 10_000;

/// A stored response.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub id: String,
    pub owner: Option<String>,
    pub previous_response_id: Option<String>,
    /// The create request as it ran (for a background response to run again).
    pub request: Value,
    /// This turn's input items, each with an `id`.
    pub input_items: Vec<Value>,
    /// The Responses API object.
    pub response: Value,
}

fn not_found(id: &str) -> BatchError {
    BatchError::NotFound(format!("no response `{id}`"))
}

fn json_of(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

impl Store {
    /// Writes `r` (new, or over its earlier state), and removes responses created before
    /// `expire_before`.
    pub fn put_response(
        &mut self,
        r: &StoredResponse,
        expire_before: u64,
    ) -> Result<(), BatchError> {
        let conn = self.conn()?;
        conn.execute(
            "DELETE FROM responses WHERE created_at < ?1",
            [expire_before as i64],
        )
        .map_err(db_err)?;
        conn.execute(
            "INSERT INTO responses (id, owner, created_at, status, previous_response_id, request,
                 input_items, response) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (id) DO UPDATE SET status = ?4, response = ?8",
            params![
                r.id,
                r.owner,
                r.response["created_at"]
                    .as_i64()
                    .unwrap_or(now_unix() as i64),
                r.response["status"].as_str().unwrap_or("completed"),
                r.previous_response_id,
                r.request.to_string(),
                Value::Array(r.input_items.clone()).to_string(),
                r.response.to_string(),
            ],
        )
        .map_err(db_err)?;
        Ok(())
    }

    /// Replaces the response object of an unfinished response; whether it was unfinished (a
    /// cancelled one keeps its state whatever its run still reports).
    pub fn finish_response(&mut self, id: &str, response: &Value) -> Result<bool, BatchError> {
        let n = self
            .conn()?
            .execute(
                &format!("UPDATE responses SET status = ?2, response = ?3 WHERE id = ?1 AND status IN {UNFINISHED}"),
                params![id, response["status"].as_str().unwrap_or("completed"), response.to_string()],
            )
            .map_err(db_err)?;
        Ok(n == 1)
    }

    /// The response `id`, if `viewer` may see it and it has not expired.
    pub fn response(
        &mut self,
        id: &str,
        viewer: &Viewer,
        expire_before: u64,
    ) -> Result<StoredResponse, BatchError> {
        let row = self
            .conn()?
            .query_row(
                "SELECT owner, previous_response_id, request, input_items, response FROM responses
                 WHERE id = ?1 AND created_at >= ?2",
                params![id, expire_before as i64],
                |r| {
                    Ok(StoredResponse {
                        id: id.to_string(),
                        owner: r.get(0)?,
                        previous_response_id: r.get(1)?,
                        request: json_of(r.get(2)?),
                        input_items: match json_of(r.get(3)?) {
                            Value::Array(a) => a,
                            _ => Vec::new(),
                        },
                        response: json_of(r.get(4)?),
                    })
                },
            )
            .optional()
            .map_err(db_err)?;
        row.filter(|r| viewer.sees(r.owner.as_deref()))
            .ok_or_else(|| not_found(id))
    }

    /// The conversation up to and including the response `id`: every earlier turn's input
    /// items and output, oldest first.
    pub fn conversation(
        &mut self,
        id: &str,
        viewer: &Viewer,
        expire_before: u64,
    ) -> Result<Vec<Value>, BatchError> {
        let mut turns = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next {
            if turns.len() == MAX_CHAIN {
                return Err(BatchError::invalid(
                    "previous_response_id",
                    format!("the conversation is longer than {MAX_CHAIN} responses"),
                ));
            }
            let r = self.response(&id, viewer, expire_before).map_err(|e| match e {
                BatchError::NotFound(_) => BatchError::invalid(
                    "previous_response_id",
                    format!("no stored response `{id}` in this conversation (deleted, expired, or never stored)"),
                ),
                e => e,
            })?;
            let status = r.response["status"].as_str().unwrap_or_default();
            if status != "completed" && status != "incomplete" {
                return Err(BatchError::invalid(
                    "previous_response_id",
                    format!("response `{id}` is {status}: only a completed (or incomplete) response can be continued"),
                ));
            }
            next = r.previous_response_id.clone();
            turns.push(r);
        }
        let mut items = Vec::new();
        for r in turns.into_iter().rev() {
            items.extend(r.input_items);
            if let Value::Array(out) = &r.response["output"] {
                items.extend(out.iter().cloned());
            }
        }
        Ok(items)
    }

    /// Deletes the response `id` if `viewer` may see it.
    pub fn delete_response(&mut self, id: &str, viewer: &Viewer) -> Result<(), BatchError> {
        self.response(id, viewer, 0)?;
        self.conn()?
            .execute("DELETE FROM responses WHERE id = ?1", [id])
            .map_err(db_err)?;
        Ok(())
    }

    /// Marks an unfinished response cancelled; the response as it now stands.
    pub fn cancel_response(&mut self, id: &str, viewer: &Viewer) -> Result<Value, BatchError> {
        let mut r = self.response(id, viewer, 0)?;
        if r.response["status"] == "queued" || r.response["status"] == "in_progress" {
            r.response["status"] = "cancelled".into();
            self.finish_response(id, &r.response)?;
        }
        Ok(r.response)
    }

    /// How many unfinished responses `owner` has.
    pub fn unfinished_of(&mut self, owner: Option<&str>) -> Result<usize, BatchError> {
        let n: i64 = self
            .conn()?
            .query_row(
                &format!(
                    "SELECT COUNT(*) FROM responses WHERE status IN {UNFINISHED} AND owner IS ?1"
                ),
                [owner],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        Ok(n as usize)
    }

    /// Background responses that had not finished: what to run again after a restart.
    pub fn unfinished_responses(
        &mut self,
        expire_before: u64,
    ) -> Result<Vec<StoredResponse>, BatchError> {
        let ids: Vec<String> = {
            let conn = self.conn()?;
            let mut stmt = conn
                .prepare(&format!("SELECT id FROM responses WHERE status IN {UNFINISHED} AND created_at >= ?1 ORDER BY rowid"))
                .map_err(db_err)?;
            let rows = stmt
                .query_map([expire_before as i64], |r| r.get(0))
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)?
        };
        ids.iter()
            .map(|id| self.response(id, &Viewer::All, 0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(
        id: &str,
        prev: Option<&str>,
        owner: &str,
        input: &str,
        output: &str,
    ) -> StoredResponse {
        StoredResponse {
            id: id.into(),
            owner: Some(owner.into()),
            previous_response_id: prev.map(Into::into),
            request: json!({"input": input}),
            input_items: vec![json!({"id": format!("in_{id}"), "role": "user", "content": input})],
            response: json!({"id": id, "created_at": now_unix(), "status": "completed",
                "output": [{"id": format!("out_{id}"), "type": "message", "content": output}]}),
        }
    }

    #[test]
    fn a_conversation_is_rebuilt_from_its_chain_after_reopening_and_owners_are_kept_apart() {
        let dir = std::env::temp_dir().join(format!("idlerig-responses-{}", rand::random::<u64>()));
        let db = dir.join("batches.db");
        {
            let mut s = Store::open(&dir, &db).unwrap();
            s.put_response(&stored("r1", None, "alice", "one", "uno"), 0)
                .unwrap();
            s.put_response(&stored("r2", Some("r1"), "alice", "two", "dos"), 0)
                .unwrap();
            s.put_response(&stored("b1", None, "bob", "x", "y"), 0)
                .unwrap();
        }
        let mut s = Store::open(&dir, &db).unwrap();
        let alice = Viewer::Owner("alice".into());
        let items = s.conversation("r2", &alice, 0).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["in_r1", "out_r1", "in_r2", "out_r2"]);
        assert!(
            s.response("b1", &alice, 0).is_err(),
            "bob's response is not alice's"
        );
        assert!(s.conversation("b1", &alice, 0).is_err());
        // A cancelled response keeps its state whatever its run reports later.
        s.put_response(
            &StoredResponse {
                response: json!({"id": "q", "created_at": now_unix(), "status": "queued"}),
                ..stored("q", None, "alice", "", "")
            },
            0,
        )
        .unwrap();
        assert_eq!(s.unfinished_responses(0).unwrap().len(), 1);
        assert_eq!(
            s.cancel_response("q", &alice).unwrap()["status"],
            "cancelled"
        );
        assert!(!s
            .finish_response("q", &json!({"status": "completed"}))
            .unwrap());
        assert!(s.unfinished_responses(0).unwrap().is_empty());
        // Deleting a turn breaks the chain with a clear error; expired rows are gone.
        s.delete_response("r1", &alice).unwrap();
        let e = s.conversation("r2", &alice, 0).unwrap_err();
        assert!(e.to_string().contains("r1"), "{e}");
        s.put_response(&stored("r3", None, "alice", "", ""), now_unix() + 10)
            .unwrap();
        assert!(s.response("r2", &alice, 0).is_err(), "expired and removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
