//! OpenAI wire types: the request bodies of `/v1/chat/completions` and `/v1/completions` as
//! clients send them (permissive: unknown fields are ignored, unsupported ones are refused in
//! validation), and the usage figures. The answers are in [`super::bodies`]; the OpenAPI
//! document is generated from both.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// OpenAI's service tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WireServiceTier {
    Auto,
    Default,
    Flex,
    Scale,
    Priority,
}

impl WireServiceTier {
    pub fn tier(self) -> crate::engine::ServiceTier {
        match self {
            WireServiceTier::Flex => crate::engine::ServiceTier::Deferred,
            _ => crate::engine::ServiceTier::Interactive,
        }
    }
}

/// Parameters shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CommonParams {
    pub model: Option<String>,
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// 0 or -1: no top-k.
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    #[schema(minimum = 0.01, maximum = 10.0)]
    pub repetition_penalty: Option<f32>,
    /// Choices to generate (at most the server's `--max-n`).
    #[schema(minimum = 1)]
    pub n: Option<i64>,
    /// Token id → bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f32>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: Option<bool>,
    /// vLLM's extension: scheduling priority, lower first (default 0), within the operator's
    /// range (by default -100..=100).
    pub priority: Option<i64>,
    /// vLLM's extension: constrain the output to exactly one of `json` (a JSON Schema),
    /// `regex`, `choice` (a list of strings), `grammar` (Lark) or `json_object: true`.
    pub structured_outputs: Option<Value>,
    /// `flex` runs the request as deferred work, in the gaps between interactive requests
    /// (429 `resource_unavailable` when the deferred queue is full); `auto`, `default`,
    /// `scale` and `priority` are interactive.
    pub service_tier: Option<WireServiceTier>,
    /// Accepted and ignored, as the brief of the API asks.
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// A chat request: the shared parameters and the chat-only ones, read from the same JSON
/// object in two passes (serde's `flatten` would lose the path of a field in errors).
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub common: CommonParams,
    pub chat: ChatFields,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatFields {
    #[schema(min_items = 1)]
    pub messages: Vec<WireMessage>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    /// Alternatives per token (needs `logprobs`), at most the server's limit (20 by default).
    #[schema(minimum = 0)]
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
    /// `none`, `auto` (the default), `required`, or `{"type": "function", "function":
    /// {"name": …}}`.
    pub tool_choice: Option<Value>,
    /// Whether the model may make several calls in one turn (default true).
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Value>,
    pub response_format: Option<Value>,
    /// Extra variables for the model's chat template (e.g. `{"enable_thinking": false}`).
    pub chat_template_kwargs: Option<HashMap<String, Value>>,
}

impl ChatFields {
    /// A chat of `messages` with every other field left out (the translators' start).
    pub fn of(messages: Vec<WireMessage>) -> Self {
        Self {
            messages,
            max_completion_tokens: None,
            logprobs: None,
            top_logprobs: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            functions: None,
            response_format: None,
            chat_template_kwargs: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct WireMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[schema(example = "user")]
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant message's calls (OpenAI's shape).
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

impl WireMessage {
    /// A message of plain text.
    pub fn text(role: &str, content: String) -> Self {
        Self {
            role: role.into(),
            content: Some(MessageContent::Text(content)),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A legacy completion request, read like [`ChatRequest`].
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub common: CommonParams,
    pub completion: CompletionFields,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionFields {
    pub prompt: Option<Prompt>,
    /// Legacy completions: how many alternatives to report per token (0–20).
    #[schema(minimum = 0)]
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// The forms `/v1/completions` accepts for `prompt`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt: how much of it the prefix cache already held.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// The body of `/v1/chat/completions`, for the OpenAPI document: the handler reads the same
/// object as [`CommonParams`] and [`ChatFields`] in two passes.
#[derive(Deserialize, ToSchema)]
#[schema(as = ChatCompletionRequest)]
#[allow(dead_code)] // read by the schema only
pub struct ChatRequestDoc {
    #[serde(flatten)]
    pub common: CommonParams,
    #[serde(flatten)]
    pub chat: ChatFields,
}

/// The body of `/v1/completions`, for the OpenAPI document (see [`ChatRequestDoc`]).
#[derive(Deserialize, ToSchema)]
#[schema(as = CompletionRequest)]
#[allow(dead_code)] // read by the schema only
pub struct CompletionRequestDoc {
    #[serde(flatten)]
    pub common: CommonParams,
    #[serde(flatten)]
    pub completion: CompletionFields,
}
