"""Every response shape, parsed as a strict client would: strict JSON, then the openai client's
own response models (``openai.types.chat.ChatCompletion``; ``openai`` is a test dependency).

One table of request bodies (plain, greedy, logprobs raw and processed with top_logprobs 0, 1
and 20, special tokens, JSON mode, stop, n > 1, no seed, text parts, and error rows) runs
through ``Engine.chat_completions`` in one call on the small random model, and again on the
same model with NaN weights (no token is ever allowed: every shape also as a
``content_filter`` row). The compiled loop is shared by both calls.
"""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from jaxsample import cli
from jaxsample.api import NO_PROBABILITY, Engine, choice_seed
from jaxsample.params import derive_seed
from tests.small_engine import SYSTEM, nan_engine, small_engine

M = [SYSTEM, {"role": "user", "content": "Tell me a story."}]
LP = {"logprobs": True}
PROC = {"logprobs": True, "logprobs_mode": "processed"}
IM_START, IM_END = 1, 2

GOOD = {
    "plain": {},
    "greedy": {"temperature": 0},
    "raw_top0": {**LP},
    "raw_top1": {**LP, "top_logprobs": 1},
    "raw_top20": {**LP, "top_logprobs": 20},
    "processed_top0": {**PROC},
    "processed_top1": {**PROC, "top_logprobs": 1},
    "processed_top20_top_k3": {**PROC, "top_logprobs": 20, "top_k": 3},
    "processed_greedy_top20": {**PROC, "top_logprobs": 20, "temperature": 0},
    "special_tokens": {
        **PROC,
        "top_logprobs": 3,
        "logit_bias": {str(IM_START): 100, str(IM_END): 98},
    },
    "json_mode": {"response_format": {"type": "json_object"}, **LP, "top_logprobs": 2},
    "stop": {"stop": ["e", "o"], **LP, "top_logprobs": 2},
    "n3": {"n": 3, **LP, "top_logprobs": 2},
    "no_seed": {"seed": None, "max_completion_tokens": 8},
    "text_parts": {
        "messages": [
            SYSTEM,
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Tell me"},
                    {"type": "text", "text": "a story."},
                ],
            },
        ]
    },
}

BAD = {  # name: (body changes, the field the error names)
    "bad_temperature": ({"temperature": 3}, "temperature"),
    "image_part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "messages",
    ),
    "json_and_stop": ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    "tools": ({"tools": [{"type": "function"}]}, "tools"),
    "tool_role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    "n_zero": ({"n": 0}, "n"),
    "too_long": ({"max_tokens": 10_000}, "max_tokens"),
}

NAMES = list(GOOD) + list(BAD)


def body(name: str) -> dict:
    changes = GOOD[name] if name in GOOD else BAD[name][0]
    b = {"model": "tiny-random", "messages": M, "max_tokens": 8, "seed": 100 + NAMES.index(name)}
    b.update(changes)
    return {k: v for k, v in b.items() if v is not None}


def reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_roundtrip(response: dict) -> dict:
    """What a strict client reads: written without NaN/Infinity, parsed refusing them."""
    text = json.dumps(response, allow_nan=False)
    return json.loads(text, parse_constant=reject_constant)


@pytest.fixture(scope="module")
def engine():
    return small_engine()


@pytest.fixture(scope="module")
def responses(engine):
    """{(engine kind, case name): the parsed response}, one batched call per engine."""
    bodies = [body(n) for n in NAMES]
    out = {}
    for kind, eng in (("random", engine), ("nan", nan_engine(engine))):
        for name, r in zip(NAMES, eng.chat_completions(bodies, job_seed=3)):
            out[kind, name] = strict_roundtrip(r)
    return out


CASES = [(k, n) for k in ("random", "nan") for n in NAMES]


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_every_response_is_strict_json_and_openai_valid(engine, responses, kind, name):
    r = responses[kind, name]
    if name in BAD:
        err = ErrorObject.model_validate(r["error"])
        assert err.type == "invalid_request_error"
        assert err.param == BAD[name][1]
        assert set(r) == {"error"}
        return
    cc = ChatCompletion.model_validate(r)
    b = body(name)
    n = b.get("n", 1)
    assert [c.index for c in cc.choices] == list(range(n))
    prompt = engine.tokenizer.encode(engine.render(b["messages"]))
    assert cc.usage.prompt_tokens == len(prompt)
    assert cc.usage.total_tokens == cc.usage.prompt_tokens + cc.usage.completion_tokens
    seed = b.get("seed", derive_seed(3, NAMES.index(name)))
    assert r["seed"] == seed
    for c in cc.choices:
        if kind == "nan":  # no token is ever allowed: its own finish reason, not "stop"
            assert c.finish_reason == "content_filter"
            assert r["choices"][c.index]["native_finish_reason"] == "no_token_allowed"
            assert c.message.content == "" and cc.usage.completion_tokens == 0
        else:
            assert c.finish_reason in ("stop", "length")
        if not b.get("logprobs"):
            assert c.logprobs is None
            continue
        check_logprobs(engine, b, c)


def check_logprobs(engine, b, choice):
    tok = engine.tokenizer
    n_top = b.get("top_logprobs", 0)
    shown = b""
    for e in choice.logprobs.content:
        assert len(e.top_logprobs) == n_top
        assert e.logprob <= 0.0
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        for t in [e, *e.top_logprobs]:
            assert math.isfinite(t.logprob) and t.logprob <= 0.0
            assert bytes(t.bytes).decode("utf-8", "replace") == t.token
            assert t.token != ""  # every token has a text, special ones included
        specials = {tok.id_to_token(i) for i in tok.special_ids}
        if e.token not in specials:
            shown += bytes(e.bytes)
    content = choice.message.content.encode()
    # the entries' bytes spell the text (a stop string's straddling token may run past it)
    if b.get("stop"):
        assert shown.startswith(content)
    elif "\ufffd" not in choice.message.content:
        assert shown == content


def test_processed_top_logprobs_write_no_probability_as_minus_9999(responses):
    """top_k = 3: three tokens share the whole probability, the other 17 have none."""
    for e in responses["random", "processed_top20_top_k3"]["choices"][0]["logprobs"]["content"]:
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert all(lp > NO_PROBABILITY for lp in lps[:3])
        assert lps[3:] == [NO_PROBABILITY] * 17
        assert math.isclose(sum(math.exp(lp) for lp in lps[:3]), 1.0, rel_tol=1e-4)
        assert len({t["token"] for t in e["top_logprobs"]}) == 20
    for e in responses["random", "processed_greedy_top20"]["choices"][0]["logprobs"]["content"]:
        assert e["logprob"] == 0.0 and e["top_logprobs"][0]["token"] == e["token"]
        assert [t["logprob"] for t in e["top_logprobs"]] == [0.0] + [NO_PROBABILITY] * 19


def test_special_tokens_show_their_text(engine, responses):
    r = responses["random", "special_tokens"]
    content = r["choices"][0]["logprobs"]["content"]
    assert content, r  # <|im_start|> (+100) is drawn before <|im_end|> (+98) ends the row
    start = {"token": "<|im_start|>", "bytes": list(b"<|im_start|>")}
    end = {"token": "<|im_end|>", "bytes": list(b"<|im_end|>")}
    for e in content:
        assert {k: e[k] for k in ("token", "bytes")} == start
        tops = [{k: t[k] for k in ("token", "bytes")} for t in e["top_logprobs"]]
        assert tops[:2] == [start, end]
    # special tokens add nothing to the text
    assert r["choices"][0]["message"]["content"] == ""
    assert engine.tokenizer.id_to_token(IM_END) == "<|im_end|>"


def test_json_mode_content_is_json(responses):
    json.loads(responses["random", "json_mode"]["choices"][0]["message"]["content"])


def test_n_choices_are_the_request_sent_n_times(engine, responses):
    """Choice i of the n=3 row equals the same request with n=1 and seed choice_seed(s, i)."""
    r = responses["random", "n3"]
    b = body("n3")
    singles = engine.chat_completions(
        [{**b, "n": 1, "seed": choice_seed(b["seed"], i)} for i in range(3)]
    )
    for i, single in enumerate(singles):
        got, want = r["choices"][i], single["choices"][0]
        assert got["message"] == want["message"] and got["logprobs"] == want["logprobs"]
    assert singles[0]["seed"] == r["seed"] == b["seed"]
    assert len({c["message"]["content"] for c in r["choices"]}) == 3
    usage = sum(s["usage"]["completion_tokens"] for s in singles)
    assert r["usage"]["completion_tokens"] == usage


def test_cli_writes_strict_json(engine, monkeypatch, capsys):
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    b = body("processed_top20_top_k3")
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(b)))
    assert cli.main(["generate", "--request", "-", "--no-compile-cache"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=reject_constant)
    ChatCompletion.model_validate(out)
    assert out["choices"][0]["logprobs"]["content"][0]["top_logprobs"][-1]["logprob"] == -9999.0
    with pytest.raises(ValueError):
        cli._dumps({"logprob": float("-inf")})


@pytest.mark.real_model
def test_real_model_response_is_strict_and_openai_valid():
    from jaxsample.api import default_engine

    b = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "n": 2,
        "seed": 1,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 5,
        "logprobs_mode": "processed",
        "top_k": 3,
    }
    r = strict_roundtrip(default_engine().chat_completion(b))
    cc = ChatCompletion.model_validate(r)
    assert len(cc.choices) == 2
    for c in cc.choices:
        assert c.finish_reason in ("stop", "length")
        for e in c.logprobs.content:
            lps = [t.logprob for t in e.top_logprobs]
            assert lps[3:] == [NO_PROBABILITY] * 2 and all(lp > NO_PROBABILITY for lp in lps[:3])
