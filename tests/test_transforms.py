"""Each transform against a plain numpy reference written from SPEC.md."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsample import transforms as tf
from tests.reference_sampler import F32_MAX, reference_keep, scaled_logits

V = 24
SPECIAL = [0.0, 1.0, -1.0, 2.5, 7.0, -np.inf, np.nan, 3e38, -3e38, 1e-30, np.inf]


def logit_rows(size=V, special=True):
    elements = st.floats(-30, 30, width=32)
    if special:
        elements = st.one_of(st.sampled_from(SPECIAL), elements, st.sampled_from([0.5, 3.0]))
    return hnp.arrays(np.float32, size, elements=elements)


# ------------------------------------------------------------------ steps 1-5 (elementwise)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_sanitize_nan_and_inf(dtype):
    x = jnp.array([1.5, jnp.nan, jnp.inf, -jnp.inf, -2.0], dtype)
    out = np.asarray(tf.sanitize(x))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.5, -np.inf, F32_MAX, -np.inf, -2.0])


def test_hard_mask_and_logit_bias():
    z = jnp.array([0.0, 1.0, -jnp.inf, 3.0])
    masked = tf.hard_mask(z, jnp.array([True, False, True, True]))
    np.testing.assert_array_equal(masked, [0.0, -np.inf, -np.inf, 3.0])
    # duplicate ids add up; padding (0, 0.0) adds nothing; -inf stays removed
    biased = tf.logit_bias(z, jnp.array([3, 2, 3, 0]), jnp.array([1.0, 50.0, 2.0, 0.0]))
    np.testing.assert_array_equal(biased, [0.0, 1.0, -np.inf, 6.0])
    huge = tf.logit_bias(jnp.array([3e38]), jnp.array([0]), jnp.array([100.0]))
    assert np.isfinite(np.asarray(huge)).all()


def test_logit_bias_ids_outside_the_vocabulary_add_nothing():
    """A negative id (-1, the padding id of top_ids) was read from the end: it biased the
    last token. Ids outside [0, V) add nothing, in the sparse and the dense form."""
    z = jnp.array([0.0, 1.0, 2.0, 3.0])
    ids, values = jnp.array([-1, -4, 4, 99, 1]), jnp.array([50.0, 60.0, 70.0, 80.0, 0.5])
    np.testing.assert_array_equal(tf.logit_bias(z, ids, values), [0.0, 1.5, 2.0, 3.0])
    np.testing.assert_array_equal(tf.bias_vector(ids, values, 4), [0.0, 0.5, 0.0, 0.0])
    jitted = jax.jit(tf.logit_bias)(z, ids, values)  # traced ids: the same
    np.testing.assert_array_equal(jitted, [0.0, 1.5, 2.0, 3.0])


@settings(max_examples=40, deadline=None)
@given(
    z=logit_rows(),
    r=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 1.3, 2.0]),
    f=st.floats(-2, 2),
    p=st.floats(-2, 2),
    t=st.sampled_from([0.0, 1e-5, 0.3, 1.0, 2.0]),
    prompt=st.lists(st.integers(0, V - 1), max_size=6),
    output=st.lists(st.integers(0, V - 1), max_size=6),
)
def test_steps_1_to_5_match_reference(z, r, f, p, t, prompt, output):
    params = dict(repetition_penalty=r, frequency_penalty=f, presence_penalty=p, temperature=t)
    want, greedy = scaled_logits(z, params, prompt=prompt, output=output)
    counts = np.bincount(np.asarray(output, np.int64), minlength=V).astype(np.int32)
    seen = counts > 0
    seen[np.asarray(prompt, np.int64)] = True
    got = tf.sanitize(z)
    got = tf.repetition_penalty(got, jnp.float32(r), jnp.asarray(seen))
    got = tf.frequency_presence_penalty(got, jnp.asarray(counts), jnp.float32(f), jnp.float32(p))
    got = np.asarray(tf.temperature(got, jnp.float32(t)))
    assert bool(tf.is_greedy(jnp.float32(t))) == greedy
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got == -np.inf, want == -np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)  # CPU flushes subnormals


def test_repetition_penalty_zero_is_finite_limit():
    z = jnp.array([2.0, -2.0, 3e38, 5.0])
    seen = jnp.array([True, True, True, False])
    out = np.asarray(tf.repetition_penalty(z, jnp.float32(0.0), seen))
    np.testing.assert_allclose(out, [2e6, -2e-6, F32_MAX, 5.0], rtol=1e-6)
    assert np.isfinite(out).all()


def test_temperature_overflow_is_clipped_and_greedy_untouched():
    z = jnp.array([3e38, 1.0, -jnp.inf])
    np.testing.assert_array_equal(tf.temperature(z, jnp.float32(1e-4)), [F32_MAX, 1e4, -np.inf])
    np.testing.assert_array_equal(tf.temperature(z, jnp.float32(0.0)), z)


def test_order_key_is_monotone():
    x = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38], np.float32)
    keys = np.asarray(tf._order_key(jnp.asarray(x)))
    assert (np.diff(keys) > 0).all()
    np.testing.assert_array_equal(tf._from_order_key(jnp.asarray(keys)), x)


# ------------------------------------------------------------------ steps 6-9 (filters)

FILTERS = {
    "top_k": (
        lambda s, v: tf.top_k(s, v.astype(jnp.int32), vocab_size=V),
        lambda s, v, run: tf.top_k_full(s, v.astype(jnp.int32), run, vocab_size=V),
    ),
    "top_p": (tf.top_p, tf.top_p_full),
    "top_a": (tf.top_a, lambda s, v, run: tf.top_a_full(s, v)),
    "min_p": (tf.min_p, lambda s, v, run: tf.min_p_full(s, v)),
}
VALUES = {
    "top_k": st.integers(0, V + 2),
    "top_p": st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.999, 1.0]) | st.floats(0, 1),
    "top_a": st.sampled_from([0.0, 0.01, 0.2, 1.0]) | st.floats(1e-3, 1),
    "min_p": st.sampled_from([0.0, 0.05, 0.5, 1.0]) | st.floats(1e-3, 1),
}


@partial(jax.jit, static_argnames=("name", "num_candidates"))
def _filter_masks(z, value, *, name, num_candidates):
    fast, full = FILTERS[name]
    c = fast(tf.init_candidates(z, num_candidates), value)
    c_mask = jnp.zeros(V, bool).at[c.ids].set(jnp.arange(c.ids.shape[0]) < c.n)
    c_mask = jnp.where(c.kept_all, z > -jnp.inf, c_mask)
    f_mask = tf.full_keep(full(tf.init_full(z), value, jnp.bool_(True)))
    return c_mask, c.exact, c.kept_all, f_mask


def _assert_between(got, tight, loose):
    assert not (tight & ~got).any(), f"dropped {np.flatnonzero(tight & ~got)}"
    assert not (got & ~loose).any(), f"kept {np.flatnonzero(got & ~loose)}"


@pytest.mark.parametrize("name", list(FILTERS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_each_filter_matches_sort_reference(name, data):
    z = data.draw(logit_rows())
    z, _ = scaled_logits(z, {})  # sanitized float32, as the chain sees it
    value = data.draw(VALUES[name])
    params = {name: value}
    tight, loose = reference_keep(z, params, slack=-1e-4), reference_keep(z, params, slack=1e-4)
    for num_candidates in (V, 5):
        c_mask, exact, kept_all, f_mask = (
            np.asarray(x)
            for x in _filter_masks(
                jnp.asarray(z), jnp.float32(value), name=name, num_candidates=num_candidates
            )
        )
        _assert_between(f_mask, tight, loose)  # the full-vocabulary version is always exact
        if exact:
            _assert_between(c_mask, tight, loose)
        if num_candidates == V:
            assert exact and not kept_all  # all candidates: always resolved


def test_top_k_keeps_ties_at_the_boundary():
    z = jnp.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
    c_mask, exact, _, f_mask = _filter_masks(
        jnp.pad(z, (0, V - 6), constant_values=-jnp.inf),
        jnp.float32(3),
        name="top_k",
        num_candidates=V,
    )
    assert bool(exact)
    np.testing.assert_array_equal(np.flatnonzero(c_mask), [1, 2, 3, 4])
    np.testing.assert_array_equal(np.flatnonzero(f_mask), [1, 2, 3, 4])


def test_candidates_say_when_they_cannot_resolve():
    z = jnp.zeros(V)  # flat: every filter's kept set is the whole row
    for name, value in (("top_k", 10.0), ("top_p", 0.5), ("min_p", 0.5)):
        _, exact, kept_all, f_mask = _filter_masks(
            z, jnp.float32(value), name=name, num_candidates=5
        )
        assert not bool(exact) or bool(kept_all)
        assert np.asarray(f_mask).sum() == V


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(200, 700),
        elements=st.sampled_from([0.0, 1.0, 2.0, -1.0, -np.inf, 3e38]) | st.floats(-5, 5, width=32),
    ),
    k=st.integers(1, 3),
)
def test_top_candidates_equals_lax_top_k(x, k):
    got = tf.top_candidates(jnp.asarray(x), k)
    want = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # ties: lower index first


def test_a_subnormal_logit_ties_with_zero_on_every_path():
    """Hypothesis found it: a row of zeros and one subnormal, top_k = 1. The chain writes the
    subnormal as +0.0 (XLA's CPU flushes it), so it ties with the zeros and top_k keeps them
    all; the reference models that, and the candidate and full-vocabulary paths agree."""
    z, _ = scaled_logits(np.array([1e-45] + [0.0] * (V - 1), np.float32), {})
    want = reference_keep(z, {"top_k": 1})
    assert want.all()
    for num_candidates in (V, 5):
        c_mask, exact, kept_all, f_mask = (
            np.asarray(x)
            for x in _filter_masks(
                jnp.asarray(z), jnp.float32(1), name="top_k", num_candidates=num_candidates
            )
        )
        np.testing.assert_array_equal(f_mask, want)
        if exact:
            np.testing.assert_array_equal(c_mask, want)


@partial(jax.jit, static_argnames="vocab")
def _full_top_k_top_p(z, k, p, *, vocab):
    s = tf.init_full(z)
    sk = tf.top_k_full(s, k, jnp.bool_(True), vocab_size=vocab)
    sp = tf.top_p_full(s, p, jnp.bool_(True))
    return tf.full_keep(sk), tf.full_keep(sp)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(1, 1999),
    p=st.floats(0, 0.999),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    decimals=st.sampled_from([1, 3, 7]),
)
def test_full_vocabulary_bisection_matches_reference(seed, k, p, scale, decimals):
    """A row long enough for the bisection loop to run before its exact window finish."""
    v = 2000
    rng = np.random.default_rng(seed)
    z = np.round(rng.standard_normal(v) * scale, decimals).astype(np.float32)
    z[rng.random(v) < 0.1] = -np.inf
    got_k, got_p = (np.asarray(x) for x in _full_top_k_top_p(jnp.asarray(z), k, p, vocab=v))
    want_k = reference_keep(z, {"top_k": k})
    np.testing.assert_array_equal(got_k, want_k)
    tight, loose = (reference_keep(z, {"top_p": p}, slack=e) for e in (-1e-4, 1e-4))
    _assert_between(got_p, tight, loose)


@pytest.mark.parametrize("vocab", [1, 3, 33, 100, 1000, 2000, 4095, 4096, 50257, 128256])
def test_vocabulary_total_is_accurate_and_batch_invariant(vocab):
    """The normalizer: close to a float64 sum, NaN kept (the raw fast form relies on it), 0
    for an empty row, and the same bits for a row at any batch size and inside a larger
    jitted computation (XLA's plain CPU sum was not, below about 2000 tokens), on both sides
    of the fold's threshold."""
    rng = np.random.default_rng(vocab)
    x = (rng.standard_normal((64, vocab)) * 3).astype(np.float32)
    x[1, : vocab // 2] = -np.inf
    top = x.max(axis=1)
    want = np.exp(x.astype(np.float64) - top[:, None]).sum(axis=1)
    batched = jax.jit(jax.vmap(tf.vocabulary_total))
    got = np.asarray(batched(jnp.asarray(x), jnp.asarray(top)))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    for b in (1, 2, 3, 4, 7, 8, 16, 32):
        np.testing.assert_array_equal(np.asarray(batched(x[:b], top[:b])), got[:b])
    inside = jax.jit(lambda z, t: (tf.vocabulary_total(z * 2.0 - z, t), jnp.argmax(z)))
    np.testing.assert_array_equal(np.asarray(inside(x[2], top[2])[0]), got[2])
    assert float(tf.vocabulary_total(jnp.full(vocab, -jnp.inf), jnp.float32(-jnp.inf))) == 0.0
    nan_row = jnp.asarray(x[0]).at[0].set(jnp.nan)
    assert np.isnan(float(tf.vocabulary_total(nan_row, jnp.asarray(top[0]))))
