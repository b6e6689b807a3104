//! Constrained decoding. A request's output format (any JSON object, a JSON schema, a regex,
//! a Lark grammar or a list of choices) becomes, for each of its sequences, an llguidance
//! matcher: before a token is sampled it masks the logits to the tokens the grammar allows,
//! and it takes each sampled token. The token trie is built once per model from our own
//! tokenizer's bytes, so a tokenizer that exists only in GGUF metadata works as well as a
//! `tokenizer.json`. The mask is computed on the CPU, on the engine thread, beside the forward
//! pass.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tokenizers::{DecoderWrapper, Tokenizer};

use super::TextTokenizer;

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON document valid against `schema`. Not `strict`: keywords the grammar cannot
    /// enforce are warned about and ignored instead of refused.
    JsonSchema { schema: Value, strict: bool },
    /// Text matching the whole regex (Rust syntax).
    Regex(String),
    /// Text in the language of a Lark grammar (llguidance's dialect).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// A JSON schema with llguidance's options: compact JSON (`,` and `:`, no spaces), so
/// that a small model cannot loop on whitespace inside a document; lenient unless strict.
fn with_options(mut schema: Value, lenient: bool) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "lenient": lenient}),
        );
    }
    schema
}

impl OutputFormat {
    /// The format applied only once the model's reasoning is over: free text up to
    /// `</think>` (opened by `<think>` unless the output starts inside it), then the format.
    /// A Lark grammar is the client's own and stays as it is: it must allow the reasoning.
    pub fn after_reasoning(self, inside: bool) -> OutputFormat {
        let answer = match &self {
            OutputFormat::JsonObject => {
                format!("%json {}", with_options(json!({"type": "object"}), false))
            }
            OutputFormat::JsonSchema { schema, strict } => {
                format!("%json {}", with_options(schema.clone(), !strict))
            }
            OutputFormat::Regex(rx) => lark_regex(rx),
            OutputFormat::Choice(choices) => choice_alternatives(choices),
            OutputFormat::Lark(_) => return self,
        };
        OutputFormat::Lark(lark_after_reasoning(inside, &answer))
    }

    fn grammar(&self) -> TopLevelGrammar {
        let json = |schema: Value, lenient: bool| {
            TopLevelGrammar::from_json_schema(with_options(schema, lenient))
        };
        match self {
            OutputFormat::JsonObject => json(json!({"type": "object"}), false),
            OutputFormat::JsonSchema { schema, strict } => json(schema.clone(), !strict),
            OutputFormat::Regex(rx) => TopLevelGrammar::from_regex(rx),
            OutputFormat::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
            OutputFormat::Choice(choices) => {
                TopLevelGrammar::from_lark(format!("start: {}", choice_alternatives(choices)))
            }
        }
    }
}

/// A Lark grammar whose `answer` rule comes after the model's reasoning: free text up to
/// `</think>` (opened by `<think>` unless the output starts inside it; optional then).
pub fn lark_after_reasoning(inside: bool, answer: &str) -> String {
    let start = if inside {
        "reasoning[lazy]: /(.|\\n)*/ \"</think>\"\nstart: reasoning /[ \\t\\n]*/ answer"
    } else {
        "reasoning[lazy]: \"<think>\" /(.|\\n)*/ \"</think>\"\nstart: (reasoning /[ \\t\\n]*/)? answer"
    };
    format!("{start}\nanswer: {answer}\n")
}

/// A regex as a Lark terminal: `/…/`, with escapes kept as they are and only a bare `/` and
/// line breaks escaped; the empty regex is the empty string.
fn lark_regex(rx: &str) -> String {
    if rx.is_empty() {
        return "\"\"".into();
    }
    let mut out = String::with_capacity(rx.len() + 2);
    out.push('/');
    let mut chars = rx.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push('\\');
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            '/' => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('/');
    out
}

/// `"a" | "b"`: JSON string literals are valid Lark string literals (DEL, which JSON leaves
/// as it is, is escaped: Lark strings refuse it).
fn choice_alternatives(choices: &[String]) -> String {
    choices
        .iter()
        .map(|c| {
            serde_json::to_string(c)
                .unwrap_or_default()
                .replace('\u{7f}', "\\u007f")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Builds matchers for one model's tokenizer. Shared by the API's validation (which compiles
/// each request's grammar, so that a bad one is a 400) and the engine.
pub struct GrammarFactory {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarFactory")
    }
}

impl GrammarFactory {
    /// `logits_width`: the model's output size (at least the tokenizer's vocabulary).
    pub fn new(tokenizer: &TextTokenizer, logits_width: usize) -> Result<Self, String> {
        let env = token_env(tokenizer, logits_width)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("{e:#}"))?;
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(Self { factory })
    }

    /// A matcher for `format`, or why the format is unusable (an invalid schema, regex or
    /// grammar), in one line for the client.
    pub fn constraint(&self, format: &OutputFormat) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(format.grammar())
            .map_err(|e| first_line(&format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(first_line(&e));
        }
        Ok(Constraint { matcher })
    }
}

/// llguidance's errors may carry a backtrace or a grammar dump after the first line.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("invalid grammar").to_string()
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    /// An independent copy, for another choice of the same request.
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Sets every token the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| first_line(&e.to_string()))?;
        let n = mask.len();
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            if i < n && mask.is_allowed(i as TokenId) {
                any |= l.is_finite();
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if any {
            Ok(())
        } else {
            Err("the grammar allows no token here".into())
        }
    }

    /// Takes the sampled token; `true` when the output is complete (nothing may follow).
    pub fn commit(&mut self, token: u32) -> Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

/// The tokenizer as llguidance sees it: each token's bytes, special tokens marked, and the
/// end-of-generation tokens allowed wherever the grammar may end.
fn token_env(tokenizer: &TextTokenizer, logits_width: usize) -> Result<TokEnv, String> {
    let hf = tokenizer.hf();
    let n = logits_width.max(hf.get_vocab_size(true));
    let words = token_bytes(hf, n)?;
    let eog: Vec<u32> = tokenizer
        .end_of_generation()
        .iter()
        .copied()
        .filter(|&t| (t as usize) < n)
        .collect();
    let first = *eog
        .first()
        .ok_or("the tokenizer has no end-of-generation token")?;
    let trie = TokTrie::from(&TokRxInfo::new(n as u32, first), &words).with_eos_tokens(&eog);
    Ok(Arc::new(TrieEnv { trie }))
}

/// Our trie. Tokenizing forced text is left to llguidance's greedy fallback: masks then
/// allow every tokenization of the forced bytes, which is always correct.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The raw bytes of every id below `n`. Byte-level BPE (GPT-2's byte↔unicode alphabet) and
/// SentencePiece (`▁` for a space, `<0xNN>` byte tokens) vocabularies are read; special tokens
/// get llguidance's 0xFF marker, so that grammar text never matches them; ids past the
/// tokenizer get a placeholder that never matches.
fn token_bytes(tok: &Tokenizer, n: usize) -> Result<Vec<Vec<u8>>, String> {
    let (mut byte_level, mut sentencepiece) = (false, false);
    if let Some(d) = tok.get_decoder() {
        scan_decoder(d, &mut byte_level, &mut sentencepiece);
    }
    if !byte_level && !sentencepiece {
        return Err("the tokenizer's decoder is neither byte-level nor SentencePiece".into());
    }
    let alphabet = gpt2_char_to_byte();
    let added = tok.get_added_tokens_decoder();
    let special = |text: &str| {
        let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        b.extend_from_slice(text.as_bytes());
        b
    };
    Ok((0..n as u32)
        .map(|id| {
            if let Some(a) = added.get(&id) {
                return if a.special {
                    special(&a.content)
                } else {
                    a.content.as_bytes().to_vec()
                };
            }
            let Some(name) = tok.id_to_token(id) else {
                return special(&format!("<[{id}]>"));
            };
            if byte_level {
                // A name outside the byte alphabet can never be produced: no bytes.
                name.chars()
                    .map(|c| alphabet.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_default()
            } else if let Some(b) = sentencepiece_byte(&name) {
                vec![b]
            } else {
                name.replace('▁', " ").into_bytes()
            }
        })
        .collect())
}

fn scan_decoder(d: &DecoderWrapper, byte_level: &mut bool, sentencepiece: &mut bool) {
    match d {
        DecoderWrapper::ByteLevel(_) => *byte_level = true,
        DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => *sentencepiece = true,
        DecoderWrapper::Sequence(s) => {
            for d in s.get_decoders() {
                scan_decoder(d, byte_level, sentencepiece);
            }
        }
        _ => {}
    }
}

/// `<0x0A>` → 0x0A.
fn sentencepiece_byte(name: &str) -> Option<u8> {
    let hex = name.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the rest
/// for the code points from 256 on, in order.
fn gpt2_char_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::new();
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            b as char
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpt2_alphabet_maps_every_byte_once() {
        let map = gpt2_char_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn regexes_become_lark_terminals_with_their_escapes_kept() {
        assert_eq!(lark_regex(r"https?:\/\/x"), r"/https?:\/\/x/");
        assert_eq!(lark_regex("a/b"), r"/a\/b/");
        assert_eq!(lark_regex("a\nb"), r"/a\nb/");
        assert_eq!(lark_regex(""), r#""""#);
        assert_eq!(lark_regex(r"\d+"), r"/\d+/");
    }

    #[test]
    fn sentencepiece_byte_tokens_are_read() {
        assert_eq!(sentencepiece_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(sentencepiece_byte("<0xZZ>"), None);
        assert_eq!(sentencepiece_byte("▁the"), None);
    }
}
