//! Server-sent events for `stream: true`: one chunk per token and choice in OpenAI's chunk
//! format, a final chunk with `finish_reason` per choice, an optional usage chunk, then
//! `data: [DONE]`. A forwarding task owns the engine's event receiver; when the client goes
//! away the SSE body is dropped, the task's send fails, it drops the receiver, and the engine
//! cancels the generation at its next step.

use std::convert::Infallible;

use axum::response::sse::Event;
use axum::response::Response;
use tokio::sync::mpsc;

use crate::engine::{SeqEvent, TokenLogprob};

use super::bodies::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatLogprobs, Completion, CompletionChoice,
    CompletionLogprobs, FunctionCallDelta, ToolCallDelta,
};
use super::error::ApiError;
use super::generation::{sse_from, ChoiceReader, Generation};
use super::handlers::{now_unix, response_id};
use super::lifecycle::{InFlight, Watchdog};
use super::timing::RequestTimer;
use super::tools::ParsedCall;
use super::validate::ResponsePlan;
use super::wire::Usage;

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

pub fn sse_response(endpoint: Endpoint, gen: Generation) -> Response {
    sse_from(move |tx| forward(endpoint, gen, tx))
}

struct ChunkWriter {
    endpoint: Endpoint,
    id: String,
    created: u64,
    plan: ResponsePlan,
}

/// One choice's piece of a stream: text (with the role on a chat's first chunk), the token's
/// log-probability, or the finish.
struct Piece<'a> {
    index: usize,
    text: Option<&'a str>,
    /// A piece of the reasoning (chat with a `<think>` template).
    reasoning: Option<&'a str>,
    role: bool,
    logprob: Option<&'a TokenLogprob>,
    /// Bytes of this choice's text already sent (legacy completions' `text_offset`).
    text_offset: usize,
    finish: Option<&'static str>,
}

impl Piece<'_> {
    fn new(index: usize) -> Self {
        Piece {
            index,
            text: None,
            reasoning: None,
            role: false,
            logprob: None,
            text_offset: 0,
            finish: None,
        }
    }
}

impl ChunkWriter {
    /// A chunk's `usage`: absent unless the client asked for it, then null until the last.
    fn usage(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        self.plan.include_usage.then_some(usage)
    }

    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        to_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.plan.model.clone(),
            service_tier: self.plan.tier.as_str(),
            choices,
            usage: self.usage(usage),
        })
    }

    fn completion(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        to_json(&Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.plan.model.clone(),
            service_tier: self.plan.tier.as_str(),
            choices,
            usage: self.usage(usage),
        })
    }

    fn piece(&self, p: Piece<'_>) -> String {
        let lps = p.logprob.map(std::slice::from_ref);
        match self.endpoint {
            Endpoint::Chat => self.chat(
                vec![ChatChunkChoice {
                    index: p.index,
                    delta: ChatDelta {
                        role: p.role.then(|| "assistant".into()),
                        content: p.text.map(Into::into),
                        tool_calls: None,
                        reasoning_content: p.reasoning.map(Into::into),
                        reasoning: p.reasoning.map(Into::into),
                    },
                    logprobs: lps.map(ChatLogprobs::of),
                    finish_reason: p.finish.map(Into::into),
                }],
                None,
            ),
            Endpoint::Completion => self.completion(
                vec![CompletionChoice {
                    index: p.index,
                    text: p.text.unwrap_or("").into(),
                    logprobs: lps.map(|l| CompletionLogprobs::of(l, p.text_offset)),
                    finish_reason: p.finish.map(Into::into),
                }],
                None,
            ),
        }
    }

    /// A call of a chat stream, in two chunks: its id, type and name; then its arguments.
    fn tool_call(&self, choice: usize, index: usize, call: &ParsedCall) -> [String; 2] {
        let chunk = |delta: ToolCallDelta| {
            self.chat(
                vec![ChatChunkChoice {
                    index: choice,
                    delta: ChatDelta {
                        tool_calls: Some(vec![delta]),
                        ..ChatDelta::default()
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            )
        };
        [
            chunk(ToolCallDelta {
                index,
                id: Some(super::tools::call_id()),
                kind: Some("function".into()),
                function: FunctionCallDelta {
                    name: Some(call.name.clone()),
                    arguments: Some(String::new()),
                },
            }),
            chunk(ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionCallDelta {
                    name: None,
                    arguments: Some(call.arguments.clone()),
                },
            }),
        ]
    }

    /// The last chunk when usage was asked for: no choices, the request's usage.
    fn usage_chunk(&self, usage: Usage) -> String {
        match self.endpoint {
            Endpoint::Chat => self.chat(vec![], Some(usage)),
            Endpoint::Completion => self.completion(vec![], Some(usage)),
        }
    }
}

fn to_json(v: &impl serde::Serialize) -> String {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

async fn forward(
    endpoint: Endpoint,
    Generation {
        mut events,
        plan,
        n,
        mut guards,
    }: Generation,
    tx: mpsc::Sender<Result<Event, Infallible>>,
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
    let send = |data: String| {
        let tx = tx.clone();
        async move { tx.send(Ok(Event::default().data(data))).await.is_ok() }
    };
    if endpoint == Endpoint::Chat {
        for i in 0..n {
            let first = Piece {
                text: Some(""),
                role: true,
                ..Piece::new(i)
            };
            if !send(w.piece(first)).await {
                return;
            }
        }
    }
    let mut text_offsets = vec![0usize; n];
    let mut readers: Vec<ChoiceReader> = (0..n).map(|_| ChoiceReader::new(&w.plan)).collect();
    let nonempty = |s: &str| !s.is_empty();
    let (mut completion_tokens, mut cached) = (0, 0);
    let mut open = n;
    while open > 0 {
        let event = match guards.watchdog.next(&mut events).await {
            Ok(e) => e,
            Err(e) => {
                // Timed out or cancelled by the shutdown: say so, and dropping `events`
                // cancels the generation.
                guards.timer.aborted();
                let _ = send(e.body().to_string()).await;
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
                let (reasoning, text) = readers[choice].push(&text);
                if text.is_empty() && reasoning.is_empty() && logprob.is_none() {
                    continue;
                }
                let piece = w.piece(Piece {
                    text: Some(text.as_str()).filter(|t| nonempty(t) || reasoning.is_empty()),
                    reasoning: Some(reasoning.as_str()).filter(|r| nonempty(r)),
                    logprob: logprob.as_ref(),
                    text_offset: text_offsets[choice],
                    ..Piece::new(choice)
                });
                text_offsets[choice] += text.len();
                piece
            }
            Some(SeqEvent::Finished {
                choice,
                reason,
                completion_tokens: c,
                cached_tokens,
                ..
            }) => {
                cached = cached.max(cached_tokens);
                open -= 1;
                completion_tokens += c;
                // What the reasoning split and the call holder still held goes out before
                // the finish: text as content, calls whole.
                let (reasoning, text, calls) = readers[choice].finish();
                if !(reasoning.is_empty() && text.is_empty()) {
                    let rest = w.piece(Piece {
                        text: Some(text.as_str()).filter(|t| nonempty(t)),
                        reasoning: Some(reasoning.as_str()).filter(|r| nonempty(r)),
                        ..Piece::new(choice)
                    });
                    if !send(rest).await {
                        return;
                    }
                }
                for (j, call) in calls.iter().enumerate() {
                    for chunk in w.tool_call(choice, j, call) {
                        if !send(chunk).await {
                            return;
                        }
                    }
                }
                w.piece(Piece {
                    // A chat's finish has an empty delta; a completion's an empty text.
                    text: (endpoint == Endpoint::Completion).then_some(""),
                    finish: Some(super::tools::finish_reason(reason, !calls.is_empty())),
                    ..Piece::new(choice)
                })
            }
            Some(SeqEvent::Failed { message }) => {
                let _ = send(ApiError::internal(message).body().to_string()).await;
                return;
            }
            None => {
                let _ = send(
                    ApiError::internal("the engine dropped the request")
                        .body()
                        .to_string(),
                )
                .await;
                return;
            }
        };
        if !send(chunk).await {
            return; // client gone: dropping `events` cancels the generation
        }
    }
    if w.plan.include_usage {
        let usage = Usage::new(w.plan.prompt_tokens, completion_tokens, cached);
        if !send(w.usage_chunk(usage)).await {
            return;
        }
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
}
