"""jaxsample's CPU kernels (jaxsample/native): top_k with the same bits as lax.top_k, block
maxima in lax.top_k's order, log_total_top_k against float64 and lax.top_k; in use on CPU, and
the JAX forms when they cannot be built."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax import lax

from jaxsample import native
from jaxsample import sampler as sm
from jaxsample.params import SamplingParams, pack_rows

SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40, 3e38]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a build failure here is a test failure, not a skip
        state = native.status()
    assert state["native"], state
    return state


def draw_rows(data, max_n: int, few: list, floats):
    """``(x, k)``: float32 rows of any batch shape (up to two leading axes) and length up to
    ``max_n``, from one of three pools (the special values, a few values with many ties,
    ``floats``), and a k in [1, n]."""
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    n = data.draw(st.integers(1, max_n))
    elements = data.draw(st.sampled_from([st.sampled_from(SPECIAL), st.sampled_from(few), floats]))
    x = data.draw(hnp.arrays(np.float32, (*lead, n), elements=elements))
    return x, data.draw(st.integers(1, n))


def same_bits(a, b):
    (va, ia), (vb, ib) = a, b
    va, vb = np.asarray(va), np.asarray(vb)
    return (
        va.shape == vb.shape
        and np.array_equal(va.view(np.int32), vb.view(np.int32))
        and np.array_equal(np.asarray(ia), np.asarray(ib))
    )


def native_and_xla(x, k):
    return jax.jit(lambda x: native.top_k(x, k))(x), jax.jit(lambda x: lax.top_k(x, k))(x)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_same_bits_as_lax_top_k(data):
    """Ties (few distinct values), signed zeros, infinities, NaNs of both signs, subnormals,
    any batch shape and any k in [1, n]."""
    x, k = draw_rows(data, 200, few=[0.0, 1.0, 2.0], floats=st.floats(width=32))
    assert same_bits(*native_and_xla(jnp.asarray(x), k))


@pytest.mark.parametrize("n,k", [(1536, 64), (2048, 128), (49152, 1024), (40000, 40000)])
def test_large_rows(n, k):
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((3, n)).astype(np.float32)
    x[1] = np.round(x[1])  # long runs of ties
    x[2, ::7] = -np.inf
    assert same_bits(*native_and_xla(jnp.asarray(x), k))


def test_vmap_and_nested_vmap():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 50)).astype(np.float32))
    ours = jax.vmap(jax.vmap(lambda r: native.top_k(r, 7)))(x)
    assert same_bits(ours, lax.top_k(x, 7))
    # a batched operand next to an unbatched one (vmap over a closure)
    y = x[0, 0]
    both = jax.vmap(lambda r: native.top_k(jnp.maximum(r, y), 5))(x[1])
    assert same_bits(both, lax.top_k(jnp.maximum(x[1], y[None]), 5))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_rank_form_same_bits_as_lax_top_k(data):
    """``TOP_K_FORM = "rank"`` (the JAX form that counts ranks, for a GPU): lax.top_k's bits
    on the same rows as the kernel's test (ties, signed zeros, infinities, NaNs, any batch
    shape and k), under nested vmaps; ``sort_distinct`` is ``jnp.sort`` for distinct ints."""
    x, k = draw_rows(data, 120, few=[0.0, 1.0, 2.0], floats=st.floats(width=32))
    x = jnp.asarray(x)
    ints = jnp.asarray(np.random.default_rng(x.size).permutation(2000)[: x.size], jnp.int32)
    ints = ints.reshape(x.shape)
    mapped = lambda r: native.top_k(r, k)  # noqa: E731
    for _ in range(x.ndim - 1):
        mapped = jax.vmap(mapped)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "KERNELS", "xla")
        mp.setattr(native, "TOP_K_FORM", "rank")
        assert same_bits(jax.jit(mapped)(x), lax.top_k(x, k))
        assert np.array_equal(jax.jit(native.sort_distinct)(ints), jnp.sort(ints))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_top_k_by_count_same_bits_as_lax_top_k(data):
    """``transforms.top_k_by_count`` (the k-th key by counting, the rows above it and the first
    tied ones gathered in index order, then ordered): lax.top_k's bits on rows with ties,
    signed zeros, infinities and NaNs, any k, under vmap, with either form of the last order."""
    from jaxsample import transforms as tf

    x, k = draw_rows(data, 120, few=[0.0, 1.0, 2.0], floats=st.floats(width=32))
    x = jnp.asarray(x).reshape(-1, x.shape[-1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "KERNELS", "xla")
        mp.setattr(native, "TOP_K_FORM", data.draw(st.sampled_from(["sort", "rank"])))
        got = jax.jit(jax.vmap(lambda r: tf.top_k_by_count(r, k)))(x)
    assert same_bits(got, lax.top_k(x, k))


def test_rank_form_counts_the_rows_of_the_batch(monkeypatch):
    """The rank form runs where the batch's rows times n**2 fit in RANK_LIMIT, counted
    through the vmaps around the per-row call (a custom_vmap), else XLA's TopK; the same
    bits either way, and the default form is lax.top_k's program unchanged."""
    monkeypatch.setattr(native, "KERNELS", "xla")
    n, k = 64, 5
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, n)).astype(np.float32))

    def compiled(fn, arg=x):  # traced afresh: the settings are read when a function is traced
        return jax.jit(lambda a: fn(a)).lower(arg).compile().as_text()

    def per_row(r):
        return native.top_k(r, k)

    nested = jax.vmap(jax.vmap(per_row))
    assert "TopK" in compiled(nested)  # "sort": lax.top_k
    monkeypatch.setattr(native, "TOP_K_FORM", "rank")
    monkeypatch.setattr(native, "RANK_LIMIT", 8 * n * n)
    assert "TopK" not in compiled(nested)  # 8 rows fit
    assert same_bits(jax.jit(lambda a: nested(a))(x), lax.top_k(x, k))
    monkeypatch.setattr(native, "RANK_LIMIT", 7 * n * n)
    assert "TopK" in compiled(nested)  # 8 rows do not
    assert "TopK" not in compiled(jax.vmap(per_row), x[0])  # ... but the 4 rows of x[0] do
    half = x[0].astype(jnp.bfloat16)  # the rank form reads float32 keys: others sort
    assert " sort(" in compiled(jax.vmap(per_row), half)  # (XLA's CPU sorts bfloat16)
    (va, ia), (vb, ib) = jax.vmap(per_row)(half), lax.top_k(half, k)
    assert np.array_equal(np.asarray(va, np.float32), np.asarray(vb, np.float32))
    assert np.array_equal(ia, ib)
    monkeypatch.setattr(native, "TOP_K_FORM", "fast")
    with pytest.raises(ValueError, match="TOP_K_FORM"):
        native.top_k(x[0, 0], k)


@pytest.mark.parametrize(
    "backend,form,plan,bits", [("cpu", "sort", "many", 1), ("gpu", "rank", "one", 2)]
)
def test_auto_forms_follow_the_backend(backend, form, plan, bits, monkeypatch):
    """``TOP_K_FORM``, ``sampler.BRANCHES`` and ``transforms.THRESHOLD_BITS`` are ``"auto"``
    by default and pick by JAX's default backend: the rank form, the one-branch plan and 2
    bits a pass on a GPU (the fastest measured on an H100 and H200), the sort, the many-branch plan
    and 1 bit a pass elsewhere. A value that is none of theirs is an error naming it."""
    from jaxsample import sampler as sm
    from jaxsample import transforms as tf

    assert native.TOP_K_FORM == "auto" and sm.BRANCHES == "auto"
    assert tf.THRESHOLD_BITS == "auto"
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert native.top_k_form() == form
    assert sm._branches() == plan
    assert tf._threshold_bits() == bits
    monkeypatch.setattr(native, "TOP_K_FORM", "sort")
    assert native.top_k_form() == "sort"
    monkeypatch.setattr(tf, "THRESHOLD_BITS", 3)
    with pytest.raises(ValueError, match="THRESHOLD_BITS"):
        tf._threshold_bits()


def _rows(b, v):
    params = [
        SamplingParams(temperature=1.0, top_p=0.95),
        SamplingParams(
            temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=20
        ),
        SamplingParams(temperature=1.0, top_p=0.999),  # the second tier / the full vocabulary
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
    ]
    params = [params[i % len(params)] for i in range(b)]
    return jax.tree.map(jnp.asarray, pack_rows(params, vocab_size=v, seeds=list(range(b))))


def test_the_sampler_uses_them_and_draws_the_same(monkeypatch):
    """On CPU the compiled sampler calls the kernels (no XLA TopK left), and with
    ``KERNELS = "xla"`` it draws the same tokens and reports the same top log probabilities'
    ids, bit for bit; the raw log probabilities (the kernel's normalizer) agree to 2 ulp."""
    b, v = 8, 5000
    rng = np.random.default_rng(1)
    logits = jnp.asarray((rng.standard_normal((b, v)) * 3).astype(np.float32))
    hist = sm.History.stack([sm.History.from_tokens([1, 2], [3], v)] * b)
    args = (logits, _rows(b, v), hist, None, jnp.int32(2))
    compiled = jax.jit(lambda *a: sm.sample_rows(*a)).lower(*args).compile()
    text = compiled.as_text()
    for target in ("jaxsample_topk", "jaxsample_candidates", "jaxsample_log_total_top_k"):
        assert target in text
    assert 'custom_call_target="TopK"' not in text
    ours = compiled(*args)  # the program just read, run (not compiled a second time)
    monkeypatch.setattr(native, "KERNELS", "xla")
    compiled = jax.jit(lambda *a: sm.sample_rows(*a)).lower(*args).compile()  # traced anew
    assert "jaxsample_" not in compiled.as_text()
    theirs = compiled(*args)
    for name in ("token", "top_ids", "ok"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
    for name in ("logprob", "top_logprobs"):
        a, c = np.asarray(getattr(ours, name)), np.asarray(getattr(theirs, name))
        assert np.array_equal(np.isfinite(a), np.isfinite(c))
        fin = np.isfinite(a)
        np.testing.assert_allclose(a[fin], c[fin], rtol=0, atol=4 * np.spacing(np.float32(64)))


def test_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setattr(native, "KERNELS", "fast")
    for call in (
        lambda: native.top_k(jnp.zeros(4), 2),
        lambda: native.block_max(jnp.zeros(4), 2),
        lambda: native.log_total_top_k(jnp.zeros(4), 2),
        lambda: native.candidates(jnp.zeros(4), 2, 2, True, None),
        native.status,
    ):
        with pytest.raises(ValueError, match="KERNELS"):
            call()


@pytest.mark.parametrize("cxx", ["missing", "failing"])
def test_without_a_working_compiler_it_is_the_jax_forms(tmp_path, cxx):
    """No compiler on the PATH, or one that fails: a warning naming why, then lax.top_k and
    the other JAX forms."""
    env = dict(os.environ, JAXSAMPLE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("JAXSAMPLE_KERNELS", None)
    if cxx == "missing":
        env["PATH"] = str(tmp_path)  # no compiler there
        env.pop("CXX", None)
    else:
        env["CXX"] = "false"  # exists, exits 1
    code = textwrap.dedent(
        """
        import warnings, jax, jax.numpy as jnp
        from jax import lax
        from jaxsample import native
        x = jnp.array([[3.0, 1.0, 3.0, -0.0, 0.0]])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = native.top_k(x, 3)
        print(native.status()["native"], [str(m.message) for m in w])
        log_total = native.log_total_top_k(x, 2)[0]
        form = lambda x, t: ("the JAX form", t)
        print(
            jnp.array_equal(out[1], lax.top_k(x, 3)[1]).item()
            and native.block_max(x, 2).tolist() == [[3.0, 3.0, 0.0]]
            and abs(float(log_total[0]) - float(jax.nn.logsumexp(x - 3.0))) < 1e-6
            and native.candidates(x, 2, 2, True, form) == ("the JAX form", True)
        )
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("False") and "native CPU kernels are off" in first
    assert ("no C++ compiler" if cxx == "missing" else "failed") in first
    assert second == "True"


def test_concurrent_calls_from_threads():
    """Calls from several host threads at once (each one's rows shared out to the same
    intra-op pool) all give lax.top_k's answer."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    xs = [jnp.asarray(rng.standard_normal((32, 4096)).astype(np.float32)) for _ in range(8)]
    ours = jax.jit(lambda x: native.top_k(x, 100))
    theirs = jax.jit(lambda x: lax.top_k(x, 100))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: jax.block_until_ready(ours(x)), xs * 4))
    for x, got in zip(xs * 4, results):
        assert same_bits(got, theirs(x))


def order_keys(x: np.ndarray) -> np.ndarray:
    """lax.top_k's order of float32 values as int32 keys (-0.0 below +0.0)."""
    bits = np.asarray(x, np.float32).view(np.int32)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_block_max_against_numpy(data):
    """Each block's maximum in lax.top_k's order (the last block shorter), any shape and
    block length, signed zeros and infinities (rows without NaN, as documented)."""
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    n = data.draw(st.integers(1, 300))
    block = data.draw(st.sampled_from([1, 2, 7, 32, 64, 100]))
    elements = st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf]),
        st.floats(width=32, allow_nan=False, allow_infinity=True),
    )
    x = data.draw(hnp.arrays(np.float32, (*lead, n), elements=elements))
    got = np.asarray(jax.jit(lambda x: native.block_max(x, block))(jnp.asarray(x)))
    pad = (-n) % block
    padded = np.concatenate([x, np.full((*lead, pad), -np.inf, np.float32)], axis=-1)
    keys = order_keys(padded).reshape(*lead, -1, block)
    want = np.take_along_axis(
        padded.reshape(*lead, -1, block), keys.argmax(-1)[..., None], axis=-1
    )[..., 0]
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def reference_log_total(x: np.ndarray) -> np.ndarray:
    """float64 log(sum(exp(x - max x))) per row, NaN read as -inf and +inf as the largest
    float32 (-inf for a row of -inf only)."""
    z = np.where(np.isnan(x), -np.inf, np.minimum(x, np.finfo(np.float32).max)).astype(np.float64)
    top = z.max(-1, keepdims=True)
    shift = np.where(top == -np.inf, 0.0, top)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(z - shift).sum(-1, keepdims=True))[..., 0]


def assert_within_2ulp(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), (got, want)
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin]))
    # within 2 ulp of the float32 nearest the exact value (and 1e-6 absolute near zero)
    below_max = np.nextafter(np.finfo(np.float32).max, np.float32(0))
    size = np.minimum(np.abs(want[fin]), below_max).astype(np.float32)
    ulp = np.spacing(size).astype(np.float64)
    assert np.all(np.abs(got[fin] - want[fin]) <= 2 * ulp + 1e-6), (got, want)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_log_total_top_k_against_float64_and_lax_top_k(data):
    """log_total within 2 ulp of float64; the top k with lax.top_k's bits over the sanitized row
    (NaN -> -inf, +inf -> the largest float); rows of -inf only; any shape and k."""
    x, k = draw_rows(data, 300, few=[0.0, 1.0, 2.0, -np.inf], floats=st.floats(-100, 100, width=32))
    log_total, values, ids = jax.jit(lambda x: native.log_total_top_k(x, k))(jnp.asarray(x))
    clean = np.where(np.isnan(x), -np.inf, np.minimum(x, np.finfo(np.float32).max))
    assert same_bits((values, ids), lax.top_k(jnp.asarray(clean), k))
    assert log_total.shape == x.shape[:-1]
    assert_within_2ulp(log_total, reference_log_total(x))


@pytest.mark.parametrize("n", [20, 5000, 49152, 128256])
def test_log_total_top_k_large_rows_and_batch_invariance(n):
    """Long rows (real-model sizes) within 2 ulp of float64; a row's bits are the same alone,
    in a batch of 7 and under vmap."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((7, n)) * np.array([[0.1], [1], [3], [10], [30], [1], [1]])).astype(
        np.float32
    )
    x[5, ::3] = -np.inf
    x[6, 0] = np.nan
    fn = jax.jit(lambda x: native.log_total_top_k(x, 20))
    log_total, values, ids = fn(jnp.asarray(x))
    assert_within_2ulp(log_total, reference_log_total(x))
    for i in (0, 3, 6):
        alone = fn(jnp.asarray(x[i : i + 1]))
        for a, b in zip(alone, (log_total, values, ids), strict=True):
            assert np.array_equal(np.asarray(a)[0], np.asarray(b)[i])
    mapped = jax.vmap(lambda r: native.log_total_top_k(r, 20))(jnp.asarray(x))
    for a, b in zip(mapped, (log_total, values, ids), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_raw_log_probabilities_kernel_and_jax_form_agree():
    """The sampler's raw normalizer and top 20 from the kernel and from its JAX form
    (``sampler._raw_xla``): the same ids and values, the normalizers within 2 ulp."""
    rng = np.random.default_rng(5)
    x = jnp.asarray((rng.standard_normal((16, 49152)) * 4).astype(np.float32))
    ours = jax.jit(lambda x: native.log_total_top_k(x, 20))(x)
    theirs = jax.jit(lambda x: sm._raw_xla(x, 20, True))(x)
    assert same_bits(ours[1:], theirs[1:])
    assert_within_2ulp(ours[0], np.asarray(theirs[0], np.float64))


def reference_total(x: np.ndarray) -> np.ndarray:
    """float64 sum(exp(x - max x)) per row (0 for a row of -inf only)."""
    z = np.asarray(x, np.float64)
    top = z.max(-1, keepdims=True)
    return np.exp(z - np.where(top == -np.inf, 0.0, top)).sum(-1)


def check_candidates(x: np.ndarray, k: int, block: int, total: bool, got) -> None:
    """``native.candidates``'s output against native.block_max, lax.top_k (same bits) and
    float64 (the normalizer within 2 ulp; NaN when not asked for)."""
    bm, values, ids, t = got
    xj = jnp.asarray(x)
    assert np.array_equal(
        np.asarray(bm).view(np.int32), np.asarray(native.block_max(xj, block)).view(np.int32)
    )
    assert same_bits((values, ids), lax.top_k(xj, k))
    t = np.asarray(t, np.float64)
    assert t.shape == x.shape[:-1]
    if not total:
        assert np.all(np.isnan(t))
        return
    want = reference_total(x)
    assert np.all(np.abs(t - want) <= 2 * np.spacing(want.astype(np.float32)).astype(np.float64)), (
        t,
        want,
    )


def _no_form(x, total):
    raise AssertionError("the kernel was not used")


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_candidates_against_block_max_lax_top_k_and_float64(data):
    """The block maxima, the top k (lax.top_k's bits) and the normalizer sum(exp(x - max))
    within 2 ulp of float64, for rows without NaN or +inf (as documented): signed zeros,
    ties, rows of -inf only, any shape, block length and k (k below and above the number of
    blocks); without the normalizer it is NaN."""
    x, k = draw_rows(
        data, 600, few=[0.0, -0.0, 1.0, 2.0, -np.inf], floats=st.floats(-100, 100, width=32)
    )
    x = np.where(np.isnan(x), -np.inf, np.minimum(x, 3e38)).astype(np.float32)
    block = data.draw(st.sampled_from([1, 2, 7, 32, 64]))
    total = data.draw(st.booleans())
    got = jax.jit(lambda x: native.candidates(x, k, block, total, _no_form))(jnp.asarray(x))
    check_candidates(x, k, block, total, got)


@pytest.mark.parametrize("n", [49152, 128256])
def test_candidates_real_sizes_batch_invariance_and_traced_flag(n):
    """Rows of real-model sizes: peaked, flat, masked to a few tokens, every value equal,
    -inf only; a row's bits alone, in a batch and under vmap; ``total`` as a traced flag."""
    rng = np.random.default_rng(n)
    x = np.stack(
        [
            rng.standard_normal(n) * 0.1,
            rng.standard_normal(n) * 3,
            np.sort(rng.gumbel(size=n))[::-1] * 4,  # descending: the running maximum never rises
            np.where(rng.random(n) < 0.001, rng.standard_normal(n), -np.inf),
            np.full(n, 1.5),
            np.full(n, -np.inf),
        ]
    ).astype(np.float32)
    fn = jax.jit(lambda x, t: native.candidates(x, 128, 32, t, _no_form))
    for flag in (True, False):
        got = fn(jnp.asarray(x), jnp.bool_(flag))
        check_candidates(x, 128, 32, flag, got)
    got = fn(jnp.asarray(x), jnp.bool_(True))
    for i in (0, 3, 5):
        alone = fn(jnp.asarray(x[i : i + 1]), jnp.bool_(True))
        for a, b in zip(alone, got, strict=True):
            assert np.array_equal(np.asarray(a)[0], np.asarray(b)[i], equal_nan=True)
    mapped = jax.jit(jax.vmap(lambda r: native.candidates(r, 128, 32, True, _no_form)))(
        jnp.asarray(x)
    )
    for a, b in zip(mapped, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# Jitted once per module, so that hypothesis's examples of one shape share a compiled program
# (these tests patch no setting the functions read).
_mass_kernel = jax.jit(lambda *v: native.mass_threshold(*v, None))


@functools.cache
def _mass_form():
    from jaxsample import transforms as tf

    return jax.jit(jax.vmap(tf._largest_threshold_xla))


@functools.cache
def _threshold_search(bits: int):
    """The JAX form's search traced with ``THRESHOLD_BITS = bits`` (the setting is read while
    tracing, so each value has its own function; later calls with that value reuse it)."""
    from jaxsample import transforms as tf

    fn = jax.jit(jax.vmap(lambda *v: tf._largest_threshold_xla(*v)))
    old = tf.THRESHOLD_BITS
    tf.THRESHOLD_BITS = bits
    try:
        for n in (7, 300, 4099):  # the test's lengths, traced while the setting holds
            x = jnp.zeros((3, n), jnp.float32)
            fn(x, x, jnp.zeros(3, jnp.float32), jnp.ones(3, bool))
    finally:
        tf.THRESHOLD_BITS = old
    return fn


def reference_threshold(x: np.ndarray, a: np.ndarray, target: float, run: bool) -> float:
    """The largest value t of x with sum(a[x >= t]) >= target (float64 sums), else -inf."""
    finite = x > -np.inf
    if not run or not finite.any() or not a[finite].sum() >= target:
        return -np.inf
    values = np.unique(x[finite])[::-1]  # distinct, descending
    reached = [a[x >= v].sum() >= target for v in values]
    return float(values[int(np.argmax(reached))])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mass_threshold_against_numpy_and_the_jax_form(data):
    """``mass_threshold`` against a float64 reference and the sampler's JAX form, on rows
    whose amounts are multiples of 1/1024 (every sum exact in float32 and float64, so both
    must give the same value, also when the target equals a cumulative amount): ties,
    signed zeros, -inf (not kept), rows of -inf only, targets of 0, above the total and
    NaN, ``run`` False; rows long enough for the kernel's buffer and window stages."""

    lead = data.draw(st.integers(1, 3))
    n = data.draw(st.sampled_from([1, 5, 40, 300, 5000]))
    pool = data.draw(
        st.sampled_from(
            [
                st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -np.inf]),
                st.floats(-50, 50, width=32),
            ]
        )
    )
    x = np.asarray(data.draw(hnp.arrays(np.float32, (lead, n), elements=pool)), np.float32)
    units = data.draw(hnp.arrays(np.int32, (lead, n), elements=st.integers(0, 64)))
    a = np.where(x > -np.inf, units / 1024.0, 0.0).astype(np.float32)
    totals = a.astype(np.float64).sum(-1)
    target = np.empty(lead, np.float32)
    for r in range(lead):
        kind = data.draw(st.sampled_from(["cum", "between", "zero", "above", "nan"]))
        order = np.argsort(-x[r], kind="stable")
        cum = np.cumsum(a[r][order].astype(np.float64))
        pick = cum[data.draw(st.integers(0, n - 1))]
        target[r] = {
            "cum": pick,
            "between": pick + 1 / 2048,
            "zero": 0.0,
            "above": totals[r] + 1,
            "nan": np.nan,
        }[kind]
    run = np.asarray(data.draw(hnp.arrays(np.bool_, (lead,))))
    args = tuple(jnp.asarray(v) for v in (x, a, target, run))
    got = np.asarray(_mass_kernel(*args))
    form = np.asarray(_mass_form()(*args))
    want = np.array(
        [reference_threshold(x[r], a[r], target[r], run[r]) for r in range(lead)], np.float32
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(form, want)


def test_mass_threshold_real_sizes_and_the_sampler():
    """Rows of 49152 (top_p's weights and top_k's ones): the kernel and the JAX form give
    the same threshold, and a row's result does not depend on the batch."""
    from jaxsample import transforms as tf

    rng = np.random.default_rng(7)
    n = 49152
    x = (rng.gumbel(size=(6, n)) * np.array([[0.5], [1], [2], [4], [1], [1]])).astype(np.float32)
    x[4, rng.random(n) < 0.5] = -np.inf
    w = np.where(x > -np.inf, np.exp(x - x.max(-1, keepdims=True)), 0.0).astype(np.float32)
    ones = (x > -np.inf).astype(np.float32)
    mass = jnp.asarray(w.astype(np.float64).sum(-1) * np.array([0.5, 0.9, 0.95, 0.99, 0.9, 1.5]))
    count = jnp.asarray([5000.0, 1025.0, 40000.0, 1.0, 777.0, 0.0], jnp.float32)
    run = jnp.ones(6, bool)
    kernel = jax.jit(lambda *v: native.mass_threshold(*v, None))
    form = jax.jit(jax.vmap(tf._largest_threshold_xla))
    for a, target in ((w, mass.astype(jnp.float32)), (ones, count)):
        args = (jnp.asarray(x), jnp.asarray(a), target, run)
        got = np.asarray(kernel(*args))
        want = np.asarray(form(*args))
        # the same value, or (top_p, a boundary within float32's rounding of the target) the
        # neighbouring one: the kept mass at the kernel's threshold reaches the target
        for r in range(6):
            kept = a[r][x[r] >= got[r]].astype(np.float64).sum()
            assert got[r] == want[r] or abs(kept - float(target[r])) < 1e-5 * kept, r
        if a is ones:
            np.testing.assert_array_equal(got, want)  # counts are exact
        alone = np.asarray(kernel(*(v[2:3] for v in args)))
        assert alone[0] == got[2]


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_threshold_search_is_the_largest_under_its_own_sums(data):
    """The JAX form's radix search (``transforms.THRESHOLD_BITS`` bits a pass) gives the same
    threshold for 1, 2, 4 and 8 bits a pass, and that threshold is the largest under the
    float32 sums it decides with: the amount at or above it (summed by ``row_sum``, as the
    search sums) reaches the target, and the amount above the next larger logit does not;
    -inf where even the whole row's float32 sum falls short of the target.
    Rows of real-sized weights whose sums round, ties, signed zeros, -inf."""
    from jaxsample import transforms as tf

    n = data.draw(st.sampled_from([7, 300, 4099]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    x = (rng.standard_normal((3, n)) * data.draw(st.sampled_from([0.5, 2.0, 8.0]))).astype(
        np.float32
    )
    x[0, rng.random(n) < 0.3] = -np.inf
    x[1, : n // 2] = np.round(x[1, : n // 2])  # ties
    x[1, 0], x[1, 1] = 0.0, -0.0
    a = np.where(x > -np.inf, np.exp(x - x.max(-1, keepdims=True)), 0.0).astype(np.float32)
    frac = np.array([data.draw(st.floats(0.0, 1.0)) for _ in range(3)])
    target = (a.astype(np.float64).sum(-1) * frac).astype(np.float32)
    run = np.ones(3, bool)
    got = {}
    for bits in (1, 2, 4, 8):
        fn = _threshold_search(bits)
        got[bits] = np.asarray(fn(*map(jnp.asarray, (x, a, target, run))))
    for bits in (2, 4, 8):
        np.testing.assert_array_equal(got[bits], got[1])
    keys = np.asarray(native._order_keys(jnp.asarray(x)))
    amounts = jnp.asarray(a)

    def amount_at_or_above(r, key):
        return float(tf.row_sum(jnp.where(jnp.asarray(keys[r]) >= key, amounts[r], 0.0)))

    for r in range(3):
        t = got[1][r]
        if float(tf.row_sum(amounts[r])) < target[r]:  # float32 sums short of a float64 total
            assert t == -np.inf  # unreachable under its own sums
            continue
        assert t > -np.inf and t in x[r]
        key = int(np.asarray(native._order_keys(jnp.float32(t))))
        assert amount_at_or_above(r, key) >= target[r]
        larger = keys[r][keys[r] > key]
        if larger.size:
            assert amount_at_or_above(r, larger.min()) < target[r]


@pytest.mark.parametrize("n", [300, 301, 303])
def test_mass_threshold_rows_whose_length_is_not_a_multiple_of_eight(n):
    """The elements past the last group of eight are compared by their order keys exactly
    (hypothesis found a form that compared them as floats: the key of -1.0 rounded up to
    the bisection's pivot, and four -1.0 counted as above it)."""
    x = np.full(n, -1.0, np.float32)
    x[0] = 0.0
    a = np.full(n, 1 / 1024, np.float32)
    for target, want in ((1 / 1024, 0.0), (2 / 1024, -1.0), (3 / 1024, -1.0), (n / 1024, -1.0)):
        got = native.mass_threshold(
            jnp.asarray(x), jnp.asarray(a), jnp.float32(target), jnp.bool_(True), None
        )
        assert float(got) == want, (target, float(got))
