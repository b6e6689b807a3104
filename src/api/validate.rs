//! Validation: wire requests become an [`engine::ValidRequest`](crate::engine::ValidRequest)
//! or an error that names the offending field. Everything the engine trusts is checked here:
//! ranges, the model's name, the prompt's length against the context window.

use crate::engine::{ChatMessage, SamplingParams, ServedModel, ValidRequest};

use super::error::ApiError;
use super::output_format;
use super::tools::{self, CallFormat};
use super::wire::{
    ChatRequest, CommonParams, CompletionRequest, MessageContent, OneOrMany, Prompt,
};

/// Server-side limits on what a request may ask for.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub max_body_bytes: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Largest `max_tokens`; `None`: the context window.
    pub max_tokens: Option<usize>,
    pub max_stop_sequences: usize,
    pub max_top_logprobs: usize,
    /// Longest a request may take end to end.
    pub request_timeout: std::time::Duration,
    /// The `priority` values a client may ask for (lower runs first): an unbounded range
    /// would let any client put itself ahead of everyone for good.
    pub priority_range: (i64, i64),
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_n: 8,
            max_tokens: None,
            max_stop_sequences: 16,
            max_top_logprobs: 20,
            request_timeout: std::time::Duration::from_secs(600),
            priority_range: (-100, 100),
        }
    }
}

/// Longest stop string, in bytes: the engine holds back that much text while it matches.
pub const MAX_STOP_BYTES: usize = 256;

/// How the response must be shaped, beside what the engine is asked to do.
#[derive(Debug, Clone)]
pub struct ResponsePlan {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub prompt_tokens: usize,
    /// Chat with a template that has `<think>`: split the reasoning off the answer; `true`
    /// when the output starts inside it.
    pub reasoning: Option<bool>,
    /// Chat with tools: what reads the model's text for calls.
    pub tool_calls: Option<tools::CallReader>,
    /// Interactive or deferred (`service_tier: flex`, batch lines).
    pub tier: crate::engine::ServiceTier,
}

pub(super) const CHAT_ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

pub fn validate_chat(
    ChatRequest {
        common: c,
        chat: req,
    }: ChatRequest,
    model: &ServedModel,
    limits: &ApiLimits,
) -> Result<(ValidRequest, ResponsePlan), ApiError> {
    let tool_req = tools::read(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    if req.functions.as_ref().is_some_and(|f| !f.is_null()) {
        return Err(ApiError::invalid(
            "functions",
            "function calling is not supported by this server",
        ));
    }
    let format =
        output_format::requested(req.response_format.as_ref(), c.structured_outputs.as_ref())?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "unknown role `{}`; expected one of {}",
                    m.role,
                    CHAT_ROLES.join(", ")
                ),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => return Err(ApiError::invalid(format!("messages[{i}].content[{j}].text"), "a text part needs `text`")),
                        (other, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}].type"),
                                format!("content part type `{other}` is not supported; this model reads text only"),
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role.clone()
        };
        messages.push(ChatMessage {
            role,
            content,
            tool_calls: template_tool_calls(i, m.tool_calls.as_deref())?,
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        });
    }
    let template = model
        .template
        .as_ref()
        .ok_or(crate::engine::EngineError::NoChatTemplate)?;
    let mut kwargs: serde_json::Map<String, serde_json::Value> = req
        .chat_template_kwargs
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let call_format = CallFormat::of_template(template.source());
    if let Some(t) = &tool_req {
        // With `none` the template still sees the tools (as OpenAI's models do); the calls
        // are neither described by us, forced, nor read.
        kwargs.insert("tools".into(), t.raw.clone());
        if t.reads_calls() && !template.source().contains("tools") {
            // The template cannot show the tools: a system message describes them.
            match messages.first_mut().filter(|m| m.role == "system") {
                Some(system) => {
                    system.content = format!("{}\n\n{}", system.content, t.system_prompt())
                }
                None => messages.insert(0, ChatMessage::new("system", t.system_prompt())),
            }
        }
    }
    let text = template.render_with(&messages, &kwargs)?;
    let reasoning = template
        .uses_reasoning_tags()
        .then(|| super::reasoning::starts_inside(&text));
    let forced = tool_req
        .as_ref()
        .and_then(|t| t.forced_grammar(call_format, &|s| special_or_literal(model, s), reasoning));
    let format = match (format, forced) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "a required or named `tool_choice` cannot be combined with an output format",
            ))
        }
        (Some(f), None) => Some(f),
        (None, Some(g)) => Some(output_format::Requested::new(g, "tool_choice")),
        (None, None) => None,
    };
    let prompt = model.tokenizer.encode(&text).map_err(ApiError::internal)?;

    let top_logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, _) => None,
        (true, k) => Some(in_range(
            "top_logprobs",
            k.unwrap_or(0),
            0,
            limits.max_top_logprobs as i64,
        )? as usize),
    };
    if req.max_completion_tokens.is_some()
        && c.max_tokens.is_some()
        && req.max_completion_tokens != c.max_tokens
    {
        return Err(ApiError::invalid(
            "max_completion_tokens",
            "`max_tokens` and `max_completion_tokens` disagree; send one",
        ));
    }
    let (max_tokens_field, max_tokens) = match req.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", c.max_tokens),
    };
    let (mut valid, plan) = common(
        &c,
        prompt,
        max_tokens_field,
        max_tokens,
        None,
        top_logprobs,
        model,
        limits,
    )?;
    // A template with reasoning: the format constrains the answer, not the reasoning.
    let format = match reasoning {
        Some(inside) => format.map(|f| f.after_reasoning(inside)),
        None => format,
    };
    valid.constraint = output_format::compile(format, model)?;
    Ok((
        valid,
        ResponsePlan {
            reasoning,
            tool_calls: tool_req
                .filter(|t| t.reads_calls())
                .map(|t| t.reader(call_format)),
            ..plan
        },
    ))
}

pub fn validate_completion(
    CompletionRequest {
        common: c,
        completion: req,
    }: CompletionRequest,
    model: &ServedModel,
    limits: &ApiLimits,
) -> Result<(ValidRequest, ResponsePlan), ApiError> {
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid(
            "echo",
            "`echo` is not supported by this server",
        ));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported by this server",
        ));
    }
    if req.best_of.is_some_and(|b| b != 1 && Some(b) != c.n) {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` other than `n` is not supported",
        ));
    }
    let vocab = model.tokenizer.vocab_size();
    let prompt = match req.prompt {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Prompt::Text(t)) => model.tokenizer.encode(&t).map_err(ApiError::internal)?,
        Some(Prompt::Texts(mut ts)) if ts.len() == 1 => model
            .tokenizer
            .encode(&ts.remove(0))
            .map_err(ApiError::internal)?,
        Some(Prompt::Tokens(ids)) => ids,
        Some(Prompt::TokenLists(mut ls)) if ls.len() == 1 => ls.remove(0),
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "one prompt per request: send a string or a list of token ids",
            ))
        }
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let top_logprobs = req
        .logprobs
        .map(|k| in_range("logprobs", k, 0, limits.max_top_logprobs as i64).map(|k| k as usize))
        .transpose()?;
    let format = output_format::requested(None, c.structured_outputs.as_ref())?;
    // The legacy endpoint's default, as OpenAI's and vLLM's.
    let (mut valid, plan) = common(
        &c,
        prompt,
        "max_tokens",
        c.max_tokens,
        Some(16),
        top_logprobs,
        model,
        limits,
    )?;
    valid.constraint = output_format::compile(format, model)?;
    Ok((valid, plan))
}

#[allow(clippy::too_many_arguments)]
fn common(
    c: &CommonParams,
    prompt: Vec<u32>,
    max_tokens_field: &str,
    max_tokens: Option<i64>,
    default_max_tokens: Option<usize>,
    top_logprobs: Option<usize>,
    model: &ServedModel,
    limits: &ApiLimits,
) -> Result<(ValidRequest, ResponsePlan), ApiError> {
    let served = model.id.as_str();
    if let Some(requested) = c.model.as_deref() {
        if requested != served && !requested.is_empty() && requested != "default" {
            return Err(ApiError::model_not_found(requested, served));
        }
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let ctx = model.context_length;
    let room = ctx.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the prompt is {} tokens long; this model's context window is {ctx} tokens",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let cap = limits.max_tokens.unwrap_or(ctx).min(ctx);
    let max_tokens = match max_tokens {
        Some(m) => {
            let m = in_range(max_tokens_field, m, 1, cap as i64)? as usize;
            if m > room {
                return Err(ApiError::invalid(
                    max_tokens_field,
                    format!(
                        "this model's context window is {ctx} tokens; the prompt takes {} and `{max_tokens_field}` asks for {m} more",
                        prompt.len()
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            m
        }
        None => default_max_tokens.unwrap_or(usize::MAX).min(room).min(cap),
    };
    let n = in_range("n", c.n.unwrap_or(1), 1, limits.max_n as i64)? as usize;
    let stop = match &c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {} stop sequences", limits.max_stop_sequences),
        ));
    }
    if let Some(long) = stop
        .iter()
        .find(|s| s.len() > MAX_STOP_BYTES || s.is_empty())
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "each stop sequence must be 1 to {MAX_STOP_BYTES} bytes; got {}",
                long.len()
            ),
        ));
    }
    let vocab = model.tokenizer.vocab_size();
    let mut logit_bias = Vec::new();
    for (k, &v) in c.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("key `{k}` is not a token id of this model (0..{vocab})"),
                )
            })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("bias {v} for token {k} is outside [-100, 100]"),
            ));
        }
        logit_bias.push((id, v));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) => in_range("top_k", k, 1, i64::MAX)? as usize,
    };
    let params = SamplingParams {
        temperature: f_range("temperature", c.temperature, 1.0, 0.0, 2.0)?,
        top_p: f_range("top_p", c.top_p, 1.0, 0.0, 1.0)?,
        top_k,
        min_p: f_range("min_p", c.min_p, 0.0, 0.0, 1.0)?,
        seed: c.seed.map(|s| s as u64),
        presence_penalty: f_range("presence_penalty", c.presence_penalty, 0.0, -2.0, 2.0)?,
        frequency_penalty: f_range("frequency_penalty", c.frequency_penalty, 0.0, -2.0, 2.0)?,
        repetition_penalty: f_range("repetition_penalty", c.repetition_penalty, 1.0, 0.01, 10.0)?,
        logit_bias,
        top_logprobs,
    };
    let plan = ResponsePlan {
        model: served.to_string(),
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs: top_logprobs.is_some(),
        prompt_tokens: prompt.len(),
        reasoning: None,
        tool_calls: None,
        tier: c.service_tier.map(|t| t.tier()).unwrap_or_default(),
    };
    let tier = plan.tier;
    let ignore_eos = c.ignore_eos.unwrap_or(false);
    Ok((
        ValidRequest {
            prompt,
            max_tokens,
            n,
            stop,
            params,
            ignore_eos,
            request_id: String::new(),
            constraint: None,
            tier,
            priority: in_range(
                "priority",
                c.priority.unwrap_or(0),
                limits.priority_range.0,
                limits.priority_range.1,
            )?,
        },
        plan,
    ))
}

fn in_range(field: &str, v: i64, lo: i64, hi: i64) -> Result<i64, ApiError> {
    if v < lo || v > hi {
        Err(ApiError::invalid(
            field,
            format!("`{field}` must be between {lo} and {hi}; got {v}"),
        ))
    } else {
        Ok(v)
    }
}

fn f_range(field: &str, v: Option<f32>, default: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || v < lo || v > hi {
        Err(ApiError::invalid(
            field,
            format!("`{field}` must be between {lo} and {hi}; got {v}"),
        ))
    } else {
        Ok(v)
    }
}

/// An assistant message's calls as templates print them: OpenAI's shape, with the arguments
/// as a JSON object when they hold one.
fn template_tool_calls(
    i: usize,
    calls: Option<&[serde_json::Value]>,
) -> Result<Vec<serde_json::Value>, ApiError> {
    let mut out = Vec::new();
    for (j, call) in calls.unwrap_or_default().iter().enumerate() {
        let f = call.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(|n| n.as_str());
        let Some(name) = name else {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_calls[{j}].function.name"),
                "a tool call needs `function.name`",
            ));
        };
        let arguments = match f.and_then(|f| f.get("arguments")) {
            Some(serde_json::Value::String(s)) => {
                serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
            }
            Some(v) => v.clone(),
            None => serde_json::json!({}),
        };
        out.push(serde_json::json!({
            "id": call.get("id").cloned().unwrap_or(serde_json::Value::Null),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
    }
    Ok(out)
}

/// `text` as a Lark terminal: the special token when the tokenizer has it as one (grammar
/// text never matches a special token), else a string literal.
fn special_or_literal(model: &ServedModel, text: &str) -> String {
    let hf = model.tokenizer.hf();
    match hf
        .get_added_tokens_decoder()
        .iter()
        .find(|(_, t)| t.special && t.content == text)
    {
        Some((id, _)) => format!("<[{id}]>"),
        None => serde_json::to_string(text).unwrap_or_default(),
    }
}
