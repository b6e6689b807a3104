"""The official `openai` client's Responses API, and the OpenAI Agents SDK, against a running
idlerig (greedy, so that a stream must say what the whole answer says):

- `responses.create`, `responses.stream` (the deltas' text equals `output_text`),
  `responses.retrieve` and `responses.input_items.list`;
- a function tool round trip: a forced call, then its `function_call_output` sent with
  `previous_response_id` (the conversation comes from the server's store);
- `background=True` polled to `completed`, and a long background response cancelled;
- the Agents SDK (its default Responses model) runs an agent with one function tool to a final
  answer, the tool called once.

Usage: python3 tests/responses_client.py BASE_URL STATE_FILE       (writes a response id)
       python3 tests/responses_client.py BASE_URL STATE_FILE --after-restart
The second form continues the stored response from the first run on a restarted server.
"""
import asyncio
import json
import sys
import time

import jsonschema
from openai import OpenAI

base, state_file = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="not-needed")
model = client.models.list().data[0].id
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": WEATHER, "strict": True}]


def poll(rid, done, what, limit=600.0):
    deadline = time.monotonic() + limit
    while True:
        r = client.responses.retrieve(rid)
        if done(r):
            return r
        assert time.monotonic() < deadline, f"{what}: still {r.status} after {limit} s"
        time.sleep(0.2)


if "--after-restart" in sys.argv:
    state = json.load(open(state_file))
    again = client.responses.create(model=model, previous_response_id=state["id"],
                                    input="And what did I ask first?", temperature=0, max_output_tokens=24)
    assert again.status in ("completed", "incomplete") and again.output_text, again
    # The stored conversation is what the model saw: its prompt is longer than this turn's.
    alone = client.responses.create(model=model, input="And what did I ask first?", temperature=0,
                                    max_output_tokens=1, store=False)
    assert again.usage.input_tokens > alone.usage.input_tokens + 10, (again.usage, alone.usage)
    # The background response cut short by the restart (if any) ran to its end after it.
    if state.get("background"):
        r = poll(state["background"], lambda r: r.status not in ("queued", "in_progress"), "resumed background")
        assert r.status in ("completed", "incomplete"), r.status
    print(f"responses after a restart: previous_response_id {state['id']} continued "
          f"({again.usage.input_tokens} prompt tokens with the stored conversation, {alone.usage.input_tokens} without)")
    sys.exit(0)

question = "What is the capital of France? Answer in one word."
first = client.responses.create(model=model, input=question, instructions="Be brief.", temperature=0,
                                max_output_tokens=24, metadata={"case": "first"})
assert first.object == "response" and first.status in ("completed", "incomplete"), first
assert first.output_text and first.usage.output_tokens > 0 and first.usage.input_tokens > 0
assert first.metadata == {"case": "first"}

with client.responses.stream(model=model, input=question, instructions="Be brief.", temperature=0,
                             max_output_tokens=24) as stream:
    deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert deltas == final.output_text == first.output_text, (deltas, final.output_text, first.output_text)

got = client.responses.retrieve(first.id)
assert got.id == first.id and got.output_text == first.output_text
items = client.responses.input_items.list(first.id)
assert [i.type for i in items.data] == ["message"], items
assert items.data[0].content[0].text == question

# A function tool round trip: the call is forced; its output goes back by previous_response_id.
call_turn = client.responses.create(model=model, input="What is the weather in Paris?", tools=tools,
                                    tool_choice="required", temperature=0, max_output_tokens=64)
calls = [o for o in call_turn.output if o.type == "function_call"]
assert len(calls) >= 1 and calls[0].name == "get_weather", call_turn.output
jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
answer = client.responses.create(
    model=model, previous_response_id=call_turn.id, tools=tools, temperature=0, max_output_tokens=32,
    input=[{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 21 C"} for c in calls])
assert answer.status in ("completed", "incomplete") and answer.output, answer
assert answer.previous_response_id == call_turn.id
assert answer.usage.input_tokens > call_turn.usage.input_tokens, "the stored turn is in the prompt"

# Background: queued at once, polled to completed; another cancelled mid-way.
bg = client.responses.create(model=model, input=question, temperature=0, max_output_tokens=24, background=True)
assert bg.status in ("queued", "in_progress", "completed"), bg.status
done = poll(bg.id, lambda r: r.status not in ("queued", "in_progress"), "background")
assert done.status in ("completed", "incomplete") and done.output_text == first.output_text, done
long = client.responses.create(model=model, input="Count from 1 to 1000, one number per line.",
                               max_output_tokens=4000, background=True,
                               extra_body={"ignore_eos": True})
cancelled = client.responses.cancel(long.id)
assert cancelled.status == "cancelled", cancelled.status
assert poll(long.id, lambda r: True, "cancelled").status == "cancelled"
# A last one is left running: the restart cuts it short, and it must finish after it.
left = client.responses.create(model=model, input="Count from 1 to 50.", max_output_tokens=200,
                               background=True)
json.dump({"id": first.id, "background": left.id}, open(state_file, "w"))

# The Agents SDK, with its default (Responses) model, runs an agent with one tool to an answer.
from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from openai import AsyncOpenAI

set_tracing_disabled(True)
set_default_openai_client(AsyncOpenAI(base_url=base, api_key="not-needed"), use_for_tracing=False)
seen = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    seen.append(city)
    return f"Sunny, 21 C in {city}"


agent = Agent(name="weather", model=model, instructions="Answer with the weather.", tools=[get_weather],
              model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                            temperature=0, max_tokens=64))
result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=4))
assert len(seen) == 1 and isinstance(result.final_output, str) and result.final_output, (seen, result.final_output)

print(f"responses: create/stream/retrieve/input_items ok ({first.output_text!r}); tool round trip "
      f"{calls[0].name}({calls[0].arguments}) -> {answer.output_text!r}; background {done.status}, cancel "
      f"{cancelled.status}; agents: {seen} -> {result.final_output!r}")
