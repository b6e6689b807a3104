"""Make the greedy reference that tests/reference_greedy.rs compares idlerig against.

The reference comes from llama.cpp (PyPI package llama-cpp-python 0.3.36, built from source
with AVX2/FMA, CPU only), an implementation independent of idlerig's candle-based one. For each
prompt the chat is rendered with the model's own template by jinja2 (not idlerig's minijinja),
tokenized by llama.cpp with special tokens parsed, and decoded greedily (KV cache in f32) (argmax of the logits)
for 64 tokens, continuing past end-of-generation tokens so every prompt yields 64. Beside each
token it records the gap between the top two logits, so that a mismatch can be recognised as a
near-tie of the quantized kernels rather than a bug.

Run (about a minute):
    python3 -m venv ~/.cache/idlerig/refvenv
    ~/.cache/idlerig/refvenv/bin/pip install llama-cpp-python==0.3.36 jinja2
    ~/.cache/idlerig/refvenv/bin/python tests/reference/make_reference.py
"""
import json
import pathlib

import jinja2
import numpy as np
from llama_cpp import Llama

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = pathlib.Path(__file__).with_name("smollm2_greedy.json")
GEN = 64

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash function is."}],
    [{"role": "user", "content": "List three uses of a GPU."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish, French and German. Ünïcödé ✓ 12345"}],
]

# KV cache in f32 (GGML_TYPE_F32 = 0) and no flash attention, like idlerig's CPU path: with
# llama.cpp's default f16 cache, logits move by ~0.3 and near-ties flip more often.
llm = Llama(model_path=str(MODEL), n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0,
            type_k=0, type_v=0, flash_attn=False)
template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])

# llama.cpp at its default f16 KV cache, run on the same token sequences: how far llama.cpp
# moves from itself when only the cache precision changes. The test uses it as the yardstick
# for how far idlerig may be from the f32 reference.
llm16 = Llama(model_path=str(MODEL), n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0,
              flash_attn=False)


def logprob_of(model, tok):
    logits = np.array(model.scores[model.n_tokens - 1], dtype=np.float64)
    lse = float(logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    return float(logits[tok]) - lse


cases = []
for messages in CHATS:
    text = template.render(messages=messages, add_generation_prompt=True)
    prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(prompt)
    tokens, margins, logprobs = [], [], []
    for _ in range(GEN):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        order = np.argsort(-logits, kind="stable")
        tok = int(order[0])
        tokens.append(tok)
        margins.append(round(float(logits[order[0]] - logits[order[1]]), 4))
        lse = float(logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        logprobs.append(round(float(logits[tok]) - lse, 5))
        llm.eval([tok])
    llm16.reset()
    llm16.eval(prompt)
    f16_logprobs = []
    for tok in tokens:
        f16_logprobs.append(round(logprob_of(llm16, tok), 5))
        llm16.eval([tok])
    # llama.cpp's own free-running greedy with the f16 cache: how long it follows the f32 run.
    llm16.reset()
    llm16.eval(prompt)
    own = 0
    for tok in tokens:
        pick = int(np.argmax(np.array(llm16.scores[llm16.n_tokens - 1])))
        if pick != tok:
            break
        own += 1
        llm16.eval([tok])
    cases.append({
        "messages": messages,
        "prompt_text": text,
        "prompt_tokens": prompt,
        "tokens": tokens,
        "top2_margin": margins,
        "logprobs": logprobs,
        "f16_kv_logprobs": f16_logprobs,
        "f16_kv_free_running_agreement": own,
        "text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
    })
    print(repr(cases[-1]["text"][:100]))

OUT.write_text(json.dumps({
    "generator": "llama-cpp-python 0.3.36 (llama.cpp, CPU, AVX2/FMA, f32 KV cache), greedy argmax, see make_reference.py",
    "model": MODEL.name,
    "gen_tokens": GEN,
    "cases": cases,
}, indent=1, ensure_ascii=False))
print("wrote", OUT)
