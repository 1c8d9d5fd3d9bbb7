#!/usr/bin/env python3
"""Drives `n` and `best_of` on Tandem's OpenAI-compatible API with the official
`openai` client library.

Usage: nbest_client.py BASE_URL MODEL
Prints one JSON object with what it saw; tests/e2e/nbest.rs asserts on it.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
out = {}
PROMPT = "Once upon a time, in a small village by the sea,"
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
SAMPLED = dict(temperature=0.8, seed=1234, max_tokens=8, extra_body={"ignore_eos": True})


def completion(**kw):
    r = client.completions.create(model=model, prompt=PROMPT, **{**SAMPLED, **kw})
    return {
        "indices": [c.index for c in r.choices],
        "texts": [c.text for c in r.choices],
        "finish": [c.finish_reason for c in r.choices],
        "sums": [sum(c.logprobs.token_logprobs) if c.logprobs else None for c in r.choices],
        "usage": {"prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens},
    }


def completion_stream(**kw):
    texts, finish, order = {}, {}, []
    usage = None
    for chunk in client.completions.create(model=model, prompt=PROMPT, stream=True,
                                           stream_options={"include_usage": True}, **SAMPLED, **kw):
        if chunk.usage is not None:
            usage = {"prompt": chunk.usage.prompt_tokens, "completion": chunk.usage.completion_tokens}
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            order.append(c.index)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    idx = sorted(texts)
    return {"indices": idx, "texts": [texts[i] for i in idx], "finish": [finish.get(i) for i in idx],
            "order": order, "usage": usage}


def chat(**kw):
    r = client.chat.completions.create(model=model, messages=MESSAGES, **SAMPLED, **kw)
    return {"indices": [c.index for c in r.choices], "texts": [c.message.content for c in r.choices],
            "usage": {"prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens}}


def chat_stream(**kw):
    texts = {}
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **SAMPLED, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    idx = sorted(texts)
    return {"indices": idx, "texts": [texts[i] for i in idx]}


# The same seed on each call: the same three samples, streamed or not, with
# log probabilities or not; best_of=3 runs those three too.
out["n3"] = completion(n=3)
out["n3_stream"] = completion_stream(n=3)
out["n3_logprobs"] = completion(n=3, logprobs=0)
out["best_of3"] = completion(n=1, best_of=3)
out["chat_n3"] = chat(n=3)
out["chat_n3_stream"] = chat_stream(n=3)

errors = {}
for name, kw in {
    "n_too_large": dict(n=17),
    "best_of_below_n": dict(n=3, best_of=2),
    "best_of_too_large": dict(n=1, best_of=17),
    "stream_best_of": dict(n=1, best_of=3, stream=True),
}.items():
    try:
        r = client.completions.create(model=model, prompt=PROMPT, **SAMPLED, **kw)
        if kw.get("stream"):
            list(r)
        errors[name] = {"status": 200}
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
try:
    client.chat.completions.create(model=model, messages=MESSAGES, n=17, **SAMPLED)
    errors["chat_n_too_large"] = {"status": 200}
except openai.APIStatusError as e:
    errors["chat_n_too_large"] = {"status": e.status_code, "param": e.body.get("param")}
out["errors"] = errors
# The next request is served.
out["after_errors"] = completion(n=2, max_tokens=2)
print(json.dumps(out))
