"""Counting what a job wrote, its progress bar and its end-of-run summary.

The summary is printed on stderr and written next to the output as ``OUTPUT.summary.json``
(written atomically, last thing the job does: ``"complete": true`` there means every input
line of this output has its record).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys


@dataclasses.dataclass
class Tally:
    """Counts of output records: ``ok`` (status 200), ``refused`` (a 400 response: the
    request was checked and refused), ``server_errors`` (a 500 response: the request failed
    unexpectedly while it was prepared; not the request's fault, unlike a refusal),
    ``failed`` (a line-level error: no response), and the tokens of the ok ones.

    Example::

        >>> t = Tally()
        >>> t.add({"response": {"status_code": 200, "body": {"usage": {
        ...     "prompt_tokens": 5, "completion_tokens": 3}}}, "error": None})
        >>> t.add({"response": None, "error": {"code": "invalid_json", "line": 2}})
        >>> t.add({"response": {"status_code": 500, "body": {"error": {}}}, "error": None})
        >>> t.ok, t.refused, t.server_errors, t.failed, t.records
        (1, 0, 1, 1, 3)
        >>> t.prompt_tokens + t.completion_tokens
        8
    """

    ok: int = 0
    refused: int = 0
    failed: int = 0
    server_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def records(self) -> int:
        return self.ok + self.refused + self.server_errors + self.failed

    @property
    def errors(self) -> int:
        return self.refused + self.server_errors + self.failed

    def add(self, record: dict) -> None:
        response = record.get("response")
        if not isinstance(response, dict):
            self.failed += 1
            return
        status = response.get("status_code")
        if status != 200:
            if isinstance(status, int) and status >= 500:
                self.server_errors += 1
            else:
                self.refused += 1
            return
        self.ok += 1
        body = response.get("body")
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["errors"] = self.errors
        d["records"] = self.records
        return d


def write_json_atomic(path: str, obj: dict) -> None:
    """Writes ``obj`` as JSON to ``path`` through a synced temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written file left beside the output
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def summary_path(output: str) -> str:
    return output + ".summary.json"


def read_summary(output: str) -> dict | None:
    try:
        with open(summary_path(output), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def format_summary(s: dict) -> str:
    """The one-paragraph summary printed on stderr: what ``OUTPUT.summary.json`` holds, but
    the job layer's seconds by part.

    Example::

        >>> s = {"output": "out.jsonl", "complete": True, "records": {"records": 3, "ok": 2,
        ...     "refused": 1, "failed": 0, "prompt_tokens": 9, "completion_tokens": 6},
        ...     "this_run": {"requests": 1, "seconds": 2.0, "requests_per_s": 0.5,
        ...     "tokens_per_s": 1.5, "skipped_done": 2, "job_layer_share": 0.001,
        ...     "load_seconds": 4.3, "fsyncs": 1, "repaired_bytes": 24}}
        >>> print(format_summary(s))
        jaxsample batch: out.jsonl: 3 records (2 ok, 1 refused, 0 failed lines) complete
          tokens: 9 prompt, 6 completion
          this run: 1 requests in 2.0 s (0.50 req/s, 1.5 tok/s), 2 already done, job layer 0.10%
          model load 4.3 s, 1 fsyncs, 24 bytes of a torn last line cut off the output
    """
    t = s["records"]
    lines = [
        f"jaxsample batch: {s['output']}: {t['records']} records "
        f"({t['ok']} ok, {t['refused']} refused, "
        + (f"{t['server_errors']} server errors, " if t.get("server_errors") else "")
        + f"{t['failed']} failed lines)"
        + (" complete" if s.get("complete") else " INCOMPLETE"),
        f"  tokens: {t['prompt_tokens']} prompt, {t['completion_tokens']} completion",
    ]
    run = s.get("this_run")
    if run and not run["requests"]:  # a complete job run again: no rates to show
        lines.append(f"  this run: nothing left to run, {run['skipped_done']} already done")
    elif run:
        lines.append(
            f"  this run: {run['requests']} requests in {run['seconds']:.1f} s "
            f"({run['requests_per_s']:.2f} req/s, {run['tokens_per_s']:.1f} tok/s), "
            f"{run['skipped_done']} already done, job layer {100 * run['job_layer_share']:.2f}%"
        )
        lines.append(
            f"  model load {run['load_seconds']:.1f} s, {run['fsyncs']} fsyncs, "
            f"{run['repaired_bytes']} bytes of a torn last line cut off the output"
        )
    return "\n".join(lines)


class Progress:
    """A tqdm bar over the requests of this run (requests/s, tokens/s, ETA) on stderr.

    Off when ``enabled`` is False; ``enabled=None`` means "when stderr is a terminal".
    """

    def __init__(self, total: int, *, enabled: bool | None, desc: str = "batch"):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        self._tokens = 0
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True
            )

    def update(self, tokens: int) -> None:
        if self._bar is None:
            return
        self._tokens += tokens
        self._bar.update(1)
        elapsed = self._bar.format_dict.get("elapsed") or 0.0
        if elapsed > 0:
            self._bar.set_postfix_str(f"{self._tokens / elapsed:.1f} tok/s", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
