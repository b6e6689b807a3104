//! The JSON the server answers with, as types: the handlers and the stream serialize these, and
//! the OpenAPI document is generated from the same types, so the schema cannot drift from what
//! is sent. Field order follows OpenAI's.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::engine::TokenLogprob;

use super::wire::Usage;

/// `/v1/chat/completions` without `stream`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    #[schema(example = "chat.completion")]
    pub object: String,
    pub created: u64,
    pub model: String,
    /// `default` (interactive) or `flex` (deferred: run in the interactive gaps).
    #[schema(example = "default")]
    pub service_tier: &'static str,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// Present (not null) when the request asked for `logprobs`.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// Null when the turn is only tool calls.
    pub content: Option<String>,
    /// The calls the model made (`finish_reason` is then `tool_calls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The model's reasoning (the text inside `<think>…</think>`), when its template has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reasoning_content: Option<String>,
    /// The same as `reasoning_content`, under the name other clients read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reasoning: Option<String>,
}

/// One call: its id (for the `tool` message that answers it) and the function with its
/// arguments as JSON text.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object, as text.
    pub arguments: String,
}

impl ToolCall {
    pub fn new(name: String, arguments: String) -> Self {
        Self {
            id: super::tools::call_id(),
            kind: "function".into(),
            function: FunctionCall { name, arguments },
        }
    }
}

/// A piece of a streamed call: the first has its id, type and name (arguments empty), the
/// next its whole arguments; `index` says which call of the turn.
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub kind: Option<String>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub arguments: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One sampled token with its log-probability and the most likely alternatives.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// JSON has no infinity: a log-probability of −∞ (a token the logit bias or a constraint
/// ruled out) is sent as −9999, as OpenAI and vLLM do, never as null.
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

impl ChatTokenLogprob {
    pub fn of(lp: &TokenLogprob) -> Self {
        Self {
            token: lp.token.clone(),
            logprob: finite(lp.logprob),
            bytes: lp.token.as_bytes().to_vec(),
            top_logprobs: lp
                .top
                .iter()
                .map(|(t, l)| TopLogprob {
                    token: t.clone(),
                    logprob: finite(*l),
                    bytes: t.as_bytes().to_vec(),
                })
                .collect(),
        }
    }
}

impl ChatLogprobs {
    pub fn of(lps: &[TokenLogprob]) -> Self {
        Self {
            content: lps.iter().map(ChatTokenLogprob::of).collect(),
        }
    }
}

/// `/v1/completions` without `stream`; also each chunk of its stream (`object` stays
/// `text_completion` there, as OpenAI sends it).
#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// Always `text_completion`.
    #[schema(example = "text_completion")]
    pub object: String,
    pub created: u64,
    pub model: String,
    /// `default` (interactive) or `flex` (deferred: run in the interactive gaps).
    #[schema(example = "default")]
    pub service_tier: &'static str,
    pub choices: Vec<CompletionChoice>,
    /// On a stream: absent unless `stream_options.include_usage`, then null on every chunk but
    /// the last one, which has no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
}

/// Legacy completions' log-probabilities, one entry per token.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token: the alternatives, token → log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Each token's byte offset in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// For a run of tokens whose text starts `offset` bytes into the choice's text.
    pub fn of(lps: &[TokenLogprob], mut offset: usize) -> Self {
        let mut text_offset = Vec::with_capacity(lps.len());
        for lp in lps {
            text_offset.push(offset);
            offset += lp.token.len();
        }
        Self {
            tokens: lps.iter().map(|l| l.token.clone()).collect(),
            token_logprobs: lps.iter().map(|l| finite(l.logprob)).collect(),
            top_logprobs: lps
                .iter()
                .map(|l| l.top.iter().map(|(t, p)| (t.clone(), finite(*p))).collect())
                .collect(),
            text_offset,
        }
    }
}

/// One event of a chat stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    #[schema(example = "chat.completion.chunk")]
    pub object: String,
    pub created: u64,
    pub model: String,
    /// `default` (interactive) or `flex` (deferred).
    #[schema(example = "default")]
    pub service_tier: &'static str,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent unless `stream_options.include_usage`; then null on every chunk but the last
    /// one, which has no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// What a chunk adds to the message: the role on the first, text on the others.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub content: Option<String>,
    /// Tool calls, each sent whole: id and name, then the arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// A piece of the model's reasoning (see `AssistantMessage`), under both names.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reasoning: Option<String>,
}

/// `/v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// Always `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `/health`: 200 with `ok` once the model is loaded, 503 while it loads or after it failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `loading` or `failed`.
    pub status: String,
    /// While loading: the fraction of the weights loaded (0–1).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub progress: Option<f32>,
    /// After a failure: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
}

impl Health {
    pub fn of(status: &str) -> Self {
        Self {
            status: status.into(),
            progress: None,
            error: None,
        }
    }
}

/// `/v1/status`: the server, the engine, the arbiter's figures and the telemetry.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerStatus {
    pub model: String,
    pub version: String,
    pub uptime_s: u64,
    pub draining: bool,
    pub requests_in_flight: usize,
    /// Null until the model is loaded.
    pub engine: Option<EngineStatus>,
    /// The arbiter's figures (device time, pre-emptions, hashrate, shares, pool), or
    /// `{"mining_enabled": false}`.
    #[schema(value_type = Object)]
    pub mining: Value,
    /// The telemetry's latest snapshot (earnings, power, history); null without telemetry.
    #[schema(value_type = Option<Object>)]
    pub telemetry: Value,
    /// Batch lines this process has run to a recorded result; null without the Batches API.
    pub batch_lines: Option<BatchLines>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchLines {
    /// Answered 200 (in an output file).
    pub succeeded: u64,
    /// Answered with an error (in an error file).
    pub failed: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EngineStatus {
    pub running: usize,
    pub generated_tokens: u64,
    pub prefilled_tokens: u64,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub kv_preemptions: u64,
    pub busy: bool,
    /// Deferred steps paused between two layers for an arriving interactive request (each
    /// resumes at the layer it stopped before).
    pub deferred_interruptions: u64,
    /// Deferred steps run beside interactive work, as deferred work's guaranteed share.
    pub deferred_owed_steps: u64,
    /// Sequences running and requests waiting, by tier (`default`: interactive; `flex`:
    /// deferred work, flex requests and batch lines).
    #[schema(value_type = Object)]
    pub running_by_tier: std::collections::BTreeMap<&'static str, usize>,
    #[schema(value_type = Object)]
    pub waiting_by_tier: std::collections::BTreeMap<&'static str, usize>,
}

/// The OpenAI error envelope, on every error status and mid-stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error`, `server_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<String>,
}

impl std::fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}
