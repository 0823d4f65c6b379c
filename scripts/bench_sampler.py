"""Benchmark of the sampler against log_softmax (the floor) and a sort-based chain.

Measures, in one process on the same logits, the median wall time of:

* ``floor``: ``jax.nn.log_softmax`` over ``[B, V]``;
* ``full``: :func:`jaxsample.sample_batch` with every parameter on (logit_bias, repetition,
  frequency and presence penalties, temperature, top_k, top_p, top_a, min_p, the draw and
  top_logprobs=20);
* each transform alone (the same sampler with only that parameter away from neutral;
  ``neutral`` is plain softmax sampling, ``greedy`` is temperature 0);
* ``full_xla`` (and ``*_xla`` on the real logits): the same sampler compiled without
  jaxsample's CPU kernels (``jaxsample.native.KERNELS = "xla"``: XLA's TopK, reductions and
  ``exp``), the in-run baseline of those kernels;
* ``sort_chain``: a straightforward sort-based chain in the style of Hugging Face's Flax
  warpers (one full descending sort of the vocabulary for top_k/top_p, softmax for top_a and
  min_p, ``jax.random.categorical``), with the same parameters.

Grid: B in {1, 64}, V in {49152, 128256, 262144}; "realistic" logits (Zipf-like ranks with a
per-row exponent, so the top token has probability ~0.3-0.9, plus a little Gumbel noise) and
"flat" logits (standard normal: the worst case for candidate-based filtering).

Statistics: every case is timed once per round, round-robin, so machine load hits every case
alike; per case the median and the minimum, and the median over rounds of the per-round
ratio to the floor (``paired_ratio``). On the real logits the sampler's cases and the
baselines (``*_xla``, ``*_1tier``, the sort chain: calls up to 100x slower, after which the
next case in a round starts with cold caches) run in two separate groups of rounds, each with
the floor (``real.baselines`` in the JSON); the floor, the full chain and T 0.8 / top_p 0.95
are also timed in bursts of 5 back-to-back calls (``burst``): the floor's time swings most
between those protocols, so the ratio is reported under each.

Allocator: on Linux the script re-runs itself with glibc's ``mmap`` off, no trimming and one
arena (``GLIBC_TUNABLES``: ``mmap_max=0``, ``trim_threshold`` 4 GiB, ``arena_max=1``; a
thread's own arena holds at most 64 MB and maps anything larger). XLA's CPU client
allocates a compiled program's temporary buffer at every call; the sampler's is 48-256 MiB
(the floor's is empty), above glibc's largest mmap threshold (32 MB), so with the default
allocator every call maps fresh memory and pays a page fault per 4 KiB page it touches:
about 3500-6700 faults (several ms) per call at B = 64, V = 49152 on the 2-core VM. Inside a
compiled decoding loop the buffer is allocated once per loop run, not per step, so the per-step cost
is the one measured with mmap off. ``--allocator system`` measures with glibc's defaults;
both runs record the minor page faults per call of the floor and the full sampler.

Usage::

    .venv/bin/python scripts/bench_sampler.py            # full grid, ~4 minutes on 2 cores
    .venv/bin/python scripts/bench_sampler.py --quick    # small smoke run, prints only
    .venv/bin/python scripts/bench_sampler.py --allocator system   # glibc's default malloc

Writes ``results/bench_sampler_cpu.json`` (full run; ``results/bench_sampler_cpu_system.json``
with ``--allocator system``) and prints a table of ratios.
No extra dependencies beyond the project's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsample import native
from jaxsample.params import SamplingParams, pack_rows
from jaxsample.sampler import History, sample_batch, sample_rows

FULL = dict(
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    top_a=0.1,
    min_p=0.05,
    repetition_penalty=1.1,
    frequency_penalty=0.3,
    presence_penalty=0.2,
    logit_bias={11: 2.0, 220: -5.0, 1000: 1.5, 3000: -100.0},
    logprobs=True,
    top_logprobs=20,
)
ALONE = {
    "neutral": {},
    "greedy": dict(temperature=0.0),
    "logit_bias": dict(logit_bias=FULL["logit_bias"]),
    "repetition_penalty": dict(repetition_penalty=1.1),
    "frequency_penalty": dict(frequency_penalty=0.3),
    "presence_penalty": dict(presence_penalty=0.2),
    "temperature": dict(temperature=0.8),
    "top_k": dict(top_k=50),
    "top_p": dict(top_p=0.9),
    "top_a": dict(top_a=0.1),
    "min_p": dict(min_p=0.05),
    "top_logprobs": dict(logprobs=True, top_logprobs=20),
}


def make_logits(kind: str, b: int, v: int, rng: np.random.Generator) -> np.ndarray:
    """``[B, V]`` float32 logits: "realistic" (peaked, heavy-tailed) or "flat"."""
    if kind == "flat":
        return rng.standard_normal((b, v)).astype(np.float32)
    exponent = rng.uniform(1.6, 2.6, size=(b, 1))  # top-token probability ~0.35-0.8
    ranks = np.argsort(rng.random((b, v)), axis=1) + 1.0
    noise = rng.gumbel(size=(b, v)) * 0.1
    return (-exponent * np.log(ranks) + noise + 8.0).astype(np.float32)


def make_history(b: int, v: int, rng: np.random.Generator) -> History:
    """A history with a 512-token prompt and 128 output tokens per row."""
    counts = np.zeros((b, v), np.int32)
    in_prompt = np.zeros((b, v), np.bool_)
    for i in range(b):
        in_prompt[i, rng.integers(0, v, 512)] = True
        np.add.at(counts[i], rng.integers(0, v, 128), 1)
    return History(counts=jnp.asarray(counts), in_prompt=jnp.asarray(in_prompt))


def rows_for(fields: dict, b: int, v: int):
    params = [SamplingParams(**fields, seed=i) for i in range(b)]
    return jax.tree.map(jnp.asarray, pack_rows(params, vocab_size=v, seeds=list(range(b))))


@jax.jit
def floor(logits):
    return jax.nn.log_softmax(logits)


@jax.jit
def sort_chain(logits, rows, hist, position):
    """A plain sort-based chain (the usual way): full sort for top_k and top_p."""

    def one(z, row, counts, in_prompt):
        z = z.astype(jnp.float32)
        z = z.at[row.bias_ids].add(row.bias_values)
        seen = in_prompt | (counts > 0)
        r = jnp.maximum(row.repetition_penalty, 1e-6)
        z = jnp.where(seen, jnp.where(z > 0, z / r, z * r), z)
        z = z - row.frequency_penalty * counts - row.presence_penalty * (counts > 0)
        greedy_token = jnp.argmax(z)
        z = z / jnp.maximum(row.temperature, 1e-5)
        sorted_z, order = lax.top_k(z, z.shape[0])  # full sort, as HF's top-p warper does
        k = jnp.where(row.top_k > 0, row.top_k, z.shape[0])
        z = jnp.where(z < sorted_z[k - 1], -jnp.inf, z)
        sorted_z = jnp.where(jnp.arange(z.shape[0]) < k, sorted_z, -jnp.inf)
        cum = jnp.cumsum(jax.nn.softmax(sorted_z))
        cut = jnp.minimum(jnp.sum(cum < row.top_p), z.shape[0] - 1)
        z = jnp.where(z < sorted_z[cut], -jnp.inf, z)
        p = jax.nn.softmax(z)
        z = jnp.where(p < row.top_a * jnp.max(p) ** 2, -jnp.inf, z)
        p = jax.nn.softmax(z)
        z = jnp.where(p < row.min_p * jnp.max(p), -jnp.inf, z)
        key = jax.random.wrap_key_data(row.seed_words, impl="threefry2x32")
        token = jax.random.categorical(jax.random.fold_in(key, position), z)
        token = jnp.where(row.temperature < 1e-5, greedy_token, token)
        raw = jax.nn.log_softmax(z)
        top_lp, top_ids = lax.top_k(raw, 20)
        return token, raw[token], top_ids, top_lp

    return jax.vmap(one)(logits, rows, hist.counts, hist.in_prompt)


HEAP_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1"
)


def use_allocator(kind: str) -> None:
    """Re-runs this script, when needed, under the allocator ``kind`` asks for: ``heap``,
    glibc with mmap off (see the module docstring); ``system``, without our tunables."""
    if sys.platform != "linux":
        return
    env = dict(os.environ)
    if kind == "heap":
        env["GLIBC_TUNABLES"] = HEAP_TUNABLES
    elif env.get("GLIBC_TUNABLES") == HEAP_TUNABLES:
        del env["GLIBC_TUNABLES"]
    if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def faults_per_call(fn, *args, calls: int = 5) -> float:
    """Minor page faults per call (the process's count, around ``calls`` calls)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        timed(fn, *args)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def machine_meta() -> dict:
    """The versions and the machine a result JSON records."""
    return dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def with_xla(*args):
    """``sample_rows`` compiled (now) without jaxsample's CPU kernels (``native.KERNELS =
    "xla"``): the in-run baseline of the kernels."""
    setting, native.KERNELS = native.KERNELS, "xla"
    try:
        fn = jax.jit(lambda *a: sample_rows(*a))
        timed(fn, *args)
    finally:
        native.KERNELS = setting
    return fn


def bench_config(b, v, kind, reps, sort_reps, rng):
    logits = jnp.asarray(make_logits(kind, b, v, rng))
    hist = make_history(b, v, rng)
    pos = jnp.int32(3)
    cases = {"floor": (floor, (logits,))}
    cases["full"] = (sample_batch, (logits, rows_for(FULL, b, v), hist, None, pos))
    cases["full_xla"] = (with_xla(*cases["full"][1]), cases["full"][1])
    for name, fields in ALONE.items():
        cases[name] = (sample_batch, (logits, rows_for(fields, b, v), hist, None, pos))
    cases["sort_chain"] = (sort_chain, (logits, rows_for(FULL, b, v), hist, pos))
    for fn, args in cases.values():  # compile and warm up
        timed(fn, *args)
    times = {name: [] for name in cases}
    for r in range(reps):  # round-robin, so machine load hits every case alike
        for name, (fn, args) in cases.items():
            if name == "sort_chain" and r >= sort_reps:
                continue
            times[name].append(timed(fn, *args))
    return _stats(times) | _faults(cases, "full")


def _faults(cases: dict, sampler: str) -> dict:
    """Page faults per call of the floor and the sampler, and the sampler's temporary buffer
    (XLA's compiled memory analysis)."""
    fn, args = cases[sampler]
    floor_fn, floor_args = cases["floor"]
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    return {
        "faults_per_call": {
            "floor": faults_per_call(floor_fn, *floor_args),
            sampler: faults_per_call(fn, *args),
        },
        "sampler_temp_mb": temp / 2**20,
    }


def _stats(times: dict) -> dict:
    """Median and minimum per case, in ms, and the median over rounds of each case's time
    divided by the floor's in the same round (``paired``). The floor writes a fresh
    ``[B, V]`` array every call and its time swings by 2x between calls on a shared machine
    (the sampler returns a few numbers per row and swings far less), so all three are kept."""
    floor_times = times["floor"]
    return {
        "median_ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
        "min_ms": {name: float(np.min(t)) * 1e3 for name, t in times.items()},
        "paired_ratio": {
            name: float(np.median(np.array(t) / np.array(floor_times[: len(t)])))
            for name, t in times.items()
        },
    }


def burst(fn, *args, calls: int = 5) -> float:
    """Seconds per call of ``calls`` back-to-back calls (dispatched without waiting, as a
    decoding loop's steps follow each other), then one wait."""
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def burst_times(cases: dict, names, rounds: int, calls: int = 5) -> dict:
    """:func:`burst` for each case in ``names``, per round, round-robin: the median ms per
    call and the ratio to the floor's."""
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            fn, args = cases[name]
            times[name].append(burst(fn, *args, calls=calls))
    med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    return {"median_ms": med, "ratio": {n: med[n] / med["floor"] for n in names}}


REAL = {  # on the real model's logits (B = 64 rows of the dump, V = 49152)
    "full_p95": {**FULL, "top_p": 0.95},
    # the same chain without log probabilities: what the raw normalizer and top 20 cost
    "full_p95_nolp": {**FULL, "top_p": 0.95, "logprobs": False, "top_logprobs": 0},
    "p95_t1": dict(temperature=1.0, top_p=0.95),
    "p95_t08": dict(temperature=0.8, top_p=0.95),
    "p99_t1": dict(temperature=1.0, top_p=0.99),
    "neutral": {},
}


def bench_real(reps, sort_reps, b=64):
    """The sampler on B rows of real SmolLM2 logits (scripts/real_logits.py's cached dump).

    ``*_1tier`` rows are the same sampler with the second candidate tier and the compaction
    off (``second_tier=0``, ``COMPACT=1``): the single-tier design, as a baseline.
    """
    import sys

    from jaxsample import sampler as sm

    sys.path.insert(0, str(Path(__file__).parent))
    from real_logits import load_real_logits

    data = load_real_logits()
    idx = np.random.default_rng(0).choice(data.shape[0], b, replace=False)
    logits = jnp.asarray(data[idx])
    v = logits.shape[1]
    hist = make_history(b, v, np.random.default_rng(1))
    pos = jnp.int32(3)
    cases = {"floor": (floor, (logits,))}
    for name, fields in REAL.items():
        cases[name] = (sample_batch, (logits, rows_for(fields, b, v), hist, None, pos))
    for name in ("full_p95", "p95_t1", "p95_t08", "p99_t1"):
        cases[name + "_xla"] = (with_xla(*cases[name][1]), cases[name][1])
    # compiled below, with COMPACT = 1
    one_tier = jax.jit(lambda *a: sm.sample_rows(*a, second_tier=0))
    compact = sm.COMPACT
    sm.COMPACT = 1
    try:
        for name in ("p95_t1", "p99_t1"):
            args = (logits, rows_for(REAL[name], b, v), hist, None, pos)
            timed(one_tier, *args)  # compile now, with the compaction off
            cases[name + "_1tier"] = (one_tier, args)
    finally:
        sm.COMPACT = compact
    cases["sort_chain"] = (sort_chain, (logits, rows_for(REAL["full_p95"], b, v), hist, pos))
    for fn, args in cases.values():
        timed(fn, *args)
    # two groups of rounds, each with the floor: the sampler's cases, then the baselines
    # (XLA-only, single tier, sort chain: up to 100x slower calls, which would leave the
    # caches cold for whichever case follows them in a shared round)
    sampler_names = ["floor", *REAL]
    baseline_names = ["floor"] + [n for n in cases if n not in sampler_names]
    times = round_robin(cases, sampler_names, reps, sort_reps)
    baselines = round_robin(cases, baseline_names, reps, sort_reps)
    bursts = burst_times(cases, ["floor", "full_p95", "p95_t08"], reps)
    return (
        _stats(times)
        | _faults(cases, "full_p95")
        | {"burst": bursts, "baselines": _stats(baselines)}
    )


def round_robin(cases: dict, names, reps: int, sort_reps: int) -> dict:
    """Seconds per call of each case in ``names``, ``reps`` rounds, one call per case per
    round in order (``sort_chain`` in the first ``sort_reps`` rounds only)."""
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names:
            if name == "sort_chain" and r >= sort_reps:
                continue
            fn, args = cases[name]
            times[name].append(timed(fn, *args))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (prints only)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default: results/bench_sampler_cpu.json)"
    )
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default=None, help="one grid point B,V (prints only)")
    ap.add_argument(
        "--real-only", action="store_true", help="only the real-logits table (prints only)"
    )
    ap.add_argument(
        "--allocator",
        choices=("heap", "system"),
        default="heap",
        help="heap: glibc with mmap off, as inside a decoding loop (default); system: defaults",
    )
    args = ap.parse_args()
    use_allocator(args.allocator)
    if args.quick:
        grid, reps, sort_reps = [(4, 8192)], args.reps or 3, 2
    else:
        grid = [(b, v) for b in (1, 64) for v in (49152, 128256, 262144)]
        reps, sort_reps = args.reps or 9, 3
    if args.only:
        grid = [tuple(int(x) for x in args.only.split(","))]
    # a partial run (--quick, --only, --real-only) prints only, unless --out is given
    partial_run = args.quick or args.only or args.real_only
    default_out = "results/bench_sampler_cpu" + ("" if args.allocator == "heap" else "_system")
    out = args.out or (None if partial_run else default_out + ".json")
    rng = np.random.default_rng(0)
    results = []
    names = ["floor", "full", "full_xla", "sort_chain", *ALONE]
    header = f"{'B':>3} {'V':>7} {'logits':>9} {'floor ms':>9} {'full ms':>8} {'full/floor':>10} "
    header += f"{'min/min':>8} {'xla':>8} "
    header += f"{'sort/full':>9}  " + " ".join(f"{n[:8]:>8}" for n in ALONE)
    print(
        "ratios: time / floor (log_softmax), medians; min/min: full / floor, minima; "
        "sort/full = sort_chain time / full sampler time"
    )
    print(header)
    for b, v in [] if args.real_only else grid:
        for kind in ("realistic", "flat"):
            stats = bench_config(b, v, kind, reps, sort_reps, rng)
            med, low = stats["median_ms"], stats["min_ms"]
            f = med["floor"]
            results.append(dict(B=b, V=v, logits=kind, **stats))
            line = f"{b:>3} {v:>7} {kind:>9} {f:>9.2f} {med['full']:>8.2f} "
            line += f"{med['full'] / f:>10.2f} {low['full'] / low['floor']:>8.2f} "
            line += f"{med['full_xla'] / f:>8.2f} "
            line += f"{med['sort_chain'] / med['full']:>9.1f}  "
            line += " ".join(f"{med[n] / f:>8.2f}" for n in ALONE)
            fpc = stats["faults_per_call"]
            line += f"  faults/call {fpc['floor']:.0f} / {fpc['full']:.0f}"
            print(line, flush=True)
    real = None
    if not args.quick:
        real_stats = bench_real(reps, sort_reps)
        for title, group in (("", real_stats), (", baselines", real_stats["baselines"])):
            med, low = group["median_ms"], group["min_ms"]
            f = med["floor"]
            print(f"\nreal SmolLM2 logits{title}, B = 64, V = 49152 (median ms, ratio to")
            print("log_softmax in the same rounds, of the minima, and per round)")
            print(" ".join(f"{n:>14}" for n in med))
            print(" ".join(f"{med[n]:>14.2f}" for n in med))
            print(" ".join(f"{med[n] / f:>14.2f}" for n in med))
            print(" ".join(f"{low[n] / low['floor']:>14.2f}" for n in low))
            paired = group["paired_ratio"]
            print(" ".join(f"{paired[n]:>14.2f}" for n in paired) + "   (paired)")
        real = real_stats["median_ms"] | real_stats["baselines"]["median_ms"]
        burst = real_stats["burst"]
        print(
            "bursts of 5 back-to-back calls (ms per call): "
            + ", ".join(
                f"{n} {burst['median_ms'][n]:.2f} ({burst['ratio'][n]:.2f}x)"
                for n in burst["ratio"]
            )
        )
        print(f"sort_chain / full_p95: {real['sort_chain'] / real['full_p95']:.1f}")
        fpc = real_stats["faults_per_call"]
        print(
            f"page faults per call: floor {fpc['floor']:.0f}, full_p95 {fpc['full_p95']:.0f} "
            f"(temporary buffer {real_stats['sampler_temp_mb']:.0f} MiB)"
        )

        sys.path.insert(0, str(Path(__file__).parent))
        from real_logits import fallback_rates, load_real_logits

        rates = fallback_rates(load_real_logits())
        print("fallback rate (rows the first 128 candidates cannot resolve -> after the 2nd tier)")
        for r in rates:
            print(
                f"  T={r['temperature']} top_p={r['top_p']}: {r['before']:.3f} -> {r['after']:.3f}"
            )
        real = dict(**real_stats, fallback=rates)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            **machine_meta(),
            allocator=args.allocator,
            glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
            native_kernels=native.status(),
            params_full={k: v for k, v in FULL.items() if k != "logit_bias"}
            | {"logit_bias_entries": len(FULL["logit_bias"])},
            names=names,
            reps=reps,
            sort_reps=sort_reps,
        )
        Path(out).write_text(
            json.dumps(dict(meta=meta, results=results, real=real), indent=1) + "\n"
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
