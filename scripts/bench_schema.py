"""Benchmark JSON Schema compilation (and the per-step mask cost) on a corpus of real schemas.

Corpus: the SchemaStore schemas vendored in the PyPI package check-jsonschema (each whole
schema, and each of its definitions as a root), schemas in the shapes of OpenAI's
Structured Outputs guide examples (written here), and our own. For each: compiled or
refused (and by which keyword), compile time (uncached), automaton states, table memory
in a pool; the same corpus through llguidance (matcher construction time, errors). Then
the device cost of ``allowed`` + ``advance`` per decode step at batch 8 and 32, against
JSON mode's in the same run. Writes results/bench_schema_cpu.json.

    PYTHONPATH=. python scripts/bench_schema.py [--limit N] [--no-llguidance] [--no-step]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import time

import numpy as np

from jaxsample.automata import json_schema as js

OBJ = {"type": "object", "additionalProperties": False}


def _o(props, required=None):
    return {**OBJ, "properties": props, "required": list(props) if required is None else required}


def openai_examples() -> dict:
    """Schemas in the shapes of the OpenAI Structured Outputs guide's examples."""
    s, n, i, b = {"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "boolean"}
    return {
        "openai/math_reasoning": _o(
            {
                "steps": {"type": "array", "items": _o({"explanation": s, "output": s})},
                "final_answer": s,
            }
        ),
        "openai/research_paper": _o(
            {
                "title": s,
                "authors": {"type": "array", "items": s},
                "abstract": s,
                "keywords": {"type": "array", "items": s},
            }
        ),
        "openai/ui_recursive": {
            **_o(
                {
                    "type": {
                        "type": "string",
                        "enum": ["div", "button", "header", "section", "field", "form"],
                    },
                    "label": s,
                    "children": {"type": "array", "items": {"$ref": "#"}},
                    "attributes": {"type": "array", "items": _o({"name": s, "value": s})},
                }
            )
        },
        "openai/moderation": _o(
            {
                "is_violating": b,
                "category": {
                    "anyOf": [
                        {"type": "string", "enum": ["violence", "sexual", "self_harm"]},
                        {"type": "null"},
                    ]
                },
                "explanation_if_violating": {"type": ["string", "null"]},
            }
        ),
        "openai/calendar_event": _o(
            {"name": s, "date": s, "participants": {"type": "array", "items": s}}
        ),
        "openai/weather_function": _o(
            {"location": s, "unit": {"type": ["string", "null"], "enum": ["F", "C", None]}}
        ),
        "openai/linked_list": {
            **_o({"linked_list": {"$ref": "#/$defs/linked_list_node"}}),
            "$defs": {
                "linked_list_node": _o(
                    {
                        "value": n,
                        "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]},
                    }
                )
            },
        },
        "openai/entities": _o(
            {
                "entities": {
                    "type": "array",
                    "items": _o(
                        {"name": s, "type": {"enum": ["person", "org", "place"]}, "salience": n}
                    ),
                }
            }
        ),
        "openai/user_profile": _o(
            {
                "name": s,
                "age": {**i, "minimum": 0, "maximum": 150},
                "email": {"type": "string", "format": "email"},
                "signup": {"type": "string", "format": "date-time"},
                "id": {"type": "string", "format": "uuid"},
            }
        ),
    }


def own_schemas() -> dict:
    s = {"type": "string"}
    return {
        "own/invoice": _o(
            {
                "invoice_no": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
                "date": {"type": "string", "format": "date"},
                "lines": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 20,
                    "items": _o(
                        {
                            "sku": s,
                            "qty": {"type": "integer", "minimum": 1},
                            "price": {"type": "number", "minimum": 0},
                        }
                    ),
                },
                "notes": {"type": ["string", "null"], "maxLength": 200},
            },
            ["invoice_no", "date", "lines"],
        ),
        "own/address": _o(
            {
                "street": s,
                "city": s,
                "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
                "country": {"enum": ["US", "CA", "MX"]},
            }
        ),
        "own/tree": {
            "$defs": {
                "node": _o(
                    {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3},
                    }
                )
            },
            "$ref": "#/$defs/node",
        },
        "own/net": _o(
            {
                "host": {"type": "string", "format": "hostname"},
                "v4": {"type": "string", "format": "ipv4"},
                "v6": {"type": "string", "format": "ipv6"},
            }
        ),
        "own/free_json": {"type": "object", "additionalProperties": True},
    }


def schemastore() -> dict:
    import check_jsonschema

    root = os.path.join(os.path.dirname(check_jsonschema.__file__), "builtin_schemas", "vendor")
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "*.json"))):
        name = os.path.basename(path)[:-5]
        with open(path, encoding="utf-8") as f:
            sch = json.load(f)
        out[f"schemastore/{name}"] = sch
        for key in ("definitions", "$defs"):
            for d, sub in (sch.get(key) or {}).items():
                if isinstance(sub, dict):
                    out[f"schemastore-def/{name}#{d}"] = (
                        {**sub, key: sch[key]}
                        if "$ref" not in sub
                        else {"$ref": f"#/{key}/{d}", key: sch[key]}
                    )
    return out


_KW = re.compile(r"'([^']+)' at (\S*):")


def compile_one(schema, vocab, eos, specials, strict):
    t = time.perf_counter()
    try:
        js._SCHEMAS.clear()
        c = js.compile_schema(schema, vocab, eos_id=eos, special_ids=specials, strict=strict)
    except Exception as e:  # InvalidRequestError (refused) or a bug, reported as such
        dt = time.perf_counter() - t
        m = _KW.search(str(e))
        kind = m.group(1) if m else f"error:{type(e).__name__}"
        return {"ok": False, "seconds": dt, "refused_by": kind, "message": str(e)[:300]}
    dt = time.perf_counter() - t
    return {
        "ok": True,
        "seconds": dt,
        "states": c.n_states,
        "bytes": c.nbytes,
        "min_tokens": c.min_tokens,
    }


def ll_one(schema, tok):
    import llguidance as llg

    t = time.perf_counter()
    try:
        g = llg.LLMatcher.grammar_from_json_schema(schema)
        m = llg.LLMatcher(tok, g, log_level=0)
        ok = not m.is_error()
        err = m.get_error() if not ok else ""
        if ok:
            m.compute_bitmask()  # the first mask: what a request waits for
    except Exception as e:
        ok, err = False, str(e)
    return {"ok": ok, "seconds": time.perf_counter() - t, "error": err[:200]}


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def step_cost(vocab, eos, specials, schemas, batches, reps=30):
    """Median seconds of a jitted, vmapped allowed + advance for schema rows (a mix of
    schemas in one pool) and for JSON mode, same batch sizes, same run."""
    import jax
    import jax.numpy as jnp

    from jaxsample.automata import json_mode as jm

    sp = js.SchemaPool(vocab, eos_id=eos, special_ids=specials, size="medium")
    hs = [
        sp.add(js.compile_schema(s, vocab, eos_id=eos, special_ids=specials, strict=False))
        for s in schemas
    ]
    pool = sp.pool
    g = jm.compile_grammar(vocab, eos_id=eos, special_ids=specials)

    @jax.jit
    def s_step(pool, st):
        m = jax.vmap(js.allowed, in_axes=(None, 0, None))(pool, st, 100)
        t = jnp.argmax(m, -1).astype(jnp.int32)
        return jax.vmap(js.advance, in_axes=(None, 0, 0))(pool, st, t), m

    @jax.jit
    def j_step(g, st):
        m = jax.vmap(jm.allowed, in_axes=(None, 0, None))(g, st, 100)
        t = jnp.argmax(m, -1).astype(jnp.int32)
        return jax.vmap(jm.advance, in_axes=(None, 0, 0))(g, st, t), m

    def timeit(f, a, st):
        jax.block_until_ready(f(a, st))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(f(a, st))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    out = {}
    for B in batches:
        starts = jnp.asarray([hs[k % len(hs)].start for k in range(B)], jnp.int32)
        # advance a few tokens so rows sit in varied states
        st = jax.vmap(js.init_state)(starts)
        for _ in range(3):
            st, _ = s_step(pool, st)
        jst = jax.vmap(lambda _: jm.init_state(g))(jnp.arange(B))
        # interleave to share the machine's drift
        a, b = [], []
        for _ in range(3):
            a.append(timeit(s_step, pool, st))
            b.append(timeit(j_step, g, jst))
        out[B] = {"schema_ms": 1e3 * min(a), "json_mode_ms": 1e3 * min(b), "ratio": min(a) / min(b)}
    return out, pool.nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="only the first N schemas of the corpus")
    ap.add_argument("--no-llguidance", action="store_true")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--out", default="results/bench_schema_cpu.json")
    args = ap.parse_args()

    from jaxsample.model import Tokenizer, default_model_path, read_gguf

    tk = Tokenizer.from_gguf(read_gguf(default_model_path()))
    vocab, eos, specials = list(tk.token_bytes), int(tk.eos_id), sorted(tk.special_ids)
    t = time.perf_counter()
    js._get_vocab(vocab, eos, specials)
    vocab_s = time.perf_counter() - t

    corpus = {**openai_examples(), **own_schemas(), **schemastore()}
    if args.limit:
        corpus = dict(list(corpus.items())[: args.limit])
    tok = None
    if not args.no_llguidance:
        import sys

        import llguidance as llg

        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from schema_support import GreedyTokenizer as greedy
    rows = {}
    for name, sch in corpus.items():
        strict = not name.startswith(("schemastore", "own/free"))
        r = compile_one(sch, vocab, eos, specials, strict)
        if tok is None and not args.no_llguidance:
            tok = llg.LLTokenizer(llg.TokenizerWrapper(greedy(vocab, eos, specials)))
        if tok is not None:
            r["llguidance"] = ll_one(sch, tok)
        rows[name] = r
        print(
            f"{name:60s} {'ok ' if r['ok'] else 'REF'} {1e3 * r['seconds']:8.1f} ms  "
            + (
                f"{r['states']:6d} states {r['bytes'] / 1024:8.0f} KiB"
                if r["ok"]
                else r["refused_by"]
            )
        )

    def summary(names):
        ok = [rows[n] for n in names if rows[n]["ok"]]
        secs = [r["seconds"] for r in ok]
        ref = collections.Counter(rows[n]["refused_by"] for n in names if not rows[n]["ok"])
        d = {
            "schemas": len(names),
            "compiled": len(ok),
            "share_compiled": len(ok) / max(1, len(names)),
            "compile_ms_p50": 1e3 * _pct(secs, 50),
            "compile_ms_p99": 1e3 * _pct(secs, 99),
            "compile_ms_max": 1e3 * max(secs, default=float("nan")),
            "table_kib_p50": _pct([r["bytes"] / 1024 for r in ok], 50),
            "table_kib_max": max([r["bytes"] / 1024 for r in ok], default=float("nan")),
            "refused_by": dict(ref.most_common()),
        }
        ll = [rows[n]["llguidance"] for n in names if "llguidance" in rows[n]]
        if ll:
            lsec = [x["seconds"] for x in ll if x["ok"]]
            d["llguidance"] = {
                "compiled": sum(x["ok"] for x in ll),
                "ms_p50": 1e3 * _pct(lsec, 50),
                "ms_p99": 1e3 * _pct(lsec, 99),
                "ms_max": 1e3 * max(lsec, default=float("nan")),
            }
        return d

    groups = collections.defaultdict(list)
    for n in rows:
        groups[n.split("/")[0]].append(n)
    result = {"vocab_setup_s": vocab_s, "groups": {g: summary(ns) for g, ns in groups.items()}}
    result["all"] = summary(list(rows))
    if not args.no_step:
        sch = [corpus[n] for n in corpus if rows[n]["ok"] and n.startswith(("openai", "own"))]
        sc, pool_bytes = step_cost(
            vocab, eos, specials, sch, [int(b) for b in args.batches.split(",")]
        )
        result["step"] = sc
        result["pool_bytes"] = pool_bytes
    result["schemas"] = rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print()
    head = ("p50 ms", "p99 ms", "max ms", "KiB p50")
    print(f"{'group':18s} {'n':>4s} {'compiled':>9s} " + " ".join(f"{h:>8s}" for h in head), end="")
    print("  llguidance ok / p50 ms")
    for g, d in list(result["groups"].items()) + [("all", result["all"])]:
        ll = d.get("llguidance", {})
        cells = (d["compile_ms_p50"], d["compile_ms_p99"], d["compile_ms_max"], d["table_kib_p50"])
        line = f"{g:18s} {d['schemas']:4d} {d['compiled']:9d} " + " ".join(
            f"{x:8.1f}" for x in cells
        )
        print(line + f"  {ll.get('compiled', '-')} / {ll.get('ms_p50', float('nan')):.1f}")
    print("refused by:", result["all"]["refused_by"])
    for B, d in result.get("step", {}).items():
        print(
            f"batch {B}: schema allowed+advance {d['schema_ms']:.2f} ms, "
            f"JSON mode {d['json_mode_ms']:.2f} ms, ratio {d['ratio']:.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
