"""The on-device decode loop against a plain host loop, on a small random model.

The small model has the real vocabulary (49152 tokens) so the real tokenizer, stop strings
and JSON mode drive it; its weights are random, so its logits are arbitrary.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from small_engine import real_tokenizer, small_model

from jaxsample import InvalidRequestError, SamplingParams
from jaxsample.api import Engine
from jaxsample.engine import compile_count
from jaxsample.sampler import sample


@pytest.fixture(scope="module")
def engine():
    tok = real_tokenizer()
    return Engine(small_model(tok), tok, model_name="tiny-random")


def host_loop(engine, prompt_ids, params: SamplingParams, max_tokens: int, seed: int):
    """The obvious reference: one model call and one host-side sample() per token."""
    model = engine.model
    cache = model.init_cache(1, len(prompt_ids) + max_tokens)
    toks = jnp.asarray([prompt_ids], jnp.int32)
    logits, cache = model.prefill(toks, jnp.asarray([len(prompt_ids)], jnp.int32), cache)
    params = SamplingParams(**{**params.__dict__, "seed": seed})
    out, lps = [], []
    for i in range(max_tokens):
        res = sample(
            np.asarray(logits),
            params,
            prompt_tokens=[prompt_ids],
            output_tokens=[out],
            step=i,
        )
        t = int(res.tokens[0])
        out.append(t)
        lps.append(float(res.logprobs[0]))
        if t == engine.tokenizer.eos_id:
            break
        pos = jnp.asarray([len(prompt_ids) + i], jnp.int32)
        logits, cache = model.decode(jnp.asarray([t], jnp.int32), pos, cache)
    return out, lps


PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=12),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.3, max_tokens=12),
    SamplingParams(
        temperature=1.3,
        min_p=0.05,
        top_a=0.1,
        frequency_penalty=0.7,
        presence_penalty=0.4,
        logit_bias={"11": 3.0, "42": -100},
        max_tokens=9,
    ),
]


def test_loop_equals_host_loop(engine):
    """Every row of one on-device batch equals the token-by-token host reference."""
    prompts = ["Hello there", "The quick brown fox jumps", "1 2 3"]
    params = [
        SamplingParams(**{**p.__dict__, "seed": 100 + i, "logprobs": True})
        for i, p in enumerate(PARAMS)
    ]
    got = engine.generate(prompts, params)
    for prompt, p, c in zip(prompts, params, got):
        ids = engine.tokenizer.encode(prompt)
        ref, ref_lps = host_loop(engine, ids, p, p.max_tokens, p.seed)
        assert c.token_ids == ref
        np.testing.assert_allclose(
            [e["logprob"] for e in c.logprobs], ref_lps[: len(c.logprobs)], rtol=1e-4, atol=1e-4
        )


def test_rows_stop_on_their_own(engine):
    eos = engine.tokenizer.eos_id
    params = [
        SamplingParams(max_tokens=3, seed=1, logit_bias={str(eos): -100}),
        SamplingParams(max_tokens=7, seed=2, logit_bias={str(eos): -100}),
        SamplingParams(max_tokens=20, seed=3, logit_bias={str(eos): 100}),
    ]
    got = engine.generate(["a", "b", "c"], params)
    assert [c.completion_tokens for c in got] == [3, 7, 1]
    assert [c.finish_reason for c in got] == ["length", "length", "stop"]
    assert got[2].token_ids == [eos] and got[2].text == ""


def test_same_tokens_alone_and_in_any_batch_position(engine):
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=10)
    other = SamplingParams(temperature=0.5, top_k=5, seed=9, max_tokens=4)
    alone = engine.generate(["Once upon a time"], target)[0].token_ids
    again = engine.generate(["Once upon a time"], target)[0].token_ids
    assert alone == again
    for pos in range(3):
        prompts = ["x y z", "a much longer prompt than the others, with many tokens in it"]
        plist = [other, other]
        prompts.insert(pos, "Once upon a time")
        plist.insert(pos, target)
        got = engine.generate(prompts, plist)
        assert got[pos].token_ids == alone


def test_seedless_rows_follow_the_job_seed(engine):
    p = SamplingParams(temperature=1.0, max_tokens=6)
    a = engine.generate(["hi", "hi"], p, job_seed=5)
    b = engine.generate(["hi", "hi"], p, job_seed=5)
    c = engine.generate(["hi", "hi"], p, job_seed=6)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert a[0].seed != a[1].seed and a[0].seed == b[0].seed and a[0].seed != c[0].seed


def test_values_never_recompile(engine):
    base = dict(max_tokens=5, logprobs=True, top_logprobs=3)
    engine.generate(["one", "two"], [SamplingParams(seed=1, **base)] * 2)
    before = compile_count()
    engine.generate(
        ["three", "four"],
        [
            SamplingParams(
                temperature=0.3,
                top_p=0.5,
                top_k=3,
                min_p=0.1,
                top_a=0.2,
                seed=4,
                repetition_penalty=1.5,
                frequency_penalty=1,
                presence_penalty=-1,
                logit_bias={"5": 2.0},
                response_format={"type": "json_object"},
                **base,
            ),
            SamplingParams(temperature=0.0, seed=5, stop=["e"], **base),
        ],
    )
    assert compile_count() == before


def test_stop_strings_cut_the_text(engine):
    # two one-byte tokens "x" and "y" get +100 so the row writes a random x/y string; the
    # stop string "xy" then spans two tokens
    tok = engine.tokenizer
    x, y = tok.encode("x"), tok.encode("y")
    assert len(x) == len(y) == 1
    bias = {str(x[0]): 100.0, str(y[0]): 100.0}
    p = SamplingParams(
        temperature=1.0, seed=3, max_tokens=30, logit_bias=bias, stop=["xy"], logprobs=True
    )
    c = engine.generate(["go"], p)[0]
    full = b"".join(tok.token_bytes[t] for t in c.token_ids)
    assert b"xy" in full
    assert c.finish_reason == "stop"
    cut = full.index(b"xy")
    assert c.text.encode() == full[:cut]
    # the row stopped at the step whose token completed the stop string, not later
    assert cut + 2 == len(full)
    # logprobs cover the tokens of the returned text only (one byte each here)
    assert len(c.logprobs) == cut


def test_json_mode_rows_beside_plain_rows(engine):
    params = [
        SamplingParams(response_format={"type": "json_object"}, seed=s, max_tokens=40)
        for s in range(3)
    ] + [SamplingParams(seed=11, max_tokens=8)]
    got = engine.generate(["{", "a", "b", "c"], params)
    for c in got[:3]:
        assert isinstance(json.loads(c.text), dict), c.text
    assert got[3].completion_tokens == 8 or got[3].finish_reason == "stop"


def test_context_overflow_is_refused_before_work(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(["hello"], SamplingParams(max_tokens=10_000), strict=True)
    assert err.value.field == "max_tokens"
    res = engine.generate(
        ["hello", "hello"],
        [SamplingParams(max_tokens=10_000), SamplingParams(max_tokens=2, seed=0)],
    )
    assert res[0].error is not None and res[0].error.field == "max_tokens"
    assert res[1].error is None and res[1].completion_tokens >= 1


def test_chat_completions_one_bad_request_fails_alone(engine):
    good = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 2,
    }
    bad = {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}
    out = engine.chat_completions([good, bad, good])
    assert out[1]["error"]["param"] == "temperature"
    for r in (out[0], out[2]):
        assert r["object"] == "chat.completion"
        ch = r["choices"][0]
        assert ch["finish_reason"] in ("stop", "length")
        assert (
            r["usage"]["completion_tokens"] == len(ch["logprobs"]["content"])
            or ch["finish_reason"] == "stop"
        )
        for e in ch["logprobs"]["content"]:
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
            assert len(e["top_logprobs"]) == 2
            assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
    assert out[0]["choices"][0]["message"] == out[2]["choices"][0]["message"]
