#!/usr/bin/env python3
"""Drives Tandem's OpenAI-compatible API over https with the official `openai` client.

Usage: openai_tls_client.py BASE_URL CA_PEM [CLIENT_CERT CLIENT_KEY]
(e.g. https://localhost:8443/v1 ca.pem). Trusts CA_PEM, presents the client
certificate if given. Prints one JSON object: the models and a greedy
completion (whole and streamed), or {"error": "connection", ...} when no
connection could be made (TLS refused, plaintext server). tests/e2e/client_tls.rs
asserts on it.
"""
import json
import ssl
import sys

import openai

base, ca = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=ca)
if len(sys.argv) > 4:
    context.load_cert_chain(sys.argv[3], sys.argv[4])
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30,
                       http_client=openai.DefaultHttpxClient(verify=context))
out = {"error": None}
try:
    out["models"] = [m.id for m in client.models.list().data]
    model = out["models"][0]
    c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    out["completion"] = c.choices[0].text
    parts = [chunk.choices[0].text for chunk in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)]
    out["completion_stream"] = "".join(parts)
except openai.APIConnectionError as e:
    out["error"] = "connection"
    out["message"] = repr(e.__cause__ or e)
print(json.dumps(out))
