//! idlerig's BERT encoder against llama.cpp's, on all-MiniLM-L6-v2: 50 varied sentences,
//! recorded by `tests/reference/make_embedding_reference.py` (how it was made is written
//! there). idlerig's tokenizer must give llama.cpp's token ids, and its embedding (mean
//! pooling and normalisation, as the model's sentence-transformers modules say) must have a
//! cosine of at least 0.9999 with llama.cpp's, each sentence on its own and all of them
//! batched together.

mod common;

use base64::Engine as _;
use idlerig::embed::Embedder;
use serde_json::Value;

fn minilm() -> Embedder {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
    Embedder::load(&dir, "all-MiniLM-L6-v2".into(), &candle_core::Device::Cpu)
        .expect("models/fetch has put all-MiniLM-L6-v2 in place")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_match_llama_cpp() {
    let reference: Value =
        serde_json::from_str(include_str!("reference/minilm_embeddings.json")).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 50);
    let embedder = minilm();
    assert_eq!(embedder.dimensions, 384);
    let mut inputs = Vec::new();
    let mut wanted = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = embedder.tokenize(text).unwrap();
        let theirs: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(ids, theirs, "tokens of {text:?}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(case["embedding_f32_base64"].as_str().unwrap())
            .unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        inputs.push(ids);
        wanted.push(v);
    }
    // Each on its own, then all in one request (padded batches of mixed lengths).
    let mut alone = Vec::new();
    for ids in &inputs {
        alone.push(embedder.embed(vec![ids.clone()]).await.unwrap().remove(0));
    }
    let batched = embedder.embed(inputs.clone()).await.unwrap();
    let mut worst = f64::MAX;
    for (i, want) in wanted.iter().enumerate() {
        for (how, got) in [("alone", &alone[i]), ("batched", &batched[i])] {
            let c = cosine(got, want);
            worst = worst.min(c);
            assert!(
                c >= 0.9999,
                "{how} {:?}: cosine {c}",
                cases[i]["text"].as_str().unwrap()
            );
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
        }
    }
    eprintln!("all-MiniLM-L6-v2 vs llama.cpp: lowest cosine over 50 sentences {worst:.7}");
}
