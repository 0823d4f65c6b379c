"""The slot engine: continuous batching, bit-exact per request, no recompiles after warm-up.

A small random model with the real vocabulary, in batch-invariant mode (the engine's
default arithmetic). The independent expectation for "bit-exact whatever shares the batch"
is the same request run alone; for "equal to a static batch" it is jaxsample.decode's
one-shot loop with the same arithmetic.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from small_engine import real_tokenizer, small_model

from jaxsample import SamplingParams, pack_rows
from jaxsample.api import Engine
from jaxsample.decode import decode
from jaxsample.engine import SlotEngine, compile_count

PROMPTS = [
    "Once upon a time",
    "x",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
    "1 2 3 4",
    "Hello",
    "A much longer prompt than the others: " + "words " * 12,
    "JSON please",
    "stop here",
]


@pytest.fixture(scope="module")
def tok():
    return real_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return small_model(tok)


def workload():
    """Mixed prompt lengths, budgets and parameter values, each request seeded."""
    kinds = [
        dict(temperature=0.9, top_p=0.9),
        dict(temperature=0.0),
        dict(temperature=1.2, top_k=20, min_p=0.05, repetition_penalty=1.3),
        dict(temperature=0.8, top_a=0.2, frequency_penalty=0.5, logprobs=True, top_logprobs=3),
        dict(temperature=1.0, stop=["e", "ab"], presence_penalty=1.0),
        dict(temperature=0.7, response_format={"type": "json_object"}),
        dict(temperature=1.0, logit_bias={"11": 5.0, "42": -100}, logprobs=True),
    ]
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        kind = kinds[i % len(kinds)]
        params = SamplingParams(seed=1000 + i, max_tokens=3 + (7 * i) % 23, **kind)
        out.append((i, prompt, params))
    return out


def run(engine: Engine, items) -> dict:
    return {k: c for k, c in engine.stream(items)}


def same(a, b) -> bool:
    """Bit-identical outputs: tokens, finish reason, text and every logprob value."""
    return (
        a.token_ids == b.token_ids
        and a.finish_reason == b.finish_reason
        and a.text == b.text
        and json.dumps(a.logprobs) == json.dumps(b.logprobs)
    )


@pytest.fixture(scope="module")
def alone(model, tok):
    """Every request of the workload run by itself through a one-slot engine."""
    engine = Engine(model, tok, slots=1, chunk_steps=8)
    return {k: run(engine, [(k, prompt, p)])[k] for k, prompt, p in workload()}


@pytest.mark.parametrize(
    "slots,chunk_steps,refill_free,order",
    [(16, 1, 1, "shuffled"), (16, 8, 4, "reversed"), (32, 32, 1, "shuffled"), (4, 8, 2, "given")],
)
def test_each_request_bit_identical_whatever_shares_the_slots(
    model, tok, alone, slots, chunk_steps, refill_free, order
):
    items = workload()
    if order == "shuffled":
        random.Random(slots * 100 + chunk_steps).shuffle(items)
    elif order == "reversed":
        items = items[::-1]
    engine = Engine(model, tok, slots=slots, chunk_steps=chunk_steps, refill_free=refill_free)
    got = run(engine, items)
    assert set(got) == set(alone)
    for k in alone:
        assert same(got[k], alone[k]), k
    assert any(got[k].logprobs for k in got)  # the logprob comparison compared something


def test_bfloat16_requests_are_bit_identical_whatever_the_slot_count(tok):
    """bfloat16 weights too: one slot (padded to the invariant width) and 16 slots (exactly
    the width: the case that rounded differently until session 16) give every request the
    same tokens and log probabilities."""
    import jax.numpy as jnp

    model = small_model(tok, dtype=jnp.bfloat16)
    items = workload()[:10]
    results = [run(Engine(model, tok, slots=s, chunk_steps=8), items) for s in (1, 16)]
    for k in results[0]:
        assert same(results[1][k], results[0][k]), k
    assert any(results[0][k].logprobs for k in results[0])


def test_equals_the_static_decode_loop(model, tok, alone):
    """The slot engine and jaxsample.decode's one-shot static loop (same arithmetic) give the
    same tokens and log probabilities for the same requests."""
    engine = Engine(model, tok)
    items = [it for it in workload() if it[2].response_format == "text" and not it[2].stop]
    prompts = [engine.encode_input(prompt) for _, prompt, _ in items]
    plist = [p for _, _, p in items]
    rows = pack_rows(plist, vocab_size=tok.vocab_size, seeds=[p.seed for p in plist])
    out = decode(
        model,
        prompts,
        rows,
        [p.max_tokens for p in plist],
        engine.constraints(plist),
        eos_id=tok.eos_id,
    )
    for b, (k, _, _) in enumerate(items):
        n = int(out.n_tokens[b])
        assert out.tokens[b, :n].tolist() == alone[k].token_ids, k
        if plist[b].logprobs:
            lps = [e["logprob"] for e in alone[k].logprobs]
            assert np.array_equal(out.logprobs[b, : len(lps)], np.float32(lps))


def test_no_compiles_after_warmup(model, tok):
    engine = Engine(model, tok, slots=8, chunk_steps=4)
    slot_engine = engine.slot_engine()
    rows = pack_rows([SamplingParams(logit_bias={"3": 1.0})], vocab_size=tok.vocab_size, seeds=[0])
    lengths = [len(engine.encode_input(p)) for p in PROMPTS]
    slot_engine.warmup(rows, lengths)
    before = compile_count()
    got = run(engine, workload())
    assert len(got) == len(workload()) and all(c.error is None for c in got.values())
    assert compile_count() == before


def test_admitting_a_request_runs_no_eager_jax_operation(model, tok):
    """A request's values (prompt, RowParams, budget, stop tables, ...) go to the one compiled
    prefill-and-insert call as host arrays: an eager jnp.asarray per value cost about as much
    host time as the prefill itself for a short prompt on a small model, twice a short
    request's whole host time in a job of thousands. Stop tables are cached by content."""
    import cProfile
    import pstats

    from jaxsample.automata import stop

    def eager_ops(fn, *args) -> list:
        profile = cProfile.Profile()
        profile.enable()
        fn(*args)
        profile.disable()
        return [
            f"{path}:{name}"
            for path, _, name in pstats.Stats(profile).stats
            if "jax/_src/numpy" in path or name == "apply_primitive"
        ]

    # the check sees eager operations where there are some: the device form of the tables
    assert eager_ops(stop.compile_stops, [("ab",)])
    for stops in ((), ("ab",), ("a never seen stop", "x")):
        engine = Engine(model, tok, slots=4, chunk_steps=4)
        slot_engine = engine.slot_engine()
        req = engine._request("k", "Hello", SamplingParams(seed=1, max_tokens=2, stop=stops), 0)
        for _ in slot_engine.run([req]):  # compiled, and the slot state exists
            pass
        assert not eager_ops(slot_engine._place, 1, req), stops
        fresh = engine._request("f", "Hi", SamplingParams(seed=2, max_tokens=2, stop=["q9"]), 0)
        assert not eager_ops(slot_engine._place, 2, fresh)  # a stop set not cached yet


def test_shared_tables_are_placed_on_the_devices_once(model, tok):
    """Admitting a schema request refreshes the shared tables; only the pool tables the new
    schema changed are placed again, never the JSON grammar and token bytes (a copy of every
    table to every device per admission), and the answers still validate."""
    jsonschema = pytest.importorskip("jsonschema")
    engine = Engine(model, tok, slots=4, chunk_steps=4)
    slot_engine = engine.slot_engine()

    def leaves():
        return jax.tree.leaves(slot_engine._shared)

    before = leaves()
    slot_engine._refresh_shared()  # nothing changed: every device array is the same one
    assert all(a is b for a, b in zip(before, leaves(), strict=True))
    got = run(
        engine, [(i, "JSON", _schema_params(SCHEMAS[i], seed=i, max_tokens=40)) for i in (0, 1)]
    )
    for i in (0, 1):
        jsonschema.validate(json.loads(got[i].text), SCHEMAS[i])
    after = leaves()
    kept = {id(a) for a in before} & {id(a) for a in after}
    unchanged = jax.tree.leaves((slot_engine._shared.grammar, slot_engine._shared.token_bytes))
    assert {id(a) for a in unchanged} <= kept
    assert len(kept) < len(after)  # the pool tables the schemas were written into are new


def test_host_work_per_chunk_does_not_grow_with_the_output(model, tok):
    """The host loop's bookkeeping per chunk is constant: it once summed the lengths of every
    part a request had received, at every chunk (quadratic in the output length; a fifth of
    the wall time at chunk_steps=1 and 480 tokens on the tiny model). Counted, not timed:
    the len() calls per chunk for outputs of 8 and of 48 tokens."""
    import cProfile
    import pstats

    engine = Engine(model, tok, slots=4, chunk_steps=1)
    run(engine, [(0, "go", SamplingParams(seed=0, max_tokens=2))])  # compiled before counting
    per_chunk = []
    for n in (8, 48):
        items = [
            (i, "go", SamplingParams(seed=i, max_tokens=n, logit_bias={"2": -100}))
            for i in range(4)
        ]
        stats = engine.slot_engine().stats
        chunks = stats.chunks
        profile = cProfile.Profile()
        profile.enable()
        got = run(engine, items)
        profile.disable()
        assert all(c.completion_tokens == n for c in got.values())
        lens = sum(
            v[1]
            for k, v in pstats.Stats(profile).stats.items()
            if k[2] == "<built-in method builtins.len>"
        )
        per_chunk.append(lens / (stats.chunks - chunks))
    assert per_chunk[1] < 1.5 * per_chunk[0], per_chunk


@pytest.mark.parametrize("prefetch", [0, 3])
def test_requests_are_pulled_lazily(model, tok, prefetch):
    """An endless input: the engine holds at most the slots plus one waiting request, and the
    prefetching thread at most ``prefetch`` queued requests and the one it is handing over."""
    engine = Engine(model, tok, slots=4, chunk_steps=4)
    engine.slot_engine().prefetch = prefetch
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i, "hi", SamplingParams(seed=i, max_tokens=1 + i % 5)

    results = list(itertools.islice(engine.stream(endless()), 20))
    assert len(results) == 20
    assert pulled <= 20 + 4 + 1 + (prefetch + 1 if prefetch else 0)


def _prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "jaxsample-prefetch"]


def test_prefetching_keeps_the_schedule_and_the_outputs(model, tok):
    """The input is taken in on a background thread (the host work of a request overlaps the
    device's), yet the engine takes each request exactly when it did without the thread: the
    same chunks, steps and outputs, bit for bit."""
    threads = {}

    def items():
        for k, prompt, p in workload():
            threads[k] = threading.current_thread() is threading.main_thread()
            yield k, prompt, p

    got, stats = {}, {}
    for prefetch in (0, 5):
        engine = Engine(model, tok, slots=4, chunk_steps=4)
        engine.slot_engine().prefetch = prefetch
        got[prefetch] = run(engine, items())
        stats[prefetch] = engine.slot_engine().stats
        assert all(threads.values()) == (prefetch == 0), prefetch
        threads.clear()
    assert set(got[0]) == set(got[5]) == {k for k, _, _ in workload()}
    assert all(same(got[0][k], got[5][k]) for k in got[0])
    for field in ("chunks", "steps", "slot_steps", "tokens", "requests"):
        assert getattr(stats[0], field) == getattr(stats[5], field), field


def test_an_input_that_raises_or_a_stream_left_early_stops_the_prefetching(model, tok):
    """An exception of the input reaches the caller (after the results it allowed), and a
    stream left early stops the prefetching thread; the engine serves the next stream."""
    engine = Engine(model, tok, slots=2, chunk_steps=4)
    before = set(_prefetch_threads())

    def failing():
        yield 0, "hi", SamplingParams(seed=0, max_tokens=2)
        raise KeyError("the input broke")

    with pytest.raises(KeyError, match="the input broke"):
        list(engine.stream(failing()))

    def endless():
        for i in itertools.count():
            if i > 4:
                time.sleep(0.2)  # slow to take in: the thread is mid-item when the stream closes
            yield i, "hi", SamplingParams(seed=i, max_tokens=3)

    stream = engine.stream(endless())
    assert len(list(itertools.islice(stream, 3))) == 3
    stream.close()
    # closing waits for the thread (one left running at the interpreter's exit is killed
    # wherever it is, and inside a C++ call that aborts the process)
    assert not [t for t in set(_prefetch_threads()) - before if t.is_alive()]
    again = run(engine, [(7, "hi", SamplingParams(seed=7, max_tokens=2))])
    assert again[7].error is None and again[7].completion_tokens == 2


def test_an_interrupt_between_a_chunk_and_its_result_leaves_a_working_engine(
    model, tok, monkeypatch
):
    """The chunk call takes the slot state (donated); an exception raised before its result
    is stored (Ctrl-C, a signal handler) left the engine holding deleted arrays: the cleanup
    failed with "Array has been deleted", hiding the interrupt, and the engine never ran
    again. Now the interrupt reaches the caller and the next stream starts from new slots."""
    from jaxsample.engine import scheduler

    items = [(i, "hello", SamplingParams(seed=i, max_tokens=9)) for i in range(4)]
    expected = run(Engine(model, tok, slots=2, chunk_steps=4), items)
    engine = Engine(model, tok, slots=2, chunk_steps=4)
    real, calls = scheduler._chunk, []

    def interrupted(*args, **kwargs):
        out = real(*args, **kwargs)  # the old state is consumed
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(scheduler, "_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(engine, items)
    monkeypatch.setattr(scheduler, "_chunk", real)
    again = run(engine, items)
    assert set(again) == set(expected) and all(same(again[k], expected[k]) for k in expected)


def test_a_second_run_beside_a_suspended_one_is_refused(model, tok):
    slot_engine = Engine(model, tok, slots=2, chunk_steps=4).slot_engine()
    engine = Engine(model, tok, slots=2, chunk_steps=4)
    reqs = [engine._request(i, "hi", SamplingParams(seed=i, max_tokens=6), 0) for i in range(3)]
    first = slot_engine.run(reqs)
    next(first)
    with pytest.raises(RuntimeError, match="already running"):
        next(slot_engine.run(reqs))
    rest = list(first)  # the first run is unharmed
    assert len(rest) == 2 and all(r.error is None and len(r.tokens) == 6 for r in rest)
    assert len(list(slot_engine.run(reqs))) == 3  # and once it is done, runs go on


@pytest.mark.parametrize("prefetch", [-1, 1.5, True])
def test_a_bad_prefetch_is_refused(model, tok, prefetch):
    with pytest.raises(ValueError, match="prefetch"):
        SlotEngine(model, grammar=None, token_bytes=None, slots=2, prefetch=prefetch)


def test_refill_keeps_the_slots_busy(model, tok):
    """Continuous batching beats a static batch (refill only once every slot is free) on
    mixed output lengths; same outputs either way."""
    items = [
        (i, "go", SamplingParams(seed=i, max_tokens=2 if i % 4 else 40, logit_bias={"2": -100}))
        for i in range(16)
    ]
    cont = Engine(model, tok, slots=4, chunk_steps=8, refill_free=1)
    static = Engine(model, tok, slots=4, chunk_steps=64, refill_free=4)
    a, b = run(cont, items), run(static, items)
    assert all(same(a[k], b[k]) for k in a)
    occ_cont = cont.slot_engine().stats.occupancy
    occ_static = static.slot_engine().stats.occupancy
    assert occ_cont > 0.7 and occ_cont > occ_static + 0.2, (occ_cont, occ_static)


def test_bad_requests_come_back_alone(model, tok):
    engine = Engine(model, tok, slots=4)
    items = [
        (0, "fine", SamplingParams(seed=1, max_tokens=3)),
        (1, "too long", SamplingParams(seed=1, max_tokens=10_000)),
        (2, [{"role": "nobody", "content": "x"}], SamplingParams(max_tokens=3)),
        (3, "also fine", SamplingParams(seed=2, max_tokens=3)),
    ]
    got = run(engine, items)
    assert got[1].error.field == "max_tokens" and got[1].finish_reason == "error"
    assert got[2].error.field == "messages"
    assert got[0].error is None and got[3].error is None
    assert got[0].completion_tokens == 3


def test_a_max_seq_len_beyond_the_model_context_is_refused(model, tok):
    """Positions past the model's context can never be used, yet every slot's KV cache
    would hold them (10**8 ran out of memory deep inside XLA): refused, naming the range."""
    from jaxsample import InvalidRequestError

    context = model.config.context_length
    for bad in (context + 1, 10**8, 0):
        with pytest.raises(InvalidRequestError) as info:
            SlotEngine(model, grammar=None, token_bytes=None, slots=2, max_seq_len=bad)
        assert info.value.field == "max_seq_len" and f"[1, {context}]" in str(info.value)
    with pytest.raises(InvalidRequestError, match="max_seq_len"):
        Engine(model, tok, slots=2, max_seq_len=10**8)  # refused when built
    ok = Engine(model, tok, slots=2, max_seq_len=context).slot_engine()
    assert ok.max_seq_len == context


def test_memory_per_slot_is_reported(model, tok):
    engine = Engine(model, tok, max_seq_len=256)
    mem = engine.slot_engine().memory_per_slot()
    cfg = model.config
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * 256 * cfg.head_dim * 4
    assert mem["kv_cache"] == kv and mem["total"] > kv


_DEVICES_SCRIPT = r"""
import json, sys
import jax
from pathlib import Path
sys.path.insert(0, "tests")
from jaxsample.api import Engine
from jaxsample.engine import programs
from small_engine import real_tokenizer, small_model
from test_engine import workload
tok = real_tokenizer()
model = small_model(tok)
n = int(sys.argv[1])
if len(sys.argv) > 2:  # through programs kept in this folder (jaxsample.engine.programs)
    programs.ENABLED = True
    programs.directory = lambda: Path(sys.argv[2])
engine = Engine(model, tok, slots=8, chunk_steps=8, devices=jax.devices()[:n])
out = {k: [c.token_ids, c.finish_reason, c.logprobs] for k, c in engine.stream(workload())}
print("RESULT" + json.dumps(out, sort_keys=True))
"""


def test_data_parallel_over_devices_gives_the_same_outputs(tmp_path):
    """Slots split over 4 (simulated) devices: byte-identical outputs to one device; the same
    through the engine's programs kept on disk (sharded) and XLA's compilation cache, written
    by one process and loaded by the next (as a user's second run does: nothing compiled)."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    results = []
    kept = str(tmp_path / "programs")
    for argv in (["1"], ["4", kept], ["4", kept]):
        proc = subprocess.run(
            [sys.executable, "-c", _DEVICES_SCRIPT, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][0]
        results.append(line)
    assert results[0] == results[1] == results[2]
    # kept once each: the chunk loop at its two widths (1 and 2 of the 2 slots per device;
    # the workload's tail runs narrow) and two prefill buckets
    kept_files = sorted(name.split("-")[0] for name in os.listdir(kept))
    assert kept_files == ["admit", "admit", "chunk", "chunk"]
    assert jax.device_count() >= 1


SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0}},
        "required": ["ok"],
        "additionalProperties": False,
    },
]


def _schema_params(schema, **kw):
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    return SamplingParams(response_format=fmt, **kw)


def test_schema_rows_beside_json_and_plain_rows_validate_and_never_recompile(model, tok):
    """Rows with different JSON Schemas share the slots with JSON-mode and plain rows; every
    schema answer parses and validates (also when cut by a small budget); a schema the pool
    has not seen, arriving after warm-up, compiles nothing."""
    jsonschema = pytest.importorskip("jsonschema")
    engine = Engine(model, tok, slots=4, chunk_steps=8)
    items = []
    for i in range(12):
        schema = SCHEMAS[i % 2]
        items.append((i, "Give JSON", _schema_params(schema, seed=i, max_tokens=[60, 12][i % 2])))
    items.append((100, "x", SamplingParams(seed=1, max_tokens=8)))
    items.append(
        (101, "y", SamplingParams(seed=2, max_tokens=20, response_format={"type": "json_object"}))
    )
    got = run(engine, items)
    for i in range(12):
        c = got[i]
        assert c.error is None, c.error
        jsonschema.validate(json.loads(c.text), SCHEMAS[i % 2])
    json.loads(got[101].text)
    run(engine, [(8, "x", SamplingParams(seed=1, max_tokens=4))])  # the 1-row chunk, compiled
    before = compile_count()
    c = run(engine, [(7, "Give JSON", _schema_params(SCHEMAS[2], seed=3, max_tokens=30))])[7]
    jsonschema.validate(json.loads(c.text), SCHEMAS[2])
    assert compile_count() == before


def test_schema_refusals_name_the_field(model, tok):
    engine = Engine(model, tok, slots=4)
    with pytest.raises(Exception) as info:
        _schema_params({"type": "object", "allOf": []})
    assert "allOf" in str(info.value)
    got = run(engine, [(0, "x", _schema_params(SCHEMAS[0], max_tokens=2))])[0]
    assert got.error is not None and got.error.field == "max_tokens"


def test_a_schema_waits_for_room_in_the_pool(model, tok, monkeypatch):
    """A pool that holds one schema at a time: the second schema's request waits until the
    first one's row finishes (it is not refused), and both answers validate."""
    jsonschema = pytest.importorskip("jsonschema")
    from jaxsample.automata import json_schema as js
    from jaxsample.engine import SlotEngine

    compiled = [
        js.compile_schema(s, tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids)
        for s in SCHEMAS[:2]
    ]
    states = max(c.n_states for c in compiled) + 1
    entries = max(len(c.tables["sp_tok"]) for c in compiled) + 1
    rows = js._N_GLOBAL_ROWS + max(c.tables["dense"].shape[0] for c in compiled)
    assert states < sum(c.n_states for c in compiled) + 1  # both do not fit at once
    monkeypatch.setitem(js.POOL_SIZES, "one", (states, entries, rows))
    engine = Engine(model, tok, slots=4, chunk_steps=4)
    engine._slot_engine = SlotEngine(
        model,
        grammar=engine.grammar(),
        token_bytes=engine.token_bytes(),
        schema_pool=js.SchemaPool(
            tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids, size="one"
        ),
        slots=4,
        chunk_steps=4,
    )
    items = [(i, "JSON", _schema_params(SCHEMAS[i], seed=i, max_tokens=40)) for i in (0, 1)]
    got = run(engine, items)
    for i in (0, 1):
        assert got[i].error is None, got[i].error
        jsonschema.validate(json.loads(got[i].text), SCHEMAS[i])
