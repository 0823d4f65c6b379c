"""Benchmark: taking requests in on a background thread (``SlotEngine.prefetch``).

Taking a request in is host work: the chat template, tokenising, checking and packing its
parameters, and for a ``json_schema`` request compiling the schema against the vocabulary
(the cost this script first measures, per request). Without prefetching it runs on the
engine's thread between two device calls, with the device idle; with it, a thread does it
while the device decodes.

The workload: N chat requests for the default model, each with a JSON Schema of its own (a
new schema per request and per round, so the compiled-schema cache never answers), and the
same requests without a schema; each through an engine with ``prefetch = 0`` and with the
default (``slots``), alternating, in ``--rounds`` rounds. Reports the wall time per mode
and the ratio (no prefetch / prefetch) per round; writes results/bench_prefetch_cpu.json.

    PYTHONPATH=. .venv/bin/python scripts/bench_prefetch.py            # about 5 minutes here
    PYTHONPATH=. .venv/bin/python scripts/bench_prefetch.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax

from jaxsample import Engine


def schema_body(i: int, tag: str, max_tokens: int, with_schema: bool) -> dict:
    body = {
        "messages": [{"role": "user", "content": f"Describe person number {i} as JSON."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": i,
    }
    if with_schema:
        schema = {
            "type": "object",
            "properties": {
                f"name_{tag}_{i}": {"type": "string"},
                "age": {"type": "integer"},
                f"city_{tag}_{i}": {"type": "string"},
            },
            "required": [f"name_{tag}_{i}", "age"],
            "additionalProperties": False,
        }
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "strict": True, "schema": schema},
        }
    return body


def take_in_ms(engine: Engine, bodies: list[dict]) -> float:
    """Host time to take one request in (what the prefetching thread does), per request."""
    t = time.perf_counter()
    for i, body in enumerate(bodies):
        text, p, _ = engine._chat_request(body, i, 0)
        engine._request(i, text, p, 0)
    return (time.perf_counter() - t) / len(bodies) * 1e3


def run(engine: Engine, bodies: list[dict]) -> float:
    t = time.perf_counter()
    out = list(engine.stream_chat(enumerate(bodies)))
    wall = time.perf_counter() - t
    bad = [r for _, r in out if "error" in r]
    if len(out) != len(bodies) or bad:
        raise SystemExit(f"{len(bad)} requests failed: {bad[:1]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/bench_prefetch_cpu.json")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.slots, args.rounds, args.max_tokens = 8, 4, 1, 20

    engines = {}
    for prefetch in (0, None):
        engine = Engine.load(slots=args.slots, chunk_steps=8)
        engine.slot_engine().prefetch = 0 if prefetch == 0 else args.slots
        engines["none" if prefetch == 0 else "prefetch"] = engine
    # warm-up: compile every program both engines use (the same programs)
    for name, engine in engines.items():
        run(engine, [schema_body(i, f"w{name}", args.max_tokens, i % 2 == 0) for i in range(4)])

    cost = {
        "chat request": take_in_ms(
            engines["none"], [schema_body(i, "c", 8, False) for i in range(50)]
        ),
        "chat request with a new JSON Schema": take_in_ms(
            engines["none"], [schema_body(i, "c", 64, True) for i in range(20)]
        ),
    }
    print("host time to take one request in (ms):")
    for k, v in cost.items():
        print(f"  {k:40s} {v:8.1f}")

    rows = []
    for kind in ("schema", "plain"):
        for r in range(args.rounds):
            order = ("none", "prefetch") if r % 2 == 0 else ("prefetch", "none")
            walls = {}
            for name in order:
                bodies = [
                    schema_body(i, f"{kind}{r}{name}", args.max_tokens, kind == "schema")
                    for i in range(args.requests)
                ]
                walls[name] = run(engines[name], bodies)
            rows.append(
                {
                    "workload": kind,
                    "round": r,
                    "none_s": walls["none"],
                    "prefetch_s": walls["prefetch"],
                    "ratio": walls["none"] / walls["prefetch"],
                }
            )
            print(
                f"{kind:7s} round {r}: no prefetch {walls['none']:6.2f} s, "
                f"prefetch {walls['prefetch']:6.2f} s, ratio {rows[-1]['ratio']:.2f}"
            )

    summary = {}
    print(f"\n| workload | no prefetch (s, median) | prefetch {args.slots} (s) | speed-up |")
    print("|---|---|---|---|")
    for kind in ("schema", "plain"):
        mine = [x for x in rows if x["workload"] == kind]
        med = {k: statistics.median(x[k] for x in mine) for k in ("none_s", "prefetch_s", "ratio")}
        summary[kind] = med
        print(f"| {kind} | {med['none_s']:.2f} | {med['prefetch_s']:.2f} | {med['ratio']:.2f}x |")
    if args.quick:
        return
    out = {
        "meta": {
            "requests": args.requests,
            "slots": args.slots,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "jax": jax.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "take_in_ms": cost,
        "rounds": rows,
        "summary": summary,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
