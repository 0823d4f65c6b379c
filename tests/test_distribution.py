"""The public Distribution, the path-independent draw, the batch plan and the host API."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsample import InvalidRequestError, SamplingParams, derive_seed, native, pack_rows
from jaxsample import sampler as sm
from tests.reference_sampler import make_rows, reference_probs

SEEDS = 48  # rows per draw: enough to compact (8 of 48) the fallback


def _rows(params, nb=4):
    return jax.tree.map(jnp.asarray, make_rows(params, nb=nb))


def _hist(batch, vocab, prompt=(), output=()):
    return sm.History.stack([sm.History.from_tokens(prompt, output, vocab)] * batch)


def _tokens(logits, params, *, num_candidates, second_tier, position=3, **kw):
    """Tokens drawn for SEEDS seeds with one parameter set (one row per seed)."""
    vocab = logits.shape[-1]
    rows = _rows([{**params, "seed": s} for s in range(SEEDS)])
    out = sm.sample_batch(
        jnp.broadcast_to(jnp.asarray(logits), (SEEDS, vocab)),
        rows,
        _hist(SEEDS, vocab, **kw),
        None,
        position,
        num_candidates=num_candidates,
        second_tier=second_tier,
    )
    return np.asarray(out.token)


def _processed(logits, params, **kw):
    rows = _rows([params])
    vocab = logits.shape[-1]
    return np.asarray(
        sm.processed_logprobs_batch(jnp.asarray(logits)[None], rows, _hist(1, vocab), None)[0]
    )


def _tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ the token depends on the
# key and the distribution only, whichever path computed it


def test_issue_example_top_k_2_equals_no_filter():
    """V=8192, logits 0 and 1 on tokens 0 and 1, -1000 elsewhere: 200 seeds, same tokens."""
    logits = np.full(8192, -1000.0, np.float32)
    logits[:2] = [0.0, 1.0]
    lp_plain, lp_k2 = _processed(logits, {}), _processed(logits, {"top_k": 2})
    # the same float32 probabilities (the plain row's other tokens have exp(-1001) = 0)
    np.testing.assert_array_equal(np.exp(lp_plain), np.exp(lp_k2))
    tokens = []
    for params in ({}, {"top_k": 2}):
        rows = _rows([{**params, "seed": s} for s in range(200)])
        out = sm.sample_batch(
            jnp.broadcast_to(jnp.asarray(logits), (200, 8192)), rows, _hist(200, 8192), None, 0
        )
        tokens.append(np.asarray(out.token))
    np.testing.assert_array_equal(tokens[0], tokens[1])
    # and the draw is a real draw: both tokens occur, in about the right proportion
    assert 0.6 < np.mean(tokens[0] == 1) < 0.85  # p(1) = e / (1 + e) = 0.73


PATHS = [  # (num_candidates, second_tier): candidates, second tier, full vocabulary
    (64, 0),
    (4, 16),
    (4, 0),
]


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    vocab=st.just(40),
    spread=st.sampled_from([0.5, 2.0, 4.0]),
    ties=st.booleans(),
    removed=st.integers(0, 6),
    base=st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.sampled_from([0.5, 1.0, 1.7]),
            "repetition_penalty": st.sampled_from([0.8, 1.3]),
            "presence_penalty": st.floats(-1, 1),
        },
    ),
)
def test_same_distribution_same_token_on_every_path(seed, vocab, spread, ties, removed, base):
    """Parameter sets that keep the same set with the same probabilities draw the same token
    for every seed, on the candidates, the second tier and the full-vocabulary path."""
    rng = np.random.default_rng(seed)
    logits = (rng.uniform(-1, 1, vocab) * spread).astype(np.float32)
    if ties:
        logits = np.round(logits)  # many exact ties
    logits[rng.choice(vocab, removed, replace=False)] = -np.inf
    kw = dict(prompt=[1, 2], output=[2, 5])
    probs, _ = reference_probs(logits, base, **kw)
    finite = int((probs > 0).sum())
    p_min = probs[probs > 0].min()
    same = [
        dict(base),
        {**base, "top_k": int(rng.integers(finite, vocab + 1))},  # at or above the kept count
        # reaches P only at the last token (when p_min is well above float32 rounding)
        {**base, "top_p": float(1.0 - p_min / 2) if p_min > 1e-4 else 1.0},
        {**base, "min_p": 1e-9},  # tiny: keeps all
        {**base, "top_a": 1e-9},
        {**base, "min_p": 1e-9, "top_k": vocab},
    ]
    draws = {}
    for i, params in enumerate(same):
        for nc, tier in PATHS:
            rows = _rows([params])
            lp = np.asarray(
                sm.processed_logprobs_batch(
                    jnp.asarray(logits)[None],
                    rows,
                    _hist(1, vocab, **kw),
                    None,
                    num_candidates=nc,
                    second_tier=tier,
                )[0]
            )
            np.testing.assert_array_equal(lp > -np.inf, probs > 0)  # the same kept set
            draws[(i, nc, tier)] = _tokens(
                logits, params, num_candidates=nc, second_tier=tier, **kw
            )
    first = draws[(0, *PATHS[0])]
    assert (probs[first] > 0).all()
    for key, toks in draws.items():
        np.testing.assert_array_equal(toks, first, err_msg=str(key))


def test_paths_agree_on_a_large_vocabulary():
    """Realistic logits over V=2048: top_p resolved on the candidates, on the second tier and
    by bisection draws the same tokens (the kept set is the same on every path)."""
    rng = np.random.default_rng(1)
    v = 2048
    logits = (-1.5 * np.log(rng.permutation(v) + 1.0) + rng.gumbel(size=v) * 0.2).astype(np.float32)
    for top_p in (0.9,):
        params = {"top_p": top_p, "temperature": 0.9}
        toks = [_tokens(logits, params, num_candidates=nc, second_tier=t) for nc, t in PATHS]
        toks.append(_tokens(logits, params, num_candidates=128, second_tier=1024))
        for t in toks[1:]:
            np.testing.assert_array_equal(t, toks[0])


# ------------------------------------------------------------------ the public pieces


def _one(x, i=0):
    return jax.tree.map(lambda a: a[i], x)


def test_sample_row_is_draw_of_distribution_with_the_row_key():
    rng = np.random.default_rng(2)
    v = 300
    logits = jnp.asarray(rng.standard_normal(v).astype(np.float32) * 2)
    rows = _rows([{"seed": 11, "top_p": 0.8, "logprobs": True}])
    hist = _hist(1, v)
    row, h = _one(rows), _one(hist)
    d = jax.jit(sm.distribution)(logits, row, h, None)
    for pos in range(5):
        key = jax.random.fold_in(jax.random.wrap_key_data(row.seed_words, impl="threefry2x32"), pos)
        out = jax.jit(sm.sample_row)(logits, row, h, None, jnp.int32(pos))
        assert int(sm.draw(d, key)) == int(out.token)
    lp = np.asarray(sm.log_prob(d, jnp.arange(v)))
    np.testing.assert_array_equal(
        lp, sm.processed_logprobs_batch(logits[None], rows, hist, None)[0]
    )
    ids, top = sm.top_logprobs(d, 5)
    order = np.lexsort((np.arange(v), -lp))[:5]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(top, lp[order])
    want, _ = reference_probs(np.asarray(logits), {"top_p": 0.8})
    np.testing.assert_allclose(np.exp(lp), want, atol=1e-6, rtol=1e-4)


def test_draw_with_explicit_keys_is_exact():
    """draw(dist, key) over many keys: frequencies match exp(log_prob) (chi-square)."""
    v, n = 50, 6000
    logits = jnp.asarray(np.random.default_rng(3).standard_normal(v).astype(np.float32))
    rows = _rows([{"top_k": 30, "temperature": 1.2}])
    d = sm.distribution(logits, _one(rows), _one(_hist(1, v)), None, num_candidates=8)
    keys = jax.random.split(jax.random.key(5), n)
    tokens = np.asarray(jax.jit(jax.vmap(sm.draw, in_axes=(None, 0)))(d, keys))
    probs = np.exp(np.asarray(sm.log_prob(d, jnp.arange(v)), np.float64))
    counts = np.bincount(tokens, minlength=v)
    assert counts[probs == 0].sum() == 0
    expected = probs / probs.sum() * n
    stat = ((counts - expected)[expected > 0] ** 2 / expected[expected > 0]).sum()
    df = int((expected > 0).sum()) - 1
    assert stat < df + 4 * np.sqrt(2 * df) + 10, (stat, df)


MIXED = [
    {"seed": 1, "top_k": 5, "top_p": 0.9, "top_logprobs": 3},
    {"seed": 2, "temperature": 0.0, "top_logprobs": 20},
    {"seed": 3, "min_p": 0.1, "top_a": 0.2, "processed_logprobs": True, "top_logprobs": 5},
    {"seed": 4, "repetition_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {2: 5.0}},
    {"seed": 5},  # no filter: full vocabulary
    {"seed": 6, "top_p": 0.99, "temperature": 2.0},  # second tier or bisection
    {"seed": 7, "top_k": 40},  # top_k beyond the first tier
    {"seed": 8, "top_a": 0.01, "logprobs": False},
]


@pytest.mark.parametrize("nc,tier", [(8, 64), (8, 0), (128, 1024)])
def test_plain_vmap_equals_sample_rows(nc, tier):
    v = 200
    b = len(MIXED)
    logits = jnp.asarray(np.random.default_rng(4).standard_normal((b, v)).astype(np.float32))
    rows = _rows(MIXED)
    hist = sm.History.stack([sm.History.from_tokens([1, 2], [2, 3, 3], v) for _ in range(b)])
    want = sm.sample_batch(logits, rows, hist, None, 5, num_candidates=nc, second_tier=tier)
    fn = jax.vmap(
        lambda lg, r, h: sm.sample_row(lg, r, h, None, 5, num_candidates=nc, second_tier=tier)
    )
    got = jax.jit(fn)(logits, rows, hist)
    _tree_equal(got, want)


@pytest.mark.parametrize("kernels", ["auto", "xla"])
def test_row_code_has_no_collectives(monkeypatch, kernels):
    monkeypatch.setattr(sm, "BRANCHES", "many")  # the CPU's plan, also on a GPU
    monkeypatch.setattr(native, "KERNELS", kernels)
    v = 300
    rows = _rows(MIXED)
    hist = _hist(len(MIXED), v)
    logits = jnp.zeros((len(MIXED), v))
    text = str(
        jax.make_jaxpr(jax.vmap(lambda lg, r, h: sm.sample_row(lg, r, h, None, 0)))(
            logits, rows, hist
        )
    )
    assert not re.search(r"\b(psum|pmax|cond)\[", text)  # no collective, no branch at all
    jaxpr = jax.make_jaxpr(lambda *a: sm.sample_rows(*a, None, 0))(logits, rows, hist)
    assert not re.search(r"\b(psum|pmax)\[", str(jaxpr))
    # batch-level branches per step: logit_bias tier, normalizer, second tier, full
    # vocabulary (its three filters branch inside it, only when it runs), the exact race for
    # an uncertified fast race, raw log probabilities; with the JAX forms also the halved
    # candidate selection and the full selection again for the rows it left unresolved (the
    # CPU kernel selects every candidate in the pass that finds the block maxima)
    halved = 0 if native.kernels_alone() else 2
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("cond") == 6 + halved
    if kernels == "xla":
        assert halved == 2


def _every_path_batch(v: int, repeats: int, seed: int):
    """``(logits, rows, hist)``: MIXED and HALF's parameter sets ``repeats`` times (distinct
    seeds) over logits whose scale varies by row: a batch that takes every path."""
    params = [dict(p, seed=10 * r + i) for r in range(repeats) for i, p in enumerate(MIXED + HALF)]
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(_half_logits(rng, len(params), v) * rng.uniform(0.5, 4, (len(params), 1)))
    return logits, _rows(params, nb=20), _hist(len(params), v, prompt=[1, 2], output=[2, 3, 3])


def _traced_outputs(logits, rows, hist, nc: int, tier: int, allowed=None) -> dict:
    """sample_rows' and processed_logprobs_rows' outputs, the batch-level branches of
    sample_rows' jaxpr and its compiled program, traced afresh under the settings now."""

    def fn(lg, r, h, a):  # a new function per call: traced afresh
        return sm.sample_rows(lg, r, h, a, 4, num_candidates=nc, second_tier=tier)

    args = (logits, rows, hist, allowed)
    jaxpr = jax.make_jaxpr(fn)(*args)
    procs = jax.jit(lambda *a: sm.processed_logprobs_rows(*a, num_candidates=nc))
    return {
        "sample": jax.jit(fn)(*args),
        "processed": procs(*args),
        "branches": sum(e.primitive.name in ("cond", "switch") for e in jaxpr.jaxpr.eqns),
        "program": jax.jit(fn).lower(*args).compile().as_text(),
    }


def _assert_paths(logits, rows, hist, nc: int, tier: int):
    """The batch takes the candidates, the full vocabulary and (with one) the second tier."""
    dist, _ = jax.jit(lambda *a: sm.distributions(*a, None, num_candidates=nc, second_tier=tier))(
        logits, rows, hist
    )
    full = ~np.asarray(dist.in_candidates) & ~np.asarray(dist.in_tier2)
    assert np.asarray(dist.in_candidates).any() and full.any()
    assert np.asarray(dist.in_tier2).any() == (tier > nc)


@pytest.mark.parametrize("nc,tier", [(8, 64), (16, 0), (128, 1024)])
def test_few_branches_give_the_same_numbers(nc, tier, monkeypatch):
    """``BRANCHES = "few"`` (the GPU's: every cheap part runs unconditionally, the rare stages
    are one branch each over all rows) and ``"one"`` (one branch for every rare stage, last,
    every token from the race over the whole vocabulary) give every
    output of ``"many"`` bit for bit, on a batch with every path (candidates, second tier,
    full vocabulary, greedy, bias, penalties, raw and processed log probabilities, a row
    that the halved selection leaves unresolved), and compile fewer batch-level branches."""
    gpu = jax.default_backend() == "gpu"
    assert sm.BRANCHES == "auto" and sm._branches() == ("one" if gpu else "many")
    logits, rows, hist = _every_path_batch(300, 3, 5)
    outs = {}
    for mode in ("many", "few", "one"):
        monkeypatch.setattr(sm, "BRANCHES", mode)
        outs[mode] = _traced_outputs(logits, rows, hist, nc, tier)
    for mode in ("few", "one"):
        _tree_equal(outs[mode]["sample"], outs["many"]["sample"])
        _tree_equal(outs[mode]["processed"], outs["many"]["processed"])
    _assert_paths(logits, rows, hist, nc, tier)
    # few: the second tier, the full vocabulary, the exact race, raw log probabilities;
    # one: a single switch (the common stages for each raw / kept-mass need, or the rare
    # stages), last
    branches = {mode: outs[mode]["branches"] for mode in outs}
    assert branches["one"] == 1 < branches["few"] <= 4 < branches["many"]
    monkeypatch.setattr(sm, "BRANCHES", "fewer")
    with pytest.raises(ValueError, match="BRANCHES"):
        sm._branches()


def test_one_branch_with_hard_masks(monkeypatch):
    """``BRANCHES = "one"`` with a hard constraint (JSON mode's and stop strings' masks):
    every output of ``"many"`` bit for bit, a row with no allowed token included."""
    logits, rows, hist = _every_path_batch(300, 2, 8)
    rng = np.random.default_rng(9)
    allowed = rng.random(logits.shape) < 0.7
    allowed[3] = False  # no token allowed: token -1, ok False
    allowed[5] = np.arange(logits.shape[1]) == 7  # one token allowed
    allowed = jnp.asarray(allowed)
    outs = {}
    for mode in ("many", "one"):
        monkeypatch.setattr(sm, "BRANCHES", mode)
        outs[mode] = _traced_outputs(logits, rows, hist, 128, 1024, allowed)
    _tree_equal(outs["one"]["sample"], outs["many"]["sample"])
    _tree_equal(outs["one"]["processed"], outs["many"]["processed"])
    tokens = np.asarray(outs["one"]["sample"].token)
    assert tokens[3] == -1 and tokens[5] == 7 and (tokens >= 0).sum() == len(tokens) - 1


#: The reports a batch may ask for, as the plan's (raw, kept mass) needs: none; raw log
#: probabilities; also their top ones; processed ones (the kept mass); both kinds.
REPORTS = {
    "none": [{"logprobs": False}],
    "raw": [{}],
    "raw_top": [{"top_logprobs": 4}],
    "processed": [{"processed_logprobs": True, "top_logprobs": 3}],
    "both": [{"top_logprobs": 20}, {"processed_logprobs": True}],
}


@pytest.mark.parametrize("report", list(REPORTS))
def test_one_common_side_for_each_report_gives_the_same_numbers(report, monkeypatch):
    """Under ``BRANCHES = "one"`` the common path is the side of one switch that matches the
    batch's reports (raw log probabilities, their top ones, the kept mass): on a batch no row
    of which retries on the second tier, each gives every output of ``"many"`` bit for bit."""
    sets = [  # resolved by the candidates, or by nothing cutting the kept set
        {"seed": 1, "top_k": 5},
        {"seed": 2, "temperature": 0.0},
        {"seed": 3, "repetition_penalty": 1.3, "logit_bias": {4: 3.0}},
        {"seed": 4},  # no filter: the full vocabulary's race, no search
        {"seed": 5, "top_k": 12, "temperature": 0.7},
    ]
    reports = REPORTS[report]
    params = [{**p, **reports[i % len(reports)]} for i, p in enumerate(sets * 2)]
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((len(params), 500)).astype(np.float32) * 3)
    rows, hist = _rows(params), _hist(len(params), 500, prompt=[1], output=[4, 4])
    _, plan = sm.distributions(logits, rows, hist, None, num_candidates=16, second_tier=64)
    assert not plan.tier2  # the common side
    outs = {}
    for mode in ("many", "one"):
        monkeypatch.setattr(sm, "BRANCHES", mode)

        def fn(lg, r, h):  # a new function per mode: traced afresh
            return sm.sample_rows(lg, r, h, None, 4, num_candidates=16, second_tier=64)

        outs[mode] = jax.jit(fn)(logits, rows, hist)
    _tree_equal(outs["one"], outs["many"])
    lp = np.asarray(outs["one"].logprob)
    assert np.isnan(lp).all() if report == "none" else np.isfinite(lp).all()


@pytest.mark.parametrize("mode", ["few", "one"])
def test_rank_form_gives_the_same_numbers(mode, monkeypatch):
    """``native.TOP_K_FORM = "rank"`` (a GPU candidate: counting ranks where XLA sorts) gives
    every output of the sort form bit for bit, with each GPU plan, on a batch with every path
    (the two-stage top-k of the candidates and of the raw top 20, the second tier, the full
    vocabulary's window); at this size its program has no TopK left."""
    monkeypatch.setattr(native, "KERNELS", "xla")
    monkeypatch.setattr(sm, "BRANCHES", mode)
    outs = _same_outputs_under(monkeypatch, native, "TOP_K_FORM", ("sort", "rank"), 2000, 64)
    assert "TopK" in outs["sort"]["program"]
    assert "TopK" not in outs["rank"]["program"] and " sort(" not in outs["rank"]["program"]


def _bits(x):
    x = np.asarray(x)
    return x.view(np.int32) if x.dtype == np.float32 else x


@pytest.mark.parametrize("c,vocab", [(16, 200), (16, 16), (128, 1000)])
def test_one_filter_table_equals_the_filter_chain(c, vocab):
    """``_filter_candidates_one`` (``BRANCHES = "one"``: every filter's count tabulated for
    every state in one reduction) gives ``_filter_candidates``'s states bit for bit: every
    field after top_k and after every filter, on candidates with tie blocks across the cuts,
    rows with fewer finite tokens than candidates, every filter on and off, cuts at 0, 1,
    the last candidate and past it, top_p at exact cumulative fractions, and with the
    candidates' normalizer and without it (NaN)."""
    from jaxsample import transforms as tf

    rng = np.random.default_rng(c + vocab)
    rows = 400
    z = rng.integers(-6, 3, (rows, vocab)).astype(np.float32) * rng.choice([0.5, 1.0, 3.0])
    z[rng.random((rows, vocab)) < 0.02] += 0.25  # some values without ties
    few = rng.random(rows) < 0.2  # fewer finite tokens than candidates
    z[few] = np.where(rng.random((few.sum(), vocab)) < 4 / vocab, z[few], -np.inf)
    z[rng.random(rows) < 0.02] = -np.inf  # no finite token at all
    z = jnp.asarray(z)
    values, ids = jax.lax.top_k(z, c)
    total = jax.vmap(tf.vocabulary_total)(z, values[:, 0])
    total = jnp.where(jnp.asarray(rng.random(rows) < 0.1), jnp.nan, total)
    c0 = jax.vmap(lambda v, i, t: tf._candidates(v, i, t, vocab))(values, ids, total)
    weights = np.asarray(c0.weights)
    params = []
    for r in range(rows):
        cum = np.cumsum(weights[r].astype(np.float64))
        exact_p = float(np.float32(cum[rng.integers(0, c)] / max(cum[-1], 1.0)))
        params.append(
            dict(
                top_k=int(rng.choice([0, 0, 1, 3, c - 1, c, c + 1, vocab])),
                top_p=float(rng.choice([1.0, 1.0, 0.0, 0.5, 0.9, 0.99, exact_p])),
                top_a=float(rng.choice([0.0, 0.0, 0.1, 0.5, 1.0])),
                min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3, 1.0])),
            )
        )
    rp = _rows(params)

    def run(fn):
        return jax.jit(jax.vmap(lambda c0, r, t: fn(c0, r, vocab, t)))(c0, rp, total)

    want, got = run(sm._filter_candidates), run(sm._filter_candidates_one)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(_bits(b), _bits(a))
    # the cases above were met: cuts that are exact, inexact, and no cut at all
    final = want[1]
    assert np.asarray(final.exact).any() and (np.asarray(final.n) < c).any()
    if c < vocab:  # (the candidates hold every token: every cut is exact)
        assert (~np.asarray(final.exact)).any() and np.asarray(final.kept_all).any()


@pytest.mark.parametrize("keys", [False, True])
def test_rank_candidates_equal_lax_top_k(keys, monkeypatch):
    """``_rank_candidates`` (the GPU plan's two-stage top-k by counting, no sort of the chosen
    blocks) is ``lax.top_k``, values' bits and ids: on rows like ``z`` (ties, -inf, few
    finite tokens; no NaN or -0.0) and, with ``keys``, on sanitized raw logits (-0.0 and
    +0.0 both); batched, one row, under nested ``vmap``, and by the composition of
    ``transforms.top_candidates`` where the rows' pairs exceed ``native.RANK_LIMIT``."""
    from jaxsample import transforms as tf

    rng = np.random.default_rng(5 + keys)
    k, block = 20, tf.CANDIDATE_BLOCK
    for vocab in (1280, 5003):
        x = rng.integers(-3, 3, (6, vocab)).astype(np.float32)
        if keys:
            x[x == -3] = -0.0
            x[x == 2] = np.nan
        else:
            x[x == -3] = -np.inf
        x[1, :] = -np.inf
        x[1, rng.integers(0, vocab, 3)] = 1.0  # three finite tokens
        x[2] = rng.standard_normal(vocab)
        x = tf.sanitize(jnp.asarray(x))
        zb = jax.vmap(tf.block_max)(x)
        want = jax.lax.top_k(x, k)
        fn = sm._rank_candidates(k, block, keys)

        def check(got, want=want):
            np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
            np.testing.assert_array_equal(_bits(got[0]), _bits(want[0]))

        check(jax.jit(jax.vmap(fn))(x, zb))
        check(jax.tree.map(lambda *r: jnp.stack(r), *[fn(x[i], zb[i]) for i in range(6)]))
        nested = jax.vmap(jax.vmap(fn))(x.reshape(2, 3, -1), zb.reshape(2, 3, -1))
        check(jax.tree.map(lambda a: a.reshape(6, -1), nested))
        program = jax.jit(jax.vmap(fn)).lower(x, zb).as_text()
        assert "topk" not in program.lower() and " sort(" not in program
        monkeypatch.setattr(native, "RANK_LIMIT", 1)  # the composition's forms
        check(jax.jit(jax.vmap(fn))(x, zb))
        monkeypatch.setattr(native, "RANK_LIMIT", 2**27)


def _same_outputs_under(monkeypatch, module, name: str, values, vocab: int, tier: int) -> dict:
    """The outputs (:func:`_traced_outputs`) of a batch with every path, 16 candidates and a
    second tier of ``tier``, with ``module.name`` set to each of ``values``: all equal, bit
    for bit, to the first's. Returns them by value."""
    nc = 16
    logits, rows, hist = _every_path_batch(vocab, 2, 6)
    outs = {}
    for value in values:
        monkeypatch.setattr(module, name, value)
        outs[value] = _traced_outputs(logits, rows, hist, nc, tier)
    for value in values[1:]:
        _tree_equal(outs[value]["sample"], outs[values[0]]["sample"])
        _tree_equal(outs[value]["processed"], outs[values[0]]["processed"])
    _assert_paths(logits, rows, hist, nc, tier)
    return outs


def test_large_top_k_by_count_gives_the_same_numbers(monkeypatch):
    """``transforms.LARGE_TOP_K = "count"`` (a GPU candidate: the second tier's top-k by
    counting, where XLA sorts the row) gives every output of the sort form bit for bit, on a
    batch with every path, the second tier's two-stage selection and its whole-row one."""
    from jaxsample import transforms as tf

    monkeypatch.setattr(native, "KERNELS", "xla")
    monkeypatch.setattr(sm, "BRANCHES", "one")  # the GPU's plan
    monkeypatch.setattr(tf, "LARGE_K", 64)
    for vocab in (2000, 5000):  # 2000 < 64 * 64: the whole row
        _same_outputs_under(monkeypatch, tf, "LARGE_TOP_K", ("sort", "count"), vocab, 64)
    monkeypatch.setattr(tf, "LARGE_TOP_K", "fast")
    with pytest.raises(ValueError, match="LARGE_TOP_K"):
        tf.top_candidates(jnp.zeros(100), 4)


# ------------------------------------------------------------------ greedy, host inputs, keys


def test_greedy_is_decided_in_float64_on_the_host():
    rows = pack_rows(
        [SamplingParams(temperature=9.9999999e-6), SamplingParams(temperature=1e-5)],
        vocab_size=4,
        seeds=[0, 0],
    )
    assert rows.temperature[0] == 0.0 and rows.temperature[1] == np.float32(1e-5)
    logits = np.array([[0.0, 1e-5, 2e-5, -1.0]] * 2, np.float32)
    lp = sm.processed_logprobs(logits, [SamplingParams(temperature=9.9999999e-6)] * 2)
    np.testing.assert_array_equal(lp[0], [-np.inf, -np.inf, 0.0, -np.inf])  # greedy: argmax
    lp = sm.processed_logprobs(logits, [SamplingParams(temperature=1e-5)] * 2)
    assert np.isfinite(lp[0]).sum() == 4  # samples: z / 1e-5 spreads, nothing is cut


@pytest.mark.parametrize("kind", ["list", "numpy", "jax"])
def test_history_and_wrappers_take_lists_numpy_and_jax_arrays(kind):
    conv = {"list": list, "numpy": np.array, "jax": jnp.array}[kind]
    h = sm.History.from_tokens(conv([1, 1, 4]), conv([2, 2, 0]), vocab_size=6)
    assert h.counts.tolist() == [1, 0, 2, 0, 0, 0]
    assert h.in_prompt.tolist() == [False, True, False, False, True, False]
    logits = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    p = SamplingParams(seed=3, repetition_penalty=1.8, presence_penalty=1.0)
    res = sm.sample(logits, p, prompt_tokens=[conv([1]), conv([2, 3])], output_tokens=None)
    ref = sm.sample(logits, p, prompt_tokens=[[1], [2, 3]])
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    lp = sm.processed_logprobs(logits, p, output_tokens=conv([conv([4]), conv([5])]))
    want, _ = reference_probs(
        logits[0], {"repetition_penalty": 1.8, "presence_penalty": 1.0}, output=[4]
    )
    np.testing.assert_allclose(np.exp(lp[0]), want, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError):
        sm.History.from_tokens(np.array([0.5]), None, vocab_size=6)


def test_host_wrappers_take_a_key_or_a_job_seed():
    logits = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    key = jax.random.key(9)
    res = sm.sample(logits, SamplingParams(top_p=0.9), key=key)
    assert res.seeds == (None, None, None)
    rows = jax.tree.map(
        jnp.asarray, pack_rows([SamplingParams(top_p=0.9)] * 3, vocab_size=40, seeds=[0] * 3)
    )
    d = jax.vmap(lambda lg, r, h: sm.distribution(lg, r, h, None))(
        jnp.asarray(logits), rows, _hist(3, 40)
    )
    for b in range(3):
        assert int(sm.draw(_one(d, b), jax.random.fold_in(key, b))) == int(res.tokens[b])
    res = sm.sample(logits, SamplingParams(), job_seed=7, step=2)
    assert res.seeds == tuple(derive_seed(7, i) for i in range(3))
    same = sm.sample(logits, [SamplingParams(seed=s) for s in res.seeds], step=2)
    np.testing.assert_array_equal(res.tokens, same.tokens)
    with pytest.raises(ValueError, match="seed"):
        sm.sample(logits, SamplingParams(seed=1), key=key)
    with pytest.raises(ValueError):
        sm.sample(logits, SamplingParams(), key=key, job_seed=1)


def test_bad_transform_params_are_refused():
    for value in (float("nan"), 1e300, -1e39):  # the values are float32 leaves
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(transform_params={"x": {"a": value}})
        assert info.value.field == "transform_params" and "float32" in str(info.value)
    SamplingParams(transform_params={"x": {"a": 3e38}})


_L = np.zeros((2, 5), np.float32)


@pytest.mark.parametrize(
    "field, call",
    [
        ("logits", lambda: sm.sample(np.zeros((1, 0), np.float32), SamplingParams())),
        ("logits", lambda: sm.sample(np.zeros((0, 4), np.float32), [])),
        ("logits", lambda: sm.sample(np.zeros(4, np.float32), SamplingParams())),
        ("logits", lambda: sm.sample(np.zeros((1, 4), np.complex64), SamplingParams())),
        ("logits", lambda: sm.sample(np.zeros((1, 4), np.int32), SamplingParams())),
        ("logits", lambda: sm.processed_logprobs(np.zeros((1, 4), bool), SamplingParams())),
        ("logits", lambda: sm.processed_logprobs(np.zeros((1, 0), np.float32), SamplingParams())),
        ("step", lambda: sm.sample(_L, SamplingParams(), step=1.5)),
        ("step", lambda: sm.sample(_L, SamplingParams(), step="3")),
        ("step", lambda: sm.sample(_L, SamplingParams(), step=True)),
        ("step", lambda: sm.sample(_L, SamplingParams(), step=-1)),
        ("step", lambda: sm.sample(_L, SamplingParams(), step=2**31)),
        ("key", lambda: sm.sample(_L, SamplingParams(), key=5)),
        ("key", lambda: sm.sample(_L, SamplingParams(), key=np.zeros(3, np.uint32))),
        ("key", lambda: sm.sample(_L, SamplingParams(), key=np.zeros(2, np.float32))),
        ("key", lambda: sm.sample(_L, SamplingParams(), key=jax.random.split(jax.random.key(0)))),
        ("params", lambda: sm.sample(_L, {"temperature": 0.5})),
        ("params[1]", lambda: sm.sample(_L, [SamplingParams(), {"temperature": 0.5}])),
        ("vocab_size", lambda: sm.History.from_tokens([], [], vocab_size=-1)),
        ("params", lambda: sm.sample(_L, [SamplingParams()] * (_L.shape[0] + 1))),
        ("prompt_tokens", lambda: sm.sample(_L, SamplingParams(), prompt_tokens=[[1]] * 9)),
        ("output_tokens", lambda: sm.sample(_L[:1], SamplingParams(), output_tokens=[1, 2])),
        # a flat list for two rows was read as one token per row
        ("prompt_tokens[0]", lambda: sm.sample(_L[:2], SamplingParams(), prompt_tokens=[0, 1])),
        ("output_tokens[1]", lambda: sm.sample(_L[:2], SamplingParams(), output_tokens=[[1], 2])),
        ("prompt_ids", lambda: sm.History.from_tokens(5, [], vocab_size=10)),
        ("output_ids", lambda: sm.History.from_tokens([], [10], vocab_size=10)),
        # what needs the decoding loop is refused, not left out of the distribution
        (
            "response_format",
            lambda: sm.sample(_L, SamplingParams(response_format={"type": "json_object"})),
        ),
        ("stop", lambda: sm.processed_logprobs(_L, SamplingParams(stop=["x"]))),
        ("key", lambda: sm.sample(_L, SamplingParams(), key=jax.random.key(0), job_seed=1)),
        ("key", lambda: sm.sample(_L, SamplingParams(seed=1), key=jax.random.key(0))),
    ],
)
def test_host_wrappers_refuse_bad_input_naming_the_field(field, call):
    """Bad input to the host wrappers is an InvalidRequestError naming the field, never an
    error from inside JAX or numpy, and never converted (a float step is not truncated)."""
    with pytest.raises(InvalidRequestError) as info:
        call()
    assert info.value.field == field


def test_host_wrappers_take_a_jax_integer_step():
    res = sm.sample(_L, SamplingParams(seed=3), step=jnp.int32(4))
    np.testing.assert_array_equal(res.tokens, sm.sample(_L, SamplingParams(seed=3), step=4).tokens)


def test_every_word_of_a_key_counts():
    """A threefry key's race words are its own data; a key with more words (rbg) gives two
    words drawn from all of them, so keys that differ only in their first words differ."""
    key = jax.random.key(5)
    np.testing.assert_array_equal(sm._key_words(key), jax.random.key_data(key))
    data = np.arange(4, dtype=np.uint32)
    other = data.copy()
    other[0] += 1
    words = [sm._key_words(jax.random.wrap_key_data(d, impl="rbg")) for d in (data, other)]
    assert not np.array_equal(words[0], words[1])
    d = sm.distribution(jnp.zeros(8), sm._neutral_row(8), sm.History.from_tokens([], [], 8), None)
    for bad in (jax.random.split(key, 3), jnp.float32(5.7), jnp.zeros(3, jnp.uint32)):
        with pytest.raises(InvalidRequestError, match="key"):
            sm.draw(d, bad)


def test_a_key_of_zero_words_is_not_degenerate():
    """``jax.random.key(0)`` and ``PRNGKey(0)`` have two zero words, which the race's mixer
    maps to a hash of 0 for token 0 (it would win every draw it is kept in, however
    unlikely): such a key races with :data:`sampler.ZERO_KEY_WORDS` instead, and token 0's
    frequency over many distributions is its probability's, not 1."""
    vocab = 64
    h = sm.History.from_tokens([], [], vocab)
    rng = np.random.default_rng(0)
    dist = jax.jit(sm.distribution)
    zeros = (jax.random.key(0), jax.random.PRNGKey(0), np.zeros(2, np.uint32))
    wins = np.zeros(len(zeros), int)
    for _ in range(40):  # token 0 at probability about 1e-5, every draw
        logits = jnp.asarray(rng.standard_normal(vocab).astype(np.float32)).at[0].set(-12.0)
        d = dist(logits, sm._neutral_row(vocab), h, None)
        assert float(jnp.exp(sm.log_prob(d, 0))) < 1e-4
        wins += [int(sm.draw(d, k)) == 0 for k in zeros]
    assert wins.tolist() == [0, 0, 0]
    words = sm._key_words(jax.random.key(0))
    np.testing.assert_array_equal(words, np.array(sm.ZERO_KEY_WORDS, np.uint32))
    np.testing.assert_array_equal(sm._key_words(jax.random.key(7)), [0, 7])  # others: own words


def test_per_row_functions_refuse_wrong_shapes_and_a_float_position():
    """The per-row and batched functions check their arrays' shapes and the position's dtype
    when traced: an InvalidRequestError naming the argument, not an error from inside JAX,
    and a float position is refused, not truncated."""
    vocab = 10
    row, h = sm._neutral_row(vocab), sm.History.from_tokens([], [], vocab)
    x = jnp.zeros(vocab)
    rows = jax.tree.map(lambda a: a[None], row)
    hs = sm.History.stack([h])
    cases = [
        ("logits", lambda: sm.distribution(x[None], row, h, None)),
        ("allowed", lambda: sm.distribution(x, row, h, jnp.ones(vocab + 1, bool))),
        ("hist.counts", lambda: sm.distribution(x, row, sm.History.from_tokens([], [], 12), None)),
        ("logits", lambda: sm.sample_rows(x, rows, hs, None, 0)),
        ("allowed", lambda: sm.sample_rows(x[None], rows, hs, jnp.ones(vocab, bool), 0)),
        ("position", lambda: sm.sample_row(x, row, h, None, 1.5)),
        ("position", lambda: sm.sample_rows(x[None], rows, hs, None, 1.5)),
        ("position", lambda: jax.jit(sm.sample_batch)(x[None], rows, hs, None, jnp.float32(2))),
        # a batch's RowParams given to a per-row function, and one row's to a batched one
        ("row", lambda: sm.distribution(x, rows, h, None)),
        ("row", lambda: sm.sample_row(x, rows, h, None, 0)),
        ("rows", lambda: sm.sample_rows(x[None], row, hs, None, 0)),
        ("rows", lambda: sm.distributions(x[None], {"temperature": 1.0}, hs, None)),
        ("hist", lambda: sm.distribution(x, row, (h.counts, h.in_prompt), None)),
    ]
    for field, call in cases:
        with pytest.raises(InvalidRequestError) as info:
            call()
        assert info.value.field == field
    out = sm.sample_rows(x[None], rows, hs, None, np.int64(3))  # any integer dtype
    assert int(out.token[0]) in range(vocab)
    # no history (None) is the empty one, per row and batched
    logits = jnp.asarray(np.random.default_rng(1).standard_normal(vocab), jnp.float32)
    penalized = pack_rows([SamplingParams(repetition_penalty=1.5)], vocab_size=vocab, seeds=[3])
    prow = jax.tree.map(lambda a: a[0], penalized)
    a, b = sm.distribution(logits, prow, None, None), sm.distribution(logits, prow, h, None)
    np.testing.assert_array_equal(
        sm.log_prob(a, jnp.arange(vocab)), sm.log_prob(b, jnp.arange(vocab))
    )
    np.testing.assert_array_equal(
        sm.sample_rows(logits[None], penalized, None, None, 2).token,
        sm.sample_rows(logits[None], penalized, hs, None, 2).token,
    )


def test_log_prob_outside_the_vocabulary_and_top_logprobs_n():
    vocab = 300
    h = sm.History.from_tokens([], [], vocab)
    d = sm.distribution(jnp.zeros(vocab), sm._neutral_row(vocab), h, None)
    lp = np.asarray(sm.log_prob(d, jnp.array([-1, 10, 300, 10**6])))
    assert lp[0] == lp[2] == lp[3] == -np.inf and np.isclose(lp[1], -np.log(vocab))
    held = d.ids.shape[0]
    ids, lps = sm.top_logprobs(d, held + 2)  # past the candidates: -1, said so in the doc
    assert (np.asarray(ids)[:held] >= 0).all() and ids.tolist()[held:] == [-1, -1]
    with pytest.raises(ValueError, match="'n' = -1"):
        sm.top_logprobs(d, -1)
    small = sm.distribution(
        jnp.zeros(3), sm._neutral_row(3), sm.History.from_tokens([], [], 3), None
    )
    ids, lps = sm.top_logprobs(small, 5)  # past a vocabulary of 3: ids -1
    assert ids.tolist()[3:] == [-1, -1] and np.isneginf(np.asarray(lps)[3:]).all()


@pytest.mark.parametrize("race_blocks", [16, 0])
def test_fast_full_vocabulary_race_equals_the_exact_race(race_blocks, monkeypatch):
    """The full-vocabulary race scores the candidates and the blocks whose cheap bound can
    win; when it certifies, its token is the exact race's, and when it cannot (forced here
    with no block scored), the exact race runs: the drawn token is the same either way."""
    from jaxsample import transforms as tf

    monkeypatch.setattr(sm, "RACE_BLOCKS", race_blocks)
    rng = np.random.default_rng(race_blocks)
    v, n, c = 4096, 64, 128
    certified_all = []
    for scale, cut in ((0.3, -0.5), (3.0, -jnp.inf), (1.0, -jnp.inf)):
        z = jnp.asarray(rng.standard_normal(v).astype(np.float32) * scale)
        z = jnp.where(z > cut, z, -jnp.inf)
        shift = jnp.max(z)
        w = jnp.exp(z - shift)
        kept = z > -jnp.inf
        values, ids = tf.top_candidates(z, c)
        zb = tf.block_max(z)
        words = jax.random.bits(jax.random.key(int(scale * 10)), (n, 2), jnp.uint32)
        fast_fn = jax.vmap(
            lambda wd, z=z, shift=shift, ids=ids, values=values, zb=zb: sm._race_full_fast(
                z, shift, -jnp.inf, 0.0, ids, values, zb, wd
            )
        )
        fast, certified = jax.jit(fast_fn)(words)
        exact = jax.jit(jax.vmap(sm._race_full, in_axes=(None, None, None, 0)))(z, w, kept, words)
        certified = np.asarray(certified)
        np.testing.assert_array_equal(np.asarray(fast)[certified], np.asarray(exact)[certified])
        certified_all.append(certified)
        # sample_rows-style dispatch (fast, exact where uncertified) equals the exact race
        rows = _rows([{"seed": s} for s in range(n)])
        logits = jnp.broadcast_to(z, (n, v))
        keys = jax.vmap(jax.random.wrap_key_data)(words)
        step = jax.jit(lambda lg, r, h, k: sm.sample_rows(lg, r, h, None, 0, keys=k))  # fresh
        out = step(logits, rows, _hist(n, v), keys)
        np.testing.assert_array_equal(out.token, exact)
    rate = np.mean(np.concatenate(certified_all))
    print("certified", rate)
    assert rate > 0.95 if race_blocks == 16 else rate < 1.0  # the exact race did run


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 16, 17, 64])
def test_compaction_runs_exactly_the_rows_that_need_it(count):
    """Whatever the number of rows that need a stage (none, fewer than each gathered size,
    exactly at it, more than the largest), every row that needs it gets the stage's output
    and every other row its skip output."""
    batch = 64
    need = np.zeros(batch, bool)
    need[np.random.default_rng(count).choice(batch, count, replace=False)] = True
    x = jnp.arange(batch, dtype=jnp.float32)

    def run(args, active):
        (v,) = args
        return v * 2.0 + 1.0 if active else jnp.zeros_like(v)

    for few in (False, True):
        fn = partial(sm._compacted, run=run, few=few)
        out = jax.jit(lambda n, v, fn=fn: fn(n, args=(v,)))(jnp.asarray(need), x)
        np.testing.assert_array_equal(np.asarray(out)[need], np.asarray(x)[need] * 2 + 1)
        # one switch: none, 4 or 16 gathered rows, all (few: one cond, none or all)
        jaxpr = jax.make_jaxpr(lambda n, v, fn=fn: fn(n, args=(v,)))(jnp.asarray(need), x)
        (cond,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
        assert len(cond.params["branches"]) == (2 if few else 4)
    assert sm._compact_sizes(batch) == [4, 16]


# ------------------------------------------------------------------ halved candidate selection


def _half_logits(rng, batch, vocab):
    """Rows built to stress the halved selection (64 of 128 slots): a tie block of 70 at the
    top, a tie block across the 64th place, fewer than 64 finite tokens, plain noise."""
    x = rng.standard_normal((batch, vocab)).astype(np.float32)
    x[0, rng.choice(vocab, 70, replace=False)] = 5.0  # 70 tied maxima
    order = np.argsort(-x[1], kind="stable")
    x[1, order[58:70]] = x[1, order[58]]  # a tie block from the 59th to the 70th place
    x[2, rng.choice(vocab, vocab - 40, replace=False)] = -np.inf  # 40 finite tokens
    x[3, rng.choice(vocab, vocab - 64, replace=False)] = np.nan  # exactly 64 (NaN: removed)
    return x


def _batch_equals_rows(params, vocab, *, seed, k_max):
    """Samples ``params`` (one row each, on :func:`_half_logits`) as a batch whose plan has
    ``k_max`` (asserted: it decides the halved selection) and asserts every output equals a
    plain vmap of ``sample_row`` (which computes everything). Returns the batch's inputs and
    outputs."""
    rows = _rows(params)
    batch = len(params)
    assert int(sm.plan_rows(rows, vocab_size=vocab).k_max) == k_max
    logits = jnp.asarray(_half_logits(np.random.default_rng(seed), batch, vocab))
    hist = _hist(batch, vocab, prompt=[3, 4], output=[4, 5])
    want = jax.jit(jax.vmap(lambda lg, r, h: sm.sample_row(lg, r, h, None, 2)))(logits, rows, hist)
    got = sm.sample_batch(logits, rows, hist, None, 2)
    _tree_equal(got, want)
    return rows, logits, hist, got


HALF = [
    {"top_k": 50, "top_p": 0.95, "top_logprobs": 20},
    {"top_k": 62, "min_p": 0.02, "processed_logprobs": True, "top_logprobs": 20},
    {"top_k": 50, "top_a": 0.05, "temperature": 1.5},
    {"top_k": 64, "top_p": 0.9, "processed_logprobs": True, "top_logprobs": 10},
    {"top_k": 1},
    {"temperature": 0.0, "top_logprobs": 5},  # greedy: its top_k (off) does not matter
    {"top_k": 64, "repetition_penalty": 1.3, "logit_bias": {7: 4.0}},
    {"top_k": 33, "temperature": 0.7},
]


def test_halved_candidates_give_the_same_numbers():
    """A batch in which every sampled row's top_k keeps at most 64 tokens selects only 64
    of its 128 candidates (the plan's ``k_max``); every output equals the full selection's
    (a plain vmap of ``sample_row`` computes everything), ties across the 64th place and rows
    with fewer finite tokens included, for many seeds."""
    vocab, reps = 300, 6
    params = [dict(p, seed=100 * r + i) for r in range(reps) for i, p in enumerate(HALF)]
    batch = len(params)
    _, logits, _, got = _batch_equals_rows(params, vocab, seed=7, k_max=64)
    # and a neighbour without top_k or any filter (the full-vocabulary path) changes nothing
    rows_mixed = _rows([*params, {"seed": 9}])
    logits_mixed = jnp.concatenate([logits, logits[:1]])
    mixed = sm.sample_batch(
        logits_mixed, rows_mixed, _hist(batch + 1, vocab, [3, 4], [4, 5]), None, 2
    )
    for x, y in zip(jax.tree.leaves(mixed), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(x)[:batch], np.asarray(y))


HALF_FILTERS = [
    {"top_p": 0.3, "top_logprobs": 20},
    {"top_p": 0.6, "processed_logprobs": True, "top_logprobs": 20},
    {"min_p": 0.2},
    {"top_a": 0.3, "temperature": 0.5},
    {"top_p": 0.99, "temperature": 0.7},
    {"min_p": 0.002, "processed_logprobs": True, "top_logprobs": 5},
    {"top_p": 0.8, "top_k": 40},
    {"temperature": 0.0},
]


def test_rows_without_top_k_halved_or_selected_again_give_the_same_numbers():
    """Rows without top_k take the halved selection too (the batch's cutting top_k keep at
    most 64): a row whose filters it resolves keeps it, a row it leaves unresolved (its kept
    set needs more than 64 candidates, or a tie block reaches the 64th place) is selected again
    in full, and every output equals the full selection's (a plain vmap of ``sample_row``)."""
    vocab, reps = 300, 6
    params = [dict(p, seed=50 * r + i) for r in range(reps) for i, p in enumerate(HALF_FILTERS)]
    # rows without top_k do not count in k_max: the selection is halved
    rows, logits, hist, _ = _batch_equals_rows(params, vocab, seed=11, k_max=40)
    # both kinds of row occur: kept sets of the candidates with at most 63 tokens and with
    # more than 64 (only the full selection can hold those)
    dist, _ = jax.jit(lambda *a: sm.distributions(*a))(logits, rows, hist, None)
    n = np.asarray(dist.n)[np.asarray(dist.in_candidates)]
    assert (n <= 63).any() and (n > 64).any()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 20),
    tie_at=st.integers(0, 30),
    tie_len=st.integers(1, 30),
)
def test_halved_selection_is_exact_or_says_so(seed, k, tie_at, tie_len):
    """``init_candidates(..., half=True)`` then top_k (k <= half): the kept set it claims
    exact is the true one (every token >= the k-th largest), and a tie block that reaches
    the last real candidate is never claimed exact."""
    from jaxsample import transforms as tf

    vocab, c = 200, 40
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal(vocab), 1).astype(np.float32)  # many natural ties
    order = np.argsort(-x, kind="stable")
    x[order[tie_at : tie_at + tie_len]] = x[order[tie_at]]
    s = tf.top_k(tf.init_candidates(jnp.asarray(x), c, half=True), jnp.int32(k), vocab_size=vocab)
    kth = np.sort(x)[::-1][k - 1]
    true_n = int((x >= kth).sum())
    if bool(s.exact):
        assert int(s.n) == true_n
        np.testing.assert_array_equal(
            np.sort(np.asarray(s.ids)[: int(s.n)]), np.flatnonzero(x >= kth)
        )
    else:
        assert true_n >= c // 2  # only a tie block reaching the 20th place is left undecided
