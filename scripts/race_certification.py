"""How often the fast full-vocabulary race certifies its token (docs/sampler.md, step 6).

A row whose kept set the candidates cannot resolve draws by the race over the whole
vocabulary; the fast race scores the candidates and the blocks whose bound can win, and
certifies its token unless some other block's bound reaches the best score (the row then runs
the exact race). This prints the certified share on three kinds of logits, with no filter
(every token kept, the case where the race covers the most tokens):

* "realistic" and "flat" rows of scripts/bench_sampler.py (V = 128256);
* real SmolLM2-135M logits from scripts/real_logits.py's dump (V = 49152).

Usage::

    PYTHONPATH=. .venv/bin/python scripts/race_certification.py

Writes ``results/race_certification.json``. A few minutes on 2 cores (the first run also
dumps the real logits).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_sampler import make_logits  # noqa: E402
from real_logits import load_real_logits  # noqa: E402

from jaxsample import sampler as sm  # noqa: E402
from jaxsample import transforms as tf  # noqa: E402


def certified_share(logits: np.ndarray, temperatures, keys_per_row: int = 32) -> float:
    """The share of (row, temperature, key) draws whose fast race is certified."""
    out = []
    for t in temperatures:

        @jax.jit
        def certified(z, words, t=t):
            z = z / t
            values, ids = tf.top_candidates(z, sm.NUM_CANDIDATES)
            zb = tf.block_max(z)

            def one(w):
                return sm._race_full_fast(z, values[0], -jnp.inf, 0.0, ids, values, zb, w)[1]

            return jax.vmap(one)(words)

        for i in range(logits.shape[0]):
            words = jax.random.bits(jax.random.key(i), (keys_per_row, 2), jnp.uint32)
            out.append(np.asarray(certified(jnp.asarray(logits[i]), words)))
    return float(np.mean(np.concatenate(out)))


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/race_certification.json", help="JSON path")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    real = load_real_logits()
    idx = np.random.default_rng(0).choice(real.shape[0], 32, replace=False)
    cases = {
        "realistic V=128256, T 0.7/1.0": (make_logits("realistic", 16, 128256, rng), (0.7, 1.0)),
        "flat V=128256, T 1.0": (make_logits("flat", 16, 128256, rng), (1.0,)),
        "real SmolLM2 V=49152, T 0.7/1.0": (real[idx], (0.7, 1.0)),
    }
    results = {}
    for name, (logits, temps) in cases.items():
        results[name] = certified_share(logits, temps)
        print(f"{name:34s} certified {results[name]:.4f}")
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"race_blocks": sm.RACE_BLOCKS, "certified": results}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
