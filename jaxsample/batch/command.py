"""The ``jaxsample batch`` and ``jaxsample batch-merge`` subcommands (wired in jaxsample.cli).

    jaxsample batch requests.jsonl --output results.jsonl [--model FILE] [--slots 16]
    jaxsample batch-merge results.jsonl --shards 4

Exit status: 0 when the output is complete (error records included: they are results),
1 when the job is refused (manifest, journal, another run holding the output's lock), fails
(a full disk, jax.distributed that cannot start) or is left incomplete, 2 for bad flags or
paths (nothing is written then), 130 after Ctrl-C and 143 after SIGTERM (what was written is
kept and synced; the same command resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator

from jaxsample.cli import UsageError, add_engine_flags, positive_int

_ENV = {
    "coordinator_address": "JAXSAMPLE_COORDINATOR_ADDRESS",
    "num_processes": "JAXSAMPLE_NUM_PROCESSES",
    "process_id": "JAXSAMPLE_PROCESS_ID",
}


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0")
    return value


def add_parsers(sub) -> None:
    """Adds ``batch`` and ``batch-merge`` to the ``jaxsample`` subparsers.

    The distributed flags default to their environment variables as strings, so argparse
    checks those with the flag's type too (a bad value is a usage error, exit status 2)."""
    b = sub.add_parser(
        "batch",
        help="run an OpenAI Batch JSONL file (resumable)",
        description="Run every request of an OpenAI Batch input file (JSONL) and write one "
        "OpenAI Batch output line per input line. Killed and restarted with the same "
        "command, it resumes where it stopped. See docs/batch.md.",
    )
    b.add_argument("input", help="the input JSONL file (OpenAI Batch request lines)")
    b.add_argument("--output", "-o", required=True, help="the output JSONL file")
    add_engine_flags(b)  # --model, --dtype, --max-seq-len, --job-seed
    b.add_argument("--slots", type=positive_int, default=16, help="requests decoded at once")
    b.add_argument(
        "--chunk-steps", type=positive_int, default=32, help="decode steps between host refills"
    )
    b.add_argument(
        "--devices", type=positive_int, default=None, help="local devices to use (default: all)"
    )
    b.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)",
    )
    b.add_argument(
        "--sync-lines", type=positive_int, default=256, help="fsync after this many lines"
    )
    b.add_argument("--sync-seconds", type=float, default=1.0, help="or after this many seconds")
    dist = b.add_argument_group(
        "several hosts (jax.distributed); each process writes OUTPUT.shard-K-of-N"
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (on a TPU pod slice it finds its peers)",
    )
    dist.add_argument(
        "--coordinator-address",
        default=os.environ.get(_ENV["coordinator_address"]),
        help="HOST:PORT of process 0 (env JAXSAMPLE_COORDINATOR_ADDRESS): join the processes "
        "with jax.distributed; without it --num-processes and --process-id make independent "
        "processes",
    )
    dist.add_argument(
        "--num-processes",
        type=positive_int,
        default=os.environ.get(_ENV["num_processes"]) or None,
        help="number of processes (env JAXSAMPLE_NUM_PROCESSES)",
    )
    dist.add_argument(
        "--process-id",
        type=_non_negative,
        default=os.environ.get(_ENV["process_id"]) or None,
        help="this process, 0..N-1 (env JAXSAMPLE_PROCESS_ID)",
    )
    dist.add_argument(
        "--merge-timeout",
        type=float,
        default=3600.0,
        help="seconds process 0 waits for the other shards before merging",
    )
    b.add_argument("--no-compile-cache", action="store_true", help="no XLA cache on disk")

    m = sub.add_parser(
        "batch-merge",
        help="join the output shards of a multi-process batch job",
        description="Join OUTPUT.shard-K-of-N (every shard complete) into OUTPUT.",
    )
    m.add_argument("output", help="the --output the batch job was given")
    m.add_argument("--shards", type=positive_int, required=True, help="N, the number of shards")


def _check_paths(args) -> None:
    """Refuses (UsageError) an input, output or model path the job could not use, before
    anything is written: the job would otherwise fail part way, after writing its manifest."""
    if not os.path.isfile(args.input):
        if os.path.exists(args.input):  # a pipe, /dev/stdin, a directory
            raise UsageError(
                f"{args.input} is not a regular file: the job hashes the input and reads it "
                "again to resume, so it needs a file (save the requests to one first)"
            )
        raise UsageError(f"no input file {args.input}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {args.output}: no directory {folder}")
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is a directory; give a file path")
    if args.model is not None:
        from jaxsample.model import ModelFileError, check_gguf_file

        if not os.path.isfile(args.model):
            raise UsageError(f"--model {args.model}: No such file")
        try:
            check_gguf_file(args.model)  # the header and tensor extents, not the weights
        except ModelFileError as err:
            raise UsageError(str(err)) from None
        if args.max_seq_len is not None:
            _check_max_seq_len(args.max_seq_len, args.model)


def _check_max_seq_len(value: int, model: str) -> None:
    """Refuses a ``--max-seq-len`` above the model's context: no request can use those
    positions, yet every slot's KV cache would hold them (a large value ran out of memory
    deep inside XLA). Reads the file's metadata, not its weights."""
    from jaxsample.model import ModelFileError, read_gguf
    from jaxsample.model.config import LlamaConfig

    try:
        meta = read_gguf(model).metadata
        context = LlamaConfig.from_gguf_metadata(meta, tie_embeddings=True).context_length
    except ModelFileError as err:
        raise UsageError(f"--model {model}: {err}") from None
    if value > context:
        raise UsageError(
            f"--max-seq-len {value}: must lie in [1, {context}], the context length of {model}"
        )


def _check_devices(args) -> None:
    """Refuses ``--devices`` beyond this process's devices, or ``--slots`` that they do not
    divide, before anything is written (after jax.distributed, which must come first)."""
    from jaxsample.batch.job import JobError, job_devices

    try:
        job_devices(args.devices, args.slots)
    except JobError as err:
        raise UsageError(str(err)) from None


def _shard(args) -> tuple[int, int]:
    """Returns (process index, process count); initialises jax.distributed when asked
    (``--distributed``, or ``--coordinator-address``).

    ``--num-processes N --process-id K`` alone make independent processes: the split of the
    input needs nothing from JAX, and without its coordination service one process stopping
    (a preempted host) does not abort the others, and it can be restarted alone (a process
    that rejoins a running jax.distributed job aborts every process).

    The flags are checked first (UsageError), so a bad combination never reaches jax."""
    explicit = args.coordinator_address or args.num_processes or args.process_id is not None
    if not (args.distributed or explicit):
        return 0, 1
    k, n = args.process_id, args.num_processes
    if explicit and not args.distributed:
        needed = [("--num-processes", n), ("--process-id", k)]
        if args.coordinator_address:
            needed.insert(0, ("--coordinator-address", args.coordinator_address))
        missing = [flag for flag, value in needed if value is None]
        if missing:
            raise UsageError(f"several hosts need {', '.join(missing)} too")
    if k is not None and n is not None and k >= n:
        raise UsageError(f"--process-id {k}: must lie in [0, {n}) for --num-processes {n}")
    if not (args.distributed or args.coordinator_address):
        return k, n  # independent processes
    import jax

    # None for any of them: jax finds it itself (TPU pod slices, SLURM, ...)
    try:
        jax.distributed.initialize(
            args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
        )
    except ValueError as err:  # nothing to find the peers with: the flags are missing
        raise UsageError(
            f"--distributed: jax.distributed.initialize found no cluster ({err}); outside a "
            "TPU pod slice or SLURM give --coordinator-address, --num-processes and "
            "--process-id"
        ) from None
    except Exception as err:  # the coordinator never answered, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistributedError(
            f"jax.distributed.initialize failed (coordinator "
            f"{args.coordinator_address or 'found by jax'}): {first[:300]}"
        ) from None
    return jax.process_index(), jax.process_count()


class DistributedError(RuntimeError):
    """jax.distributed could not start (exit status 1)."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (a preemption, ``kill``, a scheduler's stop), raised where the job is, as
    Ctrl-C raises KeyboardInterrupt: what was written is kept and synced."""


def _on_sigterm(signum, frame):
    raise Stopped()


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` inside the block (the default would end the process
    at once: no fsync of the last records, no message, exit status -15)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failure(err: Exception, out: str) -> str:
    """The one-line message of an unexpected failure of the job; the traceback goes to
    ``OUT.error.log`` (a bug report needs it, an operator's terminal does not)."""
    import traceback

    log = out + ".error.log"
    try:
        with open(log, "w", encoding="utf-8") as f:
            traceback.print_exception(err, file=f)
    except OSError:
        log = None
    first = (str(err).strip().splitlines() or [""])[0][:300]
    hint = ""
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
        hint = (
            " (out of memory: run again with fewer --slots or a smaller --max-seq-len; a "
            "resume may change --slots)"
        )
    where = f"; traceback in {log}" if log else ""
    return (
        f"the job failed: {type(err).__name__}: {first}{hint}; what was written to {out} is "
        f"kept: run again to resume{where}"
    )


def run(args) -> int:
    """Runs ``batch`` or ``batch-merge`` from parsed arguments; returns the exit status."""
    try:
        with _sigterm_stops():
            return _run(args)
    except KeyboardInterrupt as err:
        sig = "SIGTERM" if isinstance(err, Stopped) else "Ctrl-C"
        what = "batch-merge" if args.command == "batch-merge" else "batch"
        again = (
            "run it again"
            if what == "batch-merge"
            else f"what was written to {args.output} is kept: run the same command again to resume"
        )
        print(f"\njaxsample {what}: stopped by {sig}; {again}", file=sys.stderr)
        return 143 if isinstance(err, Stopped) else 130


def _run(args) -> int:
    from jaxsample.batch.journal import JournalError
    from jaxsample.batch.manifest import ManifestError
    from jaxsample.batch.merge import MergeError, merge_shards, wait_for_shards
    from jaxsample.batch.summary import format_summary

    if args.command == "batch-merge":
        try:
            summary = merge_shards(args.output, args.shards)
        except (MergeError, OSError) as err:
            print(f"jaxsample batch-merge: {err}", file=sys.stderr)
            return 1
        print(format_summary(summary), file=sys.stderr)
        return 0

    from jaxsample.batch.job import JobConfig, JobError, run_job, shard_output
    from jaxsample.model import ModelFileError

    try:
        for flag, value in (
            ("--sync-seconds", args.sync_seconds),
            ("--merge-timeout", args.merge_timeout),
        ):
            if not (math.isfinite(value) and value >= 0):  # nan would never sync by time
                raise UsageError(f"{flag} {value}: must be a finite number >= 0")
        _check_paths(args)
        shard = _shard(args)
        _check_devices(args)
    except UsageError as err:
        print(f"jaxsample batch: {err}", file=sys.stderr)
        return 2
    except DistributedError as err:
        print(f"jaxsample batch: {err}", file=sys.stderr)
        return 1
    if not args.no_compile_cache:
        from jaxsample.engine.programs import use_compile_cache

        use_compile_cache()
    cfg = JobConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        dtype=args.dtype,
        slots=args.slots,
        max_seq_len=args.max_seq_len,
        chunk_steps=args.chunk_steps,
        devices=args.devices,
        job_seed=args.job_seed,
        shard=shard,
        progress=args.progress,
        sync_lines=args.sync_lines,
        sync_seconds=args.sync_seconds,
    )
    try:
        summary = run_job(cfg)
    except (ManifestError, JournalError, JobError, ModelFileError) as err:
        print(f"jaxsample batch: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file the job reads or writes beside the journal
        print(
            f"jaxsample batch: {err}; what was written to {args.output} is kept: fix this "
            "and run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    except Exception as err:  # the engine failed (out of memory, XLA, a bug): one line here
        print(
            f"jaxsample batch: {_failure(err, shard_output(args.output, *shard))}", file=sys.stderr
        )
        return 1
    with contextlib.suppress(OSError):  # a failed run's traceback, now stale
        os.remove(shard_output(args.output, *shard) + ".error.log")
    print(format_summary(summary), file=sys.stderr)
    if not summary["complete"]:
        return 1
    k, n = shard
    if n > 1 and k == 0:
        left = wait_for_shards(args.output, n, timeout=args.merge_timeout)
        if left:
            print(
                f"jaxsample batch: {len(left)} shards not complete after "
                f"{args.merge_timeout:.0f} s; merge later with: jaxsample batch-merge "
                f"{args.output} --shards {n}",
                file=sys.stderr,
            )
            return 1
        try:
            print(format_summary(merge_shards(args.output, n)), file=sys.stderr)
        except (MergeError, OSError) as err:
            print(f"jaxsample batch: {err}", file=sys.stderr)
            return 1
    return 0
