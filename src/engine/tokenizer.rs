//! Text ⇄ token ids: a Hugging Face `tokenizers::Tokenizer` loaded from `tokenizer.json`
//! beside the model, or built from GGUF metadata (`tokenizer.ggml.*`), plus the set of
//! end-of-generation tokens and an incremental decoder for streams.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::EngineError;

/// GGUF token types (llama.cpp's `llama_token_type`) that are special: control tokens such
/// as `<|im_start|>` and user-defined ones. They are matched whole in prompt text.
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Token texts that end a generation wherever they appear in a vocabulary, as llama.cpp
/// treats them: chat templates end turns with them even when `eos_token_id` names another.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<|eom_id|>",
];

/// The model's tokenizer and the ids that end a generation.
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
    vocab_size: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, taking BOS/EOS from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let token_of = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(text)
        };
        let bos = token_of("bos_token");
        let mut eog: Vec<u32> = token_of("eos_token").into_iter().collect();
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        add_named_end_tokens(&mut eog, |t| inner.token_to_id(t));
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            bos,
            add_bos,
            end_of_generation: eog,
            vocab_size,
        })
    }

    /// Builds the tokenizer from GGUF metadata: byte-level BPE (`tokenizer.ggml.model` =
    /// `gpt2`) with the pre-tokenizer named by `tokenizer.ggml.pre` (an unknown one is
    /// refused, since a wrong guess silently changes every token id), or a SentencePiece
    /// vocabulary (`llama`, see [`super::spm`]).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self, EngineError> {
        let err = |m: String| EngineError::Tokenizer(m);
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| err(format!("GGUF metadata lacks `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| err(e.to_string()))?
            .clone();
        if model != "gpt2" && model != "llama" {
            return Err(err(format!(
                "tokenizer.ggml.model `{model}` is not supported (byte-level BPE, `gpt2`, and \
                 SentencePiece, `llama`, are); put a tokenizer.json beside the model instead"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>, EngineError> {
            get(k)?
                .to_vec()
                .map_err(|e| err(format!("{k}: {e}")))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| err(format!("{k}: {e}"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| {
                v.iter()
                    .map(|t| crate::model::gguf_int(t).unwrap_or(1) as u32)
                    .collect()
            })
            .unwrap_or_default();
        let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
        let mut inner = if model == "llama" {
            let scores: Vec<f32> = get("tokenizer.ggml.scores")?
                .to_vec()
                .map_err(|e| err(format!("tokenizer.ggml.scores: {e}")))?
                .iter()
                .map(|v| {
                    v.to_f32()
                        .map_err(|e| err(format!("tokenizer.ggml.scores: {e}")))
                })
                .collect::<Result<_, _>>()?;
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            super::spm::spm_tokenizer(&tokens, &scores, &types, add_space_prefix)?
        } else {
            byte_level_bpe(md, &tokens, &strings("tokenizer.ggml.merges")?)?
        };

        // Control and user-defined tokens are matched whole, never split into bytes.
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .filter_map(|(i, _)| tokens.get(i).map(|t| AddedToken::from(t.clone(), true)))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| err(e.to_string()))?;

        let id = |k: &str| md.get(k).and_then(crate::model::gguf_int).map(|v| v as u32);
        let mut eog: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id(k))
        .collect();
        add_named_end_tokens(&mut eog, |t| inner.token_to_id(t));
        // llama.cpp's default: SentencePiece vocabularies start with BOS, byte-level ones not.
        let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos,
            end_of_generation: eog,
            vocab_size,
        })
    }

    /// Token ids of `text`. Special-token texts in it (as a chat template writes them) become
    /// their single ids; BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            if let Some(bos) = self.bos {
                if !text.starts_with(&self.token_text(bos)) {
                    ids.push(bos);
                }
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// The vocabulary entry of one token as text (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id])
    }

    /// Ids that end a generation (EOS and end-of-turn tokens).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The Hugging Face tokenizer underneath (the grammar engine reads its vocabulary).
    pub fn hf(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<(), EngineError> {
        self.inner
            .save(path, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_text(&self) -> Option<String> {
        self.bos
            .map(|b| self.inner.id_to_token(b).unwrap_or_default())
    }

    pub fn eos_text(&self) -> Option<String> {
        self.end_of_generation
            .first()
            .map(|&e| self.inner.id_to_token(e).unwrap_or_default())
    }
}

/// A byte-level BPE from its vocabulary and merges, with the pre-tokenizer the GGUF names.
fn byte_level_bpe(
    md: &HashMap<String, Value>,
    tokens: &[String],
    merges: &[String],
) -> Result<Tokenizer, EngineError> {
    let err = |m: String| EngineError::Tokenizer(m);
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| err(format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("cannot build BPE: {e}")))?;
    let mut inner = Tokenizer::new(bpe);
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(|e| err(e.to_string()))?.clone(),
        None => "default".to_string(),
    };
    let (pre_tokenizer, nfc) = pre_tokenizer_for(&pre)?;
    if nfc {
        inner
            .with_normalizer(Some(NFC))
            .map_err(|e| err(e.to_string()))?;
    }
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

fn add_named_end_tokens(eog: &mut Vec<u32>, lookup: impl Fn(&str) -> Option<u32>) {
    for text in END_OF_GENERATION_TEXTS {
        if let Some(id) = lookup(text) {
            if !eog.contains(&id) {
                eog.push(id);
            }
        }
    }
}

/// The pre-tokenizer llama.cpp uses for each `tokenizer.ggml.pre` value, written as the
/// equivalent Hugging Face pipeline; the flag says whether NFC normalization comes first.
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool), EngineError> {
    // GPT-2's split, which ByteLevel applies itself when `use_regex` is true.
    let byte_level_gpt2 = || ByteLevel::new(false, true, true);
    let split_then_bytes =
        |regex: &str, nfc: bool| -> Result<(PreTokenizerWrapper, bool), EngineError> {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            Ok((
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into(),
                nfc,
            ))
        };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        // SmolLM, StarCoder and kin: each digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => Ok((
            Sequence::new(vec![Digits::new(true).into(), byte_level_gpt2().into()]).into(),
            false,
        )),
        "gpt-2" | "gpt2" | "default" | "phi-2" | "jina-es" | "jina-de" | "olmo" => Ok((byte_level_gpt2().into(), false)),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" => split_then_bytes(LLAMA3, false),
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2, true),
        other => Err(EngineError::Tokenizer(format!(
            "GGUF pre-tokenizer `{other}` is not known to idlerig; put the model's tokenizer.json beside it"
        ))),
    }
}

/// Turns a growing list of token ids into text deltas that are always whole UTF-8: a token
/// that ends mid-character is held until the character completes.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds `id`; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read]);
        let now = tok.decode(&self.ids[self.prefix..]);
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let delta = now[before.len()..].to_string();
            // Keep a few tokens of left context: byte-level decoders may need it to place
            // spaces, and it bounds the work of each step.
            self.prefix = self.read;
            self.read = self.ids.len();
            Some(delta)
        } else {
            None
        }
    }

    /// Whatever is still held at the end of a generation, invalid bytes shown as U+FFFD.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Option<String> {
        if self.read == self.ids.len() {
            return None;
        }
        let before = tok.decode(&self.ids[self.prefix..self.read]);
        let now = tok.decode(&self.ids[self.prefix..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        now.get(before.len()..)
            .map(str::to_string)
            .filter(|s| !s.is_empty())
    }
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_pre_tokenizers_are_built_and_unknown_ones_refused() {
        for pre in ["smollm", "gpt2", "llama-bpe", "qwen2"] {
            assert!(pre_tokenizer_for(pre).is_ok(), "{pre}");
        }
        let err = pre_tokenizer_for("made-up-pre")
            .err()
            .expect("an unknown pre-tokenizer is refused");
        assert!(err.to_string().contains("made-up-pre"), "{err}");
    }

    #[test]
    fn an_unknown_gguf_tokenizer_is_refused_with_a_clear_error() {
        let mut md = HashMap::new();
        // T5's Unigram vocabularies (`t5`) are not among those idlerig builds.
        md.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("t5".into()),
        );
        let err = TextTokenizer::from_gguf(&md)
            .err()
            .expect("an unknown tokenizer model is refused");
        assert!(
            err.to_string().contains("`t5`") && err.to_string().contains("tokenizer.json"),
            "the error names it and says what to do instead: {err}"
        );
    }
}
