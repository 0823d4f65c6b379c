"""The Hugging Face transformers side of scripts/bench_decode.py (run in its own venv).

Loads the same GGUF file with transformers (dequantized to float32), generates 64 new tokens
per row with the same sampling settings, and prints one JSON object on stdout.
Not a dependency of jaxsample: run through bench_decode.py, which makes the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(args.gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": "Write a short story about a robot learning to paint."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = {"torch": torch.__version__, "threads": args.threads, "batches": {}}
    import transformers

    out["transformers"] = transformers.__version__
    for b in [int(x) for x in args.batches.split(",")]:
        enc = tok([text] * b, return_tensors="pt")
        times = []
        for r in range(args.repeats + 1):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.9,
                    top_k=50,
                    repetition_penalty=1.1,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    pad_token_id=tok.eos_token_id,
                )
            dt = time.perf_counter() - t0
            assert gen.shape[1] - enc["input_ids"].shape[1] == args.new_tokens
            if r > 0:  # the first run warms up
                times.append(dt)
        med = statistics.median(times)
        out["batches"][str(b)] = {
            "seconds": med,
            "tokens_per_s": b * args.new_tokens / med,
            "prompt_tokens": int(enc["input_ids"].shape[1]),
        }
        print(
            f"# hf batch {b}: {b * args.new_tokens / med:.1f} tok/s", flush=True, file=os.sys.stderr
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
