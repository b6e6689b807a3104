//! A JSON body's fields read one by one, for the translators (Responses, Messages) that read
//! another API's shapes by hand: each error names the field and what it must be.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::error::ApiError;

fn wrong(field: &str, what: &str) -> ApiError {
    ApiError::invalid(field, format!("`{field}` must be {what}"))
}

pub fn opt_str<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong(field, "a string")),
    }
}

pub fn opt_bool(v: &Value, field: &str) -> Result<Option<bool>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(wrong(field, "a boolean")),
    }
}

pub fn opt_f32(v: &Value, field: &str) -> Result<Option<f32>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_f64()
            .map(|f| Some(f as f32))
            .ok_or_else(|| wrong(field, "a number")),
    }
}

/// An integer (`16` or `16.0`).
pub fn opt_int(v: &Value, field: &str) -> Result<Option<i64>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| wrong(field, "an integer")),
    }
}

/// The chat template's reasoning switch (`enable_thinking`, as Qwen3's templates read it).
pub fn thinking(on: Option<bool>) -> Option<HashMap<String, Value>> {
    on.map(|on| HashMap::from([("enable_thinking".to_string(), json!(on))]))
}

/// A request's `tools` as chat function tools: `check` refuses a tool this API does not serve
/// (by its `type`), `fields` names each chat field as this API does (`input_schema` for
/// `parameters`); fields left out or null stay out.
pub fn chat_tools(
    v: Option<&Value>,
    check: impl Fn(usize, &Value) -> Result<(), ApiError>,
    fields: &[(&str, &str)],
) -> Result<Option<Value>, ApiError> {
    let Some(list) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = list.as_array().ok_or_else(|| wrong("tools", "a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        check(i, t)?;
        let mut f = serde_json::Map::new();
        for (theirs, chat) in fields {
            if let Some(x) = t.get(*theirs).filter(|x| !x.is_null()) {
                f.insert(chat.to_string(), x.clone());
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Some(Value::Array(out)))
}
