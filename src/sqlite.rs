//! Opening the embedded SQLite databases (usage per key, batches): WAL mode for crash
//! safety, a busy timeout so that two connections to one file (usage and batches share it
//! when both are kept) wait for each other, an integrity check, and the caller's schema. A
//! corrupt file, or one that is not a database, is an error that says what to do.

use std::path::Path;

/// Opens (or creates) the database at `path` with `schema` (idempotent `CREATE ... IF NOT
/// EXISTS` statements). The error is a sentence for the operator.
pub fn open(path: &Path, schema: &str) -> Result<rusqlite::Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create its folder: {e}"))?;
    }
    let conn = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
    let setup = || -> rusqlite::Result<String> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        conn.execute_batch(schema)?;
        Ok(format!("{mode}/{check}"))
    };
    match setup() {
        Ok(state) if state == "wal/ok" => Ok(conn),
        Ok(state) => Err(format!(
            "not usable ({state}); move it aside to start a new one"
        )),
        Err(e) => Err(format!(
            "{e} (a corrupt file or not a database? move it aside to start a new one; an \
             unwritable one needs write access)"
        )),
    }
}
