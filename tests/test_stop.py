"""Stop strings: device automata over token bytes against a plain substring search."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.automata import stop
from jaxsample.params import InvalidRequestError

_PIECES = [b"ab", b"ba", b"aab", b"abab", b"ababab", b"\xc3\xa9", b"\xc3", b"\xa9a", b"\n\n"]
_PIECES += [b"END", b"EN", b"D!", b"xEN", b"xE", b"stopstop", b"a\n", b"\na", "é\n".encode()]
VOCAB = [bytes([i]) for i in range(256)] + _PIECES + [b""]  # last: a special token
INDEX = {b: i for i, b in enumerate(VOCAB) if b}
TB = stop.TokenBytes.from_vocab(VOCAB)


def _segment(text: bytes, rng: random.Random) -> list[int]:
    out, i = [], 0
    while i < len(text):
        fits = [text[i : i + n] for n in range(1, 9) if text[i : i + n] in INDEX]
        pick = rng.choice(fits)
        out.append(INDEX[pick])
        i += len(pick)
    return out


def _naive_hit(tokens, stops):
    """Index of the first token after which the text contains a stop string, else None."""
    text = b""
    for i, t in enumerate(tokens):
        text += VOCAB[t] if t >= 0 else b""
        if any(s.encode() in text for s in stops):
            return i
    return None


@jax.jit
def _run(st, tokens):
    """tokens [B, T] -> hits [B, T] (vmapped advance, scanned over steps)."""
    s0 = stop.init_state(st)

    def step(s, tok):
        s, hit = jax.vmap(stop.advance, in_axes=(0, 0, 0, None))(st, s, tok, TB)
        return s, hit

    _, hits = jax.lax.scan(step, s0, tokens.T)
    return hits.T


def _first(hits_row):
    idx = np.flatnonzero(hits_row)
    return int(idx[0]) if len(idx) else None


def test_kmp_table_tracks_longest_matched_prefix():
    rng = random.Random(0)
    for _ in range(200):
        p = bytes(rng.choice(b"ab\xc3") for _ in range(rng.randint(1, 8)))
        dfa = stop._kmp_table(p)
        state, text = 0, b""
        for _ in range(40):
            c = rng.choice(b"ab\xc3")
            text += bytes([c])
            state = int(dfa[state, c])
            want = max(j for j in range(len(p) + 1) if text.endswith(p[:j]))
            assert state == want, (p, text)


def test_batch_rows_with_different_stops_match_naive_search():
    """Many rows in one batch, each with 0-4 stop strings over a small alphabet (so that
    overlaps, repeats and multi-byte characters are common), random tokenizations."""
    rng = random.Random(1)
    alphabet = ["a", "b", "é", "\n"]
    per_row, token_rows = [], []
    T = 30
    for _ in range(64):
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(0, 4))
        )
        text = "".join(rng.choice(alphabet) for _ in range(60)).encode()
        toks = _segment(text, rng)[:T]
        per_row.append(stops)
        token_rows.append(toks + [-1] * (T - len(toks)))
    st = stop.compile_stops(per_row, TB)
    hits = np.asarray(_run(st, jnp.asarray(token_rows, jnp.int32)))
    n_hit = 0
    for r in range(len(per_row)):
        want = _naive_hit(token_rows[r], per_row[r])
        assert _first(hits[r]) == want, (per_row[r], token_rows[r])
        n_hit += want is not None
        if not per_row[r]:
            assert not hits[r].any()
    assert 20 < n_hit < 64  # both outcomes exercised


@pytest.mark.parametrize(
    "pieces, stops, want",
    [
        ([b"xE", b"N", b"D!"], ("END",), 2),  # spans three tokens
        ([b"xEN", b"D!"], ("END",), 1),  # starts inside a token, ends inside the next
        ([b"a", b"stopstop", b"b"], ("pst",), 1),  # strictly inside one token
        ([b"ab", b"ab", b"ab"], ("babab",), 2),  # overlapping self-match (KMP fallback)
        ([b"\xc3", b"\xa9a", b"\n"], ("é", "zz"), 1),  # UTF-8 character split over tokens
        ([b"END", b"\n\n"], ("\n\n", "D"), 0),  # second string completes first
        ([b"ab", b"ab"], ("zzz",), None),
    ],
)
def test_explicit_cases(pieces, stops, want):
    toks = [INDEX[p] for p in pieces]
    st = stop.compile_stops([stops], TB)
    hits = np.asarray(_run(st, jnp.asarray([toks], jnp.int32)))[0]
    assert _first(hits) == want == _naive_hit(toks, stops)
    text = b"".join(pieces)
    kept, found = stop.truncate(text, stops)
    assert found == (want is not None)
    assert not any(s.encode() in kept for s in stops)


def test_no_token_and_special_token_have_no_bytes():
    st = stop.compile_stops([("ab",)], TB)
    s = jax.tree.map(lambda a: a[0], stop.init_state(st))
    row = jax.tree.map(lambda a: a[0], st)
    s, hit = stop.advance(row, s, jnp.int32(INDEX[b"a"]), TB)
    for t in (-1, len(VOCAB) - 1):  # no token drawn / a special token (b"")
        s2, hit2 = stop.advance(row, s, jnp.int32(t), TB)
        assert not bool(hit2) and int(s2.pos[0]) == 1
    _, hit3 = stop.advance(row, s, jnp.int32(INDEX[b"b"]), TB)
    assert bool(hit3)


def test_truncate_matches_naive():
    rng = random.Random(2)
    for _ in range(500):
        text = "".join(rng.choice("abé\n") for _ in range(rng.randint(0, 30))).encode()
        stops = tuple(
            "".join(rng.choice("abé\n") for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(1, 4))
        )
        cut = min((text.find(s.encode()) for s in stops if s.encode() in text), default=None)
        kept, found = stop.truncate(text, stops)
        assert found == (cut is not None)
        assert kept == (text if cut is None else text[:cut])
    assert stop.truncate(b"hello END world", "END") == (b"hello ", True)


def test_invalid_stop_lists_are_refused():
    with pytest.raises(InvalidRequestError):
        stop.compile_stops([("a", "b", "c", "d", "e")])
    with pytest.raises(InvalidRequestError):
        stop.compile_stops([("",)])
    with pytest.raises(InvalidRequestError):
        stop.compile_stops([("é" * 33,)])  # 66 bytes
    st = stop.compile_stops([("é" * 32,), "x"])  # exactly 64 bytes; a bare string is one stop
    assert np.asarray(st.length).tolist() == [[64, -1, -1, -1], [1, -1, -1, -1]]


@pytest.mark.real_model
def test_real_vocab_stop_inside_tokens():
    from jaxsample.model import Tokenizer, default_model_path, read_gguf

    tok = Tokenizer.from_gguf(read_gguf(default_model_path()))
    tb = stop.TokenBytes.from_vocab(tok.token_bytes)
    text = "The capital of France is Paris.\n\nIt is a large city."
    ids = tok.encode(text)
    stops_rows = [("Paris",), ("\n\n", "large"), ("ital of",), ("nowhere",), ("s P",)]
    st = stop.compile_stops(stops_rows, tb)
    T = len(ids)
    tokens = jnp.asarray([ids] * len(stops_rows), jnp.int32)

    s = stop.init_state(st)
    hits = []
    for i in range(T):
        s, h = jax.vmap(stop.advance, in_axes=(0, 0, 0, None))(st, s, tokens[:, i], tb)
        hits.append(np.asarray(h))
    hits = np.stack(hits, 1)
    for r, stops in enumerate(stops_rows):
        text_so_far, want = b"", None
        for i, t in enumerate(ids):
            text_so_far += tok.token_bytes[t]
            if want is None and any(x.encode() in text_so_far for x in stops):
                want = i
        assert _first(hits[r]) == want
        full = b"".join(tok.token_bytes[t] for t in ids[: (want + 1 if want is not None else T)])
        kept, _ = stop.truncate(full, stops)
        cut = min((text.encode().find(x.encode()) for x in stops if x in text), default=None)
        assert kept == (text.encode() if cut is None else text.encode()[:cut])
