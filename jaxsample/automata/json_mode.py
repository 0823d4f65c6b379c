"""JSON mode: an exact token mask for "the output is a JSON object", computed on the device.

Representation (see docs/constraints.md):

- A **lexical DFA over bytes** (``_Lexer``): about 85 states. Each state knows the type of
  the innermost open bracket (object or array, or none at depth 0), so that a string or a
  number knows where it returns to; strings carry their escape, ``\\uXXXX`` and UTF-8
  continuation sub-states (so a token may end inside a multi-byte character).
- A **bracket stack** as bits of a ``uint32`` (bit ``i`` = type of the bracket at level ``i``,
  1 = array) plus a depth counter: depth is bounded by ``max_depth <= 32``.
- For every (lexical state ``q``, token ``t``) the host precomputes the token's whole effect
  by walking its bytes: how many brackets of the stack below it pops (``pops``) and which
  types they must have (``pop_pat``), which brackets it leaves pushed (``pushes``,
  ``push_pat``), the highest depth it reaches on the way (``peak``) and the new lexical state
  for each of the three possible types of the bracket the pops uncover (object, array, none):
  ``next[q, b, t]``, ``DEAD`` where the token breaks the grammar.

:func:`allowed` is then one vectorised pass over the vocabulary for the row's state: gather
row ``q`` of each table and compare the stack bits. :func:`advance` does the same for the
drawn token only. Both are per row and jittable; batch them with ``jax.vmap``.

Example::

    g = compile_grammar(vocab_bytes, eos_id=eos, special_ids=specials)
    s = init_state(g)
    mask = allowed(g, s, jnp.int32(100))     # bool[V]
    s = advance(g, s, jnp.int32(token))
    is_complete(g, s)                        # bool[]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsample.automata import disk_cache
from jaxsample.automata._tokens import token_matrix

#: Default and largest supported nesting depth (the stack is the bits of one uint32).
MAX_DEPTH = 32

#: At most this many whitespace-only tokens in a row outside strings (then a non-blank
#: token or, once the object is complete, end-of-sequence must follow).
WS_RUN_MAX = 3

#: "No way to close from here" in the close-cost table.
_INF = 1 << 20

#: ``Grammar.cost`` of a token that breaks the grammar.
COST_INVALID = 127

_WS = b" \t\n\r"
_OBJ, _ARR, _NONE = 0, 1, 2  # container types; also the branch index of ``next``

# event codes of one byte
_EV_NONE, _EV_PUSH_OBJ, _EV_PUSH_ARR, _EV_POP_OBJ, _EV_POP_ARR = 0, 1, 2, 3, 4
_POP = -1  # placeholder next state of a closing bracket (resolved by the walk)

START, DONE, DEAD = 0, 1, 2


class _Lexer:
    """The byte-level lexical DFA: ``delta[q, byte]``, ``event[q, byte]``, state metadata."""

    def __init__(self):
        self.names: list[str] = []
        self.cont: list[int] = []
        self.is_string: list[bool] = []
        self._rules: list = []
        for name in ("START", "DONE", "DEAD"):
            self._add(name, _NONE, lambda b: (DEAD, _EV_NONE))
        self._rules[START] = lambda b: self._ws(START, b) or self._push_obj(b) or (DEAD, 0)
        self._rules[DONE] = lambda b: self._ws(DONE, b) or (DEAD, 0)

        n = {}
        for name, c in [
            ("O_OPEN", _OBJ),  # after '{': ws, '"' (key) or '}'
            ("O_KEY", _OBJ),  # after ',' in an object: ws or '"'
            ("O_COLON", _OBJ),  # after a key: ws or ':'
            ("O_VALUE", _OBJ),  # after ':': ws or a value
            ("A_OPEN", _ARR),  # after '[': ws, a value or ']'
            ("A_VALUE", _ARR),  # after ',' in an array: ws or a value
            ("AFTER_O", _OBJ),  # after a value in an object: ws, ',' or '}'
            ("AFTER_A", _ARR),  # after a value in an array: ws, ',' or ']'
        ]:
            n[name] = self._add(name, c, None)
        self.O_OPEN, self.A_OPEN = n["O_OPEN"], n["A_OPEN"]
        self.AFTER = (n["AFTER_O"], n["AFTER_A"], DONE)  # indexed by the uncovered container

        # strings: key (in an object, then ':'), value in an object, value in an array
        self.string_start = {}
        for kind, c, end in [
            ("K", _OBJ, n["O_COLON"]),
            ("VO", _OBJ, n["AFTER_O"]),
            ("VA", _ARR, n["AFTER_A"]),
        ]:
            self.string_start[kind] = self._string_states(kind, c, end)

        # numbers and literals, one set per container type
        self.number_start, self.literal_start = {}, {}
        for c, tag in ((_OBJ, "O"), (_ARR, "A")):
            self.number_start[c] = self._number_states(tag, c)
            self.literal_start[c] = self._literal_states(tag, c)

        def value(c, here):
            def rule(b):
                return (
                    self._ws(here, b)
                    or self._value_start(c, b)
                    or (self._pop(b, c) if here == self.A_OPEN else None)
                    or (DEAD, 0)
                )

            return rule

        kchar = self.string_start["K"]
        self._rules[n["O_OPEN"]] = lambda b: (
            self._ws(n["O_OPEN"], b)
            or ((kchar, 0) if b == ord('"') else None)
            or self._pop(b, _OBJ)
            or (DEAD, 0)
        )
        self._rules[n["O_KEY"]] = lambda b: (
            self._ws(n["O_KEY"], b) or ((kchar, 0) if b == ord('"') else None) or (DEAD, 0)
        )
        self._rules[n["O_COLON"]] = lambda b: (
            self._ws(n["O_COLON"], b) or ((n["O_VALUE"], 0) if b == ord(":") else None) or (DEAD, 0)
        )
        self._rules[n["O_VALUE"]] = value(_OBJ, n["O_VALUE"])
        self._rules[n["A_OPEN"]] = value(_ARR, n["A_OPEN"])
        self._rules[n["A_VALUE"]] = value(_ARR, n["A_VALUE"])
        self._after_comma = (n["O_KEY"], n["A_VALUE"])
        self._rules[n["AFTER_O"]] = lambda b: self._after_value(_OBJ, b)
        self._rules[n["AFTER_A"]] = lambda b: self._after_value(_ARR, b)

        S = len(self.names)
        self.delta = np.full((S, 256), DEAD, np.int16)
        self.event = np.zeros((S, 256), np.int8)
        for q in range(S):
            for b in range(256):
                self.delta[q, b], self.event[q, b] = self._rules[q](b)
        self.cont_arr = np.asarray(self.cont, np.int8)
        self.is_string_arr = np.asarray(self.is_string, bool)

    # --- helpers building rules -------------------------------------------------------
    def _add(self, name, cont, rule, is_string=False) -> int:
        self.names.append(name)
        self.cont.append(cont)
        self.is_string.append(is_string)
        self._rules.append(rule)
        return len(self.names) - 1

    @staticmethod
    def _ws(here, b):
        return (here, _EV_NONE) if b in _WS else None

    def _push_obj(self, b):
        return (self.O_OPEN, _EV_PUSH_OBJ) if b == ord("{") else None

    @staticmethod
    def _pop(b, c):
        if c == _OBJ and b == ord("}"):
            return (_POP, _EV_POP_OBJ)
        if c == _ARR and b == ord("]"):
            return (_POP, _EV_POP_ARR)
        return None

    def _after_value(self, c, b):
        if b in _WS:
            return (self.AFTER[c], _EV_NONE)
        if b == ord(","):
            return (self._after_comma[c], _EV_NONE)
        return self._pop(b, c) or (DEAD, _EV_NONE)

    def _value_start(self, c, b):
        ch = chr(b)
        if ch == '"':
            return (self.string_start["VO" if c == _OBJ else "VA"], 0)
        if ch == "-":
            return (self.number_start[c]["MINUS"], 0)
        if ch == "0":
            return (self.number_start[c]["ZERO"], 0)
        if "1" <= ch <= "9":
            return (self.number_start[c]["INT"], 0)
        if ch in self.literal_start[c]:
            return (self.literal_start[c][ch], 0)
        if ch == "{":
            return (self.O_OPEN, _EV_PUSH_OBJ)
        if ch == "[":
            return (self.A_OPEN, _EV_PUSH_ARR)
        return None

    def _string_states(self, kind, c, end) -> int:
        """Add one string's states; return its plain-character state."""
        s = {
            nm: self._add(f"{kind}_{nm}", c, None, is_string=True)
            for nm in (
                "CH",
                "ESC",
                "U4",
                "U3",
                "U2",
                "U1",
                "C1",
                "C2",
                "C3",
                "E0",
                "ED",
                "F0",
                "F4",
            )
        }
        hexd = set(b"0123456789abcdefABCDEF")

        def ch(b):
            if b == ord('"'):
                return (end, 0)
            if b == ord("\\"):
                return (s["ESC"], 0)
            if b < 0x20:
                return (DEAD, 0)
            if b < 0x80:
                return (s["CH"], 0)
            if 0xC2 <= b <= 0xDF:
                return (s["C1"], 0)
            if b == 0xE0:
                return (s["E0"], 0)
            if b == 0xED:
                return (s["ED"], 0)
            if 0xE1 <= b <= 0xEF:
                return (s["C2"], 0)
            if b == 0xF0:
                return (s["F0"], 0)
            if 0xF1 <= b <= 0xF3:
                return (s["C3"], 0)
            if b == 0xF4:
                return (s["F4"], 0)
            return (DEAD, 0)  # continuation byte, C0/C1 (overlong) or F5..FF

        def cont_range(lo, hi, nxt):
            return lambda b: (nxt, 0) if lo <= b <= hi else (DEAD, 0)

        r = self._rules
        r[s["CH"]] = ch
        r[s["ESC"]] = lambda b: (
            (s["CH"], 0) if b in b'"\\/bfnrt' else (s["U4"], 0) if b == ord("u") else (DEAD, 0)
        )
        for a, nx in (("U4", "U3"), ("U3", "U2"), ("U2", "U1"), ("U1", "CH")):
            r[s[a]] = (lambda nxt: lambda b: (nxt, 0) if b in hexd else (DEAD, 0))(s[nx])
        r[s["C1"]] = cont_range(0x80, 0xBF, s["CH"])
        r[s["C2"]] = cont_range(0x80, 0xBF, s["C1"])
        r[s["C3"]] = cont_range(0x80, 0xBF, s["C2"])
        r[s["E0"]] = cont_range(0xA0, 0xBF, s["C1"])
        r[s["ED"]] = cont_range(0x80, 0x9F, s["C1"])  # no UTF-16 surrogates
        r[s["F0"]] = cont_range(0x90, 0xBF, s["C2"])
        r[s["F4"]] = cont_range(0x80, 0x8F, s["C2"])  # <= U+10FFFF
        return s["CH"]

    def _number_states(self, tag, c) -> dict:
        s = {
            nm: self._add(f"N{tag}_{nm}", c, None)
            for nm in ("MINUS", "ZERO", "INT", "DOT", "FRAC", "E", "ESIGN", "EXP")
        }
        digits = set(b"0123456789")

        def rule(here):
            def f(b):
                ch = chr(b)
                if here == "MINUS":
                    return (s["ZERO"] if ch == "0" else s["INT"], 0) if b in digits else (DEAD, 0)
                if here in ("INT", "FRAC", "EXP") and b in digits:
                    return (s[here], 0)
                if here in ("ZERO", "INT") and ch == ".":
                    return (s["DOT"], 0)
                if here in ("ZERO", "INT", "FRAC") and ch in "eE":
                    return (s["E"], 0)
                if here == "DOT":
                    return (s["FRAC"], 0) if b in digits else (DEAD, 0)
                if here == "E":
                    if ch in "+-":
                        return (s["ESIGN"], 0)
                    return (s["EXP"], 0) if b in digits else (DEAD, 0)
                if here == "ESIGN":
                    return (s["EXP"], 0) if b in digits else (DEAD, 0)
                # a complete number (ZERO, INT, FRAC, EXP) ends at the next byte
                if here == "ZERO" and b in digits:
                    return (DEAD, 0)
                return self._after_value(c, b)

            return f

        for nm in s:
            self._rules[s[nm]] = rule(nm)
        return s

    def _literal_states(self, tag, c) -> dict:
        starts = {}
        for word in ("true", "false", "null"):
            ids = [self._add(f"L{tag}_{word[:i]}", c, None) for i in range(1, len(word))]
            starts[word[0]] = ids[0]
            for i, q in enumerate(ids):
                want = ord(word[i + 1])
                nxt = ids[i + 1] if i + 1 < len(ids) else self.AFTER[c]
                self._rules[q] = (lambda w, n: lambda b: (n, 0) if b == w else (DEAD, 0))(want, nxt)
        return starts


_LEXER: _Lexer | None = None


def _lexer() -> _Lexer:
    global _LEXER
    if _LEXER is None:
        _LEXER = _Lexer()
    return _LEXER


@struct.dataclass
class Grammar:
    """Device tables of JSON mode for one vocabulary (S lexical states, V tokens, C classes).

    A token's bracket effect from a state is one of a few *classes* (13 for SmolLM2):
    (brackets it closes ``k``, their types, peak depth, brackets it leaves open, their
    types); class 0 is "no bracket at all", the case of almost every (state, token), whose
    effect does not depend on the stack. ``next`` and ``br_cost`` are indexed by the type of
    the bracket uncovered after the token's closes (0 object, 1 array, 2 none: depth 0);
    ``DEAD`` / ``COST_INVALID`` mark a token that breaks the grammar. ``allowed`` reads one
    dense int8 row (``cost0[q]``) and K (26 for SmolLM2) sparse bracket tokens.
    """

    next: jax.Array  # shape=(S, 3, V), int8; next lexical state per uncovered bracket type
    tok_class: jax.Array  # shape=(S, V), uint8 or int16; the token's bracket-effect class
    cost0: jax.Array  # shape=(S, V), int8; close_cost[next] for class-0 tokens, else 127
    br_ids: jax.Array  # shape=(S, K), int32; the valid tokens of other classes, padded with V
    br_class: jax.Array  # shape=(S, K), int32; their classes
    br_cost: jax.Array  # shape=(S, 3, K), int8; close_cost[next] - k + pushes, 127 = invalid
    class_pops: jax.Array  # shape=(C,), int32; brackets of the stack closed (k)
    class_pop_pat: jax.Array  # shape=(C,), uint32; their types, bit j = level depth-k+j
    class_peak: jax.Array  # shape=(C,), int32; highest depth inside the token minus start
    class_pushes: jax.Array  # shape=(C,), int32; brackets left open (m)
    class_push_pat: jax.Array  # shape=(C,), uint32; their types, bit j = level depth-k+j
    close_cost: jax.Array  # shape=(S,), int32; tokens to reach a closable point (see docs)
    is_string: jax.Array  # shape=(S,), bool; lexical state is inside a string
    ws_only: jax.Array  # shape=(V,), bool; token is non-empty JSON whitespace only
    eos_id: jax.Array  # shape=(), int32
    max_depth: jax.Array  # shape=(), int32
    min_budget: int = struct.field(pytree_node=False, default=2)  # close_cost[START]

    @property
    def nbytes(self) -> int:
        """Device memory of the tables, in bytes."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))


class State(struct.PyTreeNode):
    """One row's JSON-mode state."""

    q: jax.Array  # shape=(), int32; lexical state
    stack: jax.Array  # shape=(), uint32; bracket types, bit i = level i (1 = array)
    depth: jax.Array  # shape=(), int32; open brackets
    ws_run: jax.Array  # shape=(), int32; consecutive whitespace-only tokens outside strings


# ------------------------------------------------------------------------------- compile


def _walk_tokens(lx: _Lexer, tok: np.ndarray, lengths: np.ndarray, usable: np.ndarray, depth):
    """Walk every usable token's bytes from every lexical state; return the effect tables.

    Work is done on the (state, token) pairs still alive, so the cost is about the number
    of live (state, token, byte) triples, not S x V x L.
    """
    S = lx.delta.shape[0]
    V = tok.shape[0]
    out_next = np.full((S, 3, V), DEAD, np.int8)
    out_pops = np.zeros((S, V), np.int8)
    out_push = np.zeros((S, V), np.int8)
    out_peak = np.zeros((S, V), np.int8)
    out_pp = np.zeros((S, V), np.uint32)
    out_up = np.zeros((S, V), np.uint32)

    delta = lx.delta.astype(np.int16)
    event = lx.event
    after = np.asarray(lx.AFTER, np.int16)
    cont = lx.cont_arr

    tids = np.flatnonzero(usable & (lengths > 0))
    # first byte on the full grid, then keep only live pairs
    first = delta[:, tok[tids, 0]]  # [S, n]
    qq, jj = np.nonzero((first != DEAD) & (np.arange(S) != DEAD)[:, None])
    q = qq.astype(np.int16)
    t = tids[jj].astype(np.int32)
    st = np.repeat(q[:, None], 3, axis=1)  # [P, 3] per uncovered-type branch
    base = np.repeat(cont[q][:, None].astype(np.int8), 3, axis=1)
    k = np.zeros(len(q), np.int8)
    pp = np.zeros(len(q), np.uint64)
    locn = np.zeros(len(q), np.int8)
    locb = np.zeros(len(q), np.uint64)
    peak = np.zeros(len(q), np.int8)
    rows = np.arange(len(q))
    branch_ids = np.arange(3, dtype=np.int8)[None, :]

    p = 0
    while len(q):
        b = tok[t, p]
        ns = delta[st, b[:, None]]
        ev = event[st, b[:, None]]
        alive = ns != DEAD
        any_alive = alive.any(1)
        e = ev[rows, alive.argmax(1)]  # live branches agree on the event
        e = np.where(any_alive, e, _EV_NONE)

        is_push = (e == _EV_PUSH_OBJ) | (e == _EV_PUSH_ARR)
        bit = (e == _EV_PUSH_ARR).astype(np.uint64)
        locb = np.where(is_push, locb | (bit << locn.astype(np.uint64)), locb)
        locn = locn + is_push

        is_pop = (e == _EV_POP_OBJ) | (e == _EV_POP_ARR)
        local_pop = is_pop & (locn > 0)
        orig_pop = is_pop & (locn == 0)
        locn = locn - local_pop
        locb = locb & ((np.uint64(1) << locn.astype(np.uint64)) - np.uint64(1))
        top_loc = ((locb >> np.maximum(locn - 1, 0).astype(np.uint64)) & np.uint64(1)).astype(
            np.int8
        )
        top = np.where((locn > 0)[:, None], top_loc[:, None], base)
        ns = np.where(local_pop[:, None] & alive, after[top], ns)
        pop_bit = (e == _EV_POP_ARR).astype(np.uint64)
        pp = np.where(orig_pop, (pp << np.uint64(1)) | pop_bit, pp)
        k = k + orig_pop
        ns = np.where(
            orig_pop[:, None], np.where(any_alive[:, None], after[None, :], DEAD), ns
        ).astype(np.int16)
        base = np.where(orig_pop[:, None], branch_ids, base)
        peak = np.maximum(peak, locn - k)
        too_deep = (peak > depth) | (k > depth)
        ns[too_deep] = DEAD
        st = ns

        p += 1
        fin = lengths[t] == p
        if fin.any():
            fq, ft = q[fin], t[fin]
            for br in range(3):
                out_next[fq, br, ft] = st[fin, br]
            out_pops[fq, ft] = k[fin]
            out_push[fq, ft] = locn[fin]
            out_peak[fq, ft] = peak[fin]
            out_pp[fq, ft] = pp[fin].astype(np.uint32)
            out_up[fq, ft] = locb[fin].astype(np.uint32)
        keep = ~fin & (st != DEAD).any(1)
        q, t, st, base, k, pp, locn, locb, peak = (
            a[keep] for a in (q, t, st, base, k, pp, locn, locb, peak)
        )
        rows = np.arange(len(q))
    return out_next, out_pops, out_push, out_peak, out_pp, out_up


def _close_costs(lx: _Lexer, nxt, pops, pushes, peak, depth) -> np.ndarray:
    """Per state, an upper bound f[q] so that f[q] + depth tokens always suffice to close.

    Edges used: a token that neither opens nor closes a bracket (cost 1 + f[next]); a token
    that closes exactly one bracket of the stack and nothing else, valid whatever bracket it
    uncovers (cost max_b f[next_b]: the depth drops by one); from START any token
    (1 + f[next] + brackets left open). Bellman-Ford to a fixed point.
    """
    S, _, V = nxt.shape
    f = np.full(S, _INF, np.int64)
    f[DONE] = 0
    own = np.where(lx.cont_arr == _NONE, 2, lx.cont_arr).astype(np.int64)
    nxt_own = nxt[np.arange(S), own, :].astype(np.int64)  # [S, V]
    # edges, deduplicated: plain q -> q' (a boolean matrix), closers q -> (q'_obj, q'_arr,
    # q'_none), START -> (q', brackets left open)
    pq, pt = np.nonzero((pops == 0) & (pushes == 0) & (peak == 0) & (nxt_own != DEAD))
    plain = np.zeros((S, S), bool)
    plain[pq, nxt_own[pq, pt]] = True
    cq, ct = np.nonzero((pops == 1) & (pushes == 0) & (peak == 0) & (nxt != DEAD).all(1))
    cn = nxt[cq, :, ct].astype(np.int64)  # [n, 3]
    st = np.flatnonzero((nxt[START, 2] != DEAD) & (peak[START] <= depth))
    start = np.zeros((S, depth + 1), bool)
    start[nxt[START, 2, st], pushes[START, st]] = True
    sq, sm = np.nonzero(start)
    # closable states (a greatest fixed point): one closing token leads, whatever bracket it
    # uncovers, to a closable state or DONE; there f = 0 (the depth pays for the closers)
    zero = np.ones(S, bool)
    zero[[START, DEAD]] = False
    while True:
        good = (zero[cn] | (cn == DONE)).all(1)
        z = zero & np.bincount(cq[good], minlength=S).astype(bool)
        if np.array_equal(z, zero):
            break
        zero = z
    f[zero] = 0
    for _ in range(4 * S):
        new = np.minimum(f, np.where(plain, 1 + f[None, :], _INF).min(1))
        np.minimum.at(new, cq, f[cn].max(1))
        new[START] = min(new[START], (1 + f[sq] + sm).min(initial=_INF))
        new[DONE] = 0
        new[DEAD] = _INF
        new = np.minimum(new, _INF)
        if np.array_equal(new, f):
            break
        f = new
    return f.astype(np.int32)


_CACHE: dict = {}


def compile_grammar(
    vocab_bytes: Sequence[bytes],
    *,
    eos_id: int,
    special_ids: Iterable[int] = (),
    max_depth: int = MAX_DEPTH,
) -> Grammar:
    """Compile the JSON-object grammar against a vocabulary into device tables (cached in
    the process, and its host tables on disk between processes: :func:`_tables`).

    Args:
      vocab_bytes: the bytes of each token id (special tokens: ``b""``).
      eos_id: the end-of-sequence id, allowed only once the object is complete.
      special_ids: ids never allowed in JSON mode (besides EOS, as above).
      max_depth: the deepest nesting allowed, 1..32 (the stack is one uint32).

    Returns:
      A :class:`Grammar` pytree; tokens that are special or empty are never allowed.

    Example::

        g = compile_grammar([b"{", b"}", b'"a"', b":", b"1", b""], eos_id=5, special_ids=[5])
    """
    if not 1 <= int(max_depth) <= MAX_DEPTH:
        from jaxsample.params import InvalidRequestError

        raise InvalidRequestError("max_depth", max_depth, f"an integer in [1, {MAX_DEPTH}]")
    specials = tuple(sorted(int(i) for i in special_ids))
    h = hashlib.sha1()
    for b in vocab_bytes:
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    key = (h.hexdigest(), int(eos_id), specials, int(max_depth))
    if key not in _CACHE:
        _CACHE[key] = _compile(key, vocab_bytes, int(eos_id), specials, int(max_depth))
    return _CACHE[key]


def compile_tables(vocab_bytes, eos_id, special_ids, max_depth) -> dict:
    """The host (numpy) tables behind :func:`compile_grammar`, uncached (for tests/bench)."""
    lx = _lexer()
    tok, lengths = token_matrix(vocab_bytes)
    usable = np.ones(len(vocab_bytes), bool)
    usable[list(special_ids)] = False
    usable[int(eos_id)] = False
    nxt, pops, pushes, peak, pp, up = _walk_tokens(lx, tok, lengths, usable, max_depth)
    f = _close_costs(lx, nxt, pops, pushes, peak, max_depth)
    ws_only = (
        np.array([len(b) > 0 and all(c in _WS for c in b) for b in vocab_bytes], bool) & usable
    )
    # bracket-effect classes: (k, pop pattern, peak, m, push pattern), class 0 = no brackets
    valid = (nxt != DEAD).any(1)
    has = valid & ((pops != 0) | (peak != 0))  # (peak == 0 implies no push)
    key = np.stack([pops[has], pp[has], peak[has], pushes[has], up[has]], -1).astype(np.int64)
    uniq, inv = np.unique(
        np.concatenate([np.zeros((1, 5), np.int64), key]), axis=0, return_inverse=True
    )
    tok_class = np.zeros(pops.shape, np.int16 if len(uniq) > 255 else np.uint8)
    tok_class[has] = inv.reshape(-1)[1:]
    delta = f[nxt.astype(np.int64)].astype(np.int64) - pops[:, None, :] + pushes[:, None, :]
    cost = np.where(nxt == DEAD, COST_INVALID, np.minimum(delta, COST_INVALID - 1)).astype(np.int8)
    S, V = pops.shape
    cost0 = np.where(tok_class == 0, cost[:, 0, :], COST_INVALID).astype(np.int8)
    sparse = tok_class != 0
    K = max(1, int(sparse.sum(1).max()))
    br_ids = np.full((S, K), V, np.int32)
    br_class = np.zeros((S, K), np.int32)
    br_cost = np.full((S, 3, K), COST_INVALID, np.int8)
    for q in range(S):
        ids = np.flatnonzero(sparse[q])
        br_ids[q, : len(ids)] = ids
        br_class[q, : len(ids)] = tok_class[q, ids]
        br_cost[q, :, : len(ids)] = cost[q][:, ids]
    return dict(
        next=nxt,
        tok_class=tok_class,
        cost0=cost0,
        br_ids=br_ids,
        br_class=br_class,
        br_cost=br_cost,
        class_pops=uniq[:, 0].astype(np.int32),
        class_pop_pat=uniq[:, 1].astype(np.uint32),
        class_peak=uniq[:, 2].astype(np.int32),
        class_pushes=uniq[:, 3].astype(np.int32),
        class_push_pat=uniq[:, 4].astype(np.uint32),
        close_cost=f,
        is_string=lx.is_string_arr,
        ws_only=ws_only,
    )


#: The tables :func:`compile_tables` returns (what a file on disk must hold).
_TABLES = (
    "next tok_class cost0 br_ids br_class br_cost class_pops class_pop_pat class_peak "
    "class_pushes class_push_pat close_cost is_string ws_only"
).split()


def _tables(key: tuple, vocab_bytes, eos_id, specials, max_depth) -> dict:
    """:func:`compile_tables`, kept on disk between processes (1-3 s to compute for
    SmolLM2's vocabulary, 20 MiB; :mod:`jaxsample.automata.disk_cache`)."""
    return disk_cache.cached_arrays(
        "json-grammar",
        key,
        __file__,
        tuple(_TABLES),
        lambda: compile_tables(vocab_bytes, eos_id, specials, max_depth),
    )


def _compile(key, vocab_bytes, eos_id, specials, max_depth) -> Grammar:
    t = _tables(key, vocab_bytes, eos_id, specials, max_depth)
    return Grammar(
        **{k: jnp.asarray(v) for k, v in t.items()},
        eos_id=jnp.int32(eos_id),
        max_depth=jnp.int32(max_depth),
        min_budget=int(t["close_cost"][START]),
    )


# -------------------------------------------------------------------------------- device


def init_state(g: Grammar) -> State:
    """The state of an empty output (before the opening brace). Per row; vmap for a batch."""
    del g
    return State(q=jnp.int32(START), stack=jnp.uint32(0), depth=jnp.int32(0), ws_run=jnp.int32(0))


def _low_mask(n):
    """uint32 with the low ``n`` bits set, 0 <= n <= 32."""
    n = jnp.asarray(n, jnp.int32)
    safe = jnp.left_shift(jnp.uint32(1), jnp.clip(n, 0, 31).astype(jnp.uint32)) - jnp.uint32(1)
    return jnp.where(n >= 32, jnp.uint32(0xFFFFFFFF), jnp.where(n <= 0, jnp.uint32(0), safe))


def _shr(x, n):
    """x >> n for uint32 x and 0 <= n <= 32 (0 when n == 32)."""
    n = jnp.asarray(n, jnp.int32)
    return jnp.where(
        n >= 32, jnp.uint32(0), jnp.right_shift(x, jnp.clip(n, 0, 31).astype(jnp.uint32))
    )


def _class_branch(g: Grammar, s: State) -> jax.Array:
    """int32[C]: per bracket-effect class, the type of the bracket uncovered after its closes
    (0 object, 1 array, 2 none) if the row's stack admits the class, else 3."""
    k = g.class_pops
    base = s.depth - k
    ok = (
        (base >= 0)
        & ((_shr(s.stack, base) & _low_mask(k)) == g.class_pop_pat)
        & (s.depth + g.class_peak <= g.max_depth)
    )
    uncovered = (_shr(s.stack, base - 1) & jnp.uint32(1)).astype(jnp.int32)
    return jnp.where(ok, jnp.where(base <= 0, 2, uncovered), 3)


def _pick(rows3, branch, fill):
    """rows3[branch] elementwise (branch in 0..3; 3 gives ``fill``)."""
    return jnp.where(
        branch == 0,
        rows3[0],
        jnp.where(branch == 1, rows3[1], jnp.where(branch == 2, rows3[2], fill)),
    )


def allowed(g: Grammar, s: State, remaining) -> jax.Array:
    """bool[V]: the tokens that keep the output a prefix of a valid JSON object.

    Exact (see docs/constraints.md) apart from two documented restrictions: at most
    ``WS_RUN_MAX`` whitespace-only tokens in a row outside strings, and budget steering:
    with ``remaining`` tokens left (including this one), only tokens after which the
    object can still be closed in ``remaining - 1`` tokens (bound ``close_cost[q] + depth``)
    are allowed, unless no token qualifies (then the exact set). EOS only when complete.

    Example::

        mask = jax.vmap(allowed, in_axes=(None, 0, 0))(g, states, remaining)  # [B, V]
    """
    spare = jnp.asarray(remaining, jnp.int32) - 1 - s.depth  # tokens left after this one
    # tokens without brackets: one dense row, independent of the stack
    cost0 = g.cost0[s.q].astype(jnp.int32)
    ws_blocked = ~g.is_string[s.q] & (s.ws_run >= WS_RUN_MAX)
    exact = (cost0 != COST_INVALID) & ~(g.ws_only & ws_blocked)
    steered = exact & (cost0 <= spare)
    # the few tokens with brackets: their class decides the branch from the stack
    branch = _class_branch(g, s)[g.br_class[s.q]]  # [K]
    bcost = _pick(g.br_cost[s.q], branch, jnp.int8(COST_INVALID)).astype(jnp.int32)
    ids = g.br_ids[s.q]  # padding = V: dropped
    exact = exact.at[ids].set(bcost != COST_INVALID, mode="drop")
    steered = steered.at[ids].set((bcost != COST_INVALID) & (bcost <= spare), mode="drop")
    mask = jnp.where(jnp.any(steered), steered, exact)
    return mask.at[g.eos_id].set(s.q == DONE)


def advance(g: Grammar, s: State, token) -> State:
    """The state after appending ``token`` (int32 scalar). EOS leaves the state unchanged;
    a token the mask would not allow leads to the dead state (nothing allowed after it).

    Example::

        s = jax.vmap(advance, in_axes=(None, 0, 0))(g, states, tokens)
    """
    t = jnp.asarray(token, jnp.int32)
    c = g.tok_class[s.q, t].astype(jnp.int32)
    branch = _class_branch(g, s)[c]
    nxt = _pick(g.next[s.q, :, t], branch, jnp.int8(DEAD)).astype(jnp.int32)
    ok = nxt != DEAD
    base = s.depth - g.class_pops[c]
    m = g.class_pushes[c]
    shift = jnp.clip(base, 0, 31).astype(jnp.uint32)
    pushed = jnp.where(m > 0, jnp.left_shift(g.class_push_pat[c], shift), jnp.uint32(0))
    stack = (s.stack & _low_mask(base)) | pushed
    ws = g.ws_only[t] & ~g.is_string[s.q]
    new = State(
        q=jnp.where(ok, nxt, DEAD).astype(jnp.int32),
        stack=jnp.where(ok, stack, s.stack),
        depth=jnp.where(ok, base + m, s.depth),
        ws_run=jnp.where(ws, s.ws_run + 1, 0).astype(jnp.int32),
    )
    return jax.tree.map(lambda a, b: jnp.where(t == g.eos_id, a, b), s, new)


def is_complete(g: Grammar, s: State) -> jax.Array:
    """bool[]: the output so far is a complete JSON object (possibly followed by whitespace)."""
    del g
    return s.q == DONE
