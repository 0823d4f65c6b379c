"""Benchmark of the slot engine (issue 9): continuous batching against static batches.

Workload: N chat requests for the default model (SmolLM2-135M-Instruct), prompts of mixed
lengths, output lengths drawn from an exponential distribution (mean 64 tokens, cap 256)
with end-of-sequence banned (logit_bias -100), so every request produces exactly the
number of tokens the workload says. The same workload, in the same run, through:

* the slot engine (S slots, chunks of K steps, refill once r = 1 slot is free);
* static batches of the same size: the same engine with r = S (a slot is refilled only
  when every slot is free, which is what a one-shot batch does), same compiled programs;
* one request at a time (a one-slot engine) on the first few requests (it is slow).

It reports occupancy (useful tokens / (slots x steps)), tokens/s, requests/s, steps per
device round trip, host time between chunks, the prefill share, compilations after warm-up,
the memory per slot, and the cost of the batch-invariant arithmetic (one model decode step
with and without it at S = 1, 16, 32). Prints a table; writes results/bench_engine_cpu.json.

    .venv/bin/python scripts/bench_engine.py            # full run (about 15 minutes here)
    .venv/bin/python scripts/bench_engine.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import Engine, SamplingParams, pack_rows
from jaxsample.engine import compile_count
from jaxsample.model import load_model

TOPICS = [
    "the water cycle",
    "how a bicycle stays upright",
    "why the sky is blue",
    "the history of the printing press",
    "how vaccines work",
    "what a prime number is",
    "photosynthesis",
    "the rules of chess",
    "how to bake bread",
    "black holes",
    "the French revolution",
    "how airplanes fly",
]
CONTEXT = (
    "Here is some background. The committee met on Tuesday to review the budget, the new "
    "library hours and the plan for the summer festival. Several members asked for more "
    "detail on costs, and the chair promised a written report before the next meeting. "
)


def make_workload(n: int, seed: int, eos_id: int, mean: float, cap: int):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        extra = CONTEXT * int(rng.integers(0, 4))  # 0-3 paragraphs: mixed prompt lengths
        messages = [{"role": "user", "content": f"{extra}Explain {topic} in a few sentences."}]
        length = int(min(cap, max(1, round(rng.exponential(mean)))))
        params = SamplingParams(
            temperature=0.8,
            top_p=0.9,
            seed=i,
            max_tokens=length,
            logit_bias={str(eos_id): -100},
        )
        items.append((i, messages, params))
    return items


def run_mode(engine: Engine, items, label: str) -> dict:
    slot = engine.slot_engine()
    slot.stats = type(slot.stats)()
    before = compile_count()
    start = time.perf_counter()
    outs = {k: c for k, c in engine.stream(items)}
    wall = time.perf_counter() - start
    st = slot.stats
    errors = [k for k, c in outs.items() if c.error is not None]
    assert not errors, errors[:3]
    tokens = sum(c.completion_tokens for c in outs.values())
    expected = sum(p.max_tokens for _, _, p in items)
    assert tokens == expected, (tokens, expected)
    return {
        "mode": label,
        "slots": slot.n_slots,
        "chunk_steps": slot.chunk_steps,
        "refill_free": slot.refill_free,
        "requests": len(items),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(items) / wall,
        "occupancy": st.occupancy,
        "steps": st.steps,
        "chunks": st.chunks,
        "steps_per_round_trip": st.steps / max(st.chunks, 1),
        "host_s": st.host_s,
        "host_ms_per_chunk": 1e3 * st.host_s / max(st.chunks, 1),
        "prefill_s": st.prefill_s,
        "prefill_share": st.prefill_s / wall,
        "chunk_s": st.chunk_s,
        "compiles": compile_count() - before,
        "token_ids": {k: c.token_ids for k, c in outs.items()},
    }


@functools.partial(jax.jit, static_argnums=0)
def _model_step(graphdef, state, tokens, positions, cache):
    from flax import nnx

    return nnx.merge(graphdef, state).decode(tokens, positions, cache)


def combine(parts: list[dict]) -> dict:
    """One mode's rounds summed into one row."""
    out = dict(parts[0])
    for key in (
        "requests",
        "tokens",
        "wall_s",
        "steps",
        "chunks",
        "host_s",
        "prefill_s",
        "chunk_s",
        "compiles",
    ):
        out[key] = sum(p[key] for p in parts)
    slot_steps = sum(p["steps"] * p["slots"] for p in parts)
    out["occupancy"] = out["tokens"] / slot_steps
    out["tokens_per_s"] = out["tokens"] / out["wall_s"]
    out["requests_per_s"] = out["requests"] / out["wall_s"]
    out["steps_per_round_trip"] = out["steps"] / max(out["chunks"], 1)
    out["host_ms_per_chunk"] = 1e3 * out["host_s"] / max(out["chunks"], 1)
    out["prefill_share"] = out["prefill_s"] / out["wall_s"]
    out["token_ids"] = {k: v for p in parts for k, v in p["token_ids"].items()}
    out["rounds"] = len(parts)
    return out


def invariant_cost(path, batches, steps: int) -> list[dict]:
    """Median time of one jitted model decode step with and without batch_invariant."""
    rows = []
    for inv in (False, True):
        model, _ = load_model(path, batch_invariant=inv)
        from flax import nnx

        graphdef, state = nnx.split(model)

        step = functools.partial(_model_step, graphdef)

        for b in batches:
            cache = model.init_cache(b, 256)
            tokens = jnp.full((b,), 100, jnp.int32)
            pos = jnp.full((b,), 64, jnp.int32)
            logits, cache = step(state, tokens, pos, cache)  # compile
            logits.block_until_ready()
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                logits, cache = step(state, tokens, pos, cache)
                logits.block_until_ready()
                times.append(time.perf_counter() - t)
            rows.append({"batch_invariant": inv, "batch": b, "step_ms": 1e3 * np.median(times)})
        del model, state
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--chunk-steps", type=int, default=32)
    ap.add_argument("--mean", type=float, default=64.0)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--one-at-a-time", type=int, default=12, help="requests run alone")
    ap.add_argument("--rounds", type=int, default=4, help="slices of the workload, each mode")
    ap.add_argument("--slot-only", action="store_true", help="only the slot engine (--rounds 1)")
    ap.add_argument("--invariant-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/bench_engine_cpu.json")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.mean, args.cap, args.one_at_a_time = 24, 12.0, 48, 2
        args.invariant_steps = 3

    engine = Engine.load(slots=args.slots, chunk_steps=args.chunk_steps, refill_free=1)
    tok = engine.tokenizer
    items = make_workload(args.requests, 0, tok.eos_id, args.mean, args.cap)
    lengths = [len(engine.encode_input(m)) for _, m, _ in items]
    print(
        f"workload: {len(items)} requests, prompt tokens {min(lengths)}-{max(lengths)}, "
        f"output tokens mean {np.mean([p.max_tokens for *_, p in items]):.1f} "
        f"(max {max(p.max_tokens for *_, p in items)})"
    )

    # warm-up: the chunk loop and the prefill of every prompt bucket the workload uses
    slot = engine.slot_engine()
    rows = pack_rows([items[0][2]], vocab_size=engine.vocab_size, seeds=[0])
    t = time.perf_counter()
    c0 = compile_count()
    slot.warmup(rows, sorted({slot.prompt_bucket(n) for n in lengths}))
    warm = {"warmup_s": time.perf_counter() - t, "warmup_compiles": compile_count() - c0}
    print(f"warm-up: {warm['warmup_s']:.1f} s, {warm['warmup_compiles']} programs")

    # Rounds: the workload in slices, each run in both modes, the order alternating, so that
    # load drift on a shared machine hits both modes alike; figures are sums over rounds.
    n_rounds = max(1, min(args.rounds, len(items) // slot.n_slots))
    slices = [items[i::n_rounds] for i in range(n_rounds)]
    modes = [("slot engine (r=1)", 1), (f"static batches of {slot.n_slots}", slot.n_slots)]
    if args.slot_only:  # one pass of the slot engine alone: occupancy without slice tails
        modes = modes[:1]
    runs: dict = {label: [] for label, _ in modes}
    for i, part in enumerate(slices):
        for label, r in modes if i % 2 == 0 else modes[::-1]:
            slot.refill_free = r  # a value: the same compiled programs
            runs[label].append(run_mode(engine, part, label))
            print(f"round {i + 1}/{n_rounds} {label}: {runs[label][-1]['wall_s']:.1f} s")
    slot.refill_free = 1
    results = [combine(runs[label]) for label, _ in modes]
    if args.slot_only:
        r = results[0]
        del r["token_ids"]
        print(
            f"slot engine alone, {r['rounds']} pass(es): occupancy {r['occupancy']:.3f}, "
            f"{r['tokens_per_s']:.1f} tok/s, {r['steps_per_round_trip']:.1f} steps/round trip, "
            f"compiles {r['compiles']}"
        )
        pathlib.Path(args.out).write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2)
        )
        return
    single = Engine(engine.model, tok, slots=1, chunk_steps=args.chunk_steps)
    sub = items[: args.one_at_a_time]
    single.slot_engine().warmup(rows, sorted({slot.prompt_bucket(n) for n in lengths[: len(sub)]}))
    results.append(run_mode(single, sub, "one request at a time"))

    same = all(results[0]["token_ids"][k] == results[1]["token_ids"][k] for k, *_ in items)
    same_single = all(results[0]["token_ids"][k] == results[2]["token_ids"][k] for k, *_ in sub)
    for r in results:
        del r["token_ids"]

    base = results[1]
    print()
    print(
        "| mode | occupancy | tok/s | req/s | vs static | steps/round trip | host ms/chunk "
        "| prefill share | compiles after warm-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['occupancy']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['requests_per_s']:.2f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['steps_per_round_trip']:.1f} | {r['host_ms_per_chunk']:.2f} | "
            f"{r['prefill_share']:.1%} | {r['compiles']} |"
        )
    print(f"\nsame tokens in every mode: static {same}, one at a time {same_single}")
    mem = slot.memory_per_slot()
    print(
        f"memory per slot (max_seq_len {slot.max_seq_len}): "
        f"{mem['total'] / 2**20:.1f} MiB (KV cache {mem['kv_cache'] / 2**20:.1f} MiB)"
    )

    inv = invariant_cost(None, (1, 16, 32), args.invariant_steps)
    print("\n| batch | step, default | step, batch_invariant | ratio |\n|---|---|---|---|")
    for b in (1, 16, 32):
        d = next(r for r in inv if r["batch"] == b and not r["batch_invariant"])
        i = next(r for r in inv if r["batch"] == b and r["batch_invariant"])
        print(
            f"| {b} | {d['step_ms']:.1f} ms | {i['step_ms']:.1f} ms | "
            f"{i['step_ms'] / d['step_ms']:.2f} |"
        )

    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "args": vars(args),
        "warmup": warm,
        "results": results,
        "same_tokens_static": same,
        "same_tokens_one_at_a_time": same_single,
        "memory_per_slot": mem,
        "invariant_cost": inv,
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
