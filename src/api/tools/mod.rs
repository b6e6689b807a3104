//! Tool calling. The request's `tools`, `tool_choice` and `parallel_tool_calls` are read and
//! checked here; the tools reach the model's chat template (or, for a template that knows no
//! tools, a system message that describes them in the Hermes format); `required` and a named
//! function become a grammar that forces a valid call whose arguments match the function's
//! `parameters`; and the model's text is read back into `tool_calls` ([`parse`]), whole or
//! streamed ([`CallHolder`]).

pub mod parse;

use serde_json::{json, Value};

use crate::engine::{lark_after_reasoning, OutputFormat};

use super::error::ApiError;
pub use parse::{CallFormat, ParsedCall};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// A JSON Schema for the arguments, always of an object.
    pub parameters: Value,
    /// OpenAI's `strict`: keywords the grammar cannot enforce are refused instead of ignored.
    pub strict: bool,
}

/// Reads a model's text for calls in its format, to the functions offered only: a call to
/// anything else means the text was not a tool call, and it stays content.
#[derive(Debug, Clone)]
pub struct CallReader {
    format: CallFormat,
    names: Vec<String>,
}

impl CallReader {
    pub fn parse(&self, text: &str) -> (String, Vec<ParsedCall>) {
        let (content, calls) = parse::parse(self.format, text);
        if calls.iter().all(|c| self.names.contains(&c.name)) {
            (content, calls)
        } else {
            (text.to_string(), Vec::new())
        }
    }
}

/// What `tool_choice` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools part of a chat request, checked.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    /// The tools as the client sent them, for the template.
    pub raw: Value,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `None` when no tools are offered.
pub fn read(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolRequest>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let param = |field: &str| format!("tools[{i}]{field}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(
                param(".type"),
                "only `function` tools are supported",
            ));
        }
        let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| {
            ApiError::invalid(param(".function"), "a tool needs a `function` object")
        })?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .ok_or_else(|| {
                ApiError::invalid(
                    param(".function.name"),
                    "a function name is 1–64 letters, digits, `_` or `-`",
                )
            })?;
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            // Arguments are always an object, whatever else the schema says.
            Some(p) if p.is_object() && p.get("type").is_none() => {
                let mut p = p.clone();
                p["type"] = json!("object");
                p
            }
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    param(".function.parameters"),
                    "`parameters` must be a JSON Schema object",
                ))
            }
        };
        if out.iter().any(|t: &Tool| t.name == name) {
            return Err(ApiError::invalid(
                param(".function.name"),
                format!("`{name}` is defined twice"),
            ));
        }
        out.push(Tool {
            name: name.to_string(),
            parameters,
            strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    let choice = read_choice(choice, &out)?;
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some(ToolRequest {
        raw: Value::Array(list),
        tools: out,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

fn read_choice(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    const PARAM: &str = "tool_choice";
    let choice = match choice {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    PARAM,
                    format!("`tool_choice` `{other}`: expected none, auto, required or a function"),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        PARAM,
                        "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    PARAM,
                    format!("`tool_choice` names `{name}`, which is not among the tools"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(ApiError::invalid(PARAM, "`tool_choice` needs `tools`"));
    }
    Ok(choice)
}

impl ToolRequest {
    /// Whether the model's text is read for calls (not with `none`).
    pub fn reads_calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// What reads the model's text for calls to these tools, in `format`.
    pub fn reader(&self, format: CallFormat) -> CallReader {
        CallReader {
            format,
            names: self.tools.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// For `required` and a named function: a grammar that admits only calls, in `format`,
    /// whose arguments match the function's schema (several when parallel calls are allowed).
    /// `marker` renders a fixed piece of text as a Lark terminal (a special token when the
    /// tokenizer has it as one).
    /// With `reasoning` (`Some(starts inside)`), the calls come after the model's reasoning.
    pub fn forced_grammar(
        &self,
        format: CallFormat,
        marker: &dyn Fn(&str) -> String,
        reasoning: Option<bool>,
    ) -> Option<OutputFormat> {
        let tools: Vec<&Tool> = match &self.choice {
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            ToolChoice::None | ToolChoice::Auto => return None,
        };
        let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let args = |t: &Tool| {
            let mut schema = t.parameters.clone();
            if let Some(o) = schema.as_object_mut() {
                o.insert(
                    "x-guidance".into(),
                    json!({"whitespace_flexible": false, "lenient": !t.strict}),
                );
            }
            format!("%json {schema}")
        };
        let calls: Vec<String> = tools
            .iter()
            .map(|t| match format {
                CallFormat::Hermes => format!(
                    "{} {} {} {} {}",
                    marker(parse::HERMES_OPEN),
                    lit(&format!("\n{{\"name\": \"{}\", \"arguments\": ", t.name)),
                    args(t),
                    lit("}\n"),
                    marker(parse::HERMES_CLOSE)
                ),
                CallFormat::Llama3Json => format!(
                    "{} {} {}",
                    lit(&format!("{{\"name\": \"{}\", \"parameters\": ", t.name)),
                    args(t),
                    lit("}")
                ),
                CallFormat::Mistral => format!(
                    "{} {} {}",
                    lit(&format!("{{\"name\": \"{}\", \"arguments\": ", t.name)),
                    args(t),
                    lit("}")
                ),
            })
            .collect();
        let (sep, open, close) = match format {
            CallFormat::Hermes => (lit("\n"), String::new(), String::new()),
            CallFormat::Llama3Json => (lit("; "), String::new(), String::new()),
            CallFormat::Mistral => (
                lit(", "),
                format!("{} {}", marker(parse::MISTRAL_CALLS), lit("[")),
                lit("]"),
            ),
        };
        // A named function is called exactly once, and then the turn ends (only the model's
        // end-of-generation tokens are allowed after it): a model that would go on calling
        // it again cannot. With `required`, parallel calls may follow one another, and the
        // separator may also end the turn, so that a model that writes it after its last call
        // is not forced into one more (Hermes, whose separator is a line break).
        let more = match (&self.choice, self.parallel, format) {
            (ToolChoice::Required, true, CallFormat::Hermes) => format!("({sep} call)* {sep}?"),
            (ToolChoice::Required, true, _) => format!("({sep} call)*"),
            _ => String::new(),
        };
        let answer = format!("{open} call {more} {close}");
        let top = match reasoning {
            Some(inside) => lark_after_reasoning(inside, &answer),
            None => format!("start: {answer}\n"),
        };
        Some(OutputFormat::Lark(format!(
            "{top}call: {}\n",
            calls.join(" | ")
        )))
    }

    /// A system message describing the tools in the Hermes format, for a chat template that
    /// does not render tools itself.
    pub fn system_prompt(&self) -> String {
        let listed: Vec<String> = self
            .raw
            .as_array()
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect();
        format!(
            "You may call functions to answer. The functions, as JSON Schema:\n<tools>\n{}\n</tools>\n\
             To call one, reply with a JSON object holding its name and arguments inside tags:\n\
             <tool_call>\n{{\"name\": \"<function-name>\", \"arguments\": <args-json-object>}}\n</tool_call>",
            listed.join("\n")
        )
    }
}

/// A choice's `finish_reason`: `tool_calls` when it made calls and ended by itself;
/// `length` whenever `max_tokens` cut it, calls or not (the complete calls are still sent,
/// a cut one is dropped), so a client can tell that the turn may be missing a call.
pub fn finish_reason(reason: crate::engine::FinishReason, made_calls: bool) -> &'static str {
    match reason {
        crate::engine::FinishReason::Length => reason.as_str(),
        _ if made_calls => "tool_calls",
        _ => reason.as_str(),
    }
}

/// A tool call as it is sent: its id, and the call.
pub fn call_id() -> String {
    super::generation::item_id("call")
}

/// Holds back a choice's streamed text once it may be a tool call, so that a call reaches the
/// client whole (its id and name first, then arguments that are valid JSON), and text that
/// turns out not to be one is still sent, as content, at the end.
#[derive(Debug, Clone)]
pub struct CallHolder {
    reader: CallReader,
    /// Everything held from the first possible call on.
    held: String,
    holding: bool,
    /// Nothing but whitespace sent yet: a Llama 3 or Hermes call may start with a bare `{`
    /// (or, Hermes, a ```json fence).
    at_start: bool,
}

impl CallHolder {
    pub fn new(reader: CallReader) -> Self {
        Self {
            reader,
            held: String::new(),
            holding: false,
            at_start: true,
        }
    }

    /// The part of `text` that can be sent as content now.
    pub fn push(&mut self, text: &str) -> String {
        if self.holding {
            self.held.push_str(text);
            return String::new();
        }
        self.held.push_str(text);
        let marker = self.reader.format.marker();
        if let Some(i) = self.held.find(marker) {
            self.holding = true;
            let sent = self.held[..i].to_string();
            self.held.drain(..i);
            return sent;
        }
        if self.at_start {
            match self.reader.format.bare_start(self.held.trim_start()) {
                Some(true) => {
                    self.holding = true;
                    return String::new();
                }
                None => return String::new(), // too little to tell yet
                Some(false) => {}
            }
        }
        self.at_start = false;
        // Keep back what could be the start of the marker.
        let cut = self.held.len() - super::reasoning::partial_tag_len(&self.held, marker);
        let sent = self.held[..cut].to_string();
        self.held.drain(..cut);
        sent
    }

    /// At the end: the calls found in what was held, and the text to send as content (all
    /// of it when no call parses).
    pub fn finish(&mut self) -> (String, Vec<ParsedCall>) {
        let held = std::mem::take(&mut self.held);
        if !self.holding {
            return (held, Vec::new());
        }
        self.reader.parse(&held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn tools_and_choices_are_read_and_bad_ones_name_their_field() {
        let r = read(Some(&tools()), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        assert_eq!((r.choice.clone(), r.parallel), (ToolChoice::Required, true));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(
            read(Some(&tools()), Some(&named), Some(false))
                .unwrap()
                .unwrap()
                .choice,
            ToolChoice::Named("get_weather".into())
        );
        assert!(read(None, None, None).unwrap().is_none());
        for (tools, choice, param) in [
            (json!([{"type": "code"}]), json!("auto"), "tools[0].type"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto"),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                json!("auto"),
                "tools[0].function.parameters",
            ),
            (tools(), json!("sometimes"), "tool_choice"),
            (
                tools(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let e = read(Some(&tools), Some(&choice), None)
                .err()
                .expect("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{tools} {choice}");
        }
    }

    #[test]
    fn a_held_stream_gives_the_same_calls_and_content_as_the_whole() {
        for (format, text) in [
            (CallFormat::Hermes, "Let me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"),
            (CallFormat::Hermes, "No call, just <tool text and < signs."),
            (CallFormat::Hermes, "<tool_call>{\"name\": broken</tool_call>"),
            (CallFormat::Llama3Json, "{\"name\": \"f\", \"parameters\": {}}"),
            (CallFormat::Llama3Json, "  plain answer {with braces}"),
            (CallFormat::Hermes, "{\"name\": \"f\", \"arguments\": {\"a\": 1}}"),
            (CallFormat::Hermes, "```json\n{\"name\": \"f\", \"arguments\": {}}\n```"),
            (CallFormat::Hermes, "```python\nprint(1)\n```"),
            (CallFormat::Hermes, "{\"name\": \"Alice\"} is a JSON answer"),
            (CallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n<tool_call>{\"na"),
            (CallFormat::Mistral, "ok[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]"),
        ] {
            let reader = CallReader {
                format,
                names: vec!["f".into()],
            };
            let whole = reader.parse(text);
            for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let mut h = CallHolder::new(reader.clone());
                let mut content = h.push(&text[..cut]);
                content += &h.push(&text[cut..]);
                let (rest, calls) = h.finish();
                content += &rest;
                assert_eq!((content.trim_end().to_string(), calls), (whole.0.trim_end().to_string(), whole.1.clone()), "{text:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_call_to_a_function_not_offered_is_content() {
        let reader = CallReader {
            format: CallFormat::Hermes,
            names: vec!["get_weather".into()],
        };
        let text = "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>";
        assert_eq!(reader.parse(text), (text.to_string(), vec![]));
    }

    #[test]
    fn reasoning_followed_by_a_call_is_read_from_the_answer() {
        let text = "<think>Not <tool_call>{\"name\": \"time\"}</tool_call>; get_weather.</think>\n\
                    <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
        let (reasoning, answer) =
            super::super::reasoning::ReasoningSplitter::split_all(false, text);
        assert!(reasoning.contains("get_weather"));
        let (content, calls) = parse::parse(CallFormat::Hermes, &answer);
        assert_eq!(content, "");
        assert_eq!(
            calls.len(),
            1,
            "the call in the reasoning is not a call; the one after is"
        );
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
    }
}
