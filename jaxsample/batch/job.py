"""The batch job: OpenAI Batch JSONL in, one output record per input line out, resumable.

Data flow (docs/batch.md)::

    input.jsonl --reader--> Line (request or line-level error) --shard_of(key)--> this
    process's share --skip what the journal lists as done--> Engine.stream_requests (lazy,
    each line by its url's endpoint, results as they finish) --record--> Journal (one
    complete line each, grouped fsync)

Everything before the engine is checked first (lock, manifest, journal repair, counting), so
a refused resume never loads the model, and a job that is already complete never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from jaxsample.batch.journal import Journal
from jaxsample.batch.manifest import Manifest, manifest_path
from jaxsample.batch.reader import RUN, RUN_DUPLICATE, SKIP, Line, read_lines, shard_of
from jaxsample.batch.summary import (
    Progress,
    Tally,
    format_summary,
    summary_path,
    write_json_atomic,
)
from jaxsample.params import SEED_RULE


class JobError(RuntimeError):
    """A job that cannot start as configured."""


@dataclasses.dataclass
class JobConfig:
    """What one process of a batch job runs.

    ``output`` is the final output path; with ``shard = (k, n)``, n > 1, this process writes
    :func:`shard_output` ``(output, k, n)`` instead. ``settings`` returns what the manifest
    keeps of it.
    """

    input: str
    output: str
    model: str | None = None
    dtype: str = "float32"
    slots: int = 16
    max_seq_len: int | None = None
    chunk_steps: int = 32
    devices: int | None = None
    job_seed: int = 0
    shard: tuple[int, int] = (0, 1)
    progress: bool | None = None
    sync_lines: int = 256
    sync_seconds: float = 1.0

    def settings(self) -> dict:
        """The engine settings a resume must match (devices excluded: docs/batch.md)."""
        return {
            "dtype": self.dtype,
            "slots": self.slots,
            "max_seq_len": self.max_seq_len,
            "chunk_steps": self.chunk_steps,
            "job_seed": self.job_seed,
            "seed_rule": SEED_RULE,  # how seeds are derived from (job_seed, custom_id)
        }


def shard_output(output: str, index: int, count: int) -> str:
    """The file process ``index`` of ``count`` writes (the output itself when count is 1).

    Example::

        >>> shard_output("out.jsonl", 1, 4)
        'out.jsonl.shard-00001-of-00004'
    """
    return output if count == 1 else f"{output}.shard-{index:05d}-of-{count:05d}"


def lock_path(output: str) -> str:
    """The lock file of an output (or shard) file: ``OUTPUT.lock``."""
    return output + ".lock"


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on :func:`lock_path` ``(output)`` for the ``with`` block.

    Two runs appending to one output would each write every record; the second run is
    refused instead (JobError naming the holder, whose pid and host the lock file holds). The
    kernel drops the lock when the holder exits in any way, ``kill -9`` included, so a
    resume is never blocked by a dead run; the file itself stays. flock needs a local file
    system: over NFS it may not exclude a run on another host.
    """
    path = lock_path(output)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise JobError(f"cannot open the lock file {path}: {err.strerror}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
            who = f" (pid {holder[0]} on {holder[1]})" if len(holder) == 2 else ""
            raise JobError(
                f"{output} is being written by another jaxsample batch{who}, which holds "
                f"{path}: wait for it to finish or stop it, then run this command again"
            ) from None
        except OSError as err:
            raise JobError(
                f"cannot lock {path}: {err.strerror} (the output needs a file system with "
                "flock, such as a local disk)"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def model_file(path: str | None) -> str:
    """The model file a job uses: ``path``, or the default model's file (JobError, with the
    command that installs it, when there is no verified copy)."""
    if path is not None:
        return path
    from jaxsample.model import ModelNotFoundError, default_model_path

    try:
        return str(default_model_path())
    except ModelNotFoundError as err:
        raise JobError(str(err)) from err


def job_devices(count: int | None, slots: int) -> list:
    """The first ``count`` of this process's devices (None: all of them), which ``slots``
    must be a multiple of (JobError otherwise: the command checks it before anything is
    written, a job built in Python when it loads its engine)."""
    import jax

    local = jax.local_devices()
    n = len(local) if count is None else count
    if n > len(local):
        raise JobError(f"--devices {n}: this process has {len(local)} devices")
    if slots % n:
        raise JobError(f"--slots {slots} must be a multiple of the {n} devices used (--devices)")
    return local[:n]


def load_engine(cfg: JobConfig, *, model_name: str | None = None):
    """The Engine for a job's settings: the slot engine over ``cfg.devices`` local devices
    (default: all of this process's devices), batch-invariant. ``model_name``: the name the
    responses give as ``model`` (default: the model file's name)."""
    import jax.numpy as jnp

    from jaxsample.api import Engine

    devices = job_devices(cfg.devices, cfg.slots)
    from jaxsample.params import InvalidRequestError

    try:  # Engine checks its settings (max_seq_len against the model's context) when built
        engine = Engine.load(
            cfg.model,
            dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
            batch_invariant=True,
            compile_cache=False,  # the command's --no-compile-cache decides (batch/command.py)
            slots=cfg.slots,
            chunk_steps=cfg.chunk_steps,
            max_seq_len=cfg.max_seq_len,
            devices=devices,
        )
    except InvalidRequestError as err:  # the flag of the setting it names
        flag = "--" + str(err.field).replace("_", "-")
        raise JobError(f"{flag} {err.value}: must be {err.allowed}") from None
    if model_name is not None:
        engine.model_name = model_name
    return engine


def recorded_model_name(cfg: JobConfig, out: str) -> str | None:
    """The ``model`` a job's responses carry: the name of the model file the job was
    started with, as its manifest records it (None for the default model, which has a
    fixed name). A resume after the file was moved or renamed (paths are not compared, the
    hash is) keeps answering with the first run's name, so its records equal an
    uninterrupted run's."""
    if cfg.model is None:
        return None
    try:
        with open(manifest_path(out), encoding="utf-8") as f:
            recorded = json.load(f)["paths"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = cfg.model
    return os.path.basename(str(recorded))


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def response_record(custom_id: str, result: dict) -> dict:
    """The output line of a request that reached the engine: status 200 with the
    chat.completion or text_completion, or the OpenAI error object it returned with status
    400 (500 for a ``server_error``: the request failed unexpectedly while it was
    prepared)."""
    status = 200
    if "error" in result:
        status = 500 if result["error"].get("type") == "server_error" else 400
    return {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": _new_id("req_"), "body": result},
        "error": None,
    }


def error_record(custom_id: str | None, error: dict) -> dict:
    """The output line of a request that got no response: ``{"code", "message", "line"?}``."""
    return {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error}


class _Clock:
    """Seconds spent in the job layer, by part."""

    def __init__(self):
        self.manifest = 0.0  # hashing the input and model files
        self.parse = 0.0  # reading and checking input lines
        self.records = 0.0  # building output records
        self.write = 0.0  # encoding, writing and syncing them


def _timed_lines(
    path: str, clock: _Clock, limit: int | None = None, plan: bytearray | None = None
) -> Iterator[Line]:
    lines = read_lines(path, limit=limit, plan=plan)
    while True:
        t0 = time.perf_counter()
        line = next(lines, None)
        clock.parse += time.perf_counter() - t0
        if line is None:
            return
        yield line


def run_job(cfg: JobConfig, *, engine=None, engine_factory: Callable | None = None) -> dict:
    """Runs (or resumes) this process's share of a batch job; returns its summary dict.

    ``engine`` (anything with ``Engine.stream_requests``) or ``engine_factory()`` is used
    when given; otherwise :func:`load_engine` builds one, after every check has passed and
    only when something is left to run. The output's :func:`output_lock` is held from before
    the manifest is checked until the summary is written.
    """
    k, n = cfg.shard
    if not 0 <= k < n:
        raise JobError(f"shard={cfg.shard}: the process index must lie in [0, {n})")
    out = shard_output(cfg.output, k, n)
    if os.path.realpath(out) == os.path.realpath(cfg.input):
        raise JobError(f"--output {out} is the input file")
    with output_lock(out):
        return _run_locked(cfg, out, engine, engine_factory)


def _file_state(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_unchanged(path: str, before: tuple, when: str) -> None:
    """Refuses (JobError) an input file that changed since the job hashed it: its records
    would mix two versions of the file, and the manifest names only the first."""
    now = _file_state(path)
    if now != before:
        raise JobError(
            f"the input file {path} changed {when} (size {before[2]} -> {now[2]} bytes, or "
            "its modification time): the job read only the bytes it hashed into the manifest. "
            "Run it on a file that nothing writes any more: restore the file and run the same "
            "command to resume, or give the new file a new --output"
        )


def _run_locked(cfg: JobConfig, out: str, engine, engine_factory: Callable | None) -> dict:
    k, n = cfg.shard
    model_path = model_file(cfg.model)
    clock = _Clock()
    t_start = time.perf_counter()
    input_state = _file_state(cfg.input)
    manifest = Manifest.build(cfg.input, model_path, cfg.settings(), shard=cfg.shard)
    _check_unchanged(cfg.input, input_state, "while the job hashed it")
    manifest.check_or_write(out)
    limit = manifest.data["input"]["size"]
    # a summary describes a finished run; this run's replaces it at the end, and until then
    # none is there: a stale "complete" would let process 0 merge a shard being written
    with contextlib.suppress(FileNotFoundError):
        os.remove(summary_path(out))
    clock.manifest = time.perf_counter() - t_start
    journal = Journal.open(out, sync_lines=cfg.sync_lines, sync_seconds=cfg.sync_seconds)
    try:
        # the first pass counts and plans: one byte per input line says whether the second
        # pass (the run) parses it again, so lines of other shards and lines already done
        # are parsed once, and the run keeps no set of the custom_ids it read
        shard_lines = todo = 0
        plan = bytearray()
        for line in _timed_lines(cfg.input, clock, limit):
            if shard_of(line.key, n) != k:
                plan.append(SKIP)
                continue
            shard_lines += 1
            if line.key in journal.done:
                plan.append(SKIP)
                continue
            todo += 1
            dup = line.error is not None and line.error["code"] == "duplicate_custom_id"
            plan.append(RUN_DUPLICATE if dup else RUN)
        _check_unchanged(cfg.input, input_state, "since the job started")
        skipped = shard_lines - todo
        run = Tally()
        progress = Progress(
            todo, enabled=cfg.progress, desc=f"batch {k + 1}/{n}" if n > 1 else "batch"
        )
        load_s = 0.0
        t_run = time.perf_counter()
        if todo:
            t0 = time.perf_counter()
            if engine is None:
                name = recorded_model_name(cfg, out)
                engine = engine_factory() if engine_factory else load_engine(cfg, model_name=name)
            load_s = time.perf_counter() - t0
            t_run = time.perf_counter()
            _run(cfg, engine, journal, clock, run, progress, limit, plan)
            _check_unchanged(cfg.input, input_state, "while the job ran")
        progress.close()
        journal.close()
        t_end = time.perf_counter()
    finally:
        journal.close()
    complete = len(journal.done) == shard_lines
    seconds = t_end - t_run
    layer = clock.manifest + clock.parse + clock.records + clock.write
    summary = {
        "output": out,
        "input": os.path.abspath(cfg.input),
        "complete": complete,
        "lines": shard_lines,
        "records": journal.tally.as_dict(),
        "shard": {"index": k, "count": n},
        "settings": cfg.settings(),
        "this_run": {
            "requests": run.records,
            "skipped_done": skipped,
            "repaired_bytes": journal.repaired_bytes,
            "records": run.as_dict(),
            "seconds": seconds,
            "load_seconds": load_s,
            "total_seconds": t_end - t_start,
            "requests_per_s": run.records / seconds if seconds > 0 else 0.0,
            "tokens_per_s": run.completion_tokens / seconds if seconds > 0 else 0.0,
            "job_layer_seconds": {
                "manifest": clock.manifest,
                "parse": clock.parse,
                "records": clock.records,
                "write_and_sync": clock.write,
                "total": layer,
            },
            # of the whole run apart from loading the model (compiling is in the run)
            "job_layer_share": layer / max(t_end - t_start - load_s, 1e-9),
            "fsyncs": journal.syncs,
        },
    }
    write_json_atomic(summary_path(out), summary)
    return summary


def _run(
    cfg: JobConfig,
    engine,
    journal: Journal,
    clock: _Clock,
    run: Tally,
    progress,
    limit: int,
    plan: bytearray,
) -> None:
    pending: set[str] = set()  # handed to the engine, no result yet
    # requests() writes the error records of bad lines while the engine pulls from it: a
    # lock keeps lines whole even if an engine pulled from another thread
    lock = threading.Lock()

    def write(record: dict) -> None:
        with lock:
            _write(record)

    def _write(record: dict) -> None:
        t0 = time.perf_counter()
        try:
            journal.append(record)  # encodes before it writes anything
        except ValueError as err:  # NaN or infinity in a response: not strict JSON
            record = error_record(
                record.get("custom_id"),
                {"code": "server_error", "message": f"the response is not strict JSON: {err}"},
            )
            journal.append(record)
        run.add(record)
        clock.write += time.perf_counter() - t0
        body = (record.get("response") or {}).get("body") or {}
        progress.update(int((body.get("usage") or {}).get("completion_tokens") or 0))

    def add_records_time(seconds: float) -> None:
        with lock:  # requests() runs on the engine's prefetching thread
            clock.records += seconds

    def requests() -> Iterator[tuple]:
        for line in _timed_lines(cfg.input, clock, limit, plan):  # this shard's, not done
            if line.error is not None:
                t0 = time.perf_counter()
                record = error_record(line.custom_id, line.error)
                add_records_time(time.perf_counter() - t0)
                write(record)
                continue
            pending.add(line.key)
            yield line.key, line.endpoint, line.body  # each line by its own url's endpoint

    for key, result in engine.stream_requests(requests(), job_seed=cfg.job_seed):
        if key not in pending:
            raise RuntimeError(f"the engine returned a result for {key!r}, which it was not given")
        pending.discard(key)
        t0 = time.perf_counter()
        record = response_record(key, result)
        add_records_time(time.perf_counter() - t0)
        write(record)
    if pending:
        raise RuntimeError(f"the engine returned no result for {len(pending)} requests")


def print_summary(summary: dict) -> None:
    print(format_summary(summary), file=sys.stderr)
