//! SentencePiece vocabularies from GGUF metadata (`tokenizer.ggml.model` = `llama`: Gemma,
//! Phi-3, Mistral 7B, Llama 2), as llama.cpp tokenizes them: a space before the text and
//! after every special token, spaces written `▁`, then adjacent pieces merged while their
//! concatenation is in the vocabulary, the highest-scoring first; a character no piece covers
//! becomes its UTF-8 bytes (`<0xXX>` tokens).
//!
//! Built as the equivalent Hugging Face pipeline (what transformers' converter does for
//! Llama's tokenizer): a BPE whose merges are every split of every piece into two pieces,
//! ranked by the whole piece's score, with byte fallback.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::EngineError;

/// llama.cpp's byte tokens (`<0x0A>`): type 6 in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_BYTE: u32 = 6;

/// The tokenizer of a SentencePiece vocabulary: `tokens` with their `scores` and `types`
/// (GGUF's token types; byte and control tokens take part in no merge), with a space put
/// before the text when `add_space_prefix` (llama.cpp's default).
pub fn spm_tokenizer(
    tokens: &[String],
    scores: &[f32],
    types: &[u32],
    add_space_prefix: bool,
) -> Result<Tokenizer, EngineError> {
    let err = |m: String| EngineError::Tokenizer(m);
    if scores.len() != tokens.len() {
        return Err(err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let mergeable = |i: usize| types.get(i).is_none_or(|&t| t == 1);
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    // Every way to make a piece from two pieces, ranked by the piece's score (highest first),
    // then by the two parts' ids, as transformers' SentencePiece extractor ranks them.
    let mut merges: Vec<(f32, u32, u32, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !mergeable(i) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                if mergeable(a as usize) && mergeable(b as usize) {
                    merges.push((scores[i], a, b, i));
                }
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, a, b, _)| (tokens[a as usize].clone(), tokens[b as usize].clone()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let has_bytes = types.contains(&TOKEN_TYPE_BYTE);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(has_bytes);
    if ids.contains_key("<unk>") {
        builder = builder.unk_token("<unk>".into()).fuse_unk(true);
    }
    let bpe = builder
        .build()
        .map_err(|e| err(format!("cannot build the SentencePiece tokenizer: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| err(format!("tokenizer normalizer: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| err(format!("tokenizer normalizer: {e}")))?;
    // `▁` back to spaces, byte tokens to bytes; the leading space stays (as llama.cpp's
    // token pieces keep it): a generated token's text is what the model wrote.
    let decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}
