"""llama.cpp as the reference of `idlerig bench infer --compare-llama-cpp`.

Loads the model once with llama-cpp-python (its defaults, the threads it is given), then
answers one JSON line per request read from stdin:
    in:  {"prompt": [token ids], "gen": N}
    out: {"ttft_s": seconds to evaluate the prompt and pick the first token,
          "decode_s": seconds for the remaining N - 1 tokens, "tokens": N}
Greedy decoding (argmax), continuing past end-of-generation tokens, like the idlerig side,
which sends the same token ids with `ignore_eos`. The first line out is {"ready": true}.
"""
import argparse
import json
import os
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--ctx", type=int, default=4096)
args = parser.parse_args()

llm = Llama(model_path=args.model, n_ctx=args.ctx, n_threads=args.threads,
            n_threads_batch=args.threads, n_batch=512, verbose=False, seed=0)
n_vocab = llm.n_vocab()
# What this llama.cpp was built for, as scripts/llama-cpp-setup recorded it beside the venv.
build_file = os.path.join(sys.prefix, "idlerig-build.json")
build = json.load(open(build_file)) if os.path.exists(build_file) else {
    "system_info": llama_cpp.llama_print_system_info().decode().strip()}
print(json.dumps({"ready": True, "n_threads": args.threads, "build": build}), flush=True)


def greedy():
    """The argmax of the last evaluated token's logits, read from llama.cpp's own buffer
    (llama-cpp-python fills `scores` only with logits_all, which would cost every row)."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
    return int(np.argmax(logits))


for line in sys.stdin:
    req = json.loads(line)
    prompt, gen = req["prompt"], int(req["gen"])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    out = [greedy()]
    first = time.perf_counter()
    for _ in range(gen - 1):
        llm.eval([out[-1]])
        out.append(greedy())
    end = time.perf_counter()
    print(json.dumps({"ttft_s": first - start, "decode_s": end - first, "tokens": gen,
                      "first_tokens": out[:8]}), flush=True)
