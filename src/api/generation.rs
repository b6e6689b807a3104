//! What every generation API shares once a request is in the engine's hands: the engine's
//! event stream with its guards ([`Generation`]), one choice's text read into reasoning,
//! answer and tool calls ([`ChoiceReader`]), and, for the APIs that answer one choice
//! (Responses, Messages), that choice as a stream of [`Output`]s that their writers turn into
//! their own objects and events ([`EventWriter`]). Chat Completions, Responses and Messages
//! differ only in those writers: the request, the engine and the reading are one.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::engine::{FinishReason, SeqEvent};

use super::error::ApiError;
use super::reasoning::ReasoningSplitter;
use super::stream::StreamGuards;
use super::tools::{CallHolder, ParsedCall};
use super::validate::ResponsePlan;
use super::wire::Usage;

/// A request the engine accepted: its events, how to answer it, and what it holds until its
/// answer ends (its timings and usage, its deadline, its place among those in flight).
pub struct Generation {
    pub events: mpsc::UnboundedReceiver<SeqEvent>,
    pub plan: ResponsePlan,
    pub n: usize,
    pub guards: StreamGuards,
}

/// `prefix_` and 24 random hex digits, as OpenAI's and Anthropic's ids look (`call_`, `msg_`,
/// `toolu_`, `resp_`).
pub fn item_id(prefix: &str) -> String {
    format!("{prefix}_{:024x}", rand::random::<u128>() >> 32)
}

/// One choice's text as it comes: the reasoning split off (templates with `<think>`), and
/// tool calls held back and read whole (requests with tools).
pub struct ChoiceReader {
    splitter: Option<ReasoningSplitter>,
    holder: Option<CallHolder>,
}

impl ChoiceReader {
    pub fn new(plan: &ResponsePlan) -> Self {
        Self {
            splitter: plan.reasoning.map(ReasoningSplitter::new),
            holder: plan.tool_calls.clone().map(CallHolder::new),
        }
    }

    /// The reasoning and the answer that can be sent now.
    pub fn push(&mut self, text: &str) -> (String, String) {
        let (reasoning, text) = match self.splitter.as_mut() {
            Some(s) => s.push(text),
            None => (String::new(), text.to_string()),
        };
        let text = match self.holder.as_mut() {
            Some(h) => h.push(&text),
            None => text,
        };
        (reasoning, text)
    }

    /// What was still held at the end: reasoning, answer, and the calls read from it.
    pub fn finish(&mut self) -> (String, String, Vec<ParsedCall>) {
        let (reasoning, mut text) = self
            .splitter
            .as_mut()
            .map(|s| s.finish())
            .unwrap_or_default();
        let mut calls = Vec::new();
        if let Some(h) = self.holder.as_mut() {
            let sent = h.push(&text);
            let (rest, found) = h.finish();
            text = sent + &rest;
            calls = found;
        }
        (reasoning, text, calls)
    }
}

/// One choice's answer, piece by piece.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Reasoning(String),
    Text(String),
    Done(End),
}

/// The end of one choice's answer: the calls read from it, why it ended (and the stop string
/// that ended it, if one did), what it used.
#[derive(Debug, Clone, PartialEq)]
pub struct End {
    pub calls: Vec<ParsedCall>,
    pub reason: FinishReason,
    pub stop: Option<String>,
    pub usage: Usage,
}

/// A one-choice generation read as [`Output`]s.
pub struct OneChoice {
    gen: Generation,
    reader: ChoiceReader,
    ready: VecDeque<Output>,
    done: bool,
}

impl OneChoice {
    pub fn new(gen: Generation) -> Self {
        Self {
            reader: ChoiceReader::new(&gen.plan),
            gen,
            ready: VecDeque::new(),
            done: false,
        }
    }

    pub fn plan(&self) -> &ResponsePlan {
        &self.gen.plan
    }

    /// The next piece; `None` after [`Output::Done`]. An error (a timeout, the shutdown, a
    /// failure in the engine) ends it: dropping `self` cancels the generation.
    pub async fn next(&mut self) -> Option<Result<Output, ApiError>> {
        loop {
            if let Some(o) = self.ready.pop_front() {
                return Some(Ok(o));
            }
            if self.done {
                return None;
            }
            let g = &mut self.gen.guards;
            let event = match g.watchdog.next(&mut self.gen.events).await {
                Ok(e) => e,
                Err(e) => {
                    g.timer.aborted();
                    self.done = true;
                    return Some(Err(e));
                }
            };
            if let Some(e) = &event {
                g.timer.observe(e);
            }
            match event {
                Some(SeqEvent::Token { text, .. }) => {
                    let (reasoning, text) = self.reader.push(&text);
                    self.queue(reasoning, text);
                }
                Some(SeqEvent::Finished {
                    reason,
                    completion_tokens,
                    cached_tokens,
                    stop,
                    ..
                }) => {
                    let (reasoning, text, calls) = self.reader.finish();
                    self.queue(reasoning, text);
                    let usage = Usage::new(
                        self.gen.plan.prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    );
                    self.ready.push_back(Output::Done(End {
                        calls,
                        reason,
                        stop,
                        usage,
                    }));
                    self.done = true;
                }
                Some(SeqEvent::Failed { message }) => {
                    self.done = true;
                    return Some(Err(ApiError::internal(message)));
                }
                None => {
                    self.done = true;
                    return Some(Err(ApiError::internal("the engine dropped the request")));
                }
            }
        }
    }

    fn queue(&mut self, reasoning: String, text: String) {
        if !reasoning.is_empty() {
            self.ready.push_back(Output::Reasoning(reasoning));
        }
        if !text.is_empty() {
            self.ready.push_back(Output::Text(text));
        }
    }
}

/// An event of a typed stream: its name (the SSE `event:` line) and its JSON.
pub type NamedEvent = (&'static str, serde_json::Value);

/// Turns one choice's [`Output`]s into an API's events and, at the end, its object. Sans-IO:
/// the same writer answers a stream (its events) and a whole request (its final object).
pub trait EventWriter: Send + 'static {
    /// The events before any output.
    fn start(&mut self) -> Vec<NamedEvent>;
    /// A piece of the reasoning (`reasoning`) or of the answer.
    fn append(&mut self, reasoning: bool, piece: &str, events: &mut Vec<NamedEvent>);
    /// The end of the output.
    fn end(&mut self, end: &End, events: &mut Vec<NamedEvent>);
    /// The events of one piece of output.
    fn on(&mut self, out: &Output) -> Vec<NamedEvent> {
        let mut events = Vec::new();
        match out {
            Output::Reasoning(r) => self.append(true, r, &mut events),
            Output::Text(t) => self.append(false, t, &mut events),
            Output::Done(end) => self.end(end, &mut events),
        }
        events
    }
    /// The events that end a stream the generation could not finish.
    fn failed(&mut self, e: &ApiError) -> Vec<NamedEvent>;
}

/// Runs `one` to its end through `w`, and gives `w` back (or the error that ended it).
pub async fn run_whole<W: EventWriter>(mut one: OneChoice, mut w: W) -> Result<W, ApiError> {
    w.start();
    while let Some(out) = one.next().await {
        w.on(&out?);
    }
    Ok(w)
}

/// What is done with a finished answer before its last events go out: the Responses API
/// keeps it, so that a client that has seen `response.completed` can continue it at once.
pub type BeforeEnd<W> = Box<dyn FnOnce(&W) -> futures::future::BoxFuture<'static, ()> + Send>;

/// Answers a one-choice generation through `w`: its events (with `stream`), or the object
/// `body` makes of the finished writer.
pub async fn answer_one<W: EventWriter>(
    gen: Generation,
    w: W,
    before_end: Option<BeforeEnd<W>>,
    body: impl FnOnce(W) -> serde_json::Value + Send + 'static,
) -> Result<Response, ApiError> {
    let one = OneChoice::new(gen);
    if one.plan().stream {
        return Ok(sse_from(move |tx| async move {
            run_stream(one, w, tx, before_end).await;
        }));
    }
    let w = run_whole(one, w).await?;
    if let Some(f) = before_end {
        f(&w).await;
    }
    Ok(axum::Json(body(w)).into_response())
}

/// Runs `one` through `w` and sends each event as it comes, named, on `tx`; `before_end` runs
/// before the events of the end. A client that leaves cancels the generation (dropping `one`).
async fn run_stream<W: EventWriter>(
    mut one: OneChoice,
    mut w: W,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    mut before_end: Option<BeforeEnd<W>>,
) {
    let send = |events: Vec<NamedEvent>| {
        let tx = tx.clone();
        async move {
            for (name, data) in events {
                let e = Event::default().event(name).data(data.to_string());
                if tx.send(Ok(e)).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    if !send(w.start()).await {
        return;
    }
    while let Some(out) = one.next().await {
        let events = match out {
            Ok(out) => {
                let events = w.on(&out);
                if let Output::Done(_) = out {
                    if let Some(f) = before_end.take() {
                        f(&w).await;
                    }
                }
                events
            }
            Err(e) => {
                send(w.failed(&e)).await;
                return;
            }
        };
        if !send(events).await {
            return;
        }
    }
}

/// The SSE answer whose events a spawned task `forward` sends on the channel it is given.
pub fn sse_from<F, Fut>(forward: F) -> Response
where
    F: FnOnce(mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    // The request's span goes with the task, so its log lines keep the request id.
    tokio::spawn(forward(tx).instrument(tracing::Span::current()));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
