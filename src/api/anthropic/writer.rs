//! One choice's output as an Anthropic `Message` and its stream: `message_start`, each content
//! block (`thinking`, `text`, `tool_use`) as start, deltas and stop, in order, then
//! `message_delta` (the stop reason, the usage) and `message_stop`. Sans-IO: the same writer
//! makes the whole message.

use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::engine::FinishReason;

use super::super::error::ApiError;
use super::super::generation::{item_id, End, EventWriter, NamedEvent};

/// A content block of the answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text {
        text: String,
    },
    Thinking {
        thinking: String,
        /// Always empty: this server's reasoning is not signed.
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[schema(value_type = Object)]
        input: Value,
    },
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct MessageUsage {
    /// Prompt tokens the prefix cache did not hold.
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub cache_creation_input_tokens: usize,
    /// Prompt tokens the prefix cache held.
    pub cache_read_input_tokens: usize,
}

/// Anthropic's `Message`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Message {
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `assistant`.
    pub role: &'static str,
    pub content: Vec<ContentBlock>,
    pub model: String,
    /// `end_turn`, `max_tokens`, `stop_sequence` or `tool_use`; null while streaming.
    pub stop_reason: Option<&'static str>,
    #[schema(value_type = Option<String>)]
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

/// Writes one generation as a Message.
pub struct MessageWriter {
    message: Message,
    /// The block being streamed, when one is open.
    open: Option<usize>,
}

impl MessageWriter {
    pub fn new(model: String, prompt_tokens: usize) -> Self {
        Self {
            message: Message {
                id: item_id("msg"),
                kind: "message",
                role: "assistant",
                content: Vec::new(),
                model,
                stop_reason: None,
                stop_sequence: None,
                usage: MessageUsage {
                    input_tokens: prompt_tokens,
                    output_tokens: 0,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 0,
                },
            },
            open: None,
        }
    }

    pub fn message(self) -> Message {
        self.message
    }

    fn close(&mut self, events: &mut Vec<NamedEvent>) {
        if let Some(index) = self.open.take() {
            events.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }
}

/// Anthropic's name for why a generation ended.
pub fn stop_reason(reason: FinishReason, made_calls: bool, stop: Option<&str>) -> &'static str {
    match reason {
        FinishReason::Length => "max_tokens",
        FinishReason::Stop if made_calls => "tool_use",
        FinishReason::Stop if stop.is_some() => "stop_sequence",
        FinishReason::Stop => "end_turn",
    }
}

impl EventWriter for MessageWriter {
    fn start(&mut self) -> Vec<NamedEvent> {
        vec![
            (
                "message_start",
                json!({"type": "message_start", "message": self.message}),
            ),
            // As Anthropic's own streams do.
            ("ping", json!({"type": "ping"})),
        ]
    }

    /// Appends `piece` to the open block of its kind, opening one (and closing another) when
    /// needed.
    fn append(&mut self, thinking: bool, piece: &str, events: &mut Vec<NamedEvent>) {
        let same = self
            .open
            .and_then(|i| self.message.content.get(i))
            .is_some_and(|b| {
                matches!(
                    (b, thinking),
                    (ContentBlock::Thinking { .. }, true) | (ContentBlock::Text { .. }, false)
                )
            });
        if !same {
            self.close(events);
            let block = match thinking {
                true => ContentBlock::Thinking {
                    thinking: String::new(),
                    signature: String::new(),
                },
                false => ContentBlock::Text {
                    text: String::new(),
                },
            };
            let index = self.message.content.len();
            events.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": block}),
            ));
            self.message.content.push(block);
            self.open = Some(index);
        }
        let index = self.message.content.len() - 1;
        let delta = match self.message.content.last_mut() {
            Some(ContentBlock::Thinking { thinking, .. }) => {
                thinking.push_str(piece);
                json!({"type": "thinking_delta", "thinking": piece})
            }
            Some(ContentBlock::Text { text }) => {
                text.push_str(piece);
                json!({"type": "text_delta", "text": piece})
            }
            _ => return,
        };
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }

    fn end(&mut self, end: &End, events: &mut Vec<NamedEvent>) {
        let End {
            calls,
            reason,
            stop,
            usage,
        } = end;
        self.close(events);
        for call in calls {
            let index = self.message.content.len();
            let id = item_id("toolu");
            let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
            let start = ContentBlock::ToolUse {
                id: id.clone(),
                name: call.name.clone(),
                input: json!({}),
            };
            events.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": start}),
            ));
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
            ));
            events.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
            self.message.content.push(ContentBlock::ToolUse {
                id,
                name: call.name.clone(),
                input,
            });
        }
        let cached = usage.prompt_tokens_details.cached_tokens;
        self.message.stop_reason = Some(stop_reason(*reason, !calls.is_empty(), stop.as_deref()));
        self.message.stop_sequence = stop.clone().filter(|_| calls.is_empty());
        self.message.usage = MessageUsage {
            input_tokens: usage.prompt_tokens - cached.min(usage.prompt_tokens),
            output_tokens: usage.completion_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cached,
        };
        events.push(("message_delta", json!({"type": "message_delta",
            "delta": {"stop_reason": self.message.stop_reason, "stop_sequence": self.message.stop_sequence},
            "usage": self.message.usage})));
        events.push(("message_stop", json!({"type": "message_stop"})));
    }

    fn failed(&mut self, e: &ApiError) -> Vec<NamedEvent> {
        vec![("error", super::error_event(e))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::generation::Output;
    use crate::api::tools::ParsedCall;
    use crate::api::wire::Usage;

    fn names(events: &[NamedEvent]) -> Vec<&str> {
        events.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn blocks_open_in_order_and_the_message_matches_the_stream() {
        let mut w = MessageWriter::new("m".into(), 10);
        let mut events = w.start();
        for out in [
            Output::Reasoning("Let me ".into()),
            Output::Reasoning("think.".into()),
            Output::Text("Calling.".into()),
            Output::Done(End {
                calls: vec![ParsedCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                reason: FinishReason::Stop,
                stop: None,
                usage: Usage::new(10, 7, 4),
            }),
        ] {
            events.extend(w.on(&out));
        }
        assert_eq!(
            names(&events),
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let indexes: Vec<i64> = events
            .iter()
            .filter(|(n, _)| *n == "content_block_start")
            .map(|(_, e)| e["index"].as_i64().unwrap())
            .collect();
        assert_eq!(indexes, [0, 1, 2]);
        assert_eq!(events[12].1["delta"]["stop_reason"], "tool_use");
        let m = serde_json::to_value(w.message()).unwrap();
        assert_eq!(
            m["content"][0],
            json!({"type": "thinking", "thinking": "Let me think.", "signature": ""})
        );
        assert_eq!(m["content"][1], json!({"type": "text", "text": "Calling."}));
        assert_eq!(m["content"][2]["input"], json!({"city": "Paris"}));
        assert_eq!(m["usage"]["input_tokens"], 6);
        assert_eq!(m["usage"]["cache_read_input_tokens"], 4);
        assert_eq!(m["usage"]["output_tokens"], 7);
        let mut w = MessageWriter::new("m".into(), 1);
        let events = w.on(&Output::Done(End {
            calls: vec![],
            reason: FinishReason::Stop,
            stop: Some("END".into()),
            usage: Usage::new(1, 1, 0),
        }));
        assert_eq!(
            events[0].1["delta"],
            json!({"stop_reason": "stop_sequence", "stop_sequence": "END"})
        );
    }
}
