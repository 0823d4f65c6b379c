"""Start-up of ``jaxsample generate`` (the README's first command) in fresh processes.

Each run is a new process, ``jaxsample generate --prompt ... --seed 0`` with the default
model, timed from start to exit. Three states of the caches, each in its own fresh folders
(``$JAXSAMPLE_CACHE`` for the kernels, tables and kept programs, ``$JAXSAMPLE_MODEL_DIR``
for XLA's compilation cache), so nothing from another run or the user's cache is read:

* ``cold``: empty folders (the first run on a machine: builds the CPU kernels, the JSON
  tables, traces and compiles the decode loop);
* ``warm``: the same folders after a first run (XLA's cache and the kept programs);
* ``warm, programs off``: the same, with ``JAXSAMPLE_PROGRAM_CACHE=0`` (XLA's cache only:
  the decode loop traced and lowered again, as before session 16), after one untimed run
  that puts its own programs in XLA's cache.

``warm`` and ``warm, programs off`` alternate for ``--rounds`` rounds (the machine is
noisy); the table gives medians and the ratio. Writes ``results/bench_startup_cpu.json``::

    PYTHONPATH=. .venv/bin/python scripts/bench_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [
    "generate",
    "--prompt",
    "What is the capital of France?",
    "--temperature",
    "0.7",
    "--top-p",
    "0.9",
    "--seed",
    "0",
]


def run_once(folder: Path, *, programs: bool) -> tuple[float, str]:
    env = dict(
        os.environ,
        JAXSAMPLE_CACHE=str(folder / "cache"),
        JAXSAMPLE_MODEL_DIR=str(folder / "model"),
        JAX_PLATFORMS="cpu",
    )
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if not programs:
        env["JAXSAMPLE_PROGRAM_CACHE"] = "0"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsample.cli", *COMMAND],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - start, proc.stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_startup_cpu.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cold, answer = run_once(folder, programs=True)
        print(f"cold: {cold:.1f} s  ({answer!r})", flush=True)
        # XLA's cache holds the kept programs' executables now; the plain jit's programs
        # (the same computation, lowered from a trace) are other entries: fill them too
        first_off, _ = run_once(folder, programs=False)
        print(f"first run with programs off (compiles its entries): {first_off:.1f} s", flush=True)
        times: dict[str, list[float]] = {"warm": [], "warm, programs off": []}
        answers = {answer}
        for r in range(args.rounds):
            for name in times:
                seconds, text = run_once(folder, programs=name == "warm")
                times[name].append(seconds)
                answers.add(text)
                print(f"round {r}: {name}: {seconds:.1f} s", flush=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    med = {k: median(v) for k, v in times.items()}
    print()
    print("| caches | seconds (median) | runs |")
    print("|---|---|---|")
    print(f"| cold (empty) | {cold:.1f} | 1 |")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.1f} | {len(v)} |")
    ratio = med["warm, programs off"] / med["warm"]
    same = len(answers) == 1
    print(f"\nwarm without kept programs / with: {ratio:.2f}x; answers identical: {same}")
    result = {
        "command": "jaxsample " + " ".join(COMMAND),
        "cold_s": cold,
        "first_programs_off_s": first_off,
        "times_s": times,
        "median_s": med,
        "programs_off_over_on": ratio,
        "answers": sorted(answers),
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count()},
        "load_average": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
