#!/usr/bin/env python3
"""Structured output through Tandem's OpenAI API with the official `openai` client.

Usage: structured_client.py BASE_URL. Prints one JSON object with what it saw
(and whether each output validated, with `jsonschema`); tests/e2e/structured.rs
asserts on it.
"""
import json
import re
import sys
import urllib.request

import jsonschema
import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
model = client.models.list().data[0].id
out = {}

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "Who lives in Paris? Answer in JSON.",
           "Invent a character.", "Tell me about your neighbour."]


def valid(text, schema):
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError) as e:
        return f"{text!r}: {e}"


fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
results = []
for i, p in enumerate(PROMPTS):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                       max_tokens=80, temperature=1.0, seed=i, response_format=fmt)
    results.append({"valid": valid(r.choices[0].message.content, SCHEMA),
                    "finish_reason": r.choices[0].finish_reason})
out["json_schema"] = results

parts = []
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=80, temperature=0, response_format=fmt, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
out["json_schema_stream"] = {"valid": valid("".join(parts), SCHEMA), "chunks": len(parts)}

r = client.completions.create(model=model, prompt="The list of fruits:", max_tokens=60, temperature=0,
                              extra_body={"guided_json": SCHEMA})
out["completion_guided_json"] = valid(r.choices[0].text, SCHEMA)

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give me JSON."}],
                                   max_tokens=60, temperature=0, response_format={"type": "json_object"})
text = r.choices[0].message.content
out["json_object"] = {"text": text, "finish_reason": r.choices[0].finish_reason}

regex = r"[0-9]{3}-[0-9]{4}"
r = client.completions.create(model=model, prompt="My phone number is", max_tokens=20, temperature=1.0,
                              seed=3, extra_body={"guided_regex": regex})
out["regex"] = {"text": r.choices[0].text, "matches": re.fullmatch(regex, r.choices[0].text) is not None}

choices = ["positive", "negative", "neutral"]
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "I love this! Sentiment?"}],
                                   max_tokens=10, temperature=0, extra_body={"guided_choice": choices})
out["choice"] = r.choices[0].message.content
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Yes or no?"}],
                                   max_tokens=10, temperature=0,
                                   extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
out["structured_outputs_choice"] = r.choices[0].message.content


def refused(**kw):
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=5, **kw)
        return None
    except openai.BadRequestError as e:
        return {"status": e.status_code, "message": str(e)}


out["bad_schema"] = refused(response_format={"type": "json_schema", "json_schema": {
    "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}})
out["bad_regex"] = refused(extra_body={"guided_regex": "(unclosed"})
out["two_constraints"] = refused(extra_body={"guided_regex": "a", "guided_choice": ["b"]})

# JSON whitespace (vLLM's guided_whitespace_pattern, structured_outputs'
# disable_any_whitespace): the space token pushed up by logit_bias shows with
# free whitespace, never where the pattern allows newlines only or none is allowed.
tokenize = urllib.request.Request(base.removesuffix("/v1") + "/tokenize", headers={"content-type": "application/json"},
                                  data=json.dumps({"prompt": " ", "add_special_tokens": False}).encode())
with urllib.request.urlopen(tokenize) as resp:
    space = json.loads(resp.read())["tokens"]
SMALL = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["a"], "additionalProperties": False}
ws = {"space_tokens": space}
for name, extra in [
    ("free", {"guided_json": SMALL}),
    ("newlines", {"guided_json": SMALL, "guided_whitespace_pattern": "\n"}),
    ("none", {"structured_outputs": {"json": SMALL, "disable_any_whitespace": True}, "guided_decoding_backend": "guidance"}),
]:
    r = client.completions.create(model=model, prompt="Answer in JSON:", max_tokens=24, temperature=0,
                                  logit_bias={str(t): 30 for t in space}, extra_body=extra)
    ws[name] = {"text": r.choices[0].text, "finish": r.choices[0].finish_reason,
                "valid": valid(r.choices[0].text, SMALL)}
ws["other_backend"] = refused(extra_body={"guided_json": SMALL, "guided_decoding_backend": "xgrammar"})
ws["not_json"] = refused(extra_body={"guided_regex": "a+", "guided_whitespace_pattern": " "})
out["whitespace"] = ws

r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0)
out["after"] = r.choices[0].finish_reason
print(json.dumps(out))
