#!/usr/bin/env python3
"""Hugging Face transformers as the CUDA backend's reference and baseline.

Runs on the GPU machines' PyTorch (torch 2.11, transformers 5; no network):

  hf_reference.py reference --dir DIR [--layers 2]
      Writes a random-weight Llama-3-8B-width model (bf16 safetensors, DIR) that
      `tandem-gpu-bench hf --dir DIR` loads, plus HF's last-token logits
      (DIR/hf_logits.f32) and greedy continuations (DIR/hf_ref.json) for a few
      prompts, computed with SDPA in bf16.

  hf_reference.py baseline [--layers 32]
      Times the same shape (random weights) through transformers: prefill of an
      8k-token prompt and decode steps at batch 1 and 64 with a 1k context.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_8b_config(layers):
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(ROPE_SCALING),
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        attn_implementation="sdpa",
    )


def build(layers, seed):
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama3_8b_config(layers))
    torch.set_default_dtype(torch.float32)
    # HF initialises norms to exactly 1; perturb them so the norm weights are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
    return model.eval()


@torch.no_grad()
def reference(args):
    model = build(args.layers, 0)
    os.makedirs(args.dir, exist_ok=True)
    model.save_pretrained(args.dir, safe_serialization=True)
    # Keep the classic keys too, for readers that predate transformers 5's rope_parameters.
    path = os.path.join(args.dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("rope_theta", 500000.0)
    cfg.setdefault("rope_scaling", dict(ROPE_SCALING))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128256, (n,), generator=g).tolist() for n in (7, 100, 513, 1000)]
    logits, greedy = [], []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        out = model(input_ids=ids, use_cache=True)
        last = out.logits[0, -1].float()
        logits.append(last.cpu())
        past = out.past_key_values
        nxt = int(last.argmax())
        cont = []
        for _ in range(args.steps):
            cont.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]], device="cuda"), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].float().argmax())
        greedy.append(cont)
    torch.stack(logits).numpy().astype("<f4").tofile(os.path.join(args.dir, "hf_logits.f32"))
    # The same weights in fp32: the yardstick both bf16 implementations are measured against.
    model = model.float()
    exact = [model(input_ids=torch.tensor([p], device="cuda")).logits[0, -1].float().cpu() for p in prompts]
    torch.stack(exact).numpy().astype("<f4").tofile(os.path.join(args.dir, "hf_logits_fp32.f32"))
    with open(os.path.join(args.dir, "hf_ref.json"), "w") as f:
        json.dump({"prompts": prompts, "greedy": greedy}, f)
    print(f"wrote {args.dir}: {args.layers} layers, {len(prompts)} prompts, {args.steps} greedy steps each")


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def baseline(args):
    model = build(args.layers, 0)
    name = torch.cuda.get_device_name()
    print(f"## baseline: transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"SDPA bf16, random Llama-3-8B shape ({args.layers} layers) on {name}\n")
    print("| what | ms: median (range) | tokens/s |")
    print("|---|---|---|")
    g = torch.Generator().manual_seed(2)
    for n in args.prefill:
        prompt = torch.randint(0, 128256, (1, n), generator=g).cuda()
        ts = timed(lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1), 1, args.runs)
        t = statistics.median(ts)
        print(f"| prefill {n} tokens | {t * 1e3:.1f} ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}) | {n / t:.0f} |", flush=True)
        del prompt
        torch.cuda.empty_cache()
    for batch in args.decode:
        ctx = torch.randint(0, 128256, (batch, 1024), generator=g).cuda()
        out = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for step in range(13):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if step >= 3:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"| decode step, batch {batch}, 1k context | {t * 1e3:.2f} | {batch / t:.0f} |", flush=True)
        del past, out
        torch.cuda.empty_cache()
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--dir", required=True)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--steps", type=int, default=8)
    b = sub.add_parser("baseline")
    b.add_argument("--layers", type=int, default=32)
    ints = lambda v: [int(x) for x in v.split(",") if x]
    b.add_argument("--prefill", type=ints, default=[8192], help="prompt lengths, comma-separated")
    b.add_argument("--runs", type=int, default=3, help="timed prefill runs (median)")
    b.add_argument("--decode", type=ints, default=[1, 64], help="decode batch sizes ('' for none)")
    args = ap.parse_args()
    reference(args) if args.cmd == "reference" else baseline(args)


if __name__ == "__main__":
    main()
