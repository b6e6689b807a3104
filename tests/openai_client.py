"""The official `openai` Python client against a running idlerig: chat and completions,
streaming and not, greedy so that the streamed text must equal the non-streamed one; and
embeddings (the client asks for base64 by default) from the embedding model served beside.

Usage: python3 tests/openai_client.py BASE_URL      (e.g. http://127.0.0.1:8080/v1)
"""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="not-needed")
models = [m.id for m in client.models.list().data]
model = models[0]
assert len(models) == 2, f"the chat and the embedding model are listed: {models}"
messages = [{"role": "user", "content": "What is 2 + 2? Answer briefly."}]

chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
text = chat.choices[0].message.content
assert text, "empty chat answer"
assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
streamed = "".join(
    chunk.choices[0].delta.content or ""
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32, stream=True)
    if chunk.choices
)
assert streamed == text, (streamed, text)

comp = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8)
ctext = comp.choices[0].text
streamed = "".join(
    c.choices[0].text for c in client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True) if c.choices
)
assert ctext and streamed == ctext, (streamed, ctext)

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model must be refused")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e

emb = client.embeddings.create(model=models[1], input=["The cat sits on the mat.", "A cat is on a mat.", "Stock prices fell."])
vecs = [d.embedding for d in emb.data]
assert [d.index for d in emb.data] == [0, 1, 2] and all(len(v) == 384 for v in vecs)
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
assert dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2]), "similar sentences are closer"
assert abs(dot(vecs[0], vecs[0]) - 1.0) < 1e-3 and emb.usage.prompt_tokens > 0
floats = client.embeddings.create(model=models[1], input="The cat sits on the mat.", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vecs[0])) < 1e-6

print(f"openai client: chat {text!r}; completion {ctext!r}; embeddings cos(similar)={dot(vecs[0], vecs[1]):.3f} "
      f"cos(unrelated)={dot(vecs[0], vecs[2]):.3f}")
print("openai client: 5 passed, 0 failed")
