//! Reading tool calls out of a model's text, in the format its chat template teaches it:
//! Hermes/Qwen (`<tool_call>{…}</tool_call>`, repeated for parallel calls), Llama 3.x JSON
//! (`{"name": …, "parameters": …}`, optionally after `<|python_tag|>`, `;`-separated), and
//! Mistral (`[TOOL_CALLS]` then a JSON array, or `name[ARGS]{…}` repeated). Output that does not
//! parse stays content: a model's malformed call is shown to the client, never a server error.

use serde_json::Value;

/// The call format a model was taught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

pub const HERMES_OPEN: &str = "<tool_call>";
pub const HERMES_CLOSE: &str = "</tool_call>";
pub const PYTHON_TAG: &str = "<|python_tag|>";
pub const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

impl CallFormat {
    /// The format a chat template's source uses; Hermes when it shows none (the format the
    /// server itself describes to models whose template knows no tools).
    pub fn of_template(source: &str) -> Self {
        if source.contains(MISTRAL_CALLS) {
            CallFormat::Mistral
        } else if source.contains(HERMES_OPEN) {
            CallFormat::Hermes
        } else if source.contains(PYTHON_TAG) || source.contains("ipython") {
            CallFormat::Llama3Json
        } else {
            CallFormat::Hermes
        }
    }

    /// The text that starts a call in this format (for Llama 3 JSON, the optional tag; a
    /// bare call starts with `{` at the beginning of the output).
    pub fn marker(self) -> &'static str {
        match self {
            CallFormat::Hermes => HERMES_OPEN,
            CallFormat::Llama3Json => PYTHON_TAG,
            CallFormat::Mistral => MISTRAL_CALLS,
        }
    }
}

impl CallFormat {
    /// Whether an output that starts with `t` (leading whitespace gone) may be a call
    /// written without its marker, as this format's models do: `Some(true)` yes, `Some(false)`
    /// no, `None` too little to tell yet. Llama 3 JSON and Hermes calls may be a bare `{`;
    /// Hermes ones also a fenced ```json block.
    pub fn bare_start(self, t: &str) -> Option<bool> {
        let fence = self == CallFormat::Hermes;
        match self {
            CallFormat::Mistral => Some(false),
            _ if t.is_empty() => None,
            _ if t.starts_with('{') => Some(true),
            _ if fence && t.starts_with(JSON_FENCE) => Some(true),
            _ if fence && JSON_FENCE.starts_with(t) => None,
            _ => Some(false),
        }
    }
}

/// One call as the model wrote it: the function's name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// Splits a whole output into its content and its calls. Calls that do not parse leave the
/// whole output as content, with no calls. In the Hermes format, a last call cut off mid-way
/// (by `max_tokens`, or an end-of-generation token) is dropped, with the complete ones before
/// it kept: its markup is never content.
pub fn parse(format: CallFormat, text: &str) -> (String, Vec<ParsedCall>) {
    let parsed = match format {
        CallFormat::Hermes => parse_hermes(text),
        CallFormat::Llama3Json => parse_llama3(text),
        CallFormat::Mistral => parse_mistral(text),
    };
    match parsed {
        Some(p) if !p.calls.is_empty() || p.cut => (p.content, p.calls),
        _ => (text.to_string(), Vec::new()),
    }
}

/// What a format's reader found: the content before the calls, the calls, and whether a
/// last call was cut off and dropped.
struct Found {
    content: String,
    calls: Vec<ParsedCall>,
    cut: bool,
}

impl Found {
    fn whole(content: impl Into<String>, calls: Vec<ParsedCall>) -> Self {
        Self {
            content: content.into(),
            calls,
            cut: false,
        }
    }
}

/// Hermes/Qwen, as llama.cpp's parser reads it: `<tool_call>{…}</tool_call>` blocks, or (when
/// a model leaves the tags out, as real Qwen2.5 checkpoints do in `auto` mode) bare
/// `{"name": …, "arguments": …}` objects, or the same inside a fenced ```json block.
fn parse_hermes(text: &str) -> Option<Found> {
    let Some(first) = text.find(HERMES_OPEN) else {
        return parse_bare(text);
    };
    let content = text[..first].trim_end().to_string();
    let mut rest = &text[first..];
    let mut calls = Vec::new();
    while let Some(body) = rest.trim_start().strip_prefix(HERMES_OPEN) {
        // A last call cut off before (or inside) its closing tag is still read if its JSON
        // is whole.
        let (inner, after, closed) = match body.find(HERMES_CLOSE) {
            Some(end) => (&body[..end], &body[end + HERMES_CLOSE.len()..], true),
            None => {
                let body = body.trim_end();
                let tag = crate::api::reasoning::partial_tag_len(body, HERMES_CLOSE);
                (&body[..body.len() - tag], "", false)
            }
        };
        let parsed = serde_json::from_str::<Value>(inner.trim());
        match parsed.as_ref().ok().and_then(call_from_json) {
            Some(call) => calls.push(call),
            // Cut off inside its JSON (the text ends before the object does): dropped, the
            // calls before it stand. Anything else unclosed is not a call: content.
            None if !closed && parsed.as_ref().err().is_some_and(|e| e.is_eof()) => {
                return Some(Found {
                    content,
                    calls,
                    cut: true,
                })
            }
            None => return None,
        }
        rest = after;
    }
    // Text after the calls that is not another call: not a clean tool-call turn.
    rest.trim()
        .is_empty()
        .then_some(Found::whole(content, calls))
}

/// The opening of a fenced JSON block.
pub const JSON_FENCE: &str = "```json";

/// Calls written as bare JSON objects (`{"name": …, "arguments": …}`, one after another),
/// the whole output, or inside one fenced ```json block. An object is a call only if it has
/// arguments: a JSON answer with a "name" is an answer. A last object cut off is dropped
/// when complete calls come before it; alone, the text stays content (it may be an answer).
fn parse_bare(text: &str) -> Option<Found> {
    let trimmed = text.trim();
    let body = match trimmed.strip_prefix(JSON_FENCE) {
        Some(fenced) => match fenced.trim_end().strip_suffix("```") {
            Some(inner) => inner,
            None => fenced, // cut off before the fence closed
        },
        None => trimmed,
    };
    if !body.trim_start().starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    let mut objects = serde_json::Deserializer::from_str(body).into_iter::<Value>();
    loop {
        match objects.next() {
            None => return Some(Found::whole("", calls)),
            Some(Ok(v)) => {
                let has_args = v.get("arguments").or_else(|| v.get("parameters")).is_some();
                calls.push(has_args.then(|| call_from_json(&v)).flatten()?);
            }
            Some(Err(e)) if e.is_eof() && !calls.is_empty() => {
                return Some(Found {
                    content: String::new(),
                    calls,
                    cut: true,
                })
            }
            Some(Err(_)) => return None,
        }
    }
}

fn parse_llama3(text: &str) -> Option<Found> {
    let (content, body, tagged) = match text.find(PYTHON_TAG) {
        Some(i) => (text[..i].trim_end(), &text[i + PYTHON_TAG.len()..], true),
        None => ("", text, false),
    };
    let body = body.trim();
    if !body.starts_with('{') {
        return None;
    }
    // `;`-separated objects (a `;` inside a string does not split). Without the tag, an
    // object is a call only if it has arguments: a JSON answer with a "name" is an answer.
    let calls = split_top_level(body, ';')
        .into_iter()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let v: Value = serde_json::from_str(part).ok()?;
            let has_args = v.get("parameters").or_else(|| v.get("arguments")).is_some();
            (tagged || has_args).then_some(())?;
            call_from_json(&v)
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Found::whole(content, calls))
}

/// Splits at `sep` outside JSON strings and brackets.
fn split_top_level(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut depth, mut in_str, mut escaped, mut start) =
        (Vec::new(), 0i32, false, false, 0);
    for (i, c) in s.char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_mistral(text: &str) -> Option<Found> {
    let first = text.find(MISTRAL_CALLS)?;
    let content = text[..first].trim_end().to_string();
    let mut calls = Vec::new();
    for segment in text[first..].split(MISTRAL_CALLS).skip(1) {
        let segment = segment.trim();
        if segment.starts_with('[') {
            // The JSON-array form: [{"name": …, "arguments": …}, …].
            let array: Vec<Value> = serde_json::from_str(segment).ok()?;
            for v in &array {
                calls.push(call_from_json(v)?);
            }
        } else {
            // The newer form: name[ARGS]{…}.
            let (name, args) = segment.split_once(MISTRAL_ARGS)?;
            let args: Value = serde_json::from_str(args.trim()).ok()?;
            calls.push(ParsedCall {
                name: valid_name(name.trim())?,
                arguments: args.to_string(),
            });
        }
    }
    Some(Found::whole(content, calls))
}

/// `{"name": …, "arguments" | "parameters": {…} | "…"}` as a call.
fn call_from_json(v: &Value) -> Option<ParsedCall> {
    let name = valid_name(v.get("name")?.as_str()?)?;
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as a JSON string: it must hold a JSON object.
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)?
            .to_string(),
        Some(o @ Value::Object(_)) => o.to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}

fn valid_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    ok.then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_single_parallel_text_before_and_malformed() {
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(
            parse(CallFormat::Hermes, one),
            (
                String::new(),
                vec![call("get_weather", r#"{"city":"Paris"}"#)]
            )
        );
        let two = format!("Let me check.\n{one}\n<tool_call>{{\"name\": \"time\", \"arguments\": {{}}}}</tool_call>\n");
        assert_eq!(
            parse(CallFormat::Hermes, &two),
            (
                "Let me check.".into(),
                vec![
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("time", "{}")
                ]
            )
        );
        for bad in [
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": </tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"f\"}</tool_call> and then some prose",
            "no calls here",
        ] {
            assert_eq!(
                parse(CallFormat::Hermes, bad),
                (bad.to_string(), vec![]),
                "{bad}"
            );
        }
        // Reasoning (already split off) followed by a call: the call is read from the answer.
        assert_eq!(
            parse(
                CallFormat::Hermes,
                "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}"
            ),
            (String::new(), vec![call("f", r#"{"x":1}"#)]),
            "string arguments holding an object, and a last call cut off before its tag"
        );
    }

    #[test]
    fn hermes_bare_and_fenced_calls_as_real_qwen_checkpoints_write_them() {
        // What a Qwen2.5-Coder Instruct GGUF wrote in `auto` mode at temperature 0: no tags.
        let bare = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
        let want = vec![call("get_weather", r#"{"city":"Oslo"}"#)];
        assert_eq!(
            parse(CallFormat::Hermes, bare),
            (String::new(), want.clone())
        );
        assert_eq!(
            parse(CallFormat::Hermes, &format!("\n  {bare}\n")),
            (String::new(), want.clone())
        );
        let fenced = format!("```json\n{bare}\n```");
        assert_eq!(
            parse(CallFormat::Hermes, &fenced),
            (String::new(), want.clone())
        );
        let two = format!("{bare}\n{{\"name\": \"time\", \"arguments\": {{}}}}");
        assert_eq!(parse(CallFormat::Hermes, &two).1.len(), 2);
        // JSON answers are answers: no arguments, prose after, another language's fence.
        for answer in [
            r#"{"name": "Alice", "age": 3}"#,
            r#"{"name": "f", "arguments": {}} and some prose"#,
            "```python\nprint({\"name\": 1})\n```",
            r#"{"name": "f", "argu"#,
        ] {
            assert_eq!(
                parse(CallFormat::Hermes, answer),
                (answer.to_string(), vec![]),
                "{answer}"
            );
        }
    }

    #[test]
    fn a_call_cut_off_by_max_tokens_is_dropped_and_the_whole_ones_kept() {
        let one = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        // The output of a forced call looping until max_tokens: whole calls, then a cut one.
        let looped = format!("{one}\n{one}\n<tool_call>\n{{\"name\": \"f\", \"argu");
        assert_eq!(
            parse(CallFormat::Hermes, &looped),
            (String::new(), vec![call("f", r#"{"a":1}"#); 2])
        );
        // Cut inside the closing tag of the last call: its JSON is whole, so it is a call.
        let in_tag = format!(
            "{one}\n<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"a\": 1}}}}\n</tool_call"
        );
        assert_eq!(
            parse(CallFormat::Hermes, &in_tag),
            (String::new(), vec![call("f", r#"{"a":1}"#); 2])
        );
        // Cut inside the only call: no call, and no markup in the content either.
        assert_eq!(
            parse(
                CallFormat::Hermes,
                "Checking.\n<tool_call>\n{\"name\": \"f\""
            ),
            ("Checking.".to_string(), vec![])
        );
        // Prose that mentions the tag is not a cut call: it stays content, whole.
        let prose = "Qwen writes its calls between <tool_call> tags, like this.";
        assert_eq!(
            parse(CallFormat::Hermes, prose),
            (prose.to_string(), vec![])
        );
        let bare = r#"{"name": "f", "arguments": {"a": 1}}"#;
        assert_eq!(
            parse(
                CallFormat::Hermes,
                &format!("{bare}\n{{\"name\": \"f\", \"ar")
            ),
            (String::new(), vec![call("f", r#"{"a":1}"#)])
        );
    }

    #[test]
    fn llama3_json_with_and_without_the_tag_and_parallel() {
        let one = r#"{"name": "get_weather", "parameters": {"city": "Paris; France"}}"#;
        assert_eq!(
            parse(CallFormat::Llama3Json, one),
            (
                String::new(),
                vec![call("get_weather", r#"{"city":"Paris; France"}"#)]
            )
        );
        let tagged =
            format!("Sure.<|python_tag|>{one}; {{\"name\": \"time\", \"parameters\": {{}}}}");
        assert_eq!(
            parse(CallFormat::Llama3Json, &tagged),
            (
                "Sure.".into(),
                vec![
                    call("get_weather", r#"{"city":"Paris; France"}"#),
                    call("time", "{}")
                ]
            )
        );
        for bad in [
            "The weather is nice.",
            r#"{"name": "f", "parameters": [1]}"#,
            r#"{"name": "f" "#,
            r#"{"name": "Alice", "age": 3}"#,
        ] {
            assert_eq!(
                parse(CallFormat::Llama3Json, bad),
                (bad.to_string(), vec![]),
                "{bad}"
            );
        }
    }

    #[test]
    fn mistral_array_and_args_forms() {
        let array =
            r#"[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]"#;
        assert_eq!(
            parse(CallFormat::Mistral, array),
            (
                String::new(),
                vec![call("a", r#"{"x":1}"#), call("b", "{}")]
            )
        );
        let args = r#"Checking.[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}"#;
        assert_eq!(
            parse(CallFormat::Mistral, args),
            (
                "Checking.".into(),
                vec![call("a", r#"{"x":1}"#), call("b", "{}")]
            )
        );
        for bad in [
            "[TOOL_CALLS][{\"name\": \"a\"",
            "[TOOL_CALLS]a b[ARGS]{}",
            "plain",
        ] {
            assert_eq!(
                parse(CallFormat::Mistral, bad),
                (bad.to_string(), vec![]),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_format_is_read_from_the_template() {
        assert_eq!(
            CallFormat::of_template("{{ '<tool_call>' }}"),
            CallFormat::Hermes
        );
        assert_eq!(
            CallFormat::of_template("<|python_tag|>"),
            CallFormat::Llama3Json
        );
        assert_eq!(CallFormat::of_template("[TOOL_CALLS]"), CallFormat::Mistral);
        assert_eq!(CallFormat::of_template("plain"), CallFormat::Hermes);
    }
}
