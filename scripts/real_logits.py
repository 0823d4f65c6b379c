"""Real SmolLM2 logits for the sampler: a cached dump, and the candidate fallback rate on it.

The dump: 16 chat prompts, run through the real SmolLM2-135M-Instruct model (the installed
GGUF file), each continued for 24 steps (sampled at temperature 0.8, top_p 0.95), and the
model's next-token logits at every step saved: 384 rows of ``f32[49152]`` in
``results/cache/smollm2_logits.npy`` (about 75 MB, gitignored; regenerated when missing,
about a minute on 2 cores). :func:`load_real_logits` is what the benchmarks import.

The fallback rate: for temperatures 0.7 / 0.85 / 1.0 and top_p 0.9 / 0.95 / 0.99 (no other
filter), the fraction of rows whose kept set the sampler cannot resolve on its first 128
candidates ("before": what the single-tier sampler sent to the full-vocabulary bisection),
and the fraction it still sends to the bisection after the second candidate tier ("after",
the sampler's own ``Distribution.in_candidates`` and tier flags), with the median and 90th
percentile of the kept-set size.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/real_logits.py     # writes results/fallback_rate.json
    PYTHONPATH=. .venv/bin/python scripts/real_logits.py --export-half \\
        results/cache/smollm2_logits_f16.npy                  # for bench_sampler_gpu.py --real
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CACHE = Path("results/cache/smollm2_logits.npy")

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright.",
    "What are three tips for learning a new language?",
    "Tell me a story about a robot who wants to paint.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?",
    "Give me a list of healthy breakfast ideas.",
    "Why is the sky blue?",
    "Describe your ideal weekend.",
    "What is the difference between weather and climate?",
    "Write a friendly email inviting a colleague to lunch.",
    "Explain recursion to a ten-year-old.",
    "What should I pack for a hiking trip?",
    "Invent a new holiday and describe how people celebrate it.",
    "What are the benefits of reading books?",
    "Write a haiku about autumn leaves.",
]
STEPS = 24


def dump_real_logits(path: Path = CACHE, steps: int = STEPS) -> np.ndarray:
    """Runs the real model on the chat prompts and saves ``[len(PROMPTS) * steps, V]`` logits."""
    from jaxsample.model import load_model
    from jaxsample.params import SamplingParams, pack_rows
    from jaxsample.sampler import History, sample_batch

    model, tok = load_model()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    ids = tok.encode_batch(texts)
    batch, vocab = len(ids), model.config.vocab_size
    lengths = np.array([len(x) for x in ids], np.int32)
    tokens = np.zeros((batch, int(lengths.max())), np.int32)
    for b, x in enumerate(ids):
        tokens[b, : len(x)] = x
    cache = model.init_cache(batch, int(lengths.max()) + steps + 1)
    logits, cache = jax.jit(model.prefill)(jnp.asarray(tokens), jnp.asarray(lengths), cache)
    rows = pack_rows(
        [SamplingParams(temperature=0.8, top_p=0.95)] * batch,
        vocab_size=vocab,
        seeds=list(range(batch)),
    )
    rows = jax.tree.map(jnp.asarray, rows)
    hist = History(
        counts=jnp.zeros((batch, vocab), jnp.int32), in_prompt=jnp.zeros((batch, vocab), bool)
    )
    step_fn = jax.jit(model.decode)
    out = []
    for i in range(steps):
        logits = logits.astype(jnp.float32)
        out.append(np.asarray(logits))
        token = sample_batch(logits, rows, hist, None, jnp.int32(i)).token
        logits, cache = step_fn(token, jnp.asarray(lengths) + i, cache)
    data = np.concatenate(out, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, data)
    return data


def load_real_logits(path: Path = CACHE) -> np.ndarray:
    """The cached real-model logits ``f32[N, V]``, dumped first if the cache is missing."""
    if not Path(path).exists():
        print(f"{path} missing: running the real model to dump its logits ...", flush=True)
        return dump_real_logits(Path(path))
    return np.load(path)


def fallback_rates(logits: np.ndarray) -> list[dict]:
    from jaxsample import sampler as sm
    from jaxsample.params import SamplingParams, pack_rows

    n, vocab = logits.shape
    hist = sm.History(
        counts=jnp.zeros((n, vocab), jnp.int32), in_prompt=jnp.zeros((n, vocab), bool)
    )
    stats = jax.jit(sm.tier_stats, static_argnames=("num_candidates",))
    results = []
    for t in (0.7, 0.85, 1.0):
        for p in (0.9, 0.95, 0.99):
            rows = pack_rows(
                [SamplingParams(temperature=t, top_p=p)] * n, vocab_size=vocab, seeds=[0] * n
            )
            rows = jax.tree.map(jnp.asarray, rows)
            tier1, tier2, kept = (np.asarray(x) for x in stats(jnp.asarray(logits), rows, hist))
            results.append(
                dict(
                    temperature=t,
                    top_p=p,
                    before=float(np.mean(~tier1)),
                    after=float(np.mean(~(tier1 | tier2))),
                    kept_median=float(np.median(kept)),
                    kept_p90=float(np.percentile(kept, 90)),
                )
            )
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/fallback_rate.json")
    ap.add_argument(
        "--export-half",
        default=None,
        metavar="PATH",
        help="only write the dump as float16 to PATH (about 38 MB: small enough to travel "
        "to a lent GPU machine, where bench_sampler_gpu.py --real reads it)",
    )
    args = ap.parse_args()
    logits = load_real_logits()
    if args.export_half:
        Path(args.export_half).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.export_half, logits.astype(np.float16))
        print(f"wrote {args.export_half} ({logits.shape[0]} rows, float16)")
        return
    res = fallback_rates(logits)
    print(f"{logits.shape[0]} rows of real SmolLM2 logits (V = {logits.shape[1]})")
    print("temperature top_p  before (1 tier of 128)  after (2nd tier)  kept median  kept p90")
    for r in res:
        print(
            f"{r['temperature']:>11} {r['top_p']:>5} {r['before']:>22.3f} "
            f"{r['after']:>17.3f} {r['kept_median']:>12.0f} {r['kept_p90']:>9.0f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(dict(rows=int(logits.shape[0]), results=res), indent=1) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
