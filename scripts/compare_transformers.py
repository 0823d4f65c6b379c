"""jaxsample's model against Hugging Face transformers on the same GGUF file.

    .venv/bin/python scripts/compare_transformers.py   # -> results/compare_transformers.json

For a few chat prompts, the next-token log probabilities after the prompt from jaxsample's
Llama (float32) and from transformers' LlamaForCausalLM loading the same file (dequantized to
float32, in the benchmark's own venv `.venv-bench`, made by scripts/bench_decode.py): the
largest absolute difference over the whole vocabulary, and both top-5 lists. An independent
implementation of the architecture, the RoPE layout, the tokenizer and the chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me a JSON object describing a cat.",
]

HF_SIDE = r"""
import json, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts = sys.argv[1], json.loads(sys.argv[2])
folder, name = os.path.split(path)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
out = []
for p in prompts:
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    out.append({"ids": ids[0].tolist(), "logprobs": lp.tolist()})
print(json.dumps(out))
"""


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        default=os.path.join(ROOT, "results", "compare_transformers.json"),
        help="JSON path",
    )
    args = ap.parse_args()
    import jax.numpy as jnp
    from bench_decode import ensure_hf_venv

    from jaxsample.api import Engine
    from jaxsample.model import default_model_path

    engine = Engine.load()
    model = engine.model
    ours = []
    for p in PROMPTS:
        ids = engine.encode_input([{"role": "user", "content": p}])
        cache = model.init_cache(1, len(ids))
        logits, _ = model.prefill(
            jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32), cache
        )
        ours.append({"ids": ids, "logprobs": np.asarray(jax.nn.log_softmax(logits[0]))})
    py = ensure_hf_venv()
    res = subprocess.run(
        [py, "-c", HF_SIDE, default_model_path(), json.dumps(PROMPTS)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    rows = []
    for p, a, b in zip(PROMPTS, ours, theirs, strict=True):
        la, lb = a["logprobs"].astype(np.float64), np.asarray(b["logprobs"])
        top_a, top_b = np.argsort(-la)[:5], np.argsort(-lb)[:5]

        def show(top, lp):
            return [(engine.tokenizer.decode([int(t)]), round(float(lp[t]), 3)) for t in top]

        rows.append(
            {
                "prompt": p,
                "same_prompt_ids": a["ids"] == b["ids"],
                "max_abs_logprob_diff": float(np.max(np.abs(la - lb))),
                "max_abs_diff_top100": float(np.max(np.abs(la - lb)[np.argsort(-lb)[:100]])),
                "top5_jaxsample": show(top_a, la),
                "top5_transformers": show(top_b, lb),
            }
        )
        r = rows[-1]
        print(
            f"{p!r}: same ids {r['same_prompt_ids']}, "
            f"max |dlogprob| {r['max_abs_logprob_diff']:.2e}"
            f" (top 100: {r['max_abs_diff_top100']:.2e})\n  jaxsample    {r['top5_jaxsample']}"
            f"\n  transformers {r['top5_transformers']}"
        )
    out = args.out
    with open(out, "w") as f:
        json.dump({"jax": jax.__version__, "prompts": rows}, f, indent=1, ensure_ascii=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
