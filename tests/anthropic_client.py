"""The official `anthropic` client against a running idlerig's `/v1/messages` (greedy, so that
the stream must say what the whole message says):

- `messages.create` and `messages.stream` (`text_stream` equals the message's text);
- a `tool_use` -> `tool_result` round trip with `tool_choice: any`: `stop_reason` `tool_use`
  and an input that matches the tool's schema, then an answer to the result;
- `count_tokens` equals the `input_tokens` of the same request;
- errors in Anthropic's envelope (`invalid_request_error`, `not_found_error`).

Usage: python3 tests/anthropic_client.py BASE_URL        (e.g. http://127.0.0.1:8080, no /v1)
"""
import json
import sys
import urllib.request

import anthropic
import jsonschema

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="not-needed")
model = json.load(urllib.request.urlopen(sys.argv[1] + "/v1/models"))["data"][0]["id"]
greedy = {"temperature": 0}
messages = [{"role": "user", "content": "What is 2 + 2? Answer briefly."}]

msg = client.messages.create(model=model, max_tokens=32, system="Be brief.", messages=messages, extra_body=greedy)
assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason in ("end_turn", "max_tokens"), msg
text = "".join(b.text for b in msg.content if b.type == "text")
assert text and msg.usage.output_tokens > 0 and msg.usage.input_tokens > 0, msg

with client.messages.stream(model=model, max_tokens=32, system="Be brief.", messages=messages, extra_body=greedy) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
assert streamed == text, (streamed, text)
assert final.usage.output_tokens == msg.usage.output_tokens and final.stop_reason == msg.stop_reason

count = client.messages.count_tokens(model=model, system="Be brief.", messages=messages)
assert count.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0), (count, msg.usage)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
call = client.messages.create(model=model, max_tokens=64, messages=ask, tools=tools,
                              tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=greedy)
uses = [b for b in call.content if b.type == "tool_use"]
assert call.stop_reason == "tool_use" and uses and uses[0].name == "get_weather", call
jsonschema.validate(uses[0].input, WEATHER)
with client.messages.stream(model=model, max_tokens=64, messages=ask, tools=tools,
                            tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=greedy) as s:
    streamed_call = s.get_final_message()
assert [b.input for b in streamed_call.content if b.type == "tool_use"] == [u.input for u in uses]
reply = client.messages.create(
    model=model, max_tokens=32, tools=tools, extra_body=greedy,
    messages=ask + [{"role": "assistant", "content": call.content},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id,
                                                  "content": "Sunny, 21 C"} for u in uses]}])
assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use") and reply.content, reply

try:
    client.messages.create(model=model, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    raise AssertionError("an image must be refused")
except anthropic.BadRequestError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
    assert "text only" in e.body["error"]["message"], e.body
try:
    client.messages.create(model="no-such-model", max_tokens=8, messages=messages)
    raise AssertionError("an unknown model must be refused")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body

print(f"anthropic: create/stream ok ({text!r}); tool_use {uses[0].name}({uses[0].input}) stop_reason "
      f"{call.stop_reason}; count_tokens {count.input_tokens}; errors in Anthropic's envelope")
