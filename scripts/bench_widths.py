"""What a few requests cost in the slot engine: narrow chunks against full-width ones.

A decode step on a CPU costs about in proportion to the rows it runs (SmolLM2 at 16 rows:
about 47 ms, at 1 row about 17 ms), and the slot engine used to run every slot whatever ran
in them: one prompt through ``Engine.generate`` (a notebook's usual call) paid for 16 rows.
Narrow chunks (``Engine(widths=...)``; by default ``(1, 4, 16)`` on a CPU) run the model and
the sampler on the first W slots only, W the smallest width that holds every running slot.

For the default model (SmolLM2-135M-Instruct, float32, batch-invariant), the same calls go
through two engines on the same weights, in the same run, in an order that alternates each
round: ``widths=()`` (every chunk at the full 16 rows: the baseline, as before) and the
default widths. Each call is ``Engine.generate`` of ``n`` chat prompts (n = 1, 2, 4, 16) with
``--tokens`` tokens each (end-of-sequence banned, so every call decodes the same number of
steps). Both engines are warmed up first (every width compiled), and the two engines'
completions are compared token for token and log probability for log probability (they must
be identical: each row's arithmetic is its own). The table gives the median wall time per
call, decode ms per step (the engine's chunk time over its steps) and the speed-up. Writes
``results/bench_widths_cpu.json``::

    PYTHONPATH=. .venv/bin/python scripts/bench_widths.py
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_common import ROOT, run_facts, write_json

from jaxsample import Engine, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "How do bicycles stay upright?",
    "What is a prime number?",
    "Tell me a fact about owls.",
    "How is bread made?",
]


def timed(engine: Engine, prompts, params) -> tuple[float, float, int, list]:
    slot = engine.slot_engine()
    before = (slot.stats.chunk_s, slot.stats.steps)
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    wall = time.perf_counter() - t
    chunk_s, steps = slot.stats.chunk_s - before[0], slot.stats.steps - before[1]
    return wall, chunk_s, steps, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 16])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_widths_cpu.json"))
    args = ap.parse_args()

    narrow = Engine.load()
    full = Engine(narrow.model, narrow.tokenizer, widths=())
    engines = {"full": full, "narrow": narrow}
    eos = narrow.model.config.eos_id
    widths = {k: e.engine_options["widths"] for k, e in engines.items()}
    print(f"widths: {widths}; {args.tokens} tokens per prompt; {args.rounds} rounds")

    def workload(n):
        prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
        params = [
            SamplingParams(
                temperature=0.7,
                top_p=0.9,
                seed=i,
                max_tokens=args.tokens,
                logit_bias={str(eos): -100},
                logprobs=True,
                top_logprobs=2,
            )
            for i in range(n)
        ]
        return prompts, params

    for e in engines.values():  # each call once: its widths and prefill buckets compiled
        for n in args.counts:
            e.generate(*workload(n))
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    identical = True
    for r in range(args.rounds):
        for n in args.counts:
            order = list(engines) if (r + n) % 2 == 0 else list(engines)[::-1]
            outs = {}
            for name in order:
                wall, chunk_s, steps, out = timed(engines[name], *workload(n))
                times.setdefault((name, n), []).append((wall, chunk_s / max(steps, 1)))
                outs[name] = [(c.token_ids, c.logprobs) for c in out]
            identical &= outs["full"] == outs["narrow"]
    rows = []
    print(
        f"{'prompts':>7} {'full s':>8} {'narrow s':>9} {'full ms/step':>13} "
        f"{'narrow ms/step':>15} {'speed-up':>9}"
    )
    for n in args.counts:
        med = {
            name: (
                statistics.median(w for w, _ in times[(name, n)]),
                statistics.median(s for _, s in times[(name, n)]),
            )
            for name in engines
        }
        speedup = med["full"][0] / med["narrow"][0]
        rows.append(
            {
                "prompts": n,
                "full_s": round(med["full"][0], 3),
                "narrow_s": round(med["narrow"][0], 3),
                "full_ms_per_step": round(med["full"][1] * 1e3, 2),
                "narrow_ms_per_step": round(med["narrow"][1] * 1e3, 2),
                "speedup": round(speedup, 2),
                "rounds": {k: [round(w, 3) for w, _ in times[(k, n)]] for k in engines},
            }
        )
        print(
            f"{n:>7} {med['full'][0]:>8.2f} {med['narrow'][0]:>9.2f} "
            f"{med['full'][1] * 1e3:>13.1f} {med['narrow'][1] * 1e3:>15.1f} {speedup:>8.2f}x"
        )
    print("identical completions (tokens and log probabilities):", identical)
    result = {
        "benchmark": "Engine.generate of a few prompts: narrow chunks vs every slot",
        "model": "SmolLM2-135M-Instruct (float32, batch-invariant), 16 slots",
        "widths": widths,
        "tokens_per_prompt": args.tokens,
        "rounds": args.rounds,
        "identical": identical,
        **run_facts(),
        "rows": rows,
    }
    write_json(args.out, result)
    if not identical:
        raise SystemExit("the two engines' completions differ")


if __name__ == "__main__":
    main()
