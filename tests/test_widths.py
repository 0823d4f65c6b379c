"""Narrow chunks: the slot engine runs the model and the sampler on the first W slots only,
W the smallest of its ``widths`` that holds every running slot (docs/engine.md).

The independent expectation is the same workload through an engine of the same size that
runs every chunk at the full width (``widths=()``): the tokens, text, finish reasons and
log probabilities must be the same bits, and the narrow engine must have run fewer rows.
"""

from __future__ import annotations

import jax
import pytest
from small_engine import real_tokenizer, small_model
from test_engine import run, same, workload

from jaxsample import InvalidRequestError, SamplingParams, pack_rows
from jaxsample.api import Engine
from jaxsample.engine import compile_count
from jaxsample.params import check_widths


@pytest.fixture(scope="module")
def model_tok():
    tok = real_tokenizer()
    return small_model(tok), tok


def test_widths_default_by_platform_and_are_checked(model_tok):
    model, tok = model_tok
    four = jax.devices()[:1] * 4  # only their number counts here
    assert check_widths(None, 16, platform="cpu") == (1, 4, 16)
    assert check_widths(None, 16) == (1, 4, 16)  # this machine's CPU
    assert check_widths(None, 32, platform="cpu") == (1, 4, 16, 32)
    assert check_widths(None, 16, four, platform="cpu") == (1, 4)  # 4 slots per device
    assert check_widths(None, 1, platform="cpu") == (1,)
    assert check_widths(None, 16, platform="gpu") == check_widths(None, 16, platform="tpu") == (16,)
    assert check_widths([8, 2, 2], 16, platform="gpu") == (2, 8, 16)  # sorted, full width added
    assert check_widths((), 16, platform="cpu") == (16,)
    for bad in (0, [0], [17], ["4"], [True], [1.5], "14", {"a": 1}, 4):
        with pytest.raises(InvalidRequestError) as info:
            check_widths(bad, 16, platform="cpu")
        assert info.value.field == "widths"
        if isinstance(bad, list):
            assert "[1, 16]" in str(info.value)
    with pytest.raises(InvalidRequestError, match="widths"):
        Engine(model, tok, slots=4, widths=[5])  # refused when built
    with pytest.raises(InvalidRequestError, match="widths"):
        Engine.load("/nonexistent.gguf", slots=4, widths=[0])  # before the model is read
    assert Engine(model, tok, slots=8).engine_options["widths"] == (1, 4, 8)


@pytest.fixture(scope="module")
def pair(model_tok):
    """The same engine size twice: narrow chunks (the default widths) and the full width."""
    model, tok = model_tok
    return (
        Engine(model, tok, slots=8, chunk_steps=8),
        Engine(model, tok, slots=8, chunk_steps=8, widths=()),
    )


def _counts(engine: Engine, items) -> tuple[dict, tuple[int, int, int]]:
    """The run's completions and its (steps, slot_steps, row_steps)."""
    stats = engine.slot_engine().stats
    before = (stats.steps, stats.slot_steps, stats.row_steps)
    got = run(engine, items)
    after = (stats.steps, stats.slot_steps, stats.row_steps)
    return got, tuple(a - b for a, b in zip(after, before))


@pytest.mark.parametrize("count", [1, 3, 16])
def test_narrow_chunks_give_the_same_bits_as_the_full_width(pair, count):
    items = workload()
    items = (items[3:] + items[:3])[:count]  # request 3 first: it reports log probabilities
    narrow, full = pair
    (got, (steps, slot_steps, row_steps)), (want, full_counts) = (
        _counts(narrow, items),
        _counts(full, items),
    )
    assert set(got) == set(want) == {k for k, _, _ in items}
    for k in want:
        assert same(got[k], want[k]), k
    assert full_counts[2] == full_counts[1]  # the baseline ran every slot at every step
    if count == 1:
        assert row_steps == steps  # one request: one row
    elif count == 3:
        # slots 0-2: the 4-row width, then 1 row once slot 0 alone runs (if it is the last)
        assert steps <= row_steps <= 4 * steps
    else:
        # 16 requests over 8 slots: full chunks while many run, narrower ones as the last
        # requests finish (a request takes the lowest free slot: they gather in the first)
        assert steps <= row_steps < slot_steps
    assert any(got[k].logprobs for k in got)  # the comparison covered log probabilities


def test_warmup_builds_every_width(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, slots=4, chunk_steps=4)
    assert engine.engine_options["widths"] == (1, 4)
    slot = engine.slot_engine()
    rows = pack_rows([SamplingParams()], vocab_size=tok.vocab_size, seeds=[0])
    slot.warmup(rows, [len(engine.encode_input(p)) for _, p, _ in workload()])
    before = compile_count()
    for count in (1, 3, 8):  # widths 1, 4, then 4 and 1 as 8 requests drain
        got = run(engine, workload()[:count])
        assert all(c.error is None for c in got.values())
    assert compile_count() == before
