"""Prompt log probabilities (scoring): ``Engine.prompt_logprobs``, ``/v1/completions`` with
``echo`` + ``logprobs`` and ``max_tokens: 0``, and such lines in a batch job (docs/api.md,
"Prompt log probabilities" and "Text completions").

The scores against independent references (log_softmax of the plain prefill of every prefix;
the float64 numpy model on a tiny GGUF file), bit-identical whatever the bucket, the other
prompts or the prompt's length; the top lists; agreement with a greedy generation's raw log
probabilities; the response objects; the refusals; no recompilation for another ``k`` or
another prompt of a bucket.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batch_helpers import canonical, chat_body, request_line
from flax import nnx
from numpy_llama import NumpyLlama
from openai._models import construct_type
from openai.types import Completion as OpenAICompletion
from small_engine import HI, small_engine
from test_batch_completions import Crashing
from tiny_gguf import write_tiny_gguf

from jaxsample import Engine, InvalidRequestError, PromptLogprobs, SamplingParams, scoring
from jaxsample.batch import JobConfig, run_job
from jaxsample.engine.scheduler import compile_count
from jaxsample.model import load_model

STORY = "Once upon a time"
HELLO = "Hello there, friend"
IM_START = 1


@pytest.fixture(scope="module")
def engine():
    return small_engine()


def _ids(engine, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, engine.vocab_size, n).tolist()


def _prefix_logits(model, ids: list[int], width: int) -> np.ndarray:
    """Reference: the plain prefill's last-position logits of each prefix ``ids[:t]`` alone
    (one call per prefix), t = 1..n-1: float32 [n-1, V]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, tokens, length):
        m = nnx.merge(graphdef, state)
        return m.prefill(tokens, length, m.init_cache(1, tokens.shape[1]))[0][0]

    out = []
    for t in range(1, len(ids)):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :t] = ids[:t]
        out.append(np.asarray(last_logits(state, tokens, np.array([t], np.int32))))
    return np.stack(out)


# ---- the numbers ---------------------------------------------------------------------------


def test_scores_equal_log_softmax_of_each_prefix_alone(engine):
    ids = _ids(engine, 40)
    [r] = engine.prompt_logprobs(ids, top_logprobs=20)
    assert isinstance(r, PromptLogprobs) and r.token_ids == ids
    assert r.logprobs.dtype == np.float32 and r.logprobs.shape == (40,)
    assert np.isnan(r.logprobs[0]) and np.isnan(r.top_logprobs[0]).all()
    assert (r.top_ids[0] == -1).all()
    logits = _prefix_logits(engine.model, ids, 48)
    ref = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    want = np.asarray(ref)[np.arange(39), ids[1:]]
    np.testing.assert_allclose(r.logprobs[1:], want, rtol=0, atol=1e-5)
    values, top_ids = jax.lax.top_k(ref, 20)
    np.testing.assert_array_equal(r.top_ids[1:], np.asarray(top_ids))
    np.testing.assert_allclose(r.top_logprobs[1:], np.asarray(values), rtol=0, atol=1e-5)
    assert (np.diff(r.top_logprobs[1:], axis=1) <= 0).all()  # sorted, most likely first
    shown = engine.tokenizer.shown_bytes
    assert r.tokens == [shown[t].decode("utf-8", errors="replace") for t in ids]
    # the model's every-position logits are the plain prefill's of each prefix, bit for bit
    graphdef, state = nnx.split(engine.model)

    @jax.jit
    def every_position(state, tokens, length):
        model = nnx.merge(graphdef, state)
        return model.position_logits(model.hidden(tokens, length)[:, 0])

    tokens = np.zeros((1, 48), np.int32)
    tokens[0, :40] = ids
    np.testing.assert_array_equal(every_position(state, tokens, np.array([40]))[:39], logits)
    assert r.logprob_sum(10) == pytest.approx(float(np.sum(want[9:], dtype=np.float64)), abs=1e-4)


def test_scores_match_the_float64_numpy_model(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=1)
    model, tok = load_model(str(path), attn_block=8, batch_invariant=True)
    tiny = Engine(model, tok, model_name="tiny")
    ids = np.random.default_rng(1).integers(0, tok.vocab_size, 30).tolist()
    [r] = tiny.prompt_logprobs(ids, top_logprobs=5)
    logits = NumpyLlama(str(path)).logits(ids)  # float64 [30, V]
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(r.logprobs[1:], ref[np.arange(29), ids[1:]], rtol=0, atol=5e-5)
    np.testing.assert_allclose(
        r.top_logprobs[1:], np.sort(ref[:-1], axis=-1)[:, ::-1][:, :5], rtol=0, atol=5e-5
    )


def test_a_prompts_scores_are_the_same_bits_whatever_the_bucket_and_the_neighbours(engine):
    ids = _ids(engine, 12, seed=2)
    alone = engine.scorer()(ids)  # bucket 16
    padded = scoring.PromptScorer(engine.model, engine.context_length)
    for bucket in (48, 112, 240):
        padded.bucket = lambda n, b=bucket: b  # the same prompt padded into a larger bucket
        got = padded(ids)
        for a, b in zip(alone, got, strict=True):
            np.testing.assert_array_equal(a, b)
    # next to other prompts, and as the start of longer prompts (other buckets)
    others = [_ids(engine, 30, seed=3), ids, _ids(engine, 5, seed=4), ids + _ids(engine, 60)]
    rs = engine.prompt_logprobs(others, top_logprobs=20)
    [r] = engine.prompt_logprobs(ids, top_logprobs=20)
    np.testing.assert_array_equal(rs[1].logprobs, r.logprobs)
    np.testing.assert_array_equal(rs[1].top_ids, r.top_ids)
    np.testing.assert_array_equal(rs[3].logprobs[:12], r.logprobs)  # bucket 112
    np.testing.assert_array_equal(rs[3].top_logprobs[:12], r.top_logprobs)
    np.testing.assert_array_equal(r.logprobs[1:], alone.logprobs)


def test_top_lists_slice_the_same_top_20(engine):
    ids = _ids(engine, 20, seed=5)
    r0, r3, r20 = (engine.prompt_logprobs(ids, top_logprobs=k)[0] for k in (0, 3, 20))
    assert r0.top_ids.shape == (20, 0) and r0.top_logprobs.shape == (20, 0)
    np.testing.assert_array_equal(r3.top_ids, r20.top_ids[:, :3])
    np.testing.assert_array_equal(r3.top_logprobs, r20.top_logprobs[:, :3])
    np.testing.assert_array_equal(r0.logprobs, r20.logprobs)
    # the prompt token's own log probability is at most the best one, and found in the top
    # list with the same value when it is there
    for t in range(1, 20):
        assert r20.logprobs[t] <= r20.top_logprobs[t, 0]
        hit = np.flatnonzero(r20.top_ids[t] == ids[t])
        if hit.size:
            assert r20.top_logprobs[t, hit[0]] == r20.logprobs[t]


def test_scores_agree_with_a_greedy_generations_raw_logprobs(engine):
    prompt = engine.encode_input(STORY)
    eos = engine.tokenizer.eos_id
    p = SamplingParams(temperature=0.0, max_tokens=10, logprobs=True, top_logprobs=5,
                       logit_bias={eos: -100})  # fmt: skip
    [c] = engine.generate(prompt, p)
    assert len(c.token_ids) == 10
    [r] = engine.prompt_logprobs(prompt + c.token_ids, top_logprobs=5)
    gen = slice(len(prompt), None)
    np.testing.assert_allclose(r.logprobs[gen], [e["logprob"] for e in c.logprobs], atol=1e-4)
    # greedy: each generated token is the most likely one
    np.testing.assert_array_equal(r.top_ids[gen, 0], c.token_ids)
    tops = [[t["logprob"] for t in e["top_logprobs"]] for e in c.logprobs]
    np.testing.assert_allclose(r.top_logprobs[gen], tops, atol=1e-4)


def test_inputs_as_generate_takes_them_and_refusals(engine):
    text, chat = engine.prompt_logprobs([STORY, HI])
    assert text.token_ids == engine.encode_input(STORY)
    assert chat.token_ids == engine.encode_input(HI)  # through the chat template
    assert engine.prompt_logprobs([]) == []
    [one] = engine.prompt_logprobs([7])  # one token: nothing to score
    assert one.logprobs.shape == (1,) and np.isnan(one.logprobs[0])
    [full] = engine.prompt_logprobs(_ids(engine, 256))  # a prompt may fill the context
    assert np.isfinite(full.logprobs[1:]).all()
    bad = [
        (dict(inputs=STORY, top_logprobs=21), "top_logprobs", None),
        (dict(inputs=STORY, top_logprobs=-1), "top_logprobs", None),
        (dict(inputs=STORY, top_logprobs=True), "top_logprobs", None),
        (dict(inputs=STORY, top_logprobs=2.0), "top_logprobs", None),
        (dict(inputs=""), "prompt", 0),
        (dict(inputs=[STORY, _ids(engine, 257)]), "prompt", 1),  # longer than the context
        (dict(inputs=[STORY, [5, engine.vocab_size]]), "prompt", 1),
        (dict(inputs=[[{"role": "robot", "content": "x"}]]), "messages", 0),
    ]
    for kwargs, field, index in bad:
        with pytest.raises(InvalidRequestError) as err:
            engine.prompt_logprobs(kwargs.pop("inputs"), **kwargs)
        assert err.value.field == field and err.value.index == index, (kwargs, err.value)


def test_another_k_or_prompt_of_a_bucket_compiles_nothing(engine):
    engine.prompt_logprobs(_ids(engine, 17), top_logprobs=1)  # bucket 48 traced
    traces, compiles = scoring.trace_count(), compile_count()
    for k in range(21):
        engine.prompt_logprobs(_ids(engine, 17 + k, seed=k), top_logprobs=k)
    engine.prompt_logprobs(_ids(engine, 48), top_logprobs=20)
    assert (scoring.trace_count(), compile_count()) == (traces, compiles)


# ---- /v1/completions -----------------------------------------------------------------------


def _reject(name):
    raise ValueError(f"{name} is not JSON")


def scored(resp: dict) -> dict:
    """The response as clients read it: strict JSON; the default openai client's parsing
    (``construct_type``, as ``client.completions.create`` does) keeps the first entries'
    nulls; with them left out, every field validates (the openai types declare no null
    entry, although OpenAI's API writes one for the first prompt token, as here)."""
    back = json.loads(json.dumps(resp, allow_nan=False), parse_constant=_reject)
    parsed = construct_type(type_=OpenAICompletion, value=back)
    trimmed = copy.deepcopy(back)
    for c, choice in zip(trimmed["choices"], parsed.choices, strict=True):
        lp = c["logprobs"]
        if lp is not None:
            assert choice.logprobs.token_logprobs == lp["token_logprobs"]
            if lp["token_logprobs"] and lp["token_logprobs"][0] is None:
                assert lp["top_logprobs"][0] is None
                lp["token_logprobs"], lp["top_logprobs"] = (
                    lp[k][1:] for k in ("token_logprobs", "top_logprobs")
                )
    OpenAICompletion.model_validate(trimmed)
    return back


def _check_prompt_part(engine, lp: dict, ids: list[int], text: str, k: int) -> None:
    """The first len(ids) entries of a legacy logprobs object against prompt_logprobs."""
    n = len(ids)
    [r] = engine.prompt_logprobs(ids, top_logprobs=k)
    assert lp["tokens"][:n] == r.tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == [float(x) for x in r.logprobs[1:]]
    for t in range(1, n):
        top = lp["top_logprobs"][t]
        want = {r.tokens[t] if i == ids[t] else engine.shown_text([i]): float(v)
                for i, v in zip(r.top_ids[t], r.top_logprobs[t], strict=True)}  # fmt: skip
        want.setdefault(r.tokens[t], float(r.logprobs[t]))  # the prompt's own token
        assert top == want and len(top) in (k, k + 1)
    offsets = lp["text_offset"][:n]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for off, tok in zip(offsets, lp["tokens"][:n], strict=True):
        assert text[off : off + len(tok)] == tok  # ASCII and special tokens: exact


def test_echo_with_logprobs_gives_the_prompts_tokens_first(engine):
    fields = {"prompt": [STORY, HELLO], "max_tokens": 4, "seed": 7, "n": 2, "logprobs": 3}
    plain = scored(engine.text_completion(fields))
    echoed = scored(engine.text_completion({**fields, "echo": True}))
    assert echoed["usage"] == plain["usage"]
    prompts = [STORY, STORY, HELLO, HELLO]
    for prompt, c, p in zip(prompts, echoed["choices"], plain["choices"], strict=True):
        ids = engine.encode_input(prompt)
        n = len(ids)
        assert c["text"] == prompt + p["text"]
        lp, gen = c["logprobs"], p["logprobs"]
        _check_prompt_part(engine, lp, ids, c["text"], 3)
        # then the generated tokens, as without echo, their offsets after the prompt text
        for name in ("tokens", "token_logprobs", "top_logprobs"):
            assert lp[name][n:] == gen[name]
        assert lp["text_offset"][n:] == [len(prompt) + o for o in gen["text_offset"]]
    # n choices of a prompt share its part (scored once per prompt)
    a, b = echoed["choices"][:2]
    assert a["logprobs"]["token_logprobs"][:4] == b["logprobs"]["token_logprobs"][:4]
    # processed log probabilities for the generated tokens; the prompt's stay raw
    proc = scored(engine.text_completion({**fields, "echo": True, "logprobs_mode": "processed"}))
    for prompt, c, raw in zip(prompts, proc["choices"], echoed["choices"], strict=True):
        n = len(engine.encode_input(prompt))
        assert c["logprobs"]["token_logprobs"][:n] == raw["logprobs"]["token_logprobs"][:n]
        assert c["logprobs"]["top_logprobs"][:n] == raw["logprobs"]["top_logprobs"][:n]


def test_max_tokens_0_with_echo_scores_the_prompts_and_generates_nothing(engine):
    ids = [IM_START, *engine.tokenizer.encode("user\nHi")]
    body = {"prompt": [STORY, HELLO], "echo": True, "logprobs": 2, "max_tokens": 0, "n": 2}
    requests = engine.slot_engine().stats.requests
    resp = scored(engine.text_completion(body))
    by_ids = scored(engine.text_completion({**body, "prompt": ids, "n": 1, "logprobs": 0}))
    no_logprobs = scored(engine.text_completion({**body, "logprobs": None}))
    assert engine.slot_engine().stats.requests == requests  # never given to the slot engine
    prompts = [STORY, STORY, HELLO, HELLO]
    assert [c["text"] for c in resp["choices"]] == prompts
    assert all(c["finish_reason"] == "length" for c in resp["choices"])
    n_tokens = [len(engine.encode_input(p)) for p in (STORY, HELLO)]
    assert resp["usage"] == {
        "prompt_tokens": sum(n_tokens),
        "completion_tokens": 0,
        "total_tokens": sum(n_tokens),
    }
    for prompt, c in zip(prompts, resp["choices"], strict=True):
        ids_p = engine.encode_input(prompt)
        assert len(c["logprobs"]["tokens"]) == len(ids_p)
        _check_prompt_part(engine, c["logprobs"], ids_p, prompt, 2)
    assert resp["choices"][0]["logprobs"] == resp["choices"][1]["logprobs"]
    [c] = by_ids["choices"]  # token ids: the echo shows the special token
    assert c["text"] == "<|im_start|>user\nHi" and c["logprobs"]["tokens"][0] == "<|im_start|>"
    _check_prompt_part(engine, c["logprobs"], ids, c["text"], 0)
    assert [c["logprobs"] for c in no_logprobs["choices"]] == [None] * 4
    assert [c["text"] for c in no_logprobs["choices"]] == prompts


def test_max_tokens_0_refusals_and_limits(engine):
    bodies = [
        {"prompt": STORY, "max_tokens": 0},
        {"prompt": STORY, "max_tokens": 0, "echo": False, "logprobs": 1},
        {"prompt": STORY, "max_tokens": False, "echo": True},
        {"prompt": STORY, "max_tokens": 0.0, "echo": True},
        {"prompt": _ids(engine, 257), "max_tokens": 0, "echo": True, "logprobs": 0},
        {"prompt": _ids(engine, 256), "max_tokens": 0, "echo": True, "logprobs": 0},
        {"prompt": _ids(engine, 256), "echo": True, "logprobs": 0},
    ]
    out = engine.text_completions(bodies)
    fields = [r.get("error", {}).get("param") for r in out]
    assert fields == ["max_tokens"] * 4 + ["prompt", None, "prompt"]
    assert "0 with echo: true" in out[0]["error"]["message"]
    assert len(out[5]["choices"][0]["logprobs"]["tokens"]) == 256  # the whole context
    chat = engine.chat_completion({"prompt": STORY, "max_tokens": 0})  # chat: >= 1 as before
    assert chat["error"]["param"] == "max_tokens"


def test_scoring_beside_generation_in_one_stream(engine):
    items = [
        ("score", "completions", {"prompt": STORY, "echo": True, "logprobs": 1, "max_tokens": 0}),
        ("gen", "completions", {"prompt": HELLO, "max_tokens": 3, "seed": 1}),
        ("bad", "completions", {"prompt": STORY, "max_tokens": 0}),
        ("chat", "chat", {"messages": HI, "max_tokens": 2, "seed": 2}),
    ]
    out = dict(engine.stream_requests(items))
    assert out["score"]["choices"][0]["text"] == STORY
    assert out["gen"] == {**engine.text_completion(items[1][2]), "id": out["gen"]["id"],
                          "created": out["gen"]["created"]}  # fmt: skip
    assert out["bad"]["error"]["param"] == "max_tokens"
    assert out["chat"]["object"] == "chat.completion"


# ---- the batch job ---------------------------------------------------------------------------

TEXT_URL = "/v1/completions"
BODIES = {  # custom_id -> (url, body)
    "score": (TEXT_URL, {"prompt": [STORY, HELLO], "echo": True, "logprobs": 5, "max_tokens": 0}),
    "echo-gen": (TEXT_URL, {"prompt": HELLO, "echo": True, "logprobs": 1, "max_tokens": 3}),
    "chat": ("/v1/chat/completions", chat_body("Hi", max_tokens=3, seed=1)),
    "bad": (TEXT_URL, {"prompt": STORY, "max_tokens": 0, "logprobs": 1}),
    "score-ids": (TEXT_URL, {"prompt": [1, 2, 3, 4], "echo": True, "logprobs": 0, "max_tokens": 0}),
}


def test_scoring_lines_in_a_batch_job_and_its_resume(tmp_path, engine):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(request_line(k, b, url=u) + "\n" for k, (u, b) in BODIES.items()))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"the engine is given; the manifest hashes this file")

    def config(out: str) -> JobConfig:
        return JobConfig(input=str(inp), output=str(tmp_path / out), model=str(model),
                         job_seed=3, progress=False)  # fmt: skip

    whole = config("whole.jsonl")
    summary = run_job(whole, engine=engine)
    assert summary["complete"] and summary["records"]["ok"] == 4
    with open(whole.output, encoding="utf-8") as f:
        recs = {r["custom_id"]: r for r in map(json.loads, f)}
    for cid in ("score", "echo-gen", "score-ids"):
        got = scored(recs[cid]["response"]["body"])
        [(_, want)] = engine.stream_text_completions([(cid, BODIES[cid][1])], job_seed=3)
        assert [c["logprobs"] for c in got["choices"]] == [c["logprobs"] for c in want["choices"]]
        assert got["usage"] == want["usage"]
    assert recs["score"]["response"]["body"]["usage"]["completion_tokens"] == 0
    assert recs["bad"]["response"]["body"]["error"]["param"] == "max_tokens"
    cut = config("out.jsonl")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cut, engine=Crashing(engine, 2))
    resumed = Crashing(engine, None)
    assert run_job(cut, engine=resumed)["complete"]
    assert canonical(cut.output) == canonical(whole.output)
    assert resumed.results == len(BODIES) - 2
