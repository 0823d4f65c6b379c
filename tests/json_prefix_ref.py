"""A plain incremental checker: is a byte string a prefix of some valid JSON object?

Test-only reference for jaxsample.automata.json_mode. Written straightforwardly (a context
stack, an "expecting" word, a buffer for the number or literal being read) and independent
of the table-driven automaton: UTF-8 validity is decided by Python's own strict decoder
(can some completion of the pending bytes decode?), numbers by a regular expression.

Example::

    c = JsonPrefixChecker()
    c.feed(b'{"a": [1, 2')  # True: still a prefix of a valid object
    c.complete              # False
"""

from __future__ import annotations

import copy
import functools
import re

_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERALS = ("true", "false", "null")
_WS = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"


def _number_prefix_ok(s: str) -> bool:
    # every valid proper prefix of a number is completed by one more "0"
    return bool(_NUMBER.fullmatch(s) or _NUMBER.fullmatch(s + "0"))


@functools.cache
def _utf8_state(pending: bytes) -> str:
    """'done' if ``pending`` is one whole UTF-8 character, 'more' if some completion is, else
    'bad'. Uses only Python's strict decoder as the oracle."""
    try:
        if len(pending.decode("utf-8")) == 1:
            return "done"
    except UnicodeDecodeError:
        pass
    for total in range(len(pending) + 1, 5):
        for nxt in range(0x80, 0xC0):
            cand = pending + bytes([nxt]) + b"\x80" * (total - len(pending) - 1)
            try:
                if len(cand.decode("utf-8")) == 1:
                    return "more"
            except UnicodeDecodeError:
                continue
    return "bad"


class JsonPrefixChecker:
    """Feed bytes; ``ok`` says whether everything fed is a prefix of a valid JSON object
    (RFC 8259, top level an object, then only whitespace); ``complete`` whether it is one."""

    def __init__(self, max_depth: int | None = None):
        self.max_depth = max_depth
        self.ok = True
        self.stack: list[str] = []  # "obj" / "arr"
        self.expect = "start"
        # start, key_or_close, key, colon, value, value_or_close, comma_or_close, done
        self.mode = "structure"  # structure, string, number, literal
        self.is_key = False
        self.escape = False
        self.hex_left = 0
        self.pending = b""
        self.buf = ""

    def copy(self) -> JsonPrefixChecker:
        c = copy.copy(self)
        c.stack = list(self.stack)
        return c

    @property
    def complete(self) -> bool:
        return self.ok and self.mode == "structure" and self.expect == "done"

    def feed(self, data: bytes) -> bool:
        for byte in data:
            if not self.ok:
                break
            self.ok = self._byte(byte)
        return self.ok

    # ------------------------------------------------------------------ one byte
    def _byte(self, byte: int) -> bool:
        if self.mode == "string":
            return self._string_byte(byte)
        if byte >= 0x80:
            return False
        ch = chr(byte)
        if self.mode == "number":
            if _number_prefix_ok(self.buf + ch):
                self.buf += ch
                return True
            if not _NUMBER.fullmatch(self.buf):
                return False
            self.mode = "structure"
            self.expect = "comma_or_close"
            return self._structure(ch)
        if self.mode == "literal":
            word = self.buf + ch
            if not any(lit.startswith(word) for lit in _LITERALS):
                return False
            self.buf = word
            if word in _LITERALS:
                self.mode = "structure"
                self.expect = "comma_or_close"
            return True
        return self._structure(ch)

    def _string_byte(self, byte: int) -> bool:
        if self.pending:
            state = _utf8_state(self.pending + bytes([byte]))
            if state == "bad":
                return False
            self.pending = b"" if state == "done" else self.pending + bytes([byte])
            return True
        ch = chr(byte)
        if self.escape:
            self.escape = False
            if ch == "u":
                self.hex_left = 4
                return True
            return ch in '"\\/bfnrt'
        if self.hex_left:
            self.hex_left -= 1
            return ch in _HEX
        if ch == '"':
            self.mode = "structure"
            self.expect = "colon" if self.is_key else "comma_or_close"
            return True
        if ch == "\\":
            self.escape = True
            return True
        if byte < 0x20:
            return False
        if byte < 0x80:
            return True
        state = _utf8_state(bytes([byte]))
        if state == "bad":
            return False
        self.pending = bytes([byte]) if state == "more" else b""
        return True

    def _open(self, kind: str) -> bool:
        if self.max_depth is not None and len(self.stack) >= self.max_depth:
            return False
        self.stack.append(kind)
        self.expect = "key_or_close" if kind == "obj" else "value_or_close"
        return True

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack.pop()
        self.expect = "comma_or_close" if self.stack else "done"
        return True

    def _structure(self, ch: str) -> bool:
        if ch in _WS:
            return True
        e = self.expect
        if e == "start":
            return ch == "{" and self._open("obj")
        if e == "done":
            return False
        if e in ("key_or_close", "key"):
            if ch == '"':
                self.mode, self.is_key = "string", True
                return True
            return e == "key_or_close" and ch == "}" and self._close("obj")
        if e == "colon":
            if ch == ":":
                self.expect = "value"
                return True
            return False
        if e in ("value", "value_or_close"):
            if e == "value_or_close" and ch == "]":
                return self._close("arr")
            return self._value(ch)
        # comma_or_close
        if ch == ",":
            self.expect = "key" if self.stack[-1] == "obj" else "value"
            return True
        if ch == "}":
            return self._close("obj")
        if ch == "]":
            return self._close("arr")
        return False

    def _value(self, ch: str) -> bool:
        if ch == '"':
            self.mode, self.is_key = "string", False
            return True
        if ch == "{":
            return self._open("obj")
        if ch == "[":
            return self._open("arr")
        if ch == "-" or ch.isdigit():
            self.mode, self.buf = "number", ch
            return True
        if ch in "tfn":
            self.mode, self.buf = "literal", ch
            return True
        return False


def is_valid_prefix(data: bytes, max_depth: int | None = None) -> bool:
    """True if ``data`` is a prefix of some valid JSON object (see JsonPrefixChecker)."""
    return JsonPrefixChecker(max_depth).feed(data)
