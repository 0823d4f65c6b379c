"""Tests of jaxsample/params.py: request validation, model checks, seeds and row packing."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsample
from jaxsample import (
    LOGIT_BIAS_MAX,
    STOP_MAX_BYTES,
    InvalidRequestError,
    SamplingParams,
    check_for_model,
    derive_seed,
    pack_rows,
)
from jaxsample.params import seed_words

NAN = float("nan")
INF = float("inf")
BASE = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}

# (extra body fields, the field the error must name, a text the message must contain)
INVALID = [
    ({"temperature": 2.5}, "temperature", "2.5"),
    ({"temperature": -0.1}, "temperature", "-0.1"),
    ({"temperature": "0.7"}, "temperature", "'0.7'"),
    ({"temperature": True}, "temperature", "True"),
    ({"temperature": NAN}, "temperature", "nan"),
    ({"temperature": INF}, "temperature", "inf"),
    ({"temperature": 10**400}, "temperature", "1000000"),
    ({"top_p": 1.5}, "top_p", "1.5"),
    ({"top_p": -0.01}, "top_p", "-0.01"),
    ({"top_p": NAN}, "top_p", "nan"),
    ({"top_p": False}, "top_p", "False"),
    ({"top_k": -1}, "top_k", "-1"),
    ({"top_k": 2.0}, "top_k", "2.0"),
    ({"top_k": True}, "top_k", "True"),
    ({"top_k": "5"}, "top_k", "'5'"),
    ({"frequency_penalty": 2.1}, "frequency_penalty", "2.1"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "-2.5"),
    ({"frequency_penalty": -INF}, "frequency_penalty", "-inf"),
    ({"presence_penalty": 3}, "presence_penalty", "3"),
    ({"presence_penalty": [0.5]}, "presence_penalty", "[0.5]"),
    ({"presence_penalty": NAN}, "presence_penalty", "nan"),
    ({"repetition_penalty": 2.01}, "repetition_penalty", "2.01"),
    ({"repetition_penalty": -1}, "repetition_penalty", "-1"),
    ({"repetition_penalty": True}, "repetition_penalty", "True"),
    ({"min_p": 1.1}, "min_p", "1.1"),
    ({"min_p": True}, "min_p", "True"),
    ({"top_a": 1.5}, "top_a", "1.5"),
    ({"top_a": NAN}, "top_a", "nan"),
    ({"top_a": {"x": 1}}, "top_a", "{'x': 1}"),
    ({"seed": 2**63}, "seed", str(2**63)),
    ({"seed": -(2**63) - 1}, "seed", str(-(2**63) - 1)),
    ({"seed": 1.5}, "seed", "1.5"),
    ({"seed": "42"}, "seed", "'42'"),
    ({"seed": True}, "seed", "True"),
    ({"max_tokens": 0}, "max_tokens", "0"),
    ({"max_tokens": -5}, "max_tokens", "-5"),
    ({"max_tokens": 10.0}, "max_tokens", "10.0"),
    ({"max_tokens": True}, "max_tokens", "True"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "0"),
    ({"max_completion_tokens": "9"}, "max_completion_tokens", "'9'"),
    ({"max_tokens": 10, "max_completion_tokens": 20}, "max_completion_tokens", "20"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias", "'1.5'"),
    ({"logit_bias": {" 3": 1}}, "logit_bias", "' 3'"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "'-3'"),
    ({"logit_bias": {-3: 1}}, "logit_bias", "-3"),
    ({"logit_bias": {"+3": 1}}, "logit_bias", "'+3'"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc'"),
    ({"logit_bias": {"\u0663": 1}}, "logit_bias", "'\u0663'"),  # Arabic-Indic digit 3
    ({"logit_bias": {True: 1}}, "logit_bias", "True"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "{'5': 101}"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias", "{'5': -100.5}"),
    ({"logit_bias": {"5": NAN}}, "logit_bias", "{'5': nan}"),
    ({"logit_bias": {"5": INF}}, "logit_bias", "{'5': inf}"),
    ({"logit_bias": {"5": True}}, "logit_bias", "{'5': True}"),
    ({"logit_bias": {"5": "1"}}, "logit_bias", "{'5': '1'}"),
    ({"logit_bias": [[5, 1]]}, "logit_bias", "[[5, 1]]"),
    ({"logit_bias": {str(i): 1 for i in range(LOGIT_BIAS_MAX + 1)}}, "logit_bias", "1025 entries"),
    ({"logit_bias": {"7": 1, "07": 2}}, "logit_bias", "'07'"),
    ({"logprobs": "true"}, "logprobs", "'true'"),
    ({"logprobs": 1}, "logprobs", "1"),
    ({"top_logprobs": 3}, "top_logprobs", "3"),
    ({"top_logprobs": 3, "logprobs": False}, "top_logprobs", "3"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "21"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs", "-1"),
    ({"top_logprobs": 2.0, "logprobs": True}, "top_logprobs", "2.0"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema.schema",
        "missing",
    ),
    ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
    ({"response_format": {"type": 1}}, "response_format", "{'type': 1}"),
    ({"response_format": "json_object"}, "response_format", "'json_object'"),
    ({"response_format": {}}, "response_format", "{}"),
    ({"response_format": {"type": "json_object", "x": 1}}, "response_format", "'x': 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "'e'"),
    ({"stop": ""}, "stop", "''"),
    ({"stop": ["ok", ""]}, "stop", "''"),
    ({"stop": "x" * (STOP_MAX_BYTES + 1)}, "stop", "x" * (STOP_MAX_BYTES + 1)),
    ({"stop": "\u00e9" * 33}, "stop", "\u00e9" * 33),  # 33 characters, 66 bytes
    ({"stop": [1]}, "stop", "1"),
    ({"stop": 5}, "stop", "5"),
    ({"stop": "\ud800"}, "stop", "\\ud800"),
    ({"logprobs_mode": "best"}, "logprobs_mode", "'best'"),
    ({"logprobs_mode": 1}, "logprobs_mode", "1"),
    ({"temprature": 0.5}, "temprature", "0.5"),
    ({"tools": [{"type": "function"}]}, "tools", "'function'"),
    ({"tool_choice": "auto"}, "tool_choice", "'auto'"),
    ({"echo": True}, "echo", "True"),
    ({"stream": True}, "stream", "True"),
    ({"stream": "no"}, "stream", "'no'"),
    ({"n": 0}, "n", "0"),
    ({"n": 129}, "n", "129"),
    ({"store": True}, "store", "True"),
    ({"response_format": {"type": "json_object"}, "stop": ["{"]}, "stop", "'{'"),
    ({"n": True}, "n", "True"),
    ({"n": 1.0}, "n", "1.0"),
    # more digits than int() converts or repr() shows (Python's limit is 4300): refused,
    # named, not a ValueError from the message itself
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias", "'9999"),
    ({"temperature": 10**5000}, "temperature", "<int of 16610 bits>"),
    ({"top_k": -(10**5000)}, "top_k", "<negative int of 16610 bits>"),
    ({"seed": 10**5000}, "seed", "<int of 16610 bits>"),
    # arrays (a sweep over jnp.linspace) are refused saying how to pass them, not converted
    (
        {"temperature": jnp.float32(0.5)},
        "temperature",
        "of shape (), not a Python number: pass float(x)",
    ),
    ({"top_p": np.array(0.5)}, "top_p", "of shape (), not a Python number: pass float(x)"),
    ({"top_k": jnp.int32(5)}, "top_k", "of shape (), not a Python number: pass int(x)"),
    ({"min_p": np.array([0.1])}, "min_p", "of shape (1,)"),
    ({"logit_bias": {"5": 10**5000}}, "logit_bias", "<dict holding an int too large to show>"),
    ({"transform_params": {"t": {"x": NAN}}}, "transform_params", "{'t': {'x': nan}}"),
    ({"transform_params": {"t": {"x": True}}}, "transform_params", "{'t': {'x': True}}"),
    ({"transform_params": {"t": {"x": "1"}}}, "transform_params", "{'t': {'x': '1'}}"),
    ({"transform_params": {"t": 1}}, "transform_params", "{'t': 1}"),
    ({"transform_params": [["t", {"x": 1}]]}, "transform_params", "[['t', {'x': 1}]]"),
]


def _ids(case):
    extra = case[0]

    def show(v):
        try:
            return str(v)[:20]
        except ValueError:  # an int too large for str()
            return "<huge>"

    return ",".join(f"{k}={show(v)}" for k, v in extra.items())


def test_battery_is_large():
    assert len(INVALID) >= 40


@pytest.mark.parametrize("extra, field, text", INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_request(extra, field, text):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request({**BASE, **extra})
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    message = str(err)
    assert message.startswith("invalid request: ")
    assert repr(field) in message
    assert text in message
    assert "allowed: " in message and err.allowed in message


@pytest.mark.parametrize("body", [None, [], "temperature=1", 3])
def test_body_not_a_dict(body):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request(body)
    assert info.value.field == "body"
    assert repr(body) in str(info.value)


def test_unknown_field_suggests_the_close_name():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request({"temprature": 0.5})
    assert "did you mean 'temperature'" in str(info.value)


def test_constructor_names_an_unknown_keyword_with_a_hint():
    """SamplingParams(n=4), (temprature=0.5), (max_new_tokens=...) raised a bare TypeError;
    a keyword from vLLM / transformers / OpenAI is an InvalidRequestError naming it, with
    what to do instead, and every keyword it knows still works (replace, pickle)."""
    cases = [
        ({"temprature": 0.5}, "did you mean 'temperature'?"),
        ({"n": 4}, "choice_seed"),
        ({"max_new_tokens": 8}, "max_tokens"),
        ({"max_completion_tokens": 8}, "max_tokens"),
        ({"stop_token_ids": [2]}, "stop=[text]"),
    ]
    for kwargs, says in cases:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(top_p=0.5, **kwargs)
        [name] = kwargs
        assert info.value.field == name and info.value.value == kwargs[name]
        assert says in str(info.value) and "top_logprobs" in info.value.allowed
    default = SamplingParams()
    fields = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    p = SamplingParams(**fields)
    assert p == SamplingParams() and SamplingParams(0.5, 0.9).top_p == 0.9
    assert dataclasses.replace(SamplingParams(stop="x"), top_k=3).top_k == 3


def test_error_message_format_and_index():
    err = InvalidRequestError("top_p", 1.5, "a number in [0.0, 1.0]")
    assert str(err) == "invalid request: 'top_p' = 1.5; allowed: a number in [0.0, 1.0]"
    assert err.index is None
    err.index = 3
    assert str(err) == (
        "invalid request (request 3): 'top_p' = 1.5; allowed: a number in [0.0, 1.0]"
    )


def test_constructor_refuses_like_from_request():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(top_k=-2)
    assert info.value.field == "top_k"
    with pytest.raises(InvalidRequestError):
        dataclasses.replace(SamplingParams(), temperature=3.0)


def test_transform_params_given_twice_are_refused_not_resolved():
    """The pairs form (the stored form, also taken by the constructor) can name a transform
    or a parameter twice: refused, naming it, never the last one silently."""
    cases = [
        ([("t", {"x": 1.0}), ("t", {"x": 2.0})], "'t'", "transform given twice"),
        ([("t", [("x", 1.0), ("x", 2.0)])], "{'t': {'x': 2.0}}", "parameter given twice"),
    ]
    for value, shown, reason in cases:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(transform_params=value)
        assert info.value.field == "transform_params"
        assert shown in str(info.value) and reason in str(info.value)
    # the stored form round-trips (dataclasses.replace validates it again)
    p = SamplingParams(transform_params={"t": {"y": 2, "x": 1.5}, "a": {}})
    assert p.transform_params == (("a", ()), ("t", (("x", 1.5), ("y", 2.0))))
    assert dataclasses.replace(p, top_p=0.5).transform_params == p.transform_params


# ----------------------------------------------------------------------------- valid requests


def test_defaults():
    p = SamplingParams.from_request(dict(BASE))
    assert p == SamplingParams()
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.min_p, p.top_a, p.seed, p.max_tokens) == (0.0, 0.0, None, None)
    assert (p.logit_bias, p.logprobs, p.top_logprobs) == ((), False, 0)
    assert (p.response_format, p.stop, p.logprobs_mode) == ("text", (), "raw")


def test_full_request_round_trip():
    body = {
        **BASE,
        "user": "u1",
        "metadata": {"k": "v"},
        "prompt": None,
        "stream": False,
        "n": 1,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "frequency_penalty": -1.5,
        "presence_penalty": 2,
        "repetition_penalty": 0,
        "min_p": 0.05,
        "top_a": 1,
        "seed": -(2**63),
        "max_completion_tokens": 17,
        "logit_bias": {"50256": -100, 7: 100, "0": 0.5},
        "logprobs": True,
        "top_logprobs": 20,
        "response_format": {"type": "text"},
        "stop": ["\n\n", "END"],
        "logprobs_mode": "processed",
    }
    p = SamplingParams.from_request(body)
    assert p.temperature == 0.3 and p.top_p == 0.9 and p.top_k == 40
    assert p.frequency_penalty == -1.5 and p.presence_penalty == 2.0
    assert p.repetition_penalty == 0.0 and p.min_p == 0.05 and p.top_a == 1.0
    assert p.seed == -(2**63) and p.max_tokens == 17
    assert p.logit_bias == ((0, 0.5), (7, 100.0), (50256, -100.0))
    assert p.logit_bias_dict == {0: 0.5, 7: 100.0, 50256: -100.0}
    assert p.logprobs is True and p.top_logprobs == 20
    assert p.response_format == "text"
    assert p.stop == ("\n\n", "END")
    assert p.logprobs_mode == "processed"
    assert isinstance(p.presence_penalty, float) and isinstance(p.top_a, float)
    # immutable, hashable, and replace() revalidates from the stored forms
    assert hash(p) == hash(dataclasses.replace(p))
    assert dataclasses.replace(p, top_k=1).logit_bias == p.logit_bias
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0


def test_nulls_mean_defaults():
    # json_schema is stored from response_format, not a request field
    names = [f.name for f in dataclasses.fields(SamplingParams) if f.name != "json_schema"]
    body = {**BASE, **{name: None for name in names}, "max_completion_tokens": None}
    assert SamplingParams.from_request(body) == SamplingParams()


def test_max_tokens_aliases():
    assert SamplingParams.from_request({"max_completion_tokens": 5}).max_tokens == 5
    assert (
        SamplingParams.from_request({"max_tokens": 5, "max_completion_tokens": 5}).max_tokens == 5
    )
    assert SamplingParams.from_request({"max_tokens": 6}).max_tokens == 6


def test_stop_forms_and_byte_limit():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop=[]).stop == ()
    longest = "\u00e9" * (STOP_MAX_BYTES // 2)  # exactly STOP_MAX_BYTES bytes
    assert SamplingParams(stop=[longest, "a", "b", "c"]).stop == (longest, "a", "b", "c")


def test_response_format_forms():
    assert SamplingParams(response_format={"type": "text"}).response_format == "text"
    assert SamplingParams(response_format="json_object").response_format == "json_object"
    assert SamplingParams(response_format=None).response_format == "text"


def test_logit_bias_capacity_exactly_full_is_accepted():
    bias = {str(i): (i % 201) - 100 for i in range(LOGIT_BIAS_MAX)}
    p = SamplingParams.from_request({"logit_bias": bias})
    assert len(p.logit_bias) == LOGIT_BIAS_MAX
    assert p.logit_bias_dict == {int(k): float(v) for k, v in bias.items()}


def test_numpy_scalars_are_numbers():
    p = SamplingParams(temperature=np.float64(0.25), top_k=np.int64(3), seed=np.int32(-4))
    assert (p.temperature, p.top_k, p.seed) == (0.25, 3, -4)
    assert type(p.top_k) is int and type(p.seed) is int
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=np.bool_(True))


_FLOAT_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.0, 2.0),
    "min_p": (0.0, 1.0),
    "top_a": (0.0, 1.0),
}


def _in_range(lo, hi):
    return st.one_of(st.floats(lo, hi, allow_nan=False), st.integers(math.ceil(lo), math.floor(hi)))


_bias_entry_key = st.one_of(st.integers(0, 2**40), st.integers(0, 10**6).map(str))


@settings(max_examples=150, deadline=None)
@given(
    floats=st.fixed_dictionaries({k: _in_range(*r) for k, r in _FLOAT_RANGES.items()}),
    top_k=st.integers(0, 2**70),
    seed=st.integers(-(2**63), 2**63 - 1),
    max_tokens=st.integers(1, 2**40),
    bias=st.dictionaries(_bias_entry_key, _in_range(-100.0, 100.0), max_size=8),
    top_logprobs=st.integers(0, 20),
    stop=st.lists(
        st.text(min_size=1, max_size=16).filter(lambda s: len(s.encode("utf-8", "replace")) <= 64),
        max_size=4,
    ).filter(lambda xs: all(not any(0xD800 <= ord(c) <= 0xDFFF for c in s) for s in xs)),
    json=st.booleans(),
)
def test_any_in_range_value_is_kept_exactly(
    floats, top_k, seed, max_tokens, bias, top_logprobs, stop, json
):
    # drop keys that collide as token ids (e.g. 5 and "5"); duplicates are refused by design
    seen, clean = set(), {}
    for k, v in bias.items():
        if int(k) not in seen:
            seen.add(int(k))
            clean[k] = v
    body = {
        **BASE,
        **floats,
        "top_k": top_k,
        "seed": seed,
        "max_tokens": max_tokens,
        "logit_bias": clean,
        "logprobs": True,
        "top_logprobs": top_logprobs,
        "stop": [] if json else stop,  # stop strings with JSON mode are refused
        "response_format": {"type": "json_object" if json else "text"},
    }
    p = SamplingParams.from_request(body)
    for name, value in floats.items():
        got = getattr(p, name)
        assert type(got) is float and got == value
    assert (p.top_k, p.seed, p.max_tokens, p.top_logprobs) == (
        top_k,
        seed,
        max_tokens,
        top_logprobs,
    )
    assert p.logit_bias == tuple(sorted((int(k), float(v)) for k, v in clean.items()))
    assert p.stop == (() if json else tuple(stop))
    assert p.response_format == ("json_object" if json else "text")


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(_FLOAT_RANGES)), data=st.data())
def test_any_out_of_range_float_is_refused(name, data):
    lo, hi = _FLOAT_RANGES[name]
    value = data.draw(
        st.one_of(
            st.floats(max_value=lo, exclude_max=True, allow_nan=False),
            st.floats(min_value=hi, exclude_min=True, allow_nan=False),
        )
    )
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request({name: value})
    assert info.value.field == name and repr(value) in str(info.value)


@pytest.mark.parametrize("field", sorted(_FLOAT_RANGES))
def test_float_bounds_are_inclusive(field):
    """Both bounds and the middle are kept, through the constructor and a request body; the
    next float outside either bound, NaN, a bool and a string are refused naming the field."""
    lo, hi = _FLOAT_RANGES[field]
    for v in (lo, hi, (lo + hi) / 2):
        assert getattr(SamplingParams(**{field: v}), field) == v
        assert getattr(SamplingParams.from_request({field: v}), field) == v
    for v in (np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf), float("nan"), True, "1"):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**{field: v})
        assert err.value.field == field


# ----------------------------------------------------------------------------- model checks


def test_check_for_model():
    p = SamplingParams(logit_bias={99: 1.0})
    assert check_for_model(p, vocab_size=100, context_length=50, prompt_length=8) == 42
    with pytest.raises(InvalidRequestError) as info:
        check_for_model(p, vocab_size=99, context_length=50, prompt_length=8)
    assert info.value.field == "logit_bias" and "99" in str(info.value)

    for prompt_length in (50, 51):
        with pytest.raises(InvalidRequestError) as info:
            check_for_model(
                SamplingParams(), vocab_size=10, context_length=50, prompt_length=prompt_length
            )
        assert info.value.field == "messages" and str(prompt_length) in str(info.value)
    assert (
        check_for_model(SamplingParams(), vocab_size=10, context_length=50, prompt_length=49) == 1
    )

    room = 50 - 8
    assert (
        check_for_model(
            SamplingParams(max_tokens=room), vocab_size=10, context_length=50, prompt_length=8
        )
        == room
    )
    with pytest.raises(InvalidRequestError) as info:
        check_for_model(
            SamplingParams(max_tokens=room + 1), vocab_size=10, context_length=50, prompt_length=8
        )
    assert info.value.field == "max_tokens"
    assert str(room + 1) in str(info.value) and f"[1, {room}]" in str(info.value)


def test_check_for_model_refuses_what_is_not_a_size():
    """check_for_model (exported) returned 9.5 for context_length=10.5 and took
    vocab_size=True as 1 and a negative prompt length as room beyond the context."""
    ok = {"vocab_size": 10, "context_length": 10, "prompt_length": 1}
    for name, bad in [
        ("vocab_size", True),
        ("vocab_size", 0),
        ("context_length", 10.5),
        ("context_length", 0),
        ("prompt_length", -1),
        ("prompt_length", np.float64(1)),
    ]:
        with pytest.raises(InvalidRequestError) as info:
            check_for_model(SamplingParams(), **{**ok, name: bad})
        assert info.value.field == name
    with pytest.raises(InvalidRequestError) as info:
        check_for_model({"max_tokens": 3}, **ok)
    assert info.value.field == "params"
    assert check_for_model(SamplingParams(), **{**ok, "vocab_size": np.int64(10)}) == 9


def test_derive_seed_takes_a_key_with_a_lone_surrogate():
    """A custom_id may hold a lone surrogate (JSON's "\\ud800" parses to one); deriving its
    seed raised UnicodeEncodeError (a server_error for that request). It now has a seed of
    its own, distinct from every valid string's, and stable."""
    a, b = derive_seed(0, "\ud800"), derive_seed(0, "\udfff")
    assert a == derive_seed(0, "\ud800") and len({a, b, derive_seed(0, "")}) == 3
    assert 0 <= a < 2**53
    # valid strings keep their seeds (the rule a batch job's manifest records): the values
    # the strict UTF-8 encoding gave
    assert derive_seed(7, "request-42") == 2919468626064174
    assert derive_seed(0, "é") == 3138689645921555


# ----------------------------------------------------------------------------- seeds

SEEDS = [0, 1, 2**32 + 5, -1, -(2**63), 2**63 - 1, 2**31, -(2**31) - 1, 123456789012345]


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_words_match_prngkey(seed):
    words = seed_words(seed)
    assert words.dtype == np.uint32 and words.shape == (2,)
    unsigned = seed + 2**64 if seed < 0 else seed  # the two's-complement reference
    assert (int(words[0]) << 32) + int(words[1]) == unsigned
    with jax.enable_x64(True):  # PRNGKey sees the whole 64-bit seed only with x64 on
        expected = np.asarray(jax.random.PRNGKey(seed))
        key = jax.random.wrap_key_data(jnp.asarray(words), impl="threefry2x32")
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(key)), expected)
    # and the same key on the default (32-bit) configuration, built inside jit
    key = jax.jit(lambda w: jax.random.key_data(jax.random.wrap_key_data(w, impl="threefry2x32")))(
        jnp.asarray(words)
    )
    np.testing.assert_array_equal(np.asarray(key), expected)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 1.0, True, "1"])
def test_seed_words_refuses_non_int64(seed):
    with pytest.raises(InvalidRequestError):
        seed_words(seed)


def _derived_reference(job_seed, index):
    with jax.enable_x64(True):
        key = jax.random.fold_in(jax.random.PRNGKey(job_seed), index)
        hi, lo = (int(x) for x in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    return ((hi << 32) | lo) >> 11  # the top 53 bits


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2),
    index=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3),
)
def test_host_threefry_gives_jaxs_bits(words, index):
    """derive_seed's host Threefry (no device call per request) gives exactly JAX's
    ``bits(fold_in(...fold_in(key, i0)...), (2,), uint32)`` for the key's data ``words``."""
    from jaxsample.params import _derived_bits

    key = jax.random.wrap_key_data(jnp.asarray(words, jnp.uint32), impl="threefry2x32")
    for d in index:
        key = jax.random.fold_in(key, jnp.uint32(d))
    expected = tuple(int(x) for x in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    assert _derived_bits(words, index) == expected


def test_derive_seed_makes_no_device_call():
    """A request without a seed costs no device program (on an accelerator it queued behind
    the decoding loop's running chunk): no transfer to or from a device at all."""
    derive_seed(3, "warm")
    with jax.transfer_guard("disallow"):
        seeds = [derive_seed(11, f"r{i}") for i in range(50)] + [derive_seed(11, 7)]
    assert len(set(seeds)) == 51


def test_derive_seed():
    derived = [derive_seed(7, i) for i in range(64)]
    assert derived == [derive_seed(7, i) for i in range(64)]  # deterministic
    assert len(set(derived)) == 64  # distinct across indices
    # JSON-safe: exact as a double (what a JavaScript client reads), and spread over the range
    assert all(0 <= s < 2**53 and int(float(s)) == s for s in derived)
    assert max(derived) > 2**52
    for job, i in [(7, 0), (7, 63), (-1, 5), (2**32 + 7, 3), (2**63 - 1, 2**32 - 1)]:
        assert derive_seed(job, i) == _derived_reference(job, i)
    # the high 32 bits of the job seed matter
    assert derive_seed(7, 0) != derive_seed(2**32 + 7, 0)
    for bad in (-1, 2**32, 1.0):
        with pytest.raises(ValueError):
            derive_seed(0, bad)


# ----------------------------------------------------------------------------- pack_rows


def test_pack_rows():
    params = [
        SamplingParams(),
        SamplingParams(
            temperature=0.0,
            top_k=5,
            top_p=0.5,
            top_a=0.25,
            min_p=0.1,
            repetition_penalty=1.3,
            frequency_penalty=-0.5,
            presence_penalty=0.75,
            logit_bias={"9": -100, 3: 2.5},
            logprobs=True,
            top_logprobs=4,
            logprobs_mode="processed",
        ),
        SamplingParams(top_k=10**9, logit_bias={i: 1.0 for i in range(LOGIT_BIAS_MAX)}),
    ]
    seeds = [0, -1, 2**40 + 3]
    rows = pack_rows(params, vocab_size=LOGIT_BIAS_MAX, seeds=seeds)
    assert isinstance(rows, jaxsample.RowParams)
    expected_dtypes = {
        "temperature": np.float32,
        "top_k": np.int32,
        "top_p": np.float32,
        "top_a": np.float32,
        "min_p": np.float32,
        "repetition_penalty": np.float32,
        "frequency_penalty": np.float32,
        "presence_penalty": np.float32,
        "bias_ids": np.int32,
        "bias_values": np.float32,
        "seed_words": np.uint32,
        "logprobs": np.bool_,
        "top_logprobs": np.int32,
        "processed_logprobs": np.bool_,
    }
    expected_shapes = {
        "bias_ids": (3, LOGIT_BIAS_MAX),
        "bias_values": (3, LOGIT_BIAS_MAX),
        "seed_words": (3, 2),
    }
    assert rows.user == ()  # no user transform chain: no user values
    for f in dataclasses.fields(rows):
        if f.name == "user":
            continue
        leaf = getattr(rows, f.name)
        assert isinstance(leaf, np.ndarray), f.name
        assert leaf.dtype == expected_dtypes[f.name], f.name
        assert leaf.shape == expected_shapes.get(f.name, (3,)), f.name
    for name in (
        "temperature",
        "top_p",
        "top_a",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
    ):
        np.testing.assert_array_equal(
            getattr(rows, name), np.float32([getattr(p, name) for p in params])
        )
    np.testing.assert_array_equal(rows.top_k, [0, 5, LOGIT_BIAS_MAX])  # >= vocab: off either way
    np.testing.assert_array_equal(rows.top_logprobs, [0, 4, 0])
    np.testing.assert_array_equal(rows.processed_logprobs, [False, True, False])
    for i, seed in enumerate(seeds):
        np.testing.assert_array_equal(rows.seed_words[i], seed_words(seed))
    # row 0: all padding; row 1: two entries then padding; row 2: full
    assert not rows.bias_ids[0].any() and not rows.bias_values[0].any()
    np.testing.assert_array_equal(rows.bias_ids[1, :2], [3, 9])
    np.testing.assert_array_equal(rows.bias_values[1, :2], [2.5, -100.0])
    assert not rows.bias_ids[1, 2:].any() and not rows.bias_values[1, 2:].any()
    np.testing.assert_array_equal(rows.bias_ids[2], np.arange(LOGIT_BIAS_MAX))
    np.testing.assert_array_equal(rows.bias_values[2], np.ones(LOGIT_BIAS_MAX))
    # a dense reconstruction of the bias equals the request's map
    dense = np.zeros((3, LOGIT_BIAS_MAX), np.float32)
    for i in range(3):
        np.add.at(dense[i], rows.bias_ids[i], rows.bias_values[i])
    assert dense[1, 3] == 2.5 and dense[1, 9] == -100.0 and np.count_nonzero(dense[1]) == 2


def test_pack_rows_errors():
    with pytest.raises(ValueError):
        pack_rows([SamplingParams()], vocab_size=10, seeds=[])
    with pytest.raises(InvalidRequestError) as info:
        pack_rows(
            [SamplingParams(), SamplingParams(logit_bias={10: 1})], vocab_size=10, seeds=[1, 2]
        )
    assert info.value.field == "logit_bias" and info.value.index == 1
    assert "(request 1)" in str(info.value)


def test_pack_rows_refuses_what_is_not_params_or_a_vocabulary():
    """Not an AttributeError deep inside, nor a vocabulary of 0 or 10.0 tokens packed."""
    cases = [
        (dict(params_list=[SamplingParams(), {"temperature": 1}]), "params", 1),
        (dict(params_list=SamplingParams()), "params", None),
        (dict(vocab_size=0), "vocab_size", None),
        (dict(vocab_size=10.0), "vocab_size", None),
        (dict(vocab_size=True), "vocab_size", None),
        (dict(vocab_size=2**31), "vocab_size", None),
    ]
    for kwargs, field, index in cases:
        args = {"params_list": [SamplingParams()] * 2, "vocab_size": 10, "seeds": [0, 1], **kwargs}
        with pytest.raises(InvalidRequestError) as info:
            pack_rows(**args)
        assert info.value.field == field and info.value.index == index, kwargs
    rows = pack_rows((SamplingParams(top_k=3),), vocab_size=2, seeds=[0])  # any sequence
    assert rows.top_k.tolist() == [2]


def test_pack_rows_empty_batch():
    rows = pack_rows([], vocab_size=10, seeds=[])
    assert rows.temperature.shape == (0,) and rows.bias_ids.shape == (0, LOGIT_BIAS_MAX)


@pytest.mark.parametrize("field", ["temperature", "top_k", "seed", "max_tokens", "min_p"])
def test_booleans_are_named_as_booleans(field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request({field: True})
    assert info.value.field == field and "a boolean is not" in str(info.value)


# ----------------------------------------------------------------------------- fuzzing pass
# (tests/test_fuzz_inputs.py found these; each failed before its fix with another exception)


class _ReprRaises:
    def __repr__(self):
        raise RuntimeError("no repr")


def test_a_value_whose_repr_raises_is_still_refused_by_name():
    """The error message called repr() on the value: a RuntimeError from the object's own
    __repr__ escaped instead of the refusal."""
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(temperature=_ReprRaises())
    assert err.value.field == "temperature" and "<_ReprRaises object>" in str(err.value)


def _schema_format(schema, **extra):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, **extra}}


def test_a_json_schema_nested_too_deeply_is_refused():
    """json.dumps of a schema nested 3000 deep raised RecursionError inside from_request."""
    deep = {}
    inner = deep
    for _ in range(3000):
        inner["type"], inner["items"] = "array", {}
        inner = inner["items"]
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_request({**BASE, "response_format": _schema_format(deep)})
    assert err.value.field == "response_format.json_schema.schema"
    assert "nested too deeply" in str(err.value)


def test_a_json_schema_number_no_double_holds_is_refused():
    """minimum = 10**400 raised OverflowError ("int too large to convert to float") inside the
    schema checks; 2**70 (a double holds it) is still accepted, exactly."""
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(response_format=_schema_format({"type": "integer", "minimum": 10**400}))
    assert err.value.field == "response_format.json_schema.schema" and "too large" in str(err.value)
    p = SamplingParams(response_format=_schema_format({"const": 2**70}))
    assert str(2**70) in p.json_schema


def test_a_json_schema_description_must_be_a_string():
    """description (dropped: it has no effect here) took any value, a number or a lone
    surrogate included; OpenAI takes a string."""
    for bad in (5, ["a"], "\ud800"):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(response_format=_schema_format({"type": "string"}, description=bad))
        assert err.value.field == "response_format.json_schema.description"
    p = SamplingParams(response_format=_schema_format({"type": "string"}, description="a name"))
    assert p.response_format == "json_schema"


def test_a_body_key_that_cannot_be_printed_is_named():
    """An unknown key 10**5000 (str() raises past 4300 digits) raised ValueError."""
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_request({**BASE, 10**5000: 1})
    assert err.value.field.startswith("<int of")


def test_token_ids_past_int64_are_shown_as_given():
    """uint64 ids >= 2**63 were cast to int64 first and reported as negative ids (2**64 - 1
    as -1); Python ints past 64 bits as '<object array>'."""
    from jaxsample.params import token_id_array

    for ids, shown in (
        ([np.uint64(2**64 - 1)], 2**64 - 1),
        ([2**63], 2**63),
        ([2**70], 2**70),
        ([-(2**70)], -(2**70)),
    ):
        with pytest.raises(InvalidRequestError) as err:
            token_id_array("prompt", ids, 5)
        assert err.value.value == shown, (ids, err.value)
    assert token_id_array("prompt", np.array([1, 2], np.uint64), 5).tolist() == [1, 2]


def test_pack_rows_refuses_params_and_seeds_that_are_not_lists():
    """pack_rows(5, ...) and seeds=0 raised TypeError ("not iterable", "has no len"); a 0-d
    array "iteration over a 0-d array"; a bad seed did not say which row."""
    p = SamplingParams()
    for bad in (None, 5, np.array(3), "ab", {}):
        with pytest.raises(InvalidRequestError) as err:
            pack_rows(bad, vocab_size=10, seeds=[0])
        assert err.value.field == "params"
        with pytest.raises(InvalidRequestError) as err:
            pack_rows([p], vocab_size=10, seeds=bad)
        assert err.value.field == "seeds"
    with pytest.raises(InvalidRequestError) as err:
        pack_rows([p, p], vocab_size=10, seeds=[0, 2**64])
    assert err.value.field == "seed" and err.value.index == 1


def test_derive_seed_names_the_job_seed():
    """derive_seed(job_seed, key) named a bad job_seed 'seed' (a request field)."""
    with pytest.raises(InvalidRequestError) as err:
        derive_seed(2**63, 0)
    assert err.value.field == "job_seed"
    with pytest.raises(InvalidRequestError) as err:
        derive_seed(0, -1)
    assert err.value.field == "index"


def test_choice_seed_checks_its_arguments():
    """choice_seed("7", 0) returned "7" and choice_seed(7, 0.0) returned 7 (choice 0 took
    the seed unchecked); choice_seed(7, np.array([1, 2])) raised numpy's ValueError."""
    from jaxsample import choice_seed

    assert choice_seed(7, 0) == 7 and choice_seed(np.int64(7), np.int64(0)) == 7
    for seed, index, field in (
        ("7", 0, "seed"),
        (2**63, 0, "seed"),
        (7, 0.0, "index"),
        (7, True, "index"),
        (7, np.array([1, 2]), "index"),
        (7, -1, "index"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            choice_seed(seed, index)
        assert err.value.field == field, (seed, index)
