"""Make the tiny random-weight models of each architecture and llama.cpp's logits for them,
which tests/architectures.rs compares idlerig against.

For each architecture the script
1. writes a GGUF in f32 with the `gguf` package (llama.cpp's own writer, PyPI gguf 0.19.0):
   the metadata keys and tensor names real files of that family use, random weights from a
   seeded numpy generator, a 320-token byte-level BPE vocabulary and a ChatML template (so
   the models can also be served);
2. quantizes it with llama.cpp's quantizer (`llama_model_quantize`, the code behind
   `llama-quantize`) to the types real files come in: Q4_K_M (Q4_K with Q6_K), Q5_K_M (Q5_K
   with Q6_K), Q5_0, Q5_1 and Q8_0;
3. runs llama.cpp on a fixed 56-token sequence (teacher forcing, every position's logits) at
   f32 KV cache and again at its default f16 cache, and records per position the top-8
   tokens and their log-probabilities, the teacher token's, and the top-1/top-2 margin, plus
   how far the f16 run moved from the f32 one (the spread llama.cpp shows against itself).

llama.cpp is llama-cpp-python 0.3.36 built from source for AVX2/FMA (no AVX-512, no AMX):
    python3 -m venv ~/.cache/idlerig/refvenv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" ~/.cache/idlerig/refvenv/bin/pip install \
      llama-cpp-python==0.3.36 gguf==0.19.0 numpy
    ~/.cache/idlerig/refvenv/bin/python tests/reference/make_arch_reference.py
It writes tests/reference/arch/*.gguf (committed, so the test needs no llama.cpp) and
tests/reference/arch_reference.json, with each file's SHA-256.
"""
import ctypes
import hashlib
import json
import pathlib
import tempfile

import gguf
import llama_cpp
import numpy as np
from llama_cpp import Llama

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE / "arch"
OUT_JSON = HERE / "arch_reference.json"
VOCAB = 320
SEQ = 56
TOP = 8

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Each family's shape and options; `ftype` is llama.cpp's LLAMA_FTYPE_MOSTLY_*.
ARCHS = [
    # Llama 3.1: rope_freqs, an explicit head dimension (8 heads of 64 over a hidden of 256,
    # as Mistral Nemo's 32 × 128 over 5120), grouped KV heads, an untied output. The factors
    # are Llama 3.1's formula for an original context of 32 (not 8192), so that they change
    # the angles within the 56 positions the test runs.
    dict(name="llama", arch="llama", hidden=256, ff=512, layers=2, heads=8, kv=2, head_dim=64,
         ftype=15, rope_base=10000.0, rope_freqs=True, rope_orig_ctx=32, tied=False),
    # Qwen2.5: Q/K/V biases, tied embeddings, NEOX rotation.
    dict(name="qwen2", arch="qwen2", hidden=256, ff=512, layers=2, heads=4, kv=2, head_dim=64,
         ftype=17, rope_base=1000000.0, qkv_bias=True, tied=True),
    # Qwen3: per-head Q/K norms, key_length 128 ≠ 256 / 4.
    dict(name="qwen3", arch="qwen3", hidden=256, ff=512, layers=2, heads=4, kv=2, head_dim=128,
         ftype=8, rope_base=1000000.0, qk_norm=True, tied=True),
    # Phi-3: fused QKV and gate/up.
    dict(name="phi3", arch="phi3", hidden=256, ff=512, layers=2, heads=4, kv=4, head_dim=64,
         ftype=9, rope_base=10000.0, fused=True, tied=False),
    # Gemma 3: five windowed layers (window 10, local base 10,000) to one global (base 1e6,
    # linear scaling ×8 as the 4B+), Q/K norms, post-norms, √hidden embeddings, GELU.
    dict(name="gemma3", arch="gemma3", hidden=256, ff=256, layers=6, heads=2, kv=1, head_dim=128,
         ftype=15, embd_std=0.05, rope_base=1000000.0, qk_norm=True, post_norms=True, window=10,
         rope_linear=8.0, tied=True),
    # Gemma 2: windowed and global layers alternating, soft-capped scores and logits.
    dict(name="gemma2", arch="gemma2", hidden=256, ff=512, layers=2, heads=4, kv=2, head_dim=64,
         ftype=7, rope_base=10000.0, post_norms=True, window=12, attn_softcap=3.0,
         final_softcap=6.0, tied=True),
]


def byte_vocab():
    """GPT-2's byte-level alphabet, 60 merges over it, and four special tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tokens = [chr(c) for c in cs]
    merges, tokens = [], list(byte_tokens)
    pairs = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "Ġ w",
             "Ġ o", "e n", "Ġ c", "i t", "i s", "a n", "o r", "e s", "Ġ b", "e d", "Ġ f",
             "in g", "Ġ p", "o u", "Ġa n", "a l", "a r", "Ġt o", "Ġ m", "Ġo f", "Ġ in",
             "Ġ d", "Ġ h", "Ġan d", "i c", "a s", "l e", "Ġt h", "i on", "o m", "l l",
             "en t", "Ġ n", "Ġ l", "s t", "Ġ re", "v e", "Ġ e", "r o", "l y", "Ġb e",
             "Ġ g", "Ġ T", "c t", "Ġ S", "i d", "o t", "Ġ I", "u t"]
    for p in pairs:
        a, b = p.split(" ")
        merges.append(p)
        tokens.append(a + b)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    assert len(tokens) == VOCAB, len(tokens)
    return tokens, types, merges


def write_f32(spec, path, rng):
    a = spec["arch"]
    h, ff, hd = spec["hidden"], spec["ff"], spec["head_dim"]
    nh, nkv, L = spec["heads"], spec["kv"], spec["layers"]
    w = gguf.GGUFWriter(str(path), a)
    # Not the family's name: llama.cpp sets token attributes by `general.name` ("phi3" wants
    # SentencePiece's tokens), and these models share one byte-level vocabulary.
    w.add_name("idlerig tiny random model")
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(spec["rope_base"])
    if spec.get("rope_linear"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec["rope_linear"])
    if spec.get("window"):
        w.add_sliding_window(spec["window"])
    if a == "gemma3":
        w.add_rope_freq_base_swa(10000.0)
    if spec.get("attn_softcap"):
        w.add_attn_logit_softcapping(spec["attn_softcap"])
    if spec.get("final_softcap"):
        w.add_final_logit_softcapping(spec["final_softcap"])
    tokens, types, merges = byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    # Large enough embeddings and output rows that logits spread over several units.
    embd_std = spec.get("embd_std", 0.12)
    w.add_tensor("token_embd.weight", (rng.standard_normal((VOCAB, h)) * embd_std).astype(np.float32))
    if spec.get("rope_freqs"):
        # Llama 3.1's factors (factor 8, low 1, high 4), as convert_hf_to_gguf.py computes
        # them, over the spec's original context.
        base, dim = spec["rope_base"], hd
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor, low, high, old = 8.0, 1.0, 4.0, spec["rope_orig_ctx"]
        low_wl, high_wl = old / low, old / high
        ff_ = []
        for f in freqs:
            wl = 2 * np.pi / f
            if wl < high_wl:
                ff_.append(1.0)
            elif wl > low_wl:
                ff_.append(factor)
            else:
                smooth = (old / wl - low) / (high - low)
                ff_.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(ff_, dtype=np.float32))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(h))
        if spec.get("fused"):
            w.add_tensor(p + "attn_qkv.weight", mat((nh + 2 * nkv) * hd, h))
        else:
            w.add_tensor(p + "attn_q.weight", mat(nh * hd, h))
            w.add_tensor(p + "attn_k.weight", mat(nkv * hd, h))
            w.add_tensor(p + "attn_v.weight", mat(nkv * hd, h))
        if spec.get("qkv_bias"):
            w.add_tensor(p + "attn_q.bias", (0.5 * rng.standard_normal(nh * hd)).astype(np.float32))
            w.add_tensor(p + "attn_k.bias", (0.5 * rng.standard_normal(nkv * hd)).astype(np.float32))
            w.add_tensor(p + "attn_v.bias", (0.5 * rng.standard_normal(nkv * hd)).astype(np.float32))
        if spec.get("qk_norm"):
            w.add_tensor(p + "attn_q_norm.weight", norm(hd))
            w.add_tensor(p + "attn_k_norm.weight", norm(hd))
        w.add_tensor(p + "attn_output.weight", mat(h, nh * hd))
        if spec.get("post_norms"):
            w.add_tensor(p + "post_attention_norm.weight", norm(h))
            w.add_tensor(p + "post_ffw_norm.weight", norm(h))
        w.add_tensor(p + "ffn_norm.weight", norm(h))
        if spec.get("fused"):
            w.add_tensor(p + "ffn_up.weight", mat(2 * ff, h))
        else:
            w.add_tensor(p + "ffn_gate.weight", mat(ff, h))
            w.add_tensor(p + "ffn_up.weight", mat(ff, h))
        w.add_tensor(p + "ffn_down.weight", mat(h, ff))
    w.add_tensor("output_norm.weight", norm(h))
    if not spec.get("tied"):
        w.add_tensor("output.weight", mat(VOCAB, h, scale=2.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"quantize {src} -> {dst}: {rc}"


def run(path, tokens, kv_type):
    kw = dict(type_k=0, type_v=0) if kv_type == "f32" else {}
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=512, logits_all=True,
                verbose=False, seed=0, flash_attn=False, **kw)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    mx = logits.max(axis=1, keepdims=True)
    return logits - (mx + np.log(np.exp(logits - mx).sum(axis=1, keepdims=True)))


def main():
    OUT_DIR.mkdir(exist_ok=True)
    seq_rng = np.random.default_rng(20261129)
    # Ordinary tokens only (the specials sit at the end of the vocabulary).
    tokens = [int(t) for t in seq_rng.integers(0, VOCAB - 4, SEQ)]
    out = {"how": __doc__, "llama_cpp_python": llama_cpp.__version__, "gguf": gguf.__version__
           if hasattr(gguf, "__version__") else "0.19.0", "tokens": tokens, "models": {}}
    for n, spec in enumerate(ARCHS):
        rng = np.random.default_rng(1000 + n)
        dst = OUT_DIR / f"{spec['name']}.gguf"
        with tempfile.TemporaryDirectory() as tmp:
            f32 = pathlib.Path(tmp) / "f32.gguf"
            write_f32(spec, f32, rng)
            quantize(f32, dst, spec["ftype"])
        ref = run(dst, tokens, "f32")
        f16 = run(dst, tokens, "f16")
        positions = []
        for p in range(SEQ):
            order = np.argsort(-ref[p], kind="stable")[:TOP]
            nxt = tokens[p + 1] if p + 1 < SEQ else int(order[0])
            positions.append({
                "top": [int(t) for t in order],
                "top_logprobs": [round(float(ref[p][t]), 5) for t in order],
                "next": nxt,
                "next_logprob": round(float(ref[p][nxt]), 5),
                "margin": round(float(ref[p][order[0]] - ref[p][order[1]]), 4),
            })
        ids = [[int(t) for t in np.argsort(-ref[p], kind="stable")[:TOP]] + [tokens[p + 1] if p + 1 < SEQ else 0]
               for p in range(SEQ)]
        spread = [abs(ref[p][t] - f16[p][t]) for p in range(SEQ) for t in ids[p]]
        out["models"][spec["name"]] = {
            "file": f"arch/{spec['name']}.gguf",
            "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
            "spec": {k: v for k, v in spec.items()},
            "self_spread": {"mean": round(float(np.mean(spread)), 6),
                            "max": round(float(np.max(spread)), 6)},
            "positions": positions,
        }
        margins = [q["margin"] for q in positions]
        print(f"{spec['name']}: {dst.stat().st_size} bytes, self-spread mean "
              f"{np.mean(spread):.5f} max {np.max(spread):.5f}, margins median "
              f"{np.median(margins):.3f}, ≥0.5 at {sum(m >= 0.5 for m in margins)}/{SEQ}")
    OUT_JSON.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
