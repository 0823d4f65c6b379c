"""JSON mode: the device mask against a plain reference checker, and fuzzed rollouts."""

from __future__ import annotations

import functools
import json
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from json_prefix_ref import JsonPrefixChecker, is_valid_prefix

from jaxsample.automata import json_mode as jm
from jaxsample.params import InvalidRequestError

BIG = 1 << 20

# ----------------------------------------------------------------------------- vocabulary

_MULTI = [
    b'{"',
    b'"}',
    b"}}",
    b"]}",
    b"}]",
    b"},",
    b"],",
    b'":',
    b'":"',
    b'", "',
    b"{}",
    b"[]",
    b"[[",
    b"]]",
    b'{"a":',
    b'"},{"',
    b"\\u00",
    b"\\u",
    b'\\"',
    b"\\\\",
    b"\\n",
    b"true",
    b"false",
    b"null",
    b"tr",
    b"ue",
    b"nul",
    b"1.5e",
    b"e+",
    b"E-",
    b"-0",
    b"0.",
    b"12",
    b" \n",
    b"  ",
    b"\r\n",
    b"\xc3\xa9",
    b"\xe2\x82\xac",
    b"\xf0\x9f\x98\x80",
    b"\xe2",
    b"\x82\xac",
    b"\xf0\x9f",
    b"\x98\x80",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xe0\x80",
    b"\xed\x9f",
    b"abc",
    b" hello",
    b'"key"',
    b"1}",
    b"1]",
    b"0,",
    b'"]',
    b'"}]}',
    b"}}}}",
    b"]]]]",
    b"[[[[",
    b'{"x":[',
    b'",',
    b'":{',
    b'":[',
    b"}}]",
    b"[{",
    b'[{"',
    b"1,2",
    b", ",
    b": ",
    b'"\n',
    b"\t",
    b"\xc3",
    b"\xa9",
    b"\\ud83d\\ude00",
    b"\\/",
    b'{"a":1}',
    b"  }",
    b'"" ',
    b'""',
]


def synthetic_vocab():
    """All 256 single bytes (any text is reachable), multi-byte pieces, 2 specials (EOS last)."""
    vocab = [bytes([i]) for i in range(256)] + list(dict.fromkeys(_MULTI)) + [b"", b""]
    eos = len(vocab) - 1
    return vocab, eos, [eos - 1, eos]


VOCAB, EOS, SPECIALS = synthetic_vocab()


@pytest.fixture(scope="module")
def grammar():
    return jm.compile_grammar(VOCAB, eos_id=EOS, special_ids=SPECIALS)


@pytest.fixture(scope="module")
def real():
    from jaxsample.model import Tokenizer, default_model_path, read_gguf

    tok = Tokenizer.from_gguf(read_gguf(default_model_path()))
    vocab = tok.token_bytes
    g = jm.compile_grammar(vocab, eos_id=tok.eos_id, special_ids=tok.special_ids)
    return vocab, tok.eos_id, sorted(tok.special_ids), g


# --------------------------------------------------------------------- random JSON texts


def _rand_string(rng: random.Random) -> bytes:
    pieces = []
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.4:
            pieces.append(rng.choice(["a", "key", " ", "x y", "{", "]", ":", ","]).encode())
        elif r < 0.6:
            pieces.append(rng.choice(["é", "€", "😀", "中文", "ß"]).encode())
        elif r < 0.85:
            pieces.append(rng.choice([b'\\"', b"\\\\", b"\\/", b"\\b", b"\\n", b"\\t"]))
        else:
            pieces.append(b"\\u%04x" % rng.randrange(0x10000))
    return b'"' + b"".join(pieces) + b'"'


def _ws(rng):
    return rng.choice([b"", b"", b"", b" ", b"\n  ", b"\t"])


def _rand_value(rng: random.Random, depth: int) -> bytes:
    r = rng.random()
    if depth > 0 and r < 0.25:
        return _rand_object(rng, depth - 1)
    if depth > 0 and r < 0.45:
        items = [_rand_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
        return b"[" + _ws(rng) + (b"," + _ws(rng)).join(items) + _ws(rng) + b"]"
    if r < 0.65:
        return _rand_string(rng)
    if r < 0.85:
        return rng.choice(
            [b"0", b"-0", b"12", b"-3.25", b"1e5", b"2.5E-3", b"10E+2", b"0.001", b"7"]
        )
    return rng.choice([b"true", b"false", b"null"])


def _rand_object(rng: random.Random, depth: int) -> bytes:
    members = [
        _rand_string(rng) + _ws(rng) + b":" + _ws(rng) + _rand_value(rng, depth)
        for _ in range(rng.randint(0, 3))
    ]
    return b"{" + _ws(rng) + (b"," + _ws(rng)).join(members) + _ws(rng) + b"}"


def _segment(text: bytes, vocab, rng: random.Random, index=None) -> list[int]:
    """A random tokenization of ``text`` with the vocabulary (single bytes always exist)."""
    if index is None:
        index = {b: i for i, b in enumerate(vocab) if b}
    longest = max(len(b) for b in index)
    out, i = [], 0
    while i < len(text):
        fits = [text[i : i + n] for n in range(1, longest + 1) if text[i : i + n] in index]
        pick = rng.choice(fits) if rng.random() < 0.5 else fits[-1]
        out.append(index[pick])
        i += len(pick)
    return out


# ---------------------------------------------------------------------- device helpers


@functools.partial(jax.jit, static_argnames=())
def _walk(g, tokens):
    """States after each prefix of ``tokens`` (EOS pads: a no-op) and their masks (ws run 0,
    unlimited budget). Returns (q [T+1], masks [T+1, V])."""

    def step(s, t):
        s2 = jm.advance(g, s, t)
        return s2, s2

    s0 = jm.init_state(g)
    _, ss = jax.lax.scan(step, s0, tokens)
    states = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), s0, ss)
    states = states.replace(ws_run=jnp.zeros_like(states.ws_run))
    masks = jax.vmap(jm.allowed, in_axes=(None, 0, None))(g, states, jnp.int32(BIG))
    return states.q, masks


def _reference_masks(vocab, specials, eos, tokens, steps, candidates, max_depth=None):
    """Reference allowed sets (over ``candidates``) after the prefixes tokens[:i], i in steps."""
    out = {}
    c = JsonPrefixChecker(max_depth)
    done = 0
    for i in sorted(steps):
        for t in tokens[done:i]:
            c.feed(vocab[t])
        done = i
        row = np.zeros(len(candidates), bool)
        for j, t in enumerate(candidates):
            if t == eos:
                row[j] = c.complete
            elif t not in specials and vocab[t]:
                row[j] = c.copy().feed(vocab[t])
        out[i] = (row, c.ok)
    return out


def _check_exact(g, vocab, eos, specials, token_lists, candidates, rng, max_depth=None, per=12):
    pad = 160
    n_checked = 0
    for toks in token_lists:
        toks = toks[:pad]
        arr = np.full(pad, eos, np.int32)
        arr[: len(toks)] = toks
        q, masks = _walk(g, jnp.asarray(arr))
        q, masks = np.asarray(q), np.asarray(masks)
        steps = set(rng.sample(range(len(toks) + 1), min(per, len(toks) + 1)))
        ref = _reference_masks(vocab, set(specials), eos, toks, steps, candidates, max_depth)
        for i, (row, ok) in ref.items():
            assert (q[i] != jm.DEAD) == ok, (i, vocab_text(vocab, toks[:i]))
            got = masks[i][candidates]
            if not np.array_equal(got, row):
                bad = [vocab[candidates[j]] for j in np.flatnonzero(got != row)][:10]
                raise AssertionError(f"prefix {vocab_text(vocab, toks[:i])!r}: differ on {bad}")
            n_checked += 1
    return n_checked


def vocab_text(vocab, toks):
    return b"".join(vocab[t] for t in toks)


# ------------------------------------------------------------------------------ exactness


def test_reference_checker_agrees_with_json_loads():
    """The test's own reference: complete texts are exactly what json.loads accepts as an
    object (on random valid texts and on corrupted ones)."""
    rng = random.Random(0)
    for _ in range(300):
        text = _rand_object(rng, 3)
        c = JsonPrefixChecker()
        assert c.feed(text) and c.complete, text
        assert isinstance(json.loads(text.decode()), dict)
        # every proper prefix is a valid prefix and not complete (unless whitespace follows)
        cut = rng.randrange(len(text))
        assert is_valid_prefix(text[:cut])
        bad = bytearray(text)
        bad[rng.randrange(len(bad))] = rng.choice(b'}]",:\\x\x01\xff0')
        c = JsonPrefixChecker()
        ok = c.feed(bytes(bad)) and c.complete
        try:
            loads_ok = isinstance(json.loads(bytes(bad).decode("utf-8")), dict)
        except (ValueError, UnicodeDecodeError):
            loads_ok = False
        assert ok == loads_ok, bytes(bad)


def test_mask_exact_on_valid_prefixes(grammar):
    """Allowed set == {t : prefix + bytes(t) is a valid prefix} (+ EOS iff complete)."""
    rng = random.Random(1)
    lists = [_segment(_rand_object(rng, 3), VOCAB, rng) for _ in range(40)]
    n = _check_exact(grammar, VOCAB, EOS, SPECIALS, lists, list(range(len(VOCAB))), rng)
    assert n > 300


def test_mask_exact_on_corrupted_prefixes(grammar):
    """Sequences with random tokens spliced in: the state is DEAD exactly when the reference
    says the text stopped being a prefix, and masks agree before that."""
    rng = random.Random(2)
    lists = []
    for _ in range(60):
        toks = _segment(_rand_object(rng, 2), VOCAB, rng)
        for _ in range(rng.randint(1, 3)):
            toks.insert(rng.randrange(len(toks) + 1), rng.randrange(len(VOCAB) - 2))
        lists.append(toks)
    _check_exact(grammar, VOCAB, EOS, SPECIALS, lists, list(range(len(VOCAB))), rng, per=8)


def test_depth_bound_is_exact():
    """With max_depth=3 the mask equals the reference that refuses a 4th open bracket."""
    g = jm.compile_grammar(VOCAB, eos_id=EOS, special_ids=SPECIALS, max_depth=3)
    rng = random.Random(3)
    texts = [b'{"a":[[', b'{"a":[{"b":', b'{"a":[{}', b'{"a":{"b":{"c":', b'{"a":[[]', b"{}"]
    lists = [_segment(t, VOCAB, rng) for t in texts]
    lists += [_segment(_rand_object(rng, 4), VOCAB, rng) for _ in range(20)]
    # the reference refuses any 4th bracket: deep random objects die there on both sides
    _check_exact(g, VOCAB, EOS, SPECIALS, lists, list(range(len(VOCAB))), rng, max_depth=3)


def test_max_depth_out_of_range():
    with pytest.raises(InvalidRequestError):
        jm.compile_grammar(VOCAB, eos_id=EOS, special_ids=SPECIALS, max_depth=33)


@pytest.mark.real_model
def test_mask_exact_real_vocab_sample(real):
    vocab, eos, specials, g = real
    rng = random.Random(4)
    index = {b: i for i, b in enumerate(vocab) if b}
    interesting = [
        i for i, b in enumerate(vocab) if any(c in b for c in b'{}[]",:\\0123456789 \n\x80\xe2')
    ]
    candidates = sorted(set(rng.sample(interesting, 2500) + rng.sample(range(len(vocab)), 1500)))
    candidates = sorted(set(candidates) | {eos, *specials[:3]})
    lists = [_segment(_rand_object(rng, 3), vocab, rng, index) for _ in range(12)]
    n = _check_exact(g, vocab, eos, specials, lists, candidates, rng, per=4)
    assert n >= 40


# ----------------------------------------------------------------------- fuzz rollouts


def _categories(vocab, eos):
    def has(chars):
        return np.array([any(c in b for c in chars) for b in vocab])

    hi = np.array([any(c >= 0x80 for c in b) for b in vocab])
    ws = np.array([bool(b) and all(c in b" \t\n\r" for c in b) for b in vocab])
    eos_only = np.zeros(len(vocab), bool)
    eos_only[eos] = True
    return np.stack(
        [
            np.zeros(len(vocab), bool),  # plain random logits
            has(b"}"),
            has(b'"'),
            has(b"\\"),
            has(b"0123456789"),
            ws,
            eos_only,
            hi,
            has(b"[{"),
            has(b"]"),
        ]
    )


@functools.partial(jax.jit, static_argnames=("steps",))
def _rollout(g, key, bias, budget, *, steps):
    B, V = bias.shape
    eos = g.eos_id

    def step(carry, i):
        s, done = carry
        k = jax.random.fold_in(key, i)
        mask = jax.vmap(jm.allowed, in_axes=(None, 0, 0))(g, s, budget - i)
        logits = 2.0 * jax.random.normal(k, (B, V)) + bias
        logits = jnp.where(mask, logits, -jnp.inf)
        tok = jax.random.categorical(jax.random.fold_in(k, 1), logits).astype(jnp.int32)
        active = ~done & (i < budget)
        tok = jnp.where(active, tok, eos)
        s = jax.vmap(jm.advance, in_axes=(None, 0, 0))(g, s, tok)
        ok = mask.any(1) | ~active
        max_depth = s.depth
        return (s, done | (tok == eos)), (tok, ok, max_depth)

    s0 = jax.vmap(lambda _: jm.init_state(g))(jnp.arange(B))
    (s, _), (toks, ok, depths) = jax.lax.scan(step, (s0, jnp.zeros(B, bool)), jnp.arange(steps))
    return toks.T, ok.all(0), depths.max(0), s


def _fuzz(g, vocab, eos, n_rows, steps, seed, small_frac=0.4):
    rng = np.random.default_rng(seed)
    cats = _categories(vocab, eos)
    which = rng.integers(0, len(cats), n_rows)
    strength = rng.uniform(2.0, 10.0, n_rows)
    bias = np.where(cats[which], strength[:, None], 0.0).astype(np.float32)
    small = rng.random(n_rows) < small_frac
    budget = np.where(small, rng.integers(1, 9, n_rows), steps).astype(np.int32)
    toks, ok, depth, s = _rollout(
        g, jax.random.key(seed), jnp.asarray(bias), jnp.asarray(budget), steps=steps
    )
    toks, ok, depth = np.asarray(toks), np.asarray(ok), np.asarray(depth)
    assert ok.all(), "a row was left with no allowed token"
    texts = []
    for r in range(n_rows):
        ids = list(toks[r, : budget[r]])
        if eos in ids:
            ids = ids[: ids.index(eos)]
        text = b"".join(vocab[t] for t in ids)
        assert budget[r] >= g.min_budget
        obj = json.loads(text.decode("utf-8"))  # raises on invalid JSON or UTF-8
        assert isinstance(obj, dict), text
        texts.append(text)
    return texts, depth, which, budget


def test_fuzz_1000_rollouts_valid_json(grammar):
    """1000 rows with random and adversarial logits, 40% with max_tokens in 1..8: every one
    ends as a json.loads-valid object."""
    t0 = time.perf_counter()
    texts, depth, which, budget = _fuzz(grammar, VOCAB, EOS, 1000, 48, seed=0)
    assert grammar.min_budget == 1  # the vocabulary has "{}"
    assert (depth <= 32).all()
    # the adversarial rows did produce non-trivial content
    assert sum(len(t) > 20 for t in texts) > 200
    assert any(b"\\u" in t for t in texts) and any(b"\xf0" in t for t in texts)
    assert time.perf_counter() - t0 < 60


def test_fuzz_small_depth_bound():
    g = jm.compile_grammar(VOCAB, eos_id=EOS, special_ids=SPECIALS, max_depth=2)
    texts, depth, _, _ = _fuzz(g, VOCAB, EOS, 300, 32, seed=5)
    assert depth.max() <= 2

    def nesting(x):
        if isinstance(x, dict):
            return 1 + max((nesting(v) for v in x.values()), default=0)
        if isinstance(x, list):
            return 1 + max((nesting(v) for v in x), default=0)
        return 0

    assert max(nesting(json.loads(t)) for t in texts) == 2


@pytest.mark.real_model
def test_fuzz_real_vocab(real):
    vocab, eos, _, g = real
    _fuzz(g, vocab, eos, 64, 40, seed=7)


def test_budget_exhaustive_small(grammar):
    """For every budget 1..6 and adversarial bias, rows end complete within the budget."""
    rng = np.random.default_rng(11)
    cats = _categories(VOCAB, EOS)
    rows = [(b, c) for b in range(1, 7) for c in range(len(cats)) for _ in range(4)]
    bias = np.stack([np.where(cats[c], rng.uniform(4, 12), 0.0) for _, c in rows]).astype(
        np.float32
    )
    budget = np.array([b for b, _ in rows], np.int32)
    toks, ok, _, s = _rollout(
        grammar, jax.random.key(3), jnp.asarray(bias), jnp.asarray(budget), steps=6
    )
    toks = np.asarray(toks)
    assert np.asarray(ok).all()
    assert np.asarray(jm.is_complete(grammar, s)).all()
    for r, (b, _) in enumerate(rows):
        ids = [t for t in toks[r, :b] if t != EOS]
        assert isinstance(json.loads(b"".join(VOCAB[t] for t in ids)), dict)


# ------------------------------------------------------------------------- other rules


_advance = jax.jit(jm.advance)
_allowed = jax.jit(jm.allowed)


def _state_after(g, toks):
    s = jm.init_state(g)
    for t in toks:
        s = _advance(g, s, jnp.int32(t))
    return s


def test_whitespace_runs_are_bounded(grammar):
    idx = {b: i for i, b in enumerate(VOCAB)}
    ws_tokens = [i for i, b in enumerate(VOCAB) if b and all(c in b" \t\n\r" for c in b)]
    s = _state_after(grammar, [idx[b'{"'], idx[b"a"], idx[b'":']])
    for n in range(jm.WS_RUN_MAX + 2):
        m = np.asarray(_allowed(grammar, s, jnp.int32(BIG)))
        assert m[ws_tokens].all() == (n < jm.WS_RUN_MAX)
        assert m[idx[b"1"]] and m[idx[b'"']]
        s = _advance(grammar, s, jnp.int32(idx[b" "])) if n < jm.WS_RUN_MAX else s
    # inside a string spaces are content and are never capped (raw \t \n \r are refused)
    s = _state_after(grammar, [idx[b'{"']] + [idx[b" "]] * (jm.WS_RUN_MAX + 3))
    m = np.asarray(_allowed(grammar, s, jnp.int32(BIG)))
    assert all(m[t] == (b" " * len(VOCAB[t]) == VOCAB[t]) for t in ws_tokens)
    # after the object: whitespace up to the cap, then only EOS
    s = _state_after(grammar, [idx[b"{}"]] + [idx[b"\n"]] * jm.WS_RUN_MAX)
    m = np.asarray(_allowed(grammar, s, jnp.int32(BIG)))
    assert np.flatnonzero(m).tolist() == [EOS]


def test_budget_steering_closes_in_time(grammar):
    idx = {b: i for i, b in enumerate(VOCAB)}
    s = _state_after(grammar, [idx[b'{"a":'], idx[b"["], idx[b"["], idx[b'"'], idx[b"x"]])
    # inside a string at depth 3: cost = close_cost + depth; with exactly that budget every
    # allowed token keeps a closing path, and with one token less nothing extra is allowed
    f = int(grammar.close_cost[int(s.q)]) + int(s.depth)
    m_free = np.asarray(_allowed(grammar, s, jnp.int32(BIG)))
    m_tight = np.asarray(_allowed(grammar, s, jnp.int32(f)))
    assert m_tight.sum() < m_free.sum() and (m_tight <= m_free).all()
    assert not m_tight[idx[b"x"]]  # one more character cannot be afforded
    assert m_tight[idx[b'"']] or m_tight[idx[b'"]']] or m_tight[idx[b'"]}']]


def test_jit_vmap_equals_loop(grammar):
    rng = random.Random(9)
    rows = [_segment(_rand_object(rng, 2), VOCAB, rng)[: rng.randint(0, 12)] for _ in range(6)]
    states = [_state_after(grammar, r) for r in rows]
    batched = jax.tree.map(lambda *a: jnp.stack(a), *states)
    rem = jnp.array([BIG, 3, 2, 5, BIG, 1], jnp.int32)
    got = jax.jit(jax.vmap(jm.allowed, in_axes=(None, 0, 0)))(grammar, batched, rem)
    for i, s in enumerate(states):
        np.testing.assert_array_equal(
            np.asarray(got[i]), np.asarray(jm.allowed(grammar, s, rem[i]))
        )


def test_compile_is_cached(grammar):
    t0 = time.perf_counter()
    g2 = jm.compile_grammar(list(VOCAB), eos_id=EOS, special_ids=SPECIALS)
    assert g2 is grammar and time.perf_counter() - t0 < 0.5
    # specials (other than EOS) and empty tokens are never allowed
    assert not np.asarray(grammar.next[:, :, SPECIALS[0]] != jm.DEAD).any()
