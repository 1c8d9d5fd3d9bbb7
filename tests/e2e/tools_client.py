#!/usr/bin/env python3
"""Tool calling through Tandem's OpenAI API with the official `openai` client.

Usage: tools_client.py BASE_URL. Prints one JSON object with what it saw
(each call's arguments parsed with `json.loads` and checked with `jsonschema`
against its function's schema); tests/e2e/tools.rs asserts on it.
"""
import json
import sys
import time

import jsonschema
import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
model = client.models.list().data[0].id
out = {}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                   "b": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_call(name, arguments):
    """True, or why the call is not a valid call of one of TOOLS."""
    if name not in SCHEMAS:
        return f"unknown function {name!r}"
    try:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        return True
    except (ValueError, jsonschema.ValidationError) as e:
        return f"{name}({arguments!r}): {e}"


def answer(r):
    c = r.choices[0]
    calls = c.message.tool_calls or []
    return {"finish_reason": c.finish_reason, "content": c.message.content,
            "prompt_tokens": r.usage.prompt_tokens if r.usage else None,
            "calls": [{"id": t.id, "type": t.type, "name": t.function.name, "arguments": t.function.arguments,
                       "valid": check_call(t.function.name, t.function.arguments)} for t in calls]}


def streamed(**kw):
    calls, content, finish, role = {}, "", None, None
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        role = role or d.role
        content += d.content or ""
        for t in d.tool_calls or []:
            c = calls.setdefault(t.index, {"id": None, "type": None, "name": None, "arguments": "", "deltas": 0})
            if t.id:
                c["id"], c["type"] = t.id, t.type
            if t.function and t.function.name:
                c["name"] = t.function.name
            if t.function and t.function.arguments:
                c["arguments"] += t.function.arguments
                c["deltas"] += 1
        finish = chunk.choices[0].finish_reason or finish
    calls = [calls[i] for i in sorted(calls)]
    for c in calls:
        c["valid"] = check_call(c["name"], c["arguments"])
    return {"finish_reason": finish, "content": content or None, "role": role, "calls": calls}


timings = {}


def timed(case, f):
    start = time.monotonic()
    out[case] = f()
    timings[case] = round(time.monotonic() - start, 2)


timed("named", lambda: answer(client.chat.completions.create(
    model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40, temperature=0)))
timed("named_stream", lambda: streamed(messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40,
                                       temperature=1.0, seed=1))
# `required` with parallel_tool_calls false (one call at most): a 135M model
# allowed several repeats its first call until max_tokens.
timed("required", lambda: answer(client.chat.completions.create(
    model=model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
    max_tokens=60, temperature=0)))
timed("required_stream", lambda: streamed(messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=60, temperature=0.5, seed=2))

# Second turn: the call and its result in the history.
call = out["named"]["calls"][0]
history = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
    {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees celsius, sunny"},
]
timed("second_turn", lambda: answer(client.chat.completions.create(
    model=model, messages=history, tools=TOOLS, max_tokens=12, temperature=0)))

# The Responses API with the same function tools (its flat tool shape): a named
# call whole and streamed, then the call and its output as input items.
RTOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
RNAMED = {"type": "function", "name": "get_weather"}


def response_calls(output):
    return [{"call_id": o.call_id, "name": o.name, "arguments": o.arguments, "id": o.id,
             "valid": check_call(o.name, o.arguments)} for o in output if o.type == "function_call"]


r = client.responses.create(model=model, input=ASK[0]["content"], tools=RTOOLS, tool_choice=RNAMED,
                            max_output_tokens=40, temperature=0)
out["responses_named"] = {"status": r.status, "calls": response_calls(r.output),
                          "messages": [o.type for o in r.output if o.type == "message"]}
events = list(client.responses.create(model=model, input=ASK[0]["content"], tools=RTOOLS, tool_choice=RNAMED,
                                      max_output_tokens=40, temperature=0, stream=True))
out["responses_named_stream"] = {
    "types": [e.type for e in events],
    "arguments": [e.arguments for e in events if e.type == "response.function_call_arguments.done"],
    "calls": response_calls(events[-1].response.output),
}
rc = out["responses_named"]["calls"][0] if out["responses_named"]["calls"] else None
if rc:
    r = client.responses.create(model=model, tools=RTOOLS, max_output_tokens=12, temperature=0, input=[
        {"role": "user", "content": ASK[0]["content"]},
        {"type": "function_call", "call_id": rc["call_id"], "name": rc["name"], "arguments": rc["arguments"]},
        {"type": "function_call_output", "call_id": rc["call_id"], "output": "18 degrees celsius, sunny"}])
    out["responses_second_turn"] = {"status": r.status, "output": [o.type for o in r.output],
                                    "tokens": r.usage.output_tokens}


def with_logprobs(stream):
    """A named call with logprobs: its call, how many token entries came back
    and how many tokens were generated."""
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40,
              temperature=0, logprobs=True, top_logprobs=2)
    if not stream:
        r = client.chat.completions.create(**kw)
        a = answer(r)
        a["entries"] = len(r.choices[0].logprobs.content)
        a["tokens"] = r.usage.completion_tokens
        return a
    # With vLLM's continuous usage: every chunk with a choice counts the tokens so far.
    entries, tokens, args, running = 0, None, "", []
    for chunk in client.chat.completions.create(stream=True, stream_options={
            "include_usage": True, "continuous_usage_stats": True}, **kw):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        running.append(chunk.usage.completion_tokens if chunk.usage else None)
        c = chunk.choices[0]
        entries += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
        for t in c.delta.tool_calls or []:
            args += (t.function.arguments or "") if t.function else ""
    return {"entries": entries, "tokens": tokens, "valid": check_call("get_weather", args), "running": running}


timed("logprobs", lambda: with_logprobs(False))
timed("logprobs_stream", lambda: with_logprobs(True))
timed("auto_stream", lambda: streamed(messages=ASK, tools=TOOLS, max_tokens=24, temperature=0))
timed("no_tools", lambda: answer(client.chat.completions.create(
    model=model, messages=ASK, max_tokens=1, temperature=0)))
timed("none", lambda: answer(client.chat.completions.create(
    model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)))


def refused(**kw):
    kw.setdefault("messages", ASK)
    try:
        client.chat.completions.create(model=model, max_tokens=5, **kw)
        return None
    except openai.BadRequestError as e:
        param = getattr(e, "param", None)
        return {"status": e.status_code, "message": str(e), "param": param}


BAD_SCHEMA = [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]
out["refused"] = {
    "unknown_name": refused(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
    "choice_without_tools": refused(tool_choice="required"),
    "bad_schema": refused(tools=BAD_SCHEMA),
    "no_tool_call_id": refused(messages=ASK + [{"role": "tool", "content": "x"}], tools=TOOLS),
    "bad_tool_type": refused(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
    "with_response_format": refused(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
    "bad_parallel": refused(tools=TOOLS, parallel_tool_calls="yes"),
    "n_with_tools": refused(tools=TOOLS, n=2),
}
r = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, temperature=0)
out["after"] = r.choices[0].finish_reason
out["seconds"] = timings
print(json.dumps(out))
