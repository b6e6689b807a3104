//! The batch input format, checked as it streams in: one JSON object per line with a unique
//! `custom_id`, `method: POST`, a `url` this server serves and a `body` object. Structural
//! faults refuse the upload and name their lines; a body the endpoint itself refuses (an
//! unknown model, a temperature of 9) is the endpoint's business and ends in the batch's error
//! file instead. Also the [`InputCursor`] that reads an accepted file back one request at a
//! time (a batch never holds its file parsed), and the output lines, in OpenAI's format.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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

/// A set of request numbers, one bit each: the done lines of a 50,000-line batch in 6 KiB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineSet {
    words: Vec<u64>,
    len: usize,
}

impl LineSet {
    pub fn insert(&mut self, line: usize) {
        let (word, bit) = (line / 64, 1u64 << (line % 64));
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & bit == 0 {
            self.words[word] |= bit;
            self.len += 1;
        }
    }

    pub fn contains(&self, line: usize) -> bool {
        self.words
            .get(line / 64)
            .is_some_and(|w| w & (1u64 << (line % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One request of an input file as read back: its number (blank lines are not requests, as
/// the upload's check counts them), where its line starts, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    pub line: usize,
    pub offset: u64,
    pub text: String,
}

/// Reads an accepted input file from start to end, one request at a time, stepping over the
/// requests in `skip` (those with a result) without parsing them. It holds a file handle, a
/// position and the set of done lines; the text of one line at most.
pub struct InputCursor {
    path: PathBuf,
    reader: BufReader<File>,
    /// Where the next line starts.
    pos: u64,
    /// The number of the next request.
    next: usize,
    skip: LineSet,
    max_line_bytes: usize,
}

impl InputCursor {
    pub fn open(path: &Path, skip: LineSet, max_line_bytes: usize) -> io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(File::open(path)?),
            pos: 0,
            next: 0,
            skip,
            max_line_bytes,
        })
    }

    /// The next request not in `skip`, or `None` at the end of the file.
    pub fn next_request(&mut self) -> io::Result<Option<RawRequest>> {
        loop {
            let offset = self.pos;
            let Some((text, len)) = read_line(&mut self.reader, self.max_line_bytes)? else {
                return Ok(None);
            };
            self.pos += len;
            if text.trim().is_empty() {
                continue;
            }
            let line = self.next;
            self.next += 1;
            if !self.skip.contains(line) {
                return Ok(Some(RawRequest { line, offset, text }));
            }
        }
    }

    /// The text of the line that starts at `offset` (one handed out before, to run again);
    /// the cursor's own place does not move.
    pub fn read_at(&self, offset: u64) -> io::Result<String> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(offset))?;
        read_line(&mut BufReader::new(file), self.max_line_bytes)?
            .map(|(text, _)| text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the line is gone"))
    }
}

/// One line without its newline, and the bytes it took, or `None` at the end. Never more than
/// `max` bytes are held: a longer line (a file changed on disk) is an error, not a large read.
fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Option<(String, u64)>> {
    let mut buf = Vec::new();
    let limit = max as u64 + 1;
    let n = reader.take(limit).read_until(b'\n', &mut buf)? as u64;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if n == limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a line is longer than {max} bytes"),
        ));
    }
    String::from_utf8(buf)
        .map(|text| Some((text, n)))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line is not UTF-8"))
}

/// A request's `custom_id`, read without building its body.
pub fn custom_id_of(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        custom_id: String,
    }
    serde_json::from_str::<Id>(text).ok().map(|i| i.custom_id)
}

/// Writes one line of an output or error file, as OpenAI writes them, with `body` (the JSON
/// text as stored) copied as it is rather than parsed and built again.
pub fn write_output_line(
    w: &mut impl Write,
    id: &str,
    custom_id: &str,
    status_code: u16,
    request_id: &str,
    body: &str,
) -> io::Result<()> {
    w.write_all(b"{\"id\":")?;
    serde_json::to_writer(&mut *w, id)?;
    w.write_all(b",\"custom_id\":")?;
    serde_json::to_writer(&mut *w, custom_id)?;
    write!(
        w,
        ",\"response\":{{\"status_code\":{status_code},\"request_id\":"
    )?;
    serde_json::to_writer(&mut *w, request_id)?;
    w.write_all(b",\"body\":")?;
    w.write_all(body.as_bytes())?;
    w.write_all(b"},\"error\":null}\n")
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
        let path = std::env::temp_dir().join(format!("idlerig-cursor-{}", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let mut skip = LineSet::default();
        skip.insert(1);
        let mut cursor = InputCursor::open(&path, skip, 200).unwrap();
        let a = cursor.next_request().unwrap().unwrap();
        let c = cursor.next_request().unwrap().unwrap();
        assert!(cursor.next_request().unwrap().is_none());
        assert_eq!(
            (a.line, a.offset, c.line),
            (0, 0, 2),
            "b (line 1) is skipped"
        );
        assert_eq!(custom_id_of(&c.text).as_deref(), Some("c"));
        assert_eq!(cursor.read_at(c.offset).unwrap(), c.text);
        let parsed = parse_line(&a.text, URLS).unwrap();
        assert_eq!(parsed.body, json!({"messages": []}));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_line_set_counts_each_line_once() {
        let mut s = LineSet::default();
        for l in [3, 64, 3, 50_000] {
            s.insert(l);
        }
        assert_eq!(s.len(), 3);
        assert!(s.contains(64) && s.contains(50_000) && !s.contains(65) && !s.contains(9 << 20));
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
        let mut out = Vec::new();
        write_output_line(&mut out, "r1", "a\"", 200, "req-1", r#"{"x":1}"#).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], "r1");
        assert_eq!(v["response"]["request_id"], "req-1");
        assert_eq!(v["custom_id"], "a\"");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["x"], 1);
        assert!(v["error"].is_null());
        let v: Value =
            serde_json::from_str(&unrun_line("r2", "b", "batch_expired", "late")).unwrap();
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "batch_expired");
    }
}
