//! An Anthropic Messages request read into the internal chat request, which the chat
//! validation then checks like any other: `system` and the messages' content blocks become
//! chat messages (`tool_use` an assistant's calls, `tool_result` a tool message), the tools
//! and `tool_choice` their OpenAI equivalents, `thinking` the template's switch.

use serde_json::{json, Value};

use super::super::body_fields::{chat_tools, opt_bool, opt_f32, opt_int, opt_str, thinking};
use super::super::error::ApiError;
use super::super::wire::{ChatFields, ChatRequest, CommonParams, OneOrMany, WireMessage};

/// The text of a string or of a list of `text` blocks (`system`, a `tool_result`'s content);
/// anything but text is refused, naming where it was.
fn text_of(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => {
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        out.push_str(t);
                    }
                    (Some("text"), _) => {
                        return Err(ApiError::invalid(
                            format!("{at}[{j}].text"),
                            "a text block needs `text`",
                        ))
                    }
                    (kind, _) => return Err(unsupported_block(&format!("{at}[{j}].type"), kind)),
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            at,
            format!("`{at}` must be a string or a list of text blocks"),
        )),
    }
}

fn unsupported_block(at: &str, kind: Option<&str>) -> ApiError {
    match kind {
        Some(k @ ("image" | "document")) => ApiError::invalid(
            at,
            format!("`{k}` content is not supported: this model reads text only"),
        ),
        Some(k) => ApiError::invalid(
            at,
            format!("content block type `{k}` is not supported here"),
        ),
        None => ApiError::invalid(at, "a content block needs a `type`"),
    }
}

/// One Anthropic message as chat messages: a user message's `tool_result` blocks become tool
/// messages (before its text), an assistant's `tool_use` blocks its calls. Thinking blocks
/// sent back are dropped, as the chat templates drop earlier reasoning.
fn read_message(i: usize, m: &Value, out: &mut Vec<WireMessage>) -> Result<(), ApiError> {
    let at = format!("messages[{i}]");
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        Some(r) => {
            return Err(ApiError::invalid(
                format!("{at}.role"),
                format!("unknown role `{r}`; expected `user` or `assistant` (the system prompt goes in `system`)"),
            ))
        }
        None => return Err(ApiError::invalid(format!("{at}.role"), "a message needs a `role`")),
    };
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(WireMessage::text(role, s.clone()));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(ApiError::invalid(
                format!("{at}.content"),
                "`content` must be a string or a list of content blocks",
            ))
        }
    };
    let (mut text, mut calls) = (String::new(), Vec::new());
    for (j, b) in blocks.iter().enumerate() {
        let here = format!("{at}.content[{j}]");
        match (role, b.get("type").and_then(Value::as_str)) {
            (_, Some("text")) => {
                // Several text blocks are several paragraphs (Claude Code sends them so).
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&text_of(&json!([b]), &format!("{at}.content"))?)
            }
            (_, Some("thinking" | "redacted_thinking")) => {}
            ("assistant", Some("tool_use")) => {
                let name = b.get("name").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(format!("{here}.name"), "a `tool_use` block needs `name`")
                })?;
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": b.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
            ("user", Some("tool_result")) => {
                let id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("{here}.tool_use_id"),
                            "a `tool_result` block needs `tool_use_id`",
                        )
                    })?;
                let mut content = text_of(
                    b.get("content").unwrap_or(&Value::Null),
                    &format!("{here}.content"),
                )?;
                if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    content = format!("Error: {content}");
                }
                out.push(WireMessage {
                    tool_call_id: Some(id.to_string()),
                    ..WireMessage::text("tool", content)
                });
            }
            (_, kind) => return Err(unsupported_block(&format!("{here}.type"), kind)),
        }
    }
    if !text.is_empty() || !calls.is_empty() {
        out.push(WireMessage {
            tool_calls: (!calls.is_empty()).then_some(calls),
            ..WireMessage::text(role, text)
        });
    }
    Ok(())
}

/// Anthropic's tools as OpenAI function tools; Anthropic's server tools are refused.
fn read_tools(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let custom = |i: usize, t: &Value| {
        match t.get("type").and_then(Value::as_str) {
        None | Some("custom") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            format!("tools[{i}].type"),
            format!("tool type `{other}` is a server tool this server does not run; only custom tools (`name`, `input_schema`) are supported"),
        )),
    }
    };
    let fields = [
        ("name", "name"),
        ("input_schema", "parameters"),
        ("description", "description"),
        ("strict", "strict"),
    ];
    chat_tools(v, custom, &fields)
}

/// `tool_choice` as OpenAI's, and whether several calls are allowed.
fn read_tool_choice(v: Option<&Value>) -> Result<(Option<Value>, Option<bool>), ApiError> {
    let Some(c) = v.filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let parallel = c
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|d| !d);
    let choice = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = c.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice.name",
                    "`tool_choice` of type `tool` needs `name`",
                )
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice.type",
                "`tool_choice.type` must be `auto`, `any`, `tool` or `none`",
            ))
        }
    };
    Ok((Some(choice), parallel))
}

/// The chat request a Messages body asks for. `count_only`: a `count_tokens` body, which has
/// no `max_tokens`.
pub fn to_chat(v: &Value, count_only: bool) -> Result<ChatRequest, ApiError> {
    let max_tokens = opt_int(v, "max_tokens")?;
    if max_tokens.is_none() && !count_only {
        return Err(ApiError::invalid("max_tokens", "`max_tokens` is required"));
    }
    let mut messages = Vec::new();
    let system = text_of(v.get("system").unwrap_or(&Value::Null), "system")?;
    if !system.is_empty() {
        messages.push(WireMessage::text("system", system));
    }
    let list = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a list of messages"))?;
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    for (i, m) in list.iter().enumerate() {
        read_message(i, m, &mut messages)?;
    }
    if list.last().and_then(|m| m.get("role")) == Some(&json!("assistant")) {
        return Err(ApiError::invalid(
            format!("messages[{}].role", list.len() - 1),
            "a last assistant message (a prefill to continue) is not supported: end with a user message",
        ));
    }
    let stop = match v.get("stop_sequences") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(OneOrMany::Many(
            a.iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::invalid(
                        "stop_sequences",
                        "`stop_sequences` must be a list of strings",
                    )
                })?,
        )),
        Some(_) => {
            return Err(ApiError::invalid(
                "stop_sequences",
                "`stop_sequences` must be a list of strings",
            ))
        }
    };
    let (tool_choice, parallel_tool_calls) = read_tool_choice(v.get("tool_choice"))?;
    // `budget_tokens` is not a budget here: `max_tokens` bounds the reasoning with the answer.
    let thinking_on = match v
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        Some("enabled" | "adaptive") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    };
    // Structured output: `output_config.format` is a JSON Schema.
    let response_format = match v.get("output_config").and_then(|o| o.get("format")) {
        Some(f) if f.get("type").and_then(Value::as_str) == Some("json_schema") => Some(json!({
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": f.get("schema").cloned().unwrap_or(json!({})), "strict": true},
        })),
        Some(f) if !f.is_null() => {
            return Err(ApiError::invalid(
                "output_config.format.type",
                "only `json_schema` output formats are supported",
            ))
        }
        _ => None,
    };
    Ok(ChatRequest {
        common: CommonParams {
            model: opt_str(v, "model")?.map(str::to_string),
            max_tokens,
            temperature: opt_f32(v, "temperature")?,
            top_p: opt_f32(v, "top_p")?,
            top_k: opt_int(v, "top_k")?,
            stop,
            stream: opt_bool(v, "stream")?,
            ..CommonParams::default()
        },
        chat: ChatFields {
            tools: read_tools(v.get("tools"))?,
            tool_choice,
            parallel_tool_calls,
            response_format,
            chat_template_kwargs: thinking(thinking_on),
            ..ChatFields::of(messages)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::MessageContent;

    fn roles(c: &ChatRequest) -> Vec<&str> {
        c.chat.messages.iter().map(|m| m.role.as_str()).collect()
    }

    #[test]
    fn a_tool_round_trip_reads_as_a_chat_with_calls_and_a_tool_message() {
        let c = to_chat(
            &json!({
                "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "hm", "signature": ""},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                        {"type": "text", "text": "And tomorrow?"}]},
                ],
                "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "stop_sequences": ["END"], "top_k": 5,
            }),
            false,
        )
        .unwrap();
        assert_eq!(roles(&c), ["system", "user", "assistant", "tool", "user"]);
        let assistant = &c.chat.messages[2];
        let call = &assistant.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert!(matches!(&assistant.content, Some(MessageContent::Text(t)) if t == "Checking."));
        assert_eq!(c.chat.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(c.chat.tool_choice, Some(json!("required")));
        assert_eq!(c.chat.parallel_tool_calls, Some(false));
        assert_eq!(
            c.chat.tools.as_ref().unwrap()[0]["function"]["name"],
            "get_weather"
        );
        assert_eq!((c.common.max_tokens, c.common.top_k), (Some(64), Some(5)));
    }

    #[test]
    fn images_server_tools_and_a_missing_max_tokens_are_refused_by_name() {
        let base = |m: Value| json!({"model": "m", "max_tokens": 8, "messages": [m]});
        let image = base(json!({"role": "user", "content": [{"type": "image", "source": {}}]}));
        let e = to_chat(&image, false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        assert!(e.message.contains("text only"), "{}", e.message);
        let mut server_tool = base(json!({"role": "user", "content": "hi"}));
        server_tool["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
        assert_eq!(
            to_chat(&server_tool, false).unwrap_err().param.as_deref(),
            Some("tools[0].type")
        );
        let no_max = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(
            to_chat(&no_max, false).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
        assert!(
            to_chat(&no_max, true).is_ok(),
            "count_tokens has no max_tokens"
        );
        let prefill = json!({"model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": "JSON please"}, {"role": "assistant", "content": "{"}]});
        assert_eq!(
            to_chat(&prefill, false).unwrap_err().param.as_deref(),
            Some("messages[1].role")
        );
        let system_role = base(json!({"role": "system", "content": "x"}));
        assert_eq!(
            to_chat(&system_role, false).unwrap_err().param.as_deref(),
            Some("messages[0].role")
        );
    }
}
