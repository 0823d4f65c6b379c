"""The sampler on a GPU: time per call against log_softmax and the sort chain, kernels and host
synchronisations per call (from a profile), and the time per step inside a compiled loop.

Run it on a machine with a GPU (it needs no model file, no network, nothing beyond the
project's own dependencies)::

    python3 scripts/bench_sampler_gpu.py --out results/bench_sampler_gpu.json

With ``--real PATH`` it also times the variants on real SmolLM2 logits, where rows retry on
the second candidate tier as the synthetic logits never make them: write the float16 dump
here first (``PYTHONPATH=. .venv/bin/python scripts/real_logits.py --export-half
results/cache/smollm2_logits_f16.npy``, about 38 MB, gitignored) and carry it to the GPU
machine with the working tree.

The grid is :mod:`bench_sampler`'s (B in {1, 64}, V in {49152, 128256, 262144}, realistic and
flat logits, the same parameter sets). Each sampler case is timed under each variant that
``--variants`` names (default ``auto,auto_count``: the library's defaults, which on a GPU
are ``one_rank`` since session 12, and the same with the second tier's top-k by counting,
the candidate that session 12 could not time): a ``VARIANTS`` entry is the value of
:data:`jaxsample.sampler.BRANCHES` the sampler is traced with, the XLA compiler options it
is compiled with (None: XLA's defaults; the others switch CUDA graphs off, or on for fusions
only, or on for conditionals and loops too) and :data:`jaxsample.native.TOP_K_FORM` (sort:
XLA's sorts; rank: counted ranks for small rows).

Protocols, every case round-robin so the machine's noise hits all alike:

* ``call``: one call and ``block_until_ready`` (the latency a notebook user sees);
* ``burst``: 10 calls dispatched back to back, then one wait (ms per call);
* ``loop``: 32 steps of a ``lax.fori_loop`` inside one jitted program, each step the sampler
  (or log_softmax) on logits that change with the step (ms per step; the cost inside a
  decoding loop, without dispatch).

Profile (``jax.profiler``, the trace's device plane): per call, the kernels launched, the
device-to-host copies (each one a point where the host waits for the device: the predicate
of a ``lax.cond`` or a loop's condition outside a command buffer) and the kernels' summed
time, for the floor and the full sampler under each variant.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampler import (
    ALONE,
    FULL,
    REAL,
    _stats,
    burst,
    floor,
    make_history,
    make_logits,
    rows_for,
    sort_chain,
    timed,
)

from jaxsample import native
from jaxsample import sampler as sm
from jaxsample import transforms as tf

NO_GRAPHS = {"xla_gpu_enable_command_buffer": ""}
FUSION_GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"}
ALL_GRAPHS = {  # loops too, and the profiler keeps the graphs
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
    "xla_gpu_graph_min_graph_size": 1,
    "xla_enable_command_buffers_during_profiling": True,
}
#: name: (sampler.BRANCHES, XLA compiler options (None: XLA's defaults), native.TOP_K_FORM[,
#: transforms.THRESHOLD_BITS ("auto" when absent)[, transforms.LARGE_TOP_K ("sort")]])
VARIANTS = {
    "auto": ("auto", None, "auto"),  # the library's defaults ("one", "rank" and 2 on a GPU)
    "auto_bits2": ("auto", None, "auto", 2),
    "auto_bits4": ("auto", None, "auto", 4),
    "auto_count": ("auto", None, "auto", "auto", "count"),  # the second tier by counting
    "many": ("many", None, "sort"),
    "few": ("few", None, "sort"),
    "few_rank": ("few", None, "rank"),
    "one": ("one", None, "sort"),
    "one_rank": ("one", None, "rank"),
    "one_rank_graphs": ("one", ALL_GRAPHS, "rank"),
    "one_rank_nographs": ("one", NO_GRAPHS, "rank"),
    "few_nographs": ("few", NO_GRAPHS, "sort"),
    "many_nographs": ("many", NO_GRAPHS, "sort"),
    "few_fusiongraphs": ("few", FUSION_GRAPHS, "sort"),
    "many_allgraphs": ("many", ALL_GRAPHS, "sort"),
    "few_allgraphs": ("few", {**ALL_GRAPHS, "xla_gpu_command_buffer_unroll_loops": True}, "sort"),
}


def settings(name: str) -> tuple:
    """``(BRANCHES, compiler options, TOP_K_FORM, THRESHOLD_BITS, LARGE_TOP_K)`` of a
    variant."""
    v = VARIANTS[name]
    return (*v, *("auto", "sort")[len(v) - 3 :])


PROFILED = [(1, 49152, "realistic"), (64, 128256, "realistic"), (64, 262144, "flat")]


#: The settings a variant sets while the sampler is traced, in ``settings``' order after the
#: compiler options.
TRACE_SETTINGS = (
    (sm, "BRANCHES"),
    (native, "TOP_K_FORM"),
    (tf, "THRESHOLD_BITS"),
    (tf, "LARGE_TOP_K"),
)


@contextlib.contextmanager
def traced_with(branches: str, form: str = "sort", bits="auto", large: str = "sort"):
    """``sampler.BRANCHES``, ``native.TOP_K_FORM``, ``transforms.THRESHOLD_BITS`` and
    ``transforms.LARGE_TOP_K`` set to these values inside the block, restored after it."""
    old = [getattr(module, name) for module, name in TRACE_SETTINGS]
    for (module, name), value in zip(TRACE_SETTINGS, (branches, form, bits, large)):
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in zip(TRACE_SETTINGS, old):
            setattr(module, name, value)


def with_branches(fn, *values):
    """``fn`` traced under :func:`traced_with` ``(*values)``."""

    def traced(*args, **kwargs):
        with traced_with(*values):
            return fn(*args, **kwargs)

    return traced


def samplers(names) -> dict:
    static = ("num_candidates", "second_tier", "transforms")
    fns = {}
    for name in names:
        branches, options, form, bits, large = settings(name)
        fn = with_branches(sm.sample_rows, branches, form, bits, large)
        fns[name] = jax.jit(fn, static_argnames=static, compiler_options=options)
    return fns


def looped(step, steps: int, options=None):
    """``steps`` iterations of ``step(logits, i)`` in one program; the logits change with
    ``i`` (one entry per row) so no iteration can be hoisted out of the loop."""

    def run(logits, *rest):
        def body(i, acc):
            z = logits.at[:, 0].add(i.astype(logits.dtype) * 1e-3)
            return acc + step(z, i, *rest)

        return lax.fori_loop(0, steps, body, jnp.float32(0))

    return jax.jit(run, compiler_options=options)


def sampler_step(z, i, rows, hist):
    out = sm.sample_rows(z, rows, hist, None, i)
    return jnp.sum(out.token).astype(jnp.float32) + jnp.sum(out.logprob)


def floor_step(z, i):
    return jnp.sum(jax.nn.log_softmax(z)[:, 0])


def profile_counts(fn, *args, calls: int = 5) -> dict:
    """Kernels, device-to-host copies and kernel time per call, read from a trace."""
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
        data = ProfileData.from_file(path)
        kernels = 0
        d2h = 0
        other = 0
        kernel_ns = 0.0
        names = collections.Counter()
        sequence = []
        by_time = collections.Counter()
        lines = {}
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                events = list(line.events)
                lines[line.name] = len(events)
                if not line.name.lower().startswith("stream"):
                    continue
                for e in events:
                    sequence.append((e.name[:120], round(e.duration_ns / 1e3, 2)))
                    low = e.name.lower()
                    if "memcpy" in low or "memset" in low:
                        if "dtoh" in low or "d2h" in low or "devicetohost" in low:
                            d2h += 1
                        else:
                            other += 1
                        names[e.name] += 1
                        continue
                    kernels += 1
                    kernel_ns += e.duration_ns
                    by_time[e.name] += e.duration_ns
        host = collections.Counter()
        host_n = collections.Counter()
        for plane in data.planes:
            if not plane.name.startswith("/host"):
                continue
            for line in plane.lines:
                if line.name == "python":
                    continue
                for e in line.events:
                    host[e.name[:80]] += e.duration_ns
                    host_n[e.name[:80]] += 1
        return {
            # one call's kernels and copies in launch order (name, microseconds)
            "sequence": sequence[: len(sequence) // calls],
            "host_top_ms": {
                k: [v / calls / 1e6, host_n[k] / calls] for k, v in host.most_common(40)
            },
            "kernels": kernels / calls,
            "d2h_copies": d2h / calls,
            "other_copies": other / calls,
            "kernel_ms": kernel_ns / calls / 1e6,
            "copy_names": dict(names.most_common(10)),
            "top_kernels_ms": {k: v / calls / 1e6 for k, v in by_time.most_common(15)},
            "device_lines": lines,
        }


def hlo_stats(fn, *args, dump: str | None = None) -> dict:
    text = fn.lower(*args).compile().as_text()
    if dump:
        Path(dump).write_text(text)
    return {
        "conditionals": text.count(" conditional("),
        "whiles": text.count(" while("),
        "fusions": text.count(" fusion("),
        "custom_calls": text.count(" custom-call("),
        "sorts": text.count(" sort("),
    }


def bench_point(b, v, kind, fns, reps, rng, profile: bool, loop: bool, dump=None) -> dict:
    logits = jnp.asarray(make_logits(kind, b, v, rng))
    hist = make_history(b, v, rng)
    pos = jnp.int32(3)
    full_rows = rows_for(FULL, b, v)
    cases = {
        "floor": (floor, (logits,)),
        "sort_chain": (sort_chain, (logits, full_rows, hist, pos)),
    }
    for var, fn in fns.items():
        cases[f"full/{var}"] = (fn, (logits, full_rows, hist, None, pos))
        for name, fields in ALONE.items():
            cases[f"{name}/{var}"] = (fn, (logits, rows_for(fields, b, v), hist, None, pos))
    t0 = time.perf_counter()
    for fn, args in cases.values():
        timed(fn, *args)
    compile_s = time.perf_counter() - t0
    call = {n: [] for n in cases}
    bursts = {n: [] for n in cases if n.startswith(("floor", "full", "sort", "neutral"))}
    for _ in range(reps):
        for n, (fn, args) in cases.items():
            call[n].append(timed(fn, *args))
        for n in bursts:
            bursts[n].append(burst(cases[n][0], *cases[n][1], calls=10))
    out = {"B": b, "V": v, "logits": kind, "compile_s": compile_s, "call": _stats(call)}
    out["burst"] = _stats(bursts)
    out["hlo"] = {
        var: hlo_stats(fn, logits, full_rows, hist, None, pos, dump=dump and f"{dump}_{var}.txt")
        for var, fn in fns.items()
    }
    if profile:
        out["profile"] = {"floor": profile_counts(floor, logits)}
        for var, fn in fns.items():
            out["profile"][f"full/{var}"] = profile_counts(fn, logits, full_rows, hist, None, pos)
    if loop:
        steps = 32
        progs = {"floor": (looped(floor_step, steps), (logits,))}
        for var in fns:
            branches, opts, form, bits, large = settings(var)
            prog = looped(with_branches(sampler_step, branches, form, bits, large), steps, opts)
            progs[f"full/{var}"] = (prog, (logits, full_rows, hist))
        for fn, args in progs.values():
            timed(fn, *args)
        lt = {n: [] for n in progs}
        for _ in range(max(3, reps // 3)):
            for n, (fn, args) in progs.items():
                lt[n].append(timed(fn, *args) / steps)
        out["loop"] = _stats(lt)
    return out


def bench_real_gpu(path: str, fns, reps: int, rng, save=None) -> list[dict]:
    """Each variant on real SmolLM2 logits (``scripts/real_logits.py --export-half``'s
    float16 dump, read as float32): B = 1 and 64 rows, bench_sampler's ``REAL`` parameter
    sets, ratio to the floor; where the second tier matters (top_p 0.95-0.99 at T = 1), which
    the synthetic logits never reach."""
    data = np.load(path).astype(np.float32)
    out = []
    for b in (1, 64):
        idx = rng.choice(data.shape[0], b, replace=False)
        logits = jnp.asarray(data[idx])
        v = logits.shape[1]
        hist = make_history(b, v, rng)
        pos = jnp.int32(3)
        cases = {"floor": (floor, (logits,))}
        cases["sort_chain"] = (sort_chain, (logits, rows_for(REAL["full_p95"], b, v), hist, pos))
        for var, fn in fns.items():
            for name, fields in REAL.items():
                cases[f"{name}/{var}"] = (fn, (logits, rows_for(fields, b, v), hist, None, pos))
        for fn, args in cases.values():
            timed(fn, *args)
        call = {n: [] for n in cases}
        bursts = {n: [] for n in cases if n.startswith(("floor", "full_p95/", "p95_t1/"))}
        for _ in range(reps):
            for n, (fn, args) in cases.items():
                call[n].append(timed(fn, *args))
            for n in bursts:
                bursts[n].append(burst(cases[n][0], *cases[n][1], calls=10))
        r = {"B": b, "V": v, "logits": "real", "call": _stats(call), "burst": _stats(bursts)}
        r["profile"] = {"floor": profile_counts(floor, logits)}
        for name in ("full_p95", "p95_t1", "neutral"):
            for var in fns:
                fn, args = cases[f"{name}/{var}"]
                r["profile"][f"{name}/{var}"] = profile_counts(fn, *args)
        med = r["call"]["median_ms"]
        print(
            f"real B={b}: floor {med['floor']:.3f} ms; "
            + ", ".join(f"{n} {t / med['floor']:.2f}x" for n, t in med.items() if n != "floor"),
            flush=True,
        )
        for n, p in r["profile"].items():
            print(
                f"    profile {n}: kernels {p['kernels']:.0f}, d2h {p['d2h_copies']:.1f}, "
                f"kernel time {p['kernel_ms']:.3f} ms",
                flush=True,
            )
        out.append(r)
        if save:
            save(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (written after every grid point)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no grid point after")
    ap.add_argument("--quick", action="store_true", help="one small point (a smoke test)")
    ap.add_argument(
        "--variants",
        default="auto,auto_count",
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    ap.add_argument("--profiled-only", action="store_true", help="the profiled B, V only")
    ap.add_argument(
        "--real",
        default=None,
        metavar="PATH",
        help="also time the variants on real logits (real_logits.py --export-half's file)",
    )
    ap.add_argument(
        "--dump-hlo", default=None, help="path prefix: the optimized HLO at the 2nd point"
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    fns = samplers(args.variants.split(","))
    grid = [
        (b, v, k) for b in (1, 64) for v in (49152, 128256, 262144) for k in ("realistic", "flat")
    ]
    # the profiled and looped points first, so a run cut short still has them
    grid = PROFILED + [g for g in grid if g not in PROFILED]
    if args.profiled_only:
        shapes = {(b, v) for b, v, _ in PROFILED}
        grid = [g for g in grid if (g[0], g[1]) in shapes]
    if args.quick:
        grid = [(2, 4096, "realistic")]
    rng = np.random.default_rng(0)
    meta = dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        variants={name: settings(name) for name in fns},
        reps=args.reps,
    )
    print(json.dumps(meta), flush=True)
    results = []
    real = []

    def save(real_now=None):
        if args.out:
            doc = dict(meta=meta, results=results, real=real_now or real)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")

    if args.real:  # first: it decides the plan, and a run cut short still has it
        try:
            real = bench_real_gpu(args.real, fns, args.reps, rng, save)
        except Exception as e:
            print("real: ERROR", repr(e)[:2000], flush=True)
            real = [{"error": repr(e)[:2000]}]
        save()
    for b, v, kind in grid:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget reached: skipped {b} {v} {kind}", flush=True)
            continue
        first = (b, v, kind) in PROFILED or args.quick
        loop = (b, v, kind) in PROFILED[:2] or args.quick
        dump = args.dump_hlo if (b, v, kind) == PROFILED[1] else None
        try:
            r = bench_point(b, v, kind, fns, args.reps, rng, first, loop, dump)
        except Exception as e:  # keep the other points
            r = {"B": b, "V": v, "logits": kind, "error": repr(e)[:2000]}
        results.append(r)
        report(r)
        save()
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)


def report(r: dict) -> None:
    if "error" in r:
        print(r["B"], r["V"], r["logits"], "ERROR", r["error"][:500], flush=True)
        return
    med = r["call"]["median_ms"]
    f = med["floor"]
    line = f"{r['B']:>3} {r['V']:>7} {r['logits']:>9} compile {r['compile_s']:.0f}s floor {f:.3f}"
    line += f" sort {med['sort_chain']:.3f}"
    for var in [k.split("/")[1] for k in med if k.startswith("full/")]:
        line += f" | {var}: full {med[f'full/{var}']:.3f} ({med[f'full/{var}'] / f:.2f}x)"
        line += f" neutral {med[f'neutral/{var}'] / f:.2f}x"
    print(line, flush=True)
    bm = r["burst"]["median_ms"]
    print("    burst ms/call: " + ", ".join(f"{n} {t:.3f}" for n, t in bm.items()), flush=True)
    print("    hlo: " + json.dumps(r["hlo"]), flush=True)
    for n, p in r.get("profile", {}).items():
        print(
            f"    profile {n}: kernels {p['kernels']:.0f}, d2h {p['d2h_copies']:.1f}, "
            f"other copies {p['other_copies']:.1f}, kernel time {p['kernel_ms']:.3f} ms",
            flush=True,
        )
    if "loop" in r:
        lm = r["loop"]["median_ms"]
        print("    loop ms/step: " + ", ".join(f"{n} {t:.4f}" for n, t in lm.items()), flush=True)


if __name__ == "__main__":
    main()
