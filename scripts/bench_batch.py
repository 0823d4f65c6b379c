"""The batch job end to end: ``jaxsample batch`` on a mixed workload, against the engine alone.

    PYTHONPATH=. .venv/bin/python scripts/bench_batch.py  # 200 requests, 1 and 4 devices
    PYTHONPATH=. .venv/bin/python scripts/bench_batch.py --quick  # 16 short requests
    PYTHONPATH=. .venv/bin/python scripts/bench_batch.py --scale-only  # memory of 1k vs 100k lines

In one run, for each device count (4 simulated CPU devices through
``XLA_FLAGS=--xla_force_host_platform_device_count=4``):

- a warm-up ``jaxsample batch`` run fills XLA's persistent compile cache (not timed), so the
  two timed runs below load the same compiled programs;
- **engine alone** (the baseline): the same request bodies, already parsed in memory, through
  ``stream_chat`` with no file read or written;
- **jaxsample batch**: the command as a user runs it (a subprocess), timed from outside, and
  its summary's own counters: requests/s, tokens/s, and the job layer (reading and checking
  lines, building records, writing and fsync) as a share of the run; goal under 2%.

The workload (as the slot-engine benchmark's): chat requests with prompts of 1 to 12
sentences, ``max_tokens`` drawn from an exponential distribution of mean 64 capped at 256,
end-of-sequence banned (``logit_bias``) so every request makes exactly its ``max_tokens``,
temperature 0.8, a third with their own seed; plus 2% bad lines (they cost the job layer, not
the engine).

The memory figure: peak RSS of a process running the job over 1,000 and over 100,000 lines
with a fake engine (instant answers: tests/batch_helpers.FakeEngine), so only the job layer is
measured. Writes ``results/bench_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    "Tell me about the history of the printing press.",
    "Keep the answer short.",
    "Use simple words.",
    "Mention at least one date.",
    "Explain why it mattered.",
    "Give an example from everyday life.",
    "Avoid lists.",
    "Write in the present tense.",
    "End with a question.",
    "Compare it with something modern.",
    "Name a person involved.",
    "Say what came before it.",
]


def workload(n: int, *, mean: float, cap: int, eos_id: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        k = rng.randint(1, len(SENTENCES))
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": " ".join(SENTENCES[:k])}],
            "max_tokens": max(1, min(cap, round(rng.expovariate(1 / mean)))),
            "temperature": 0.8,
            "logit_bias": {str(eos_id): -100},
        }
        if i % 3 == 0:
            body["seed"] = i
        line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions"}
        lines.append(json.dumps({**line, "body": body}))
    for j in range(max(1, n // 50)):  # 2% bad lines
        lines.insert(rng.randrange(len(lines)), "{not json" if j % 2 else '{"custom_id": 1}')
    return lines


def _env(devices: int) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _batch(inp: str, out: str, args, devices: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "jaxsample.cli", "batch", inp, "--output", out]
    cmd += ["--slots", str(args.slots), "--no-progress"]
    if devices > 1:
        cmd += ["--devices", str(devices)]
    if args.model:
        cmd += ["--model", args.model]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(devices), cwd=ROOT, capture_output=True)
    wall = time.perf_counter() - t0
    with open(out + ".summary.json") as f:
        return wall, json.load(f)


def engine_only(inp: str, slots: int, model: str | None, devices: int) -> dict:
    """(in a subprocess) stream_chat over the parsed bodies: no file read or written."""
    from jaxsample.batch.job import JobConfig, load_engine
    from jaxsample.batch.reader import read_lines
    from jaxsample.engine.programs import use_compile_cache

    use_compile_cache()
    bodies = [(ln.key, ln.body) for ln in read_lines(inp) if ln.body is not None]
    cfg = JobConfig(input=inp, output="", model=model, slots=slots, devices=devices)
    engine = load_engine(cfg)
    t0 = time.perf_counter()
    tokens = n = 0
    for _, res in engine.stream_chat(bodies, job_seed=0):
        n += 1
        tokens += (res.get("usage") or {}).get("completion_tokens", 0)
    seconds = time.perf_counter() - t0
    return {"requests": n, "seconds": seconds, "tokens": tokens}


def _engine_only(inp: str, args, devices: int) -> dict:
    cmd = [sys.executable, __file__, "--engine-only", inp, "--slots", str(args.slots)]
    cmd += ["--devices", str(devices)] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, check=True, env=_env(devices), cwd=ROOT, capture_output=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


_SCALE = """
import json, sys
sys.path.insert(0, "tests")
from batch_helpers import FakeEngine
from jaxsample.batch import JobConfig, run_job

def status(name):
    return [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith(name)][0]

inp, out = sys.argv[1], sys.argv[2]
open(out + ".model", "wb").write(b"m")
start = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) after the imports
s = run_job(JobConfig(input=inp, output=out, model=out + ".model", progress=False),
            engine=FakeEngine(slots=16))
print(json.dumps({"rss_start_mib": start, "rss_peak_mib": status("VmHWM"),
                  "seconds": s["this_run"]["total_seconds"], "complete": s["complete"],
                  "job_layer_seconds": s["this_run"]["job_layer_seconds"]["total"]}))
"""


def scale(tmp: str, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        inp = os.path.join(tmp, f"scale{n}.jsonl")
        with open(inp, "w") as f:
            for i in range(n):
                body = {"messages": [{"role": "user", "content": f"question {i} " * 20}]}
                line = {"custom_id": f"request-{i:08d}", "method": "POST"}
                f.write(json.dumps({**line, "url": "/v1/chat/completions", "body": body}) + "\n")
        out = os.path.join(tmp, f"scale{n}.out.jsonl")
        cmd = [sys.executable, "-c", _SCALE, inp, out]
        res = subprocess.run(cmd, check=True, env=_env(1), cwd=ROOT, capture_output=True)
        row = json.loads(res.stdout.decode().strip().splitlines()[-1])
        row.update(lines=n, input_mib=os.path.getsize(inp) / 2**20)
        row["output_mib"] = os.path.getsize(out) / 2**20
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--mean-tokens", type=float, default=64)
    p.add_argument("--cap", type=int, default=256)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true", help="16 requests of mean 8 tokens")
    p.add_argument("--scale-lines", type=int, default=100_000)
    p.add_argument("--scale-only", action="store_true")
    p.add_argument("--no-warmup", action="store_true", help="the compile cache is warm already")
    p.add_argument("--no-scale", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_batch.json"))
    p.add_argument("--engine-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine_only:
        print(json.dumps(engine_only(args.engine_only, args.slots, args.model, args.devices[0])))
        return
    if args.quick:
        args.requests, args.mean_tokens, args.cap = 16, 8, 16
        args.scale_lines = min(args.scale_lines, 10_000)
    from jaxsample.model import default_model_path
    from jaxsample.model.gguf_file import read_gguf
    from jaxsample.model.tokenizer import Tokenizer

    eos = Tokenizer.from_gguf(read_gguf(args.model or default_model_path())).eos_id
    report = {
        "command": " ".join(sys.argv),
        "workload": {
            "requests": args.requests,
            "mean_tokens": args.mean_tokens,
            "cap": args.cap,
            "slots": args.slots,
        },
        "runs": [],
    }
    tmp = tempfile.mkdtemp(prefix="bench_batch_")
    inp = os.path.join(tmp, "in.jsonl")
    with open(inp, "w") as f:
        f.writelines(
            line + "\n"
            for line in workload(args.requests, mean=args.mean_tokens, cap=args.cap, eos_id=eos)
        )
    print(f"{'devices':>7} {'run':>14} {'req/s':>8} {'tok/s':>8} {'wall s':>8} {'job layer':>10}")
    for d in [] if args.scale_only else args.devices:
        if not args.no_warmup:  # fills the compile cache
            _batch(inp, os.path.join(tmp, f"warm{d}.jsonl"), args, d)
        base = _engine_only(inp, args, d)
        wall, s = _batch(inp, os.path.join(tmp, f"out{d}.jsonl"), args, d)
        run = s["this_run"]
        row = {
            "devices": d,
            "engine_only": {
                "requests_per_s": base["requests"] / base["seconds"],
                "tokens_per_s": base["tokens"] / base["seconds"],
                "seconds": base["seconds"],
            },
            "batch": {
                "requests_per_s": run["requests_per_s"],
                "tokens_per_s": run["tokens_per_s"],
                "seconds": run["seconds"],
                "wall_seconds_with_start": wall,
                "job_layer_seconds": run["job_layer_seconds"],
                "job_layer_share": run["job_layer_share"],
                "fsyncs": run["fsyncs"],
            },
        }
        row["batch_vs_engine_only_tokens_per_s"] = (
            row["batch"]["tokens_per_s"] / row["engine_only"]["tokens_per_s"]
        )
        report["runs"].append(row)
        e, b = row["engine_only"], row["batch"]
        print(
            f"{d:>7} {'engine alone':>14} {e['requests_per_s']:8.2f} {e['tokens_per_s']:8.1f} "
            f"{e['seconds']:8.1f} {'-':>10}"
        )
        print(
            f"{d:>7} {'jaxsample batch':>14} {b['requests_per_s']:8.2f} "
            f"{b['tokens_per_s']:8.1f} {b['seconds']:8.1f} {100 * b['job_layer_share']:9.3f}%"
        )
    if not args.no_scale:
        sizes = sorted({1000, args.scale_lines})
        report["scale"] = scale(tmp, sizes)
        print(
            f"\n{'lines':>8} {'input MiB':>10} {'RSS before MiB':>15} {'peak RSS MiB':>13} "
            f"{'seconds':>8} {'job layer us/line':>18}"
        )
        for r in report["scale"]:
            print(
                f"{r['lines']:>8} {r['input_mib']:>10.1f} {r['rss_start_mib']:>15.1f} "
                f"{r['rss_peak_mib']:>13.1f} {r['seconds']:>8.1f} "
                f"{1e6 * r['job_layer_seconds'] / r['lines']:>18.1f}"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
