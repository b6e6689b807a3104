"""Make the SentencePiece tokenizer reference that tests/spm_tokenizer.rs compares with.

GGUF files of Gemma, Phi-3, Mistral 7B and Llama 2 carry a SentencePiece vocabulary
(`tokenizer.ggml.model` = `llama`: pieces, scores, token types) that idlerig must tokenize as
llama.cpp does. No such model is reachable here, so this script builds a realistic one: the
30,522 WordPiece entries of all-MiniLM-L6-v2 (models/all-minilm-l6-v2/vocab.txt) turned into
SentencePiece pieces (`##ing` → `ing`, `word` → `▁word`), scored by their rank, with `<unk>`,
`<s>`, `</s>`, the 256 byte tokens `<0x00>`…`<0xFF>` and two control tokens
(`<start_of_turn>`, `<end_of_turn>`). It writes a vocabulary-only GGUF with the `gguf` package
(gguf 0.19.0) and records how llama.cpp (llama-cpp-python 0.3.36, built as in
make_arch_reference.py) tokenizes 50 sentences and a set of edge cases (spaces, newlines,
accents, CJK, emoji through byte fallback, special tokens in text), BOS included.

    ~/.cache/idlerig/refvenv/bin/python tests/reference/make_spm_reference.py
"""
import json
import pathlib

import gguf
import llama_cpp
from llama_cpp import Llama

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT_GGUF = HERE / "spm_vocab.gguf"
OUT_JSON = HERE / "spm_tokens.json"

EDGE = [
    "Hello world",
    "  two leading spaces",
    "trailing space ",
    "multiple   spaces   inside",
    "new\nline and\n\ndouble",
    "tab\tseparated",
    "Unicode: café, naïve, Ünïcödé",
    "中文字符 and 日本語",
    "emoji 🙂 and ✓ check",
    "digits 1234567890 and 3.14159",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "punctuation!?... (brackets) [square] {curly}",
    "MiXeD CaSe WoRdS",
    "a",
    " ",
    "https://example.com/path?query=1&x=2",
]


def main():
    sentences = json.loads((HERE / "minilm_embeddings.json").read_text())["cases"]
    texts = [c["text"] for c in sentences] + EDGE
    vocab = (ROOT / "models/all-minilm-l6-v2/vocab.txt").read_text(encoding="utf-8").split("\n")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)
    pieces = ["▁"]
    for v in vocab:
        if not v or v.startswith("[") and v.endswith("]"):
            continue
        pieces.append(v[2:] if v.startswith("##") else "▁" + v)
    for rank, p in enumerate(pieces):
        if p in seen:
            continue
        seen.add(p)
        tokens.append(p)
        types.append(1)
        scores.append(-float(rank))
    for control in ["<start_of_turn>", "<end_of_turn>"]:
        tokens.append(control)
        types.append(3)
        scores.append(0.0)
    w = gguf.GGUFWriter(str(OUT_GGUF), "llama")
    w.add_name("idlerig SentencePiece test vocabulary")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    llm = Llama(model_path=str(OUT_GGUF), vocab_only=True, verbose=False)
    cases = [{"text": t, "tokens": llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)}
             for t in texts]
    OUT_JSON.write_text(json.dumps({"how": __doc__, "llama_cpp_python": llama_cpp.__version__,
                                    "vocab_size": len(tokens), "cases": cases}, indent=1,
                                   ensure_ascii=False) + "\n")
    print(f"{OUT_GGUF.name}: {len(tokens)} tokens, {OUT_GGUF.stat().st_size} bytes; "
          f"{len(cases)} texts")


if __name__ == "__main__":
    main()
