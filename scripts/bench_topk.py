"""Benchmark of jaxsample's CPU top-k kernel against XLA's TopK on the sampler's shapes.

Each case is one jitted call of ``lax.top_k`` and of ``jaxsample.native.top_k`` on the same
standard-normal float32 ``[B, n]`` array (the results are checked equal bit for bit first);
round-robin repetitions in one process, medians and the ratio XLA / kernel. The shapes are
the sampler's at V = 49152: the candidates' two stages (64 or 128 of 1536 block maxima, of
2048 or 4096 gathered logits), the raw top 20 (of 1536, of 640), the second tier (1024 of
49152, 16 rows gathered or all 64), and one row.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/bench_topk.py     # ~1 minute; results/bench_topk_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsample import native

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampler import machine_meta, timed  # noqa: E402

CASES = [  # (B, n, k)
    (64, 1536, 64),
    (64, 2048, 64),
    (64, 1536, 128),
    (64, 4096, 128),
    (64, 1536, 20),
    (64, 640, 20),
    (16, 49152, 1024),
    (64, 49152, 1024),
    (1, 1536, 64),
    (1, 49152, 1024),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", default="results/bench_topk_cpu.json")
    args = ap.parse_args()
    state = native.status()
    if not state["native"]:
        raise SystemExit(f"the kernel is off: {state['reason']}")
    rng = np.random.default_rng(0)
    results = []
    print(f"{'B':>3} {'n':>6} {'k':>5} {'xla ms':>8} {'kernel ms':>10} {'xla/kernel':>11}")
    for b, n, k in CASES:
        x = jnp.asarray(rng.standard_normal((b, n)).astype(np.float32))
        xla = jax.jit(lambda x, k=k: lax.top_k(x, k))
        ours = jax.jit(lambda x, k=k: native.top_k(x, k))
        a, c = xla(x), ours(x)
        assert np.array_equal(np.asarray(a[1]), np.asarray(c[1]))
        assert np.array_equal(np.asarray(a[0]).view(np.int32), np.asarray(c[0]).view(np.int32))
        times = {"xla": [], "kernel": []}
        for _ in range(args.reps):
            times["xla"].append(timed(xla, x))
            times["kernel"].append(timed(ours, x))
        med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
        results.append(dict(B=b, n=n, k=k, median_ms=med, ratio=med["xla"] / med["kernel"]))
        print(
            f"{b:>3} {n:>6} {k:>5} {med['xla']:>8.3f} {med['kernel']:>10.3f} "
            f"{med['xla'] / med['kernel']:>11.2f}",
            flush=True,
        )
    meta = dict(**machine_meta(), reps=args.reps, native=state)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
