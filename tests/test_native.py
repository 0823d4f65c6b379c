"""jaxsample's CPU top-k kernel (jaxsample/native): the same bits as lax.top_k, in use on CPU,
and XLA's top_k when it cannot be built."""

from __future__ import annotations

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
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    n = data.draw(st.integers(1, 200))
    pool = data.draw(st.sampled_from(["special", "few", "floats"]))
    if pool == "special":
        elements = st.sampled_from(SPECIAL)
    elif pool == "few":
        elements = st.sampled_from([0.0, 1.0, 2.0])
    else:
        elements = st.floats(width=32, allow_nan=True, allow_infinity=True)
    x = data.draw(hnp.arrays(np.float32, (*lead, n), elements=elements))
    k = data.draw(st.integers(1, n))
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


def test_the_sampler_uses_it_and_draws_the_same(monkeypatch):
    """On CPU the compiled sampler calls the kernel (no XLA TopK left), and with
    ``TOPK = "xla"`` it draws the same tokens and reports the same numbers, bit for bit."""
    b, v = 8, 5000
    rng = np.random.default_rng(1)
    logits = jnp.asarray((rng.standard_normal((b, v)) * 3).astype(np.float32))
    hist = sm.History.stack([sm.History.from_tokens([1, 2], [3], v)] * b)
    args = (logits, _rows(b, v), hist, None, jnp.int32(2))
    text = jax.jit(lambda *a: sm.sample_rows(*a)).lower(*args).compile().as_text()
    assert "jaxsample_topk" in text and 'custom_call_target="TopK"' not in text
    ours = jax.jit(lambda *a: sm.sample_rows(*a))(*args)
    monkeypatch.setattr(native, "TOPK", "xla")
    text = jax.jit(lambda *a: sm.sample_rows(*a)).lower(*args).compile().as_text()
    assert "jaxsample_topk" not in text
    theirs = jax.jit(lambda *a: sm.sample_rows(*a))(*args)
    for a, c in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setattr(native, "TOPK", "fast")
    with pytest.raises(ValueError, match="TOPK"):
        native.top_k(jnp.zeros(4), 2)
    with pytest.raises(ValueError, match="TOPK"):
        native.status()


@pytest.mark.parametrize("cxx", ["missing", "failing"])
def test_without_a_working_compiler_it_is_lax_top_k(tmp_path, cxx):
    """No compiler on the PATH, or one that fails: a warning naming why, then lax.top_k."""
    env = dict(os.environ, JAXSAMPLE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("JAXSAMPLE_TOPK", None)
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
        print(jnp.array_equal(out[1], lax.top_k(x, 3)[1]).item())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("False") and "native CPU top-k is off" in first
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
