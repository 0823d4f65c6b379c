"""Joining the output shards of a multi-process job into one output file.

Each process k of n writes ``OUTPUT.shard-k-of-n`` with its own manifest and summary. The
merge refuses unless every shard's summary says ``"complete": true`` and all manifests name
the same input and model file; it then streams the shards in order into a temporary file,
checks that no key appears twice, syncs, and renames it to ``OUTPUT`` (so ``OUTPUT`` is
either absent or whole). ``OUTPUT.summary.json`` sums the shards' counts.
"""

from __future__ import annotations

import glob
import json
import os
import time

from jaxsample.batch.journal import record_key
from jaxsample.batch.manifest import NOT_COMPARED, manifest_path
from jaxsample.batch.summary import read_summary, summary_path, write_json_atomic


class MergeError(RuntimeError):
    """The shards cannot be merged (missing, incomplete, or from different jobs)."""


def shard_paths(output: str, count: int) -> list[str]:
    from jaxsample.batch.job import shard_output

    return [shard_output(output, k, count) for k in range(count)]


def incomplete_shards(output: str, count: int) -> list[str]:
    """The shard files whose summary does not (yet) say complete."""
    return [p for p in shard_paths(output, count) if not (read_summary(p) or {}).get("complete")]


def wait_for_shards(output: str, count: int, *, timeout: float, poll: float = 2.0) -> list[str]:
    """Waits until every shard is complete or ``timeout`` seconds pass; returns those still
    incomplete."""
    deadline = time.monotonic() + timeout
    while (left := incomplete_shards(output, count)) and time.monotonic() < deadline:
        time.sleep(poll)
    return left


def _identity(path: str) -> tuple:
    try:
        with open(manifest_path(path), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as err:
        raise MergeError(f"{manifest_path(path)}: {err}") from err
    settings = {
        k: v
        for k, v in (m.get("settings") or {}).items()
        if not f"settings.{k}".startswith(NOT_COMPARED)  # shards may differ in slots
    }
    return (m.get("input"), m.get("model"), settings, (m.get("shard") or {}).get("count"))


def merge_shards(output: str, count: int) -> dict:
    """Merges the ``count`` shards of ``output`` into ``output``; returns the summary.

    Holds ``OUTPUT.lock`` while it merges (a merge by hand and process 0's do not write at
    once), and removes the temporary file of a merge that was killed."""
    from jaxsample.batch.job import JobError, output_lock

    if count < 1:
        raise MergeError(f"count={count}: at least 1 shard")
    try:
        with output_lock(output):
            for stale in glob.glob(glob.escape(output) + ".merge-tmp-*"):
                os.remove(stale)  # a killed merge's: the lock says no merge is running
            return _merge_locked(output, count)
    except JobError as err:
        raise MergeError(str(err)) from None


def _merge_locked(output: str, count: int) -> dict:
    paths = shard_paths(output, count)
    left = incomplete_shards(output, count)
    if left:
        raise MergeError(
            f"{len(left)} of {count} shards are missing or incomplete: "
            + ", ".join(left[:5])
            + (" ..." if len(left) > 5 else "")
            + "; run (or resume) their processes first"
        )
    ids = [_identity(p) for p in paths]
    for p, ident in zip(paths[1:], ids[1:]):
        if ident != ids[0]:
            raise MergeError(
                f"{p} was written by another job than {paths[0]} (different input, model, "
                "settings or shard count in the manifests)"
            )
    seen: set = set()
    totals: dict[str, int] = {}
    tmp = f"{output}.merge-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as dst:
            for p in paths:
                summary = read_summary(p)
                number = 0
                with open(p, "rb") as src:
                    for number, raw in enumerate(src, start=1):
                        try:
                            key = record_key(json.loads(raw))
                        except ValueError:
                            key = None
                        if key is None or key in seen or not raw.endswith(b"\n"):
                            raise MergeError(
                                f"{p}: line {number} is not a whole record, or repeats a key "
                                "of an earlier line or shard"
                            )
                        seen.add(key)
                        dst.write(raw)
                if number != summary["lines"]:  # written to since its run finished
                    raise MergeError(
                        f"{p} has {number} records, its summary says {summary['lines']} "
                        "lines: it changed after its run finished (or is being written); run "
                        "its process again (it resumes), then merge"
                    )
                for name, value in summary["records"].items():
                    totals[name] = totals.get(name, 0) + value
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, output)
    except OSError as err:
        raise MergeError(f"cannot merge into {output}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    summary = {
        "output": output,
        "complete": True,
        "lines": sum(read_summary(p)["lines"] for p in paths),
        "records": totals,
        "shards": paths,
    }
    write_json_atomic(summary_path(output), summary)
    return summary
