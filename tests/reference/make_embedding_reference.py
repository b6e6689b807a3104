"""Make the embedding reference that tests/embeddings.rs compares idlerig's BERT encoder with.

The reference is llama.cpp's BERT (llama-cpp-python 0.3.36, built as in
make_arch_reference.py), an implementation independent of idlerig's: this script converts
models/all-minilm-l6-v2 (safetensors, f32) into a GGUF the way llama.cpp's
convert_hf_to_gguf.py does for BertModel (tensor names, the WordPiece vocabulary in
"phantom space" form, [CLS]/[SEP] added), with the `gguf` package, keeping f32 weights.
llama.cpp then tokenizes each of 50 varied sentences itself and embeds it with the model's
sentence-transformers pipeline: mean pooling over the tokens, then L2 normalisation.

Recorded per sentence: llama.cpp's token ids and the embedding (float32, base64).
    ~/.cache/idlerig/refvenv/bin/python tests/reference/make_embedding_reference.py
"""
import base64
import json
import pathlib
import struct
import tempfile

import gguf
import llama_cpp
import numpy as np
from llama_cpp import Llama

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models/all-minilm-l6-v2"
OUT = pathlib.Path(__file__).with_name("minilm_embeddings.json")

SENTENCES = [
    "The cat sits on the mat.",
    "A dog is playing in the park.",
    "Bitcoin miners compete to find a hash below the target.",
    "The GPU is idle between requests.",
    "How do I reset my password?",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "I love eating fresh strawberries in the summer.",
    "Quantum computers use qubits instead of bits.",
    "The stock market fell sharply on Monday.",
    "She plays the violin beautifully.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The meeting has been moved to Thursday afternoon.",
    "Please send me the report by Friday.",
    "Photosynthesis converts light into chemical energy.",
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models need a lot of data.",
    "It is raining heavily outside.",
    "He forgot his umbrella at the office.",
    "The recipe calls for two cups of flour.",
    "Mount Everest is the highest mountain on Earth.",
    "Can you recommend a good book?",
    "The train to London leaves at 9:45.",
    "Electric cars are becoming more affordable.",
    "My favourite colour is blue.",
    "The museum is closed on Mondays.",
    "Children were laughing in the playground.",
    "A large language model predicts the next token.",
    "The server returned a 503 error while loading.",
    "SHA-256 is a cryptographic hash function.",
    "The ocean covers most of the planet's surface.",
    "Don't forget to water the plants!",
    "What time does the pharmacy open tomorrow?",
    "The orchestra performed Beethoven's ninth symphony.",
    "Honey never spoils if it is stored properly.",
    "The spacecraft entered orbit around Mars.",
    "I'm learning to speak Spanish and Italian.",
    "Traffic was terrible on the highway this morning.",
    "The committee approved the new budget unanimously.",
    "A bicycle is an efficient way to travel in the city.",
    "Volcanoes can erupt without much warning.",
    "The software update fixed several security bugs.",
    "Our team won the championship last year.",
    "Coffee contains caffeine, which keeps you awake.",
    "The library has over a million books.",
    "Snow fell gently on the quiet village.",
    "Invoices must be paid within thirty days.",
    "The patient recovered quickly after surgery.",
    "Wind turbines generate electricity from moving air.",
    "embeddings",
]
assert len(SENTENCES) == 50


def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"])
    return out


def convert(dst):
    cfg = json.loads((MODEL / "config.json").read_text())
    t = safetensors(MODEL / "model.safetensors")
    w = gguf.GGUFWriter(str(dst), "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(0)
    vocab = (MODEL / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if vocab[-1] == "":
        vocab.pop()
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    types = [3 if v in specials else 1 for v in vocab]
    tokens = [v if v in specials else (v[2:] if v.startswith("##") else "\u2581" + v) for v in vocab]
    w.add_token_type_count(cfg["type_vocab_size"])
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(vocab.index("[CLS]"))
    w.add_eos_token_id(vocab.index("[SEP]"))
    w.add_sep_token_id(vocab.index("[SEP]"))
    w.add_unk_token_id(vocab.index("[UNK]"))
    w.add_pad_token_id(vocab.index("[PAD]"))
    w.add_mask_token_id(vocab.index("[MASK]"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    names = {
        "embeddings.word_embeddings.weight": "token_embd.weight",
        "embeddings.token_type_embeddings.weight": "token_types.weight",
        "embeddings.position_embeddings.weight": "position_embd.weight",
        "embeddings.LayerNorm.weight": "token_embd_norm.weight",
        "embeddings.LayerNorm.bias": "token_embd_norm.bias",
    }
    per_layer = {
        "attention.self.query": "attn_q", "attention.self.key": "attn_k",
        "attention.self.value": "attn_v", "attention.output.dense": "attn_output",
        "attention.output.LayerNorm": "attn_output_norm", "intermediate.dense": "ffn_up",
        "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
    for hf, gg in names.items():
        w.add_tensor(gg, np.ascontiguousarray(t[hf]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "minilm-f32.gguf"
        convert(path)
        llm = Llama(model_path=str(path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                    n_threads=2, verbose=False, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        cases = []
        for s in SENTENCES:
            ids = llm.tokenize(s.encode("utf-8"), add_bos=True, special=False)
            e = np.array(llm.embed(s, normalize=True), dtype=np.float32)
            assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-4
            cases.append({"text": s, "tokens": ids,
                          "embedding_f32_base64": base64.b64encode(e.astype("<f4").tobytes()).decode()})
    OUT.write_text(json.dumps({"how": __doc__, "llama_cpp_python": llama_cpp.__version__,
                               "model": "all-MiniLM-L6-v2", "dimensions": 384, "cases": cases},
                              indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} sentences)")


if __name__ == "__main__":
    main()
