"""Independent checks of SPEC.md's rules (sampling chain, log probabilities, determinism,
stopping, JSON mode) against expectations computed here in plain numpy / Python.

The reference below is written from SPEC.md's words alone (float64, by sorting), not from
jaxsample's helpers nor from tests/reference_sampler.py. Cases where float rounding could
decide a threshold comparison are detected (a relative margin) and skipped, so every
comparison of kept sets is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from jaxsample import SamplingParams, processed_logprobs, sample

MARGIN = 1e-5


class Ambiguous(Exception):
    """A threshold comparison lies within float rounding of its boundary."""


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= MARGIN * max(abs(x), abs(y), 1e-300)


def _softmax(z: np.ndarray, keep: np.ndarray) -> np.ndarray:
    zz = np.where(keep, z, -np.inf)
    w = np.exp(zz - zz.max())
    return w / w.sum()


def spec_chain(logits, **kw):
    """SPEC.md steps 2-10 in float64: the step-10 distribution (float64[V])."""
    return spec_chain_keep(logits, **kw)[0]


def spec_chain_keep(
    logits,
    *,
    bias=None,
    rep=1.0,
    freq=0.0,
    pres=0.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    top_a=0.0,
    min_p=0.0,
    prompt=(),
    output=(),
):
    """SPEC.md steps 2-10 in float64: (the step-10 distribution, the kept set).

    Raises :class:`Ambiguous` when a filter's comparison is within rounding of its boundary.
    """
    z = np.asarray(logits, np.float64).copy()
    vocab = z.shape[0]
    for t, v in (bias or {}).items():  # step 2
        z[t] += v
    seen = set(int(t) for t in prompt) | set(int(t) for t in output)
    r = max(rep, 1e-6)  # docs: r is evaluated as max(r, 1e-6)
    for t in seen:  # step 3
        z[t] = z[t] / r if z[t] > 0 else z[t] * r
    for t, c in Counter(int(t) for t in output).items():  # step 4 (output only)
        z[t] -= freq * c + pres * (c > 0)
    if temperature < 1e-5:  # step 5, greedy: argmax (ties: the lowest id)
        out = np.zeros(vocab)
        out[int(np.argmax(z))] = 1.0
        return out, out > 0
    z = z / temperature
    keep = np.isfinite(z)
    if 0 < top_k < vocab:  # step 6
        kth = np.sort(z[keep])[::-1][top_k - 1]
        keep &= z >= kth
    if top_p < 1.0:  # step 7
        p = _softmax(z, keep)
        order = sorted(np.flatnonzero(keep), key=lambda t: (-z[t], t))
        cum = np.cumsum(p[order])
        j = int(np.searchsorted(cum, top_p, side="left"))
        j = min(j, len(order) - 1)
        if _close(cum[j], top_p) or (j > 0 and _close(cum[j - 1], top_p)):
            raise Ambiguous
        keep &= p >= p[order[j]]
    for a, power in ((top_a, 2), (min_p, 1)):  # steps 8, 9
        if a > 0:
            p = _softmax(z, keep)
            thr = a * p.max() ** power
            for q in p[keep]:
                if _close(q, thr) and q != p.max():
                    raise Ambiguous
            keep &= p >= thr
    return _softmax(z, keep) * keep, keep


def _params(**kw):
    return SamplingParams(**kw)


def check_processed(logits, expect, keep=None, **kw):
    """processed_logprobs equals the reference: same kept set, same probabilities."""
    if keep is None:
        keep = expect > 0
    lp = processed_logprobs(
        np.asarray(logits, np.float32)[None],
        _params(**kw["params"]),
        prompt_tokens=[list(kw.get("prompt", ()))],
        output_tokens=[list(kw.get("output", ()))],
    )[0]
    kept = np.isfinite(lp)
    np.testing.assert_array_equal(kept, keep)
    np.testing.assert_allclose(np.exp(lp[kept]), expect[kept], rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Steps 2-9: the processed distribution against the reference
# --------------------------------------------------------------------------------------------

GRID_LOGITS = st.lists(st.integers(-12, 12), min_size=2, max_size=37).map(
    lambda xs: np.array(xs + [-40] * (37 - len(xs)), np.float32) * np.float32(0.5)
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    z=GRID_LOGITS,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.6, 2.0]),
    top_k=st.sampled_from([0, 1, 2, 3, 5, 36, 37, 100]),
    top_p=st.sampled_from([0.0, 0.1, 0.35, 0.5, 0.8, 0.95, 1.0]),
    top_a=st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]),
    min_p=st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]),
)
def test_filters_match_spec(z, temperature, top_k, top_p, top_a, min_p):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, top_a=top_a, min_p=min_p)
    try:
        expect, keep = spec_chain_keep(z, **kw)
    except Ambiguous:
        assume(False)
    check_processed(z, expect, keep, params=kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    z=GRID_LOGITS,
    rep=st.sampled_from([0.0, 0.5, 1.0, 1.3, 2.0]),
    freq=st.sampled_from([-2.0, -0.5, 0.0, 0.7, 2.0]),
    pres=st.sampled_from([-2.0, 0.0, 0.4, 2.0]),
    prompt=st.lists(st.integers(0, 36), max_size=6),
    output=st.lists(st.integers(0, 36), max_size=8),
    bias=st.dictionaries(
        st.integers(0, 36), st.sampled_from([-100.0, -3.0, 1.5, 100.0]), max_size=3
    ),
    temperature=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_penalties_and_bias_match_spec(z, rep, freq, pres, prompt, output, bias, temperature):
    kw = dict(
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
        logit_bias=bias,
        temperature=temperature,
    )
    expect, keep = spec_chain_keep(
        z,
        bias=bias,
        rep=rep,
        freq=freq,
        pres=pres,
        temperature=temperature,
        prompt=prompt,
        output=output,
    )
    check_processed(z, expect, keep, params=kw, prompt=prompt, output=output)


def test_penalty_scopes_and_order():
    """Repetition counts prompt and output; frequency/presence count the output only, with
    counts; bias comes before the repetition penalty; temperature after the penalties."""
    z = np.array([1.0, 2.0, -1.0, 0.5, 0.0, 3.0], np.float32)
    kw = dict(
        logit_bias={0: 2.0, 2: 0.5},
        repetition_penalty=2.0,
        frequency_penalty=0.25,
        presence_penalty=0.5,
        temperature=0.5,
    )
    prompt, output = [0, 1], [2, 2, 2, 3]
    # by hand: bias -> [3, 2, -0.5, 0.5, 0, 3]; repetition on {0,1,2,3} ->
    # [1.5, 1, -1, 0.25, 0, 3]; freq/presence on output {2: 3, 3: 1} ->
    # [1.5, 1, -2.25, -0.5, 0, 3]; / 0.5 -> [3, 2, -4.5, -1, 0, 6]
    hand = np.array([3.0, 2.0, -4.5, -1.0, 0.0, 6.0])
    expect = np.exp(hand - hand.max())
    expect /= expect.sum()
    check_processed(z, expect, params=kw, prompt=prompt, output=output)
    # the prompt alone does not trigger frequency/presence penalties
    kw2 = dict(frequency_penalty=2.0, presence_penalty=2.0)
    expect2 = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    check_processed(z, expect2, params=kw2, prompt=[0, 1, 2, 5, 5])


def test_top_p_zero_and_min_p_one_keep_ties():
    z = np.array([2.0, 5.0, 5.0, 4.0], np.float32)
    for kw in (dict(top_p=0.0), dict(min_p=1.0), dict(top_k=1)):
        check_processed(z, np.array([0.0, 0.5, 0.5, 0.0]), params=kw)


def test_top_k_off_at_vocab_and_above():
    z = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    full = np.exp(z - 2) / np.exp(z - 2).sum()
    for k in (0, 4, 5, 10**6):
        check_processed(z, full, params=dict(top_k=k))


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=0.97),
        dict(min_p=0.3),
        dict(top_a=0.9),
        dict(top_k=2500, top_p=0.9, temperature=1.5),
        dict(top_k=2000, min_p=0.2),
    ],
)
def test_full_vocabulary_path(kw):
    """A kept set much larger than the candidate tiers (3000 of 3001 tokens)."""
    rng = np.random.default_rng(5)
    z = (rng.standard_normal(3001) * 0.3).astype(np.float32)
    z[-1] = -30.0
    try:
        expect = spec_chain(z, **kw)
    except Ambiguous:
        pytest.skip("ambiguous")
    assert (expect > 0).sum() > 1024
    check_processed(z, expect, params=kw)


# --------------------------------------------------------------------------------------------
# Greedy and log probabilities
# --------------------------------------------------------------------------------------------


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


@pytest.mark.parametrize("t", [0.0, 9.9e-6])
def test_greedy_takes_argmax_of_penalized_logits(t):
    z = np.array([1.0, 4.0, 3.5, 0.0, 3.9], np.float32)
    p = SamplingParams(
        temperature=t,
        logit_bias={2: 0.25},
        presence_penalty=0.5,
        logprobs=True,
        top_logprobs=3,
        top_k=3,
        min_p=0.9,
    )
    # bias -> token 2 = 3.75; presence on output [1] -> token 1 = 3.5; argmax is token 4 (3.9)
    for seed in range(3):
        r = sample(z[None], dataclasses.replace(p, seed=seed), output_tokens=[[1]])
        assert int(r.tokens[0]) == 4
        raw = _log_softmax(z)
        # default (raw): the model's own log_softmax, before any step
        np.testing.assert_allclose(r.logprobs[0], raw[4], rtol=1e-5)
        np.testing.assert_array_equal(r.top_ids[0, :3], [1, 4, 2])
        np.testing.assert_allclose(r.top_logprobs[0, :3], raw[[1, 4, 2]], rtol=1e-5)


def test_temperature_1e5_is_not_greedy():
    z = np.zeros((1, 4), np.float32)
    toks = {int(sample(z, SamplingParams(temperature=1e-5, seed=s)).tokens[0]) for s in range(20)}
    assert len(toks) > 1


def test_raw_and_processed_logprobs_of_sampled_token():
    z = np.array([0.0, 1.0, 2.0, 0.5, -1.0, 1.5], np.float32)
    base = dict(
        temperature=0.7,
        top_k=4,
        logit_bias={0: 3.0},
        logprobs=True,
        top_logprobs=6,
        repetition_penalty=1.5,
    )
    raw = _log_softmax(z)
    expect = spec_chain(z, bias={0: 3.0}, temperature=0.7, top_k=4, rep=1.5, prompt=[2])
    for seed in range(6):
        r = sample(z[None], SamplingParams(seed=seed, **base), prompt_tokens=[[2]])
        t = int(r.tokens[0])
        assert expect[t] > 0
        np.testing.assert_allclose(r.logprobs[0], raw[t], rtol=1e-5)
        # raw top_logprobs: the model's distribution, removed tokens included, descending
        order = sorted(range(6), key=lambda i: (-z[i], i))
        np.testing.assert_array_equal(r.top_ids[0, :6], order)
        np.testing.assert_allclose(r.top_logprobs[0, :6], raw[order], rtol=1e-5)
        q = sample(
            z[None],
            SamplingParams(seed=seed, logprobs_mode="processed", **base),
            prompt_tokens=[[2]],
        )
        assert int(q.tokens[0]) == t  # the mode of reporting never changes the draw
        np.testing.assert_allclose(np.exp(q.logprobs[0]), expect[t], rtol=1e-5)
        kept = sorted(np.flatnonzero(expect > 0), key=lambda i: (-expect[i], i))
        np.testing.assert_array_equal(q.top_ids[0, : len(kept)], kept)
        np.testing.assert_allclose(np.exp(q.top_logprobs[0, : len(kept)]), expect[kept], rtol=1e-5)
        assert np.all(q.top_logprobs[0, len(kept) : 6] == -np.inf)


def test_no_allowed_token_ends_cleanly():
    z = np.full((1, 5), np.nan, np.float32)
    r = sample(z, SamplingParams(seed=1, logprobs=True))
    assert not r.ok[0] and int(r.tokens[0]) == -1
    lp = processed_logprobs(z, SamplingParams())
    assert not np.isnan(lp).any()


# --------------------------------------------------------------------------------------------
# Randomness and determinism
# --------------------------------------------------------------------------------------------


def test_draw_independent_of_batch_and_position():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 50)).astype(np.float32)
    params = [
        SamplingParams(seed=11, temperature=1.3, top_p=0.9),
        SamplingParams(seed=12, top_k=5),
        SamplingParams(seed=13, min_p=0.1, temperature=0.5),
        SamplingParams(seed=14),
    ]
    for step in (0, 7):
        together = sample(z, params, step=step).tokens
        alone = [int(sample(z[i : i + 1], params[i], step=step).tokens[0]) for i in range(4)]
        assert together.tolist() == alone
        perm = [2, 0, 3, 1]
        shuffled = sample(z[perm], [params[i] for i in perm], step=step).tokens
        assert shuffled.tolist() == [alone[i] for i in perm]


def test_same_distribution_same_token():
    """Different parameter sets with the same step-10 distribution draw the same token."""
    z = np.array([3.0, 1.0, 2.5, -1.0, 0.0, 2.0, 1.5, -2.0], np.float32)
    # kept {0, 2, 5}, logits z / 1 in every variant
    variants = [
        (z, dict(top_k=3)),
        (z, dict(top_k=3, top_p=0.999)),
        (z * 2, dict(temperature=2.0, top_k=3)),
        (z, dict(min_p=float(np.exp(-1.1)))),  # p >= e^-1.1 p_max keeps z >= 1.9
    ]
    for zz, kw in variants:
        e = spec_chain(zz, **kw)
        assert set(np.flatnonzero(e > 0)) == {0, 2, 5}
    for seed in range(25):
        for step in (0, 3):
            toks = {
                int(sample(zz[None], SamplingParams(seed=seed, **kw), step=step).tokens[0])
                for zz, kw in variants
            }
            assert len(toks) == 1, (seed, step, toks)


def test_position_changes_the_draw_and_seeds_are_reported():
    z = np.zeros((1, 64), np.float32)
    a = [int(sample(z, SamplingParams(seed=s), step=0).tokens[0]) for s in range(10)]
    b = [int(sample(z, SamplingParams(seed=s), step=1).tokens[0]) for s in range(10)]
    assert a != b
    r1 = sample(np.zeros((3, 8), np.float32), SamplingParams(), job_seed=42)
    r2 = sample(np.zeros((3, 8), np.float32), SamplingParams(), job_seed=42)
    assert r1.seeds == r2.seeds and len(set(r1.seeds)) == 3
    assert r1.tokens.tolist() == r2.tokens.tolist()
    # the reported seed reproduces the row when given explicitly
    for i, s in enumerate(r1.seeds):
        r = sample(np.zeros((1, 8), np.float32), SamplingParams(seed=s))
        assert int(r.tokens[0]) == int(r1.tokens[i])


def test_draw_is_exact_chi_square():
    z = np.array([1.0, 0.2, -0.5, 0.8, 0.0, -3.0, 0.4, 1.1], np.float32)
    kw = dict(temperature=0.8, top_k=6, min_p=0.05)
    expect = spec_chain(z, **kw)
    n = 3000
    logits = np.broadcast_to(z, (n, 8))
    r = sample(logits, [SamplingParams(seed=s, **kw) for s in range(n)])
    counts = np.bincount(r.tokens, minlength=8)
    assert counts[expect == 0].sum() == 0
    k = expect > 0
    p_value = stats.chisquare(counts[k], expect[k] * n).pvalue
    assert p_value > 1e-4, (counts, expect * n)


# --------------------------------------------------------------------------------------------
# Engine: stop strings, max_tokens, JSON mode
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from small_engine import small_engine

    return small_engine()


def _gen(engine, prompt, **kw):
    (c,) = engine.generate([prompt], SamplingParams(**kw))
    assert c.error is None, c.error
    return c


def test_stop_strings(engine):
    free = _gen(engine, "Once upon a time", seed=3, max_tokens=24, temperature=1.0)
    assert free.finish_reason in ("length", "stop")
    tb = engine.tokenizer.token_bytes
    pieces = [tb[t] for t in free.token_ids]
    text = b"".join(pieces)
    # a stop string that starts inside token 2 and spans into token 4 (byte-level)
    start = len(pieces[0]) + len(pieces[1]) + max(0, len(pieces[2]) - 1)
    end = len(pieces[0]) + sum(len(p) for p in pieces[1:5])
    stop_b = text[start:end]
    try:
        stop_s = stop_b.decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("random text not UTF-8 at the chosen cut")
    assume_ok = stop_s and text.find(stop_b) == start
    if not assume_ok:
        pytest.skip("stop string occurs earlier")
    c = _gen(
        engine,
        "Once upon a time",
        seed=3,
        max_tokens=24,
        temperature=1.0,
        stop=stop_s,
        logprobs=True,
    )
    assert c.finish_reason == "stop"
    assert c.text.encode() == text[:start]
    # the row stopped on the token that completed the string
    assert c.token_ids == free.token_ids[:5]
    # logprobs: one entry per token that starts before the cut (the kept text's tokens)
    offsets = np.cumsum([0] + [len(p) for p in pieces[:5]])[:5]
    assert len(c.logprobs) == int(np.sum(offsets < start))
    # several stops: the earliest occurrence in the text wins, whichever completes first
    later = text[end : end + 2].decode("utf-8", "ignore") or "zzzzz"
    c2 = _gen(
        engine, "Once upon a time", seed=3, max_tokens=24, temperature=1.0, stop=[later, stop_s]
    )
    assert c2.text.encode() == text[: min(start, text.find(later.encode()))]
    assert c2.finish_reason == "stop"


def test_stop_at_max_tokens_is_stop(engine):
    free = _gen(engine, "Hello", seed=8, max_tokens=6, temperature=1.0)
    if free.finish_reason != "length":
        pytest.skip("ended early")
    tb = engine.tokenizer.token_bytes
    last = tb[free.token_ids[-1]]
    try:
        stop_s = last.decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("last token not UTF-8")
    text = b"".join(tb[t] for t in free.token_ids)
    if not stop_s or text.find(last) != len(text) - len(last):
        pytest.skip("stop occurs earlier")
    c = _gen(engine, "Hello", seed=8, max_tokens=6, temperature=1.0, stop=[stop_s])
    assert c.token_ids == free.token_ids
    assert c.finish_reason == "stop"
    assert c.text.encode() == text[: len(text) - len(last)]


def test_max_tokens_length(engine):
    for n in (1, 5):
        c = _gen(
            engine,
            "Hello",
            seed=2,
            max_tokens=n,
            temperature=1.0,
            logit_bias={engine.tokenizer.eos_id: -100},
        )
        assert len(c.token_ids) == n and c.finish_reason == "length"


def test_eos_is_stop_and_not_in_text(engine):
    eos = engine.tokenizer.eos_id
    c = _gen(engine, "Hello", seed=2, max_tokens=5, temperature=1.0, logit_bias={eos: 100})
    assert c.token_ids == [eos] and c.finish_reason == "stop" and c.text == ""


@pytest.mark.parametrize("max_tokens", [1, 3, 12, 40])
def test_json_mode_always_valid(engine, max_tokens):
    for seed in range(2):
        c = _gen(
            engine,
            "JSON please",
            seed=seed,
            max_tokens=max_tokens,
            temperature=1.0,
            response_format={"type": "json_object"},
        )
        assert isinstance(json.loads(c.text), dict), c.text


def test_stop_ending_inside_a_token_and_across_utf8(engine):
    """A stop string that ends inside a token stops the row at that token; the text is cut
    where the string starts."""
    free = _gen(engine, "Once upon a time", seed=5, max_tokens=20, temperature=1.0)
    tb = engine.tokenizer.token_bytes
    pieces = [tb[t] for t in free.token_ids]
    text = b"".join(pieces)
    # the first token (from the third on) of 2+ bytes: the stop is its first byte, preceded
    # by the previous token's last byte
    for j in range(2, len(pieces)):
        if len(pieces[j]) >= 2 and pieces[j - 1]:
            start = sum(len(p) for p in pieces[:j]) - 1
            stop_b = text[start : start + 2]
            try:
                stop_s = stop_b.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.find(stop_b) != start:
                continue
            c = _gen(
                engine, "Once upon a time", seed=5, max_tokens=20, temperature=1.0, stop=[stop_s]
            )
            assert c.token_ids == free.token_ids[: j + 1]
            assert c.text.encode() == text[:start]
            assert c.finish_reason == "stop"
            return
    pytest.skip("no suitable token in the random text")


def test_chat_completion_shape_and_unseeded_order(engine):
    eos = engine.tokenizer.eos_id
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {str(eos): -100},
    }
    out = engine.chat_completion(dict(body))
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 3
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6
    assert isinstance(out["seed"], int)
    # an unseeded request's seed depends on the job seed and its key, not on order
    items = [("a", "Hello", SamplingParams(max_tokens=4)), ("b", "x", SamplingParams(max_tokens=4))]
    one = dict(engine.stream(items, job_seed=9))
    two = dict(engine.stream(items[::-1], job_seed=9))
    for k in "ab":
        assert one[k].seed == two[k].seed and one[k].token_ids == two[k].token_ids


# --------------------------------------------------------------------------------------------
# Ranges (docs/params.md): bounds inclusive, outside refused naming the field
# --------------------------------------------------------------------------------------------


def test_integer_fields_and_dependencies():
    from jaxsample import InvalidRequestError, check_for_model

    for field, bad in (("top_k", -1), ("top_logprobs", 21), ("max_tokens", 0), ("top_k", 2.0)):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**{field: bad, "logprobs": True})
        assert err.value.field == field
    SamplingParams(top_logprobs=20, logprobs=True)
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(top_logprobs=1)
    assert err.value.field == "top_logprobs"
    for stop in (["a"] * 5, [""], [1]):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(stop=stop)
        assert err.value.field == "stop"
    assert SamplingParams(stop="ab").stop == ("ab",)
    for bias in ({"1": 100.5}, {"1": -101}, {-1: 1.0}):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams.from_request({"logit_bias": bias})
        assert err.value.field == "logit_bias"
    p = SamplingParams.from_request({"logit_bias": {"9": 1.0}})
    with pytest.raises(InvalidRequestError) as err:
        check_for_model(p, vocab_size=9, context_length=100, prompt_length=1)
    assert err.value.field == "logit_bias"
    assert (
        check_for_model(SamplingParams(), vocab_size=9, context_length=100, prompt_length=10) == 90
    )
    with pytest.raises(InvalidRequestError) as err:
        check_for_model(
            SamplingParams(max_tokens=91), vocab_size=9, context_length=100, prompt_length=10
        )
    assert err.value.field == "max_tokens"
    with pytest.raises(InvalidRequestError):
        SamplingParams(response_format={"type": "xml"})


@functools.cache
def _advance_jit():
    import jax

    from jaxsample.automata import stop as stop_mod

    return jax.jit(stop_mod.advance)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stops=st.lists(st.text("ab\u00e9", min_size=1, max_size=6), min_size=1, max_size=4),
    tokens=st.lists(st.integers(0, 5), max_size=12),
)
def test_stop_automaton_matches_substring_search(stops, tokens):
    """The device automaton hits at the first token whose bytes complete any stop string
    (Python's substring search as the expectation); truncate cuts at the earliest start."""
    import jax

    from jaxsample.automata import stop as stop_mod

    vocab = [b"a", b"b", b"ab", b"ba", "é".encode(), b"a\xc3"]
    tb = stop_mod.TokenBytes.from_vocab(vocab + [b"\xa9b"])
    tokens = tokens + [6]
    st_ = jax.tree.map(lambda x: x[0], stop_mod.compile_stops([tuple(stops)]))
    s = jax.tree.map(lambda x: x[0], stop_mod.init_state(stop_mod.compile_stops([tuple(stops)])))
    enc = [x.encode() for x in stops]
    text = b""
    expect_hit = None
    got_hit = None
    for j, t in enumerate(tokens):
        text += (vocab + [b"\xa9b"])[t]
        if expect_hit is None and any(e in text for e in enc):
            expect_hit = j
        s, hit = _advance_jit()(st_, s, t, tb)
        if got_hit is None and bool(hit):
            got_hit = j
    assert got_hit == expect_hit
    cut, found = stop_mod.truncate(text, stops)
    starts = [text.find(e) for e in enc if e in text]
    assert found == bool(starts)
    assert cut == (text[: min(starts)] if starts else text)


def test_json_mode_beats_logit_bias(engine):
    """Hard constraints come first: a +100 bias cannot bring back a banned token, and EOS
    only ends a complete object."""
    tok = engine.tokenizer
    eos = tok.eos_id
    letters = [i for i, b in enumerate(tok.token_bytes) if b in (b"x", b"Q", b"]")]
    for bias in ({eos: 100.0}, {t: 100.0 for t in letters}):
        for t in (0.0, 2.0):
            c = _gen(
                engine,
                "JSON please",
                seed=4,
                max_tokens=16,
                temperature=t,
                response_format={"type": "json_object"},
                logit_bias=bias,
            )
            assert isinstance(json.loads(c.text), dict), (bias, c.text)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos


def test_engine_greedy_logprobs(engine):
    raw = _gen(engine, "Hello", temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=3)
    for e in raw.logprobs:
        assert e["top_logprobs"][0]["token"] == e["token"]
        assert e["top_logprobs"][0]["logprob"] == e["logprob"] < 0
    pro = _gen(
        engine,
        "Hello",
        temperature=0.0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        logprobs_mode="processed",
    )
    assert pro.token_ids == raw.token_ids
    for e in pro.logprobs:
        assert e["logprob"] == 0.0


def test_eager_row_equals_jitted_batch_and_all_seed_bits_count():
    import jax

    from jaxsample import History, pack_rows, sample_row

    rng = np.random.default_rng(3)
    z = rng.standard_normal((1, 300)).astype(np.float32)
    p = SamplingParams(temperature=1.1, top_p=0.95, repetition_penalty=1.2, logprobs=True)
    # eager (slow: one call) and a jitted unbatched row against the jitted batched sampler
    for seed, row_fn in ((2**32 + 5, sample_row), (-(2**63), jax.jit(sample_row))):
        rows = pack_rows([p], vocab_size=300, seeds=[seed])
        row = jax.tree.map(lambda x: jax.numpy.asarray(x[0]), rows)
        hist = History.from_tokens([1, 2], [3], 300)
        one = row_fn(jax.numpy.asarray(z[0]), row, hist, None, jax.numpy.int32(5))
        batched = sample(
            z,
            dataclasses.replace(p, seed=seed),
            prompt_tokens=[[1, 2]],
            output_tokens=[[3]],
            step=5,
        )
        assert int(one.token) == int(batched.tokens[0])
    # the high 32 bits of a seed count: 5 and 2**32 + 5 are different seeds
    flat = np.zeros((1, 300), np.float32)
    a = [int(sample(flat, SamplingParams(seed=5), step=i).tokens[0]) for i in range(4)]
    b = [int(sample(flat, SamplingParams(seed=2**32 + 5), step=i).tokens[0]) for i in range(4)]
    assert a != b


def test_bad_request_fails_alone(engine):
    vocab = engine.vocab_size
    outs = engine.generate(
        ["Hello", "Hello", "x " * 400],
        [
            SamplingParams(seed=1, max_tokens=2, logit_bias={vocab: 1.0}),
            SamplingParams(seed=1, max_tokens=2),
            SamplingParams(seed=1, max_tokens=2),
        ],
    )
    assert outs[0].error is not None and outs[0].error.field == "logit_bias"
    assert outs[0].finish_reason == "error"
    assert outs[1].error is None and len(outs[1].token_ids) == 2
    assert outs[2].error is not None and outs[2].finish_reason == "error"


def test_draw_exact_beyond_candidates_and_shift_invariant():
    """Chi-square on a kept set larger than the first candidate tier (grouped bins); adding
    a constant to every logit (same distribution) draws the same tokens."""
    rng = np.random.default_rng(11)
    z = (np.round(rng.standard_normal(300) * 4) / 8).astype(np.float32)
    kw = dict(top_p=0.9, temperature=1.0)
    expect, keep = spec_chain_keep(z, **kw)
    assert keep.sum() > 128
    n = 1500
    plist = [SamplingParams(seed=s, **kw) for s in range(n)]
    r = sample(np.broadcast_to(z, (n, 300)), plist)
    counts = np.bincount(r.tokens, minlength=300)
    assert counts[~keep].sum() == 0
    order = np.argsort(-expect)[: keep.sum()]
    groups = np.array_split(order, 12)
    obs = np.array([counts[g].sum() for g in groups])
    exp = np.array([expect[g].sum() for g in groups]) * n
    assert stats.chisquare(obs, exp).pvalue > 1e-4, (obs, exp)
    shifted = sample(np.broadcast_to(z + np.float32(3.0), (n, 300)), plist)
    assert np.array_equal(shifted.tokens, r.tokens)


def test_engine_row_independent_of_other_slots(engine):
    p = SamplingParams(seed=21, max_tokens=6, temperature=1.2, logprobs=True, top_logprobs=2)
    (alone,) = engine.generate(["Hello"], p)
    others = [
        SamplingParams(seed=1, max_tokens=3),
        p,
        SamplingParams(seed=2, max_tokens=9, temperature=0.0, repetition_penalty=1.5),
    ]
    mixed = engine.generate(["x", "Hello", "Once upon a time"], others)
    assert mixed[1].token_ids == alone.token_ids
    assert json.dumps(mixed[1].logprobs) == json.dumps(alone.logprobs)
