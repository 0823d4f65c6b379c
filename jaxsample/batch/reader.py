"""Streaming reader of an OpenAI Batch input file (JSONL), one checked request per line.

Each input line becomes one :class:`Line`: a request to run (``body`` set) or a line-level
error (``error`` set) that the job writes as that line's error record. Nothing is held per
line except the set of custom_ids already seen (to refuse duplicates), so memory stays flat
in the number of lines apart from that set (about 100 bytes per line).

Line-level errors (the request never reaches the model; see docs/batch.md):

- ``invalid_json``: the line is not UTF-8 JSON (an empty line included);
- ``invalid_line``: the line is JSON but not an object;
- ``missing_custom_id``: no ``custom_id``, or one that is not a non-empty string of Unicode
  text (JSON lets a string hold a lone surrogate escape such as ``"\\ud800"``);
- ``duplicate_custom_id``: a custom_id already used on an earlier line (the first one runs);
- ``unknown_key``: a key other than ``custom_id``, ``method``, ``url`` and ``body`` (a
  misspelt or misplaced field would otherwise be dropped without a word);
- ``invalid_method`` / ``invalid_url``: not ``"POST"`` / neither ``"/v1/chat/completions"``
  nor ``"/v1/completions"`` (:data:`URLS`; one file may mix both, each line is served by its
  own endpoint);
- ``invalid_body``: ``body`` missing or not an object.

A line whose custom_id is missing or a duplicate is keyed by its line number (an int) instead
of its custom_id, and its record carries ``"custom_id": null``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

CHAT_URL = "/v1/chat/completions"
TEXT_URL = "/v1/completions"
#: the URLs a line may name -> the endpoint that serves it (``Engine.stream_requests``)
URLS = {CHAT_URL: "chat", TEXT_URL: "completions"}
LINE_KEYS = ("custom_id", "method", "url", "body")  # the keys of an OpenAI Batch input line
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors put at the start of a file


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity: Python's json reads them, strict JSON has no such values."""
    raise ValueError(f"{name} is not JSON")


#: One decoder for every line: ``json.loads`` with a keyword argument builds a new
#: JSONDecoder per call (a tenth of the time of parsing a short request line).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _loads(text: str) -> Any:
    """``json.loads(text, parse_constant=_refuse_constant)``, the same errors included."""
    if text.startswith("\ufeff"):  # as json.loads: a BOM inside the text is refused
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


@dataclasses.dataclass(frozen=True)
class Line:
    """One input line, checked.

    Attributes:
      number: the 1-based line number in the input file.
      key: the custom_id (str), or the line number (int) when the line has no usable one.
      custom_id: the custom_id to write in the output record (None when unusable).
      body: the request body to run, or None for a line-level error.
      error: the line-level error ``{"code", "message", "line"}``, or None.
      endpoint: the endpoint of the line's ``url`` (:data:`URLS`): ``"chat"`` or
        ``"completions"``.
    """

    number: int
    key: str | int
    custom_id: str | None
    body: dict | None = None
    error: dict | None = None
    endpoint: str = "chat"


def shard_of(key: str | int, count: int) -> int:
    """The shard (process) in ``[0, count)`` that owns a line: a stable hash of its key.

    A custom_id is hashed with SHA-256 (the first 8 bytes, big-endian, modulo ``count``), so
    the split does not depend on Python's per-process string hashing nor on the order of the
    lines; a line keyed by its line number goes to ``number % count``.

    Example::

        >>> shard_of("request-1", 1)
        0
        >>> shard_of("request-1", 4) == shard_of("request-1", 4)
        True
        >>> shard_of(7, 4)
        3
    """
    if isinstance(key, int):
        return key % count
    if count == 1:  # one shard owns every line: no need to hash the key
        return 0
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _is_text(s: str) -> bool:
    """Whether ``s`` is Unicode text: JSON lets a string hold a lone surrogate escape
    (``"\\ud800"``), which has no UTF-8 form, so it could be neither hashed for its shard nor
    written back in the output record."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _line_error(number: int, code: str, message: str, custom_id=None, key=None) -> Line:
    err = {"code": code, "message": f"line {number}: {message}", "line": number}
    return Line(number, number if key is None else key, custom_id, error=err)


def check_line(
    number: int, raw: bytes, seen: set[str] | None, *, duplicate: bool | None = None
) -> Line:
    """Checks one raw input line (without its newline) and records its custom_id in ``seen``.

    ``duplicate``: whether the line's custom_id was used on an earlier line, when the caller
    already knows it (from an earlier pass over the same file, :func:`read_lines` with a
    ``plan``); ``seen`` is then neither read nor written (it may be None).

    Example::

        >>> seen = set()
        >>> ok = check_line(1, b'{"custom_id": "a", "method": "POST", '
        ...     b'"url": "/v1/chat/completions", "body": {"messages": []}}', seen)
        >>> ok.key, ok.body
        ('a', {'messages': []})
        >>> dup = check_line(2, b'{"custom_id": "a"}', seen)
        >>> dup.key, dup.custom_id, dup.error["code"]
        (2, None, 'duplicate_custom_id')
    """
    try:
        obj = _loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        what = "an empty line" if not raw.strip() else f"not valid JSON ({err})"
        return _line_error(number, "invalid_json", f"{what}; expected one JSON object per line")
    if not isinstance(obj, dict):
        return _line_error(
            number, "invalid_line", f"a JSON {type(obj).__name__}, expected a JSON object"
        )
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or not _is_text(cid):
        return _line_error(
            number,
            "missing_custom_id",
            f"'custom_id' = {json.dumps(cid)[:80]}; expected a non-empty string of Unicode "
            "text (a \\ud800-\\udfff escape must be half of a surrogate pair)",
        )
    repeated = cid in seen if duplicate is None else duplicate
    if repeated:
        return _line_error(
            number,
            "duplicate_custom_id",
            f"custom_id {json.dumps(cid)[:80]} was already used on an earlier line; "
            "the first line with it runs, this one does not",
        )
    if duplicate is None:
        seen.add(cid)
    unknown = [k for k in obj if k not in LINE_KEYS]
    if unknown:
        names = ", ".join(json.dumps(k)[:80] for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        return _line_error(
            number,
            "unknown_key",
            f"unknown key{'s' if len(unknown) > 1 else ''} {names}{more}; a request line has "
            f"only the keys {', '.join(json.dumps(k) for k in LINE_KEYS)} (put request "
            "fields in 'body')",
            cid,
            cid,
        )
    method = obj.get("method")
    if method != "POST":
        return _line_error(
            number,
            "invalid_method",
            f"'method' = {json.dumps(method)[:80]}; expected \"POST\"",
            cid,
            cid,
        )
    url = obj.get("url")
    if not isinstance(url, str) or url not in URLS:
        return _line_error(
            number,
            "invalid_url",
            f"'url' = {json.dumps(url)[:80]}; expected " + " or ".join(json.dumps(u) for u in URLS),
            cid,
            cid,
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        kind = "chat-completions" if URLS[url] == "chat" else "text-completions"
        return _line_error(
            number,
            "invalid_body",
            f"'body' = {json.dumps(body)[:80]}; expected a {kind} request object",
            cid,
            cid,
        )
    return Line(number, cid, cid, body=body, endpoint=URLS[url])


#: :func:`read_lines` ``plan`` values, one byte per input line (a ``bytearray``).
SKIP, RUN, RUN_DUPLICATE = 0, 1, 2


def read_lines(
    path: str, *, limit: int | None = None, plan: bytes | bytearray | None = None
) -> Iterator[Line]:
    """Streams the input file as checked :class:`Line` objects, in file order.

    Reads one line at a time (binary, split on ``\\n``; a ``\\r\\n`` ending is accepted). A
    UTF-8 byte order mark at the start of the file is skipped. A final line without a newline
    counts; an empty file yields nothing. ``limit``: read only the first ``limit`` bytes (the
    bytes the job's manifest hashed), as if the file ended there.

    ``plan``: a second pass over the same bytes that yields only some lines, one byte per line
    from an earlier pass (line ``i`` is ``plan[i - 1]``): :data:`SKIP` lines are neither parsed
    nor yielded (nor lines past the plan's end), :data:`RUN` and :data:`RUN_DUPLICATE`
    lines are parsed and checked as the first pass found them, the latter as a
    ``duplicate_custom_id`` (the custom_ids of skipped lines are not read again, so no set of
    them is kept). The yielded lines equal the first pass's lines at those numbers.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "in.jsonl")
        >>> line = '{"custom_id": "%s", "method": "POST", "url": "/v1/chat/completions", '
        >>> _ = open(path, "w").write("".join(line % c + '"body": {}}\\n' for c in "aba"))
        >>> [(x.number, x.key) for x in read_lines(path)]
        [(1, 'a'), (2, 'b'), (3, 3)]
        >>> plan = bytearray([SKIP, SKIP, RUN_DUPLICATE])
        >>> [(x.number, x.key, x.error["code"]) for x in read_lines(path, plan=plan)]
        [(3, 3, 'duplicate_custom_id')]
    """
    seen: set[str] = set()
    left = limit
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if left is not None:
                if left <= 0:
                    return
                raw = raw[:left]
                left -= len(raw)
            duplicate = None  # not known: check_line looks in seen
            if plan is not None:
                todo = plan[number - 1] if number <= len(plan) else SKIP
                if todo == SKIP:
                    continue
                duplicate = todo == RUN_DUPLICATE
            if number == 1:
                raw = raw.removeprefix(BOM)
            yield check_line(number, raw.rstrip(b"\r\n"), seen, duplicate=duplicate)


def count_lines(path: str) -> int:
    """The number of lines of a file (a final line without a newline counts), read in blocks."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
