"""The official `openai` Python client against a running idlerig: chat and completions,
streaming and not, greedy so that the streamed text must equal the non-streamed one; and
embeddings (the client asks for base64 by default) from the embedding model served beside;
the flex tier; and the Files and Batches API end to end (`files.create`, `batches.create`,
`batches.retrieve` until completed, `files.content`): one result per line with its `custom_id`,
each the answer the same request gets interactively, and bad lines in an error file.

Usage: python3 tests/openai_client.py BASE_URL      (e.g. http://127.0.0.1:8080/v1)
"""
import io
import json
import sys
import time

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

flex = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32, service_tier="flex")
assert flex.service_tier == "flex" and chat.service_tier == "default", (flex.service_tier, chat.service_tier)
assert flex.choices[0].message.content == text, "flex runs the same model the same way"

questions = ["What is 2 + 2? Answer briefly.", "Name a primary colour.", "Say hello in French."]
lines = [{"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": model, "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 16}}
         for i, q in enumerate(questions)]
lines.append({"custom_id": "bad-temperature", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}})
jsonl = "".join(json.dumps(l) + "\n" for l in lines).encode()
upload = client.files.create(file=("questions.jsonl", io.BytesIO(jsonl)), purpose="batch")
assert upload.purpose == "batch" and upload.bytes == len(jsonl), upload
batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"suite": "openai-client"})
deadline = time.time() + 300
while batch.status not in ("completed", "failed", "cancelled", "expired"):
    assert time.time() < deadline, f"the batch did not finish: {batch}"
    time.sleep(0.5)
    batch = client.batches.retrieve(batch.id)
assert batch.status == "completed", batch
assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 3, 1), batch
assert batch.metadata == {"suite": "openai-client"}, batch.metadata
outputs = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
errors = [json.loads(l) for l in client.files.content(batch.error_file_id).text.splitlines()]
assert [o["custom_id"] for o in outputs] == ["q-0", "q-1", "q-2"], outputs
for o, line in zip(outputs, lines):
    assert o["response"]["status_code"] == 200, o
    direct = client.chat.completions.create(**line["body"]).choices[0].message.content
    assert o["response"]["body"]["choices"][0]["message"]["content"] == direct, (o, direct)
assert len(errors) == 1 and errors[0]["custom_id"] == "bad-temperature", errors
assert errors[0]["response"]["status_code"] == 400, errors
assert any(b.id == batch.id for b in client.batches.list(limit=10).data)
assert client.files.delete(upload.id).deleted

print(f"openai client: chat {text!r}; completion {ctext!r}; embeddings cos(similar)={dot(vecs[0], vecs[1]):.3f} "
      f"cos(unrelated)={dot(vecs[0], vecs[2]):.3f}; batch {batch.id}: {batch.request_counts.completed} completed, "
      f"{batch.request_counts.failed} in the error file")
print("openai client: 7 passed, 0 failed")
