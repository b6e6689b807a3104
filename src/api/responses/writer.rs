//! One choice's output as a Responses API object and its typed event stream: a reasoning
//! item (the `<think>` text as its summary), a message item (`output_text`), and a
//! `function_call` item per call, each added, streamed and done in order, every event with
//! its `sequence_number`; then `response.completed` (or `.incomplete` at the token limit,
//! `.failed`). Sans-IO: the same writer makes the whole response.

use serde_json::{json, Value};

use crate::engine::FinishReason;

use super::super::error::ApiError;
use super::super::generation::{End, EventWriter, NamedEvent};
use super::translate::item_id;

/// Writes one generation as a Response.
pub struct ResponseWriter {
    response: Value,
    /// The output item being streamed, when one is open.
    open: Option<usize>,
    sequence: u64,
}

impl ResponseWriter {
    /// `base`: the response object as created (`in_progress`, no output).
    pub fn new(base: Value) -> Self {
        Self {
            response: base,
            open: None,
            sequence: 0,
        }
    }

    pub fn response(&self) -> &Value {
        &self.response
    }

    fn event(&mut self, kind: &'static str, mut body: Value) -> NamedEvent {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        (kind, body)
    }

    fn output(&mut self) -> &mut Vec<Value> {
        if !self.response["output"].is_array() {
            self.response["output"] = json!([]);
        }
        self.response["output"]
            .as_array_mut()
            .expect("made an array above")
    }

    /// Adds `item` to the output, announcing it.
    fn add(&mut self, item: Value, events: &mut Vec<NamedEvent>) -> usize {
        let index = self.output().len();
        self.output().push(item.clone());
        let e = self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        events.push(e);
        index
    }

    /// Ends the open item (`completed`, or `incomplete` when the token limit cut it): its
    /// text done, its part done, the item done.
    fn close(&mut self, status: &str, events: &mut Vec<NamedEvent>) {
        let Some(index) = self.open.take() else {
            return;
        };
        let item = &mut self.output()[index];
        item["status"] = json!(status);
        let item = item.clone();
        let id = item["id"].clone();
        if item["type"] == "reasoning" {
            let part = item["summary"][0].clone();
            let e = self.event("response.reasoning_summary_text.done", json!({"item_id": id, "output_index": index, "summary_index": 0, "text": part["text"]}));
            events.push(e);
            let e = self.event(
                "response.reasoning_summary_part.done",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
            );
            events.push(e);
        } else {
            let part = item["content"][0].clone();
            let e = self.event("response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": part["text"], "logprobs": []}));
            events.push(e);
            let e = self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            );
            events.push(e);
        }
        let e = self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        events.push(e);
    }
}

impl EventWriter for ResponseWriter {
    fn start(&mut self) -> Vec<NamedEvent> {
        let r = self.response.clone();
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    /// Appends `piece` to the open item of its kind (reasoning or message), opening one when
    /// needed.
    fn append(&mut self, reasoning: bool, piece: &str, events: &mut Vec<NamedEvent>) {
        let kind = if reasoning { "reasoning" } else { "message" };
        let same = self
            .open
            .is_some_and(|i| self.response["output"][i]["type"] == kind);
        if !same {
            self.close("completed", events);
            let index = if reasoning {
                let index = self.add(json!({"id": item_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress"}), events);
                let part = json!({"type": "summary_text", "text": ""});
                self.output()[index]["summary"] = json!([part]);
                let id = self.response["output"][index]["id"].clone();
                let e = self.event(
                    "response.reasoning_summary_part.added",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                );
                events.push(e);
                index
            } else {
                let index = self.add(json!({"id": item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}), events);
                let part = json!({"type": "output_text", "text": "", "annotations": []});
                self.output()[index]["content"] = json!([part]);
                let id = self.response["output"][index]["id"].clone();
                let e = self.event(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                events.push(e);
                index
            };
            self.open = Some(index);
        }
        let index = self.open.expect("opened above");
        let item = &mut self.output()[index];
        let id = item["id"].clone();
        let text = if reasoning {
            &mut item["summary"][0]["text"]
        } else {
            &mut item["content"][0]["text"]
        };
        if let Value::String(t) = text {
            t.push_str(piece);
        }
        let e = if reasoning {
            self.event(
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": piece}),
            )
        } else {
            self.event("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": piece, "logprobs": []}))
        };
        events.push(e);
    }

    fn end(&mut self, end: &End, events: &mut Vec<NamedEvent>) {
        let End {
            calls,
            reason,
            usage,
            ..
        } = end;
        let cut = *reason == FinishReason::Length;
        self.close(if cut { "incomplete" } else { "completed" }, events);
        for call in calls {
            let item = json!({"id": item_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": super::super::tools::call_id(), "name": call.name, "arguments": ""});
            let index = self.add(item, events);
            let id = self.response["output"][index]["id"].clone();
            let e = self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": index, "delta": call.arguments}),
            );
            events.push(e);
            let e = self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": call.name, "arguments": call.arguments}));
            events.push(e);
            let item = &mut self.output()[index];
            item["arguments"] = json!(call.arguments);
            item["status"] = json!("completed");
            let item = item.clone();
            let e = self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            events.push(e);
        }
        let reasoning_tokens = 0;
        self.response["usage"] = json!({
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": usage.total_tokens,
        });
        let kind = if *reason == FinishReason::Length && calls.is_empty() {
            self.response["status"] = json!("incomplete");
            self.response["incomplete_details"] = json!({"reason": "max_output_tokens"});
            "response.incomplete"
        } else {
            self.response["status"] = json!("completed");
            "response.completed"
        };
        self.response["completed_at"] = json!(super::super::handlers::now_unix());
        let r = self.response.clone();
        events.push(self.event(kind, json!({"response": r})));
    }

    fn failed(&mut self, e: &ApiError) -> Vec<NamedEvent> {
        self.response["status"] = json!("failed");
        self.response["error"] =
            json!({"code": e.code.unwrap_or("server_error"), "message": e.message});
        let r = self.response.clone();
        vec![self.event("response.failed", json!({"response": r}))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::generation::Output;
    use crate::api::tools::ParsedCall;
    use crate::api::wire::Usage;

    #[test]
    fn items_stream_in_order_and_the_final_response_holds_what_the_deltas_said() {
        let mut w = ResponseWriter::new(
            json!({"id": "resp_1", "object": "response", "status": "in_progress", "output": []}),
        );
        let mut events = w.start();
        for out in [
            Output::Reasoning("Hm.".into()),
            Output::Text("It is ".into()),
            Output::Text("sunny.".into()),
            Output::Done(End {
                calls: vec![ParsedCall {
                    name: "f".into(),
                    arguments: "{}".into(),
                }],
                reason: FinishReason::Stop,
                stop: None,
                usage: Usage::new(9, 4, 0),
            }),
        ] {
            events.extend(w.on(&out));
        }
        let seq: Vec<u64> = events
            .iter()
            .map(|(_, e)| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
        let text: String = events
            .iter()
            .filter(|(n, _)| *n == "response.output_text.delta")
            .map(|(_, e)| e["delta"].as_str().unwrap())
            .collect();
        let done = &events.last().unwrap().1;
        assert_eq!(events.last().unwrap().0, "response.completed");
        let out = &done["response"]["output"];
        assert_eq!(out[0]["summary"][0]["text"], "Hm.");
        assert_eq!(out[1]["content"][0]["text"], text);
        assert_eq!(text, "It is sunny.");
        assert_eq!(
            (out[2]["type"].as_str(), out[2]["name"].as_str()),
            (Some("function_call"), Some("f"))
        );
        assert!(out
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "completed"));
        let added: Vec<u64> = events
            .iter()
            .filter(|(n, _)| *n == "response.output_item.added")
            .map(|(_, e)| e["output_index"].as_u64().unwrap())
            .collect();
        assert_eq!(added, [0, 1, 2]);
        assert_eq!(done["response"]["usage"]["total_tokens"], 13);
    }

    #[test]
    fn the_token_limit_ends_as_incomplete() {
        let mut w = ResponseWriter::new(json!({"output": []}));
        let events = w.on(&Output::Done(End {
            calls: vec![],
            reason: FinishReason::Length,
            stop: None,
            usage: Usage::new(1, 1, 0),
        }));
        assert_eq!(events.last().unwrap().0, "response.incomplete");
        assert_eq!(
            w.response()["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }
}
