//! Stratum V1, sans I/O: JSON-RPC lines to typed messages and back. The client task and the
//! embedded pool do the networking; everything here is pure and unit-tested on real exchanges.
//!
//! Messages are one JSON object per line. Requests carry an `id`, notifications `id: null`,
//! responses `result` and `error` (`[code, "message", data]` by Stratum convention).

use serde_json::{json, Value};

use super::StratumError;

/// The longest line accepted from a peer; a longer one is a protocol error, not a memory bomb.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// One decoded line.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A call that expects a response (`id` set) or a notification (`id` null).
    Call {
        id: Option<Value>,
        method: String,
        params: Vec<Value>,
    },
    /// A response to one of our calls.
    Response {
        id: Value,
        result: Value,
        error: Option<RpcError>,
    },
}

/// An error object as pools send it: `[code, "message", traceback]` (or `{code, message}`).
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn to_value(&self) -> Value {
        json!([self.code, self.message, null])
    }
}

/// Standard share-rejection codes (the ones cgminer, ckpool and public pools use).
pub mod codes {
    pub const OTHER: i64 = 20;
    pub const JOB_NOT_FOUND: i64 = 21;
    pub const DUPLICATE: i64 = 22;
    pub const LOW_DIFFICULTY: i64 = 23;
    pub const UNAUTHORIZED: i64 = 24;
    pub const NOT_SUBSCRIBED: i64 = 25;
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Result<Message, StratumError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(StratumError::Protocol(format!(
            "line of {} bytes exceeds the limit",
            line.len()
        )));
    }
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| StratumError::Protocol(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| StratumError::Protocol("not a JSON object".into()))?;
    if let Some(method) = obj.get("method").and_then(Value::as_str) {
        let params = match obj.get("params") {
            Some(Value::Array(a)) => a.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(other) => vec![other.clone()],
        };
        let id = obj.get("id").filter(|i| !i.is_null()).cloned();
        return Ok(Message::Call {
            id,
            method: method.to_string(),
            params,
        });
    }
    let id = obj
        .get("id")
        .cloned()
        .ok_or_else(|| StratumError::Protocol("neither a call nor a response".into()))?;
    let error = match obj.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(RpcError {
            code: a.first().and_then(Value::as_i64).unwrap_or(codes::OTHER),
            message: a
                .get(1)
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string(),
        }),
        Some(Value::Object(o)) => Some(RpcError {
            code: o
                .get("code")
                .and_then(Value::as_i64)
                .unwrap_or(codes::OTHER),
            message: o
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string(),
        }),
        Some(other) => Some(RpcError {
            code: codes::OTHER,
            message: other.to_string(),
        }),
    };
    Ok(Message::Response {
        id,
        result: obj.get("result").cloned().unwrap_or(Value::Null),
        error,
    })
}

/// A call as one line, newline included.
pub fn encode_call(id: Option<u64>, method: &str, params: Value) -> String {
    let mut s = json!({ "id": id, "method": method, "params": params }).to_string();
    s.push('\n');
    s
}

/// A response as one line, newline included.
pub fn encode_response(id: &Value, result: Value, error: Option<&RpcError>) -> String {
    let mut s =
        json!({ "id": id, "result": result, "error": error.map(RpcError::to_value) }).to_string();
    s.push('\n');
    s
}

/// `mining.notify` params, as strings, checked for shape (hex is decoded by the miner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub job_id: String,
    pub prevhash: String,
    pub coinb1: String,
    pub coinb2: String,
    pub merkle_branch: Vec<String>,
    pub version: String,
    pub nbits: String,
    pub ntime: String,
    pub clean_jobs: bool,
}

impl Notify {
    pub fn from_params(p: &[Value]) -> Result<Self, StratumError> {
        let s = |i: usize, name: &str| -> Result<String, StratumError> {
            p.get(i)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    StratumError::Protocol(format!(
                        "mining.notify: param {i} ({name}) is not a string"
                    ))
                })
        };
        let branch = p
            .get(4)
            .and_then(Value::as_array)
            .ok_or_else(|| {
                StratumError::Protocol("mining.notify: merkle_branch is not a list".into())
            })?
            .iter()
            .map(|b| {
                b.as_str().map(str::to_string).ok_or_else(|| {
                    StratumError::Protocol("mining.notify: merkle branch is not a string".into())
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Notify {
            job_id: s(0, "job_id")?,
            prevhash: s(1, "prevhash")?,
            coinb1: s(2, "coinb1")?,
            coinb2: s(3, "coinb2")?,
            merkle_branch: branch,
            version: s(5, "version")?,
            nbits: s(6, "nbits")?,
            ntime: s(7, "ntime")?,
            clean_jobs: p.get(8).and_then(Value::as_bool).unwrap_or(false),
        })
    }

    pub fn to_params(&self) -> Value {
        json!([
            self.job_id,
            self.prevhash,
            self.coinb1,
            self.coinb2,
            self.merkle_branch,
            self.version,
            self.nbits,
            self.ntime,
            self.clean_jobs
        ])
    }

    pub fn to_job(&self) -> Result<crate::mining::Job, StratumError> {
        crate::mining::Job::from_notify(
            &self.job_id,
            &self.prevhash,
            &self.coinb1,
            &self.coinb2,
            &self.merkle_branch,
            &self.version,
            &self.nbits,
            &self.ntime,
            self.clean_jobs,
        )
        .map_err(|e| StratumError::Protocol(e.to_string()))
    }
}

/// The result of `mining.subscribe`: `[[subscriptions…], extranonce1, extranonce2_size]`.
pub fn parse_subscribe_result(result: &Value) -> Result<(Vec<u8>, usize), StratumError> {
    let a = result
        .as_array()
        .ok_or_else(|| StratumError::Protocol("subscribe result is not a list".into()))?;
    let en1 = a
        .get(1)
        .and_then(Value::as_str)
        .ok_or_else(|| StratumError::Protocol("subscribe: no extranonce1".into()))?;
    let en1 = hex::decode(en1)
        .map_err(|e| StratumError::Protocol(format!("subscribe: extranonce1 not hex: {e}")))?;
    let size = a
        .get(2)
        .and_then(Value::as_u64)
        .ok_or_else(|| StratumError::Protocol("subscribe: no extranonce2_size".into()))?;
    if !(1..=16).contains(&size) {
        return Err(StratumError::Protocol(format!(
            "subscribe: extranonce2_size {size} out of range"
        )));
    }
    Ok((en1, size as usize))
}

/// The difficulty in `mining.set_difficulty` (a number; some pools send an integer).
pub fn parse_difficulty(params: &[Value]) -> Result<f64, StratumError> {
    params
        .first()
        .and_then(Value::as_f64)
        .filter(|d| d.is_finite() && *d > 0.0)
        .ok_or_else(|| StratumError::Protocol(format!("set_difficulty: bad difficulty {params:?}")))
}

/// `mining.submit` params: worker, job id, extranonce2, ntime, nonce (hex, as cgminer sends
/// them) and, with version rolling, the rolled bits.
pub fn submit_params(worker: &str, share: &crate::mining::Share) -> Value {
    let mut p = vec![
        json!(worker),
        json!(share.job_id),
        json!(hex::encode(&share.extranonce2)),
        json!(format!("{:08x}", share.ntime)),
        json!(format!("{:08x}", share.nonce)),
    ];
    if let Some(bits) = share.version_bits {
        p.push(json!(format!("{bits:08x}")));
    }
    Value::Array(p)
}

/// The fields of a `mining.submit`, as the pool reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    pub worker: String,
    pub job_id: String,
    pub extranonce2: Vec<u8>,
    pub ntime: u32,
    pub nonce: u32,
    pub version_bits: Option<u32>,
}

impl Submit {
    pub fn from_params(p: &[Value]) -> Result<Self, StratumError> {
        let s = |i: usize| {
            p.get(i)
                .and_then(Value::as_str)
                .ok_or_else(|| StratumError::Protocol(format!("mining.submit: param {i} missing")))
        };
        let hex32 = |i: usize| -> Result<u32, StratumError> {
            crate::mining::job::hex_u32("submit", s(i)?)
                .map_err(|e| StratumError::Protocol(e.to_string()))
        };
        Ok(Submit {
            worker: s(0)?.to_string(),
            job_id: s(1)?.to_string(),
            extranonce2: hex::decode(s(2)?)
                .map_err(|e| StratumError::Protocol(format!("mining.submit: extranonce2: {e}")))?,
            ntime: hex32(3)?,
            nonce: hex32(4)?,
            version_bits: if p.len() > 5 { Some(hex32(5)?) } else { None },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exchange of the Stratum V1 docs (slush pool), line by line.
    #[test]
    fn parses_the_documented_exchange() {
        let sub = parse_line(r#"{"id": 1, "result": [ [ ["mining.set_difficulty", "b4b6693b72a50c7116db18d6497cac52"], ["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"]], "08000002", 4], "error": null}"#).unwrap();
        let Message::Response { id, result, error } = sub else {
            panic!("a response")
        };
        assert_eq!((id, error), (json!(1), None));
        assert_eq!(
            parse_subscribe_result(&result).unwrap(),
            (vec![8, 0, 0, 2], 4)
        );

        let diff = parse_line(r#"{ "id": null, "method": "mining.set_difficulty", "params": [2]}"#)
            .unwrap();
        let Message::Call {
            id: None,
            method,
            params,
        } = diff
        else {
            panic!("a notification")
        };
        assert_eq!(method, "mining.set_difficulty");
        assert_eq!(parse_difficulty(&params).unwrap(), 2.0);

        let notify = parse_line(r#"{"params": ["bf", "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000", "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008", "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000", [], "00000002", "1c2ac4af", "504e86b9", false], "id": null, "method": "mining.notify"}"#).unwrap();
        let Message::Call { params, .. } = notify else {
            panic!()
        };
        let n = Notify::from_params(&params).unwrap();
        assert_eq!(
            (n.job_id.as_str(), n.ntime.as_str(), n.clean_jobs),
            ("bf", "504e86b9", false)
        );
        assert_eq!(
            Notify::from_params(n.to_params().as_array().unwrap()).unwrap(),
            n
        );
        let job = n.to_job().unwrap();
        assert_eq!(job.nbits, 0x1c2ac4af);

        let submit = parse_line(r#"{"params": ["slush.miner1", "bf", "00000001", "504e86ed", "b2957c02"], "id": 4, "method": "mining.submit"}"#).unwrap();
        let Message::Call {
            id: Some(id),
            params,
            ..
        } = submit
        else {
            panic!()
        };
        assert_eq!(id, json!(4));
        let s = Submit::from_params(&params).unwrap();
        assert_eq!(
            (s.ntime, s.nonce, s.extranonce2.clone()),
            (0x504e86ed, 0xb2957c02, vec![0, 0, 0, 1])
        );
        let share = crate::mining::Share {
            generation: 0,
            job_id: "bf".into(),
            extranonce1: vec![8, 0, 0, 2],
            extranonce2: vec![0, 0, 0, 1],
            ntime: 0x504e86ed,
            nonce: 0xb2957c02,
            version_bits: None,
            hash: [0; 32],
            difficulty: 1.0,
            is_block: false,
        };
        assert_eq!(
            submit_params("slush.miner1", &share),
            json!(["slush.miner1", "bf", "00000001", "504e86ed", "b2957c02"])
        );

        let ok = parse_line(r#"{"error": null, "id": 4, "result": true}"#).unwrap();
        assert_eq!(
            ok,
            Message::Response {
                id: json!(4),
                result: json!(true),
                error: None
            }
        );
        let rejected =
            parse_line(r#"{"id": 5, "result": null, "error": [23, "Low difficulty share", null]}"#)
                .unwrap();
        let Message::Response { error: Some(e), .. } = rejected else {
            panic!()
        };
        assert_eq!((e.code, e.message.as_str()), (23, "Low difficulty share"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for line in [
            "",
            "nonsense",
            "[1,2]",
            "{}",
            "{\"id\": 1",
            &"x".repeat(MAX_LINE_BYTES + 1),
        ] {
            assert!(parse_line(line).is_err(), "{line:.40}");
        }
        assert!(Notify::from_params(&[json!(1)]).is_err());
        assert!(parse_subscribe_result(&json!([[], "zz", 4])).is_err());
        assert!(parse_difficulty(&[json!(-1)]).is_err());
    }

    #[test]
    fn encodes_lines() {
        assert_eq!(
            encode_call(Some(1), "mining.subscribe", json!(["idlerig/0.1"])),
            "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"idlerig/0.1\"]}\n"
        );
        assert_eq!(
            encode_call(None, "mining.set_difficulty", json!([2])),
            "{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[2]}\n"
        );
        let err = RpcError {
            code: codes::DUPLICATE,
            message: "Duplicate share".into(),
        };
        assert_eq!(
            encode_response(&json!(4), Value::Null, Some(&err)),
            "{\"id\":4,\"result\":null,\"error\":[22,\"Duplicate share\",null]}\n"
        );
    }
}
