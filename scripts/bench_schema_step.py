"""The whole decode step of the slot engine with JSON Schema rows, against plain rows.

Issue 13's goal: a decode step with schema rows costs at most 1.3x a plain step (the goal
JSON mode meets). This times the engine's real compiled chunk (``run_chunk``: mask, sampler,
automaton advance, stop strings, the model's decode step) on the default model
(SmolLM2-135M-Instruct, batch-invariant, as ``Engine.load`` builds it), S slots, with:

* ``plain``: every slot a plain chat request;
* ``schema``: every slot a JSON Schema request, the schemas different per slot (the OpenAI
  guide's shapes and our own from scripts/bench_schema.py, formats included);
* ``mixed``: every other slot a schema row;
* ``json_mode``: every slot in JSON mode (the reference the goal names).

Each variant's slots are filled once (prefill + insert, as the engine does), then the same
compiled chunk of K steps is run from that state again and again (the slot state is copied
before each run; the chunk donates it), so every run does the same work. The variants
alternate in rounds (the machine is noisy); a round's ratio is the variant's step time over
the plain step time of the same round. Every slot runs all K steps of every chunk (checked:
end-of-sequence is banned for plain rows, and no schema's shortest answer fits in K tokens).
Prints a table; writes results/bench_schema_step_cpu.json.

Then, as the precise part of the difference (the whole-step ratios are within this shared
machine's noise), the constraint work alone at the same S: ``json_schema.allowed`` +
``advance`` on the schema rows' states and ``json_mode.allowed`` + ``advance`` on the JSON
rows', jitted and vmapped as in the engine, as a share of the plain step.

    PYTHONPATH=. .venv/bin/python scripts/bench_schema_step.py            # about 4 minutes
    PYTHONPATH=. .venv/bin/python scripts/bench_schema_step.py --rounds 3 # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_schema import openai_examples, own_schemas  # noqa: E402

from jaxsample import Engine, SamplingParams  # noqa: E402
from jaxsample.automata import json_mode, json_schema  # noqa: E402
from jaxsample.engine import scheduler as sch  # noqa: E402

PROMPT = (
    "Extract the data as JSON. Ada Lovelace, born 10 December 1815 in London, wrote the "
    "first published program for Charles Babbage's Analytical Engine; contact her at "
    "ada@example.org or on analytical-engine.example.co.uk. Give every field, with a long "
    "explanation in each text field."
)


def schema_rows() -> list[dict]:
    """Realistic schemas that compile (a few OpenAI-guide shapes, our own with formats),
    each with a shortest answer of more than 12 tokens (so no row ends inside a chunk)."""
    pick = [
        "openai/research_paper",
        "openai/user_profile",
        "openai/moderation",
        "openai/ui_recursive",
        "openai/linked_list",
        "own/invoice",
        "own/net",
        "own/address",
    ]
    every = {**openai_examples(), **own_schemas()}
    return [every[k] for k in pick]


def make_request(engine: Engine, i: int, kind: str, schemas, max_tokens: int):
    eos = engine.tokenizer.eos_id
    if kind == "schema":
        rf = {
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schemas[i % len(schemas)], "strict": True},
        }
        p = SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, response_format=rf)
    elif kind == "json":
        p = SamplingParams(
            temperature=0.8, seed=i, max_tokens=max_tokens, response_format={"type": "json_object"}
        )
    else:  # plain: end-of-sequence banned so that the row runs every step
        p = SamplingParams(
            temperature=0.8, seed=i, max_tokens=max_tokens, logit_bias={str(eos): -100}
        )
    return engine._request(i, [{"role": "user", "content": PROMPT}], p, 0)


def fill(engine: Engine, kinds: list[str], schemas, max_tokens: int):
    """The slot state with slot i holding a request of ``kinds[i]`` (prefilled, inserted)."""
    slot = engine.slot_engine()
    slot._slots = None
    for i, kind in enumerate(kinds):
        req = make_request(engine, i, kind, schemas, max_tokens)
        slot._place(i, req, slot._add_schema(req))
    slot._refresh_shared()
    state = slot._slots
    jax.block_until_ready(state)
    slot._slots = None
    return state


def run_chunk(slot, state, steps):
    """Seconds of one chunk of ``steps`` steps from a copy of ``state``; (seconds, out)."""
    fresh = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(fresh)
    t = time.perf_counter()
    _, out = sch._chunk(
        slot._graphdef,
        slot._model_state,
        slot._shared,
        fresh,
        jnp.int32(slot.n_slots + 1),
        chunk_steps=steps,
        transforms=slot.transforms,
        mesh=slot.mesh,
    )
    out = jax.device_get(out)
    return time.perf_counter() - t, out


def automaton_ms(slot, states, reps=30, alternations=3) -> dict:
    """Median ms of the constraint work alone per step at the same S, jitted and vmapped as
    in the engine (mask over the vocabulary, then advance by the mask's first token): the
    schema rows' ``json_schema.allowed`` + ``advance`` and the JSON-mode rows'
    ``json_mode.allowed`` + ``advance``. The precise part of the whole-step difference."""

    def fn(module):
        @jax.jit
        def f(tables, st, remaining):
            m = jax.vmap(module.allowed, in_axes=(None, 0, 0))(tables, st, remaining)
            t = jnp.argmax(m, -1).astype(jnp.int32)
            return jax.vmap(module.advance, in_axes=(None, 0, 0))(tables, st, t), m

        return f

    sh = slot._shared
    cases = {
        "schema": (fn(json_schema), sh.schemas, states["schema"].schema_state, states["schema"]),
        "json_mode": (
            fn(json_mode),
            sh.grammar,
            states["json_mode"].json_state,
            states["json_mode"],
        ),
    }
    best = {k: float("inf") for k in cases}
    for _ in range(alternations):
        for k, (f, tables, st, slots) in cases.items():
            remaining = slots.budget - slots.n_out
            jax.block_until_ready(f(tables, st, remaining))
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(tables, st, remaining))
                ts.append(time.perf_counter() - t)
            best[k] = min(best[k], 1e3 * statistics.median(ts))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="K: decode steps per timed chunk")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default="results/bench_schema_step_cpu.json")
    args = ap.parse_args()
    S, K = args.slots, args.steps

    t0 = time.perf_counter()
    engine = Engine.load(slots=S, chunk_steps=K, max_seq_len=512)
    slot = engine.slot_engine()
    schemas = schema_rows()
    variants = {
        "plain": ["plain"] * S,
        "json_mode": ["json"] * S,
        "schema": ["schema"] * S,
        "mixed": ["schema" if i % 2 else "plain" for i in range(S)],
    }
    states = {v: fill(engine, kinds, schemas, args.max_tokens) for v, kinds in variants.items()}
    setup_s = time.perf_counter() - t0
    # warm-up: compile the chunk and check that every slot runs all K steps
    for v, st in states.items():
        _, out = run_chunk(slot, st, K)
        ran = int(out.steps)
        produced = np.asarray(out.tokens) >= 0
        assert ran == K and produced.all(), (v, ran, produced.sum(1))
    times = {v: [] for v in variants}
    order = list(variants)
    for r in range(args.rounds):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for v in rot:
            secs, out = run_chunk(slot, states[v], K)
            assert int(out.steps) == K
            times[v].append(secs / K)
        line = "  ".join(f"{v} {1e3 * times[v][-1]:6.1f} ms" for v in order)
        print(f"round {r}: {line}", flush=True)
    ratios = {v: [a / b for a, b in zip(times[v], times["plain"])] for v in variants}
    auto = automaton_ms(slot, states)
    plain_ms = 1e3 * statistics.median(times["plain"])
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "model": "SmolLM2-135M-Instruct (batch-invariant)",
        "slots": S,
        "steps_per_chunk": K,
        "rounds": args.rounds,
        "setup_s": setup_s,
        "schemas": len(schemas),
        "automaton_ms_per_step": auto,
        "automaton_share_of_plain_step": {k: v / plain_ms for k, v in auto.items()},
        "variants": {
            v: {
                "kinds": variants[v],
                "step_ms_median": 1e3 * statistics.median(times[v]),
                "step_ms_min": 1e3 * min(times[v]),
                "step_ms": [1e3 * x for x in times[v]],
                "ratio_median": statistics.median(ratios[v]),
                "ratio_of_min": min(times[v]) / min(times["plain"]),
                "ratios": ratios[v],
            }
            for v in variants
        },
        "command": "PYTHONPATH=. .venv/bin/python scripts/bench_schema_step.py "
        + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(f"S = {S} slots, K = {K} steps per chunk, {args.rounds} rounds")
    print(f"{'rows':10s} {'step median':>12s} {'step min':>9s} {'ratio (median)':>15s} goal")
    for v in order:
        d = result["variants"][v]
        goal = "" if v == "plain" else "<= 1.3"
        print(
            f"{v:10s} {d['step_ms_median']:9.1f} ms {d['step_ms_min']:6.1f} ms "
            f"{d['ratio_median']:15.3f} {goal}"
        )
    for k, v in auto.items():
        print(
            f"{k} automaton alone (allowed + advance, S = {S}): {v:.2f} ms per step, "
            f"{100 * v / plain_ms:.1f}% of the plain step"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
