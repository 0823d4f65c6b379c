"""The whole sampler: chain vs the sort-based reference, exact draw, invariants, determinism."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsample import sampler as sm
from jaxsample.params import SamplingParams, derive_seed
from tests.reference_sampler import make_rows, reference_probs, sort_based_chain_keep

V = 32
SPECIAL = [0.0, 1.0, -1.0, 2.5, 7.0, -np.inf, np.nan, 3e38, -3e38, 1e-30, np.inf]


def _hist(batch, vocab=V, prompts=None, outputs=None):
    return sm.History.stack(
        [
            sm.History.from_tokens(
                prompts[i] if prompts else (), outputs[i] if outputs else (), vocab
            )
            for i in range(batch)
        ]
    )


def _rows(params, nb=4):
    return jax.tree.map(jnp.asarray, make_rows(params, nb=nb))


def _chi2_limit(df, z=4.0):
    """Upper chi-square quantile (Wilson-Hilferty), z = 4 standard deviations (p ~ 3e-5)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=probs.shape[0])
    assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
    expected = probs * tokens.shape[0]
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return stat, max(int(keep.sum()) - 1, 1)


# ------------------------------------------------------------------ the chain vs the reference

PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.sampled_from([0.0, 0.2, 0.7, 1.0, 2.0]),
        "top_k": st.integers(0, V + 1),
        "top_p": st.sampled_from([0.0, 0.3, 0.9, 1.0]) | st.floats(0, 1),
        "top_a": st.sampled_from([0.0, 0.1, 1.0]) | st.floats(1e-3, 1),
        "min_p": st.sampled_from([0.0, 0.05, 0.3]) | st.floats(1e-3, 1),
        "repetition_penalty": st.sampled_from([0.0, 0.8, 1.0, 1.5, 2.0]),
        "frequency_penalty": st.floats(-2, 2),
        "presence_penalty": st.floats(-2, 2),
        "logit_bias": st.dictionaries(st.integers(0, V - 1), st.floats(-100, 100), max_size=4),
    },
)


def logit_rows(dtype=np.float32):
    elements = st.one_of(st.sampled_from(SPECIAL), st.floats(-20, 20, width=32))

    def cast(x):
        with np.errstate(over="ignore"):  # 3e38 -> inf in float16, on purpose
            return x.astype(dtype)

    return hnp.arrays(np.float32, V, elements=elements).map(cast)


EDGES = [-0.0, 0.0, 1e-30, -1e-30, 1e-40, 3e38, -3e38, np.inf, -np.inf, np.nan, 1.0, -1.0]


@settings(max_examples=60, deadline=None)
@given(
    z=hnp.arrays(
        np.float32, V, elements=st.one_of(st.sampled_from(EDGES), st.floats(-30, 30, width=32))
    ),
    bias=hnp.arrays(np.float32, V, elements=st.sampled_from([0.0, -0.0, 1.0, -100.0, 100.0])),
    counts=hnp.arrays(np.int32, V, elements=st.integers(0, 3)),
    in_prompt=hnp.arrays(np.bool_, V, elements=st.booleans()),
    allowed=hnp.arrays(np.bool_, V, elements=st.booleans()) | st.none(),
    r=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 1.3, 2.0]),
    f=st.sampled_from([-2.0, -0.5, 0.0, -0.0, 0.7, 2.0]),
    p=st.sampled_from([-2.0, 0.0, -0.0, 0.4, 2.0]),
    t=st.sampled_from([0.0, 1e-5, 1e-4, 0.3, 1.0, 2.0]),
)
def test_fused_steps_1_to_5_equal_the_public_transforms_bit_for_bit(
    z, bias, counts, in_prompt, allowed, r, f, p, t
):
    """The sampler's one-pass steps 1-5 (clip per step, removed tokens and the zero's sign
    settled at the end) give the same bits as composing the public transforms, each of which
    re-finites its output: at -0.0, infinities, NaN, overflow and subnormals, with a mask."""
    from types import SimpleNamespace

    from jaxsample import transforms as tf

    row = SimpleNamespace(
        repetition_penalty=jnp.float32(r),
        frequency_penalty=jnp.float32(f),
        presence_penalty=jnp.float32(p),
        temperature=jnp.float32(t),
    )
    seen = in_prompt | (counts > 0)
    mask = None if allowed is None else jnp.asarray(allowed)

    @jax.jit
    def composed(x, b, c, s):
        y = tf.sanitize(x)
        y = y if mask is None else tf.hard_mask(y, mask)
        y = tf.add_bias(y, b)
        y = tf.repetition_penalty(y, row.repetition_penalty, s)
        y = tf.frequency_presence_penalty(y, c, row.frequency_penalty, row.presence_penalty)
        return tf.temperature(y, row.temperature)

    fused = jax.jit(lambda x, b, c, s: sm._scale(tf.sanitize(x), mask, b, row, s, c))
    args = (jnp.asarray(z), jnp.asarray(bias), jnp.asarray(counts), jnp.asarray(seen))
    want, got = np.asarray(composed(*args)), np.asarray(fused(*args))
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("num_candidates", [V, 6])
@settings(max_examples=40, deadline=None)
@given(
    logits=st.sampled_from([np.float32, jnp.float16, jnp.bfloat16]).flatmap(logit_rows),
    params=PARAMS,
    prompt=st.lists(st.integers(0, V - 1), max_size=5),
    output=st.lists(st.integers(0, V - 1), max_size=5),
    allowed=hnp.arrays(np.bool_, V, elements=st.booleans()) | st.none(),
)
def test_chain_matches_sort_reference(num_candidates, logits, params, prompt, output, allowed):
    rows = _rows([params])
    hist = _hist(1, prompts=[prompt], outputs=[output])
    mask = None if allowed is None else jnp.asarray(allowed)[None]
    got = np.asarray(
        sm.processed_logprobs_batch(
            jnp.asarray(logits)[None], rows, hist, mask, num_candidates=num_candidates
        )[0]
    )
    assert not np.isnan(got).any()
    kw = dict(allowed=allowed, prompt=prompt, output=output)
    logits32 = np.asarray(jnp.asarray(logits).astype(jnp.float32))
    probs, ok = reference_probs(logits32, params, **kw)
    if not ok:
        assert (got == -np.inf).all()
        return
    tight, loose = sort_based_chain_keep(logits32, params, **kw)
    kept = got > -np.inf
    assert not (tight & ~kept).any(), "dropped a token the reference keeps"
    assert not (kept & ~loose).any(), "kept a token the reference drops"
    # given the kept set, the probabilities are the renormalized reference ones
    ref = np.where(kept, probs, 0.0) if kept.sum() == 1 else None
    want = reference_probs(
        logits32, {**params, "top_k": 0, "top_p": 1.0, "top_a": 0.0, "min_p": 0.0}, **kw
    )[0]
    want = np.where(kept, want, 0.0)
    want = want / want.sum() if ref is None else ref / ref.sum()
    np.testing.assert_allclose(np.exp(got), want, atol=2e-6, rtol=2e-4)


# ------------------------------------------------------------------ the draw is exact


CHI_CASES = {  # with 4 candidates and a second tier of 16: the first case resolves on the
    # candidates, top_k=9 on the second tier, the others on the full vocabulary
    "candidates": dict(top_k=3, top_p=0.95, min_p=0.02, temperature=0.8),
    "full_vocabulary_no_filter": dict(temperature=1.3),
    "fallback_top_p": dict(top_p=0.8, top_a=0.05),
    "second_tier_top_k": dict(top_k=9, temperature=0.7),
    "penalties": dict(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=-0.3),
}


def test_draw_frequencies_match_processed_logprobs():
    n, v, cases = 8000, 600, list(CHI_CASES.values())
    logits = np.random.default_rng(7).standard_normal(v).astype(np.float32) * 1.5
    prompt, output = [3, 4, 5], [5, 9, 9]
    rows = _rows([{**case, "seed": s} for case in cases for s in range(n)])
    hist = _hist(1, v, [prompt], [output])
    hist_n = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(cases) * n,) + x.shape[1:]), hist)
    lp = sm.processed_logprobs_batch(
        jnp.broadcast_to(jnp.asarray(logits), (len(cases), v)),
        jax.tree.map(lambda x: x[::n], rows),
        jax.tree.map(lambda x: x[: len(cases)], hist_n),
        None,
        num_candidates=4,
        second_tier=16,
    )
    out = sm.sample_batch(
        jnp.broadcast_to(jnp.asarray(logits), (len(cases) * n, v)),
        rows,
        hist_n,
        None,
        3,
        num_candidates=4,
        second_tier=16,
    )
    assert np.asarray(out.ok).all()
    tier1, tier2, _ = sm.tier_stats(
        jnp.broadcast_to(jnp.asarray(logits), (len(cases), v)),
        jax.tree.map(lambda x: x[::n], rows),
        jax.tree.map(lambda x: x[: len(cases)], hist_n),
        num_candidates=4,
        second_tier=16,
    )
    assert tier1.tolist() == [True, False, False, False, False]  # every path is exercised
    assert tier2.tolist() == [False, False, False, True, False]
    tokens = np.asarray(out.token).reshape(len(cases), n)
    for name, lp_row, toks in zip(CHI_CASES, np.asarray(lp, np.float64), tokens, strict=True):
        probs = np.exp(lp_row)
        stat, df = _chi_square(toks, probs / probs.sum())
        assert stat < _chi2_limit(df), (name, stat, df)


# ------------------------------------------------------------------ invariants


def _logits(b, v=V, seed=0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, v)) * scale, jnp.float32)


def test_top_k_1_equals_greedy():
    b = 16
    logits = _logits(b)
    hist = _hist(b)
    greedy = sm.sample_batch(logits, _rows([{"temperature": 0.0}] * b), hist, None, 0)
    topk1 = sm.sample_batch(
        logits,
        _rows([{"top_k": 1, "seed": i, "temperature": 1.5} for i in range(b)]),
        hist,
        None,
        0,
    )
    np.testing.assert_array_equal(greedy.token, topk1.token)
    np.testing.assert_array_equal(greedy.token, np.argmax(np.asarray(logits), axis=1))


def test_greedy_ties_take_lowest_id_and_mix_with_sampled_rows():
    logits = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 0.0]] * 2)
    rows = _rows([{"temperature": 0.0}, {"temperature": 0.0}, {"seed": 1}, {"top_k": 1}])
    out = sm.sample_batch(logits, rows, _hist(4, 4), None, 0)
    assert out.token.tolist()[:2] == [1, 0]
    assert int(out.token[2]) in (0, 1, 2, 3) and int(out.token[3]) in (0, 1, 2)
    lp = sm.processed_logprobs_batch(logits, rows, _hist(4, 4), None)
    np.testing.assert_array_equal(lp[0], [-np.inf, 0.0, -np.inf, -np.inf])
    np.testing.assert_allclose(np.exp(lp[3]), [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)


def test_neutral_params_are_plain_softmax():
    logits = _logits(3, seed=3)
    lp = sm.processed_logprobs_batch(logits, _rows([{}] * 3), _hist(3), None)
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits), atol=1e-5)
    lp2 = sm.processed_logprobs_batch(
        logits,
        _rows([{"top_p": 1.0, "top_k": V, "min_p": 0.0, "top_a": 0.0}] * 3),
        _hist(3),
        None,
        num_candidates=4,
    )
    np.testing.assert_allclose(lp2, jax.nn.log_softmax(logits), atol=1e-5)


@pytest.mark.parametrize("num_candidates", [V, 4])
def test_removed_token_is_never_drawn(num_candidates):
    n = 2000
    logits = jnp.broadcast_to(_logits(1, scale=0.5)[0], (n, V))
    allowed = np.ones((n, V), bool)
    allowed[:, ::2] = False
    rows = _rows([{"seed": s, "top_p": 0.9, "logit_bias": {1: -100.0}} for s in range(n)])
    out = sm.sample_batch(
        logits, rows, _hist(n), jnp.asarray(allowed), 0, num_candidates=num_candidates
    )
    tokens = np.asarray(out.token)
    assert (tokens % 2 == 1).all()
    lp = sm.processed_logprobs_batch(
        logits[:1],
        jax.tree.map(lambda x: x[:1], rows),
        _hist(1),
        jnp.asarray(allowed[:1]),
        num_candidates=num_candidates,
    )
    assert np.isfinite(np.asarray(lp)[0, tokens]).all()


MIXED = [
    {"seed": 1, "top_k": 5, "top_p": 0.9, "top_logprobs": 3},
    {"seed": 2, "temperature": 0.0, "top_logprobs": 20},
    {"seed": 3, "min_p": 0.1, "top_a": 0.2, "processed_logprobs": True, "top_logprobs": 5},
    {"seed": 4, "repetition_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {2: 5.0}},
    {"seed": 5},
    {"seed": 6, "top_p": 0.5, "temperature": 2.0},
]


def _mixed_inputs():
    b = len(MIXED)
    logits = _logits(b, seed=11)
    hist = _hist(b, prompts=[[1, 2]] * b, outputs=[[2, 3, 3]] * b)
    return logits, _rows(MIXED), hist


def _tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("num_candidates", [V, 4])
def test_jit_equals_eager_and_vmap_equals_loop(num_candidates):
    logits, rows, hist = _mixed_inputs()
    batched = sm.sample_batch(logits, rows, hist, None, 5, num_candidates=num_candidates)
    for i in (2,):  # eager runs op by op (slow): one row with every kind of output
        row, h = jax.tree.map(lambda x, i=i: x[i], (rows, hist))
        eager = sm.sample_row(logits[i], row, h, None, jnp.int32(5), num_candidates=num_candidates)
        jitted = jax.jit(sm.sample_row, static_argnames="num_candidates")(
            logits[i], row, h, None, jnp.int32(5), num_candidates=num_candidates
        )
        _tree_equal(eager, jitted)
        _tree_equal(eager, jax.tree.map(lambda x, i=i: x[i], batched))
    # a plain vmap (both cond branches run as selects) gives the same answer
    plain = jax.jit(jax.vmap(sm.sample_row, in_axes=(0, 0, 0, None, None)))(
        logits, rows, hist, None, jnp.int32(5)
    )
    if num_candidates == sm.NUM_CANDIDATES:
        _tree_equal(plain, batched)


def test_row_result_is_independent_of_batch():
    logits, rows, hist = _mixed_inputs()
    alone = [
        sm.sample_batch(*jax.tree.map(lambda x, i=i: x[i : i + 1], (logits, rows, hist)), None, 7)
        for i in range(len(MIXED))
    ]
    rng = np.random.default_rng(0)
    for batch in (3, 8):
        idx = rng.integers(0, len(MIXED), size=batch)
        got = sm.sample_batch(
            *jax.tree.map(lambda x, idx=idx: x[idx], (logits, rows, hist)), None, 7
        )
        for j, i in enumerate(idx):
            _tree_equal(
                jax.tree.map(lambda x, j=j: x[j], got), jax.tree.map(lambda x, i=i: x[0], alone[i])
            )


def test_draw_depends_on_seed_and_position_only():
    logits, rows, hist = _mixed_inputs()
    a = sm.sample_batch(logits, rows, hist, None, 0)
    b = sm.sample_batch(logits, rows, hist, None, 0)
    _tree_equal(a, b)
    draws = {
        tuple(np.asarray(sm.sample_batch(logits, rows, hist, None, pos).token)) for pos in range(8)
    }
    assert len(draws) > 1  # the position changes the key


def test_no_recompile_when_values_change():
    logits, rows, hist = _mixed_inputs()
    traces = []

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(logits, rows, hist, position):
        traces.append(1)
        return sm.sample_rows(logits, rows, hist, None, position)

    sizes = sm.sample_batch._cache_size(), sm.processed_logprobs_batch._cache_size()
    for k in range(4):
        new = jax.tree.map(lambda x, k=k: x + k if x.dtype != jnp.bool_ else ~x, rows)
        step(logits * (k + 1), new, hist, jnp.int32(k))
        sm.sample_batch(logits * (k + 1), new, hist, None, jnp.int32(k))
        sm.processed_logprobs_batch(logits * (k + 1), new, hist, None)
    assert len(traces) == 1
    assert sm.sample_batch._cache_size() - sizes[0] <= 1
    assert sm.processed_logprobs_batch._cache_size() - sizes[1] <= 1


# ------------------------------------------------------------------ logprobs


def test_logprobs_raw_and_processed():
    logits, rows, hist = _mixed_inputs()
    out = sm.sample_batch(logits, rows, hist, None, 1)
    raw = np.asarray(jax.nn.log_softmax(logits))
    proc = np.asarray(sm.processed_logprobs_batch(logits, rows, hist, None))
    for i, p in enumerate(MIXED):
        tok = int(out.token[i])
        src = proc if p.get("processed_logprobs") else raw
        np.testing.assert_allclose(out.logprob[i], src[i, tok], rtol=1e-5, atol=1e-6)
        if p.get("top_logprobs", 0) == 0:
            continue
        order = np.lexsort((np.arange(V), -src[i]))[:20]
        finite = np.isfinite(src[i, order])  # past the kept set the ids are unspecified
        np.testing.assert_array_equal(np.asarray(out.top_ids[i])[finite], order[finite])
        np.testing.assert_allclose(out.top_logprobs[i], src[i, order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", ["auto", "xla"])
def test_raw_logprobs_are_exact_at_any_logit_size(kernels, monkeypatch):
    """Raw log probabilities are ``(x - max) - log(sum(exp(x - max)))``: within float32
    rounding of float64's log_softmax at any size of the logits (``x - logsumexp(x)`` loses
    the normalizer's digits once the max is large: at 1e7 float32's spacing is 1, and at
    3e38 two tied tokens each got 0), with the CPU kernel and with the JAX form."""
    monkeypatch.setattr(sm.native, "KERNELS", kernels)
    vocab = 64
    logits = np.full((7, vocab), -30.0, np.float32)
    logits[:, :4] = 0.0  # four tied tokens on top
    logits += np.array([0.0, 1e4, 1e6, 1e7, 1e30, 3e38, 0.0], np.float32)[:, None]
    logits[6, 10:12] = np.inf  # read as the largest float: two tied tokens
    rows = _rows([dict(logprobs=True, top_logprobs=5, seed=i) for i in range(7)])
    run = jax.jit(lambda *a: sm.sample_rows(*a))  # traced afresh under this KERNELS
    out = jax.device_get(run(jnp.asarray(logits), rows, _hist(7, vocab), None, jnp.int32(0)))
    z = np.minimum(logits, np.finfo(np.float32).max).astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    want = z - np.log(np.exp(z).sum(-1, keepdims=True))
    for i in range(7):
        np.testing.assert_allclose(out.logprob[i], want[i, out.token[i]], atol=2e-6)
        np.testing.assert_allclose(out.top_logprobs[i, :5], want[i, out.top_ids[i, :5]], atol=2e-6)
        assert np.exp(want[i, np.asarray(out.top_ids[i, :5])]).sum() <= 1 + 1e-6


def test_rows_without_logprobs_get_none_and_draw_the_same():
    # logprobs=False rows report NaN and no top entries; no row's token changes, and a batch
    # where no row asks skips the raw pass without changing any token either
    logits, rows, hist = _mixed_inputs()
    asked = sm.sample_batch(logits, rows, hist, None, 2)
    off = np.array([False, True, False, True, True, False])
    some = sm.sample_batch(logits, rows.replace(logprobs=~off), hist, None, 2)
    none = sm.sample_batch(logits, rows.replace(logprobs=np.zeros_like(off)), hist, None, 2)
    np.testing.assert_array_equal(some.token, asked.token)
    np.testing.assert_array_equal(none.token, asked.token)
    assert np.isnan(np.asarray(some.logprob)[off]).all()
    np.testing.assert_array_equal(np.asarray(some.logprob)[~off], np.asarray(asked.logprob)[~off])
    assert (np.asarray(some.top_ids)[off] == -1).all()
    np.testing.assert_array_equal(np.asarray(some.top_ids)[~off], np.asarray(asked.top_ids)[~off])
    assert np.isnan(np.asarray(none.logprob)).all()


# ------------------------------------------------------------------ bad logits


def test_bad_logits_never_nan_nor_banned():
    b = 4
    logits = np.array(_logits(b, seed=5))
    logits[0] = np.nan
    logits[1] = -np.inf
    logits[2, :] = np.nan
    logits[2, 7] = 1.0  # one real token among NaN
    rows = _rows([{"seed": i, "top_logprobs": 5, "top_p": 0.5} for i in range(b)])
    allowed = np.ones((b, V), bool)
    allowed[3] = False  # every token banned by the constraint
    for nc in (V, 4):
        out = sm.sample_batch(
            jnp.asarray(logits), rows, _hist(b), jnp.asarray(allowed), 0, num_candidates=nc
        )
        assert out.ok.tolist() == [False, False, True, False]
        assert out.token.tolist() == [-1, -1, 7, -1]
        for leaf in (out.logprob, out.top_logprobs):
            assert not np.isnan(np.asarray(leaf)).any()
        lp = sm.processed_logprobs_batch(
            jnp.asarray(logits), rows, _hist(b), jnp.asarray(allowed), num_candidates=nc
        )
        assert not np.isnan(np.asarray(lp)).any()
        assert (np.asarray(lp)[[0, 1, 3]] == -np.inf).all()


def test_all_banned_by_logit_bias_is_not_nan():
    # logit_bias -100 cannot remove a token; -inf logits plus bias stay removed
    logits = jnp.full((1, V), -jnp.inf).at[0, 3].set(0.0)
    rows = _rows([{"logit_bias": {3: -100.0}}])
    out = sm.sample_batch(logits, rows, _hist(1), None, 0)
    assert int(out.token[0]) == 3 and bool(out.ok[0])


# ------------------------------------------------------------------ history and host wrappers


def test_history_from_tokens_and_append():
    h = sm.History.from_tokens([1, 1, 4], [2, 2, 0], vocab_size=6)
    assert h.counts.tolist() == [1, 0, 2, 0, 0, 0]
    assert h.in_prompt.tolist() == [False, True, False, False, True, False]
    h2 = jax.jit(sm.History.append)(h, jnp.int32(5))
    assert h2.counts.tolist() == [1, 0, 2, 0, 0, 1]
    h3 = jax.jit(sm.History.append)(h2, jnp.int32(-1))
    assert h3.counts.tolist() == h2.counts.tolist()
    with pytest.raises(ValueError):
        sm.History.from_tokens([6], [], vocab_size=6)


def test_host_wrappers():
    logits = np.asarray(_logits(3, seed=9))
    params = [
        SamplingParams(seed=5, top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.2, logprobs=True, top_logprobs=2),
    ]
    res = sm.sample(
        logits, params, prompt_tokens=[[1], [], [2]], output_tokens=[[1], [], []], step=2
    )
    assert res.seeds == (5, derive_seed(0, 1), derive_seed(0, 2))
    assert int(res.tokens[1]) == int(np.argmax(logits[1]))
    direct = sm.sample_batch(
        jnp.asarray(logits),
        _rows(
            [
                {"seed": 5, "top_k": 3},
                {"temperature": 0.0, "seed": derive_seed(0, 1)},
                {"min_p": 0.2, "top_logprobs": 2, "seed": derive_seed(0, 2)},
            ]
        ),
        _hist(3, prompts=[[1], [], [2]], outputs=[[1], [], []]),
        None,
        2,
    )
    np.testing.assert_array_equal(res.tokens, direct.token)
    lp = sm.processed_logprobs(
        logits, params, prompt_tokens=[[1], [], [2]], output_tokens=[[1], [], []]
    )
    assert lp.shape == (3, V) and np.isfinite(lp).sum(axis=1)[0] == 3
    one = sm.sample(logits, SamplingParams(seed=1))
    assert one.seeds == (1, 1, 1)


def test_logit_bias_tiers_with_full_capacity():
    """Rows packed at full capacity (1024 entries): tiers none / 16 / 128 / all in one batch."""
    from jaxsample.params import LOGIT_BIAS_MAX

    v = 2048
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((4, v)).astype(np.float32)
    biases = [
        {},
        {int(t): float(b) for t, b in zip(rng.choice(v, 10, replace=False), rng.normal(0, 5, 10))},
        {
            int(t): float(b)
            for t, b in zip(rng.choice(v, 100, replace=False), rng.normal(0, 5, 100))
        },
        {int(t): 3.0 for t in rng.choice(v, 700, replace=False)},
    ]
    params = [{"logit_bias": b, "seed": i} for i, b in enumerate(biases)]
    rows = _rows(params, nb=LOGIT_BIAS_MAX)
    for batch in ([0, 1], [2, 3], [0, 1, 2, 3]):
        sub = jax.tree.map(lambda x, batch=batch: x[np.asarray(batch)], rows)
        got = np.asarray(
            sm.processed_logprobs_batch(jnp.asarray(logits[batch]), sub, _hist(len(batch), v), None)
        )
        for j, i in enumerate(batch):
            want, _ = reference_probs(logits[i], params[i])
            np.testing.assert_allclose(np.exp(got[j]), want, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- fuzzing pass
# (tests/test_fuzz_inputs.py found these; each raised another exception before its fix)


def _refused(call, field):
    from jaxsample import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        call()
    assert err.value.field == field, err.value
    return err.value


def test_host_wrappers_refuse_lists_that_are_not_lists():
    """params=np.array(3) raised "iteration over a 0-d array", prompt_tokens=5 "object of
    type 'int' has no len()", a ragged list numpy's ValueError; a bad id inside a row's list
    was named 'prompt_ids' (History's argument), not the caller's prompt_tokens[i]; logits
    [[None], []] raised numpy's ValueError."""
    logits = np.zeros((1, 8), np.float32)
    p = SamplingParams(seed=1)
    _refused(lambda: sm.sample(logits, np.array(3)), "params")
    _refused(lambda: sm.sample(logits, p, prompt_tokens=5), "prompt_tokens")
    _refused(lambda: sm.processed_logprobs(logits, p, output_tokens=np.array(2)), "output_tokens")
    _refused(lambda: sm.sample(logits, p, prompt_tokens=[[1, [2]]]), "prompt_tokens[0]")
    err = _refused(lambda: sm.sample(logits, p, prompt_tokens=[[1, 9]]), "prompt_tokens[0]")
    assert err.value == 9
    _refused(lambda: sm.sample(logits, p, output_tokens=[[1.0]]), "output_tokens[0]")
    _refused(lambda: sm.sample([[None], []], p), "logits")


def test_sample_names_job_seed_and_step():
    """A bad job_seed was reported as 'seed'; step=1 with key= raised a bare ValueError, and an
    array step numpy's "truth value of an array" ValueError."""
    logits = np.zeros((1, 8), np.float32)
    _refused(lambda: sm.sample(logits, SamplingParams(), job_seed=2**63), "job_seed")
    _refused(lambda: sm.sample(logits, SamplingParams(), job_seed=1.5), "job_seed")
    _refused(lambda: sm.sample(logits, SamplingParams(), key=jax.random.key(0), step=1), "step")
    _refused(lambda: sm.sample(logits, SamplingParams(), step=np.array([1, 2])), "step")


def test_a_key_jax_cannot_read_is_refused():
    """key=2**31 raised OverflowError, None / [None] JAX's ValueError, a lone surrogate
    UnicodeEncodeError."""
    logits = np.zeros((1, 8), np.float32)
    for key in (2**31, [None], "\ud800", [[2**70]]):
        _refused(lambda key=key: sm.sample(logits, SamplingParams(), key=key), "key")
    h = sm.History.from_tokens([], [], 4)
    d = sm.distribution(jnp.zeros(4), sm._neutral_row(4), h, None)
    for key in (None, 2**31):
        _refused(lambda key=key: sm.draw(d, key), "key")


def test_log_prob_top_logprobs_and_draw_check_their_arguments():
    """log_prob(d, 1.5) failed inside JAX ("Indexer must have integer or boolean type"),
    log_prob(d, 2**31) with OverflowError, log_prob(d, True) read True as token 1;
    top_logprobs(d, -1) raised a bare ValueError and top_logprobs(d, 2**63) a JAX error;
    draw(None, key) and log_prob(5, ids) an AttributeError."""
    h = sm.History.from_tokens([], [], 4)
    d = sm.distribution(jnp.zeros(4), sm._neutral_row(4), h, None)
    for ids in (1.5, [1.0], True, 2**31, "a", None, [2**70]):
        _refused(lambda ids=ids: sm.log_prob(d, ids), "ids")
    for n in (-1, 2**63, 1.0, "3", None):
        _refused(lambda n=n: sm.top_logprobs(d, n), "n")
    for bad in (None, 5, {"z": 1}):
        _refused(lambda bad=bad: sm.draw(bad, jax.random.key(0)), "dist")
        _refused(lambda bad=bad: sm.log_prob(bad, 0), "dist")
        _refused(lambda bad=bad: sm.top_logprobs(bad, 2), "dist")
    # what is accepted is unchanged: numpy ids, out-of-vocabulary ids give -inf
    lp = np.asarray(sm.log_prob(d, np.array([0, 4, -1], np.int64)))
    assert lp[0] == pytest.approx(np.log(0.25)) and np.all(lp[1:] == -np.inf)
    assert sm.top_logprobs(d, np.int64(2))[0].shape == (2,)


def test_distribution_refuses_arrays_of_the_wrong_dtype():
    """Integer, bool or complex logits were silently cast (complex lost its imaginary
    part); a float mask failed inside JAX and an int mask was read bitwise (~2 is -3: True);
    float counts ran, a float in_prompt failed inside JAX; a list of logits failed with an
    AttributeError; num_candidates=0 with an IndexError."""
    V = 6
    row = sm._neutral_row(V)
    h = sm.History.from_tokens([], [], V)
    z = jnp.zeros(V)
    for logits in (jnp.zeros(V, jnp.int32), jnp.zeros(V, bool), jnp.zeros(V, jnp.complex64)):
        _refused(lambda logits=logits: sm.distribution(logits, row, h, None), "logits")
    _refused(lambda: sm.distribution([0.0] * V, row, h, None), "logits")
    for allowed in (jnp.ones(V, jnp.float32), jnp.full(V, 2, jnp.int32)):
        _refused(lambda allowed=allowed: sm.distribution(z, row, h, allowed), "allowed")
    bad = sm.History(counts=jnp.zeros(V, jnp.float32), in_prompt=h.in_prompt)
    _refused(lambda: sm.distribution(z, row, bad, None), "hist.counts")
    bad = sm.History(counts=h.counts, in_prompt=jnp.zeros(V, jnp.float32))
    _refused(lambda: sm.distribution(z, row, bad, None), "hist.in_prompt")
    for nc in (0, 1.5, None, np.array([3])):
        _refused(
            lambda nc=nc: sm.distribution(z, row, h, None, num_candidates=nc), "num_candidates"
        )
    _refused(lambda: sm.distribution(z, row, h, None, second_tier=-1), "second_tier")
    # float16 / bfloat16 logits and numpy-integer sizes are still taken
    for logits in (jnp.zeros(V, jnp.float16), jnp.zeros(V, jnp.bfloat16)):
        sm.distribution(logits, row, h, None, num_candidates=np.int64(4))


def test_history_from_tokens_bounds_the_vocabulary():
    """vocab_size=2**63 raised OverflowError inside numpy and 2**32 asked for 32 GiB; it is an
    integer in [1, 2**31 - 1], as in pack_rows."""
    for vocab in (2**31, 2**63, np.uint64(2**64 - 1)):
        _refused(lambda vocab=vocab: sm.History.from_tokens([], [], vocab), "vocab_size")
