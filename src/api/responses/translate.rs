//! A Responses API request read into the internal chat request: `instructions` and the input
//! items (messages, `function_call`, `function_call_output`), after the stored conversation of
//! `previous_response_id`, become chat messages; flat function tools, `tool_choice`,
//! `text.format` and `reasoning` their chat equivalents. The chat validation then checks it
//! like any other chat request.

use serde_json::{json, Value};

use super::super::body_fields::{chat_tools, opt_bool, opt_f32, opt_int, opt_str, thinking};
use super::super::error::ApiError;
use super::super::wire::{ChatFields, ChatRequest, CommonParams, WireMessage, WireServiceTier};

pub use super::super::generation::item_id;

fn text_parts(content: &Value, at: &str, part_type: &str) -> Result<Value, ApiError> {
    Ok(match content {
        Value::String(s) => json!([{"type": part_type, "text": s}]),
        Value::Array(parts) => {
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text" | "refusal") => {}
                    Some(k @ ("input_image" | "input_file" | "input_audio")) => {
                        return Err(ApiError::invalid(
                            format!("{at}[{j}].type"),
                            format!("`{k}` content is not supported: this model reads text only"),
                        ))
                    }
                    Some(k) => {
                        return Err(ApiError::invalid(
                            format!("{at}[{j}].type"),
                            format!("content part type `{k}` is not supported"),
                        ))
                    }
                    None => {
                        return Err(ApiError::invalid(
                            format!("{at}[{j}].type"),
                            "a content part needs a `type`",
                        ))
                    }
                }
            }
            content.clone()
        }
        _ => {
            return Err(ApiError::invalid(
                at,
                "`content` must be a string or a list of parts",
            ))
        }
    })
}

/// This turn's input as stored items, each with an `id`, a `type` and a `status` (what
/// `input_items` lists): a string is one user message; message content becomes parts.
pub fn read_input(v: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match v.get("input") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(a)) => a.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a string or a list of items",
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("input[{i}]");
        let Value::Object(mut item) = item else {
            return Err(ApiError::invalid(at, "an input item must be an object"));
        };
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(k) => k.to_string(),
            None if item.contains_key("role") => "message".to_string(),
            None => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    "an input item needs a `type`",
                ))
            }
        };
        let prefix = match kind.as_str() {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                if !["user", "system", "developer", "assistant"].contains(&role) {
                    return Err(ApiError::invalid(
                        format!("{at}.role"),
                        format!("unknown role `{role}`; expected user, system, developer or assistant"),
                    ));
                }
                let part = if role == "assistant" { "output_text" } else { "input_text" };
                let content = text_parts(item.get("content").unwrap_or(&Value::Null), &format!("{at}.content"), part)?;
                item.insert("content".into(), content);
                "msg"
            }
            "function_call" => {
                for field in ["call_id", "name", "arguments"] {
                    if !item.get(field).is_some_and(Value::is_string) {
                        return Err(ApiError::invalid(format!("{at}.{field}"), format!("a `function_call` item needs `{field}` (a string)")));
                    }
                }
                "fc"
            }
            "function_call_output" => {
                if !item.get("call_id").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid(format!("{at}.call_id"), "a `function_call_output` item needs `call_id`"));
                }
                let output = item.get("output").unwrap_or(&Value::Null);
                if !output.is_string() {
                    text_parts(output, &format!("{at}.output"), "input_text")?;
                }
                "fco"
            }
            "reasoning" => "rs",
            "item_reference" => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    "`item_reference` is not supported: send the items, or `previous_response_id`",
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("input item type `{other}` is not supported (messages, `function_call`, `function_call_output` and `reasoning` are)"),
                ))
            }
        };
        item.insert("type".into(), json!(kind));
        if !item.get("id").is_some_and(Value::is_string) {
            item.insert("id".into(), json!(item_id(prefix)));
        }
        item.entry("status").or_insert(json!("completed"));
        out.push(Value::Object(item));
    }
    Ok(out)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| {
                p.get("text")
                    .or_else(|| p.get("refusal"))
                    .and_then(Value::as_str)
            })
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Stored or sent items as chat messages: consecutive calls are one assistant message's.
pub fn to_messages(items: &[Value], out: &mut Vec<WireMessage>) {
    for item in items {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                let role = item["role"].as_str().unwrap_or("user");
                out.push(WireMessage::text(role, text_of(&item["content"])));
            }
            Some("function_call") => {
                let call = json!({
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                });
                match out.last_mut() {
                    // A call after the assistant's text, or after another call: the same turn.
                    Some(m) if m.role == "assistant" => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call)
                    }
                    _ => out.push(WireMessage {
                        tool_calls: Some(vec![call]),
                        ..WireMessage::text("assistant", String::new())
                    }),
                }
            }
            Some("function_call_output") => out.push(WireMessage {
                tool_call_id: item["call_id"].as_str().map(str::to_string),
                ..WireMessage::text("tool", text_of(&item["output"]))
            }),
            // Earlier reasoning is not shown to the model again, as chat templates drop it.
            _ => {}
        }
    }
}

/// Flat function tools as chat tools; other tool types are refused.
fn read_tools(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let function = |i: usize, t: &Value| {
        match t.get("type").and_then(Value::as_str) {
        Some("function") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            format!("tools[{i}].type"),
            format!("tool type `{other}` is a hosted tool this server does not run; only `function` tools are supported"),
        )),
        None => Err(ApiError::invalid(format!("tools[{i}].type"), "a tool needs a `type`")),
    }
    };
    let fields = [
        ("name", "name"),
        ("description", "description"),
        ("parameters", "parameters"),
        ("strict", "strict"),
    ];
    chat_tools(v, function, &fields)
}

fn read_tool_choice(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    Ok(match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if ["auto", "none", "required"].contains(&s.as_str()) => Some(json!(s)),
        Some(c) if c.get("type").and_then(Value::as_str) == Some("function") => {
            let name = c.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid("tool_choice.name", "a `function` tool choice needs `name`")
            })?;
            Some(json!({"type": "function", "function": {"name": name}}))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` must be `auto`, `none`, `required` or {\"type\": \"function\", \"name\": …}",
            ))
        }
    })
}

/// `text.format` as a chat `response_format`.
fn read_format(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(f) = v.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => Ok(Some(json!({"type": "json_schema", "json_schema": {
            "name": f.get("name").cloned().unwrap_or(json!("output")),
            "schema": f.get("schema").cloned().unwrap_or(Value::Null),
            "strict": f.get("strict").cloned().unwrap_or(Value::Null),
        }}))),
        _ => Err(ApiError::invalid(
            "text.format.type",
            "`text.format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// The chat request a Responses body asks for: `history` (the stored conversation) and
/// `input` (this turn's items, from [`read_input`]) after the instructions.
pub fn to_chat(v: &Value, history: &[Value], input: &[Value]) -> Result<ChatRequest, ApiError> {
    for unsupported in ["conversation", "prompt"] {
        if v.get(unsupported).is_some_and(|x| !x.is_null()) {
            return Err(ApiError::invalid(
                unsupported,
                format!("`{unsupported}` is not supported by this server"),
            ));
        }
    }
    let mut messages = Vec::new();
    match v.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => messages.push(WireMessage::text("system", s.clone())),
        Some(_) => {
            return Err(ApiError::invalid(
                "instructions",
                "`instructions` must be a string",
            ))
        }
    }
    to_messages(history, &mut messages);
    to_messages(input, &mut messages);
    if !messages.iter().any(|m| m.role != "system") {
        return Err(ApiError::invalid(
            "input",
            "`input` is required (or `previous_response_id` with a stored conversation)",
        ));
    }
    let max_tokens = opt_int(v, "max_output_tokens")?;
    let service_tier = match v.get("service_tier") {
        None | Some(Value::Null) => None,
        Some(t) => Some(
            serde_json::from_value::<WireServiceTier>(t.clone()).map_err(|_| {
                ApiError::invalid(
                    "service_tier",
                    "`service_tier` must be `auto`, `default`, `flex`, `scale` or `priority`",
                )
            })?,
        ),
    };
    let reasoning = v
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str);
    let bool_of = |field: &str| opt_bool(v, field);
    Ok(ChatRequest {
        common: CommonParams {
            model: opt_str(v, "model")?.map(str::to_string),
            max_tokens,
            temperature: opt_f32(v, "temperature")?,
            top_p: opt_f32(v, "top_p")?,
            stream: bool_of("stream")?,
            // vLLM's extension, for benchmarks (and tests) that need a known length.
            ignore_eos: bool_of("ignore_eos")?,
            service_tier,
            ..CommonParams::default()
        },
        chat: ChatFields {
            tools: read_tools(v.get("tools"))?,
            tool_choice: read_tool_choice(v.get("tool_choice"))?,
            parallel_tool_calls: bool_of("parallel_tool_calls")?,
            response_format: read_format(v.get("text"))?,
            chat_template_kwargs: thinking(reasoning.map(|effort| effort != "none")),
            ..ChatFields::of(messages)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::MessageContent;

    #[test]
    fn a_function_round_trip_reads_as_calls_then_a_tool_message() {
        let body = json!({
            "model": "m", "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}},
            "max_output_tokens": 32, "service_tier": "flex",
        });
        let input = read_input(&body).unwrap();
        assert!(input
            .iter()
            .all(|i| i["id"].is_string() && i["type"].is_string()));
        assert_eq!(
            input[0]["content"],
            json!([{"type": "input_text", "text": "Weather in Paris?"}])
        );
        let chat = to_chat(&body, &[], &input).unwrap();
        let roles: Vec<&str> = chat.chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(
            chat.chat.messages[2].tool_calls.as_ref().unwrap().len(),
            2,
            "consecutive calls are one turn"
        );
        assert_eq!(
            chat.chat.messages[3].tool_call_id.as_deref(),
            Some("call_1")
        );
        assert_eq!(chat.chat.tools.unwrap()[0]["function"]["strict"], true);
        assert_eq!(
            chat.chat.tool_choice,
            Some(json!({"type": "function", "function": {"name": "get_weather"}}))
        );
        assert_eq!(
            chat.chat.response_format.unwrap()["json_schema"]["name"],
            "x"
        );
        assert_eq!(chat.common.max_tokens, Some(32));
        assert_eq!(chat.common.service_tier, Some(WireServiceTier::Flex));
    }

    #[test]
    fn history_comes_before_this_turn_and_bad_items_are_refused_by_name() {
        let history = read_input(&json!({"input": "first"})).unwrap();
        let mut out = history.clone();
        out.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "one", "annotations": []}]}));
        let body = json!({"input": "second"});
        let chat = to_chat(&body, &out, &read_input(&body).unwrap()).unwrap();
        let texts: Vec<String> = chat
            .chat
            .messages
            .iter()
            .map(|m| match &m.content {
                Some(MessageContent::Text(t)) => t.clone(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(texts, ["first", "one", "second"]);
        let image = json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]});
        let e = read_input(&image).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].content[0].type"));
        let hosted = json!({"input": "x", "tools": [{"type": "web_search"}]});
        assert_eq!(
            to_chat(&hosted, &[], &read_input(&hosted).unwrap())
                .unwrap_err()
                .param
                .as_deref(),
            Some("tools[0].type")
        );
        assert_eq!(
            to_chat(&json!({}), &[], &[]).unwrap_err().param.as_deref(),
            Some("input")
        );
        let call = json!({"input": [{"type": "function_call", "name": "f"}]});
        assert_eq!(
            read_input(&call).unwrap_err().param.as_deref(),
            Some("input[0].call_id")
        );
    }
}
