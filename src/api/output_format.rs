//! The output format a request asks for: OpenAI's `response_format` (chat) and vLLM's
//! `structured_outputs` extension (both endpoints: `json`, `regex`, `choice`, `grammar`,
//! `json_object`). It is read into the engine's [`OutputFormat`] and compiled against the
//! model's grammar factory here, so that a bad schema, regex or grammar is a 400 that names
//! its field, never a failure inside the engine.

use serde_json::Value;

use crate::engine::{Constraint, OutputFormat, ServedModel};

use super::error::ApiError;

/// A requested format and the field it came from (for errors).
pub struct Requested {
    format: OutputFormat,
    param: &'static str,
}

/// Reads `response_format` and `structured_outputs`; at most one may ask for a format.
pub fn requested(
    response_format: Option<&Value>,
    structured_outputs: Option<&Value>,
) -> Result<Option<Requested>, ApiError> {
    let a = response_format
        .filter(|v| !v.is_null())
        .map(from_response_format)
        .transpose()?
        .flatten();
    let b = structured_outputs
        .filter(|v| !v.is_null())
        .map(from_structured_outputs)
        .transpose()?;
    match (a, b) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "structured_outputs",
            "send either `response_format` or `structured_outputs`, not both",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

impl Requested {
    /// A format the server sets itself (a forced tool call), reported under `param`.
    pub fn new(format: OutputFormat, param: &'static str) -> Self {
        Self { format, param }
    }

    /// The format applied only after the model's reasoning (see
    /// [`OutputFormat::after_reasoning`]).
    pub fn after_reasoning(self, inside: bool) -> Self {
        Self {
            format: self.format.after_reasoning(inside),
            ..self
        }
    }
}

/// Compiles the format for `model`: one constraint, copied for each choice by the engine.
pub fn compile(
    requested: Option<Requested>,
    model: &ServedModel,
) -> Result<Option<Constraint>, ApiError> {
    let Some(Requested { format, param }) = requested else {
        return Ok(None);
    };
    let factory = model.grammar.as_ref().ok_or_else(|| {
        ApiError::invalid(
            param,
            "this model's tokenizer cannot be constrained, so output formats are not available",
        )
    })?;
    factory
        .constraint(&format)
        .map(Some)
        .map_err(|e| ApiError::invalid(param, format!("invalid `{param}`: {e}")))
}

fn from_response_format(rf: &Value) -> Result<Option<Requested>, ApiError> {
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "response_format.type",
            "`response_format` needs a `type`: `text`, `json_object` or `json_schema`",
        )
    })?;
    let format = match kind {
        "text" => return Ok(None),
        "json_object" => OutputFormat::JsonObject,
        "json_schema" => {
            let js = rf.get("json_schema").filter(|v| v.is_object()).ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema",
                    "`json_schema` must be an object with a `schema`",
                )
            })?;
            let schema = js
                .get("schema")
                .filter(|s| s.is_object() || s.is_boolean())
                .cloned()
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "`schema` must be a JSON Schema object",
                    )
                })?;
            let strict = match js.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.strict",
                        "`strict` must be a boolean",
                    ))
                }
            };
            OutputFormat::JsonSchema { schema, strict }
        }
        other => {
            return Err(ApiError::invalid(
                "response_format.type",
                format!("response_format `{other}` is not supported; use `text`, `json_object` or `json_schema`"),
            ))
        }
    };
    Ok(Some(Requested {
        format,
        param: "response_format",
    }))
}

/// vLLM's shape: an object with exactly one of `json` (a schema, or its text), `regex`,
/// `choice`, `grammar` (Lark) or `json_object: true`.
fn from_structured_outputs(so: &Value) -> Result<Requested, ApiError> {
    const PARAM: &str = "structured_outputs";
    let obj = so
        .as_object()
        .ok_or_else(|| ApiError::invalid(PARAM, "`structured_outputs` must be an object"))?;
    let set: Vec<(&String, &Value)> = obj
        .iter()
        .filter(|(k, v)| {
            matches!(
                k.as_str(),
                "json" | "regex" | "choice" | "grammar" | "json_object"
            ) && !v.is_null()
                && **v != Value::Bool(false)
        })
        .collect();
    let [(key, value)] = set.as_slice() else {
        return Err(ApiError::invalid(
            PARAM,
            "`structured_outputs` needs exactly one of `json`, `regex`, `choice`, `grammar` or `json_object`",
        ));
    };
    let bad =
        |what: &str| ApiError::invalid(PARAM, format!("`structured_outputs.{key}` must be {what}"));
    let format = match key.as_str() {
        "json" => {
            let schema = match value {
                Value::String(text) => {
                    serde_json::from_str(text).map_err(|e| bad(&format!("a JSON Schema ({e})")))?
                }
                v => (*v).clone(),
            };
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("a JSON Schema object"));
            }
            OutputFormat::JsonSchema {
                schema,
                strict: true,
            }
        }
        "regex" => OutputFormat::Regex(value.as_str().ok_or_else(|| bad("a string"))?.into()),
        "grammar" => OutputFormat::Lark(value.as_str().ok_or_else(|| bad("a string"))?.into()),
        "choice" => {
            let choices: Option<Vec<String>> = value
                .as_array()
                .filter(|a| !a.is_empty())
                .and_then(|a| a.iter().map(|c| c.as_str().map(String::from)).collect());
            OutputFormat::Choice(choices.ok_or_else(|| bad("a non-empty list of strings"))?)
        }
        _ if **value == Value::Bool(true) => OutputFormat::JsonObject,
        _ => return Err(bad("true")),
    };
    Ok(Requested {
        format,
        param: PARAM,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn format_of(rf: Value) -> Result<Option<OutputFormat>, ApiError> {
        requested(Some(&rf), None).map(|r| r.map(|r| r.format))
    }

    #[test]
    fn response_formats_are_read_and_bad_ones_name_their_field() {
        assert_eq!(format_of(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            format_of(json!({"type": "json_object"})).unwrap(),
            Some(OutputFormat::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            format_of(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}})).unwrap(),
            Some(OutputFormat::JsonSchema { schema, strict: true })
        );
        for (bad, param) in [
            (json!({}), "response_format.type"),
            (json!({"type": "yaml"}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
                "response_format.json_schema.strict",
            ),
        ] {
            let e = format_of(bad.clone())
                .err()
                .unwrap_or_else(|| panic!("{bad} was accepted"));
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn structured_outputs_take_exactly_one_form() {
        let so = |v: Value| requested(None, Some(&v)).map(|r| r.map(|r| r.format));
        assert_eq!(
            so(json!({"regex": "[0-9]+"})).unwrap(),
            Some(OutputFormat::Regex("[0-9]+".into()))
        );
        assert_eq!(
            so(json!({"choice": ["yes", "no"]})).unwrap(),
            Some(OutputFormat::Choice(vec!["yes".into(), "no".into()]))
        );
        assert_eq!(
            so(json!({"json_object": true})).unwrap(),
            Some(OutputFormat::JsonObject)
        );
        assert!(matches!(
            so(json!({"json": "{\"type\": \"string\"}"})).unwrap(),
            Some(OutputFormat::JsonSchema { .. })
        ));
        for bad in [
            json!({}),
            json!({"regex": "a", "choice": ["b"]}),
            json!({"choice": []}),
            json!({"json": 5}),
            json!([1]),
        ] {
            assert!(so(bad.clone()).is_err(), "{bad} was accepted");
        }
        let both = requested(
            Some(&json!({"type": "json_object"})),
            Some(&json!({"regex": "a"})),
        );
        assert!(both.is_err(), "two formats at once");
    }
}
