"""The generation API's contracts (docs/api.md), on the small random model.

Input normalisation of both entry points, per-request failures (chat templates, content,
JSON mode with stop), the finish reason of "no token allowed", ``n`` choices and seeds, and
the lazy ``stream`` / ``stream_chat``. Strict JSON and the openai client's models are in
tests/test_responses.py.
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample
from jaxsample import InvalidRequestError, SamplingParams, derive_seed
from jaxsample.api import Engine, RequestFailed, choice_seed, normalize_inputs, validate_messages
from jaxsample.decode import RUNNING
from tests.small_engine import ALTERNATE_CHECK, HI, SYSTEM, nan_engine, small_engine, with_template

P = SamplingParams(temperature=1.0, seed=4, max_tokens=6)


@pytest.fixture(scope="module")
def engine():
    return small_engine()


# ---- one input normalisation ----------------------------------------------------------


def test_a_string_is_one_prompt_in_both_entry_points(engine):
    ids = engine.tokenizer.encode("Hi")
    for out in (engine.generate("Hi", P), jaxsample.generate("Hi", P, engine=engine)):
        assert len(out) == 1  # not "H" and "i"
        assert out[0].error is None and out[0].prompt_tokens == len(ids)
    assert engine.generate("Hi", P)[0].token_ids == engine.generate(["Hi"], P)[0].token_ids


def test_a_message_list_is_one_conversation_in_both_entry_points(engine):
    want = engine.generate([HI], P)
    assert want[0].error is None
    assert want[0].prompt_tokens == len(engine.tokenizer.encode(engine.render(HI)))
    for out in (engine.generate(HI, P), jaxsample.generate(HI, P, engine=engine)):
        assert [c.token_ids for c in out] == [want[0].token_ids]


def test_a_list_of_either_is_a_batch(engine):
    out = engine.generate(["Hi", HI, "Hi"], P)
    assert len(out) == 3 and all(c.error is None for c in out)
    assert out[0].token_ids == out[2].token_ids == engine.generate("Hi", P)[0].token_ids
    assert out[1].token_ids == engine.generate(HI, P)[0].token_ids
    assert normalize_inputs(()) == [] and normalize_inputs(iter(["a", "b"])) == ["a", "b"]
    with pytest.raises(InvalidRequestError) as err:
        normalize_inputs(5)
    assert err.value.field == "inputs"


def test_call_arguments_are_refused_once_naming_them(engine):
    """A bad argument of the call itself (params not a SamplingParams, job_seed not an
    int64, inputs as bytes) raises once, naming it, before any request: not one error per
    request blamed on a field the caller never set (a dict was iterated as its keys, a bad
    job_seed reported as each request's 'seed', bytes as one request per byte)."""

    def refused(call, field, says):
        with pytest.raises(InvalidRequestError) as err:
            call()
        assert err.value.field == field and says in str(err.value), str(err.value)

    for params in ({"temperature": 0.5}, {"temperature": 0.5, "seed": 1}):
        refused(lambda p=params: engine.generate("Hi", p), "params", "SamplingParams(**d)")
    refused(lambda: engine.generate("Hi", "greedy"), "params", "str")
    # generate(engine=...) that is not an Engine failed with AttributeError inside
    refused(lambda: jaxsample.generate("Hi", P, engine="tiny"), "engine", "Engine.load")
    for js in (1.5, 2**64, None, True, "0"):
        for call in (
            lambda j=js: engine.generate(["Hi", "Yo"], P, job_seed=j),
            lambda j=js: jaxsample.generate("Hi", P, engine=engine, job_seed=j),
            lambda j=js: list(engine.stream([(0, "Hi", P)], job_seed=j)),
            lambda j=js: list(engine.stream_chat([(0, {"messages": HI})], job_seed=j)),
        ):
            refused(call, "job_seed", repr(js))
    for data in (b"Hi", bytearray(b"Hi")):
        refused(lambda d=data: engine.generate(d, P), "inputs", "Hi")
    # a stream item that is not (key, input, params) stops the stream with what it is
    with pytest.raises(ValueError, match=r"\(key, input, SamplingParams\) tuples; item 1 is"):
        list(engine.stream([(0, "Hi", SamplingParams(max_tokens=1)), ("Hi", P)]))
    # the limits themselves are fine
    for job_seed in (-(2**63), 2**63 - 1, np.int64(3)):
        [c] = engine.generate("Hi", SamplingParams(max_tokens=1), job_seed=job_seed)
        assert c.error is None and c.seed == derive_seed(int(job_seed), 0)


# ---- per-request failures --------------------------------------------------------------


def test_a_raising_chat_template_fails_that_request_alone(engine):
    strict = with_template(engine, ALTERNATE_CHECK + engine.tokenizer.chat_template)
    twice = [SYSTEM, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    out = strict.generate([HI, twice, HI], P)
    assert out[1].finish_reason == "error" and out[1].error.field == "messages"
    assert "roles must alternate" in str(out[1].error)
    assert out[0].token_ids == out[2].token_ids == engine.generate(HI, P)[0].token_ids
    # the same through chat_completions: an OpenAI error object in its place
    bodies = [{"messages": m, "max_tokens": 6, "seed": 4} for m in (HI, twice, HI)]
    res = strict.chat_completions(bodies)
    assert res[1]["error"]["param"] == "messages" and "alternate" in res[1]["error"]["message"]
    assert res[0]["choices"][0]["message"]["content"] == out[0].text


def test_a_model_file_without_a_template_refuses_messages_only(engine):
    bare = with_template(engine, None)
    out = bare.generate([HI, "Hi"], P)
    assert out[0].error.field == "messages" and "no tokenizer.chat_template" in str(out[0].error)
    assert out[1].error is None and out[1].token_ids == engine.generate("Hi", P)[0].token_ids
    with pytest.raises(InvalidRequestError):
        bare.generate(HI, P, strict=True)


@pytest.mark.parametrize(
    "messages,reason",
    [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "input_audio"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "'text'"),
        ([{"role": "user", "content": [{"text": "x"}]}], "'type'"),
        ([{"role": "user", "content": []}], "parts"),
        ([{"role": "user", "content": None}], "parts"),
        ([{"role": "user", "content": "x", "name": "bob"}], "name"),
        ([{"role": "tool", "content": "x"}], "tool"),
        ([{"role": "user"}], "no content"),
        ([{"role": "user", "content": "a\ud800b"}], "lone surrogate"),
        ([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], "lone surrogate"),
        (["Hi"], "not an object"),
        ([], None),
    ],
)
def test_bad_messages_are_refused_naming_messages(engine, messages, reason):
    with pytest.raises(InvalidRequestError) as err:
        validate_messages(messages)
    assert err.value.field == "messages"
    if reason:
        assert reason in str(err.value)
    res = engine.chat_completions([{"messages": messages}])
    assert res[0]["error"]["param"] == "messages"


def test_a_lone_surrogate_fails_its_request_alone(engine):
    """JSON parsers accept "\\ud800"; a prompt or schema holding one is refused naming the
    field (it crashed the tokenizer, and so a whole batch job, at the same line on every
    resume), and the other requests run."""
    bad_prompt = {"prompt": "x\ud800", "max_tokens": 2}
    schema = {"type": "object", "properties": {"a": {"enum": ["\ud800"]}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    bad_schema = {"messages": HI, "max_tokens": 2, "response_format": fmt}
    good = {"messages": HI, "max_tokens": 2, "seed": 1}
    out = dict(engine.stream_chat(enumerate([bad_prompt, bad_schema, good])))
    assert out[0]["error"]["param"] == "prompt" and "surrogate" in out[0]["error"]["message"]
    assert out[1]["error"]["param"] == "response_format.json_schema.schema"
    assert out[2]["choices"][0]["message"]["content"] is not None


def test_refusals_come_back_as_pulled_and_never_pile_up(engine):
    """A refused item is answered as soon as the engine pulls it: 1000 bad items ahead of a
    good one are not all read (and buffered) before the first answer."""
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i, "", P  # an empty prompt: refused
        yield "good", "Hi", P

    stream = engine.stream(items())
    key, first = next(stream)
    # a background thread takes requests in at most `prefetch` ahead of the slots
    ahead = engine.slot_engine().prefetch
    assert ahead == engine.engine_options["slots"]
    assert key == 0 and first.error is not None and pulled <= ahead + 2
    rest = dict(stream)
    assert len(rest) == 1000 and rest["good"].error is None
    # Engine(prefetch=0) pulls each one on the loop's thread, when a slot takes it
    pulled = 0
    stream = Engine(engine.model, engine.tokenizer, prefetch=0).stream(items())
    key, first = next(stream)
    assert key == 0 and first.error is not None and pulled <= 2
    stream.close()
    with pytest.raises(InvalidRequestError) as err:
        Engine(engine.model, engine.tokenizer, prefetch=-1)
    assert err.value.field == "prefetch"


def test_leaving_a_stream_early_frees_its_slots_and_schemas(engine):
    """Closing a stream while schema rows still run releases their pool handles and empties
    their slots, so a later schema request alone fits and no slot keeps running."""

    def fmt(n):
        sch = {
            "type": "object",
            "properties": {"a": {"type": "string", "pattern": f"^[a-z ]{{5,{n}}}$"}},
        }
        sch["required"] = ["a"]
        return {"type": "json_schema", "json_schema": {"name": "s", "schema": sch}}

    items = [("plain", "Hi", SamplingParams(seed=0, max_tokens=1))] + [
        (n, "Hi", SamplingParams(seed=n, max_tokens=60, response_format=fmt(n))) for n in (25, 26)
    ]
    stream = engine.stream(items)
    next(stream)
    stream.close()
    se = engine.slot_engine()
    assert all(h.refs == 0 for h in se.schema_pool.handles.values())
    assert (np.asarray(se._slots.finish) != RUNNING).all()
    [c] = engine.generate("Hi", SamplingParams(seed=3, max_tokens=30, response_format=fmt(27)))
    assert c.error is None


def test_errors_name_the_field_at_fault(engine):
    """A raw prompt too long for the context is the prompt's fault; a request without a seed
    whose key cannot give one is its seed's (as in stream_chat)."""
    [c] = engine.generate("hi " * 300, P)
    assert c.error.field == "prompt"
    long_chat = [{"role": "user", "content": "hi " * 300}]
    bodies = [{"prompt": "hi " * 300, "max_tokens": 2}, {"messages": long_chat, "max_tokens": 2}]
    out = engine.chat_completions(bodies)
    assert [r["error"]["param"] for r in out] == ["prompt", "messages"]
    [c] = engine.generate([HI], P)
    assert c.error is None
    _, c = next(engine.stream([((1, 2), "Hi", SamplingParams(max_tokens=2))]))
    assert c.error.field == "seed" and "(1, 2)" in str(c.error)


def test_an_unexpected_failure_fails_its_request_alone(engine, monkeypatch):
    """An exception other than InvalidRequestError while one request is prepared (here the
    tokenizer raising on one text) fails that request alone, as a server_error; the others
    run (a batch job would otherwise stop at that line on every resume)."""
    encode = engine.tokenizer.encode

    def flaky(text, *args, **kwargs):
        if "poison" in text:
            raise RuntimeError("the tokenizer broke")
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", flaky)
    bodies = [{"prompt": "poison", "max_tokens": 2}, {"messages": HI, "max_tokens": 2, "seed": 1}]
    out = engine.chat_completions(bodies)
    assert out[0]["error"]["type"] == "server_error" and out[0]["error"]["param"] is None
    assert "the tokenizer broke" in out[0]["error"]["message"] and "choices" in out[1]
    bad, good = engine.generate(["poison", "Hi"], P)
    assert isinstance(bad.error, RequestFailed) and bad.finish_reason == "error"
    assert good.error is None and good.token_ids


def test_text_parts_are_joined_with_newlines(engine):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]
    joined = [{"role": "user", "content": "Tell me\na story."}]
    assert validate_messages([{"role": "user", "content": parts}]) == joined
    a, b = engine.generate([[SYSTEM, {"role": "user", "content": parts}], [SYSTEM, *joined]], P)
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens


def test_json_mode_with_stop_is_refused_naming_stop(engine):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(response_format="json_object", stop=["{"])
    assert err.value.field == "stop" and "json_object" in str(err.value)
    res = engine.chat_completions(
        [{"messages": HI, "response_format": {"type": "json_object"}, "stop": ["{"]}]
    )
    assert res[0]["error"]["param"] == "stop"
    # each alone is fine, and JSON mode's text is valid JSON
    ok = engine.generate(HI, SamplingParams(response_format="json_object", seed=1, max_tokens=6))[0]
    json.loads(ok.text)


# ---- finish reasons ----------------------------------------------------------------------


def test_no_token_allowed_is_not_a_normal_stop(engine):
    eos = engine.tokenizer.eos_id
    ended = engine.generate(HI, SamplingParams(seed=1, max_tokens=6, logit_bias={eos: 100}))[0]
    assert (ended.finish_reason, ended.native_finish_reason) == ("stop", "eos")
    assert ended.token_ids == [eos]
    none = nan_engine(engine).generate(HI, SamplingParams(seed=1, max_tokens=6))[0]
    assert (none.finish_reason, none.native_finish_reason) == ("content_filter", "no_token_allowed")
    assert none.token_ids == [] and none.text == "" and none.error is None
    x = engine.tokenizer.encode("x")[0]
    stopped = engine.generate(
        HI, SamplingParams(seed=1, max_tokens=6, logit_bias={x: 100}, stop=["x"])
    )[0]
    assert (stopped.finish_reason, stopped.native_finish_reason) == ("stop", "stop_string")
    long = engine.generate(HI, SamplingParams(seed=1, max_tokens=6, logit_bias={x: 100}))[0]
    assert (long.finish_reason, long.native_finish_reason) == ("length", "length")


# ---- n choices and seeds -----------------------------------------------------------------


def test_choice_zero_is_the_plain_request_and_seeds_follow_the_job(engine):
    body = {"messages": HI, "max_tokens": 6, "temperature": 1.0}
    seed = derive_seed(9, 0)  # what the plain request (key 0) gets from job seed 9
    plain, two = engine.chat_completions([body, {**body, "n": 2, "seed": seed}], job_seed=9)
    assert plain["seed"] == two["seed"] == seed
    assert two["choices"][0]["message"] == plain["choices"][0]["message"]
    assert two["choices"][1]["message"] != plain["choices"][0]["message"]
    assert two["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    seeds = [choice_seed(seed, i) for i in range(3)]
    assert seeds[0] == seed and len(set(seeds)) == 3
    assert seeds[1] == derive_seed(seed, 1)


def test_max_tokens_past_max_seq_len_names_the_engine_limit(engine):
    """An engine whose max_seq_len is below the model's context says so, not 'context
    length', and says how to raise it."""
    short = Engine(engine.model, engine.tokenizer, max_seq_len=64)
    with pytest.raises(InvalidRequestError) as err:
        short.prepare("Hi", SamplingParams(max_tokens=100))
    msg = str(err.value)
    assert err.value.field == "max_tokens" and "max_seq_len (64 tokens" in msg
    assert "context is 256" in msg and "--max-seq-len" in msg
    with pytest.raises(InvalidRequestError, match="the context length \\(256 tokens\\)"):
        engine.prepare("Hi", SamplingParams(max_tokens=1000))


def test_n_out_of_range_is_refused(engine):
    for n in (0, 129, 1.0, True, "2"):
        res = engine.chat_completion({"messages": HI, "n": n})
        assert res["error"]["param"] == "n", n


# ---- streams -----------------------------------------------------------------------------


def test_stream_chat_is_lazy_on_an_endless_iterator(engine):
    pulled = []

    def bodies():
        for k in itertools.count():
            pulled.append(k)
            bad = k % 3 == 1
            yield f"req-{k}", {"messages": HI, "max_tokens": 2, "temperature": 3 if bad else 1}

    engine.stream_group = 4  # provisional engine: groups of 4 (the slot engine ignores it)
    try:
        got = list(itertools.islice(engine.stream_chat(bodies(), job_seed=5), 6))
    finally:
        del engine.stream_group
    assert len(pulled) < 1000  # an endless iterator: it ended, having pulled what it ran
    by_key = dict(got)
    assert len(by_key) == 6
    for key, r in by_key.items():
        k = int(key.split("-")[1])
        if k % 3 == 1:
            assert r["error"]["param"] == "temperature" and key in r["error"]["message"]
        else:
            assert r["seed"] == derive_seed(5, key)  # seeds from (job_seed, key)


def test_stream_items_with_str_and_int_keys(engine):
    items = [
        ("a", "Hi", SamplingParams(max_tokens=3)),
        (7, HI, SamplingParams(max_tokens=3, seed=11)),
        ("bad", HI, SamplingParams(max_tokens=10_000)),
    ]
    got = dict(engine.stream(iter(items), job_seed=2))
    assert got["a"].seed == derive_seed(2, "a") and got[7].seed == 11
    assert got["bad"].error.field == "max_tokens" and got["bad"].finish_reason == "error"
    assert (
        got[7].token_ids == engine.generate(HI, SamplingParams(max_tokens=3, seed=11))[0].token_ids
    )


def test_chat_completions_keeps_input_order(engine):
    bodies = [
        {"messages": HI, "max_tokens": 2, "seed": 1},
        {"messages": HI, "temperature": -1},
        {"prompt": "Hi", "max_tokens": 2, "seed": 1},
        {"prompt": "Hi", "messages": HI},
        {"prompt": 5},
        {"max_tokens": 2},
        "not a body",
    ]
    res = engine.chat_completions(bodies)
    assert [r.get("error", {}).get("param") for r in res] == [
        None,
        "temperature",
        None,
        "prompt",
        "prompt",
        "messages",
        "body",
    ]
    assert res[2]["usage"]["prompt_tokens"] == len(engine.tokenizer.encode("Hi"))


# ---- tokenizer and template pieces (no model run) ---------------------------------------


def test_shown_bytes_are_the_text_of_special_tokens(engine):
    tok = engine.tokenizer
    for i in range(tok.vocab_size):
        if i in tok.special_ids:
            assert tok.token_bytes[i] == b""
            assert tok.shown_bytes[i] == tok.id_to_token(i).encode("utf-8")
            assert tok.encode(tok.shown_bytes[i].decode()) == [i]  # the text is the token
        else:
            assert tok.shown_bytes[i] == tok.token_bytes[i]
    assert tok.shown_bytes[tok.eos_id] == b"<|im_end|>"


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[0]['content'] + 1 }}",  # TypeError inside the template
        "{{ messages[5]['content'].upper() }}",  # UndefinedError
        "{% for %}",  # a template that does not compile
    ],
)
def test_any_template_failure_is_a_messages_error(engine, template):
    broken = with_template(engine, template)
    with pytest.raises(InvalidRequestError) as err:
        broken.render(HI)
    assert err.value.field == "messages" and "chat template" in str(err.value)
    with pytest.raises(InvalidRequestError) as again:  # a refused input re-raises itself
        engine.encode_input(err.value)
    assert again.value is err.value


def test_names_the_docs_use_resolve_after_import_jaxsample():
    """Every `jaxsample.a.b` the docs name and every name they import from jaxsample resolves
    after a bare `import jaxsample` (a fresh process): `jaxsample.explore.use_compile_cache()`
    (docs/notebooks.md) raised AttributeError, and `choice_seed`, which docs/api.md tells
    users to give input i, was not exported."""
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    dotted, imported = set(), {"choice_seed", "explore"}
    for f in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = f.read_text()
        dotted |= set(re.findall(r"`(jaxsample(?:\.[A-Za-z_]\w*)+)", text))
        for block in re.findall(
            r"from jaxsample import \(([^)]*)\)|from jaxsample import (.*)", text
        ):
            imported |= {n for n in re.split(r"[,\s()]+", " ".join(block)) if n}
    assert "jaxsample.explore.use_compile_cache" in dotted and "Distribution" in imported
    code = (
        "import functools, sys, jaxsample\n"
        "missing = [n for n in sys.argv[1].split() if not hasattr(jaxsample, n)]\n"
        "for path in sys.argv[2].split():\n"
        "    try:\n"
        "        functools.reduce(getattr, path.split('.')[1:], jaxsample)\n"
        "    except AttributeError:\n"
        "        missing.append(path)\n"
        "print(missing)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, " ".join(sorted(imported)), " ".join(sorted(dotted))],
        capture_output=True,
        text=True,
        cwd=root,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_token_ids_are_one_prompt_in_every_entry_point(engine):
    """A list (or 1-d integer array) of token ids is ONE prompt, used as is, in generate,
    Engine.generate and stream (it was a batch of ints, each failing on 'messages'); a 2-d
    integer array is a batch of id rows; ids that are not ints in [0, V) fail that request
    alone on field 'prompt', never rounded or read as something else."""
    ids = engine.tokenizer.encode("Hello there")
    want = engine.generate("Hello there", P)[0]
    assert want.error is None
    for inputs in (ids, tuple(ids), np.asarray(ids), jnp.asarray(ids, jnp.int32)):
        for out in (engine.generate(inputs, P), jaxsample.generate(inputs, P, engine=engine)):
            assert len(out) == 1 and out[0].error is None, out
            assert out[0].token_ids == want.token_ids
            assert out[0].prompt_tokens == len(ids)
    batch = engine.generate([ids, "Hello there", HI], P)
    assert [c.token_ids for c in batch[:2]] == [want.token_ids] * 2 and batch[2].error is None
    rows = engine.generate(np.asarray([ids, ids]), P)
    assert [c.token_ids for c in rows] == [want.token_ids] * 2
    [(key, c)] = list(engine.stream([("k", ids, P)]))
    assert key == "k" and c.token_ids == want.token_ids
    # a continuation from the prompt plus the answer so far, without retokenising
    more = engine.generate(ids + want.token_ids[:3], P)[0]
    assert more.error is None and more.prompt_tokens == len(ids) + 3

    v = engine.vocab_size
    bad = [
        [1, v],
        [-1, 2],
        [1.0, 2.0],
        [True, False],
        np.asarray([1.5, 2.5]),
        np.zeros((2, 2, 2), int),
    ]
    out = engine.generate([*bad, ids], P)
    for item, c in zip(bad, out[:-1]):
        assert c.error is not None and c.error.field == "prompt", (item, c.error)
        assert c.token_ids == []
    assert out[-1].token_ids == want.token_ids  # the good one beside them runs
    assert str(v) in str(out[0].error) and "out of the vocabulary" in str(out[0].error)
    with pytest.raises(InvalidRequestError) as err:
        engine.generate([1, v], P, strict=True)
    assert err.value.field == "prompt"
    long = [1] * engine.context_length
    [c] = engine.generate(long, P)
    assert c.error.field == "prompt" and "shorter than" in c.error.allowed
    # an array that is neither one prompt of ids nor a batch of them is the call's mistake
    # (a 0-d array raised "iteration over a 0-d array"; a 3-d one ran as 2-d requests)
    for inputs in (np.array(5), jnp.array(5), np.zeros((2, 2, 2), int), np.array([1.0, 2.0])):
        with pytest.raises(InvalidRequestError) as err:
            engine.generate(inputs, P)
        assert err.value.field == "inputs"
    assert normalize_inputs(np.array([], int)) == [] and engine.generate(np.array([], int)) == []


def test_a_second_run_beside_an_open_stream_is_refused_not_mixed_in(engine):
    """generate() while a stream of the same engine was open ran in the same slots: the
    open stream's later results came back with tokens -1 (nothing raised). It is refused now,
    and the open stream goes on with the tokens it gives alone."""
    items = [(i, "Hi", SamplingParams(max_tokens=2 + 3 * i, seed=i)) for i in range(4)]
    alone = {i: engine.generate("Hi", p)[0].token_ids for i, _, p in items}
    stream = engine.stream(items)
    first_key, first = next(stream)
    for call in (
        lambda: engine.generate(["Hi", "Yo"], P),
        lambda: list(engine.stream([(0, "Hi", P)])),
        lambda: engine.chat_completions([{"messages": HI, "max_tokens": 2}]),
    ):
        with pytest.raises(RuntimeError, match="already running a stream"):
            call()
    got = {first_key: first.token_ids, **{k: c.token_ids for k, c in stream}}
    assert got == alone and all(-1 not in t for t in got.values())
    # closed early, the engine runs the next call
    stream = engine.stream(items)
    next(stream)
    stream.close()
    assert engine.generate("Hi", items[1][2])[0].token_ids == alone[1]


def test_one_body_where_a_list_belongs_is_refused_naming_bodies(engine):
    """chat_completions(body) and stream_chat(body) with one dict iterated it as its keys:
    one 'body' error per key, none naming the mistake."""
    body = {"messages": HI, "max_tokens": 2, "seed": 1}
    for call in (
        lambda: engine.chat_completions(body),
        lambda: list(engine.stream_chat(body)),
        lambda: engine.chat_completions("messages"),
        lambda: list(engine.stream_chat(5)),
    ):
        with pytest.raises(InvalidRequestError) as err:
            call()
        assert err.value.field == "bodies"
    with pytest.raises(InvalidRequestError, match="chat_completion"):
        engine.chat_completions(body)
    # bodies without their keys: "not enough values to unpack (expected 2, got 1)" before
    for items in ([body], [(0, body, 1)]):
        with pytest.raises(ValueError, match=r"\(key, body\) pairs .*; item 0 is"):
            list(engine.stream_chat(items))
    assert engine.chat_completion(body)["choices"][0]["finish_reason"] == "length"


# ---- jaxsample.explore: the notebooks' helpers take inputs by generate's rule -------------


def test_explore_inputs_follow_the_generate_rule(engine):
    """A string is ONE prompt (not one input per character), a message list ONE
    conversation, a list or 1-d array of token ids ONE input, a 2-d id array a batch; ids
    that are bools, out of the vocabulary or past the context are refused, never read."""
    from jaxsample.explore import json_allowed_masks, next_token_logits, token_texts

    ids = engine.encode_input("Hello")
    want = next_token_logits(engine, [ids, engine.encode_input(HI)])
    assert want.shape == (2, engine.vocab_size)
    same = [
        ("Hello", want[:1]),
        (HI, want[1:]),
        (ids, want[:1]),
        (np.asarray(ids), want[:1]),
        (jnp.asarray([ids, ids]), want[[0, 0]]),
        ([jnp.asarray(ids), HI], want),
    ]
    for inputs, expected in same:
        got = next_token_logits(engine, inputs)
        assert got.shape == expected.shape, inputs
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    too_long = [1] * (engine.model.config.context_length + 1)
    for bad in ([[True, False]], [[engine.vocab_size]], [[-1]], [[]], [[1.0, 2.0]], [too_long]):
        with pytest.raises(ValueError):
            next_token_logits(engine, bad)
    for token_ids, max_tokens in (([engine.vocab_size], 4), ([-1], 4), ([1], 2.5), ([1, 2], 1)):
        with pytest.raises(ValueError):
            json_allowed_masks(engine, token_ids, max_tokens)
    assert token_texts(engine.tokenizer, [-1]) == [""]
    with pytest.raises(ValueError):
        token_texts(engine.tokenizer, [engine.vocab_size])


def test_explore_never_rounds_or_flattens_token_ids(engine):
    """token_texts read 1.7 as token 1 and json_allowed_masks flattened a 2-d array of ids
    into one answer; both are refused now, naming the argument. Special tokens are labelled
    by their text, as log probabilities show them (they were '', a blank plot label)."""
    from jaxsample.explore import json_allowed_masks, token_texts

    tok = engine.tokenizer
    for ids in ([1.7], np.array([2.0]), [True], np.array([[1, 2]], np.float32)):
        with pytest.raises(InvalidRequestError) as err:
            token_texts(tok, ids)
        assert err.value.field == "ids"
    assert token_texts(tok, [tok.eos_id, -1]) == ["<|im_end|>", ""]
    hello = tok.encode("Hello there")
    assert token_texts(tok, np.asarray(hello)) == [tok.token_bytes[t].decode() for t in hello]
    assert token_texts(tok, hello[0]) == token_texts(tok, hello[:1])
    brace = tok.encode("{")
    for token_ids in ([[brace[0]], [brace[0]]], np.asarray([brace * 2]), [1.0], [True]):
        with pytest.raises(InvalidRequestError) as err:
            json_allowed_masks(engine, token_ids, 8)
        assert err.value.field == "token_ids"
    assert json_allowed_masks(engine, brace, 8).shape == (1, engine.vocab_size)


def test_next_token_logits_shares_one_compile_across_batch_sizes(engine):
    """5, 6 and 7 inputs (the prefixes of answers of different lengths) run one compiled
    prefill, not one per batch size, and each row equals that input alone."""
    from jaxsample import explore

    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    alone = explore.next_token_logits(engine, [ids[: j + 1] for j in range(len(ids))])
    before = explore._prefill_logits._cache_size()
    for n in (5, 6, 7):
        got = explore.next_token_logits(engine, [ids[: j + 1] for j in range(n)])
        assert got.shape == (n, engine.vocab_size)
        np.testing.assert_allclose(got, alone[:n], rtol=1e-5, atol=1e-5)
    assert explore._prefill_logits._cache_size() - before <= 1


@pytest.mark.parametrize(
    "options, field",
    [
        ({"slots": 0}, "slots"),
        ({"slots": 1.5}, "slots"),
        ({"slots": True}, "slots"),
        ({"chunk_steps": 0}, "chunk_steps"),
        ({"chunk_steps": 8.0}, "chunk_steps"),
        ({"refill_free": 0}, "refill_free"),
        ({"slots": 4, "refill_free": 5}, "refill_free"),
        ({"devices": "cpu"}, "devices"),
        ({"devices": []}, "devices"),
        ({"devices": [0]}, "devices"),
    ],
)
def test_engine_refuses_bad_slot_settings_when_built(options, field):
    """The slot engine's settings are checked when the Engine is built, naming the setting
    (they failed at the first request as a bare ValueError; slots=True ran one slot, and
    devices="cpu" was read as three devices, 'c', 'p', 'u')."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=50, context_length=64))
    with pytest.raises(InvalidRequestError) as info:
        Engine(model, None, **options)
    assert info.value.field == field
    ok = Engine(model, None, slots=4, chunk_steps=8, refill_free=4, devices=jax.devices()[:1])
    assert ok.engine_options["slots"] == 4 and ok.engine_options["devices"] == jax.devices()[:1]


def test_engine_load_checks_its_settings_before_loading_the_model(monkeypatch):
    """Engine.load(slots=0) or a misspelt setting loaded the model (seconds) before failing."""
    import jaxsample.model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jaxsample.model, "load_model", no_load)
    for options, field in (
        ({"slots": 0}, "slots"),
        ({"slots": 4, "refill_free": 5}, "refill_free"),
    ):
        with pytest.raises(InvalidRequestError) as info:
            Engine.load(**options)
        assert info.value.field == field
    with pytest.raises(TypeError, match="slot"):
        Engine.load(slot=4)


@pytest.mark.parametrize("value", [0, -1, 65, 1.5, True])
def test_engine_refuses_a_bad_max_seq_len_when_built(value):
    """max_seq_len is checked when the Engine is built (0 was read as "the default"), naming
    the field and the model's context as the range (a stand-in model: only its config is
    read)."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=50, context_length=64))
    with pytest.raises(InvalidRequestError) as info:
        Engine(model, None, max_seq_len=value)
    assert info.value.field == "max_seq_len" and "[1, 64]" in info.value.allowed
    assert Engine(model, None, max_seq_len=64).engine_options["max_seq_len"] == 64


# ----------------------------------------------------------------------------- fuzzing pass
# (tests/test_fuzz_inputs.py found these; each was another exception, or a silent misreading)


def test_generate_checks_strict_and_a_0d_params_array(engine):
    """strict="false" (a truthy string) ran in strict mode, strict=np.array([1, 2]) raised
    numpy's ValueError; params=np.array(3) raised "iteration over a 0-d array"."""
    for strict in ("false", 1, None, np.array([1, 2])):
        with pytest.raises(InvalidRequestError) as err:
            engine.generate([], strict=strict)
        assert err.value.field == "strict"
    assert engine.generate([], strict=np.bool_(True)) == []
    for params in (np.array(3), jnp.array(2)):
        with pytest.raises(InvalidRequestError) as err:
            engine.generate(["Hi"], params)
        assert err.value.field == "params"


def test_a_list_of_numbers_with_floats_is_one_bad_prompt():
    """generate([1.0, 2.0]) ran two requests, each failing on 'messages' with the value 1.0;
    it is one prompt of token ids, refused on field prompt (docs/api.md), as [[1.0, 2.0]]."""
    assert normalize_inputs([1.0, 2.0]) == [[1.0, 2.0]]
    assert normalize_inputs((True, 2)) == [(True, 2)]
    assert normalize_inputs(["a", 1.0]) == ["a", 1.0]  # a batch, as before
    assert normalize_inputs([1, 2]) == [[1, 2]]


def test_generate_refuses_a_float_id_list_as_one_request(engine):
    [c] = engine.generate([1.0, 2.0], SamplingParams(max_tokens=2, seed=1))
    assert c.error is not None and c.error.field == "prompt"


def test_messages_with_keys_or_roles_that_cannot_be_printed():
    """role=10**5000 raised ValueError (int too large for str) while the refusal was built,
    and so did an unknown key 10**5000 in a message or a content part."""
    for messages in (
        [{"role": 10**5000, "content": "x"}],
        [{"role": "user", "content": "x", 10**5000: 1}],
        [{"role": "user", "content": [{"type": "text", "text": "a", 10**5000: 1}]}],
    ):
        with pytest.raises(InvalidRequestError) as err:
            validate_messages(messages)
        assert err.value.field == "messages" and "<int of" in str(err.value)


def test_token_texts_refuses_a_ragged_list(engine):
    """A ragged list of ids raised numpy's "inhomogeneous shape" ValueError."""
    from jaxsample.explore import token_texts

    with pytest.raises(InvalidRequestError) as err:
        token_texts(engine.tokenizer, [1, [2, 3]])
    assert err.value.field == "ids"
