"""The batch job's host side at scale: time and memory per request as the input grows.

    PYTHONPATH=. .venv/bin/python scripts/bench_batch_scale.py                # defaults, ~4 min
    PYTHONPATH=. .venv/bin/python scripts/bench_batch_scale.py --sizes 2000 10000 \\
        --fake-sizes 2000 20000 --resume-size 10000 --merge-sizes 2000 10000   # ~1 min

Tiny requests (a one-line chat, ``max_tokens`` 1-4) on a tiny random GGUF model
(tests/tiny_gguf.py: 2 layers, 269 tokens), so the device work per request is small and the
host's share shows. Each measurement runs in its own process (so RSS is its own):

- **job** (``--sizes``): ``run_job`` through the real engine (``load_engine``: the API's
  request building, the slot engine's host loop, the job's reader, journal and records).
  The engine is loaded and warmed up on a 64-line job first; then the peak RSS is reset
  (``/proc/self/clear_refs``) and the job runs. Reports µs per request, the job layer's
  parts per request, RSS growth over the run, and how many times each input line was
  parsed (``check_line``) and its key hashed (``shard_of``).
- **fake** (``--fake-sizes``): the same job with an engine that answers at once
  (tests/batch_helpers.FakeEngine), so only the job layer is timed, at larger sizes.
- **resume** (``--resume-size``): the job run of that size cut to its first ``--resume-at``
  (80%) of output lines and run again: the journal scan, the time before the engine gets
  its first request (hashing the input, the counting pass, skipping what is done), and the
  parses per input line.
- **merge** (``--merge-sizes``): ``--shards`` shards of a fake-engine job of that many
  lines, then ``merge_shards``: µs per record.

What matters on this shared, noisy machine is the ratio of the per-request time at the
largest size to the smallest (1.0: flat), not the absolute figures. Prints a table and
writes ``results/bench_batch_scale.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


# ------------------------------------------------------------------------------ inputs


def write_input(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 1 + i % 4,
            }
            line = {"custom_id": f"request-{i:08d}", "method": "POST"}
            f.write(json.dumps({**line, "url": "/v1/chat/completions", "body": body}) + "\n")


# ------------------------------------------------------------------------------ the child


def _status(name: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _Counters:
    """Counts input-line parses and key hashes of the job (patched into the reader)."""

    def __init__(self):
        import hashlib
        import types

        from jaxsample.batch import reader

        self.parses = self.hashes = 0
        check_line, sha256 = reader.check_line, hashlib.sha256

        def counted_check_line(*a, **k):
            self.parses += 1
            return check_line(*a, **k)

        def counted_sha256(*a, **k):
            self.hashes += 1
            return sha256(*a, **k)

        reader.check_line = counted_check_line
        reader.hashlib = types.SimpleNamespace(sha256=counted_sha256)


def _engine(spec: dict, cfg_cls):
    if spec["engine"] == "fake":
        sys.path.insert(0, TESTS)
        from batch_helpers import FakeEngine

        return FakeEngine(slots=spec["slots"])
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(spec["tmp"], "xla"))
    from jaxsample.batch import run_job
    from jaxsample.batch.job import load_engine

    warm = os.path.join(spec["tmp"], "warmup.jsonl")
    cfg = cfg_cls(input=warm, output=warm + f".out-{os.getpid()}", model=spec["model"])
    cfg.slots, cfg.progress = spec["slots"], False
    engine = load_engine(cfg)
    run_job(cfg, engine=engine)  # compiles (or loads from the cache) every program used
    return engine


class _Watch:
    """An engine proxy: when ``stream_requests`` was called and when it got its first
    request."""

    def __init__(self, engine):
        self.engine = engine
        self.called = self.first = None

    def stream_requests(self, items, *, job_seed=0):
        self.called = time.perf_counter()

        def watched():
            for item in items:
                if self.first is None:
                    self.first = time.perf_counter()
                yield item

        return self.engine.stream_requests(watched(), job_seed=job_seed)


def child(spec: dict) -> dict:
    import gc

    from jaxsample.batch import JobConfig, Journal, run_job

    row: dict = {}
    engine = None
    if spec["kind"] in ("job", "resume"):
        engine = _engine(spec, JobConfig)
    counters = _Counters()
    if spec["kind"] == "resume":  # the journal scan alone, on a copy of the cut output
        copy = spec["output"] + ".scan-copy"
        shutil.copyfile(spec["output"], copy)
        t0 = time.perf_counter()
        with Journal.open(copy) as j:
            row["journal_records"] = len(j.done)
        row["journal_scan_s"] = time.perf_counter() - t0
        os.remove(copy)
    if spec["kind"] == "merge":
        from jaxsample.batch.merge import merge_shards

        gc.collect()
        rss0, peak_ok = _status("VmRSS"), _reset_peak()
        t0 = time.perf_counter()
        summary = merge_shards(spec["output"], spec["shards"])
        row["seconds"] = time.perf_counter() - t0
        row.update(
            records=summary["lines"],
            us_per_record=1e6 * row["seconds"] / summary["lines"],
            output_mib=os.path.getsize(spec["output"]) / 2**20,
            rss_growth_mib=_status("VmHWM") - rss0 if peak_ok else None,
        )
        return row
    cfg = JobConfig(
        input=spec["input"],
        output=spec["output"],
        model=spec["model"],
        slots=spec["slots"],
        progress=False,
        shard=tuple(spec.get("shard", (0, 1))),
    )
    watch = _Watch(engine)
    stats0 = dict(engine.slot_engine().stats.as_dict()) if spec["engine"] == "tiny" else None
    gc.collect()
    rss0, peak_ok = _status("VmRSS"), _reset_peak()
    t0 = time.perf_counter()
    summary = run_job(cfg, engine=watch)
    seconds = time.perf_counter() - t0
    run = summary["this_run"]
    lines = summary["lines"]
    n = max(run["requests"], 1)
    parts = run["job_layer_seconds"]
    row.update(
        lines=lines,
        requests=run["requests"],
        skipped_done=run["skipped_done"],
        seconds=seconds,
        us_per_request=1e6 * seconds / n,
        job_layer_us_per_request={k: 1e6 * v / n for k, v in parts.items()},
        before_engine_s=(watch.called or t0) - t0,
        until_first_request_s=(watch.first or t0) - t0,
        parses_per_line=counters.parses / max(lines, 1),
        hashes_per_line=counters.hashes / max(lines, 1),
        rss_start_mib=rss0,
        rss_end_mib=_status("VmRSS"),
        rss_growth_mib=_status("VmHWM") - rss0 if peak_ok else None,
        complete=summary["complete"],
        fsyncs=run["fsyncs"],
    )
    if stats0 is not None:
        stats = engine.slot_engine().stats.as_dict()
        for k in ("prefill_s", "chunk_s", "host_s"):
            row[f"engine_{k[:-2]}_us_per_request"] = 1e6 * (stats[k] - stats0[k]) / n
        row["chunks"] = stats["chunks"] - stats0["chunks"]
    return row


# ------------------------------------------------------------------------------ the parent


def _run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"child failed ({spec['kind']}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fresh(path: str) -> None:
    for suffix in ("", ".manifest.json", ".summary.json", ".lock"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def _ratio(rows: list[dict], key: str) -> float | None:
    if len(rows) < 2 or not rows[0][key]:
        return None
    return rows[-1][key] / rows[0][key]


def _per_line(rows: list[dict]) -> float | None:
    if len(rows) < 2 or rows[0]["rss_growth_mib"] is None:
        return None
    a, b = rows[0], rows[-1]
    return 2**20 * (b["rss_growth_mib"] - a["rss_growth_mib"]) / (b["lines"] - a["lines"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000, 50000])
    p.add_argument("--fake-sizes", type=int, nargs="*", default=[2000, 20000, 100000])
    p.add_argument("--resume-size", type=int, default=None, help="default: the largest --sizes")
    p.add_argument("--resume-at", type=float, default=0.8)
    p.add_argument("--merge-sizes", type=int, nargs="*", default=[10000, 100000])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--tmp", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_batch_scale.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return

    tmp = args.tmp or tempfile.mkdtemp(prefix="bench_batch_scale-")
    os.makedirs(tmp, exist_ok=True)
    sys.path.insert(0, TESTS)
    from tiny_gguf import write_tiny_gguf

    model = os.path.join(tmp, "tiny.gguf")
    write_tiny_gguf(model)
    write_input(os.path.join(tmp, "warmup.jsonl"), 64)
    base = {"tmp": tmp, "model": model, "slots": args.slots}
    report: dict = {
        "command": " ".join(["scripts/bench_batch_scale.py"] + sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        "model": "tests/tiny_gguf.py (2 layers, dim 64, 269 tokens), slots "
        f"{args.slots}, requests of max_tokens 1-4",
    }

    def job_rows(sizes, engine):
        rows = []
        for n in sizes:
            inp = os.path.join(tmp, f"in{n}.jsonl")
            if not os.path.exists(inp):
                write_input(inp, n)
            out = os.path.join(tmp, f"{engine}{n}.out.jsonl")
            _fresh(out)
            spec = {**base, "kind": "job", "engine": engine, "input": inp, "output": out}
            row = {"n": n, **_run_child(spec)}
            print(f"  {engine} {n}: {row['us_per_request']:.0f} us/request", file=sys.stderr)
            rows.append(row)
        return rows

    print("job (tiny engine)", file=sys.stderr)
    report["job"] = job_rows(args.sizes, "tiny")
    print("job (fake engine)", file=sys.stderr)
    report["fake"] = job_rows(args.fake_sizes, "fake")

    resume_n = args.resume_size or (max(args.sizes) if args.sizes else None)
    if resume_n:
        print("resume", file=sys.stderr)
        inp = os.path.join(tmp, f"in{resume_n}.jsonl")
        full = os.path.join(tmp, f"tiny{resume_n}.out.jsonl")
        if not os.path.exists(full + ".summary.json"):
            report.setdefault("job_for_resume", job_rows([resume_n], "tiny"))
        out = os.path.join(tmp, f"resume{resume_n}.out.jsonl")
        _fresh(out)
        with open(full, "rb") as f:
            records = f.readlines()
        keep = int(len(records) * args.resume_at)
        with open(out, "wb") as f:
            f.writelines(records[:keep])
        shutil.copyfile(full + ".manifest.json", out + ".manifest.json")
        spec = {**base, "kind": "resume", "engine": "tiny", "input": inp, "output": out}
        row = {"n": resume_n, "done_before": keep, **_run_child(spec)}
        report["resume"] = row

    report["merge"] = []
    for n in args.merge_sizes:
        print(f"merge {n}", file=sys.stderr)
        inp = os.path.join(tmp, f"in{n}.jsonl")
        if not os.path.exists(inp):
            write_input(inp, n)
        out = os.path.join(tmp, f"merge{n}.out.jsonl")
        _fresh(out)
        for k in range(args.shards):
            spec = {**base, "kind": "job", "engine": "fake", "input": inp, "output": out}
            _run_child({**spec, "shard": [k, args.shards]})
        spec = {**base, "kind": "merge", "engine": "none", "output": out, "shards": args.shards}
        report["merge"].append({"n": n, "shards": args.shards, **_run_child(spec)})

    report["ratios"] = {
        "job_us_per_request_largest_over_smallest": _ratio(report["job"], "us_per_request"),
        "fake_us_per_request_largest_over_smallest": _ratio(report["fake"], "us_per_request"),
        "merge_us_per_record_largest_over_smallest": _ratio(report["merge"], "us_per_record"),
        # RSS growth over the run, per line, between the smallest and the largest size
        "fake_rss_bytes_per_line": _per_line(report["fake"]),
        "job_rss_bytes_per_line": _per_line(report["job"]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print_table(report)
    if args.tmp is None:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(r: dict) -> None:
    print(f"{r['command']}  ({r['machine']})")
    head = f"{'run':<12}{'lines':>8}{'s':>8}{'us/req':>8}{'layer us':>9}{'parse/ln':>9}"
    head += f"{'hash/ln':>8}{'RSS+ MiB':>9}"
    print(head)
    for kind in ("job", "fake"):
        for row in r[kind]:
            growth = row["rss_growth_mib"]
            print(
                f"{kind:<12}{row['lines']:>8}{row['seconds']:>8.2f}{row['us_per_request']:>8.0f}"
                f"{row['job_layer_us_per_request']['total']:>9.1f}{row['parses_per_line']:>9.2f}"
                f"{row['hashes_per_line']:>8.2f}"
                + (f"{growth:>9.1f}" if growth is not None else f"{'-':>9}")
            )
    if "resume" in r:
        x = r["resume"]
        print(
            f"resume {x['n']} after {x['done_before']} done: journal scan"
            f" {x['journal_scan_s']:.2f} s, engine called after {x['before_engine_s']:.2f} s,"
            f" first request after {x['until_first_request_s']:.2f} s; {x['requests']} requests"
            f" in {x['seconds']:.1f} s; {x['parses_per_line']:.2f} parses and"
            f" {x['hashes_per_line']:.2f} hashes per line"
        )
    for m in r["merge"]:
        print(
            f"merge {m['n']} lines of {m['shards']} shards ({m['output_mib']:.1f} MiB):"
            f" {m['seconds']:.2f} s, {m['us_per_record']:.1f} us/record"
        )
    print("ratios (largest / smallest size) and RSS bytes per line:")
    for k, v in r["ratios"].items():
        print(f"  {k}: {v:.2f}" if v is not None else f"  {k}: -")


if __name__ == "__main__":
    main()
