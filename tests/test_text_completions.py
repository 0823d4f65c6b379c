"""OpenAI legacy text completions (``/v1/completions``): ``Engine.text_completions`` and
``text_completion`` on the small random model (docs/api.md, "Text completions").

The body's fields and their refusals (each naming its field, one bad body failing alone),
several prompts in prompt-major order with the seed of each prompt sent alone, ``echo``,
the legacy ``logprobs`` object against the chat path's log probabilities for the same raw
prompt and seed, ``text_offset`` against an independent decoder, the default ``max_tokens``
of 16, strict JSON and the official client's ``openai.types.Completion``, and ``jaxsample
generate --request --endpoint completions``.
"""

from __future__ import annotations

import io
import json
import random
import sys

import pytest
from openai.types import Completion as OpenAICompletion
from openai.types.shared import ErrorObject

from jaxsample import cli
from jaxsample.api import NO_PROBABILITY, Engine, _char_offsets, _char_starts, choice_seed
from jaxsample.params import InvalidRequestError, derive_seed
from tests.small_engine import small_engine

IM_START = 1
STORY = "Once upon a time"
HELLO = "Hello there, friend"


@pytest.fixture(scope="module")
def engine():
    return small_engine()


def _reject(name):
    raise ValueError(f"{name} is not JSON")


def strict(resp: dict) -> dict:
    """The response as a strict client reads it: strict JSON, then the openai models."""
    back = json.loads(json.dumps(resp, allow_nan=False), parse_constant=_reject)
    if "error" in back:
        ErrorObject.model_validate(back["error"])
    else:
        OpenAICompletion.model_validate(back)
    return back


def texts(resp: dict) -> list[str]:
    return [c["text"] for c in resp["choices"]]


def no_eos(engine, **fields) -> dict:
    """Fields that ban the end-of-sequence token, so every choice runs to max_tokens."""
    return {"logit_bias": {str(engine.tokenizer.eos_id): -100}, **fields}


# ---- the response ---------------------------------------------------------------------


def test_response_shape_validates_and_max_tokens_defaults_to_16(engine):
    body = {"model": "anything", "prompt": STORY, "seed": 3, "user": "u1", **no_eos(engine)}
    resp = strict(engine.text_completion(body))
    assert resp["object"] == "text_completion" and resp["id"].startswith("cmpl-")
    assert resp["model"] == "tiny-random" and resp["seed"] == 3
    [choice] = resp["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and choice["native_finish_reason"] == "length"
    usage = resp["usage"]
    assert usage["prompt_tokens"] == len(engine.tokenizer.encode(STORY))
    assert usage["completion_tokens"] == 16  # OpenAI's default for this endpoint
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16
    # the same request with max_tokens 16 given: the same answer
    again = engine.text_completion({**body, "max_tokens": 16, "model": None, "user": None})
    assert texts(again) == texts(resp)


def test_default_max_tokens_is_lowered_to_the_room_the_context_leaves(engine):
    room = 5
    ids = [100 + i for i in range(engine.context_length - room)]
    resp = strict(engine.text_completion({"prompt": ids, "seed": 1, **no_eos(engine)}))
    assert resp["usage"]["completion_tokens"] == room
    assert resp["choices"][0]["finish_reason"] == "length"
    # given, it is checked against the context as in chat
    err = engine.text_completion({"prompt": ids, "max_tokens": room + 1})
    assert err["error"]["param"] == "max_tokens"


# ---- several prompts, n, seeds -----------------------------------------------------------


def test_several_prompts_are_prompt_major_with_each_prompts_own_seeds(engine):
    fields = {"n": 2, "max_tokens": 6, "seed": 11, "temperature": 1.0}
    both = strict(engine.text_completion({"prompt": [STORY, HELLO], **fields}))
    alone = [strict(engine.text_completion({"prompt": p, **fields})) for p in (STORY, HELLO)]
    reversed_ = strict(engine.text_completion({"prompt": [HELLO, STORY], **fields}))
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    # choice i * n + j is choice j of prompt i, and equals that choice sent alone
    assert texts(both) == texts(alone[0]) + texts(alone[1])
    assert texts(reversed_) == texts(alone[1]) + texts(alone[0])
    assert texts(alone[0])[0] != texts(alone[0])[1]  # the two choices differ
    # token ids give the same as the text they encode
    ids = [engine.tokenizer.encode(p) for p in (STORY, HELLO)]
    by_ids = strict(engine.text_completion({"prompt": ids, **fields}))
    assert texts(by_ids) == texts(both)
    lengths = [len(i) for i in ids]
    assert both["usage"]["prompt_tokens"] == sum(lengths)  # each prompt once, not per choice
    assert both["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    # choice j runs with choice_seed(seed, j): n = 2 equals two requests with those seeds
    single = {**fields, "n": 1}
    for j in range(2):
        one = engine.text_completion({"prompt": STORY, **single, "seed": choice_seed(11, j)})
        assert texts(one) == [texts(alone[0])[j]]


def test_a_request_without_a_seed_takes_one_from_its_key(engine):
    fields = {"max_tokens": 5, "temperature": 1.0}
    both, other = engine.text_completions(
        [{"prompt": [STORY, HELLO], **fields}, {"prompt": STORY, **fields}], job_seed=7
    )
    assert both["seed"] == derive_seed(7, 0) and other["seed"] == derive_seed(7, 1)
    # the same key (index 0) alone: the same seed, so the same choice for each prompt
    [alone] = engine.text_completions([{"prompt": HELLO, **fields}], job_seed=7)
    assert texts(both)[1] == texts(alone)[0]
    [seeded] = engine.text_completions([{"prompt": STORY, **fields, "seed": derive_seed(7, 1)}])
    assert texts(seeded) == texts(other)
    # a stream's key may be a str (a batch job's custom_id)
    [(key, streamed)] = list(
        engine.stream_text_completions([("q-1", {"prompt": STORY, **fields})], job_seed=7)
    )
    assert key == "q-1" and streamed["seed"] == derive_seed(7, "q-1")


# ---- echo -------------------------------------------------------------------------------


def test_echo_puts_the_prompt_text_before_each_choice(engine):
    fields = {"max_tokens": 4, "seed": 2, "n": 2}
    plain = engine.text_completion({"prompt": [STORY, HELLO], **fields})
    echoed = strict(engine.text_completion({"prompt": [STORY, HELLO], **fields, "echo": True}))
    prompts = [STORY, STORY, HELLO, HELLO]
    assert texts(echoed) == [p + t for p, t in zip(prompts, texts(plain), strict=True)]
    assert echoed["usage"] == plain["usage"]  # the echo is not counted again
    # token ids: the decoded prompt, special tokens shown by their text
    ids = [IM_START, *engine.tokenizer.encode("user\nHi")]
    resp = strict(engine.text_completion({"prompt": ids, "max_tokens": 3, "echo": True}))
    alone = engine.text_completion({"prompt": ids, "max_tokens": 3})
    assert texts(resp) == ["<|im_start|>user\nHi" + texts(alone)[0]]


# ---- logprobs ---------------------------------------------------------------------------


def test_logprobs_match_the_chat_path_for_the_same_raw_prompt_and_seed(engine):
    fields = {"max_tokens": 8, "seed": 5, "temperature": 1.0}
    for k in (0, 1, 3, 5):
        text = strict(engine.text_completion({"prompt": STORY, "logprobs": k, **fields}))
        chat = engine.chat_completion(
            {"prompt": STORY, "logprobs": True, "top_logprobs": k, **fields}
        )
        [c], [m] = text["choices"], chat["choices"]
        assert c["text"] == m["message"]["content"]
        content = m["logprobs"]["content"]
        lp = c["logprobs"]
        assert lp["tokens"] == [e["token"] for e in content]
        assert lp["token_logprobs"] == [e["logprob"] for e in content]
        assert len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(content)
        for top, e in zip(lp["top_logprobs"], content, strict=True):
            want = {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            want.setdefault(e["token"], e["logprob"])  # the drawn token is always there
            assert top == want and len(want) in (k, k + 1)
            assert list(top) == [t["token"] for t in e["top_logprobs"]] + (
                [] if e["token"] in {t["token"] for t in e["top_logprobs"]} else [e["token"]]
            )
        if k == 0:  # only the drawn token
            assert lp["top_logprobs"] == [
                {t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"], strict=True)
            ]


def test_tokens_join_to_the_text_and_offsets_point_at_them(engine):
    resp = strict(engine.text_completion({"prompt": HELLO, "logprobs": 2, "max_tokens": 12}))
    [c] = resp["choices"]
    lp = c["logprobs"]
    assert "".join(lp["tokens"]) == c["text"]  # plain ASCII tokens, no special one drawn
    assert lp["text_offset"][0] == 0
    for off, tok in zip(lp["text_offset"], lp["tokens"], strict=True):
        assert c["text"][off : off + len(tok)] == tok


def test_processed_logprobs_with_no_probability_are_written_as_the_openai_value(engine):
    body = {
        "prompt": STORY,
        "logprobs": 4,
        "logprobs_mode": "processed",
        "top_k": 1,
        "max_tokens": 3,
        "seed": 1,
    }
    [c] = strict(engine.text_completion(body))["choices"]
    for top, tok, lp in zip(
        *(c["logprobs"][k] for k in ("top_logprobs", "tokens", "token_logprobs")), strict=True
    ):
        assert lp == 0.0  # top_k 1: the drawn token had all the probability
        assert top[tok] == 0.0 and sorted(top.values()).count(NO_PROBABILITY) == len(top) - 1


def test_text_offsets_are_exact_for_bytes_that_are_not_utf8():
    """Each character's bytes (from one start to the next) decode, alone, to exactly that
    character of the whole text, and each piece's offset is the character its first byte
    lies in (or the text's length at the end)."""
    rng = random.Random(0)
    alphabet = [b"a", b" ", "é".encode(), "€".encode(), "😀".encode(), b"\x80", b"\xbf", b"\xe4",
                b"\xf0\x9f", b"\xed\xa0\x80", b"\xc0", b"\xff", b"\xef\xbf\xbd", b""]  # fmt: skip
    for _ in range(500):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        text = raw.decode("utf-8", errors="replace")
        starts = _char_starts(raw)
        assert len(starts) == len(text) and starts == sorted(set(starts)), raw
        ends = [*starts[1:], len(raw)][: len(starts)]
        for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
            assert raw[a:b].decode("utf-8", errors="replace") == text[k], (raw, k)
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randrange(1, 6))))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        firsts = [0, *cuts]
        want = [next((k for k in range(len(text)) if starts[k] <= f < ends[k]), len(text))
                for f in firsts]  # fmt: skip
        assert _char_offsets(pieces) == want, pieces
    # a token that starts inside a character points at that character
    assert _char_offsets([b"a", "€".encode()[:1], "€".encode()[1:], b"b"]) == [0, 1, 1, 2]
    assert _char_offsets([b"\xe4\xbd", b"x", b""]) == [0, 1, 2]  # \xe4\xbd alone: one U+FFFD
    assert _char_offsets([b"\xed\xa0", b"\x80", b"\xe4"]) == [0, 2, 3]  # three, then one


# ---- the body's fields ------------------------------------------------------------------

REFUSED = [
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, 2.0]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": [[1], ["a"]]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [5, 49152]}, "prompt"),  # the vocabulary has 49152 tokens
    ({"prompt": [[5], [-1]]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": list(range(300))}, "prompt"),  # longer than the context (256)
    ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "logprobs": -1}, "logprobs"),
    ({"prompt": "a", "logprobs": 1.0}, "logprobs"),
    ({"prompt": "a", "top_logprobs": 2}, "top_logprobs"),
    ({"prompt": "a", "echo": "yes"}, "echo"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),  # 0 scores a prompt: with echo only
    ({"prompt": "a", "best_of": 2}, "best_of"),
    ({"prompt": "a", "best_of": 3, "n": 2}, "best_of"),
    ({"prompt": "a", "best_of": 0}, "best_of"),
    ({"prompt": "a", "suffix": "end"}, "suffix"),
    ({"prompt": "a", "stream": True}, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "messages"),
    ({"prompt": "a", "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"prompt": "a", "tools": []}, "tools"),
    ({"prompt": "a", "store": False}, "store"),
    ({"prompt": "a", "promt": "a"}, "promt"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "a", "logit_bias": {"49152": 1}}, "logit_bias"),
    ({"prompt": "a", "response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
]

ACCEPTED = {  # fields accepted (and those that are ignored) next to a good prompt
    "nulls": {"best_of": None, "suffix": None, "stream": None, "logprobs": None, "echo": None},
    "best_of_n": {"best_of": 2, "n": 2},
    "ignored": {"model": "gpt-3.5-turbo-instruct", "user": "someone", "stream": False},
    "sampling": {
        "top_k": 5,
        "min_p": 0.05,
        "top_a": 0.1,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "top_p": 0.9,
        "stop": ["\n"],
        "logprobs_mode": "processed",
        "logprobs": 1,
    },  # fmt: skip
    "echo_false_logprobs": {"echo": False, "logprobs": 0},
    "scoring": {"echo": True, "max_tokens": 0},  # with logprobs: tests/test_prompt_logprobs.py
    "json_mode": {"response_format": {"type": "json_object"}, "max_tokens": 24},
}


def test_each_bad_body_fails_alone_naming_its_field(engine):
    good = {"prompt": STORY, "max_tokens": 4, "seed": 9}
    bodies = [good, *(b for b, _ in REFUSED), good, *({**good, **f} for f in ACCEPTED.values())]
    out = [strict(r) for r in engine.text_completions(bodies)]
    assert "error" not in out[0] and texts(out[0]) == texts(out[len(REFUSED) + 1])
    for i, (body, field) in enumerate(REFUSED, start=1):
        err = out[i].get("error")
        assert err is not None, (body, out[i])
        assert err["param"] == field and err["type"] == "invalid_request_error", (body, err)
        assert f"(request {i})" in err["message"]
    for name, resp in zip(ACCEPTED, out[len(REFUSED) + 2 :], strict=True):
        assert "error" not in resp, (name, resp)
        if name == "json_mode":  # enforced on a raw prompt too
            assert isinstance(json.loads(texts(resp)[0]), dict)
    message = {}  # the first refusal of each field
    for i, (_, field) in enumerate(REFUSED, start=1):
        message.setdefault(field, out[i]["error"]["message"])
    assert "did you mean 'prompt'" in message["promt"]
    assert "a boolean" in message["echo"] and "a chat-completions field" in message["messages"]
    assert "or 0 with echo: true" in message["max_tokens"]


def test_call_arguments_are_refused_once(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.text_completions({"prompt": "a"})
    assert err.value.field == "bodies" and "text_completion(body)" in str(err.value)
    with pytest.raises(ValueError, match="stream_text_completions items are"):
        list(engine.stream_text_completions([{"prompt": "a"}]))
    with pytest.raises(ValueError, match="stream_requests items are"):
        list(engine.stream_requests([(0, "embeddings", {"input": "a"})]))


def test_one_stream_mixes_chat_and_text_completions(engine):
    fields = {"prompt": STORY, "max_tokens": 5, "seed": 4}
    chat_fields = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "seed": 4}
    items = [("t", "completions", fields), ("c", "chat", {**fields}), ("m", "chat", chat_fields)]
    out = dict(engine.stream_requests(items))
    assert out["t"]["object"] == "text_completion" and out["c"]["object"] == "chat.completion"
    # the same raw prompt and seed: the same text from both endpoints
    assert texts(out["t"]) == [out["c"]["choices"][0]["message"]["content"]]
    assert (
        out["m"]["choices"][0]["message"]["content"]
        == (engine.chat_completion(chat_fields)["choices"][0]["message"]["content"])
    )


# ---- the command --------------------------------------------------------------------------


def test_generate_request_with_endpoint_completions(engine, monkeypatch, capsys):
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, path=None, **kw: engine))
    body = {"prompt": [STORY, HELLO], "max_tokens": 4, "seed": 3, "logprobs": 1}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(body)))
    argv = ["generate", "--request", "-", "--endpoint", "completions", "--no-compile-cache"]
    assert cli.main(argv) == 0
    out = strict(json.loads(capsys.readouterr().out))
    assert texts(out) == texts(engine.text_completion(body))
    # a bad body: the error object, status 2, before any model is loaded
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({**body, "logprobs": 9})))
    assert cli.main(argv) == 2
    assert json.loads(capsys.readouterr().out)["error"]["param"] == "logprobs"
    # a completions body sent to the chat endpoint is refused as before (no messages)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(body)))
    assert cli.main(argv[:3]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["param"] == "logprobs"
    assert cli.main(["generate", "--prompt", "x", "--endpoint", "completions"]) == 2
    assert "--endpoint completions goes with --request" in capsys.readouterr().err
