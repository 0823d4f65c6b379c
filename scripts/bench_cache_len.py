"""Does a decode step cost more with a longer KV cache when the requests are short?

It should not: attention visits only the key blocks up to each row's position (docs/model.md),
so a step at position 40 should cost the same whether each slot holds 256 or 2048 positions
(``max_seq_len``, 2048 by default). Session 17 found that it did cost more on the CPU (the
row-by-row attention copied every row's whole cache out at every layer) and fixed it.

For the default model (SmolLM2-135M-Instruct, float32, the engine's batch-invariant
arithmetic), ``S`` rows decode ``--steps`` steps in one jitted loop (the cache donated, as in
the slot engine) at positions from ``--position`` on, for every cache length; the lengths
are timed in turn, in an order that rotates each round, and the table gives the median ms per
step and its ratio to the shortest cache (the baseline, in the same run). Writes
``results/bench_cache_len_cpu.json``::

    PYTHONPATH=. .venv/bin/python scripts/bench_cache_len.py

``--attention batched`` times the one-``vmap`` form the GPU and TPU use instead of the CPU's
row-by-row form.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from bench_common import ROOT, run_facts, write_json
from flax import nnx

from jaxsample.model import load_model


def step_loop(graphdef, steps: int):
    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(state, tokens, cache, positions):
        model = nnx.merge(graphdef, state)

        def body(i, cache):
            _, cache = model.decode(tokens, positions + i, cache)
            return cache

        return jax.lax.fori_loop(0, steps, body, cache)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--position", type=int, default=40)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--attention", choices=["rows", "batched"], default="rows")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_cache_len_cpu.json"))
    args = ap.parse_args()

    model, _ = load_model(None)
    cfg = dataclasses.replace(model.config, batched_attention=args.attention == "batched")
    model.config = cfg
    graphdef, state = nnx.split(model)
    run = step_loop(graphdef, args.steps)
    times: dict[tuple[int, int], list[float]] = {}
    caches = {}
    for s in args.slots:
        tokens = jnp.full((s,), 42, jnp.int32)
        positions = jnp.full((s,), args.position, jnp.int32)
        for n in args.lengths:
            cache = run(state, tokens, model.init_cache(s, n), positions)  # compiles
            caches[(s, n)] = jax.block_until_ready(cache)
    for r in range(args.rounds):
        for s in args.slots:
            tokens = jnp.full((s,), 42, jnp.int32)
            positions = jnp.full((s,), args.position, jnp.int32)
            order = args.lengths[r % len(args.lengths) :] + args.lengths[: r % len(args.lengths)]
            for n in order:
                start = time.perf_counter()
                caches[(s, n)] = jax.block_until_ready(
                    run(state, tokens, caches[(s, n)], positions)
                )
                took = (time.perf_counter() - start) / args.steps
                times.setdefault((s, n), []).append(took)
    rows = []
    print(f"attention: {args.attention}; position {args.position}; {args.rounds} rounds")
    print(f"{'slots':>5} {'cache length':>12} {'ms/step':>9} {'vs ' + str(args.lengths[0]):>8}")
    for s in args.slots:
        base = statistics.median(times[(s, args.lengths[0])])
        for n in args.lengths:
            med = statistics.median(times[(s, n)])
            rows.append(
                {
                    "slots": s,
                    "cache_length": n,
                    "ms_per_step": round(med * 1e3, 2),
                    "ratio": round(med / base, 3),
                    "rounds_ms": [round(t * 1e3, 2) for t in times[(s, n)]],
                }
            )
            print(f"{s:>5} {n:>12} {med * 1e3:>9.1f} {med / base:>8.2f}")
    result = {
        "benchmark": "decode step vs KV cache length, short requests",
        "model": "SmolLM2-135M-Instruct (float32, batch-invariant)",
        "attention": args.attention,
        "position": args.position,
        "steps_per_call": args.steps,
        "rounds": args.rounds,
        **run_facts(),
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
