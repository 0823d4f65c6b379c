"""Stop strings as byte-level automata walked on the device over each drawn token's bytes.

Representation (see docs/constraints.md): each row has up to ``STOP_MAX_COUNT = 4`` stop
strings of at most ``STOP_MAX_BYTES = 64`` UTF-8 bytes. Each string ``p`` becomes its
Knuth-Morris-Pratt automaton as a full transition table ``dfa[j, byte]`` (state ``j`` = the
length of the longest prefix of ``p`` that ends the text so far; ``j == len(p)`` is a match).
A row carries ``uint8 [4, 65, 256]`` tables (66.5 KB) and its state is ``int32 [4]``.
:func:`advance` walks the drawn token's bytes (from :class:`TokenBytes`) through the four
automata at once and reports a hit when any of them reaches its full length at any byte of
the token, so a stop string that spans tokens or starts or ends inside a token is caught at
the step whose token completes it. :func:`truncate` cuts the returned text on the host.

Example::

    tb = TokenBytes.from_vocab(vocab_bytes)
    st = compile_stops([("\\n\\n", "END"), ()], tb)   # two rows; the second has no stops
    s = init_state(st)
    s, hit = jax.vmap(advance, in_axes=(0, 0, 0, None))(st, s, tokens, tb)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsample.automata._tokens import token_matrix
from jaxsample.params import STOP_MAX_BYTES, STOP_MAX_COUNT, InvalidRequestError


@struct.dataclass
class TokenBytes:
    """Each token's bytes as a device table (shared by all rows)."""

    table: jax.Array  # shape=(V, L), uint8; token bytes, zero padded; L = longest token
    lengths: jax.Array  # shape=(V,), int32; 0 for special tokens

    @classmethod
    def from_vocab(cls, vocab_bytes: Sequence[bytes]) -> TokenBytes:
        """Build from ``vocab_bytes[i]`` = the bytes of token ``i`` (``b""`` for specials).

        >>> TokenBytes.from_vocab([b"a", b"bc", b""]).table.shape
        (3, 2)
        """
        table, lengths = token_matrix(vocab_bytes)
        return cls(table=jnp.asarray(table), lengths=jnp.asarray(lengths))


@struct.dataclass
class StopTables:
    """Per-row stop automata (a leading batch axis B when batched)."""

    dfa: jax.Array  # shape=(4, 65, 256), uint8; KMP transitions per stop string slot
    length: jax.Array  # shape=(4,), int32; stop string length in bytes, -1 = empty slot


class StopState(struct.PyTreeNode):
    """Per-row automaton states (leading batch axis B when batched)."""

    pos: jax.Array  # shape=(4,), int32; matched prefix length per stop string


def _kmp_table(pattern: bytes) -> np.ndarray:
    """dfa[j, c]: matched length after reading byte c in state j (j == len: after a match)."""
    n = len(pattern)
    dfa = np.zeros((STOP_MAX_BYTES + 1, 256), np.uint8)
    dfa[0, pattern[0]] = 1
    border = 0  # state reached by the pattern without its first byte (the failure state)
    for j in range(1, n + 1):
        dfa[j] = dfa[border]
        if j < n:
            dfa[j, pattern[j]] = j + 1
            border = dfa[border, pattern[j]]
    return dfa


def _check_stops(stops, row: int) -> list[bytes]:
    if isinstance(stops, str):
        stops = (stops,)
    stops = tuple(stops)
    if len(stops) > STOP_MAX_COUNT:
        raise InvalidRequestError(
            "stop", stops, f"a string or a list of at most {STOP_MAX_COUNT} strings", index=row
        )
    out = []
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError("stop", s, "a non-empty string", index=row)
        b = s.encode("utf-8")
        if len(b) > STOP_MAX_BYTES:
            raise InvalidRequestError(
                "stop", s, f"a string of at most {STOP_MAX_BYTES} UTF-8 bytes", index=row
            )
        out.append(b)
    return out


def compile_stops(
    per_row: Sequence[Sequence[str]], token_bytes_table=None, *, as_numpy: bool = False
) -> StopTables:
    """Batched stop tables for ``per_row[i]`` = row i's stop strings (an empty tuple: none).

    Raises :class:`~jaxsample.params.InvalidRequestError` for more than 4 strings, an empty
    string or one longer than 64 UTF-8 bytes. ``token_bytes_table`` is accepted for symmetry
    with :func:`advance` and not needed here. ``as_numpy``: host (numpy) arrays instead of
    device arrays, for a jitted call to transfer (no eager device operation).

    >>> compile_stops([("END",), ()]).length.tolist()
    [[3, -1, -1, -1], [-1, -1, -1, -1]]
    """
    del token_bytes_table
    B = len(per_row)
    dfa = np.zeros((B, STOP_MAX_COUNT, STOP_MAX_BYTES + 1, 256), np.uint8)
    length = np.full((B, STOP_MAX_COUNT), -1, np.int32)
    for i, stops in enumerate(per_row):
        for j, b in enumerate(_check_stops(stops, i)):
            dfa[i, j] = _kmp_table(b)
            length[i, j] = len(b)
    if as_numpy:
        return StopTables(dfa=dfa, length=length)
    return StopTables(dfa=jnp.asarray(dfa), length=jnp.asarray(length))


def init_state(st: StopTables) -> StopState:
    """All automata at the start (nothing matched); same batch shape as ``st.length``."""
    return StopState(pos=jnp.zeros(st.length.shape, jnp.int32))


def advance(st: StopTables, s: StopState, token, tb: TokenBytes) -> tuple[StopState, jax.Array]:
    """Walk one row's automata over the bytes of ``token``; ``hit`` is True when a stop string
    is completed at any byte of the token. Per row; vmap over (st, s, token) for a batch.

    The walk is a ``while_loop`` over the token's bytes: under ``vmap`` it runs as many
    iterations as the longest token drawn in the batch at this step. A negative token (no
    token drawn) has no bytes.

    >>> tb = TokenBytes.from_vocab([b"E", b"N", b"D", b"xEN"])
    >>> st = compile_stops([("END",)])
    >>> st_row = jax.tree.map(lambda x: x[0], st)
    >>> s = jax.tree.map(lambda x: x[0], init_state(st))
    >>> hits = []
    >>> for token in (3, 2):  # "xEN" then "D": the stop string spans two tokens
    ...     s, hit = advance(st_row, s, jnp.int32(token), tb)
    ...     hits.append(bool(hit))
    >>> hits
    [False, True]
    """
    t = jnp.asarray(token, jnp.int32)
    n = jnp.where(t >= 0, tb.lengths[jnp.maximum(t, 0)], 0)
    row = tb.table[jnp.maximum(t, 0)]
    slots = jnp.arange(st.length.shape[0])

    def body(carry):
        i, pos, hit = carry
        nxt = st.dfa[slots, pos, row[i]].astype(jnp.int32)
        return i + 1, nxt, hit | jnp.any(nxt == st.length)

    _, pos, hit = jax.lax.while_loop(
        lambda c: c[0] < n, body, (jnp.int32(0), s.pos, jnp.bool_(False))
    )
    return StopState(pos=pos), hit


def truncate(text_bytes: bytes, stops: Sequence[str]) -> tuple[bytes, bool]:
    """Cut ``text_bytes`` before the earliest occurrence of any stop string (host side).

    Returns ``(kept, found)``.

    >>> truncate(b"hello END world", ("END", "wor"))
    (b'hello ', True)
    """
    if isinstance(stops, str):
        stops = (stops,)
    cut = -1
    for s in stops:
        i = text_bytes.find(s.encode("utf-8")) if s else -1
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (text_bytes[:cut], True) if cut >= 0 else (text_bytes, False)
