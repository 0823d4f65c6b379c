"""A small regular-expression subset for JSON Schema ``pattern`` and ``format``.

:func:`parse` turns a pattern into a tiny AST over code-point sets; the schema compiler
(:mod:`jaxsample.automata.json_schema`) turns that AST into a byte NFA over the *JSON
spelling* of the string's characters. Supported: literals, ``.``, ``[...]`` and ``[^...]``
(ASCII ranges; single non-ASCII characters as literals), ``\\d \\w \\s`` and their negations
(ASCII only, see docs/constraints.md), escapes of metacharacters, ``\\t \\n \\r \\f \\v``,
``\\uXXXX``, groups ``(...)`` and ``(?:...)``, alternation, the quantifiers ``* + ? {n}
{n,} {n,m}`` (lazy forms allowed, they match the same strings), and the anchors ``^`` at the
start and ``$`` at the end of a top-level alternative. Anything else raises
:class:`RegexError` naming the construct.

>>> parse("^a[0-9]{2}$")[0]
('alt', [('seq', [('set', ...), ('rep', ('set', ...), 2, 2)], True, True)])
"""

from __future__ import annotations

#: Code points below this are "ASCII"; classes hold them as a 128-bit mask.
_ASCII = 128
#: Largest repetition count accepted in ``{n,m}``.
MAX_REPEAT = 256


class RegexError(ValueError):
    """A pattern outside the supported subset (message names the construct)."""


class CharSet:
    """A set of code points: an ASCII bit mask, ``all_non_ascii`` (every code point >= 128
    except surrogates), and a few explicit non-ASCII code points."""

    __slots__ = ("ascii", "all_non_ascii", "extra")

    def __init__(self, ascii_mask=0, all_non_ascii=False, extra=frozenset()):
        self.ascii = ascii_mask
        self.all_non_ascii = all_non_ascii
        self.extra = frozenset(extra)

    def __repr__(self):
        return "..."

    def union(self, o: CharSet) -> CharSet:
        return CharSet(
            self.ascii | o.ascii, self.all_non_ascii or o.all_non_ascii, self.extra | o.extra
        )

    def negate(self) -> CharSet:
        if self.extra:
            raise RegexError("a negated class containing non-ASCII characters")
        return CharSet(((1 << _ASCII) - 1) & ~self.ascii, not self.all_non_ascii)


def _chars(s: str) -> CharSet:
    m = 0
    for c in s:
        m |= 1 << ord(c)
    return CharSet(m)


def _range(a: int, b: int) -> CharSet:
    if a > b:
        raise RegexError(f"an empty range {chr(a)}-{chr(b)}")
    if b >= _ASCII:
        if a == b:
            return CharSet(extra={a})
        raise RegexError("a non-ASCII range in a character class")
    return CharSet(sum(1 << i for i in range(a, b + 1)))


DIGIT = _range(48, 57)
WORD = _chars("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
SPACE = _chars(" \t\n\r\f\v")
#: ``.`` in Python's ``re`` (what ``jsonschema`` validates with): anything but ``\n``.
DOT = CharSet(((1 << _ASCII) - 1) & ~(1 << 10), True)
ANY = CharSet((1 << _ASCII) - 1, True)
_SHORT = {"d": DIGIT, "w": WORD, "s": SPACE}
_CTRL = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}
_META = set("\\^$.|?*+()[]{}/-")


class _Parser:
    def __init__(self, src: str):
        self.s = src
        self.i = 0

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else None

    def eat(self):
        c = self.s[self.i]
        self.i += 1
        return c

    def alternatives(self, top: bool):
        alts = [self.sequence(top)]
        while self.peek() == "|":
            self.eat()
            alts.append(self.sequence(top))
        return ("alt", alts)

    def sequence(self, top: bool):
        items, start_anchor, end_anchor = [], False, False
        while self.peek() is not None and self.peek() not in "|)":
            c = self.peek()
            if c == "^":
                self.eat()
                if not top or items or start_anchor:
                    raise RegexError("'^' anywhere but at the start of the pattern")
                start_anchor = True
                continue
            if c == "$":
                self.eat()
                if not top or self.peek() not in (None, "|"):
                    raise RegexError("'$' anywhere but at the end of the pattern")
                end_anchor = True
                continue
            items.append(self.quantified())
        if top:
            return ("seq", items, start_anchor, end_anchor)
        return ("seq", items, True, True)

    def quantified(self):
        atom = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.eat()
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and self._is_brace():
                lo, hi = self.brace()
            else:
                return atom
            if self.peek() == "?":
                self.eat()  # lazy: the same set of strings
            if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._is_brace()):
                raise RegexError("a nested quantifier")
            atom = ("rep", atom, lo, hi)

    def _is_brace(self):
        j = self.s.find("}", self.i)
        if j < 0:
            return False
        body = self.s[self.i + 1 : j]
        parts = body.split(",")
        return (
            1 <= len(parts) <= 2
            and parts[0].isdigit()
            and all(p.isdigit() or p == "" for p in parts)
        )

    def brace(self):
        j = self.s.index("}", self.i)
        body = self.s[self.i + 1 : j]
        self.i = j + 1
        if "," in body:
            a, b = body.split(",")
            lo, hi = int(a), (int(b) if b else None)
        else:
            lo = hi = int(body)
        if hi is not None and hi < lo:
            raise RegexError(f"the repetition {{{body}}} (max < min)")
        if max(lo, hi or 0) > MAX_REPEAT:
            raise RegexError(f"a repetition count over {MAX_REPEAT}")
        return lo, hi

    def atom(self):
        c = self.eat()
        if c == "(":
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise RegexError("a lookaround or named group '(?'")
            node = self.alternatives(top=False)
            if self.peek() != ")":
                raise RegexError("an unbalanced '('")
            self.eat()
            return node
        if c == ")":
            raise RegexError("an unbalanced ')'")
        if c == "[":
            return ("set", self.klass())
        if c == ".":
            return ("set", DOT)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise RegexError(f"a quantifier '{c}' with nothing to repeat")
        return ("set", _chars(c) if ord(c) < _ASCII else CharSet(extra={ord(c)}))

    def escape(self, in_class: bool) -> CharSet:
        if self.peek() is None:
            raise RegexError("a trailing backslash")
        c = self.eat()
        if c in _SHORT:
            return _SHORT[c]
        if c in "DWS":
            return CharSet(((1 << _ASCII) - 1) & ~_SHORT[c.lower()].ascii)
        if c in _CTRL:
            return _chars(_CTRL[c])
        if c == "u":
            h = self.s[self.i : self.i + 4]
            if len(h) != 4 or any(x not in "0123456789abcdefABCDEF" for x in h):
                raise RegexError("a malformed \\u escape")
            self.i += 4
            cp = int(h, 16)
            if 0xD800 <= cp <= 0xDFFF:
                raise RegexError("a surrogate \\u escape")
            return _chars(chr(cp)) if cp < _ASCII else CharSet(extra={cp})
        if c == "b" and in_class:
            return _chars("\b")
        if c in _META or (in_class and c == "]") or c in "\"'#&~!,:;<=>@%`_ ":
            return _chars(c)
        raise RegexError(f"the escape '\\{c}'")

    def klass(self) -> CharSet:
        neg = self.peek() == "^"
        if neg:
            self.eat()
        acc = CharSet()
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise RegexError("an unterminated '['")
            if c == "]" and not first:
                self.eat()
                break
            first = False
            self.eat()
            if c == "\\":
                lo_set = self.escape(in_class=True)
            elif c == "[" and self.peek() == ":":
                raise RegexError("a POSIX class '[:'")
            else:
                lo_set = _chars(c) if ord(c) < _ASCII else CharSet(extra={ord(c)})
            single = _single(lo_set)
            if (
                self.peek() == "-"
                and single is not None
                and self.s[self.i + 1 : self.i + 2] not in ("]", "")
            ):
                self.eat()
                d = self.eat()
                if d == "\\":
                    hi = _single(self.escape(in_class=True))
                    if hi is None:
                        raise RegexError("a range ending in a class escape")
                else:
                    hi = ord(d)
                acc = acc.union(_range(single, hi))
            else:
                acc = acc.union(lo_set)
        return acc.negate() if neg else acc


def _single(cs: CharSet) -> int | None:
    if cs.all_non_ascii:
        return None
    if cs.extra:
        return next(iter(cs.extra)) if len(cs.extra) == 1 and cs.ascii == 0 else None
    if cs.ascii and cs.ascii & (cs.ascii - 1) == 0:
        return cs.ascii.bit_length() - 1
    return None


def parse(pattern: str):
    """Parse ``pattern`` into ``(ast, source)``; raise :class:`RegexError` if unsupported.

    The AST: ``("alt", [seq...])``, ``("seq", items, anchored_start, anchored_end)``,
    ``("rep", node, lo, hi_or_None)``, ``("set", CharSet)``. Top-level alternatives keep
    their anchors; inner sequences are marked anchored (they match exactly).
    """
    if not isinstance(pattern, str):
        raise RegexError("a pattern that is not a string")
    p = _Parser(pattern)
    ast = p.alternatives(top=True)
    if p.i != len(pattern):
        raise RegexError("an unbalanced ')'")
    return ast, pattern
