"""The output file as an append-only journal: the one thing a resume trusts.

One job: append complete lines, make them durable in small groups, and on start repair a torn
tail and list which requests are already done.

- **Append.** Each record is encoded to one line first, then written with ``os.write`` on a
  file opened ``O_APPEND`` (looping on short writes). A line is in the kernel's page cache as
  soon as :meth:`Journal.append` returns, so ``kill -9`` of the process loses nothing written;
  a kill can only interrupt the write of the line being written (a torn tail).
- **Sync.** ``fsync`` after every ``sync_lines`` lines or when ``sync_seconds`` have passed
  since the last sync (checked at each append), and at :meth:`Journal.close`. This bounds what
  a crash of the whole machine (power loss) can lose to the last group; those requests simply
  run again on resume.
- **Open.** The existing file is read line by line: every complete line must be a record with
  a key (its ``custom_id``, or for a record with ``"custom_id": null`` the ``error.line``
  number). A last line without its newline, or one that is not a record (a torn write, or
  zeros after a power loss), is cut off; a bad line anywhere else is refused, since the job did
  not write it.

Example::

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.jsonl")
    >>> j = Journal.open(path)
    >>> j.append({"custom_id": "a", "response": {"status_code": 200}, "error": None})
    >>> j.close()
    >>> with open(path, "ab") as f:
    ...     _ = f.write(b'{"custom_id": "b", "resp')      # a torn write
    >>> j = Journal.open(path)
    >>> sorted(j.done), j.repaired_bytes
    (['a'], 24)
    >>> j.close()
"""

from __future__ import annotations

import json
import os
import time

from jaxsample.batch.summary import Tally


class JournalError(RuntimeError):
    """The output file holds something the job did not write (it will not resume over it)."""


class JournalWriteError(JournalError):
    """The output file could not be written or synced (a full disk, a read-only or failing
    file system): what was written before stays, and the same command resumes once the
    cause is fixed."""

    def __init__(self, path: str, what: str, err: OSError):
        self.errno = err.errno
        super().__init__(
            f"cannot {what} {path}: {err.strerror or err}; the records written before are "
            "kept: fix this (free some space, say) and run the same command again to resume"
        )


def record_key(record) -> str | int | None:
    """A record's key: its custom_id, else (``custom_id`` null) its ``error.line``; None if
    it has neither."""
    if not isinstance(record, dict):
        return None
    cid = record.get("custom_id")
    if isinstance(cid, str):
        return cid
    err = record.get("error")
    line = err.get("line") if isinstance(err, dict) else None
    return line if isinstance(line, int) and not isinstance(line, bool) else None


def encode_record(record: dict) -> bytes:
    """One output line: compact strict JSON (no NaN/Infinity; raises ValueError) plus ``\\n``.

    Text is written as UTF-8, except in a record that holds a lone surrogate (JSON input may
    escape one, ``"\\ud800"``, and a refusal names the field or value it came in): such a
    record is written with ``\\u`` escapes, still valid JSON that reads back the same.

    >>> encode_record({"custom_id": "é", "x": "\\ud800"})
    b'{"custom_id":"\\\\u00e9","x":"\\\\ud800"}\\n'
    """
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        return (text + "\n").encode("ascii")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An append-only JSONL output file with grouped fsync (see the module docstring).

    Attributes:
      path: the file.
      done: the keys of the records already in the file (custom_id str or line number int).
      tally: counts and tokens of every record in the file (those found on open included).
      repaired_bytes: how many bytes of a torn tail were cut off on open.
      syncs: the number of fsyncs made.
    """

    def __init__(self, path: str, fd: int, *, sync_lines: int, sync_seconds: float):
        self.path = path
        self._fd = fd
        self.sync_lines = sync_lines
        self.sync_seconds = sync_seconds
        self.done: set[str | int] = set()
        self.tally = Tally()
        self.repaired_bytes = 0
        self.syncs = 0
        self._pending = 0
        self._last_sync = time.monotonic()

    @classmethod
    def open(cls, path: str, *, sync_lines: int = 256, sync_seconds: float = 1.0) -> Journal:
        """Opens (or creates) the journal: repairs a torn tail and lists what is done."""
        if sync_lines < 1 or sync_seconds < 0:
            raise ValueError(f"sync_lines={sync_lines} >= 1 and sync_seconds={sync_seconds} >= 0")
        created = not os.path.exists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise JournalWriteError(path, "open", err) from err
        journal = cls(path, fd, sync_lines=sync_lines, sync_seconds=sync_seconds)
        try:
            journal._scan()
        except OSError as err:
            os.close(fd)
            raise JournalWriteError(path, "repair", err) from err
        except BaseException:
            os.close(fd)
            raise
        if created:
            _fsync_dir(path)
        return journal

    def _scan(self) -> None:
        good_end = 0  # the end offset of the last good line
        bad: tuple[int, str] | None = None  # (line number, why) of a bad complete line
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if bad is not None:  # a bad line followed by more lines: not a torn tail
                    raise JournalError(
                        f"{self.path}: line {bad[0]} {bad[1]}; this file was not written by "
                        "jaxsample batch as it is (choose another --output, or repair it)"
                    )
                why = None
                if not raw.endswith(b"\n"):
                    why = "is cut short"
                else:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        record = None
                    key = record_key(record)
                    if key is None:
                        why = "is not an output record"
                    elif key in self.done:
                        why = f"repeats the record of {key!r}"
                if why is None:
                    self.done.add(key)
                    self.tally.add(record)
                    good_end += len(raw)
                else:
                    bad = (number, why)
        size = os.fstat(self._fd).st_size
        if size > good_end:  # cut the torn tail
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
            self.repaired_bytes = size - good_end

    def append(self, record: dict) -> None:
        """Writes one record as one complete line; syncs when the group is full or old.

        Raises ValueError (nothing written) when the record is not strict JSON."""
        key = record_key(record)
        if key is None:
            raise JournalError(f"a record without custom_id or error.line: {record!r:.200}")
        data = encode_record(record)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as err:  # a part of the line may be written: cut off on resume
            raise JournalWriteError(self.path, "write to", err) from err
        self.done.add(key)
        self.tally.add(record)
        self._pending += 1
        if (
            self._pending >= self.sync_lines
            or time.monotonic() - self._last_sync >= self.sync_seconds
        ):
            self._sync()

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise JournalWriteError(self.path, "sync", err) from err
        self.syncs += 1
        self._pending = 0
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """Makes every appended line durable now."""
        if self._pending:
            self._sync()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
