#!/usr/bin/env python3
"""Drives Tandem's OpenAI-compatible API with the official `openai` client library.

Usage: openai_client.py BASE_URL STOP_TOKEN_ID GREEDY RUNNER_UP PROMOTED VOCAB SPECIAL BAD_WORD
(e.g. http://127.0.0.1:8000/v1 42 7 9 300 512 1 Once). STOP_TOKEN_ID is a token greedy
decoding of "Once upon a time" generates; GREEDY, RUNNER_UP and PROMOTED are the
most likely, second most likely and a much less likely first token after it;
VOCAB is the vocabulary's size; SPECIAL a special token (not EOS); BAD_WORD the
greedy text's first token's text, to ban.
Prints one JSON object with what it saw; tests/e2e/openai.rs asserts on it.
"""
import json
import sys
import urllib.error
import urllib.request

import openai

base = sys.argv[1]
stop_token_id = int(sys.argv[2])
greedy_first, runner_up, promoted, vocab, special = (int(a) for a in sys.argv[3:8])
bad_word = sys.argv[8]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
out = {}

out["models"] = [m.id for m in client.models.list().data]
model = out["models"][0]
out["retrieved"] = client.models.retrieve(model).id
try:
    client.models.retrieve("no-such-model")
    out["retrieve_unknown"] = None
except openai.NotFoundError as e:
    out["retrieve_unknown"] = {"status": e.status_code, "message": e.body.get("message")}

# vLLM's skip_special_tokens: a special token forced by logit_bias, three times.
forced = {"model": model, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0,
          "logit_bias": {str(special): 100}}
keep = {"ignore_eos": True, "skip_special_tokens": False}
out["special"] = {
    "default": client.completions.create(**forced, extra_body={"ignore_eos": True}).choices[0].text,
    "kept": client.completions.create(**forced, extra_body=keep).choices[0].text,
    "kept_stream": "".join(ch.choices[0].text for ch in client.completions.create(
        **forced, stream=True, extra_body=keep) if ch.choices),
    # vLLM's spaces_between_special_tokens: false (a byte-level decoder puts no
    # space between special tokens, so the text is the same).
    "kept_bare_stream": "".join(ch.choices[0].text for ch in client.completions.create(
        **forced, stream=True, extra_body={**keep, "spaces_between_special_tokens": False})
        if ch.choices),
}

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason,
                     "prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
                     # vLLM's stop_reason: null when nothing of the request's stopped it.
                     "stop_reason": c.choices[0].model_dump().get("stop_reason", "absent")}

parts, finish = [], None
for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True):
    parts.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
out["completion_stream"] = {"text": "".join(parts), "finish_reason": finish, "chunks": len(parts)}

messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
out["chat"] = {"content": r.choices[0].message.content, "role": r.choices[0].message.role,
               "finish_reason": r.choices[0].finish_reason, "prompt_tokens": r.usage.prompt_tokens}

# OpenAI's Responses API: instructions + input through the chat template, one
# output_text message; whole, streamed as typed events, and from a list of messages.
rs = {}
r = client.responses.create(model=model, instructions="Be brief.", input="Tell me a story.",
                            max_output_tokens=6, temperature=0)
rs["text"] = r.output_text
rs["status"] = r.status
rs["incomplete"] = r.incomplete_details.reason if r.incomplete_details else None
rs["usage"] = {"input": r.usage.input_tokens, "output": r.usage.output_tokens, "total": r.usage.total_tokens}
rs["id"] = r.id
rs["role"] = r.output[0].role
events = list(client.responses.create(model=model, instructions="Be brief.", input="Tell me a story.",
                                      max_output_tokens=6, temperature=0, stream=True))
rs["stream_types"] = [e.type for e in events]
rs["stream_sequence"] = [e.sequence_number for e in events]
rs["stream_text"] = "".join(e.delta for e in events if e.type == "response.output_text.delta")
rs["stream_final"] = events[-1].response.output_text
r = client.responses.create(model=model, max_output_tokens=6, temperature=0, input=[
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}])
rs["messages_text"] = r.output_text
r = client.responses.create(model=model, instructions="Be brief.", input="Tell me a story.",
                            max_output_tokens=6, temperature=0, extra_body={"cache_salt": "tenant-r"})
rs["salted_text"] = r.output_text
r = client.responses.create(model=model, input="Yes or no?", max_output_tokens=10, temperature=0,
                            text={"format": {"type": "json_schema", "name": "answer",
                                             "schema": {"type": "string", "enum": ["yes", "no"]}}})
rs["schema_text"] = r.output_text
kw = dict(model=model, instructions="Be brief.", input="Tell me a story.", max_output_tokens=6, temperature=0,
          include=["message.output_text.logprobs"], top_logprobs=2)
r = client.responses.create(**kw)
rs["logprobs"] = [e.model_dump() for e in r.output[0].content[0].logprobs]
rs["logprobs_stream"] = [lp.model_dump() if hasattr(lp, "model_dump") else lp
                         for e in client.responses.create(stream=True, **kw)
                         if e.type == "response.output_text.delta" for lp in (e.logprobs or [])]
for name, kwargs in {"previous_response_id": {"previous_response_id": "resp_1"},
                     "tools": {"tools": [{"type": "web_search"}]},
                     "foo": {"extra_body": {"foo": 1}},
                     "cache_salt": {"extra_body": {"cache_salt": ""}}}.items():
    try:
        client.responses.create(model=model, input="hi", max_output_tokens=2, **kwargs)
        rs[name] = None
    except openai.APIStatusError as e:
        rs[name] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
out["responses"] = rs

# vLLM's /tokenize and /detokenize, at the server's root.
root = base[: -len("/v1")]


def post_json(path, obj):
    req = urllib.request.Request(root + path, data=json.dumps(obj).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return {"status": resp.status, "body": json.loads(resp.read().decode())}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read().decode())}


tok = {"prompt": post_json("/tokenize", {"model": model, "prompt": "Once upon a time"})}
tok["chat"] = post_json("/tokenize", {"model": model, "messages": messages})
tok["strs"] = post_json("/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False, "return_token_strs": True})
tok["detokenize"] = post_json("/detokenize", {"model": model, "tokens": tok["prompt"]["body"]["tokens"]})
tok["bad_model"] = post_json("/tokenize", {"model": "no-such-model", "prompt": "x"})
tok["unknown_field"] = post_json("/tokenize", {"prompt": "x", "tools": []})
tok["both"] = post_json("/tokenize", {"prompt": "x", "messages": messages})
tok["bad_token"] = post_json("/detokenize", {"tokens": [vocab]})
with urllib.request.urlopen(root + "/version") as resp:
    tok["version"] = json.loads(resp.read().decode())
out["tokenize"] = tok

# A batch of two prompts, two samples each (greedy): choices 0-1 answer the
# first prompt, 2-3 the second, in one piece and streamed.
batch_prompts = ["Once upon a time", "The capital of France is"]
batch_args = {"model": model, "prompt": batch_prompts, "max_tokens": 4, "temperature": 0, "n": 2,
              "extra_body": {"ignore_eos": True}}
b = client.completions.create(**batch_args)
out["batch"] = {"texts": [c.text for c in sorted(b.choices, key=lambda c: c.index)],
                "indices": sorted(c.index for c in b.choices),
                "prompt_tokens": b.usage.prompt_tokens, "completion_tokens": b.usage.completion_tokens}
texts, usage, with_usage = {}, None, 0
for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **batch_args):
    for c in chunk.choices:
        texts[c.index] = texts.get(c.index, "") + c.text
    with_usage += bool(chunk.choices and chunk.usage)
    if chunk.usage:
        usage = chunk.usage
out["batch_stream"] = {"texts": [texts[i] for i in sorted(texts)], "indices": sorted(texts),
                       "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                       "choice_chunks_with_usage": with_usage}

# vLLM's continuous usage: every chunk with choices carries its choice's usage so
# far (the prompt's tokens, the choice's completion tokens); the last chunk the total.
running, last = {}, None
for chunk in client.completions.create(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}, **batch_args):
    for c in chunk.choices:
        u = chunk.usage
        running.setdefault(str(c.index), []).append(
            None if u is None else [u.prompt_tokens, u.completion_tokens, u.total_tokens])
    if not chunk.choices:
        last = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
chat_running = []
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}):
    if chunk.choices:
        u = chunk.usage
        chat_running.append(None if u is None else [u.prompt_tokens, u.completion_tokens, u.total_tokens])
out["continuous_usage"] = {"running": running, "last": last, "chat": chat_running}

# vLLM's return_token_ids: the prompt's ids and each choice's, in one piece and streamed.
ids_args = {"model": model, "max_tokens": 4, "temperature": 0,
            "extra_body": {"ignore_eos": True, "return_token_ids": True}}
c = client.completions.create(prompt="Once upon a time", **ids_args).model_dump()
ti = {"completion": {k: c["choices"][0].get(k) for k in ("prompt_token_ids", "token_ids")}}
prompt_ids, token_ids = [], []
for chunk in client.completions.create(prompt="Once upon a time", stream=True, **ids_args):
    d = chunk.model_dump()
    for ch in d["choices"]:
        prompt_ids.append(ch.get("prompt_token_ids"))
        token_ids += ch.get("token_ids") or []
ti["completion_stream"] = {"prompt_token_ids": prompt_ids, "token_ids": token_ids}
r = client.chat.completions.create(messages=messages, **{**ids_args, "max_tokens": 6}).model_dump()
ti["chat"] = {"prompt_token_ids": r.get("prompt_token_ids"), "token_ids": r["choices"][0].get("token_ids")}
prompt_ids, token_ids = [], []
for chunk in client.chat.completions.create(messages=messages, stream=True, **{**ids_args, "max_tokens": 6}):
    d = chunk.model_dump()
    if d["choices"]:
        prompt_ids.append(d.get("prompt_token_ids"))
        token_ids += d["choices"][0].get("token_ids") or []
ti["chat_stream"] = {"prompt_token_ids": prompt_ids, "token_ids": token_ids}
try:
    client.completions.create(prompt="Once upon a time", echo=True, **ids_args)
    ti["echo"] = None
except openai.APIStatusError as e:
    ti["echo"] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
out["token_ids"] = ti

# vLLM's truncate_prompt_tokens: only the prompt's last 3 tokens run.
c = client.completions.create(prompt="Once upon a time", **{**ids_args, "extra_body": {
    **ids_args["extra_body"], "truncate_prompt_tokens": 3}}).model_dump()
trunc = {"prompt_token_ids": c["choices"][0]["prompt_token_ids"], "token_ids": c["choices"][0]["token_ids"],
         "prompt_tokens": c["usage"]["prompt_tokens"]}
r = client.chat.completions.create(messages=messages, model=model, max_tokens=2, temperature=0,
                                   extra_body={"truncate_prompt_tokens": 5})
trunc["chat_prompt_tokens"] = r.usage.prompt_tokens
try:
    client.completions.create(prompt="Once upon a time", model=model, max_tokens=2,
                              extra_body={"truncate_prompt_tokens": 0})
    trunc["zero"] = None
except openai.APIStatusError as e:
    trunc["zero"] = {"status": e.status_code, "param": e.body.get("param")}
out["truncate"] = trunc

# vLLM's allowed_token_ids: only those are drawn; with another constraint, or an
# id outside the vocabulary, refused naming it.
allowed = {}
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=3,
                              extra_body={"allowed_token_ids": [runner_up, promoted], "return_token_ids": True,
                                          "ignore_eos": True}).model_dump()
allowed["token_ids"] = c["choices"][0]["token_ids"]
for name, extra in {"with_regex": {"allowed_token_ids": [runner_up], "guided_regex": "a+"},
                    "outside": {"allowed_token_ids": [vocab + 3]}}.items():
    try:
        client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body=extra)
        allowed[name] = None
    except openai.APIStatusError as e:
        allowed[name] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
out["allowed_token_ids"] = allowed

# vLLM's bad_words: the greedy text's first word banned.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                              extra_body={"bad_words": [bad_word], "return_token_ids": True,
                                          "ignore_eos": True}).model_dump()
out["bad_words"] = {"token_ids": c["choices"][0]["token_ids"], "word": bad_word}

# The same messages as lists of content parts (what the client sends for
# multimodal messages): their text is the prompt; an image part is refused.
part_messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
r = client.chat.completions.create(model=model, messages=part_messages, max_tokens=6, temperature=0)
out["chat_parts"] = {"content": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens}
try:
    client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    out["chat_image"] = None
except openai.APIStatusError as e:
    out["chat_image"] = {"status": e.status_code, "message": e.body.get("message")}

parts, roles = [], []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True):
    d = chunk.choices[0].delta
    if d.role:
        roles.append(d.role)
    if d.content:
        parts.append(d.content)
out["chat_stream"] = {"content": "".join(parts), "roles": roles}

# Log probabilities (greedy, EOS ignored so the lengths are known), in one piece and streamed.
lp = {}
greedy = {"model": model, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
c = client.completions.create(prompt="Once upon a time", logprobs=3, **greedy)
lp["completion"] = c.choices[0].logprobs.model_dump()
acc = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
chunks_with_logprobs = 0
for chunk in client.completions.create(prompt="Once upon a time", logprobs=3, stream=True, **greedy):
    l = chunk.choices[0].logprobs if chunk.choices else None
    if l is not None and l.tokens:
        chunks_with_logprobs += 1
        for k in acc:
            acc[k] += getattr(l, k)
lp["completion_stream"] = {**acc, "chunks": chunks_with_logprobs}
r = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=3, **greedy)
lp["chat"] = [e.model_dump() for e in r.choices[0].logprobs.content]
content, chunks_with_logprobs = [], 0
for chunk in client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=3, stream=True, **greedy):
    l = chunk.choices[0].logprobs if chunk.choices else None
    if l is not None and l.content:
        chunks_with_logprobs += 1
        content += [e.model_dump() for e in l.content]
lp["chat_stream"] = {"content": content, "chunks": chunks_with_logprobs}
r = client.chat.completions.create(messages=messages, logprobs=True, **greedy)
lp["chat_no_top"] = [e.model_dump() for e in r.choices[0].logprobs.content]
c = client.completions.create(prompt="Once upon a time", **greedy)
lp["not_asked"] = {"completion": c.choices[0].logprobs is None}
# vLLM's return_tokens_as_token_ids: tokens named `token_id:N`, one piece and streamed.
as_ids = {**greedy, "extra_body": {**greedy["extra_body"], "return_tokens_as_token_ids": True}}
c = client.completions.create(prompt="Once upon a time", logprobs=3, **as_ids)
lp["as_ids"] = c.choices[0].logprobs.model_dump()
acc = {"tokens": [], "text_offset": []}
for chunk in client.completions.create(prompt="Once upon a time", logprobs=3, stream=True, **as_ids):
    l = chunk.choices[0].logprobs if chunk.choices else None
    if l is not None and l.tokens:
        for k in acc:
            acc[k] += getattr(l, k)
lp["as_ids_stream"] = acc
content = []
for chunk in client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=3, stream=True, **as_ids):
    l = chunk.choices[0].logprobs if chunk.choices else None
    if l is not None and l.content:
        content += [e.model_dump() for e in l.content]
lp["as_ids_chat_stream"] = content
lp_errors = {}
for name, call in {
    "completions.logprobs": lambda: client.completions.create(prompt="hi", logprobs=21, **greedy),
    "chat.top_logprobs": lambda: client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=21, **greedy),
    "chat.top_logprobs_without_logprobs": lambda: client.chat.completions.create(messages=messages, top_logprobs=2, **greedy),
}.items():
    try:
        call()
        lp_errors[name] = None
    except openai.APIStatusError as e:
        lp_errors[name] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
lp["errors"] = lp_errors
out["logprobs"] = lp

errors = {}
for name, kwargs in {
    "negative_temperature": {"temperature": -1.0},
    "top_p_zero_point": {"top_p": 1.5},
    "unknown_model": {"model": "no-such-model"},
    "too_many_tokens": {"max_tokens": 10**6},
    "repetition_penalty_zero": {"extra_body": {"repetition_penalty": 0}},
    "presence_penalty_three": {"presence_penalty": 3.0},
    "frequency_penalty_minus_three": {"frequency_penalty": -3.0},
    "min_p_two": {"extra_body": {"min_p": 2.0}},
    "top_k_minus_five": {"extra_body": {"top_k": -5}},
    "prompt_batch_empty": {"prompt": []},
    "prompt_shape": {"prompt": {"text": "hi"}},
}.items():
    args = {"model": model, "prompt": "hi", "max_tokens": 4, **kwargs}
    try:
        client.completions.create(**args)
        errors[name] = None
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        errors[name] = {"status": e.status_code, "param": body.get("param"),
                        "message": body.get("message") if body else str(e.body)}


def raw_post(body: bytes):
    req = urllib.request.Request(base + "/completions", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return {"status": resp.status}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read().decode())}


errors["invalid_utf8"] = raw_post(b'{"prompt": "\xff\xfe", "max_tokens": 3}')
errors["invalid_json"] = raw_post(b'{"prompt": ')

# Past the context: vLLM's message, with the numbers.
try:
    client.chat.completions.create(model=model, messages=messages, max_completion_tokens=1024)
    errors["past_the_context"] = None
except openai.APIStatusError as e:
    errors["past_the_context"] = {"status": e.status_code, "message": e.body.get("message")}
out["errors"] = errors

# A repeated prompt: usage.prompt_tokens_details.cached_tokens counts the
# prompt tokens served from the prefix cache (0 the first time).
def cached_of(usage):
    d = usage.prompt_tokens_details
    return None if d is None else d.cached_tokens

long_prompt = "The quick brown fox jumps over the lazy dog near the river bank. " * 8
cached = {}
for name in ("first", "second"):
    c = client.completions.create(model=model, prompt=long_prompt, max_tokens=4, temperature=0)
    cached[f"completion_{name}"] = cached_of(c.usage)
usage = None
for chunk in client.completions.create(model=model, prompt=long_prompt, max_tokens=4, temperature=0,
                                       stream=True, stream_options={"include_usage": True}):
    usage = chunk.usage or usage
cached["completion_stream"] = cached_of(usage)
cached["prompt_tokens"] = usage.prompt_tokens
long_chat = [{"role": "system", "content": long_prompt}, {"role": "user", "content": "Who jumps?"}]
for name in ("first", "second"):
    r = client.chat.completions.create(model=model, messages=long_chat, max_tokens=4, temperature=0)
    cached[f"chat_{name}"] = cached_of(r.usage)
usage = None
for chunk in client.chat.completions.create(model=model, messages=long_chat, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
    usage = chunk.usage or usage
cached["chat_stream"] = cached_of(usage)
out["cached_tokens"] = cached

# vLLM's cache_salt: a salted prompt shares the prefix cache only with requests of
# the same salt (not with the unsalted ones above); an empty salt is refused.
salted = {}
for name, salt in (("a_first", "tenant-a"), ("a_second", "tenant-a"), ("b_first", "tenant-b")):
    c = client.completions.create(model=model, prompt=long_prompt, max_tokens=4, temperature=0,
                                  extra_body={"cache_salt": salt})
    salted[name] = cached_of(c.usage)
    salted[f"{name}_text"] = c.choices[0].text
salted["plain_text"] = client.completions.create(model=model, prompt=long_prompt, max_tokens=4,
                                                 temperature=0).choices[0].text
try:
    client.completions.create(model=model, prompt=long_prompt, max_tokens=4,
                              extra_body={"cache_salt": ""})
    salted["empty"] = None
except openai.APIStatusError as e:
    salted["empty"] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
out["cache_salt"] = salted

# Every field Tandem cannot honour is refused by name, and the next request is served.
refused = {}
completion_refusals = {
    "suffix": {"suffix": " The end."},
    "max_token": {"extra_body": {"max_token": 3}},
}
chat_refusals = {
    "kv_transfer_params": {"extra_body": {"kv_transfer_params": {"do_remote_prefill": True}}},
    # tools and tool_choice are honoured: their refusals are in tools_client.py.
    "functions": {"extra_body": {"functions": [{"name": "f", "parameters": {}}]}},
    "function_call": {"extra_body": {"function_call": "auto"}},
    "prompt": {"extra_body": {"prompt": "hi"}},
    "chat_template": {"extra_body": {"chat_template": "{{ messages }}"}},
}
for kind, cases in [("completions", completion_refusals), ("chat", chat_refusals)]:
    for field, kwargs in cases.items():
        try:
            if kind == "completions":
                client.completions.create(model=model, prompt="hi", max_tokens=2, **kwargs)
            else:
                client.chat.completions.create(model=model, messages=messages, max_tokens=2, **kwargs)
            seen = None
        except openai.APIStatusError as e:
            seen = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
        nxt = client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=0)
        refused[f"{kind}.{field}"] = {"error": seen, "next_tokens": nxt.usage.completion_tokens}
out["refused"] = refused

# Neutral values of the same fields pass, and so do the vLLM extras Tandem honours.
c = client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=0, n=1, best_of=1,
                              echo=False, logprobs=None, logit_bias={}, user="someone",
                              extra_body={"min_tokens": 0, "ignore_eos": True, "top_k": 5,
                                          "repetition_penalty": 1.0, "min_p": 0.0})
r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=2, temperature=0,
                                   logprobs=False, response_format={"type": "text"}, tool_choice="none",
                                   metadata={"k": "v"}, store=False, stream_options=None)
out["neutral"] = {"completion_tokens": c.usage.completion_tokens, "chat_tokens": r.usage.completion_tokens}

# stop_token_ids (a vLLM extra) stops generation at that token.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                              extra_body={"stop_token_ids": [stop_token_id]})
out["stop_token_ids"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason,
                         "completion_tokens": c.usage.completion_tokens,
                         "stop_reason": c.choices[0].model_dump().get("stop_reason", "absent")}
# vLLM's include_stop_str_in_output: the stop token's text, or the stop string, stays.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                              extra_body={"stop_token_ids": [stop_token_id], "include_stop_str_in_output": True})
included = {"stop_id": c.choices[0].text}
stop_string = out["completion"]["text"][3:6]
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop_string],
                              extra_body={"include_stop_str_in_output": True})
included["stop_string"] = stop_string
included["text"] = c.choices[0].text
included["finish_reason"] = c.choices[0].finish_reason
included["stop_reason"] = c.choices[0].model_dump().get("stop_reason", "absent")
chunks = [ch.choices[0].model_dump() for ch in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop_string], stream=True,
    extra_body={"include_stop_str_in_output": True}) if ch.choices]
included["stream"] = "".join(ch["text"] for ch in chunks)
included["stream_stop_reason"] = [ch.get("stop_reason") for ch in chunks if ch["finish_reason"]]
# Chat reports it too: a stop string from the middle of the greedy answer.
chat_messages = [{"role": "user", "content": "Count: one, two,"}]
free = client.chat.completions.create(model=model, messages=chat_messages, max_tokens=8, temperature=0)
chat_stop = free.choices[0].message.content[3:6]
r = client.chat.completions.create(model=model, messages=chat_messages, max_tokens=8, temperature=0,
                                   stop=[chat_stop])
included["chat"] = {"free": free.choices[0].message.content, "stop": chat_stop,
                    "free_stop_reason": free.choices[0].model_dump().get("stop_reason", "absent"),
                    "finish_reason": r.choices[0].finish_reason,
                    "stop_reason": r.choices[0].model_dump().get("stop_reason", "absent")}
out["include_stop"] = included

# seed makes sampling reproducible.
def sample(seed):
    return client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                     seed=seed, extra_body={"top_k": 50}).choices[0].text
out["seeded"] = {"first": sample(1234), "again": sample(1234), "others": [sample(s) for s in (1, 2, 3)]}

# logit_bias: -100 bans the greedy first token (the runner-up comes instead);
# +100 makes a much less likely token the greedy pick.
one = {"model": model, "prompt": "Once upon a time", "max_tokens": 1, "temperature": 0,
       "extra_body": {"ignore_eos": True}}
bias = {}
for name, b in {"none": {}, "ban": {str(greedy_first): -100}, "promote": {str(promoted): 100}}.items():
    c = client.completions.create(logit_bias=b, **one)
    bias[name] = {"text": c.choices[0].text, "completion_tokens": c.usage.completion_tokens}
bias_errors = {}
for name, b in {"id_past_vocab": {str(vocab): 1}, "value_200": {"5": 200}}.items():
    try:
        client.completions.create(logit_bias=b, **one)
        bias_errors[name] = None
    except openai.APIStatusError as e:
        bias_errors[name] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
bias["errors"] = bias_errors
out["logit_bias"] = bias

# min_tokens: the greedy first token as a stop id (EOS honoured) ends the output
# at once, unless min_tokens holds it back.
mt = {}
for name, n in {"without": 0, "with": 5}.items():
    c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                  extra_body={"stop_token_ids": [greedy_first], "min_tokens": n})
    mt[name] = {"completion_tokens": c.usage.completion_tokens, "finish_reason": c.choices[0].finish_reason}
out["min_tokens"] = mt

# echo: the prompt's text, then the completion's; in one piece and streamed.
ec = {}
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True)
ec["text"] = c.choices[0].text
parts = [ch.choices[0].text for ch in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True, stream=True)]
ec["stream"] = "".join(parts)
ec["stream_first"] = parts[0]
# echo with logprobs: the prompt's tokens lead the log probabilities (the first one's null).
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=2, temperature=0,
                              echo=True, logprobs=1)
lp = c.choices[0].logprobs
ec["with_logprobs"] = {"text": c.choices[0].text, "tokens": lp.tokens, "token_logprobs": lp.token_logprobs,
                       "top_logprobs": lp.top_logprobs, "text_offset": lp.text_offset}
stream_lp = {"tokens": [], "token_logprobs": [], "text": ""}
for ch in client.completions.create(model=model, prompt="Once upon a time", max_tokens=2, temperature=0,
                                    echo=True, logprobs=1, stream=True):
    for choice in ch.choices:
        stream_lp["text"] += choice.text
        if choice.logprobs:
            stream_lp["tokens"] += choice.logprobs.tokens
            stream_lp["token_logprobs"] += choice.logprobs.token_logprobs
ec["with_logprobs_stream"] = stream_lp
# max_tokens 0 with echo: the prompt alone (as OpenAI's legacy API and vLLM answer it).
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1)
ec["only"] = {"text": c.choices[0].text, "token_logprobs": c.choices[0].logprobs.token_logprobs,
              "finish_reason": c.choices[0].finish_reason}
ec["only_stream"] = "".join(ch.choices[0].text for ch in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=0, echo=True, stream=True) if ch.choices)
# A batch of token-id prompts scored as lm-eval's local-completions does (echo,
# logprobs=1, max_tokens=1): each choice's log probabilities cover its own prompt.
batch = [[1, 5, 9, 14], [1, 7, 3]]
c = client.completions.create(model=model, prompt=batch, max_tokens=1, temperature=0, echo=True, logprobs=1)
ec["batch"] = [{"index": ch.index, "token_logprobs": ch.logprobs.token_logprobs} for ch in c.choices]
out["echo"] = ec

# vLLM's prompt_logprobs: on each completions choice, beside the choices for chat.
pl = {}
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=2, temperature=0,
                              extra_body={"prompt_logprobs": 2})
pl["completions"] = c.choices[0].model_extra.get("prompt_logprobs")
r = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0,
                                   extra_body={"prompt_logprobs": 0})
pl["chat"] = r.model_extra.get("prompt_logprobs")
pl["chat_prompt_tokens"] = r.usage.prompt_tokens
for name, extra in {"stream": {"prompt_logprobs": 1}, "minus_one": {"prompt_logprobs": -1},
                    "too_many": {"prompt_logprobs": 21}}.items():
    try:
        if name == "stream":
            list(client.completions.create(model=model, prompt="hi", max_tokens=2, stream=True, extra_body=extra))
        else:
            client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body=extra)
        pl[name] = None
    except openai.APIStatusError as e:
        pl[name] = {"status": e.status_code, "param": e.body.get("param"), "message": e.body.get("message")}
out["prompt_logprobs"] = pl


# vLLM's chat extensions: continue_final_message (the reply continues the final
# assistant message), chat echo, add_special_tokens, chat_template_kwargs and documents.
turns = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]
open_chat = {"continue_final_message": True, "add_generation_prompt": False}
cx = {
    "open_ids": post_json("/tokenize", {"messages": turns, **open_chat})["body"].get("tokens"),
    "closed_ids": post_json("/tokenize", {"messages": turns, "add_generation_prompt": False})["body"].get("tokens"),
}
six = {"max_tokens": 6, "temperature": 0}
r = client.chat.completions.create(model=model, messages=turns, **six, extra_body={**open_chat, "ignore_eos": True})
cx["content"] = r.choices[0].message.content
cx["same_ids"] = client.completions.create(model=model, prompt=cx["open_ids"], **six,
                                          extra_body={"ignore_eos": True}).choices[0].text
echo_body = {**open_chat, "ignore_eos": True, "echo": True}
r = client.chat.completions.create(model=model, messages=turns, **six, extra_body=echo_body)
cx["echo"] = r.choices[0].message.content
cx["echo_stream"] = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
    model=model, messages=turns, **six, stream=True, extra_body=echo_body) if ch.choices)
# echo after a user message: the answer is the assistant's, so nothing is echoed.
r = client.chat.completions.create(model=model, messages=turns[:1], max_tokens=6, temperature=0,
                                   extra_body={"echo": True})
cx["echo_other_role"] = r.choices[0].message.content
r = client.chat.completions.create(model=model, messages=turns[:1], max_tokens=6, temperature=0)
cx["plain"] = r.choices[0].message.content
# The prompt ids that ran, with and without the tokenizer's special tokens.
ids = lambda c: c.model_extra.get("prompt_token_ids") or c.choices[0].model_extra.get("prompt_token_ids")
cx["special"] = {
    "completion_default": ids(client.completions.create(model=model, prompt="Once upon a time", max_tokens=1,
                                                        extra_body={"return_token_ids": True})),
    "completion_without": ids(client.completions.create(model=model, prompt="Once upon a time", max_tokens=1,
                                                        extra_body={"return_token_ids": True, "add_special_tokens": False})),
    "tokenize_without": post_json("/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False})["body"]["tokens"],
    "chat_with": ids(client.chat.completions.create(model=model, messages=turns[:1], max_tokens=1,
                                                   extra_body={"return_token_ids": True, "add_special_tokens": True})),
    "tokenize_chat_with": post_json("/tokenize", {"messages": turns[:1], "add_special_tokens": True})["body"]["tokens"],
}
refusals = {}
for name, body in [
    ("both", {"continue_final_message": True}),
    ("kwargs", {"chat_template_kwargs": {"enable_thinking": False}}),
    ("documents", {"documents": [{"text": "Paris is in France."}]}),
]:
    try:
        client.chat.completions.create(model=model, messages=turns, max_tokens=2, extra_body=body)
        refusals[name] = None
    except openai.APIStatusError as e:
        refusals[name] = {"status": e.status_code, "message": e.body.get("message")}
cx["refused"] = refusals
out["chat_ext"] = cx


def raw(method: str, path: str):
    req = urllib.request.Request(base.removesuffix("/v1") + path, method=method)
    try:
        with urllib.request.urlopen(req) as resp:
            return {"status": resp.status}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read().decode())}



# What vLLM's server accepts that a stricter reading of OpenAI's would not, and
# the CORS it answers browsers with.
def raw_request(method: str, path: str, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    h = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(root + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req) as resp:
            return {"status": resp.status, "headers": {k.lower(): v for k, v in resp.headers.items()}, "body": resp.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "headers": {k.lower(): v for k, v in e.headers.items()}, "body": e.read().decode()}


vc = {}
vc["preflight"] = raw_request("OPTIONS", "/v1/chat/completions", headers={
    "origin": "https://app.example", "access-control-request-method": "POST",
    "access-control-request-headers": "authorization,content-type"})
vc["cors_get"] = raw_request("GET", "/v1/models", headers={"origin": "https://app.example"})
vc["nulls"] = raw_request("POST", "/v1/completions", {
    "model": model, "prompt": "hi", "max_tokens": 2, "stream": None, "echo": None,
    "stop_token_ids": None, "return_token_ids": None, "return_tokens_as_token_ids": None})
vc["stream_options_alone"] = raw_request("POST", "/v1/completions", {
    "model": model, "prompt": "hi", "max_tokens": 2, "stream_options": {"include_usage": True}})
vc["stream_options_empty"] = raw_request("POST", "/v1/completions", {
    "model": model, "prompt": "hi", "max_tokens": 2, "stream_options": {}})
usage = None
for chunk in client.completions.create(model=model, prompt="hi", max_tokens=2, stream=True, stream_options={}):
    usage = chunk.usage or usage
vc["stream_options_default_usage"] = usage.completion_tokens if usage else None
vc["top_k_minus_one"] = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"top_k": -1}).choices[0].text
seeded = [client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=1, seed=-5).choices[0].text for _ in range(2)]
vc["negative_seed_twice"] = seeded
vc["seed_minus_one"] = raw_request("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2, "seed": -1})["status"]
vc["seed_too_big"] = raw_request("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2, "seed": 2**64})
vc["top_k_minus_two"] = raw_request("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2, "top_k": -2})
vc["completions_default_len"] = client.completions.create(
    model=model, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True}).usage.completion_tokens
chat_default = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Tell me a story"}], temperature=0,
    extra_body={"ignore_eos": True})
vc["chat_default_len"] = [chat_default.usage.prompt_tokens, chat_default.usage.completion_tokens,
                          chat_default.choices[0].finish_reason]
out["vllm_compat"] = vc

out["routes"] = {"not_found": raw("GET", "/v1/no-such-route"), "wrong_method": raw("GET", "/v1/completions")}
print(json.dumps(out))
