#!/usr/bin/env python3
"""Drives vLLM's beam search (`use_beam_search`) on Tandem's OpenAI-compatible
API with the official `openai` client library.

Usage: beam_client.py BASE_URL MODEL
Prints one JSON object with what it saw; tests/e2e/nbest.rs asserts on it.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
out = {}
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a color."}]


def usage(u):
    return {"prompt": u.prompt_tokens, "completion": u.completion_tokens}


def beams(n, max_tokens, **extra):
    r = client.completions.create(model=model, prompt=PROMPT, n=n, max_tokens=max_tokens,
                                  extra_body={"use_beam_search": True, "return_token_ids": True, **extra})
    d = r.model_dump()
    return {
        "indices": [c["index"] for c in d["choices"]],
        "texts": [c["text"] for c in d["choices"]],
        "ids": [c["token_ids"] for c in d["choices"]],
        "prompt_ids": d["choices"][0]["prompt_token_ids"],
        "finish": [c["finish_reason"] for c in d["choices"]],
        "usage": usage(r.usage),
    }


out["n3"] = beams(3, 6)
out["n2_lp0"] = beams(2, 6, length_penalty=0.0)
out["n1"] = beams(1, 6)
# A batch of prompts: prompt p's beams are choices p·n ...
# With a request id of the client's: each prompt's steps get ids of their own.
r = client.completions.create(model=model, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=4,
                              extra_body={"use_beam_search": True, "return_token_ids": True,
                                          "request_id": "client-batch"})
d = r.model_dump()
out["batch"] = {"indices": [c["index"] for c in d["choices"]], "ids": [c["token_ids"] for c in d["choices"]],
                "prompt_ids": [c["prompt_token_ids"] for c in d["choices"]], "usage": usage(r.usage)}
# temperature and seed do not change a beam search (raw log probabilities).
out["n3_hot"] = beams(3, 6, temperature=1.7, seed=5)

texts, finish, usage_seen = {}, {}, None
for chunk in client.completions.create(model=model, prompt=PROMPT, n=3, max_tokens=6, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"use_beam_search": True}):
    if chunk.usage is not None:
        usage_seen = usage(chunk.usage)
    for c in chunk.choices:
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason is not None:
            finish[c.index] = c.finish_reason
out["n3_stream"] = {"texts": [texts.get(i) for i in range(3)], "finish": [finish.get(i) for i in range(3)],
                    "usage": usage_seen}

r = client.chat.completions.create(model=model, messages=MESSAGES, n=2, max_tokens=5,
                                   extra_body={"use_beam_search": True, "return_token_ids": True})
d = r.model_dump()
out["chat_n2"] = {
    "texts": [c["message"]["content"] for c in d["choices"]],
    "ids": [c["token_ids"] for c in d["choices"]],
    "prompt_ids": d["prompt_token_ids"],
    "finish": [c["finish_reason"] for c in d["choices"]],
    "usage": usage(r.usage),
}

# What a beam search cannot honour: 400 naming the field; the next request is served.
refusals = {
    "top_p": dict(top_p=0.5, extra_body={"use_beam_search": True}),
    "logprobs": dict(logprobs=2, extra_body={"use_beam_search": True}),
    "stop": dict(stop=["."], extra_body={"use_beam_search": True}),
    "n": dict(n=11, extra_body={"use_beam_search": True}),
    "best_of": dict(n=2, best_of=3, extra_body={"use_beam_search": True}),
    "length_penalty": dict(extra_body={"length_penalty": 0.5}),
}
refused = {}
for field, kwargs in refusals.items():
    try:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, **kwargs)
        refused[field] = None
    except openai.APIStatusError as e:
        refused[field] = {"status": e.status_code, "param": e.body.get("param"),
                          "message": e.body.get("message")}
try:
    client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        extra_body={"use_beam_search": True})
    refused["tools"] = None
except openai.APIStatusError as e:
    refused["tools"] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
out["refused"] = refused
nxt = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
out["next_tokens"] = nxt.usage.completion_tokens

print(json.dumps(out))
