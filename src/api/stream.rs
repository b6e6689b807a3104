//! Server-sent events for `stream: true`: one chunk per token and choice in OpenAI's chunk
//! format, a final chunk with `finish_reason` per choice, an optional usage chunk, then
//! `data: [DONE]`. A forwarding task owns the engine's event receiver; when the client goes
//! away the SSE body is dropped, the task's send fails, it drops the receiver, and the engine
//! cancels the generation at its next step.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use tracing::Instrument;

use crate::engine::SeqEvent;

use super::error::ApiError;
use super::handlers::{now_unix, response_id};
use super::lifecycle::{InFlight, Watchdog};
use super::timing::RequestTimer;
use super::validate::ResponsePlan;
use super::wire::{chat_logprob_entry, completion_logprobs, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What a stream holds until it ends: its timings, its deadline, its place among the
/// requests in flight (the shutdown waits for it).
pub struct StreamGuards {
    pub timer: RequestTimer,
    pub watchdog: Watchdog,
    pub _in_flight: InFlight,
}

pub fn sse_response(
    endpoint: Endpoint,
    plan: ResponsePlan,
    n: usize,
    events: mpsc::UnboundedReceiver<SeqEvent>,
    guards: StreamGuards,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    // The request's span goes with the task, so its log lines keep the request id.
    tokio::spawn(
        forward(endpoint, plan, n, events, tx, guards).instrument(tracing::Span::current()),
    );
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

struct ChunkWriter {
    endpoint: Endpoint,
    id: String,
    created: u64,
    plan: ResponsePlan,
}

impl ChunkWriter {
    fn chunk(&self, choices: Value) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut c = json!({ "id": self.id, "object": object, "created": self.created, "model": self.plan.model, "choices": choices });
        if self.plan.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn choice(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        logprobs: Value,
        finish: Option<&str>,
    ) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
            Endpoint::Completion => {
                json!({ "index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish })
            }
        }
    }
}

async fn forward(
    endpoint: Endpoint,
    plan: ResponsePlan,
    n: usize,
    mut events: mpsc::UnboundedReceiver<SeqEvent>,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    mut guards: StreamGuards,
) {
    let prefix = if endpoint == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let w = ChunkWriter {
        endpoint,
        id: response_id(prefix),
        created: now_unix(),
        plan,
    };
    let send = |v: Value| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(Event::default().data(v.to_string())))
                .await
                .is_ok()
        }
    };
    if endpoint == Endpoint::Chat {
        for i in 0..n {
            if !send(w.chunk(json!([w.choice(i, Some(""), true, Value::Null, None)]))).await {
                return;
            }
        }
    }
    let mut text_offsets = vec![0usize; n];
    let (mut completion_tokens, mut cached) = (0, 0);
    let mut open = n;
    while open > 0 {
        let event = match guards.watchdog.next(&mut events).await {
            Ok(e) => e,
            Err(e) => {
                // Timed out or cancelled by the shutdown: say so, and dropping `events`
                // cancels the generation.
                guards.timer.aborted();
                let _ = send(e.body()).await;
                return;
            }
        };
        if let Some(e) = &event {
            guards.timer.observe(e);
        }
        let chunk = match event {
            Some(SeqEvent::Token {
                choice,
                text,
                logprob,
            }) => {
                if text.is_empty() && logprob.is_none() {
                    continue;
                }
                let logprobs = match (&logprob, endpoint) {
                    (None, _) => Value::Null,
                    (Some(lp), Endpoint::Chat) => json!({ "content": [chat_logprob_entry(lp)] }),
                    (Some(lp), Endpoint::Completion) => {
                        completion_logprobs(std::slice::from_ref(lp), text_offsets[choice])
                    }
                };
                text_offsets[choice] += text.len();
                w.chunk(json!([w.choice(
                    choice,
                    Some(&text),
                    false,
                    logprobs,
                    None
                )]))
            }
            Some(SeqEvent::Finished {
                choice,
                reason,
                completion_tokens: c,
                cached_tokens,
            }) => {
                cached = cached.max(cached_tokens);
                open -= 1;
                completion_tokens += c;
                let text = if endpoint == Endpoint::Chat {
                    None
                } else {
                    Some("")
                };
                w.chunk(json!([w.choice(
                    choice,
                    text,
                    false,
                    Value::Null,
                    Some(reason.as_str())
                )]))
            }
            Some(SeqEvent::Failed { message }) => {
                let _ = send(ApiError::internal(message).body()).await;
                return;
            }
            None => {
                let _ = send(ApiError::internal("the engine dropped the request").body()).await;
                return;
            }
        };
        if !send(chunk).await {
            return; // client gone: dropping `events` cancels the generation
        }
    }
    if w.plan.include_usage {
        let mut c = w.chunk(json!([]));
        c["usage"] = json!(Usage::new(w.plan.prompt_tokens, completion_tokens, cached));
        if !send(c).await {
            return;
        }
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
}
