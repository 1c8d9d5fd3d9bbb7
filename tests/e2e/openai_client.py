#!/usr/bin/env python3
"""Drives Tandem's OpenAI-compatible API with the official `openai` client library.

Usage: openai_client.py BASE_URL   (e.g. http://127.0.0.1:8000/v1)
Prints one JSON object with what it saw; tests/e2e/openai.rs asserts on it.
"""
import json
import sys
import urllib.error
import urllib.request

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
out = {}

out["models"] = [m.id for m in client.models.list().data]
model = out["models"][0]

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason,
                     "prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens}

parts, finish = [], None
for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True):
    parts.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
out["completion_stream"] = {"text": "".join(parts), "finish_reason": finish, "chunks": len(parts)}

messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
out["chat"] = {"content": r.choices[0].message.content, "role": r.choices[0].message.role,
               "finish_reason": r.choices[0].finish_reason, "prompt_tokens": r.usage.prompt_tokens}

parts, roles = [], []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True):
    d = chunk.choices[0].delta
    if d.role:
        roles.append(d.role)
    if d.content:
        parts.append(d.content)
out["chat_stream"] = {"content": "".join(parts), "roles": roles}

errors = {}
for name, kwargs in {
    "negative_temperature": {"temperature": -1.0},
    "top_p_zero_point": {"top_p": 1.5},
    "unknown_model": {"model": "no-such-model"},
    "too_many_tokens": {"max_tokens": 10**6},
}.items():
    args = {"model": model, "prompt": "hi", "max_tokens": 4, **kwargs}
    try:
        client.completions.create(**args)
        errors[name] = None
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "message": e.body.get("message") if isinstance(e.body, dict) else str(e.body)}


def raw_post(body: bytes):
    req = urllib.request.Request(base + "/completions", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return {"status": resp.status}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read().decode())}


errors["invalid_utf8"] = raw_post(b'{"prompt": "\xff\xfe", "max_tokens": 3}')
errors["invalid_json"] = raw_post(b'{"prompt": ')
out["errors"] = errors
print(json.dumps(out))
