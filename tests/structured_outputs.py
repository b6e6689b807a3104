"""Structured outputs through the official `openai` client against a running idlerig with the
real default model: 20 `json_schema` requests (10 schemas with nested objects, enums, arrays and
required fields, each streamed and not, sampled at temperature 0.8 so the model wanders) must
all validate with Python's `jsonschema`; `chat.completions.parse` with a Pydantic model must
return a parsed object; a regex and a choice constraint (vLLM's `structured_outputs`) hold; an
invalid schema is a 400 naming `response_format`. The strings and arrays are bounded so that
every document fits in `max_tokens`: the grammar, not the model's skill, makes them valid.

Usage: python3 tests/structured_outputs.py BASE_URL      (e.g. http://127.0.0.1:8080/v1)
"""
import json
import re
import sys
from typing import Annotated, Literal

import jsonschema
from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url=sys.argv[1], api_key="not-needed")
model = client.models.list().data[0].id

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
     "required": ["color", "bright"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"first": NAME, "last": NAME}, "required": ["first", "last"],
                   "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]}},
     "required": ["person", "role"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "y": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "country": {"enum": ["FR", "DE", "JP", "US"]},
                                      "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
     "required": ["city", "country", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "reason": NAME},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": NAME, "meta": {"type": "object", "properties": {
            "lang": {"enum": ["en", "fr"]}, "draft": {"type": "boolean"},
            "authors": {"type": "array", "items": NAME, "maxItems": 2}},
            "required": ["lang", "draft", "authors"], "additionalProperties": False}},
     "required": ["title", "meta"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 100, "maximum": 599},
                                      "items": {"type": "array", "maxItems": 2, "items": {"enum": [1, 2, 3]}}},
     "required": ["status", "code", "items"], "additionalProperties": False},
]

checked = 0
for i, schema in enumerate(SCHEMAS):
    rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": f"Reply with a JSON object for this schema: {json.dumps(schema)}"}]
    args = dict(model=model, messages=messages, response_format=rf, temperature=0.8, seed=i, max_tokens=300)
    whole = client.chat.completions.create(**args)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args) if c.choices)
    for how, text in (("whole", whole.choices[0].message.content), ("streamed", streamed)):
        try:
            jsonschema.validate(json.loads(text), schema)
        except Exception as e:
            raise AssertionError(f"schema {i} ({how}): {text!r}: {e}")
        checked += 1
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].finish_reason


class Pet(BaseModel):
    name: Annotated[str, Field(max_length=16)]
    kind: Literal["cat", "dog", "fish"]
    legs: Annotated[int, Field(ge=0, le=8)]


parsed = client.chat.completions.parse(
    model=model, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet, max_tokens=200)
pet = parsed.choices[0].message.parsed
assert isinstance(pet, Pet), parsed

digits = client.completions.create(model=model, prompt="My phone number is", max_tokens=20,
                                   extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
assert re.fullmatch("[0-9]{3}-[0-9]{4}", digits.choices[0].text), digits.choices[0].text
choice = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                        max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
assert choice.choices[0].message.content in ("yes", "no"), choice.choices[0].message.content

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], response_format={
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}})
    raise AssertionError("an invalid schema must be refused")
except Exception as e:  # openai.BadRequestError
    assert getattr(e, "status_code", None) == 400 and e.body["param"] == "response_format", e

print(f"structured outputs: {checked} json_schema documents valid; parsed {pet!r}; regex {digits.choices[0].text!r}; "
      f"choice {choice.choices[0].message.content!r}")
print("structured outputs: 5 passed, 0 failed")
