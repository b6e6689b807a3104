//! `idlerig bench grammar`: what constrained decoding costs per token. With the real model
//! loaded, it times (1) the grammar's mask alone, over a walk through each format with random
//! allowed tokens, and (2) as the reference in the same run, the engine's decode time per token
//! for the same requests with and without the grammar.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::config::BenchGrammarArgs;
use crate::engine::{
    load_model, OutputFormat, SamplingParams, SeqEvent, ServedModel, ValidRequest,
};
use crate::model::device_from_name;
use crate::stats::quantile;

/// The formats measured: a nested JSON schema, any JSON object, a regex.
fn formats() -> Vec<(&'static str, OutputFormat)> {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "age", "tags", "address"]});
    vec![
        (
            "json_schema",
            OutputFormat::JsonSchema {
                schema,
                strict: true,
            },
        ),
        ("json_object", OutputFormat::JsonObject),
        (
            "regex",
            OutputFormat::Regex("([a-z]+ ){1,40}[0-9]{3}-[0-9]{4}".into()),
        ),
    ]
}

pub async fn run(args: BenchGrammarArgs) -> Result<Value, String> {
    let device = device_from_name(&args.model.device).map_err(|e| e.to_string())?;
    crate::model::quant::Isa::choose(args.model.cpu_isa);
    let (path, cfg) = (args.model.model_path()?, args.model.engine_config());
    let model = tokio::task::spawn_blocking(move || load_model(&path, &device, cfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let vocab = model.tokenizer.vocab_size();
    let mut out = serde_json::Map::new();
    for (name, format) in formats() {
        let mask = mask_walk(&model, &format, vocab, args.tokens)?;
        let plain = engine_decode(&model, None, args.tokens, args.requests).await?;
        let constrained = engine_decode(&model, Some(&format), args.tokens, args.requests).await?;
        out.insert(
            name.into(),
            json!({
                "mask_us_p50": mask.0, "mask_us_p99": mask.1, "mask_us_mean": mask.2, "masked_tokens": mask.3,
                "decode_ms_per_token_plain": plain, "decode_ms_per_token_constrained": constrained,
                "constrained_over_plain": constrained / plain,
            }),
        );
    }
    Ok(json!({"bench": "grammar", "model": model.id, "vocab": vocab, "formats": out}))
}

/// Masks and commits random allowed tokens until the format is complete or `tokens` were
/// taken, restarting as needed; returns the mask's p50, p99 and mean in µs and the count.
fn mask_walk(
    model: &ServedModel,
    format: &OutputFormat,
    vocab: usize,
    tokens: usize,
) -> Result<(f64, f64, f64, usize), String> {
    let factory = model
        .grammar
        .as_ref()
        .ok_or("this model has no grammar support")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut times = Vec::with_capacity(tokens);
    let mut constraint = factory.constraint(format)?;
    let mut row = vec![0f32; vocab];
    while times.len() < tokens {
        row.iter_mut().for_each(|l| *l = 0.0);
        let t = Instant::now();
        constraint.mask(&mut row)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        let allowed: Vec<u32> = (0..vocab as u32)
            .filter(|&i| row[i as usize].is_finite())
            .collect();
        let id = allowed[rng.random_range(0..allowed.len())];
        if constraint.commit(id)? || model.tokenizer.is_end_of_generation(id) {
            constraint = factory.constraint(format)?;
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    Ok((
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        mean,
        times.len(),
    ))
}

/// Decode milliseconds per token of `requests` requests of up to `tokens` tokens through the
/// engine, one at a time (time from the first token to the last, over the tokens between).
async fn engine_decode(
    model: &ServedModel,
    format: Option<&OutputFormat>,
    tokens: usize,
    requests: usize,
) -> Result<f64, String> {
    let prompt = model
        .tokenizer
        .encode("Describe a person as JSON.")
        .map_err(|e| e.to_string())?;
    let (mut spent, mut decoded) = (0.0, 0usize);
    for r in 0..requests {
        let constraint = format
            .map(|f| {
                model
                    .grammar
                    .as_ref()
                    .ok_or("no grammar support")?
                    .constraint(f)
            })
            .transpose()?;
        let request = ValidRequest {
            prompt: prompt.clone(),
            max_tokens: tokens,
            n: 1,
            stop: Vec::new(),
            params: SamplingParams {
                seed: Some(r as u64),
                ..SamplingParams::default()
            },
            ignore_eos: constraint.is_none(),
            tier: Default::default(),
            request_id: format!("bench-grammar-{r}"),
            priority: 0,
            constraint,
        };
        let mut events = model.backend.submit(request).map_err(|e| e.to_string())?;
        let (mut first, mut n) = (None, 0usize);
        while let Some(e) = events.recv().await {
            match e {
                SeqEvent::Token { .. } => {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                }
                SeqEvent::Finished { .. } => break,
                SeqEvent::Failed { message } => return Err(message),
            }
        }
        if let (Some(t), true) = (first, n > 1) {
            spent += t.elapsed().as_secs_f64() * 1e3;
            decoded += n - 1;
        }
    }
    Ok(if decoded > 0 {
        spent / decoded as f64
    } else {
        f64::NAN
    })
}
