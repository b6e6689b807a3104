//! SentencePiece vocabularies from GGUF metadata (Gemma, Phi-3, Mistral 7B, Llama 2) against
//! llama.cpp's own tokenizer: `tests/reference/make_spm_reference.py` built a 29,785-piece
//! vocabulary (how is written there), and recorded llama.cpp's token ids for 50 sentences and
//! 16 edge cases (spaces, newlines, accents, CJK and emoji through byte fallback, special
//! tokens inside text). idlerig must give the same ids, BOS included, and decode them back to
//! the text (with the space SentencePiece puts before it and after each special token).

use candle_core::quantized::gguf_file;
use idlerig::engine::TextTokenizer;
use serde_json::Value;

#[test]
fn sentencepiece_vocabularies_tokenize_as_llama_cpp_does() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let mut file = std::fs::File::open(root.join("spm_vocab.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tok = TextTokenizer::from_gguf(&content.metadata).expect("a SentencePiece vocabulary");
    let reference: Value = serde_json::from_str(include_str!("reference/spm_tokens.json")).unwrap();
    assert_eq!(
        tok.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize
    );
    let mut differ = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let got = tok.encode(text).unwrap();
        if got != want {
            differ.push(format!("{text:?}:\n  ours  {got:?}\n  llama {want:?}"));
            continue;
        }
        // Decoding gives the text back, as SentencePiece wrote it (spaces before the text
        // and after special tokens included), BOS aside.
        let back = tok.decode(&got[1..]);
        let written = format!(" {text}")
            .replace("<start_of_turn>", "<start_of_turn> ")
            .replace("<end_of_turn>", "<end_of_turn> ")
            .replacen(" <start_of_turn>", "<start_of_turn>", 1);
        assert_eq!(back, written, "{text:?}");
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
