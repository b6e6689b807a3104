//! The OpenAPI 3.1 document at `GET /openapi.json`, generated with utoipa from the handlers'
//! annotations and the wire types themselves (requests in [`super::wire`], answers in
//! [`super::bodies`]), so what it promises is what the server sends. Streams are described
//! event by event, as OpenAPI 3.1 tools (schemathesis among them) read `text/event-stream`.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{json, Value};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Ref, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::bodies::{ChatCompletionChunk, Completion, ErrorResponse};
use super::validate::{ApiLimits, CHAT_ROLES};
use super::{AppState, LoadState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "idlerig",
        description = "An OpenAI-compatible inference server that mines SHA-256d in the gaps \
                       between requests. With API keys configured, `/v1/*` needs \
                       `Authorization: Bearer KEY`."
    ),
    paths(
        super::handlers::chat_completions,
        super::handlers::completions,
        super::embeddings::embeddings,
        super::usage::usage,
        super::files::upload,
        super::files::list,
        super::files::retrieve,
        super::files::content,
        super::files::delete,
        super::batches::create,
        super::batches::list,
        super::batches::retrieve,
        super::batches::cancel,
        super::responses::create,
        super::responses::routes::retrieve,
        super::responses::routes::delete,
        super::responses::routes::cancel,
        super::responses::routes::input_items,
        super::anthropic::messages,
        super::anthropic::count_tokens,
        super::tokenize::tokenize,
        super::tokenize::detokenize,
        super::handlers::list_models,
        super::handlers::status,
        super::handlers::health,
        super::handlers::metrics,
        openapi_json,
        super::dashboard::page,
    ),
    components(schemas(ErrorResponse, ChatCompletionChunk, Completion)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// `Authorization: Bearer KEY`, as OpenAI clients send it.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "x-api-key",
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
            );
    }
}

/// The document for this server: the static part is generated once; the served model's
/// name, the operator's limits and, once it is loaded, the model's vocabulary are filled in,
/// so that a client (or a fuzzer) sees the values validation takes.
/// The facts of the embedding model the document describes, when one is served.
pub struct EmbeddingFacts<'a> {
    pub id: &'a str,
    pub vocab: usize,
    pub dimensions: usize,
    pub max_tokens: usize,
}

pub fn document(
    models: &[&str],
    limits: &ApiLimits,
    vocab: Option<usize>,
    embedding: Option<EmbeddingFacts<'_>>,
) -> String {
    static STATIC: LazyLock<Value> =
        LazyLock::new(|| serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null));
    let mut doc = STATIC.clone();
    let schemas = &mut doc["components"]["schemas"];
    let common = &mut schemas["CommonParams"]["properties"];
    let mut names = json!(models);
    if let Some(names) = names.as_array_mut() {
        names.extend([json!(""), json!("default"), Value::Null]);
    }
    common["model"]["enum"] = names;
    common["n"]["maximum"] = json!(limits.max_n);
    if let Some(max) = limits.max_tokens {
        common["max_tokens"]["maximum"] = json!(max);
    }
    common["priority"]["minimum"] = json!(limits.priority_range.0);
    common["priority"]["maximum"] = json!(limits.priority_range.1);
    common["logit_bias"]["additionalProperties"] =
        json!({"type": "number", "minimum": -100, "maximum": 100});
    common["logit_bias"]["propertyNames"] = json!({"type": "string", "pattern": "^[0-9]{1,9}$"});
    // A stop string is 1–256 bytes: 64 characters are at most 256 bytes.
    let stop = json!({"type": "string", "minLength": 1, "maxLength": 64});
    schemas["OneOrMany"]["oneOf"] =
        json!([stop, {"type": "array", "items": stop, "maxItems": limits.max_stop_sequences}]);
    schemas["WireMessage"]["properties"]["role"]["enum"] = json!(CHAT_ROLES);
    schemas["ContentPart"]["properties"]["type"]["enum"] = json!(["text"]);
    // The same facts for the Responses and Messages requests.
    let common = &schemas["CommonParams"]["properties"];
    let (model_names, max_tokens) = (
        common["model"]["enum"].clone(),
        common["max_tokens"].clone(),
    );
    let responses = &mut schemas["ResponsesRequest"]["properties"];
    responses["model"]["enum"] = model_names.clone();
    responses["max_output_tokens"] = max_tokens.clone();
    responses["metadata"]["maxProperties"] = json!(16);
    responses["metadata"]["propertyNames"] = json!({"maxLength": 64});
    responses["metadata"]["additionalProperties"] = json!({"type": "string", "maxLength": 512});
    let messages = &mut schemas["MessagesRequest"]["properties"];
    messages["model"]["enum"] = model_names;
    if let Some(max) = limits.max_tokens {
        messages["max_tokens"]["maximum"] = json!(max);
    }
    messages["stop_sequences"]["items"] = stop.clone();
    messages["stop_sequences"]["maxItems"] = json!(limits.max_stop_sequences);
    schemas["AnthropicMessageDoc"]["properties"]["role"]["enum"] = json!(["user", "assistant"]);
    let top = limits.max_top_logprobs;
    schemas["ChatFields"]["properties"]["top_logprobs"]["maximum"] = json!(top);
    // What the server takes, and what it refuses, written down so that clients see it before
    // they send it: function tools, output formats, no echo, suffix or best_of, one prompt.
    let chat = &mut schemas["ChatFields"]["properties"];
    chat["tools"] = json!({"type": ["array", "null"], "description": "Functions the model may call.",
        "items": {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object"}}}}}});
    chat["tool_choice"] = json!({"anyOf": [
        {"enum": ["none", "auto", "required", null]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]});
    chat["functions"] = json!({"description": "Not supported.", "type": "null"});
    chat["response_format"] = json!({"type": ["object", "null"],
        "description": "`text`, `json_object`, or `json_schema` with a JSON Schema (and `strict`).",
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {
                "name": {"type": "string"},
                "schema": {"type": "object"},
                "strict": {"type": ["boolean", "null"]}}, "required": ["schema"]}},
        "required": ["type"]});
    schemas["CommonParams"]["properties"]["structured_outputs"] = json!({"type": ["object", "null"],
        "description": "vLLM's extension: exactly one of `json` (a JSON Schema), `regex`, `choice`, `grammar` (Lark) or `json_object: true`.",
        "properties": {
            "json": {"type": "object"},
            "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "grammar": {"type": "string"},
            "json_object": {"enum": [true]}},
        "minProperties": 1, "maxProperties": 1});
    let completion = &mut schemas["CompletionFields"];
    completion["required"] = json!(["prompt"]);
    let fields = &mut completion["properties"];
    fields["prompt"] = json!({"$ref": "#/components/schemas/Prompt"});
    fields["logprobs"]["maximum"] = json!(top);
    fields["echo"] =
        json!({"description": "Not supported: absent, null or false.", "enum": [false, null]});
    fields["suffix"] = json!({"description": "Not supported (no fill-in-the-middle): absent, null or empty.", "enum": ["", null]});
    fields["best_of"] = json!({"description": "Only equal to `n`; best left out.", "type": ["integer", "null"], "minimum": 1});
    let mut token = json!({"type": "integer", "minimum": 0});
    if let Some(vocab) = vocab {
        token["maximum"] = json!(vocab.saturating_sub(1));
    }
    let tokens = json!({"type": "array", "items": token, "minItems": 1});
    let text = json!({"type": "string", "minLength": 1});
    schemas["Prompt"]["oneOf"] = json!([
        text,
        tokens,
        {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": tokens, "minItems": 1, "maxItems": 1},
    ]);
    match embedding {
        None => {
            if let Some(paths) = doc["paths"].as_object_mut() {
                paths.remove("/v1/embeddings");
            }
        }
        Some(e) => {
            let schemas = &mut doc["components"]["schemas"];
            let req = &mut schemas["EmbeddingRequest"]["properties"];
            req["model"]["enum"] = json!([e.id, "", null]);
            req["encoding_format"]["enum"] = json!(["float", "base64", null]);
            req["dimensions"]["enum"] = json!([e.dimensions, null]);
            // [CLS] and [SEP] come on top of the input's own tokens.
            let room = e.max_tokens.saturating_sub(2).max(1);
            let text = json!({"type": "string", "minLength": 1, "maxLength": room});
            let token =
                json!({"type": "integer", "minimum": 0, "maximum": e.vocab.saturating_sub(1)});
            let tokens = json!({"type": "array", "items": token, "minItems": 1, "maxItems": room});
            schemas["EmbeddingInput"]["oneOf"] = json!([
                text,
                {"type": "array", "items": text, "minItems": 1, "maxItems": super::embeddings::MAX_INPUTS},
                tokens,
                {"type": "array", "items": tokens, "minItems": 1, "maxItems": super::embeddings::MAX_INPUTS},
            ]);
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "Operations",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)))]
pub async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    // Token ids every served chat model takes: below the smallest vocabulary.
    let vocab = state
        .models
        .iter()
        .map(|m| match &*m.load.borrow() {
            LoadState::Ready(m) => Some(m.tokenizer.vocab_size()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .and_then(|v| v.into_iter().min());
    (
        [(header::CONTENT_TYPE, "application/json")],
        document(
            &state.chat_ids().collect::<Vec<_>>(),
            &state.limits,
            vocab,
            state.embedder.as_ref().map(|e| EmbeddingFacts {
                id: &e.id,
                vocab: e.vocab_size,
                dimensions: e.dimensions,
                max_tokens: e.max_tokens,
            }),
        ),
    )
}

/// One server-sent event whose data is a JSON `chunk`, an error envelope (the stream failed
/// or timed out), or `[DONE]`.
fn event_schema(chunk: &str) -> RefOr<Schema> {
    let json_of = |name: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/json")
            .content_schema(Some(Ref::from_schema_name(name)))
    };
    let data = AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["[DONE]"])),
        )
        .item(json_of(chunk))
        .item(json_of("ErrorResponse"));
    ObjectBuilder::new()
        .property("data", data)
        .required("data")
        .into()
}

/// An event of a chat stream.
pub struct ChatEvent;

impl PartialSchema for ChatEvent {
    fn schema() -> RefOr<Schema> {
        event_schema("ChatCompletionChunk")
    }
}

impl ToSchema for ChatEvent {}

/// An event of a legacy completion stream.
pub struct CompletionEvent;

impl PartialSchema for CompletionEvent {
    fn schema() -> RefOr<Schema> {
        event_schema("Completion")
    }
}

impl ToSchema for CompletionEvent {}

/// One event of a typed stream (Anthropic's, the Responses API's): its name, and its data,
/// a JSON object with a `type`.
fn typed_event_schema() -> RefOr<Schema> {
    let object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .required("type");
    let data = ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .content_schema(Some(object));
    ObjectBuilder::new()
        .property("event", ObjectBuilder::new().schema_type(Type::String))
        .property("data", data)
        .required("data")
        .into()
}

/// An event of an Anthropic Messages stream.
pub struct AnthropicEvent;

impl PartialSchema for AnthropicEvent {
    fn schema() -> RefOr<Schema> {
        typed_event_schema()
    }
}

impl ToSchema for AnthropicEvent {}

/// An event of a Responses stream.
pub struct ResponseEvent;

impl PartialSchema for ResponseEvent {
    fn schema() -> RefOr<Schema> {
        typed_event_schema()
    }
}

impl ToSchema for ResponseEvent {}

#[cfg(test)]
mod tests {
    use super::*;

    /// `document()` patches schemas by name: each must be what utoipa generated (a renamed
    /// type would otherwise be patched into a new, unused schema without a word).
    #[test]
    fn every_schema_the_document_patches_is_generated_and_used() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for (name, field) in [
            ("CommonParams", "model"),
            ("CommonParams", "n"),
            ("CommonParams", "max_tokens"),
            ("CommonParams", "priority"),
            ("CommonParams", "logit_bias"),
            ("CommonParams", "structured_outputs"),
            ("ChatFields", "top_logprobs"),
            ("ChatFields", "tools"),
            ("ChatFields", "tool_choice"),
            ("ChatFields", "functions"),
            ("ChatFields", "response_format"),
            ("CompletionFields", "prompt"),
            ("CompletionFields", "logprobs"),
            ("CompletionFields", "echo"),
            ("CompletionFields", "suffix"),
            ("CompletionFields", "best_of"),
            ("WireMessage", "role"),
            ("ContentPart", "type"),
            ("EmbeddingRequest", "model"),
            ("ResponsesRequest", "model"),
            ("ResponsesRequest", "max_output_tokens"),
            ("ResponsesRequest", "metadata"),
            ("MessagesRequest", "model"),
            ("MessagesRequest", "max_tokens"),
            ("MessagesRequest", "stop_sequences"),
            ("AnthropicMessageDoc", "role"),
            ("EmbeddingRequest", "encoding_format"),
            ("EmbeddingRequest", "dimensions"),
        ] {
            assert!(
                schemas[name]["properties"][field].is_object(),
                "{name}.{field} is not generated"
            );
        }
        assert!(schemas["OneOrMany"]["oneOf"].is_array());
        assert!(schemas["Prompt"]["oneOf"].is_array());
        assert!(schemas["EmbeddingInput"]["oneOf"].is_array());
        let refs = |name: &str| schemas[name]["allOf"].to_string();
        assert!(refs("ChatCompletionRequest").contains("CommonParams"));
        assert!(refs("ChatCompletionRequest").contains("ChatFields"));
        assert!(refs("CompletionRequest").contains("CompletionFields"));
    }

    #[test]
    fn the_document_is_openapi_3_1_and_lists_every_route() {
        let facts = EmbeddingFacts {
            id: "e",
            vocab: 30522,
            dimensions: 384,
            max_tokens: 256,
        };
        let doc: Value = serde_json::from_str(&document(
            &["m"],
            &ApiLimits::default(),
            Some(49152),
            Some(facts),
        ))
        .unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let without: Value =
            serde_json::from_str(&document(&["m"], &ApiLimits::default(), None, None)).unwrap();
        assert!(
            without["paths"]["/v1/embeddings"].is_null(),
            "no embedding model, no /v1/embeddings in the document"
        );
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/v1/status",
            "/v1/files",
            "/v1/files/{file_id}/content",
            "/v1/batches",
            "/v1/batches/{batch_id}/cancel",
            "/v1/responses",
            "/v1/responses/{response_id}",
            "/v1/responses/{response_id}/cancel",
            "/v1/responses/{response_id}/input_items",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/tokenize",
            "/detokenize",
            "/health",
            "/metrics",
            "/openapi.json",
            "/",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is missing");
        }
        let schemas = &doc["components"]["schemas"];
        assert!(schemas["ChatCompletionRequest"].is_object());
        assert_eq!(
            schemas["CommonParams"]["properties"]["model"]["enum"][0], "m",
            "the served model is filled in"
        );
        assert_eq!(
            schemas["WireMessage"]["properties"]["role"]["enum"][0],
            "system"
        );
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["securitySchemes"]["x-api-key"].is_object());
    }
}
