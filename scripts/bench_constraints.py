"""Cost of the device automata (JSON mode and stop strings) on the real vocabulary.

    .venv/bin/python scripts/bench_constraints.py             # automata only
    .venv/bin/python scripts/bench_constraints.py --with-model  # + whole decode steps

Writes results/bench_constraints_<platform>.json and prints a table. Measures:
- the JSON grammar compile (host, numpy, uncached) for the 49152-token SmolLM2 vocabulary,
  and the device memory of its tables and of the stop tables per row;
- per decode step, jitted and vmapped over the batch, at batch 1/8/32: the JSON mask
  (``json_mode.allowed``) plus ``json_mode.advance``; the stop automata
  (``stop.advance``, 4 stop strings per row) for tokens of ordinary text and for the
  longest tokens of the vocabulary (the worst case of the byte walk);
- with ``--with-model``: the real decode loop per step, plain rows vs every row in JSON
  mode vs every row with 4 stop strings, same batch and model (the decode benchmark's
  ``bench_constraints_in_loop``, run at each batch of ``--batches``).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxsample.automata import json_mode, stop  # noqa: E402

BATCHES = (1, 8, 32)
SAMPLE_JSON = (
    '{"name": "Ada Lovelace", "born": 1815, "tags": ["math", "poetry"], '
    '"notes": {"engine": "analytical", "ratio": 0.25e-3, "ok": true, "x": null}, '
    '"quote": "The Analytical Engine weaves \\"algebraic patterns\\" \\u00e9 ✓"}'
)
SAMPLE_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and museums."
STOPS = ("\n\n", "User:", "</answer>", "STOP")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_tokenizer():
    from jaxsample.model import Tokenizer, default_model_path, read_gguf

    return Tokenizer.from_gguf(read_gguf(default_model_path()))


def bench_compile(tok, repeats: int = 3) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tables = json_mode.compile_tables(tok.token_bytes, tok.eos_id, tok.special_ids, 32)
        times.append(time.perf_counter() - t0)
    g = json_mode.compile_grammar(tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids)
    t0 = time.perf_counter()
    json_mode.compile_grammar(tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids)
    cached = time.perf_counter() - t0
    st = stop.compile_stops([STOPS])
    tb = stop.TokenBytes.from_vocab(tok.token_bytes)
    return {
        "vocab": len(tok.token_bytes),
        "lexical_states": int(tables["next"].shape[0]),
        "json_compile_s": min(times),
        "json_compile_cached_s": cached,
        "json_table_bytes": g.nbytes,
        "json_table_bytes_by_field": {k: int(v.nbytes) for k, v in tables.items()},
        "json_min_budget": g.min_budget,
        "stop_table_bytes_per_row": int(sum(x.nbytes for x in jax.tree.leaves(st))),
        "token_bytes_table_bytes": int(sum(x.nbytes for x in jax.tree.leaves(tb))),
        "longest_token_bytes": int(tb.table.shape[1]),
    }


def _json_states(g, tok, batch: int):
    """``batch`` row states spread over a realistic JSON text (different lexical states)."""
    ids = tok.encode(SAMPLE_JSON)
    states = [json_mode.init_state(g)]
    for t in ids:
        states.append(json_mode.advance(g, states[-1], jnp.int32(t)))
    pick = np.linspace(0, len(ids) - 1, batch).astype(int)
    tokens = jnp.asarray([ids[i] for i in pick], jnp.int32)
    chosen = [states[i] for i in pick]
    return jax.tree.map(lambda *a: jnp.stack(a), *chosen), tokens


def bench_steps(tok, repeats: int = 50) -> dict:
    g = json_mode.compile_grammar(tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids)
    tb = stop.TokenBytes.from_vocab(tok.token_bytes)

    @jax.jit
    def json_step(states, tokens, remaining):
        mask = jax.vmap(json_mode.allowed, in_axes=(None, 0, 0))(g, states, remaining)
        new = jax.vmap(json_mode.advance, in_axes=(None, 0, 0))(g, states, tokens)
        return mask, new

    @jax.jit
    def mask_only(states, remaining):
        return jax.vmap(json_mode.allowed, in_axes=(None, 0, 0))(g, states, remaining)

    @jax.jit
    def stop_step(st, s, tokens):
        return jax.vmap(stop.advance, in_axes=(0, 0, 0, None))(st, s, tokens, tb)

    text_ids = tok.encode(SAMPLE_TEXT)
    lengths = np.asarray(tb.lengths)
    longest = np.argsort(-lengths)[:32]
    out = {}
    for b in BATCHES:
        states, tokens = _json_states(g, tok, b)
        remaining = jnp.full((b,), 200, jnp.int32)
        json_step(states, tokens, remaining)
        mask_only(states, remaining)
        t_json = _median_time(lambda s=states, t=tokens, r=remaining: json_step(s, t, r), repeats)
        t_mask = _median_time(lambda s=states, r=remaining: mask_only(s, r), repeats)
        st = stop.compile_stops([STOPS] * b)
        s0 = stop.init_state(st)
        text_tok = jnp.asarray([text_ids[i % len(text_ids)] for i in range(b)], jnp.int32)
        long_tok = jnp.asarray(longest[:b], jnp.int32)
        stop_step(st, s0, text_tok)
        t_stop = _median_time(lambda st=st, s=s0, t=text_tok: stop_step(st, s, t), repeats)
        t_stop_long = _median_time(lambda st=st, s=s0, t=long_tok: stop_step(st, s, t), repeats)
        out[str(b)] = {
            "json_mask_plus_advance_ms": t_json * 1e3,
            "json_mask_ms": t_mask * 1e3,
            "stop_advance_text_ms": t_stop * 1e3,
            "stop_advance_longest_tokens_ms": t_stop_long * 1e3,
        }
    return out


def decode_step_comparison(batches=BATCHES, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Whole decode steps, plain vs JSON mode vs 4 stop strings per row, same batch and
    model: delegates to ``bench_constraints_in_loop`` of scripts/bench_decode.py."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_decode import bench_constraints_in_loop

    return {str(b): bench_constraints_in_loop(b, new_tokens, repeats) for b in batches}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-model", action="store_true", help="also time whole decode steps")
    ap.add_argument("--batches", default="1,8,32", help="batches for --with-model")
    ap.add_argument("--new-tokens", type=int, default=32, help="steps per run (--with-model)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tok = load_tokenizer()
    result = {
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "compile": bench_compile(tok),
        "per_step": bench_steps(tok),
    }
    if args.with_model:
        batches = tuple(int(b) for b in args.batches.split(","))
        result["decode_steps"] = decode_step_comparison(batches, args.new_tokens)
    c = result["compile"]
    print(
        f"JSON grammar: {c['vocab']} tokens x {c['lexical_states']} states, compile "
        f"{c['json_compile_s']:.2f} s (cached {c['json_compile_cached_s'] * 1e3:.2f} ms), "
        f"tables {c['json_table_bytes'] / 2**20:.1f} MiB, min budget {c['json_min_budget']}"
    )
    print(
        f"stop tables {c['stop_table_bytes_per_row'] / 1024:.1f} KiB/row; token bytes "
        f"{c['token_bytes_table_bytes'] / 2**20:.2f} MiB "
        f"(longest token {c['longest_token_bytes']} B)"
    )
    print(
        f"{'batch':>5} {'json mask+adv ms':>17} {'mask ms':>8} {'stop ms':>8} {'stop worst ms':>14}"
    )
    for b, r in result["per_step"].items():
        print(
            f"{b:>5} {r['json_mask_plus_advance_ms']:>17.3f} {r['json_mask_ms']:>8.3f} "
            f"{r['stop_advance_text_ms']:>8.3f} {r['stop_advance_longest_tokens_ms']:>14.3f}"
        )
    for b, r in result.get("decode_steps", {}).items():
        print(
            f"decode batch {b}: plain {r['plain']['step_ms']:.1f} ms/step, JSON "
            f"{r['json_object']['ratio_to_plain']:.3f}x, 4 stop strings "
            f"{r['stop_x4']['ratio_to_plain']:.3f}x"
        )
    path = args.out or os.path.join(ROOT, "results", f"bench_constraints_{result['platform']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
