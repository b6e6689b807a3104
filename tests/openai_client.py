"""The official `openai` Python client against a running idlerig: chat and completions,
streaming and not, greedy so that the streamed text must equal the non-streamed one.

Usage: python3 tests/openai_client.py BASE_URL      (e.g. http://127.0.0.1:8080/v1)
"""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="not-needed")
model = client.models.list().data[0].id
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

print(f"openai client: chat {text!r}; completion {ctext!r}")
print("openai client: 4 passed, 0 failed")
