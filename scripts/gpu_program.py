"""The sampler's GPU program without a GPU: kernels, copies and branches of the common path.

XLA can compile for a GPU it does not have (deviceless compilation) from a description of the
device. This script compiles :func:`jaxsample.sampler.sample_rows` for an H100 that way and
counts, in the optimized program, what a call launches: the kernels (fusions, sorts, custom
calls), the device-to-device copies, and the batch-level branches (``conditional``; on a GPU
each one reads its predicate back to the host unless it sits in a CUDA graph). Per branch it
prints the kernels of each side, and it estimates the common path: the top level, the raw
log probabilities' branch that the parameters take, and the cheaper side of every other
branch (the rare stages: second tier, full vocabulary, exact race). A GPU's timings are the
real measure (scripts/bench_sampler_gpu.py); this is the count to cut between two GPU runs.

It needs JAX's CUDA plugin, which jaxsample itself does not: install it in a separate
environment (about 6 GB), matching the installed jax, and run from the project root::

    python3 -m venv /tmp/gpuvenv
    /tmp/gpuvenv/bin/pip install flax chex \\
        "jax[cuda12]==$(python3 -c 'import jax; print(jax.__version__)')"
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /tmp/gpuvenv/bin/python scripts/gpu_program.py \\
        --out results/gpu_program.json

(``JAX_SKIP_CUDA_CONSTRAINTS_CHECK`` lets the plugin load where no driver is installed.)
Without a GPU, XLA uses its fallback sort instead of CUB's (it warns): the sort kernels may
differ from a GPU's, the rest of the program does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("JAXSAMPLE_KERNELS", "xla")  # the CPU kernels have no place here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # jaxsample, not installed in that venv
from bench_sampler import ALONE, FULL, make_history, make_logits, rows_for  # noqa: E402
from bench_sampler_gpu import traced_with  # noqa: E402

from jaxsample import sampler as sm  # noqa: E402

#: An H100 SXM as XLA's GPU compiler sees it (public device properties).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

#: name: (sampler.BRANCHES, native.TOP_K_FORM, transforms.THRESHOLD_BITS: 2, what "auto"
#: picks on a GPU, unless named; the process's default backend here is the CPU[,
#: transforms.LARGE_TOP_K ("sort" when absent)])
VARIANTS = {
    "many": ("many", "sort", 2),
    "few": ("few", "sort", 2),
    "few_rank": ("few", "rank", 2),
    "one": ("one", "sort", 2),
    "one_rank": ("one", "rank", 2),
    "one_rank_bits4": ("one", "rank", 4),
    "one_rank_count": ("one", "rank", 2, "count"),
}
#: Not kernels: bookkeeping that launches nothing, and the branches and loops themselves.
NOT_KERNELS = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "conditional",
    "while",
}


def parse(text: str) -> tuple[dict, str]:
    """``({computation: [(opcode, line)]}, entry name)`` from an optimized HLO module."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            cur = head.group(2)
            comps[cur] = []
            entry = cur if head.group(1) else entry
        elif cur and line.startswith("  "):
            m = re.match(r"\s+(?:ROOT )?%?[\w.\-]+ = .+? ([a-z][\w-]*)\(", line)
            if m:
                comps[cur].append((m.group(1), line))
    return comps, entry


def _branches(line: str) -> list[str]:
    found = re.search(r"branch_computations=\{([^}]*)\}", line)
    if found:
        return [b.strip().lstrip("%") for b in found.group(1).split(",")]
    return [  # as lax.cond's branches: (false, true)
        re.search(r"false_computation=%?([\w.\-]+)", line).group(1),
        re.search(r"true_computation=%?([\w.\-]+)", line).group(1),
    ]


def _stage(line: str, sides: list, second_tier: int, mode: str, last: bool) -> str:
    """Which batch-level branch a top-level ``conditional`` is: under ``one``, its single
    switch (``final``: a common side per raw log probabilities' and kept mass's need, the
    rare stages last); the raw log probabilities' switch (three sides); under ``one`` before
    session 14, the rare stages (the ``last`` conditional, named for the second tier, which
    they start with: taken with it) or the kept mass; under
    ``few``, the full vocabulary (a loop inside), the second tier (its ``[B, second_tier]``
    candidates), else the exact race."""
    if mode == "one" and len(sides) > 3:
        return "final"
    if len(sides) == 3:
        return "raw"
    if mode == "one":
        return "tier2" if last else "mass"
    if any(s["common"]["loops"] or s["loops"] for s in sides):
        return "full"
    if re.search(rf"\[\d+,{second_tier}\]", line.split(" conditional(")[0]):
        return "tier2"
    return "exact"


def cost(
    comps: dict, name: str, taken: dict, second_tier: int, top: bool = True, mode: str = "few"
) -> dict:
    """Kernels, copies, branches and loops of one computation, its branches' own (each side
    separately), and the common path: the side of each top-level branch that ``taken`` says
    (``{"raw": 0, 1 or 2, "tier2": bool, "full": bool, "exact": bool}``; a two-sided branch's
    sides are (skip, run)); inside a branch, the cheaper side of each nested branch."""
    ops = comps[name]
    own = Counter(op for op, _ in ops if op not in NOT_KERNELS)
    out = {
        "kernels": sum(n for op, n in own.items() if op != "copy"),
        "copies": own.get("copy", 0),
        "ops": dict(own),
        "branches": [],
        "loops": [],
    }
    common = {"kernels": out["kernels"], "copies": out["copies"], "conditionals": 0, "loops": 0}
    last = max((i for i, (op, _) in enumerate(ops) if op == "conditional"), default=-1)
    for i, (op, line) in enumerate(ops):
        if op == "conditional":
            sides = [cost(comps, b, taken, second_tier, False, mode) for b in _branches(line)]
            named = top and mode != "many"
            stage = _stage(line, sides, second_tier, mode, i == last) if named else None
            out["branches"].append((stage, [s["common"] for s in sides]))
            if stage is None:
                pick = min(sides, key=lambda s: s["common"]["kernels"])
            elif stage == "final":  # the common sides: (raw, mass) in order, then rare
                rare = len(sides) - 1
                pick = sides[rare if taken["tier2"] else 2 * taken["raw"] + int(taken["mass"])]
            else:
                pick = sides[int(taken[stage])]
            common["conditionals"] += 1
            for key in common:
                common[key] += pick["common"][key]
        elif op == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            out["loops"].append(cost(comps, body, taken, second_tier, False, mode)["common"])
            common["loops"] += 1
    out["common"] = common
    return out


def taken_stages(b: int, v: int, params: dict) -> dict:
    """The plan's rare stages on realistic logits (run on the CPU): which the common path
    takes."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(make_logits("realistic", b, v, rng))
    rows = rows_for(params, b, v)
    hist = make_history(b, v, rng)
    keys = jax.vmap(sm.row_key)(rows, jnp.full((b,), 3, jnp.int32))
    run = jax.jit(lambda *a: sm.distributions(*a, None, keys=keys, for_sampling=True)[1])
    plan = run(logits, rows, hist)
    return {
        "raw": int(plan.raw),
        "mass": bool(params.get("logprobs") and params.get("processed_logprobs")),
        "tier2": bool(plan.tier2),
        "full": bool(plan.full),
        "exact": False,  # an uncertified fast race: rare (tests/test_distribution.py)
    }


def program(variant: str, b: int, v: int, params: dict, topology) -> dict:
    branches, form, bits, large = (*VARIANTS[variant], "sort")[:4]
    with traced_with(branches, form, bits, large):
        sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])

        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

        rows = rows_for(params, b, v)
        hist = make_history(b, v, np.random.default_rng(0))
        logits = jax.ShapeDtypeStruct((b, v), jnp.float32, sharding=sharding)

        def fn(lg, r, h):  # a new function per variant: traced afresh
            return sm.sample_rows(lg, r, h, None, jnp.int32(3))

        t0 = time.perf_counter()
        text = (
            jax.jit(fn)
            .lower(logits, jax.tree.map(spec, rows), jax.tree.map(spec, hist))
            .compile()
            .as_text()
        )
        compile_s = time.perf_counter() - t0
    comps, entry = parse(text)
    taken = taken_stages(b, v, params)
    top = cost(comps, entry, taken, min(sm.SECOND_TIER, v), mode=branches)
    return {
        "taken": taken,
        "common": top["common"],
        "top_level_kernels": top["kernels"],
        "branches": top["branches"],
        "totals": {
            "fusions": text.count(" fusion("),
            "sorts": text.count(" sort("),
            "conditionals": text.count(" conditional("),
            "whiles": text.count(" while("),
            "custom_calls": text.count(" custom-call("),
        },
        "compile_s": compile_s,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--variants", default="few,few_rank,one,one_rank")
    ap.add_argument(
        "--params",
        default="full,neutral,top_p,top_logprobs",
        help="FULL and bench_sampler's ALONE",
    )
    ap.add_argument("--points", default="1x49152,64x128256,64x262144", help="BxV, comma-separated")
    args = ap.parse_args()
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
    results = []
    for point in args.points.split(","):
        b, v = (int(n) for n in point.split("x"))
        for pname in args.params.split(","):
            params = FULL if pname == "full" else ALONE[pname]
            for variant in args.variants.split(","):
                r = program(variant, b, v, params, topology)
                r.update(B=b, V=v, params=pname, variant=variant)
                results.append(r)
                c = r["common"]
                print(
                    f"{b:>3} {v:>7} {pname:>8} {variant:>10}: common path"
                    f" {c['kernels']:>3} kernels,"
                    f" {c['copies']:>2} copies, {c['conditionals']} branches, {c['loops']} loops"
                    f" | top level {r['top_level_kernels']}, branches "
                    + " ".join(
                        f"{stage}[" + "|".join(str(s["kernels"]) for s in sides) + "]"
                        for stage, sides in r["branches"]
                    )
                    + f" | totals {r['totals']}",
                    flush=True,
                )
    meta = dict(jax=jax.__version__, device="H100 (deviceless)", variants=VARIANTS)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
