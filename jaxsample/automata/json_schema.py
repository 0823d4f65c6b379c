"""JSON Schema outputs: a schema compiled on the host into tables, walked on the device.

Host side (:func:`compile_schema`, cached by content, the :data:`SCHEMA_CACHE_SIZE` most
recently used):

1. The schema becomes a byte-level NFA over the JSON text of its instances (properties in
   schema order, flexible whitespace, one spelling per character in constrained strings),
   refusing every keyword outside the supported subset with an
   :class:`~jaxsample.params.InvalidRequestError` that names the keyword and its JSON
   pointer. Recursion (``$ref``) and unconstrained values are unrolled up to a nesting
   limit.
2. Subset construction gives a DFA over bytes. States of a free-form string form blocks of
   14 consecutive states (the *string template*: plain character, escapes, UTF-8
   continuation bytes); their tokens that stay in the string are one row per template
   sub-state, shared by every schema and computed once per vocabulary. ``minLength`` /
   ``maxLength`` of such a string are a per-row character counter, not states.
3. Every other (state, token) pair is found by walking the vocabulary's byte trie from the
   state, so the cost is proportional to the live pairs. A state with at most ``K`` valid
   tokens keeps them as a sparse list ``(token, next state, counter effect)``; a state with
   more gets a dense int16 row (token -> next state).
4. ``cost[q]``: the fewest tokens that complete a valid instance from ``q`` (Bellman-Ford
   over the deduplicated token edges), used for budget-aware closing.

Device side: a :class:`Pool` of fixed capacity holds the tables of many schemas (no batch
axis); :meth:`SchemaPool.add` writes a compiled schema into it as data (same shapes, no
new program). A row's :class:`State` is its absolute pool state ``q``, the string counter
and the whitespace run. :func:`allowed`, :func:`advance` and :func:`is_complete` are per
row; vmap them with the pool unbatched (``in_axes=None``).

Example::

    c = compile_schema(schema, vocab_bytes, eos_id=eos, special_ids=specials)
    sp = SchemaPool.create(vocab_bytes, eos_id=eos, special_ids=specials)
    h = sp.add(c)                                # host; sp.pool is the device pytree
    s = init_state(h.start)
    mask = allowed(sp.pool, s, jnp.int32(100))   # bool[V]
    s = advance(sp.pool, s, jnp.int32(token))
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsample.automata import disk_cache
from jaxsample.automata import regex as rx
from jaxsample.automata._tokens import token_matrix

#: Nesting limit of objects and arrays in a schema's instances (recursion unrolls to it).
MAX_NESTING = 8
#: Nesting limit inside a value whose schema is unconstrained (``{}``, ``true``,
#: ``additionalProperties: true``): containers at most this deep below it.
ANY_NESTING = 2
#: Most DFA states one schema may compile to (the tables' row ids are int16).
MAX_STATES = 20000
#: Most NFA states (the builder stops early past this).
MAX_NFA_STATES = 100000
#: A state with more valid tokens than this gets a dense row instead of a sparse list.
SPARSE_MAX = 512
#: ``minItems`` / ``maxItems`` / unrolled item positions above this are refused.
MAX_ITEMS_UNROLL = 64
#: At most this many whitespace-only tokens in a row outside strings (as in JSON mode).
WS_RUN_MAX = 3
#: "Cannot complete" in the cost table.
INF = 1 << 20
#: Counter limit meaning "no limit".
BIG = 1 << 30
#: The pool packs a state's cost (21 bits, INF included) and its minLength (10 bits).
_CMIN_SHIFT = 21
_COST_MASK = (1 << _CMIN_SHIFT) - 1
#: Largest ``minLength`` of a free-form string (the pool packs it in 10 bits).
MAX_MIN_LENGTH = 1023

_WS = b" \t\n\r"
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "markdownDescription",
    "x-intellij-html-description",
    "x-intellij-language-injection",
    "x-taplo",
    "x-taplo-info",
    "$anchor",
    "example",
    "deprecationMessage",
    "enumDescriptions",
    "markdownEnumDescriptions",
    "defaultSnippets",
    "errorMessage",
    "patternErrorMessage",
    "doNotSuggest",
    "contentMediaType",
    "contentEncoding",
}
#: Most states of pattern/enum strings with a large token set (each needs a dense row).
MAX_DENSE_STATES = 32
#: Most NFA states the subset construction may visit (bounds the compile time).
MAX_SUBSET_WORK = 600_000
#: Most (state, trie node) pairs one compile may visit (bounds the compile time).
MAX_WALK_PAIRS = 4_000_000
#: Length-counted regions of ``format: hostname`` / ``email`` (RFC 1123 / RFC 5321 limits).
R_HOST, R_LOCAL = 1, 2
#: Most bytes of a hostname label, of a hostname (an email's domain), of an email local part.
LABEL_MAX, HOST_MAX, LOCAL_MAX = 63, 253, 64
FORMATS = ("date", "time", "date-time", "duration", "uuid", "email", "hostname", "ipv4", "ipv6")


def _err(keyword: str, path: str, value: Any, reason: str):
    from jaxsample.params import InvalidRequestError

    return InvalidRequestError(
        "response_format.json_schema.schema",
        value,
        "a JSON Schema inside the supported subset (docs/constraints.md)",
        reason=f"'{keyword}' at {path or '/'}: {reason}",
    )


def _ptr(path: str, *parts) -> str:
    for p in parts:
        path += "/" + str(p).replace("~", "~0").replace("/", "~1")
    return path


# ----------------------------------------------------------------------------- string template
# sub-states of a free-form JSON string (content after the opening quote)
T_CH, T_ESC, T_U4, T_U3, T_U2, T_U1, T_C1, T_C2, T_C3, T_E0, T_ED, T_F0, T_F4, T_U3D = range(14)
N_SUB = 14
_EXIT = -2  # the closing quote
_HEX = set(b"0123456789abcdefABCDEF")


def _template_delta() -> np.ndarray:
    """int16[14, 256]: free-string sub-state transitions; -1 dead, -2 the closing quote.

    Escapes: ``\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX`` except UTF-16 surrogates
    (``\\uD800``-``\\uDFFF``); raw bytes: no control bytes, valid UTF-8 without surrogates."""
    d = np.full((N_SUB, 256), -1, np.int16)
    for b in range(256):
        if b == ord('"'):
            d[T_CH, b] = _EXIT
        elif b == ord("\\"):
            d[T_CH, b] = T_ESC
        elif 0x20 <= b < 0x80:
            d[T_CH, b] = T_CH
        elif 0xC2 <= b <= 0xDF:
            d[T_CH, b] = T_C1
        elif b == 0xE0:
            d[T_CH, b] = T_E0
        elif b == 0xED:
            d[T_CH, b] = T_ED
        elif 0xE1 <= b <= 0xEF:
            d[T_CH, b] = T_C2
        elif b == 0xF0:
            d[T_CH, b] = T_F0
        elif 0xF1 <= b <= 0xF3:
            d[T_CH, b] = T_C3
        elif b == 0xF4:
            d[T_CH, b] = T_F4
    for b in b'"\\/bfnrt':
        d[T_ESC, b] = T_CH
    d[T_ESC, ord("u")] = T_U4
    for b in _HEX:
        d[T_U4, b] = T_U3D if b in b"dD" else T_U3
        d[T_U3, b] = T_U2
        d[T_U2, b] = T_U1
        d[T_U1, b] = T_CH
    for b in b"01234567":
        d[T_U3D, b] = T_U2
    for lo, hi, s, n in [
        (0x80, 0xBF, T_C1, T_CH),
        (0x80, 0xBF, T_C2, T_C1),
        (0x80, 0xBF, T_C3, T_C2),
        (0xA0, 0xBF, T_E0, T_C1),
        (0x80, 0x9F, T_ED, T_C1),
        (0x90, 0xBF, T_F0, T_C2),
        (0x80, 0x8F, T_F4, T_C2),
    ]:
        d[s, lo : hi + 1] = n
    return d


_TDELTA = _template_delta()


# ----------------------------------------------------------------------------------- NFA
class _NFA:
    """Byte NFA: ``edges[s]`` = list of (256-bit byte mask as int, target), ``eps[s]``.

    ``tag[s]``: ``None`` or ``(instance, sub_state)`` for the states of a free-string
    template instance; ``limits[instance] = (min_len, max_len)``. ``region[s]``: 0, or the
    length-counted region (:data:`R_HOST`, :data:`R_LOCAL`) the state is inside."""

    def __init__(self):
        self.edges: list[list] = []
        self.eps: list[list] = []
        self.tag: list = []
        self.region: list[int] = []
        self.limits: list[tuple[int, int]] = []
        self.string_states: set[int] = set()
        self.path: list[str] = []  # the JSON pointer of the schema that made each state
        self.cur_path = ""

    def new(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise _TooBig(f"more than {MAX_NFA_STATES} NFA states")
        self.edges.append([])
        self.eps.append([])
        self.tag.append(None)
        self.region.append(0)
        self.path.append(self.cur_path)
        return len(self.edges) - 1

    def edge(self, a, mask, b):
        self.edges[a].append((mask, b))

    def e(self, a, b):
        self.eps[a].append(b)


class _TooBig(Exception):
    pass


def _mask(bs: Iterable[int]) -> int:
    m = 0
    for b in bs:
        m |= 1 << b
    return m


_WS_MASK = _mask(_WS)
_DIG = _mask(b"0123456789")
_DIG19 = _mask(b"123456789")


def _canon(ch: str) -> bytes:
    """The one JSON spelling of a character inside a constrained string."""
    return json.dumps(ch, ensure_ascii=False)[1:-1].encode("utf-8")


def _literal_text(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _Builder:
    """Schema -> NFA fragments ``(start, end)``; ``None`` = no instance possible."""

    def __init__(self, root, strict: bool):
        self.n = _NFA()
        self.root = root
        self.strict = strict
        self.ref_stack: list[str] = []

    # ---- basic fragments
    def lit(self, data: bytes):
        s = self.n.new()
        cur = s
        for b in data:
            nx = self.n.new()
            self.n.edge(cur, 1 << b, nx)
            cur = nx
        return s, cur

    def ws(self):
        s = self.n.new()
        self.n.edge(s, _WS_MASK, s)
        return s, s

    def seq(self, *frags):
        if any(f is None for f in frags):
            return None
        for a, b in zip(frags, frags[1:]):
            self.n.e(a[1], b[0])
        return frags[0][0], frags[-1][1]

    def alt(self, frags):
        frags = [f for f in frags if f is not None]
        if not frags:
            return None
        s, e = self.n.new(), self.n.new()
        for a, b in frags:
            self.n.e(s, a)
            self.n.e(b, e)
        return s, e

    def opt(self, f):
        if f is None:
            return self.lit(b"")
        s, e = self.n.new(), self.n.new()
        self.n.e(s, f[0])
        self.n.e(f[1], e)
        self.n.e(s, e)
        return s, e

    def star(self, make):
        """``make()*`` (make builds a fresh fragment)."""
        f = make()
        s = self.n.new()
        if f is None:
            return s, s
        self.n.e(s, f[0])
        self.n.e(f[1], s)
        return s, s

    def rep(self, make, lo: int, hi: int | None):
        parts = [make() for _ in range(lo)]
        if hi is None:
            parts.append(self.star(make))
        else:
            tail = None
            for _ in range(hi - lo):
                f = make()
                tail = self.opt(f if tail is None else self.seq(f, tail))
            if tail is not None:
                parts.append(tail)
        if not parts:
            return self.lit(b"")
        return self.seq(*parts)

    # ---- strings
    def free_string(self, lo: int = 0, hi: int = BIG):
        """A free-form string with a character counter ``[lo, hi]`` (a template instance)."""
        inst = len(self.n.limits)
        self.n.limits.append((lo, hi))
        subs = [self.n.new() for _ in range(N_SUB)]
        for i, s in enumerate(subs):
            self.n.tag[s] = (inst, i)
            self.n.string_states.add(s)
        start, end = self.n.new(), self.n.new()
        self.n.edge(start, 1 << ord('"'), subs[T_CH])
        for i in range(N_SUB):
            row = _TDELTA[i]
            groups: dict[int, int] = {}
            for b in range(256):
                t = int(row[b])
                if t >= 0:
                    groups[t] = groups.get(t, 0) | (1 << b)
                elif t == _EXIT:
                    self.n.edge(subs[i], 1 << b, end)
            for t, m in groups.items():
                self.n.edge(subs[i], m, subs[t])
        return start, end

    def charset(self, cs: rx.CharSet):
        """One character of ``cs`` in its JSON spelling."""
        s, e = self.n.new(), self.n.new()
        self.n.string_states.add(s)
        single = 0
        multi = []
        for c in range(128):
            if cs.ascii >> c & 1:
                sp = _canon(chr(c))
                if len(sp) == 1:
                    single |= 1 << sp[0]
                else:
                    multi.append(sp)
        for c in sorted(cs.extra):
            multi.append(chr(c).encode("utf-8"))
        if single:
            self.n.edge(s, single, e)
        for sp in multi:
            cur = s
            for b in sp[:-1]:
                nx = self.n.new()
                self.n.string_states.add(nx)
                self.n.edge(cur, 1 << b, nx)
                cur = nx
            self.n.edge(cur, 1 << sp[-1], e)
        if cs.all_non_ascii:
            self._utf8_multibyte(s, e)
        return s, e

    def _utf8_multibyte(self, s, e):
        def st():
            x = self.n.new()
            self.n.string_states.add(x)
            return x

        def rng(a, b):
            return _mask(range(a, b + 1))

        c1 = st()
        self.n.edge(c1, rng(0x80, 0xBF), e)
        c2 = st()
        self.n.edge(c2, rng(0x80, 0xBF), c1)
        c3 = st()
        self.n.edge(c3, rng(0x80, 0xBF), c2)
        self.n.edge(s, rng(0xC2, 0xDF), c1)
        self.n.edge(s, rng(0xE1, 0xEC) | rng(0xEE, 0xEF), c2)
        self.n.edge(s, rng(0xF1, 0xF3), c3)
        for lead, lo, hi, nx in [
            (0xE0, 0xA0, 0xBF, c1),
            (0xED, 0x80, 0x9F, c1),
            (0xF0, 0x90, 0xBF, c2),
            (0xF4, 0x80, 0x8F, c2),
        ]:
            m = st()
            self.n.edge(s, 1 << lead, m)
            self.n.edge(m, rng(lo, hi), nx)

    def regex_node(self, node):
        kind = node[0]
        if kind == "set":
            return self.charset(node[1])
        if kind == "rep":
            return self.rep(lambda: self.regex_node(node[1]), node[2], node[3])
        if kind == "seq":
            parts = [self.regex_node(x) for x in node[1]]
            if not node[2]:
                parts.insert(0, self.star(lambda: self.charset(rx.ANY)))
            if not node[3]:
                parts.append(self.star(lambda: self.charset(rx.ANY)))
            return self.seq(*parts) if parts else self.lit(b"")
        if kind == "alt":
            return self.alt([self.regex_node(x) for x in node[1]])
        raise AssertionError(kind)

    def pattern_string(self, pattern: str, path: str, keyword: str):
        try:
            ast, _ = rx.parse(pattern)
        except rx.RegexError as e:
            raise _err(keyword, path, pattern, f"unsupported regex: {e}") from None
        body = self.regex_node(ast)
        return self.seq(self.lit(b'"'), body, self.lit(b'"'))

    def region(self, kind: int, pattern: str):
        """The regex ``pattern`` with its NFA states marked as inside length-counted region
        ``kind`` (the device counts its bytes and labels; see :func:`_region_tables`)."""
        first = len(self.n.edges)
        f = self.regex_node(rx.parse(pattern)[0])
        for x in range(first, len(self.n.edges)):
            self.n.region[x] = kind
        return f

    def host_string(self, email: bool):
        """``format: hostname`` / ``email``: labels of at most 63 bytes, a hostname (the
        domain) of at most 253 and an email local part of at most 64, counted on the device."""
        parts = [self.lit(b'"')]
        if email:
            parts += [self.region(R_LOCAL, _LOCAL_RE), self.lit(b"@")]
        parts += [self.region(R_HOST, _HOST_RE), self.lit(b'"')]
        return self.seq(*parts)

    # ---- numbers
    def digits_range(self, lo: str, hi: str):
        """Fixed-width digit strings between ``lo`` and ``hi`` (same length, leading zeros ok)."""
        if not lo:
            return self.lit(b"")
        if lo[0] == hi[0]:
            return self.seq(self.lit(lo[0].encode()), self.digits_range(lo[1:], hi[1:]))
        n = len(lo) - 1
        alts = [
            self.seq(self.lit(lo[0].encode()), self.digits_range(lo[1:], "9" * n)),
            self.seq(self.lit(hi[0].encode()), self.digits_range("0" * n, hi[1:])),
        ]
        a, b = int(lo[0]) + 1, int(hi[0]) - 1
        if a <= b:
            mid = self.n.new(), self.n.new()
            self.n.edge(mid[0], _mask(range(48 + a, 48 + b + 1)), mid[1])
            alts.append(self.seq(mid, self.rep(lambda: self.dig(), n, n)))
        return self.alt(alts)

    def dig(self, m=_DIG):
        s, e = self.n.new(), self.n.new()
        self.n.edge(s, m, e)
        return s, e

    def nonneg_range(self, lo: int, hi: int | None):
        """Decimal numerals (no leading zeros) of the integers in [lo, hi], 0 <= lo."""
        if hi is not None and hi < lo:
            return None
        alts = []
        if lo == 0:
            alts.append(self.lit(b"0"))
            lo = 1
            if hi is not None and hi < 1:
                return self.alt(alts)
        width = len(str(lo))
        while True:
            top = 10**width - 1
            if hi is not None and hi <= top:
                alts.append(self.digits_range(str(lo), str(hi)))
                break
            alts.append(self.digits_range(str(lo), str(top)))
            lo, width = top + 1, width + 1
            if hi is None:
                alts.append(self.seq(self.dig(_DIG19), self.rep(self.dig, width - 1, None)))
                break
        return self.alt(alts)

    def int_range(self, lo: int | None, hi: int | None):
        """Numerals of the integers in [lo, hi] (None = unbounded); "-0" when 0 and negative
        integers are in range (as llguidance)."""
        alts = []
        if (lo is None or lo < 0) and (hi is None or hi >= 0):
            alts.append(self.lit(b"-0"))
        if hi is None or hi >= 0:
            alts.append(self.nonneg_range(max(lo, 0) if lo is not None else 0, hi))
        if lo is None or lo < 0:
            a = max(-hi, 1) if hi is not None else 1
            b = -lo if lo is not None else None
            if b is None or a <= b:
                alts.append(self.seq(self.lit(b"-"), self.nonneg_range(a, b)))
        return self.alt(alts)

    def number(self, integer: bool, s: dict, path: str):
        lo = hi = None
        lo_x = hi_x = False
        for kw in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if kw in s:
                v = s[kw]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise _err(
                        kw,
                        _ptr(path, kw),
                        v,
                        "not a finite number (draft-4 boolean form unsupported)",
                    )
                if kw in ("minimum", "exclusiveMinimum"):
                    if lo is None or v > lo or (v == lo and kw == "exclusiveMinimum"):
                        lo, lo_x = v, kw == "exclusiveMinimum"
                else:
                    if hi is None or v < hi or (v == hi and kw == "exclusiveMaximum"):
                        hi, hi_x = v, kw == "exclusiveMaximum"
        # integers satisfying the bounds
        ilo = (
            None
            if lo is None
            else (math.floor(lo) + 1 if lo_x and float(lo).is_integer() else math.ceil(lo))
        )
        ihi = (
            None
            if hi is None
            else (math.ceil(hi) - 1 if hi_x and float(hi).is_integer() else math.floor(hi))
        )
        if ilo is not None and ilo > 0 and lo_x and not float(lo).is_integer():
            ilo = math.ceil(lo)
        ints = self.int_range(ilo, ihi) if (ilo is None or ihi is None or ilo <= ihi) else None
        if integer:
            return ints
        if lo is None and hi is None:
            frac = self.opt(self.seq(self.lit(b"."), self.rep(self.dig, 1, None)))
            exp = self.opt(
                self.seq(
                    self.dig(_mask(b"eE")),
                    self.opt(self.dig(_mask(b"+-"))),
                    self.rep(self.dig, 1, None),
                )
            )
            return self.seq(self.int_range(None, None), frac, exp)
        # with bounds: an integer, or k.ddd whose whole interval [k, k+1] fits (no exponent)
        alts = [ints]
        # non-negative k: value in [k, k+1)
        klo = 0 if lo is None else max(0, math.floor(lo) + 1 if lo_x else math.ceil(lo))
        khi = None if hi is None else math.floor(hi) - 1
        if khi is None or klo <= khi:
            alts.append(
                self.seq(self.nonneg_range(klo, khi), self.lit(b"."), self.rep(self.dig, 1, None))
            )
        # negative: -(k.ddd), value in (-(k+1), -k]
        nlo = 0 if hi is None else max(0, math.floor(-hi) + 1 if hi_x else math.ceil(-hi))
        nhi = None if lo is None else math.floor(-lo) - 1
        if nhi is None or nlo <= nhi:
            alts.append(
                self.seq(
                    self.lit(b"-"),
                    self.nonneg_range(nlo, nhi),
                    self.lit(b"."),
                    self.rep(self.dig, 1, None),
                )
            )
        return self.alt(alts)

    # ---- any value (bounded nesting)
    def any_value(self, depth: int, left: int):
        alts = [
            self.free_string(),
            self.number(False, {}, ""),
            self.lit(b"true"),
            self.lit(b"false"),
            self.lit(b"null"),
        ]
        if depth < MAX_NESTING and left > 0:
            alts.append(self.any_object(depth + 1, left - 1))
            alts.append(self.any_array(depth + 1, left - 1))
        else:
            alts.append(self.seq(self.lit(b"{"), self.ws(), self.lit(b"}")))
            alts.append(self.seq(self.lit(b"["), self.ws(), self.lit(b"]")))
        return self.alt(alts)

    def any_object(self, depth, left):
        def member():
            return self.seq(
                self.free_string(),
                self.ws(),
                self.lit(b":"),
                self.ws(),
                self.any_value(depth, left),
            )

        return self.members_list(member, depth)

    def members_list(self, member, depth):
        def more():
            return self.seq(self.ws(), self.lit(b","), self.ws(), member())

        body = self.opt(self.seq(self.ws(), member(), self.star(more)))
        return self.seq(self.lit(b"{"), body, self.ws(), self.lit(b"}"))

    def any_array(self, depth, left):
        def item():
            return self.any_value(depth, left)

        def more():
            return self.seq(self.ws(), self.lit(b","), self.ws(), item())

        body = self.opt(self.seq(self.ws(), item(), self.star(more)))
        return self.seq(self.lit(b"["), body, self.ws(), self.lit(b"]"))

    # ---- schemas
    def resolve(self, ref: str, path: str):
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _err("$ref", path, ref, "only local references ('#' or '#/...') are supported")
        node = self.root
        if ref != "#":
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise _err("$ref", path, ref, "does not resolve inside the schema")
        return node, ref[1:]

    def schema(self, s, path: str, depth: int):
        outer, self.n.cur_path = self.n.cur_path, path
        try:
            return self._schema(s, path, depth)
        finally:
            self.n.cur_path = outer

    def _schema(self, s, path: str, depth: int):
        if s is True or s == {}:
            return self.any_value(depth, ANY_NESTING)
        if s is False:
            return None
        if not isinstance(s, dict):
            raise _err("schema", path, s, "not an object or boolean")
        known = {
            "type", "properties", "required", "additionalProperties", "items", "prefixItems",
            "minItems", "maxItems", "enum", "const", "anyOf", "$defs", "definitions", "$ref",
            "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum", "oneOf",
        }  # fmt: skip
        for k in s:
            if k not in known and k not in _ANNOTATIONS and not k.startswith("x-"):
                if k == "uniqueItems" and s[k] is False:
                    continue
                raise _err(k, _ptr(path, k), s[k], "keyword not supported")
        constraints = [k for k in s if k in known and k not in ("$defs", "definitions")]
        if "$ref" in s:
            others = [k for k in constraints if k != "$ref"]
            if others:
                raise _err(
                    others[0], _ptr(path, others[0]), s[others[0]], "next to '$ref' (not supported)"
                )
            ref = s["$ref"]
            if self.ref_stack.count(ref) > MAX_NESTING + 1 or len(self.ref_stack) > 64:
                raise _err(
                    "$ref", _ptr(path, "$ref"), ref, "recursion that never nests an object or array"
                )
            target, tpath = self.resolve(ref, _ptr(path, "$ref"))
            self.ref_stack.append(ref)
            try:
                return self.schema(target, tpath, depth)
            finally:
                self.ref_stack.pop()
        if "oneOf" in s:
            others = [k for k in constraints if k != "oneOf"]
            if others:
                raise _err(others[0], _ptr(path, others[0]), s[others[0]], "next to 'oneOf'")
            subs = s["oneOf"]
            if not isinstance(subs, list) or not subs:
                raise _err("oneOf", _ptr(path, "oneOf"), subs, "not a non-empty array")
            seen: set = set()
            for i, x in enumerate(subs):
                t = self._json_types(x)
                if t & seen:
                    raise _err(
                        "oneOf",
                        _ptr(path, "oneOf", i),
                        "...",
                        "alternatives whose JSON types overlap (exactly-one cannot be enforced; "
                        "oneOf is supported when the alternatives have disjoint types)",
                    )
                seen |= t
            return self.alt(
                [self.schema(x, _ptr(path, "oneOf", i), depth) for i, x in enumerate(subs)]
            )
        if "anyOf" in s:
            others = [k for k in constraints if k != "anyOf"]
            if others:
                raise _err(
                    others[0],
                    _ptr(path, others[0]),
                    s[others[0]],
                    "next to 'anyOf' (not supported)",
                )
            subs = s["anyOf"]
            if not isinstance(subs, list) or not subs:
                raise _err("anyOf", _ptr(path, "anyOf"), subs, "not a non-empty array")
            # a free-form string alternative subsumes the other string-only ones
            free = any(self._string_kind(x) == "free" for x in subs)
            return self.alt(
                [
                    self.schema(x, _ptr(path, "anyOf", i), depth)
                    for i, x in enumerate(subs)
                    if not (free and self._string_kind(x) == "other")
                    and not (
                        free and self._string_kind(x) == "free" and i != self._first_free(subs)
                    )
                ]
            )
        types = s.get("type")
        all_types = ["object", "array", "string", "number", "integer", "boolean", "null"]
        if types is None:
            implied = _implied_types(s)
            types = [t for t in all_types if t in implied] if implied else list(all_types)
        elif isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types or any(t not in all_types for t in types):
            raise _err(
                "type",
                _ptr(path, "type"),
                s.get("type"),
                f"not one of {all_types} or a list of them",
            )
        if "integer" in types and "number" in types:
            types = [t for t in types if t != "integer"]
        if "enum" in s or "const" in s:
            return self.literals(s, types, path)
        alts = []
        for t in types:
            if t == "object":
                alts.append(self.obj(s, path, depth))
            elif t == "array":
                alts.append(self.arr(s, path, depth))
            elif t == "string":
                alts.append(self.string(s, path))
            elif t in ("number", "integer"):
                alts.append(self.number(t == "integer", s, path))
            elif t == "boolean":
                alts += [self.lit(b"true"), self.lit(b"false")]
            else:
                alts.append(self.lit(b"null"))
        return self.alt(alts)

    def _string_kind(self, x, seen=0):
        """ "free": exactly every string; "other": only strings; None: anything else."""
        if isinstance(x, dict) and set(x) - _ANNOTATIONS == {"$ref"} and seen < 8:
            try:
                return self._string_kind(self.resolve(x["$ref"], "")[0], seen + 1)
            except Exception:
                return None
        if not isinstance(x, dict):
            return None
        keys = {k for k in x if k not in _ANNOTATIONS and not k.startswith("x-")}
        if x.get("type") == "string" and keys == {"type"}:
            return "free"
        vals = x.get("enum", [x["const"]] if "const" in x else None)
        if x.get("type") == "string" or (vals and all(isinstance(v, str) for v in vals)):
            return "other"
        return None

    def _json_types(self, x, seen=0) -> set:
        """The JSON types an alternative's instances may have (integer counts as number)."""
        every = {"object", "array", "string", "number", "boolean", "null"}
        if x is True or seen > 8:
            return every
        if x is False or not isinstance(x, dict):
            return set()
        if "$ref" in x:
            try:
                return self._json_types(self.resolve(x["$ref"], "")[0], seen + 1)
            except Exception:
                return every
        for k in ("anyOf", "oneOf"):
            if isinstance(x.get(k), list):
                return set().union(*(self._json_types(y, seen + 1) for y in x[k]))
        vals = x.get("enum", [x["const"]] if "const" in x else None)
        if isinstance(vals, list):
            out = set()
            for v in vals:
                out.add(
                    "null" if v is None else "boolean" if isinstance(v, bool)
                    else "number" if isinstance(v, (int, float)) else "string" if isinstance(v, str)
                    else "array" if isinstance(v, list) else "object"
                )  # fmt: skip
            return out
        t = x.get("type")
        if t is None:
            return _implied_types(x) or every
        ts = [t] if isinstance(t, str) else t if isinstance(t, list) else []
        return {"number" if y == "integer" else y for y in ts if isinstance(y, str)}

    def _first_free(self, subs):
        return next(i for i, x in enumerate(subs) if self._string_kind(x) == "free")

    def literals(self, s, types, path):
        if "const" in s:
            values, kw = [s["const"]], "const"
        else:
            values, kw = s["enum"], "enum"
            if not isinstance(values, list) or not values:
                raise _err("enum", _ptr(path, "enum"), values, "not a non-empty array")
        for k in (
            "minLength",
            "maxLength",
            "pattern",
            "format",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "properties",
            "items",
        ):
            if k in s:
                raise _err(k, _ptr(path, k), s[k], f"next to '{kw}' (not supported)")

        def has_type(v, t):
            if t == "null":
                return v is None
            if t == "boolean":
                return isinstance(v, bool)
            if t == "string":
                return isinstance(v, str)
            if t == "integer":
                return (
                    isinstance(v, int)
                    and not isinstance(v, bool)
                    or (isinstance(v, float) and v.is_integer())
                )
            if t == "number":
                return isinstance(v, (int, float)) and not isinstance(v, bool)
            if t == "object":
                return isinstance(v, dict)
            return isinstance(v, list)

        keep = []
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise _err(kw, _ptr(path, kw), v, "a non-finite number")
            if any(has_type(v, t) for t in types):
                text = _literal_text(v)
                if text not in keep:
                    keep.append(text)
        return self.alt([self.lit_value(json.loads(t)) for t in keep])

    def lit_value(self, v):
        """One JSON value exactly, with flexible whitespace inside objects and arrays."""
        if isinstance(v, dict):
            parts = [self.lit(b"{"), self.ws()]
            for i, (k, x) in enumerate(v.items()):
                if i:
                    parts += [self.ws(), self.lit(b","), self.ws()]
                parts += [self.lit(_literal_text(k)), self.ws(), self.lit(b":"), self.ws()]
                parts.append(self.lit_value(x))
            return self.seq(*parts, self.ws(), self.lit(b"}"))
        if isinstance(v, list):
            parts = [self.lit(b"["), self.ws()]
            for i, x in enumerate(v):
                if i:
                    parts += [self.ws(), self.lit(b","), self.ws()]
                parts.append(self.lit_value(x))
            return self.seq(*parts, self.ws(), self.lit(b"]"))
        return self.lit(_literal_text(v))

    def string(self, s, path):
        lo, hi = s.get("minLength", 0), s.get("maxLength", BIG)
        for kw, v in (("minLength", lo), ("maxLength", hi)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _err(kw, _ptr(path, kw), v, "not a non-negative integer")
        # a maxLength of BIG (2**30 characters) or more is no limit: no answer that fits a
        # context is that long (2**63 overflowed the int64 tables, a server error)
        hi = min(hi, BIG)
        if "pattern" in s and "format" in s:
            raise _err(
                "format",
                _ptr(path, "format"),
                s["format"],
                "together with 'pattern' (not supported)",
            )
        if ("pattern" in s or "format" in s) and ("minLength" in s or "maxLength" in s):
            kw = "minLength" if "minLength" in s else "maxLength"
            raise _err(
                kw, _ptr(path, kw), s[kw], "together with 'pattern' or 'format' (not supported)"
            )
        if "pattern" in s:
            return self.pattern_string(s["pattern"], _ptr(path, "pattern"), "pattern")
        if "format" in s:
            f = s["format"]
            if f not in FORMATS:
                raise _err(
                    "format",
                    _ptr(path, "format"),
                    f,
                    f"format not supported (supported: {', '.join(FORMATS)})",
                )
            if f in ("hostname", "email"):
                return self.host_string(f == "email")
            return self.pattern_string(_FORMAT_RE[f], _ptr(path, "format"), "format")
        if lo > hi:
            return None
        if lo > MAX_MIN_LENGTH:
            raise _err(
                "minLength", _ptr(path, "minLength"), lo, f"over {MAX_MIN_LENGTH} (table limit)"
            )
        return self.free_string(lo, hi)

    def obj(self, s, path, depth):
        if depth >= MAX_NESTING:
            return None
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise _err("properties", _ptr(path, "properties"), props, "not an object")
        req = s.get("required", [])
        if not isinstance(req, list) or any(not isinstance(r, str) for r in req):
            raise _err("required", _ptr(path, "required"), req, "not an array of strings")
        missing = [r for r in req if r not in props]
        if missing:
            raise _err(
                "required",
                _ptr(path, "required"),
                req,
                f"names {missing[0]!r}, which is not in 'properties'",
            )
        ap = s.get("additionalProperties", False)
        if ap is not False:
            if self.strict:
                raise _err(
                    "additionalProperties",
                    _ptr(path, "additionalProperties"),
                    ap,
                    "must be false with strict: true",
                )
        names = list(props)
        n = len(names)
        reqset = set(req)
        # member fragments, each once
        entries, exits = [], []
        for name in names:
            key = self.lit(b'"' + _canon_str(name) + b'"')
            v = self.schema(props[name], _ptr(path, "properties", name), depth + 1)
            m = self.seq(key, self.ws(), self.lit(b":"), self.ws(), v)
            if m is None:
                if name in reqset:
                    return None
                entries.append(None)
                exits.append(None)
            else:
                entries.append(m[0])
                exits.append(m[1])
        close = self.n.new()  # before the optional trailing whitespace and '}'
        start = self.n.new()
        self.n.edge(start, 1 << ord("{"), (w0 := self.ws())[0])
        after0 = w0[1]
        extra = None
        if ap is not False:

            def member():
                key = self.excluding_key(names)
                v = (
                    self.schema(ap, _ptr(path, "additionalProperties"), depth + 1)
                    if ap is not True
                    else self.any_value(depth + 1, ANY_NESTING)
                )
                return self.seq(key, self.ws(), self.lit(b":"), self.ws(), v)

            m = member()
            if m is not None:
                loop = self.n.new()  # after an extra member
                self.n.e(m[1], loop)
                self.n.e(loop, close)
                comma = self.seq(self.ws(), self.lit(b","), self.ws())
                self.n.e(loop, comma[0])
                self.n.e(comma[1], m[0])
                extra = m[0]

        def after(i):
            """Links the point after member i (i = -1: none yet)."""
            src = after0 if i < 0 else exits[i]
            if src is None:
                return
            if i >= 0:
                comma = self.seq(self.ws(), self.lit(b","), self.ws())
                self.n.e(src, comma[0])
                nxt_src = comma[1]
            else:
                nxt_src = src
            for j in range(i + 1, n):
                if entries[j] is not None:
                    self.n.e(nxt_src, entries[j])
                if names[j] in reqset:
                    break
            else:
                self.n.e(src, close)
                if extra is not None:
                    self.n.e(nxt_src, extra)

        for i in range(-1, n):
            after(i)
        end = self.seq((close, close), self.ws(), self.lit(b"}"))
        return start, end[1]

    def excluding_key(self, names):
        """A key string (canonical spelling) that is none of ``names``: a trie of the
        names' canonical bytes, product with the canonical string automaton."""
        cdelta, cfin = _canon_dfa()
        trie = [{}]
        final = set()
        for nm in names:
            node = 0
            for b in _canon_str(nm):
                if b not in trie[node]:
                    trie[node][b] = len(trie)
                    trie.append({})
                node = trie[node][b]
            final.add(node)
        FREE = -1
        ids: dict = {}
        start, end = self.n.new(), self.n.new()
        todo = []

        def get(st):
            if st not in ids:
                ids[st] = self.n.new()
                self.n.string_states.add(ids[st])
                todo.append(st)
            return ids[st]

        self.n.edge(start, 1 << ord('"'), get((0, 0)))
        while todo:
            node, c = todo.pop()
            here = ids[(node, c)]
            if c == cfin and node not in final:
                self.n.edge(here, 1 << ord('"'), end)
            groups: dict = {}
            for b in range(256):
                c2 = int(cdelta[c, b])
                if c2 < 0:
                    continue
                n2 = trie[node].get(b, FREE) if node != FREE else FREE
                tgt = get((n2, c2))
                groups[tgt] = groups.get(tgt, 0) | (1 << b)
            for tgt, m in groups.items():
                self.n.edge(here, m, tgt)
        return start, end

    def arr(self, s, path, depth):
        if depth >= MAX_NESTING:
            return None
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise _err("prefixItems", _ptr(path, "prefixItems"), prefix, "not an array")
        items = s.get("items", True)
        if isinstance(items, list):
            raise _err("items", _ptr(path, "items"), items, "array form (use prefixItems)")
        lo, hi = s.get("minItems", 0), s.get("maxItems", None)
        for kw, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise _err(kw, _ptr(path, kw), v, "not a non-negative integer")
            if v is not None and v > MAX_ITEMS_UNROLL:
                raise _err(
                    kw,
                    _ptr(path, kw),
                    v,
                    f"over {MAX_ITEMS_UNROLL} (the tables unroll item positions)",
                )
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and lo > hi:
            return None
        k = len(prefix)

        def item(i):
            if i < k:
                return self.schema(prefix[i], _ptr(path, "prefixItems", i), depth + 1)
            if items is True:
                return self.any_value(depth + 1, ANY_NESTING)
            return self.schema(items, _ptr(path, "items"), depth + 1)

        def sep():
            return self.seq(self.ws(), self.lit(b","), self.ws())

        # positions 0..fixed-1 unrolled, then a loop of `items` if unbounded
        fixed = max(k, lo) if hi is None else hi
        if fixed > MAX_ITEMS_UNROLL:
            raise _err(
                "prefixItems",
                _ptr(path, "prefixItems"),
                len(prefix),
                f"over {MAX_ITEMS_UNROLL} positions",
            )
        close = self.n.new()
        start = self.n.new()
        w = self.ws()
        self.n.edge(start, 1 << ord("["), w[0])
        cur = w[1]
        if lo == 0:
            self.n.e(cur, close)
        for i in range(fixed):
            f = item(i)
            if f is None:
                if i < lo:
                    return None
                break
            if i > 0:
                f = self.seq(sep(), f)
            self.n.e(cur, f[0])
            cur = f[1]
            if i + 1 >= lo:
                self.n.e(cur, close)
        else:
            if hi is None:
                f = self.seq(sep(), item(fixed)) if fixed > 0 else None
                if fixed == 0:
                    first = item(0)
                    if first is not None:
                        self.n.e(cur, first[0])
                        self.n.e(first[1], close)
                        loop = self.seq(sep(), item(0))
                        if loop is not None:
                            self.n.e(first[1], loop[0])
                            self.n.e(loop[1], first[1])
                elif f is not None:
                    self.n.e(cur, f[0])
                    self.n.e(f[1], cur)
        end = self.seq((close, close), self.ws(), self.lit(b"]"))
        return start, end[1]


_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}


def _implied_types(s: dict) -> set:
    """The types a schema without ``type`` is taken to mean, from its keywords.

    >>> sorted(_implied_types({"properties": {}, "maxLength": 3}))
    ['object', 'string']
    """
    return {t for t, kws in _TYPE_KEYWORDS.items() if any(k in s for k in kws)}


def _canon_str(s: str) -> bytes:
    return json.dumps(s, ensure_ascii=False)[1:-1].encode("utf-8")


_CANON = None


def _canon_dfa():
    """(delta int16[C, 256], accepting-state id): the canonical spelling of string content."""
    global _CANON
    if _CANON is None:
        # states: 0 char boundary; 1 after '\'; 2..5 \u00XX digits; 6.. utf-8 continuation
        d = np.full((16, 256), -1, np.int16)
        for b in range(0x20, 0x80):
            if b not in (ord('"'), ord("\\")):
                d[0, b] = 0
        d[0, ord("\\")] = 1
        for b in b'"\\bfnrt':
            d[1, b] = 0
        d[1, ord("u")] = 2
        d[2, ord("0")] = 3
        d[3, ord("0")] = 4
        d[4, ord("0")] = 5  # \u000X
        d[4, ord("1")] = 6  # \u001X
        for b in b"0123456789abcdef":
            if int(chr(b), 16) not in (8, 9, 10, 12, 13):
                d[5, b] = 0
            d[6, b] = 0
        # utf-8: 7 = one continuation left, 8 two, 9 three, 10 E0, 11 ED, 12 F0, 13 F4
        d[0, 0xC2:0xE0] = 7
        d[0, 0xE1:0xED] = 8
        d[0, 0xEE:0xF0] = 8
        d[0, 0xE0] = 10
        d[0, 0xED] = 11
        d[0, 0xF0] = 12
        d[0, 0xF1:0xF4] = 9
        d[0, 0xF4] = 13
        d[7, 0x80:0xC0] = 0
        d[8, 0x80:0xC0] = 7
        d[9, 0x80:0xC0] = 8
        d[10, 0xA0:0xC0] = 7
        d[11, 0x80:0xA0] = 7
        d[12, 0x90:0xC0] = 8
        d[13, 0x80:0x90] = 8
        _CANON = (d, 0)
    return _CANON


_H = "[0-9a-fA-F]"
_DATE = (
    r"([1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])-((0[1-9]|1[0-2])-(0[1-9]|1\d|2[0-8])"
    r"|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)"
    r"|(\d\d(0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26]|0[48])00)-02-29"
)
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_DUR_T = r"T(\d+H(\d+M(\d+S)?)?|\d+M(\d+S)?|\d+S)"
_OCT = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H4 = _H + "{1,4}"
_LABEL_RE = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_RE = rf"^{_LABEL_RE}(\.{_LABEL_RE})*$"
_ATEXT = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_RE = rf"^{_ATEXT}+(\.{_ATEXT}+)*$"
_REGION_BYTES = {
    R_HOST: frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."),
    R_LOCAL: frozenset(
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-."
    ),
}
#: ``h_a`` of a token that can never be inside a region (a label over 63 bytes in it).
_H_BAD = 127


def _region_run(kind: int, run: bytes, open_end: bool):
    """(first label, last label, ok) of ``run`` (bytes of region ``kind``): ``ok`` says that
    its complete labels fit and, when the region goes on after it (``open_end``), that a
    valid end is still reachable within the limits (one more byte after '-' or '.')."""
    if kind == R_LOCAL:
        return 0, 0, len(run) + (open_end and run.endswith(b".")) <= LOCAL_MAX
    labs = run.split(b".")
    hy = open_end and run.endswith(b"-")
    ok = all(len(x) <= LABEL_MAX for x in labs[1:-1]) and len(labs[-1]) + hy <= LABEL_MAX
    return len(labs[0]), len(labs[-1]), ok


def _region_tables(vocab_bytes):
    """Per-token effects on the packed region counter ``total << 8 | label`` (arrays
    ``[3, V]``, row = region kind, row 0 = none). For a token read inside region ``k``, its
    prefix run (the bytes up to the first byte outside the region):

    * ``a``: added to the current label for the check ``label + a <= 63`` (the bytes before
      its first '.', plus one if it stays in the region ending in '-'; ``_H_BAD`` if a label
      inside it is too long), ``b``: for ``total + b <= 253`` (64 in an email local part;
      its length, plus one if it stays ending in '-' or '.'); both int8, read every step;
    * ``stay``: all its bytes are region bytes; then the counter becomes
      ``(keep ? cnt : cnt & ~255) + add``; ``plen``: the prefix run's length.

    A token that enters region ``k`` (lands in it from outside) sets the counter to
    ``suf`` (from its bytes after the last non-region byte); ``suf_ok``: that run fits."""
    V = len(vocab_bytes)
    a = np.zeros((3, V), np.int8)
    b = np.zeros((3, V), np.int8)
    stay = np.zeros((3, V), bool)
    keep = np.ones((3, V), bool)
    add = np.zeros((3, V), np.int32)
    suf = np.zeros((3, V), np.int32)
    suf_ok = np.ones((3, V), bool)
    plen = np.zeros((3, V), np.int32)
    for k in (R_HOST, R_LOCAL):
        region = _REGION_BYTES[k]
        for t, tok in enumerate(vocab_bytes):
            i = 0
            while i < len(tok) and tok[i] in region:
                i += 1
            run = tok[:i]
            st = i == len(tok)
            first, last, ok = _region_run(k, run, st)
            dots = run.count(b".")
            host = k == R_HOST
            end_hy = host and st and run.endswith(b"-")
            ends = (b"-", b".") if host else (b".",)
            plen[k, t] = i
            stay[k, t] = st
            a[k, t] = (first + (end_hy and dots == 0)) if ok else _H_BAD
            b[k, t] = min(i + (st and run[-1:] in ends), _H_BAD)
            if k == R_HOST:
                keep[k, t] = dots == 0
                add[k, t] = (i << 8) | (i if dots == 0 else last)
            else:
                add[k, t] = i << 8
            if not st:
                j = len(tok)
                while j > 0 and tok[j - 1] in region:
                    j -= 1
                run = tok[j:]
                first, last, ok = _region_run(k, run, True)
                ok &= first <= LABEL_MAX and len(run) + (run[-1:] in ends) <= HOST_MAX
                suf_ok[k, t] = ok
                suf[k, t] = (len(run) << 8) | (last if k == R_HOST else 0)
    return dict(a=a, b=b, stay=stay, keep=keep, add=add, suf=suf, suf_ok=suf_ok, plen=plen)


_FORMAT_RE = {
    "date": f"^({_DATE})$",
    "time": f"^{_TIME}$",
    "date-time": f"^({_DATE})T{_TIME}$",
    "duration": rf"^P((\d+Y(\d+M(\d+D)?)?|\d+M(\d+D)?|\d+D)({_DUR_T})?|{_DUR_T}|\d+W)$",
    "uuid": f"^{_H}{{8}}-{_H}{{4}}-{_H}{{4}}-{_H}{{4}}-{_H}{{12}}$",
    "ipv4": rf"^{_OCT}(\.{_OCT}){{3}}$",
    "ipv6": (
        f"^(({_H4}:){{7}}{_H4}|({_H4}:){{1,7}}:|({_H4}:){{1,6}}:{_H4}|({_H4}:){{1,5}}(:{_H4}){{1,2}}"
        f"|({_H4}:){{1,4}}(:{_H4}){{1,3}}|({_H4}:){{1,3}}(:{_H4}){{1,4}}|({_H4}:){{1,2}}(:{_H4}){{1,5}}"
        f"|{_H4}:(:{_H4}){{1,6}}|:((:{_H4}){{1,7}}|:))$"
    ),
}


# ----------------------------------------------------------------------------------- DFA
def _closure(nfa: _NFA, states) -> frozenset:
    seen = set(states)
    stack = list(states)
    while stack:
        s = stack.pop()
        for t in nfa.eps[s]:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return frozenset(seen)


def _determinize(nfa: _NFA, start: int, final: int):
    """Subset construction over byte classes. Returns (delta int32[S, 256] (-1 dead),
    the member sets)."""
    classes = [(1 << 256) - 1]
    for m in {m for edges in nfa.edges for m, _ in edges}:
        nxt = []
        for c in classes:
            a, b = c & m, c & ~m
            if a and b:
                nxt += [a, b]
            else:
                nxt.append(c)
        classes = nxt
    cls_of_mask: dict[int, list[int]] = {}
    sets = [_closure(nfa, [start])]
    index = {sets[0]: 0}
    trans: list[dict] = []
    i = 0
    work = 0
    while i < len(sets):
        work += len(sets[i])
        if work > MAX_SUBSET_WORK:
            raise _TooBig(
                f"more than {MAX_SUBSET_WORK} NFA states visited by the subset construction"
            )
        by_class: dict[int, set] = {}
        for s in sets[i]:
            for m, t in nfa.edges[s]:
                cl = cls_of_mask.get(m)
                if cl is None:
                    cl = cls_of_mask[m] = [j for j, c in enumerate(classes) if c & m == c]
                for j in cl:
                    by_class.setdefault(j, set()).add(t)
        row = {}
        memo: dict[frozenset, int] = {}
        for j, tgt in by_class.items():
            key = frozenset(tgt)
            if key not in memo:
                cset = _closure(nfa, tgt)
                if cset not in index:
                    if len(sets) >= MAX_STATES:
                        raise _TooBig(f"more than {MAX_STATES} automaton states")
                    index[cset] = len(sets)
                    sets.append(cset)
                memo[key] = index[cset]
            row[j] = memo[key]
        trans.append(row)
        i += 1
    byte_cls = np.zeros(256, np.int32)
    for j, c in enumerate(classes):
        for b in range(256):
            if c >> b & 1:
                byte_cls[b] = j
    dense = np.full((len(sets), len(classes)), -1, np.int32)
    for i, row in enumerate(trans):
        for j, t in row.items():
            dense[i, j] = t
    return dense[:, byte_cls], sets


# ------------------------------------------------------------------------------ vocabulary
class _Vocab:
    """Per-vocabulary host data: token bytes, the byte trie of the usable tokens and the
    free-string template walk (computed once per vocabulary, cached)."""

    def __init__(self, vocab_bytes, eos_id, specials):
        V = len(vocab_bytes)
        self.V = V
        self.tok, self.lengths = token_matrix(vocab_bytes)
        usable = np.ones(V, bool)
        usable[list(specials)] = False
        usable[eos_id] = False
        usable &= self.lengths > 0
        self.usable = usable
        self.first_count = np.bincount(self.tok[usable, 0], minlength=256)
        two = usable & (self.lengths >= 2)
        pair = self.tok[two, 0].astype(np.int64) * 256 + self.tok[two, 1]
        self.pair_count = np.bincount(pair, minlength=65536).reshape(256, 256)
        self.single_count = np.bincount(self.tok[usable & (self.lengths == 1), 0], minlength=256)
        self.ws_only = (
            np.array([len(b) > 0 and all(c in _WS for c in b) for b in vocab_bytes], bool) & usable
        )
        # trie
        children: list[dict] = [{}]
        terms: dict[int, list[int]] = {}
        for t in np.flatnonzero(usable):
            node = 0
            for b in vocab_bytes[t]:
                nx = children[node].get(b)
                if nx is None:
                    nx = children[node][b] = len(children)
                    children.append({})
                node = nx
            terms.setdefault(node, []).append(int(t))
        n = len(children)
        self.ch_count = np.array([len(c) for c in children], np.int64)
        self.ch_start = np.concatenate([[0], np.cumsum(self.ch_count)[:-1]]).astype(np.int64)
        self.ch_byte = np.fromiter((b for c in children for b in c), np.int64)
        self.ch_node = np.fromiter((x for c in children for x in c.values()), np.int64)
        self.term_count = np.zeros(n, np.int64)
        for k, v in terms.items():
            self.term_count[k] = len(v)
        self.term_start = np.concatenate([[0], np.cumsum(self.term_count)[:-1]]).astype(np.int64)
        flat = np.zeros(int(self.term_count.sum()), np.int64)
        for k, v in terms.items():
            flat[self.term_start[k] : self.term_start[k] + len(v)] = v
        self.term_tok = flat
        self._template()
        self.region = _region_tables(vocab_bytes)

    def _template(self):
        """tmpl_next int16[14, V]: sub-state after the token staying in the string (-1 dead
        or leaves the string); tmpl_nch int8[14, V]: characters started; exits[σ]: tokens
        that reach the closing quote from sub-state σ."""
        V, tok, lengths = self.V, self.tok, self.lengths
        self.tmpl_next = np.full((N_SUB, V), -1, np.int16)
        self.tmpl_nch = np.zeros((N_SUB, V), np.int8)
        self.exits = []
        ids = np.flatnonzero(self.usable)
        for sig in range(N_SUB):
            st = np.full(len(ids), sig, np.int64)
            nch = np.zeros(len(ids), np.int64)
            ex = np.zeros(len(ids), bool)
            for p in range(tok.shape[1]):
                live = (p < lengths[ids]) & (st >= 0)
                if not live.any():
                    break
                b = tok[ids, p]
                ns = np.where(live, _TDELTA[np.maximum(st, 0), b], st)
                nch += live & (st == T_CH) & (ns >= 0)
                ex |= live & (ns == _EXIT)
                st = np.where(live & (ns == _EXIT), -1, ns)
            inside = (st >= 0) & ~ex
            self.tmpl_next[sig, ids[inside]] = st[inside]
            self.tmpl_nch[sig, ids[inside]] = np.minimum(nch[inside], 127)
            self.exits.append(ids[ex])
        one = (self.tmpl_next[T_CH] == T_CH) & (self.tmpl_nch[T_CH] == 1)
        self.has_one_char = bool(one.any())
        self.tmpl_targets = [
            np.unique(self.tmpl_next[s][self.tmpl_next[s] >= 0]) for s in range(N_SUB)
        ]
        self.tmpl_targets0 = [
            np.unique(self.tmpl_next[s][(self.tmpl_next[s] >= 0) & (self.tmpl_nch[s] == 0)])
            for s in range(N_SUB)
        ]


_VOCABS: dict = {}


def _vocab_key(vocab_bytes, eos_id, special_ids):
    h = hashlib.sha1()
    for b in vocab_bytes:
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return (h.hexdigest(), int(eos_id), tuple(sorted(int(i) for i in special_ids)))


_KEY_MEMO: dict = {}


def _memo_key(vocab_bytes, eos_id, special_ids):
    memo = (id(vocab_bytes), len(vocab_bytes), int(eos_id), tuple(sorted(special_ids)))
    hit = _KEY_MEMO.get(memo)
    if hit is not None and hit[0] is vocab_bytes:  # the same object: skip hashing
        return hit[1]
    key = _vocab_key(vocab_bytes, eos_id, special_ids)
    _KEY_MEMO[memo] = (vocab_bytes, key)
    return key


def _get_vocab(vocab_bytes, eos_id, special_ids):
    key = _memo_key(vocab_bytes, eos_id, special_ids)
    if key not in _VOCABS:
        _VOCABS[key] = _Vocab(vocab_bytes, key[1], key[2])
    return key, _VOCABS[key]


#: The per-vocabulary arrays a :class:`SchemaPool` holds from the start (its template rows,
#: whitespace tokens and region tables).
_POOL_TEMPLATE = ("tmpl_next", "tmpl_nch", "ws_only") + tuple(
    "h_" + k for k in ("a", "b", "stay", "keep", "add", "suf")
)


def _pool_template(vocab_bytes, eos_id, special_ids) -> tuple[tuple, dict]:
    """(vocabulary key, :data:`_POOL_TEMPLATE` arrays): from the vocabulary's host data when
    this process has it, else kept on disk between processes (:mod:`disk_cache`), so an
    engine that never sees a schema does not build the vocabulary's trie and token walks
    (about 2 s for SmolLM2) to start."""
    key = _memo_key(vocab_bytes, eos_id, special_ids)

    def compute():
        _, voc = _get_vocab(vocab_bytes, eos_id, special_ids)
        region = {"h_" + k: voc.region[k] for k in ("a", "b", "stay", "keep", "add", "suf")}
        return dict(tmpl_next=voc.tmpl_next, tmpl_nch=voc.tmpl_nch, ws_only=voc.ws_only, **region)

    if key in _VOCABS:
        return key, compute()
    return key, disk_cache.cached_arrays("schema-pool", key, __file__, _POOL_TEMPLATE, compute)


# ------------------------------------------------------------------------------- token walks
class _Meta:
    """Per-DFA-state counter metadata for the walks."""

    def __init__(self, cinst, csub, clo, chi):
        self.cinst, self.csub, self.clo, self.chi = cinst, csub, clo, chi

    def step(self, prev, ns, cnt, exitn, started):
        """Counter update for one byte ``prev -> ns``; returns (ok, cnt, exitn, started)."""
        pi = self.cinst[prev]
        ni = np.where(ns >= 0, self.cinst[np.maximum(ns, 0)], -1)
        same = (pi >= 0) & (pi == ni)
        inc = same & (self.csub[prev] == T_CH)
        leave = (pi >= 0) & (ni != pi)
        pic = np.maximum(pi, 0)
        ok_leave = (cnt >= self.clo[pic]) & (cnt <= self.chi[pic])
        first = leave & started
        exitn = np.where(first, cnt, exitn)
        ok = ~leave | first | ok_leave
        started = started & ~leave
        enter = (ni >= 0) & (ni != pi)
        cnt = np.where(enter, 0, cnt + inc)
        ok &= (ni < 0) | (cnt <= self.chi[np.maximum(ni, 0)])
        return ok, cnt, exitn, started


def _trie_walk(voc: _Vocab, delta, meta: _Meta, starts):
    """All (state, token) pairs alive from ``starts`` (non-template states), walking the
    vocabulary trie. Returns arrays (q, tok, next, exitn, newcnt)."""
    q = np.asarray(starts, np.int64)
    node = np.zeros(len(q), np.int64)
    st = q.copy()
    cnt = np.zeros(len(q), np.int64)
    out = []
    work = 0
    while len(q):
        cc = voc.ch_count[node]
        total = int(cc.sum())
        if total == 0:
            break
        work += total
        if work > MAX_WALK_PAIRS:
            e = _TooBig(f"more than {MAX_WALK_PAIRS} (state, token prefix) pairs to walk")
            e.states = np.unique(q)
            raise e
        rep = np.repeat(np.arange(len(q)), cc)
        off = np.arange(total) - np.repeat(np.cumsum(cc) - cc, cc)
        e = voc.ch_start[node][rep] + off
        prev = st[rep]
        ns = delta[prev, voc.ch_byte[e]]
        c = cnt[rep]
        ok, c, _, _ = meta.step(prev, ns, c, np.full(total, -1), np.zeros(total, bool))
        keep = (ns >= 0) & ok
        q, node, st, cnt = q[rep][keep], voc.ch_node[e][keep], ns[keep], c[keep]
        tc = voc.term_count[node]
        if tc.any():
            r2 = np.repeat(np.arange(len(q)), tc)
            o2 = np.arange(int(tc.sum())) - np.repeat(np.cumsum(tc) - tc, tc)
            toks = voc.term_tok[voc.term_start[node][r2] + o2]
            out.append((q[r2], toks, st[r2], np.full(len(r2), -1), cnt[r2]))
    return out


def _flat_walk(voc: _Vocab, delta, meta: _Meta, q, t):
    """Walk tokens ``t`` from states ``q`` (pairs), the start inside a counted string
    (``exitn`` records the characters before its closing quote). Returns the live pairs."""
    q = np.asarray(q, np.int64)
    t = np.asarray(t, np.int64)
    st = q.copy()
    cnt = np.zeros(len(q), np.int64)
    exitn = np.full(len(q), -1, np.int64)
    started = meta.cinst[q] >= 0
    alive = np.ones(len(q), bool)
    L = voc.lengths[t]
    for p in range(int(L.max(initial=0))):
        live = alive & (p < L)
        if not live.any():
            break
        b = voc.tok[t, p]
        ns = delta[st, b]
        ok, c2, e2, s2 = meta.step(st, ns, cnt, exitn, started)
        good = (ns >= 0) & ok
        alive &= ~live | good
        upd = live & good
        st = np.where(upd, ns, st)
        cnt = np.where(upd, c2, cnt)
        exitn = np.where(upd, e2, exitn)
        started = np.where(upd, s2, started)
    return q[alive], t[alive], st[alive], exitn[alive], cnt[alive]


# --------------------------------------------------------------------------------- compile
@struct.dataclass
class CompiledSchema:
    """Host (numpy) tables of one schema, in local state ids (0..S-1); written into a
    :class:`Pool` by :meth:`SchemaPool.add`. ``min_tokens`` is the fewest tokens of a
    complete answer (a smaller ``max_tokens`` is refused)."""

    key: str = struct.field(pytree_node=False)
    vocab_key: tuple = struct.field(pytree_node=False)
    start: int = struct.field(pytree_node=False)
    min_tokens: int = struct.field(pytree_node=False)
    n_states: int = struct.field(pytree_node=False)
    tables: dict = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        """Bytes this schema takes in a pool (per-state arrays, sparse entries, dense rows)."""
        t = self.tables
        per_state = 4 * 9 + 3  # 9 int32 arrays and 3 bool arrays per state in a Pool
        return (
            self.n_states * per_state
            + len(t["sp_tok"]) * 16
            + t["dense"].shape[0] * t["dense"].shape[1] * 3
        )


def canonical(schema: Any) -> str:
    """The schema as compact JSON text, keys in the order given: the cache key and the
    hashable form stored in SamplingParams. Not sorted: ``properties`` are generated in the
    order the schema declares them (as OpenAI's structured outputs do; a field such as
    ``reasoning`` declared before ``answer`` comes first), so two schemas that differ only in
    that order are different schemas.

    >>> canonical({"type": "object", "properties": {"b": {}, "a": {}}})
    '{"type":"object","properties":{"b":{},"a":{}}}'
    """
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


#: How many compiled schemas :func:`compile_schema` keeps (least recently used dropped
#: first). A compiled schema holds about 30 KB of tables with the real vocabulary and a job
#: may bring a new schema with every request, so the cache is bounded; a dropped schema is
#: compiled again if it comes back (the device pool keys schemas by content, not by object).
SCHEMA_CACHE_SIZE = 256

_SCHEMAS: OrderedDict = OrderedDict()


def compile_schema(
    schema: Any,
    vocab_bytes: Sequence[bytes],
    *,
    eos_id: int,
    special_ids: Iterable[int] = (),
    strict: bool = True,
) -> CompiledSchema:
    """Compile a JSON Schema (a dict, or its canonical JSON text) against a vocabulary.

    Cached by (vocabulary, schema content, strict). Raises
    :class:`~jaxsample.params.InvalidRequestError` naming the keyword and its JSON pointer
    for anything outside the supported subset (docs/constraints.md).

    Example::

        c = compile_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                            "required": ["a"], "additionalProperties": False},
                           vocab_bytes, eos_id=eos)
        c.min_tokens   # fewest tokens of a valid answer
    """
    text = schema if isinstance(schema, str) else canonical(schema)
    vkey, voc = _get_vocab(vocab_bytes, eos_id, special_ids)
    key = (vkey, text, bool(strict))
    if key in _SCHEMAS:
        _SCHEMAS.move_to_end(key)
        return _SCHEMAS[key]
    obj = json.loads(text) if isinstance(schema, str) else schema
    compiled = _SCHEMAS[key] = _compile(obj, voc, vkey, text, bool(strict))
    while len(_SCHEMAS) > max(1, SCHEMA_CACHE_SIZE):
        _SCHEMAS.popitem(last=False)
    return compiled


def _compile(schema, voc: _Vocab, vkey, text, strict) -> CompiledSchema:
    b = _Builder(schema, strict)
    try:
        frag = b.schema(schema, "", 0)
        if frag is None:
            raise _err("schema", "", schema, "no instance satisfies it (within the nesting limit)")
        whole = frag  # no whitespace before or after the value (then only EOS)
        delta, sets = _determinize(b.n, whole[0], whole[1])
    except _TooBig as e:
        raise _err("schema", "", "...", f"too large for the tables: {e}") from None
    except RecursionError:
        raise _err("schema", "", "...", "nested too deeply to compile") from None
    nfa = b.n
    S = len(sets)
    limits = nfa.limits
    tinst = np.full(S, -1, np.int64)
    tsub = np.full(S, -1, np.int64)
    in_string = np.zeros(S, bool)
    accept = np.zeros(S, bool)
    hkind = np.zeros(S, np.int64)
    for i, st in enumerate(sets):
        accept[i] = whole[1] in st
        kinds = {nfa.region[x] for x in st} - {0}
        if len(kinds) > 1:
            where = max(nfa.path[x] for x in st if nfa.region[x])
            raise _err(
                "format",
                _ptr(where, "format"),
                "...",
                "'email' and 'hostname' as alternatives of one string (anyOf) are not supported",
            )
        hkind[i] = kinds.pop() if kinds else 0
        tags = [nfa.tag[x] for x in st if nfa.tag[x] is not None]
        in_string[i] = bool(tags) or any(x in nfa.string_states for x in st)
        if len(st) == 1 and tags:
            tinst[i], tsub[i] = tags[0]
        elif any(limits[t[0]] != (0, BIG) for t in tags):
            raise _err(
                "minLength",
                "",
                "...",
                "a length-limited string that overlaps another string "
                "alternative (anyOf) is not supported",
            )
    # layout: non-template states first, then template instances in blocks of N_SUB
    blocks = {}
    for i in np.flatnonzero(tinst >= 0):
        blocks.setdefault(int(tinst[i]), [None] * N_SUB)[tsub[i]] = i
    order = [i for i in range(S) if tinst[i] < 0]
    block_base = {}
    for inst, members in sorted(blocks.items()):
        if any(m is None for m in members):  # an incomplete instance: keep as plain states
            order += [m for m in members if m is not None]
            for m in members:
                if m is not None:
                    tinst[m] = -1
            continue
        block_base[inst] = len(order)
        order += members
    perm = np.asarray(order, np.int64)
    inv = np.empty(S, np.int64)
    inv[perm] = np.arange(S)
    delta = np.where(delta >= 0, inv[np.maximum(delta, 0)], -1)[perm]
    tinst, tsub, in_string, accept = tinst[perm], tsub[perm], in_string[perm], accept[perm]
    hkind = hkind[perm]
    start = int(inv[0])
    is_t = tinst >= 0
    counted = np.array([is_t[i] and limits[tinst[i]] != (0, BIG) for i in range(S)], bool)
    cinst = np.where(counted, tinst, -1)
    clo = np.array([lo for lo, _ in limits] + [0], np.int64)
    chi = np.array([hi for _, hi in limits] + [BIG], np.int64)
    meta = _Meta(cinst, np.where(is_t, tsub, -1), clo, chi)
    if counted.any() and not voc.has_one_char:
        raise _err("minLength", "", "...", "the vocabulary has no one-character token")
    base = np.zeros(S, np.int64)
    for i in np.flatnonzero(is_t):
        base[i] = block_base[int(tinst[i])]

    # walks: non-template states through the trie; template states: only their exit tokens
    def blame(states):
        """(keyword, pointer) of the schema that made most NFA states of these states."""
        paths = [nfa.path[x] for i in states for x in sets[perm[i]] if x in nfa.string_states]
        where = max(set(paths), key=paths.count) if paths else ""
        try:
            node = b.resolve("#" + where, "")[0] if where else schema
        except Exception:
            node = {}
        kws = [
            k
            for k in ("pattern", "format", "enum", "const")
            if isinstance(node, dict) and k in node
        ]
        kw = kws[0] if kws else "type"
        return kw, _ptr(where, kw)

    try:
        parts = _trie_walk(voc, delta, meta, np.flatnonzero(~is_t))
    except _TooBig as e:
        kw, ptr = blame(e.states)
        raise _err(kw, ptr, "...", f"too large for the tables: {e}") from None
    tq, tt = [], []
    for i in np.flatnonzero(is_t):
        ex = voc.exits[tsub[i]]
        tq.append(np.full(len(ex), i))
        tt.append(ex)
    if tq:
        parts.append(_flat_walk(voc, delta, meta, np.concatenate(tq), np.concatenate(tt)))
    if parts:
        eq, et, en, ee, ec = (np.concatenate([p[k] for p in parts]) for k in range(5))
    else:
        eq = et = en = ee = ec = np.zeros(0, np.int64)
    keep = _region_static(voc, delta, hkind, eq, et, en)
    eq, et, en, ee, ec = eq[keep], et[keep], en[keep], ee[keep], ec[keep]

    # costs: Bellman-Ford over deduplicated edges (src, dst, extra)
    cmin = np.where(counted, clo[np.maximum(cinst, 0)], 0)
    cmax = np.where(counted, chi[np.maximum(cinst, 0)], BIG)
    extra = np.where(counted[en], np.maximum(cmin[en] - ec, 0), 0)
    use = ~counted[eq] | (ee == 0)
    # inside a hostname / email region only moves of at most one byte: a path that the
    # byte counters never block (from any state the device allows)
    rk = hkind[eq]
    rplen = voc.region["plen"][rk, et]
    use &= (rk == 0) | (rplen == 0) | (voc.region["stay"][rk, et] & (rplen <= 1))
    src, dst, ext = [eq[use]], [en[use]], [extra[use]]
    for i in np.flatnonzero(is_t):
        tg = voc.tmpl_targets0[tsub[i]] if counted[i] else voc.tmpl_targets[tsub[i]]
        src.append(np.full(len(tg), i))
        dst.append(base[i] + tg)
        ext.append(np.zeros(len(tg), np.int64))
    src, dst, ext = np.concatenate(src), np.concatenate(dst), np.concatenate(ext)
    mx = int(ext.max(initial=0)) + 1
    code = np.unique((src * S + dst) * mx + ext)
    ed = np.stack([code // mx // S, code // mx % S, code % mx], 1)
    f = np.where(accept, 0, INF).astype(np.int64)
    for _ in range(S + 2):
        new = f.copy()
        np.minimum.at(new, ed[:, 0], 1 + f[ed[:, 1]] + ed[:, 2])
        new = np.minimum(new, INF)
        if np.array_equal(new, f):
            break
        f = new
    if f[start] >= INF:
        raise _err("schema", "", "...", "no answer is reachable with this vocabulary")
    # drop entries into states that cannot complete
    live = f[en] < INF
    eq, et, en, ee, ec = eq[live], et[live], en[live], ee[live], ec[live]

    # whitespace: where every whitespace-only token leads to one state, one entry per state
    ws_next = np.full(S, -1, np.int64)
    n_ws = int(voc.ws_only.sum())
    is_ws = voc.ws_only[et] & (ee < 0) & ~is_t[eq]
    if is_ws.any():
        wq, wn = eq[is_ws], en[is_ws]
        cnt_ws = np.bincount(wq, minlength=S)
        lo_n = np.full(S, INF, np.int64)
        hi_n = np.full(S, -1, np.int64)
        np.minimum.at(lo_n, wq, wn)
        np.maximum.at(hi_n, wq, wn)
        uniform = (cnt_ws == n_ws) & (lo_n == hi_n) & ~counted[np.maximum(hi_n, 0)]
        ws_next[uniform] = hi_n[uniform]
        drop = is_ws & uniform[eq]
        eq, et, en, ee, ec = eq[~drop], et[~drop], en[~drop], ee[~drop], ec[~drop]

    # sparse lists or dense rows
    orderk = np.lexsort((et, eq))
    eq, et, en, ee, ec = eq[orderk], et[orderk], en[orderk], ee[orderk], ec[orderk]
    counts = np.bincount(eq, minlength=S)
    dense_states = np.flatnonzero(counts > SPARSE_MAX)
    dense_states = dense_states[~is_t[dense_states]]
    if len(dense_states) > MAX_DENSE_STATES:
        kw, ptr = blame(dense_states)
        raise _err(
            kw,
            ptr,
            "...",
            f"{len(dense_states)} string states with over {SPARSE_MAX} "
            f"valid tokens each (pattern, format or enum strings next to other strings); the "
            f"tables hold {MAX_DENSE_STATES}",
        )
    dense = np.full((len(dense_states), voc.V), -1, np.int16)
    dense_nch = np.zeros((len(dense_states), voc.V), np.int8)
    drow = np.full(S, -1, np.int64)
    drow[dense_states] = np.arange(len(dense_states))
    in_dense = drow[eq] >= 0
    r = drow[eq[in_dense]]
    dense[r, et[in_dense]] = en[in_dense]
    dense_nch[r, et[in_dense]] = np.minimum(ec[in_dense], 127)
    sq, st_, sn, se, sc = (a[~in_dense] for a in (eq, et, en, ee, ec))
    sp_len = np.bincount(sq, minlength=S)
    sp_start = np.concatenate([[0], np.cumsum(sp_len)[:-1]])
    tables = dict(
        ws_next=ws_next.astype(np.int32),
        tsub=np.where(is_t, tsub, -1).astype(np.int32),
        hkind=hkind.astype(np.int32),
        base=base.astype(np.int32),
        drow=drow.astype(np.int32),
        cost=np.minimum(f, INF).astype(np.int32),
        cmin=cmin.astype(np.int32),
        cmax=np.minimum(cmax, BIG).astype(np.int32),
        counted=counted,
        accept=accept,
        in_string=in_string,
        sp_start=sp_start.astype(np.int32),
        sp_len=sp_len.astype(np.int32),
        sp_tok=st_.astype(np.int32),
        sp_next=sn.astype(np.int32),
        sp_exit=se.astype(np.int32),
        sp_new=sc.astype(np.int32),
        dense=dense,
        dense_nch=dense_nch,
        delta=delta.astype(np.int32),
    )
    return CompiledSchema(
        key=hashlib.sha1(text.encode()).hexdigest() + ("s" if strict else "n"),
        vocab_key=vkey,
        start=start,
        min_tokens=int(f[start]),
        n_states=S,
        tables=tables,
    )


def _region_static(voc: _Vocab, delta, hkind, eq, et, en):
    """bool mask of the walked (state, token, next) pairs that the region counters allow
    whatever the counter: a token's labels must fit where they are complete inside it, and a
    token that enters a region must leave a reachable valid end (the checks that depend on
    the counter run on the device)."""
    rt = voc.region
    kq, kn = hkind[eq], hkind[en]
    ok = rt["a"][kq, et] < _H_BAD
    entering = (kn > 0) & ~((kq == kn) & rt["stay"][kn, et])
    ok &= ~entering | rt["suf_ok"][kn, et]
    # a region both entered and left inside one token: only tokens longer than a label
    # (plus its two delimiters) can break a limit there; walk those exactly
    if hkind.any():
        for i in np.flatnonzero(ok & (voc.lengths[et] > LABEL_MAX + 2)):
            ok[i] = _inner_runs_fit(voc, delta, hkind, int(eq[i]), int(et[i]))
    return ok


def _inner_runs_fit(voc: _Vocab, delta, hkind, q, t) -> bool:
    toks = voc.tok[t, : voc.lengths[t]]
    run = None  # bytes of a region entered inside this token
    for byte in toks:
        k = hkind[q]
        nq = int(delta[q, byte])
        if nq < 0:
            return True  # not a live pair (the walk decides)
        inside = k > 0 and byte in _REGION_BYTES[k]
        if run is not None and k > 0 and not inside:
            first, _, fits = _region_run(k, bytes(run), False)
            if not fits or first > LABEL_MAX or len(run) > HOST_MAX:
                return False
            run = None
        if run is not None and inside:
            run.append(byte)
        if hkind[nq] > 0 and not inside:
            run = bytearray()
        q = nq
    return True


def min_tokens(compiled: CompiledSchema) -> int:
    """The fewest tokens of a complete valid answer (refuse ``max_tokens`` below it)."""
    return compiled.min_tokens


# ------------------------------------------------------------------------------------ pool
#: Bucketed pool capacities: (states, sparse entries, dense rows). Pick by workload.
POOL_SIZES = {
    "small": (1 << 14, 1 << 19, 64),
    "medium": (1 << 16, 1 << 21, 128),
    "large": (1 << 18, 1 << 23, 256),
}
_N_GLOBAL_ROWS = 1 + N_SUB  # row 0: nothing; rows 1..14: the free-string template
DEAD = 0  # pool state 0: nothing allowed


@struct.dataclass
class Pool:
    """Device tables of every schema in a pool (S states, E sparse entries, R dense rows,
    V tokens), shared by all rows: no batch axis. State 0 is DEAD."""

    base: jax.Array  # shape=(S,), int32; next = base + row value for dense-row tokens
    drow: jax.Array  # shape=(S,), int32; the state's dense row (0 = none)
    ws_next: jax.Array  # shape=(S,), int32; next state of every whitespace-only token (-1: n/a)
    cost: jax.Array  # shape=(S,), int32; fewest tokens to complete (INF: never) | cmin << 21
    cmin: jax.Array  # shape=(S,), int32; counted string: minLength (else 0)
    cmax: jax.Array  # shape=(S,), int32; counted string: maxLength (else BIG)
    counted: jax.Array  # shape=(S,), bool; inside a length-limited free string
    accept: jax.Array  # shape=(S,), bool; the text is a complete valid instance
    hkind: jax.Array  # shape=(S,), int32; hostname / email region kind (0: none)
    in_string: jax.Array  # shape=(S,), bool; inside a string (whitespace is content)
    sp_start: jax.Array  # shape=(S,), int32; first sparse entry
    sp_len: jax.Array  # shape=(S,), int32; sparse entries (<= K)
    sp_tok: jax.Array  # shape=(E,), int32; token id
    sp_next: jax.Array  # shape=(E,), int32; next state
    sp_exit: jax.Array  # shape=(E,), int32; chars before leaving the counted string (-1: n/a)
    sp_new: jax.Array  # shape=(E,), int32; counter after the token
    rows: jax.Array  # shape=(R, V), int16; next state minus base (-1: invalid)
    rows_nch: jax.Array  # shape=(R, V), int8; characters the token adds to the counter
    ws_only: jax.Array  # shape=(V,), bool
    h_a: jax.Array  # shape=(3, V), int8; per region kind: label check (_region_tables)
    h_b: jax.Array  # shape=(3, V), int8; per region kind: total check
    h_stay: jax.Array  # shape=(3, V), bool; the token stays inside the region
    h_keep: jax.Array  # shape=(3, V), bool; it keeps the current label (no '.')
    h_add: jax.Array  # shape=(3, V), int32; counter increment when it stays
    h_suf: jax.Array  # shape=(3, V), int32; counter when it enters the region
    eos_id: jax.Array  # shape=(), int32
    K: int = struct.field(pytree_node=False, default=SPARSE_MAX)

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))


class PoolFull(RuntimeError):
    """The pool has no room for a schema even after evicting unused ones."""


class Handle:
    """A schema's place in a pool: ``start`` is the initial state of a row using it."""

    def __init__(self, key, start, s_off, n_s, e_off, n_e, rows, min_tokens):
        self.key, self.start, self.min_tokens = key, start, min_tokens
        self.s_off, self.n_s, self.e_off, self.n_e, self.rows = s_off, n_s, e_off, n_e, rows
        self.refs = 0


class _Alloc:
    """First-fit allocator of ranges in [lo, cap)."""

    def __init__(self, lo, cap):
        self.lo, self.cap, self.used = lo, cap, {}

    def take(self, n):
        pos = self.lo
        for off in sorted(self.used):
            if off - pos >= n:
                break
            pos = max(pos, off + self.used[off])
        if pos + n > self.cap:
            return None
        self.used[pos] = n
        return pos

    def free(self, off):
        self.used.pop(off, None)


class SchemaPool:
    """Host manager of a device :class:`Pool`: adds compiled schemas as data.

    ``add`` returns a :class:`Handle` (refcounted; ``release`` when the row finishes);
    schemas with no rows stay cached and are evicted, least recently used first, when room
    is needed. Every ``pool`` has the same shapes, so a jitted loop never recompiles.

    Example::

        sp = SchemaPool(vocab_bytes, eos_id=eos, special_ids=specials, size="small")
        h = sp.add(compile_schema(schema, vocab_bytes, eos_id=eos, special_ids=specials))
        mask = allowed(sp.pool, init_state(h.start), 100)
    """

    def __init__(self, vocab_bytes, *, eos_id, special_ids=(), size="small"):
        S, E, R = POOL_SIZES[size]
        self.vkey, tmpl = _pool_template(vocab_bytes, eos_id, special_ids)
        V = len(vocab_bytes)
        self.np = dict(
            base=np.zeros(S, np.int32),
            drow=np.zeros(S, np.int32),
            ws_next=np.full(S, -1, np.int32),
            cost=np.full(S, INF, np.int32),
            cmin=np.zeros(S, np.int32),
            cmax=np.full(S, BIG, np.int32),
            counted=np.zeros(S, bool),
            accept=np.zeros(S, bool),
            hkind=np.zeros(S, np.int32),
            in_string=np.zeros(S, bool),
            sp_start=np.zeros(S, np.int32),
            sp_len=np.zeros(S, np.int32),
            sp_tok=np.zeros(E, np.int32),
            sp_next=np.zeros(E, np.int32),
            sp_exit=np.full(E, -1, np.int32),
            sp_new=np.zeros(E, np.int32),
            rows=np.full((R, V), -1, np.int16),
            rows_nch=np.zeros((R, V), np.int8),
        )
        self.np["rows"][1:_N_GLOBAL_ROWS] = tmpl["tmpl_next"]
        self.np["rows_nch"][1:_N_GLOBAL_ROWS] = tmpl["tmpl_nch"]
        self._ws_only = jnp.asarray(tmpl["ws_only"])
        self._region = {k: jnp.asarray(v) for k, v in tmpl.items() if k.startswith("h_")}
        self._eos = jnp.int32(eos_id)
        self.states = _Alloc(1, S)
        self.entries = _Alloc(0, E)
        self.free_rows = list(range(_N_GLOBAL_ROWS, R))
        self.handles: dict[str, Handle] = {}
        self._lru: list[str] = []
        self._dev: dict = {}
        self._dirty = set(self.np)

    @property
    def pool(self) -> Pool:
        """The device pytree (re-uploads only the arrays changed since the last call)."""
        for k in self._dirty:
            self._dev[k] = jnp.asarray(self.np[k])
        self._dirty = set()
        return Pool(**self._dev, ws_only=self._ws_only, **self._region, eos_id=self._eos)

    def _evict_one(self) -> bool:
        for key in self._lru:
            h = self.handles[key]
            if h.refs == 0:
                self._lru.remove(key)
                del self.handles[key]
                self.states.free(h.s_off)
                self.entries.free(h.e_off)
                self.free_rows += h.rows
                self.np["sp_len"][h.s_off : h.s_off + h.n_s] = 0
                self.np["drow"][h.s_off : h.s_off + h.n_s] = 0
                self.np["ws_next"][h.s_off : h.s_off + h.n_s] = -1
                self.np["hkind"][h.s_off : h.s_off + h.n_s] = 0
                self._dirty |= {"sp_len", "drow", "ws_next", "hkind"}
                return True
        return False

    def add(self, c: CompiledSchema) -> Handle:
        """Write ``c`` into the pool (or reuse it if present); returns its handle, refs + 1."""
        if c.vocab_key != self.vkey:
            raise ValueError("schema compiled for another vocabulary")
        h = self.handles.get(c.key)
        if h is None:
            t = c.tables
            n_e, n_r = len(t["sp_tok"]), t["dense"].shape[0]
            while True:
                s_off = self.states.take(c.n_states)
                e_off = self.entries.take(max(n_e, 1)) if s_off is not None else None
                ok = s_off is not None and e_off is not None and len(self.free_rows) >= n_r
                if ok:
                    break
                if s_off is not None:
                    self.states.free(s_off)
                if e_off is not None:
                    self.entries.free(e_off)
                if not self._evict_one():
                    raise PoolFull(
                        f"schema needs {c.n_states} states, {n_e} entries, {n_r} rows; pool full"
                    )
            rows = [self.free_rows.pop(0) for _ in range(n_r)]
            self._write(c, s_off, e_off, rows)
            h = Handle(c.key, s_off + c.start, s_off, c.n_states, e_off, n_e, rows, c.min_tokens)
            self.handles[c.key] = h
        else:
            self._lru.remove(c.key)
        self._lru.append(c.key)
        h.refs += 1
        return h

    def release(self, h: Handle) -> None:
        """One row using ``h`` finished."""
        h.refs = max(0, h.refs - 1)

    def _write(self, c, s_off, e_off, rows):
        t, a, n = c.tables, self.np, c.n_states
        sl = slice(s_off, s_off + n)
        is_t = t["tsub"] >= 0
        drow = np.where(is_t, 1 + t["tsub"], 0)
        dense = t["drow"] >= 0
        drow = np.where(dense, np.asarray(rows + [0], np.int32)[t["drow"]], drow)
        a["drow"][sl] = drow
        a["base"][sl] = s_off + t["base"]
        a["ws_next"][sl] = np.where(t["ws_next"] >= 0, s_off + t["ws_next"], -1)
        for k in ("cmin", "cmax", "counted", "accept", "hkind", "in_string", "sp_len"):
            a[k][sl] = t[k]
        a["cost"][sl] = t["cost"] | (t["cmin"] << _CMIN_SHIFT)
        a["sp_start"][sl] = e_off + t["sp_start"]
        el = slice(e_off, e_off + len(t["sp_tok"]))
        a["sp_tok"][el] = t["sp_tok"]
        a["sp_next"][el] = s_off + t["sp_next"]
        a["sp_exit"][el] = t["sp_exit"]
        a["sp_new"][el] = t["sp_new"]
        for i, r in enumerate(rows):
            a["rows"][r] = t["dense"][i]
            a["rows_nch"][r] = t["dense_nch"][i]
        self._dirty |= set(a) - ({"rows", "rows_nch"} if not rows else set())


# ---------------------------------------------------------------------------------- device
class State(struct.PyTreeNode):
    """One row's schema state."""

    q: jax.Array  # shape=(), int32; absolute pool state (0 = DEAD)
    cnt: jax.Array  # shape=(), int32; characters so far in a length-limited string, or in a
    # hostname / email region: ``bytes << 8 | bytes of the current label``
    ws_run: jax.Array  # shape=(), int32; consecutive whitespace-only tokens outside strings


def init_state(start) -> State:
    """The state of an empty output for a schema whose handle has ``start``."""
    return State(q=jnp.asarray(start, jnp.int32), cnt=jnp.int32(0), ws_run=jnp.int32(0))


def _sparse(p: Pool, s: State):
    j = jnp.arange(p.K, dtype=jnp.int32)
    valid = j < p.sp_len[s.q]
    idx = jnp.clip(p.sp_start[s.q] + j, 0, p.sp_tok.shape[0] - 1)
    ex = p.sp_exit[idx]
    exit_ok = (ex < 0) | ((s.cnt + ex >= p.cmin[s.q]) & (s.cnt + ex <= p.cmax[s.q]))
    tok = p.sp_tok[idx]
    return valid & exit_ok & _region_ok(p, s, tok), tok, p.sp_next[idx], p.sp_new[idx]


def _region_ok(p: Pool, s: State, tok=None):
    """Inside a hostname / email region: the tokens (all, or ``tok``) whose bytes keep every
    label within 63 bytes and the name within its limit, with a valid end still reachable."""
    k = p.hkind[s.q]
    c = jnp.where(k > 0, s.cnt, 0)
    # compared in int8 (the [V] rows are read every step); a room capped below _H_BAD
    room_a = (LABEL_MAX - (c & 255)).astype(jnp.int8)
    room_b = jnp.minimum(jnp.where(k == R_LOCAL, LOCAL_MAX, HOST_MAX) - (c >> 8), _H_BAD - 1)
    room_b = room_b.astype(jnp.int8)
    ha, hb = p.h_a[k], p.h_b[k]
    if tok is not None:
        ha, hb = ha[tok], hb[tok]
    return (ha <= room_a) & (hb <= room_b)


def _cost(p: Pool, nxt, cnt):
    """Tokens to complete after reaching ``nxt`` with counter ``cnt`` (one gather)."""
    pk = p.cost[nxt]
    return (pk & _COST_MASK) + jnp.maximum((pk >> _CMIN_SHIFT) - cnt, 0)


def allowed(p: Pool, s: State, remaining) -> jax.Array:
    """bool[V]: the tokens after which the output is still a prefix of a valid instance.

    Exact apart from the documented policies (whitespace runs, one spelling per character in
    constrained strings) and budget steering: with ``remaining`` tokens left (counting this
    one) only tokens after which a valid instance can be completed in ``remaining - 1``
    tokens are allowed (unless none is; then the exact set). EOS only when complete.

    Example::

        mask = jax.vmap(allowed, in_axes=(None, 0, 0))(pool, states, remaining)  # [B, V]
    """
    spare = jnp.asarray(remaining, jnp.int32) - 1
    q = s.q
    row = p.rows[p.drow[q]].astype(jnp.int32)
    ok = row >= 0
    nxt = jnp.where(ok, p.base[q] + row, DEAD)
    cnt = jnp.where(p.counted[q], s.cnt, 0) + p.rows_nch[p.drow[q]].astype(jnp.int32)
    ws_blocked = ~p.in_string[q] & (s.ws_run >= WS_RUN_MAX)
    wn = p.ws_next[q]
    ws_tok = p.ws_only & (wn >= 0)  # whitespace tokens of a uniform-whitespace state
    ok = ok | ws_tok
    nxt = jnp.where(ws_tok, wn, nxt)
    cnt = jnp.where(ws_tok, 0, cnt)
    exact = ok & (cnt <= p.cmax[q]) & ~(p.ws_only & ws_blocked) & _region_ok(p, s)
    steered = exact & (_cost(p, nxt, cnt) <= spare)
    v_ok, tok, nx, new = _sparse(p, s)
    v_ok = v_ok & ~(p.ws_only[jnp.clip(tok, 0, p.ws_only.shape[0] - 1)] & ws_blocked)
    tok = jnp.where(v_ok, tok, p.ws_only.shape[0])  # dropped
    exact = exact.at[tok].set(True, mode="drop")
    steered = steered.at[tok].set(_cost(p, nx, new) <= spare, mode="drop")
    mask = jnp.where(jnp.any(steered), steered, exact)
    return mask.at[p.eos_id].set(p.accept[q])


def advance(p: Pool, s: State, token) -> State:
    """The state after ``token`` (int32 scalar). EOS leaves it unchanged; a token the mask
    would not allow leads to DEAD (nothing allowed after it).

    Example::

        states = jax.vmap(advance, in_axes=(None, 0, 0))(pool, states, tokens)
    """
    t = jnp.asarray(token, jnp.int32)
    q = s.q
    v = p.rows[p.drow[q], t].astype(jnp.int32)
    d_cnt = jnp.where(p.counted[q], s.cnt, 0) + p.rows_nch[p.drow[q], t].astype(jnp.int32)
    d_ok = (v >= 0) & (d_cnt <= p.cmax[q]) & _region_ok(p, s, t)
    v_ok, tok, nx, new = _sparse(p, s)
    hit = v_ok & (tok == t)
    k = jnp.argmax(hit)
    s_ok = jnp.any(hit)
    w_ok = p.ws_only[t] & (p.ws_next[q] >= 0)
    nq = jnp.where(s_ok, nx[k], jnp.where(d_ok, p.base[q] + v, DEAD))
    nq = jnp.where(w_ok, p.ws_next[q], nq)
    ncnt = jnp.where(s_ok, new[k], jnp.where(w_ok, 0, d_cnt))
    ws = p.ws_only[t] & ~p.in_string[q]
    k, kn = p.hkind[q], p.hkind[nq]
    stay = (k > 0) & (kn == k) & p.h_stay[k, t]
    hcnt = jnp.where(
        stay, jnp.where(p.h_keep[k, t], s.cnt, s.cnt & ~255) + p.h_add[k, t], p.h_suf[kn, t]
    )
    out = State(
        q=nq.astype(jnp.int32),
        cnt=jnp.where(p.counted[nq], ncnt, jnp.where(kn > 0, hcnt, 0)).astype(jnp.int32),
        ws_run=jnp.where(ws, s.ws_run + 1, 0).astype(jnp.int32),
    )
    return jax.tree.map(lambda a, b: jnp.where(t == p.eos_id, a, b), s, out)


def is_complete(p: Pool, s: State) -> jax.Array:
    """bool[]: the output so far is a complete valid instance (possibly with whitespace)."""
    return p.accept[s.q]


_CHECKED: dict = {}


def check_schema(schema: Any, *, strict: bool = True) -> None:
    """Refuse a schema outside the supported subset, before any vocabulary is known
    (builds the NFA only; cached). Raises InvalidRequestError naming keyword and pointer.

    >>> check_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    >>> try:
    ...     check_schema({"type": "object", "properties": {"a": {"allOf": []}}})
    ... except ValueError as e:
    ...     print(e.reason)
    'allOf' at /properties/a/allOf: keyword not supported
    """
    text = schema if isinstance(schema, str) else canonical(schema)
    key = (text, bool(strict))
    if key in _CHECKED:
        return
    obj = json.loads(text)
    b = _Builder(obj, bool(strict))
    try:
        frag = b.schema(obj, "", 0)
    except _TooBig as e:
        raise _err("schema", "", "...", f"too large for the tables: {e}") from None
    except RecursionError:
        raise _err("schema", "", "...", "nested too deeply to compile") from None
    if frag is None:
        raise _err("schema", "", obj, "no instance satisfies it (within the nesting limit)")
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[key] = True


def check_budget(max_tokens: int | None, compiled: CompiledSchema) -> None:
    """Refuse a ``max_tokens`` smaller than the shortest valid answer (``min_tokens``)."""
    if max_tokens is not None and max_tokens < compiled.min_tokens:
        from jaxsample.params import InvalidRequestError

        raise InvalidRequestError(
            "max_tokens",
            max_tokens,
            f"an integer >= {compiled.min_tokens} (the shortest answer valid against the schema)",
            reason="too small for the schema",
        )
