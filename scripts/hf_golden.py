#!/usr/bin/env python3
"""Golden outputs from Hugging Face transformers (PyTorch), the engine's independent reference.

For each model directory given, writes into tests/fixtures/golden/:
  <name>.json              prompts (token ids), greedy 32-token continuations, tokenizer
                           encodings of sample texts, and the rendered chat template
  <name>.logits.safetensors  float32 logits [32, vocab] per prompt: the logits that chose each
                           continuation token (positions len-1 .. len+30)

Run where torch and transformers are installed (e.g. the GPU machine's python3), on CPU in f32:
  python3 scripts/hf_golden.py tests/fixtures/models/*
The Rust test engine/tests/hf_fixtures.rs compares the engine against these files.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT_LENS = [1, 15, 16, 17, 300]
NEW_TOKENS = 32
TEXTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "  spaces\tand\nnewlines ", "日本語 and émojis 🎉"]
OUT = "tests/fixtures/golden"


def golden(model_dir: str) -> None:
    name = os.path.basename(os.path.normpath(model_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(1234)
    cases, tensors = [], {}
    for i, n in enumerate(PROMPT_LENS):
        prompt = rng.integers(0, vocab, n).tolist()
        ids = list(prompt)
        rows = []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                # Full recompute each step: the reference is as plain as it gets.
                logits = model(torch.tensor([ids])).logits[0, -1].float().numpy()
                rows.append(logits)
                ids.append(int(np.argmax(logits)))
        cases.append({"prompt": prompt, "continuation": ids[n:]})
        tensors[f"case{i}"] = np.stack(rows).astype(np.float32)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    encodings = [{"text": t, "ids": tok.encode(t).ids} for t in TEXTS]
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    rendered = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    meta = {
        "model": name,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "cases": cases,
        "encodings": encodings,
        "chat": {"messages": chat, "rendered": rendered},
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    save_file(tensors, os.path.join(OUT, f"{name}.logits.safetensors"))
    print(f"{name}: {len(cases)} cases, continuation[0..8] of the 300-token prompt: {cases[-1]['continuation'][:8]}")


if __name__ == "__main__":
    for d in sys.argv[1:]:
        golden(d)
