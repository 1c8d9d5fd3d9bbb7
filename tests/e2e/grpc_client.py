#!/usr/bin/env python3
"""Drives the router's gRPC API with Python stubs generated from proto/ by
grpcio-tools, as a client outside the project would (installed by scripts/test.sh).

Usage: grpc_client.py ROUTER_ADDR PROTO_DIR VOCAB
Prints one JSON object with what it saw; tests/e2e/grpc_stubs.rs asserts on it.
"""
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc

addr, proto_dir, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
stubs = tempfile.mkdtemp()
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={stubs}", f"--grpc_python_out={stubs}",
                  "tandem/v1/generate.proto"])
if rc != 0:
    sys.exit(f"protoc failed on {proto_dir}/tandem/v1/generate.proto ({rc})")
sys.path.insert(0, stubs)
from tandem.v1 import generate_pb2 as pb  # noqa: E402
from tandem.v1 import generate_pb2_grpc as rpc  # noqa: E402

channel = grpc.insecure_channel(addr)
client = rpc.GenerateStub(channel)
out = {}


def run(req):
    """The stream's token ids, text, finish reason and usage, or its error."""
    ids, text, finished, prompt_lp = [], "", None, None
    try:
        for r in client.Generate(req, timeout=60):
            if r.HasField("prompt_logprobs"):
                p = r.prompt_logprobs
                prompt_lp = {"first_id": p.first_id, "before_tokens": not ids,
                             "tokens": [{"id": t.id, "logprob": t.logprob, "rank": t.rank,
                                         "top": [x.id for x in t.top]} for t in p.tokens]}
            elif r.HasField("token"):
                ids += list(r.token.ids)
                text += r.token.text
            elif r.HasField("finished"):
                f = r.finished
                finished = {"reason": pb.FinishReason.Name(f.reason),
                            "prompt_tokens": f.usage.prompt_tokens,
                            "completion_tokens": f.usage.completion_tokens}
    except grpc.RpcError as e:
        return {"error": {"code": e.code().name, "message": e.details()}}
    return {"ids": ids, "text": text, "finished": finished, "prompt_logprobs": prompt_lp}


greedy = pb.SamplingParams(temperature=0)
out["greedy"] = run(pb.GenerateRequest(text="Once upon a time", max_tokens=8, sampling=greedy, ignore_eos=True))
out["by_ids"] = run(pb.GenerateRequest(token_ids=pb.TokenIds(ids=out["greedy"]["ids"][:3] or [1]),
                                       max_tokens=4, sampling=greedy, ignore_eos=True))
with_lp = run(pb.GenerateRequest(text="Once upon a time", max_tokens=2, sampling=greedy, logprobs=3))
out["logprobs_ok"] = "error" not in with_lp
out["prompt_logprobs"] = run(pb.GenerateRequest(text="Once upon a time", max_tokens=2, sampling=greedy,
                                                prompt_logprobs=2))
out["salted"] = run(pb.GenerateRequest(text="Once upon a time", max_tokens=8, sampling=greedy, ignore_eos=True,
                                       cache_salt="tenant"))
# Bad input: the status code and a message a person understands; the next request is served.
bad = {
    "token_outside_vocab": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[vocab]), max_tokens=2),
    "too_many_logprobs": pb.GenerateRequest(text="hi", max_tokens=2, logprobs=21),
    "too_many_prompt_logprobs": pb.GenerateRequest(text="hi", max_tokens=2, prompt_logprobs=21),
    "no_prompt": pb.GenerateRequest(max_tokens=2),
    "unknown_model": pb.GenerateRequest(text="hi", model="no-such-model", max_tokens=2),
    "negative_temperature": pb.GenerateRequest(text="hi", max_tokens=2, sampling=pb.SamplingParams(temperature=-1)),
    "empty_cache_salt": pb.GenerateRequest(text="hi", max_tokens=2, cache_salt=""),
}
out["bad"] = {name: run(req) for name, req in bad.items()}
# A client that walks away mid-stream: the cluster goes on serving.
stream = client.Generate(pb.GenerateRequest(text="Once upon a time", max_tokens=200, ignore_eos=True), timeout=60)
next(stream)
stream.cancel()
out["after_cancel"] = run(pb.GenerateRequest(text="Once upon a time", max_tokens=8, sampling=greedy, ignore_eos=True))
print(json.dumps(out))
