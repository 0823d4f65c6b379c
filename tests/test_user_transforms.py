"""User transforms: written in a few lines, run inside the sampler and the decode loop."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsample import InvalidRequestError, SamplingParams, pack_rows
from jaxsample import sampler as sm
from jaxsample.transforms import POSITIONS, UserTransform
from tests.reference_sampler import reference_keep, scaled_logits

# ------------------------------------------------------------------ two samplers jaxsample
# does not ship, as user transforms (the same code as in docs/sampler.md)


def top_n_sigma(z, p, hist):
    """Keep tokens within n standard deviations of the top logit (n <= 0: off)."""
    finite = z > -jnp.inf
    count = jnp.sum(finite)
    mean = jnp.sum(jnp.where(finite, z, 0.0)) / count
    sigma = jnp.sqrt(jnp.sum(jnp.where(finite, (z - mean) ** 2, 0.0)) / count)
    keep = (z >= jnp.max(z) - p["n"] * sigma) | (p["n"] <= 0)
    return jnp.where(keep, z, -jnp.inf)


def epsilon(z, p, hist):
    """Drop tokens whose probability is below eps (the most likely token always stays)."""
    prob = jax.nn.softmax(z)
    return jnp.where((prob >= p["eps"]) | (z == jnp.max(z)), z, -jnp.inf)


SIGMA = UserTransform("top_n_sigma", top_n_sigma, {"n": 0.0}, ranges={"n": (0.0, 10.0)})
EPS = UserTransform("epsilon", epsilon, {"eps": 0.0}, ranges={"eps": (0.0, 1.0)})


def np_top_n_sigma(z, n):
    finite = z > -np.inf
    zz = z[finite].astype(np.float64)
    thr = zz.max() - n * zz.std()
    return thr, np.where(z >= thr, z, -np.inf) if n > 0 else z


def np_epsilon(z, eps):
    zz = np.where(z > -np.inf, z.astype(np.float64), -np.inf)
    prob = np.exp(zz - zz.max())
    prob /= prob.sum()
    return np.where((prob >= eps) | (z == z.max()), z, -np.inf), prob


def _hist(batch, vocab, prompt=(), output=()):
    return sm.History.stack([sm.History.from_tokens(prompt, output, vocab)] * batch)


@pytest.mark.parametrize("case", range(6))
def test_top_n_sigma_and_epsilon_match_numpy(case):
    rng = np.random.default_rng(case)
    v = 500
    logits = (rng.standard_normal(v) * rng.uniform(1, 4)).astype(np.float32)
    n, eps = [0.0, 1.0, 2.0, 0.5, 1.5, 3.0][case], [0.0, 0.001, 0.01, 0.0, 0.002, 0.05][case]
    extra = [{}, {"top_k": 50}, {"min_p": 0.01}, {"top_p": 0.9}, {}, {"temperature": 0.6}][case]
    params = SamplingParams(
        **extra, seed=case, transform_params={"top_n_sigma": {"n": n}, "epsilon": {"eps": eps}}
    )
    got = sm.processed_logprobs(logits[None], params, transforms=(SIGMA, EPS))[0]
    # numpy: steps 1-5, then top_n_sigma, epsilon, then SPEC's filters, renormalized
    spec = {k: getattr(params, k) for k in ("temperature", "top_k", "top_p", "min_p")}
    z, _ = scaled_logits(logits, spec)
    thr, z1 = np_top_n_sigma(z, n)
    z2, prob = np_epsilon(z1, eps)
    keep = reference_keep(z2, spec)
    kept = got > -np.inf
    # tokens within float rounding of a threshold may go either way
    clear = np.ones(v, bool)
    if n > 0:
        clear &= np.abs(z - thr) > 1e-4 * max(1.0, abs(thr))
    clear &= np.abs(prob - eps) > 1e-5 * max(eps, 1e-12) + 1e-9
    np.testing.assert_array_equal(kept[clear], keep[clear])
    want = np.where(kept, np.exp(z.astype(np.float64) - z.max()), 0.0)
    np.testing.assert_allclose(np.exp(got), want / want.sum(), atol=1e-6, rtol=1e-4)
    # and the draw keeps to it
    tokens = sm.sample(
        np.broadcast_to(logits, (64, v)),
        [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(64)],
        transforms=(SIGMA, EPS),
    ).tokens
    assert kept[tokens].all()


def _identity(z, p, hist):
    return z * p["one"]


MIXED = [
    SamplingParams(seed=1, top_k=5, top_p=0.9, logprobs=True, top_logprobs=3),
    SamplingParams(seed=2, temperature=0.0, logprobs=True, top_logprobs=20),
    SamplingParams(seed=3, min_p=0.1, top_a=0.2, logprobs=True, logprobs_mode="processed"),
    SamplingParams(seed=4, repetition_penalty=1.5, frequency_penalty=0.5, logit_bias={2: 5.0}),
    SamplingParams(seed=5),
    SamplingParams(seed=6, top_p=0.99, temperature=2.0, logit_bias={7: -3.0, 9: 2.0}),
]


@pytest.mark.parametrize("position", POSITIONS)
def test_identity_transform_leaves_every_draw_unchanged(position):
    v, b = 300, len(MIXED)
    logits = jnp.asarray(np.random.default_rng(5).standard_normal((b, v)).astype(np.float32))
    hist = _hist(b, v, prompt=[1, 2], output=[2, 3, 3])
    chain = (UserTransform("identity", _identity, {"one": 1.0}, position=position),)
    seeds = [p.seed for p in MIXED]
    plain = jax.tree.map(jnp.asarray, pack_rows(MIXED, vocab_size=v, seeds=seeds))
    user = jax.tree.map(jnp.asarray, pack_rows(MIXED, vocab_size=v, seeds=seeds, transforms=chain))
    for pos in range(2):
        for nc in (8,):  # 8 candidates: rows on the first tier, the second and the fallback
            want = sm.sample_batch(logits, plain, hist, None, pos, num_candidates=nc)
            got = sm.sample_batch(
                logits, user, hist, None, pos, num_candidates=nc, transforms=chain
            )
            for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_user_values_never_recompile():
    v, b = 64, 4
    logits = jnp.asarray(np.random.default_rng(6).standard_normal((b, v)).astype(np.float32))
    hist = _hist(b, v)
    chain = (SIGMA, EPS)
    traces = []

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(rows, position):
        traces.append(1)
        return sm.sample_rows(logits, rows, hist, None, position, transforms=chain)

    kept = set()
    for k, (n, eps) in enumerate([(0.0, 0.0), (1.0, 0.01), (0.3, 0.2), (3.0, 0.0)]):
        params = SamplingParams(
            seed=k, transform_params={"top_n_sigma": {"n": n}, "epsilon": {"eps": eps}}
        )
        rows = jax.tree.map(
            jnp.asarray, pack_rows([params] * b, vocab_size=v, seeds=[k] * b, transforms=chain)
        )
        kept.add(tuple(np.asarray(step(rows, jnp.int32(k)).token)))
    assert len(traces) == 1 and len(kept) > 1


@pytest.mark.parametrize(
    "params, ranges, says",
    [
        ({"n": 2.0}, {"n": (0.0, 1.0)}, "outside its own range"),
        ({"n": 0.5}, {"n": (1.0, 0.0)}, "lo <= hi"),
        ({"n": 0.5}, {"n": (float("nan"), 1.0)}, "lo <= hi"),
        ({"n": 1e300}, {}, "finite in float32"),
        ({"n": float("inf")}, {}, "finite in float32"),
        ({"n": "1.0"}, {}, "not bools or strings"),
        ({"n": True}, {}, "not bools or strings"),
        ({"n": 0.5}, {"n": (0.0, "1")}, "not bools or strings"),
        (["n"], {}, "params must be a dict"),
        ({"n": 0.5}, {"n": (0.0, 0.5, 1.0)}, "a range is \\(lo, hi\\)"),
        ({"n": 0.5}, 3, "ranges must be a dict"),
    ],
)
def test_a_transform_with_bad_defaults_or_ranges_is_refused(params, ranges, says):
    with pytest.raises(ValueError, match=says):
        UserTransform("t", lambda z, p, h: z, params, ranges=ranges)


def test_one_transform_alone_is_a_chain_of_one():
    from jaxsample.transforms import check_chain

    assert check_chain(EPS) == (EPS,)
    logits = np.random.default_rng(2).standard_normal((2, 30)).astype(np.float32)
    p = SamplingParams(transform_params={"epsilon": {"eps": 0.05}})
    np.testing.assert_array_equal(
        sm.processed_logprobs(logits, p, transforms=EPS),
        sm.processed_logprobs(logits, p, transforms=(EPS,)),
    )
    with pytest.raises(ValueError, match="tuple of UserTransform"):
        check_chain(5)


def test_a_bad_output_is_refused_where_the_sampler_is_traced():
    """Rows built without pack_rows (so never checked on the host) still cannot feed the
    sampler a transform whose output is not the row's logits: it fails when traced."""
    from jaxsample import TransformError

    bad = UserTransform("scalar", lambda z, p, h: jnp.max(z))
    vocab = 12
    row = sm._neutral_row(vocab).replace(user=({},))
    h = sm.History.from_tokens([], [], vocab)
    with pytest.raises(TransformError, match="user transform 'scalar' returned float32\\[\\]"):
        sm.distribution(jnp.zeros(vocab), row, h, None, transforms=(bad,))


def test_pack_rows_checks_user_values():
    chain = (SIGMA, EPS)
    ok = pack_rows(
        [SamplingParams(transform_params={"epsilon": {"eps": 0.1}}), SamplingParams()],
        vocab_size=10,
        seeds=[0, 1],
        transforms=chain,
    )
    np.testing.assert_array_equal(ok.user[1]["eps"], np.float32([0.1, 0.0]))  # default 0
    np.testing.assert_array_equal(ok.user[0]["n"], np.float32([0.0, 0.0]))
    bad = [
        {"nope": {"eps": 0.1}},  # unknown transform
        {"epsilon": {"delta": 0.1}},  # unknown parameter
        {"epsilon": {"eps": 2.0}},  # out of its range
    ]
    for tp in bad:
        with pytest.raises(InvalidRequestError) as info:
            pack_rows(
                [SamplingParams(), SamplingParams(transform_params=tp)],
                vocab_size=10,
                seeds=[0, 1],
                transforms=chain,
            )
        assert info.value.field == "transform_params" and info.value.index == 1
    with pytest.raises(ValueError):
        UserTransform("x", _identity, {"one": 1.0}, position="after_draw")
    with pytest.raises(ValueError):
        sm.sample(np.zeros((1, 4)), SamplingParams(), transforms=(EPS, EPS))


def test_values_without_a_chain_say_to_pass_the_chain():
    """transform_params with no chain given (the common slip: transforms= forgotten in
    processed_logprobs or generate) said "a transform of this engine's chain: []"; it now
    says that no chain was given and where to pass it."""
    p = SamplingParams(transform_params={"epsilon": {"eps": 0.1}})
    for call in (
        lambda: pack_rows([p], vocab_size=10, seeds=[0]),
        lambda: sm.processed_logprobs(np.zeros((1, 10), np.float32), p),
    ):
        with pytest.raises(InvalidRequestError) as info:
            call()
        assert info.value.field == "transform_params" and info.value.value == "epsilon"
        assert "transforms=" in str(info.value) and "engine's chain" not in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        pack_rows([p], vocab_size=10, seeds=[0], transforms=(SIGMA,))
    assert info.value.reason == "unknown transform" and "'top_n_sigma'" in str(info.value)


# ------------------------------------------------------------------ a transform that cannot work


class _Unhashable:
    """A callable that cannot be a static argument (defines __eq__ without __hash__)."""

    def __eq__(self, other):
        return self is other

    def __call__(self, z, p, hist):
        return z


#: (fn, a text the error must contain): each output would broadcast, be read as logits, or
#: crash deep inside the sampler's trace
BAD_TRANSFORMS = [
    (lambda z, p, h: jnp.max(z), "returned float32[]"),  # broadcast to every token
    (lambda z, p, h: z[:1], "returned float32[1]"),  # broadcast too
    (lambda z, p, h: jnp.concatenate([z, z[:1]]), "returned float32[51]"),
    (lambda z, p, h: z[:, None], "returned float32[50, 1]"),
    (lambda z, p, h: jnp.argsort(z), "returned int32[50]"),  # ranks read as logits
    (lambda z, p, h: z > 0, "returned bool[50]"),
    (lambda z, p, h: z + 0j, "returned complex64[50]"),
    (lambda z, p, h: (z, z), "returned tuple"),
    (lambda z, p, h: None, "returned NoneType"),
    (lambda z, p, h: z * p["missing"], "KeyError: 'missing'"),
    (lambda z, p, h: z if p["a"] > 0 else -z, "TracerBoolConversionError"),
    (_Unhashable(), "not hashable"),
]


@pytest.mark.parametrize("fn, says", BAD_TRANSFORMS, ids=[s for _, s in BAD_TRANSFORMS])
def test_a_transform_that_cannot_work_is_refused_naming_it(fn, says):
    from types import SimpleNamespace

    from jaxsample.api import Engine
    from jaxsample.params import TransformError

    chain = (EPS, UserTransform("bad", fn, {"a": 1.0}))
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    calls = [
        lambda: sm.sample(logits, SamplingParams(seed=1), transforms=chain),
        lambda: sm.processed_logprobs(logits, SamplingParams(), transforms=chain),
        lambda: pack_rows([SamplingParams()], vocab_size=50, seeds=[0], transforms=chain),
        # the engine refuses it when built, before any compile (a stand-in model: only its
        # config is read)
        lambda: Engine(
            SimpleNamespace(config=SimpleNamespace(vocab_size=50, context_length=64)),
            None,
            transforms=chain,
        ),
    ]
    for call in calls:
        with pytest.raises(TransformError, match="user transform 'bad'") as info:
            call()
        assert says in str(info.value)
        assert isinstance(info.value, ValueError)


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(1, 300),
    shape=st.sampled_from(["V", "()", "1", "V+1", "V,1", "1,V", "2,V"]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "int32", "bool", "uint8"]),
)
def test_only_a_float_array_of_the_row_shape_passes_the_check(vocab, shape, dtype):
    """pack_rows accepts a transform iff it returns a floating-point array of shape (V,)."""
    from jaxsample.params import TransformError

    dims = {"V": (vocab,), "()": (), "1": (1,), "V+1": (vocab + 1,), "V,1": (vocab, 1)}
    dims.update({"1,V": (1, vocab), "2,V": (2, vocab)})
    want = dims[shape]

    def fn(z, p, hist):
        return jnp.zeros(want, jnp.dtype(dtype))

    chain = (UserTransform("t", fn),)
    ok = want == (vocab,) and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    if ok:
        pack_rows([SamplingParams()], vocab_size=vocab, seeds=[0], transforms=chain)
    else:
        with pytest.raises(TransformError, match=f"returned {jnp.dtype(dtype)}"):
            pack_rows([SamplingParams()], vocab_size=vocab, seeds=[0], transforms=chain)


def test_a_float_transform_of_any_width_is_accepted():
    """bfloat16, float16 and float64 outputs are logits too (computed in float32 after)."""
    logits = np.random.default_rng(1).standard_normal((2, 40)).astype(np.float32)
    want = sm.processed_logprobs(logits, SamplingParams())
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
        chain = (UserTransform("cast", lambda z, p, h, d=dtype: z.astype(d)),)
        got = sm.processed_logprobs(logits, SamplingParams(), transforms=chain)
        np.testing.assert_allclose(got, want, atol=0.05)


# ------------------------------------------------------------------ inside the decode loop


def _parity(z, p, hist):
    """Bans odd token ids while p["on"] > 0."""
    odd = jnp.arange(z.shape[-1]) % 2 == 1
    return jnp.where(odd & (p["on"] > 0), -jnp.inf, z)


@pytest.fixture(scope="module")
def engine():
    from jaxsample.api import Engine
    from jaxsample.model import Llama, Tokenizer, default_model_path, read_gguf, tiny_config

    tok = Tokenizer.from_gguf(read_gguf(default_model_path()))
    cfg = tiny_config(vocab_size=tok.vocab_size, context_length=128, eos_id=tok.eos_id)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...] * 0.1
    chain = (UserTransform("parity", _parity, {"on": 0.0}),)
    return Engine(model, tok, model_name="tiny-random", transforms=chain)


def test_user_transform_runs_in_the_decode_loop(engine):
    params = [
        SamplingParams(seed=1, max_tokens=8, transform_params={"parity": {"on": 1.0}}),
        SamplingParams(seed=2, max_tokens=8, top_p=0.9),
    ]
    out = engine.generate(["Once upon a time", "Hello"], params)
    assert all(t % 2 == 0 for t in out[0].token_ids) and len(out[0].token_ids) == 8
    assert any(t % 2 == 1 for t in out[1].token_ids)
    # the same tokens as one host-side sample() per step with the same chain
    model, tok = engine.model, engine.tokenizer
    prompt = tok.encode("Once upon a time")
    cache = model.init_cache(1, len(prompt) + 8)
    logits, cache = model.prefill(
        jnp.asarray([prompt], jnp.int32), jnp.asarray([len(prompt)], jnp.int32), cache
    )
    host = []
    for i in range(8):
        t = int(
            sm.sample(
                np.asarray(logits),
                params[0],
                prompt_tokens=[prompt],
                output_tokens=[host],
                step=i,
                transforms=engine.transforms,
            ).tokens[0]
        )
        host.append(t)
        pos = jnp.asarray([len(prompt) + i], jnp.int32)
        logits, cache = model.decode(jnp.asarray([t], jnp.int32), pos, cache)
    assert host == out[0].token_ids


def test_a_chain_that_is_not_a_tuple_of_transforms_is_named():
    """A string chain was iterated as its characters ("got 'a'"), an array chain failed on its
    truth value, 0 was taken as no chain, and a huge int's repr failed inside the message."""
    from jaxsample.transforms import check_chain

    for bad in ("ab", jnp.array([1, 2]), np.array([]), 0, False, 10**5000, [EPS, "x"], (EPS, EPS)):
        with pytest.raises(InvalidRequestError) as err:
            check_chain(bad)
        assert err.value.field == "transforms"
        with pytest.raises(InvalidRequestError) as err:
            sm.sample(np.zeros((1, 4), np.float32), SamplingParams(), transforms=bad)
        assert err.value.field == "transforms"
    assert check_chain(None) == check_chain(()) == check_chain([]) == ()
