"""Generation on the real SmolLM2-135M-Instruct model: JSON mode, stop strings, determinism.

Marked real_model (slower; still run in CI).
"""

from __future__ import annotations

import json

import pytest

from jaxsample import SamplingParams
from jaxsample.api import default_engine

pytestmark = pytest.mark.real_model

ASK_JSON = [
    "Describe a cat as a JSON object with keys name, age and colour.",
    "Give me a JSON object listing three fruits and their colours.",
    "Return a JSON object with the fields city and country for Paris.",
]


@pytest.fixture(scope="module")
def engine():
    return default_engine()


def chat(text):
    return [{"role": "user", "content": text}]


def test_json_mode_answers_are_json_objects(engine):
    params = [
        SamplingParams(
            response_format={"type": "json_object"}, temperature=0.7, seed=s, max_tokens=48
        )
        for s in range(3)
    ] + [SamplingParams(response_format={"type": "json_object"}, seed=9, max_tokens=10)]
    got = engine.generate([chat(q) for q in ASK_JSON] + [chat(ASK_JSON[0])], params)
    for c in got:
        obj = json.loads(c.text)
        assert isinstance(obj, dict)
    # the budget-steered short answer still closed its object, within its 10 tokens
    assert got[3].completion_tokens <= 10


def test_stop_string_cuts_where_the_unstopped_text_has_it(engine):
    base = dict(temperature=0.8, seed=21, max_tokens=40)
    free = engine.generate([chat("Tell me about the sea.")], SamplingParams(**base))[0]
    text = free.text
    assert len(text) > 30
    stop_at = text[20:24]  # a piece from the middle, possibly inside a token
    first = text.index(stop_at)
    cut = engine.generate(
        [chat("Tell me about the sea.")], SamplingParams(stop=[stop_at, "zzzz"], **base)
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:first]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]


def test_same_tokens_alone_and_inside_a_batch(engine):
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=5, max_tokens=24)
    alone = engine.generate([chat("Write a haiku about rain.")], target)[0].token_ids
    others = [
        (chat("What is 2 + 2?"), SamplingParams(temperature=0.0, max_tokens=8)),
        (chat("List three animals."), SamplingParams(temperature=1.0, seed=1, max_tokens=30)),
        ("A long raw prompt " * 6, SamplingParams(temperature=0.5, seed=2, max_tokens=12)),
    ]
    inputs = [o[0] for o in others]
    params = [o[1] for o in others]
    inputs.insert(2, chat("Write a haiku about rain."))
    params.insert(2, target)
    batch = engine.generate(inputs, params)
    assert batch[2].token_ids == alone
