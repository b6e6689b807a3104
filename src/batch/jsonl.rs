//! The batch input format, checked as it streams in: one JSON object per line with a unique
//! `custom_id`, `method: POST`, a `url` this server serves and a `body` object. Structural
//! faults refuse the upload and name their lines; a body the endpoint itself refuses (an
//! unknown model, a temperature of 9) is the endpoint's business and ends in the batch's error
//! file instead. Also the output lines, in OpenAI's format.

use std::collections::{BTreeSet, HashSet};

use serde_json::{json, Value};

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    pub custom_id: String,
    pub url: String,
    pub body: Value,
}

/// A fault of one line (1-based, as an editor counts them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineFault {
    pub line: usize,
    pub message: String,
}

/// What an accepted file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSummary {
    pub requests: usize,
    /// The endpoints its lines call.
    pub urls: BTreeSet<String>,
}

/// Most faults reported for one file; the count of the rest is given.
const MAX_FAULTS: usize = 20;

/// Reads one line. Blank lines are skipped by the caller.
pub fn parse_line(text: &str, served_urls: &[&str]) -> Result<InputLine, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let Value::Object(mut o) = v else {
        return Err("not a JSON object".into());
    };
    let custom_id = match o.remove("custom_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s,
        Some(Value::String(s)) if !s.is_empty() => {
            return Err(format!(
                "`custom_id` is {} bytes long; at most 512",
                s.len()
            ))
        }
        Some(_) => return Err("`custom_id` must be a non-empty string".into()),
        None => return Err("`custom_id` is missing".into()),
    };
    match o.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        Some(m) => return Err(format!("`method` must be `POST`; got `{m}`")),
        None => return Err("`method` is missing (it must be `POST`)".into()),
    }
    let url = match o.remove("url") {
        Some(Value::String(u)) if served_urls.contains(&u.as_str()) => u,
        Some(Value::String(u)) => {
            return Err(format!(
                "`url` `{u}` is not an endpoint this server runs in batches (`{}`)",
                served_urls.join("`, `")
            ))
        }
        _ => return Err("`url` is missing or not a string".into()),
    };
    let body = match o.remove("body") {
        Some(b @ Value::Object(_)) => b,
        Some(_) => return Err("`body` must be a JSON object".into()),
        None => return Err("`body` is missing".into()),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("`body.stream` is not supported in a batch; leave it out".into());
    }
    Ok(InputLine {
        custom_id,
        url,
        body,
    })
}

/// Checks a file as its bytes arrive, holding at most one line in memory.
#[derive(Debug)]
pub struct JsonlCheck {
    served_urls: Vec<&'static str>,
    max_requests: usize,
    max_line_bytes: usize,
    partial: Vec<u8>,
    /// Lines seen (including blank ones), for fault messages.
    line_no: usize,
    /// Set while the rest of an over-long line is skipped.
    skipping: bool,
    custom_ids: HashSet<String>,
    summary: FileSummary,
    faults: Vec<LineFault>,
    more_faults: usize,
}

impl JsonlCheck {
    pub fn new(served_urls: Vec<&'static str>, max_requests: usize, max_line_bytes: usize) -> Self {
        Self {
            served_urls,
            max_requests,
            max_line_bytes,
            partial: Vec::new(),
            line_no: 0,
            skipping: false,
            custom_ids: HashSet::new(),
            summary: FileSummary::default(),
            faults: Vec::new(),
            more_faults: 0,
        }
    }

    fn fault(&mut self, line: usize, message: String) {
        if self.faults.len() < MAX_FAULTS {
            self.faults.push(LineFault { line, message });
        } else {
            self.more_faults += 1;
        }
    }

    pub fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let (part, rest, ends) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &chunk[chunk.len()..], false),
            };
            if !self.skipping {
                self.partial.extend_from_slice(part);
                if self.partial.len() > self.max_line_bytes {
                    let line = self.line_no + 1;
                    let limit = self.max_line_bytes;
                    self.fault(line, format!("longer than {limit} bytes"));
                    self.partial = Vec::new();
                    self.skipping = true;
                }
            }
            if ends {
                self.end_line();
            }
            chunk = rest;
        }
    }

    fn end_line(&mut self) {
        self.line_no += 1;
        let bytes = std::mem::take(&mut self.partial);
        if std::mem::replace(&mut self.skipping, false) {
            return;
        }
        let line = self.line_no;
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return self.fault(line, "not UTF-8".into());
        };
        if text.trim().is_empty() {
            return;
        }
        match parse_line(text, &self.served_urls) {
            Ok(l) => {
                self.summary.requests += 1;
                if self.summary.requests == self.max_requests + 1 {
                    let max = self.max_requests;
                    self.fault(line, format!("more than {max} requests in one file"));
                }
                if !self.custom_ids.insert(l.custom_id.clone()) {
                    self.fault(line, format!("`custom_id` `{}` is used twice", l.custom_id));
                }
                self.summary.urls.insert(l.url);
            }
            Err(e) => self.fault(line, e),
        }
    }

    /// The file's summary, or every fault found (the first few, and how many more).
    pub fn finish(mut self) -> Result<FileSummary, String> {
        if !self.partial.is_empty() || self.skipping {
            self.end_line();
        }
        if self.faults.is_empty() && self.summary.requests == 0 {
            return Err("the file holds no requests".into());
        }
        if self.faults.is_empty() {
            return Ok(self.summary);
        }
        let mut msg: Vec<String> = self
            .faults
            .iter()
            .map(|f| format!("line {}: {}", f.line, f.message))
            .collect();
        if self.more_faults > 0 {
            msg.push(format!("and {} more", self.more_faults));
        }
        Err(msg.join("; "))
    }
}

/// Reads a whole accepted file's requests, in order.
pub fn read_lines(text: &str, served_urls: &[&str]) -> Result<Vec<InputLine>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l, served_urls).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// One line of an output or error file, as OpenAI writes them.
pub fn output_line(
    id: &str,
    custom_id: &str,
    status_code: u16,
    request_id: &str,
    body: &Value,
) -> String {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": null,
    })
    .to_string()
}

/// An error-file line for a request that never ran (the batch expired or was cancelled).
pub fn unrun_line(id: &str, custom_id: &str, code: &str, message: &str) -> String {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const URLS: &[&str] = &["/v1/chat/completions", "/v1/completions"];

    fn check(text: &str, chunk: usize) -> Result<FileSummary, String> {
        let mut c = JsonlCheck::new(URLS.to_vec(), 3, 200);
        for part in text.as_bytes().chunks(chunk) {
            c.push(part);
        }
        c.finish()
    }

    fn line(id: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[]}}}}"#
        )
    }

    #[test]
    fn good_files_pass_in_any_chunking_with_or_without_a_final_newline() {
        let text = format!("{}\n\n{}\n{}", line("a"), line("b"), line("c"));
        for chunk in [1, 7, 64, 10_000] {
            let s = check(&text, chunk).unwrap();
            assert_eq!(s.requests, 3);
            assert_eq!(s.urls.iter().collect::<Vec<_>>(), ["/v1/chat/completions"]);
            assert!(check(&format!("{text}\n"), chunk).is_ok());
        }
        let lines = read_lines(&text, URLS).unwrap();
        assert_eq!(lines[2].custom_id, "c");
        assert_eq!(lines[0].body, json!({"messages": []}));
    }

    #[test]
    fn each_fault_names_its_line() {
        let text = [
            line("a"),
            "not json".into(),
            r#"{"method":"POST","url":"/v1/completions","body":{}}"#.into(),
            line("a"),
            r#"{"custom_id":"x","method":"GET","url":"/v1/completions","body":{}}"#.into(),
            r#"{"custom_id":"y","method":"POST","url":"/v1/images","body":{}}"#.into(),
            r#"{"custom_id":"z","method":"POST","url":"/v1/completions","body":{"stream":true}}"#
                .into(),
            format!("{{\"custom_id\":\"{}\"}}", "w".repeat(300)),
        ]
        .join("\n");
        let e = check(&text, 5).unwrap_err();
        for want in [
            "line 2: not a JSON object",
            "line 3: `custom_id` is missing",
            "line 4: `custom_id` `a` is used twice",
            "line 5: `method` must be `POST`",
            "line 6: `url` `/v1/images`",
            "line 7: `body.stream`",
            "line 8: longer than 200 bytes",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn limits_and_empty_files_are_refused() {
        let four = [line("a"), line("b"), line("c"), line("d")].join("\n");
        assert!(check(&four, 9)
            .unwrap_err()
            .contains("line 4: more than 3 requests"));
        assert_eq!(check("\n\n", 1).unwrap_err(), "the file holds no requests");
        let mut c = JsonlCheck::new(URLS.to_vec(), 3, 200);
        c.push(&[0xff, 0xfe, b'\n']);
        assert!(c.finish().unwrap_err().contains("line 1: not UTF-8"));
    }

    #[test]
    fn output_lines_have_openai_s_shape() {
        let v: Value =
            serde_json::from_str(&output_line("r1", "a", 200, "req-1", &json!({"x": 1}))).unwrap();
        assert_eq!(v["custom_id"], "a");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["x"], 1);
        assert!(v["error"].is_null());
        let v: Value =
            serde_json::from_str(&unrun_line("r2", "b", "batch_expired", "late")).unwrap();
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "batch_expired");
    }
}
