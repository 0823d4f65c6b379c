"""The batch job's layers with a fast fake engine (no model): reader, journal, manifest,
resume, shards and merge, memory. The real-engine runs (kill -9, two processes) are in
tests/test_batch_cli.py."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import tracemalloc
import types

import pytest
from batch_helpers import FakeEngine, canonical, chat_body, mixed_lines, request_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsample.batch import JobConfig, Journal, JournalError, ManifestError, run_job
from jaxsample.batch.job import response_record, shard_output
from jaxsample.batch.merge import MergeError, merge_shards
from jaxsample.batch.reader import check_line, read_lines, shard_of

# ---------------------------------------------------------------------------- reader

_KINDS = ["ok", "json", "list", "missing", "int_id", "url", "method", "body", "extra"]


@st.composite
def _input_lines(draw):
    """(lines, expected (code or None, custom_id written) per line), expectation built as the
    lines are drawn (ids from a small alphabet, so duplicates happen)."""
    seen, lines, expect = set(), [], []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(_KINDS))
        cid = draw(st.sampled_from(["a", "b", "c", "d", "é", "a b"]))
        if kind == "json":
            lines.append(draw(st.sampled_from(["{", "", "nul", '{"custom_id": NaN}'])))
            expect.append(("invalid_json", None))
            continue
        if kind == "list":
            lines.append("[1]")
            expect.append(("invalid_line", None))
            continue
        if kind in ("missing", "int_id"):
            obj = {"method": "POST", "url": "/v1/chat/completions", "body": {}}
            if kind == "int_id":
                obj["custom_id"] = 5
            lines.append(json.dumps(obj))
            expect.append(("missing_custom_id", None))
            continue
        if cid in seen:
            expect.append(("duplicate_custom_id", None))
        else:
            seen.add(cid)
            code = {"ok": None, "url": "invalid_url", "method": "invalid_method"}
            code["extra"] = "unknown_key"
            expect.append((code.get(kind, "invalid_body"), cid))
        url = "/v1/embeddings" if kind == "url" else "/v1/chat/completions"
        method = "PUT" if kind == "method" else "POST"
        body = "x" if kind == "body" else chat_body("hi")
        line = request_line(cid, body, method=method, url=url)
        if kind == "extra":
            line = line[:-1] + ', "metadata": {}}'
        lines.append(line)
    return lines, expect


@given(_input_lines())
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_reader_one_checked_line_per_input_line(tmp_path, case):
    lines, expect = case
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    got = list(read_lines(str(path)))
    assert [g.number for g in got] == list(range(1, len(lines) + 1))
    for g, (code, cid) in zip(got, expect):
        assert (g.error["code"] if g.error else None) == code
        assert g.custom_id == cid
        assert g.key == (cid if cid is not None else g.number)
        assert (g.body is None) == (code is not None)
        if g.error:
            assert g.error["line"] == g.number and g.error["message"].startswith(
                f"line {g.number}: "
            )
    assert len({g.key for g in got}) == len(got)  # keys are unique: one record each


def test_reader_last_line_without_newline_and_crlf(tmp_path):
    path = tmp_path / "in.jsonl"
    a, b = request_line("a", chat_body("x")), request_line("b", chat_body("y"))
    path.write_bytes(f"{a}\r\n{b}".encode())
    assert [g.key for g in read_lines(str(path))] == ["a", "b"]


def test_reader_skips_a_byte_order_mark_at_the_start_only(tmp_path):
    path = tmp_path / "in.jsonl"
    a, b = request_line("a", chat_body("x")), request_line("b", chat_body("y"))
    path.write_bytes(b"\xef\xbb\xbf" + f"{a}\n".encode() + b"\xef\xbb\xbf" + b.encode())
    got = list(read_lines(str(path)))
    assert got[0].key == "a" and got[0].error is None
    assert got[1].error["code"] == "invalid_json"  # a BOM inside the file is not skipped


def test_reader_unknown_key_fails_its_line_alone_naming_it():
    good = json.loads(request_line("a", chat_body("x")))
    line = check_line(4, json.dumps({**good, "extra_field": 1}).encode(), set())
    assert line.error["code"] == "unknown_key" and line.key == line.custom_id == "a"
    msg = line.error["message"]
    assert msg.startswith("line 4: ") and '"extra_field"' in msg
    assert all(f'"{k}"' in msg for k in ("custom_id", "method", "url", "body"))
    many = check_line(5, json.dumps({**good, **{f"k{i}": i for i in range(7)}}).encode(), set())
    assert '"k4"' in many.error["message"] and '"k5"' not in many.error["message"]
    assert "and 2 more" in many.error["message"]


@pytest.mark.parametrize(
    "text", ["", "{", '{"a": NaN}', '{"a": -Infinity}', "\ufeff{}", '{"a": 1} x', "[1,", "nul"]
)
def test_reader_refuses_a_line_with_json_loads_own_message(text):
    """The reader keeps one JSON decoder for every line (json.loads with an argument builds
    one per call); a refused line's message is still json.loads's, word for word."""
    from jaxsample.batch.reader import _refuse_constant

    try:
        json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        expected = str(err)
    line = check_line(2, text.encode(), set())
    assert line.error["code"] == "invalid_json"
    if text:  # an empty line has a message of its own
        assert f"not valid JSON ({expected});" in line.error["message"]


def test_reader_bad_utf8_is_a_line_error():
    line = check_line(3, b'{"custom_id": "\xff"}', set())
    assert line.error["code"] == "invalid_json" and line.key == 3


def test_a_lone_surrogate_custom_id_fails_its_line_alone(tmp_path):
    """JSON lets a string hold an unpaired surrogate escape; such a custom_id has no UTF-8
    form (it can be neither hashed for its shard nor written back), so its line is a
    missing_custom_id error keyed by its line number, and the rest of the job runs."""
    bad = request_line("q\ud800", chat_body("x"))  # json.dumps writes the escape
    assert '"q\\ud800"' in bad and json.loads(bad)["custom_id"] == "q\ud800"
    line = check_line(2, bad.encode(), set())
    assert line.error["code"] == "missing_custom_id" and line.key == 2 and line.custom_id is None
    assert "\\ud800" in line.error["message"]
    lines = [request_line("a", chat_body("x")), bad, request_line("b", chat_body("y"))]
    inp = _write(tmp_path / "in.jsonl", lines)
    (tmp_path / "m.gguf").write_bytes(b"fake model")
    for shards in (1, 2):
        for k in range(shards):
            cfg = JobConfig(inp, str(tmp_path / f"out{shards}.jsonl"), str(tmp_path / "m.gguf"))
            cfg = dataclasses.replace(cfg, shard=(k, shards), progress=False)
            assert run_job(cfg, engine=FakeEngine())["complete"]
        if shards > 1:
            merge_shards(cfg.output, shards)
        recs = canonical(cfg.output)
        assert set(recs) == {"a", "b", 2}
        assert json.loads(recs[2])["error"]["code"] == "missing_custom_id"


def test_a_refusal_naming_a_lone_surrogate_is_written_as_that_refusal(tmp_path):
    """A body field named with a lone surrogate escape is refused (400) naming it; the record
    holds the name, so it is written with \\u escapes, not turned into a server error."""
    bad = json.dumps(
        {**json.loads(request_line("s", chat_body("x"))), "body": {**chat_body("x"), "\ud800": 1}}
    )
    lines = [request_line("a", chat_body("x")), bad]
    inp = _write(tmp_path / "in.jsonl", lines)
    (tmp_path / "m.gguf").write_bytes(b"fake model")
    cfg = JobConfig(inp, str(tmp_path / "out.jsonl"), str(tmp_path / "m.gguf"), progress=False)
    summary = run_job(cfg, engine=FakeEngine())
    assert summary["complete"] and summary["records"]["refused"] == 1
    record = json.loads(canonical(cfg.output)["s"])
    assert record["response"]["status_code"] == 400
    assert record["response"]["body"]["error"]["param"] == "\ud800"
    assert Journal.open(cfg.output).done == {"a", "s"}  # reads back as written


def test_shard_of_is_stable_and_balanced():
    keys = [f"id-{i}" for i in range(4000)]
    counts = [0] * 4
    for k in keys:
        counts[shard_of(k, 4)] += 1
    assert all(abs(c - 1000) < 120 for c in counts), counts  # 4 sigma for a fair split
    # stable: the first 8 bytes of SHA-256, computed independently
    assert shard_of("x", 7) == int(hashlib.sha256(b"x").hexdigest()[:16], 16) % 7


def test_one_shard_hashes_no_key(monkeypatch):
    """With one process every line is its own: shard_of does not hash the custom_id."""
    from jaxsample.batch import reader

    assert shard_of("x", 3) == int(hashlib.sha256(b"x").hexdigest()[:16], 16) % 3

    def refuse(*_):
        raise AssertionError("hashed")

    monkeypatch.setattr(reader, "hashlib", types.SimpleNamespace(sha256=refuse))
    assert shard_of("x", 1) == 0 and shard_of(5, 1) == 0
    with pytest.raises(AssertionError, match="hashed"):
        shard_of("x", 2)


def test_a_planned_second_pass_yields_the_first_pass_lines(tmp_path):
    """read_lines(plan=...) parses only the lines the plan runs, without a set of custom_ids,
    and yields them as the plain pass does (a duplicate included)."""
    from jaxsample.batch.reader import RUN, RUN_DUPLICATE, SKIP

    lines = mixed_lines(12)
    path = _write(tmp_path / "in.jsonl", lines)
    first = list(read_lines(path))
    plan = bytearray()
    for i, line in enumerate(first):
        dup = line.error is not None and line.error["code"] == "duplicate_custom_id"
        plan.append(SKIP if i % 3 == 0 else RUN_DUPLICATE if dup else RUN)
    assert RUN_DUPLICATE in plan
    got = list(read_lines(path, plan=plan))
    assert got == [line for i, line in enumerate(first) if i % 3]
    assert list(read_lines(path, plan=plan[:4])) == [x for x in got if x.number <= 4]


# ---------------------------------------------------------------------------- journal


def _record(cid):
    return {"id": "i", "custom_id": cid, "response": {"status_code": 200, "body": {}}}


@given(st.integers(1, 8), st.data())
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_journal_cuts_any_torn_tail(tmp_path, n, data):
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), "j.jsonl")
    with Journal.open(path) as j:
        for i in range(n):
            j.append(_record(f"r{i}"))
    good = open(path, "rb").read()
    torn = json.dumps(_record("torn")).encode() + b"\n"
    cut = data.draw(st.integers(0, len(torn) - 1))  # any prefix of one more line
    with open(path, "ab") as f:
        f.write(torn[:cut])
    j = Journal.open(path)
    j.close()
    assert open(path, "rb").read() == good
    assert j.done == {f"r{i}" for i in range(n)} and j.repaired_bytes == cut


def test_journal_cuts_zero_filled_tail_and_refuses_garbage_inside(tmp_path):
    path = str(tmp_path / "j.jsonl")
    with Journal.open(path) as j:
        j.append(_record("a"))
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    Journal.open(path).close()
    assert open(path, "rb").read().count(b"\n") == 1
    with open(path, "ab") as f:
        f.write(b"not a record\n" + json.dumps(_record("b")).encode() + b"\n")
    with pytest.raises(JournalError, match="line 2 is not an output record"):
        Journal.open(path)


def test_journal_syncs_in_groups(tmp_path):
    j = Journal.open(str(tmp_path / "j.jsonl"), sync_lines=4, sync_seconds=3600)
    for i in range(10):
        j.append(_record(f"r{i}"))
    assert j.syncs == 2  # after lines 4 and 8
    j.close()
    assert j.syncs == 3  # the last 2 at close


def test_journal_refuses_nan_without_writing(tmp_path):
    path = str(tmp_path / "j.jsonl")
    with Journal.open(path) as j:
        with pytest.raises(ValueError):
            j.append({"custom_id": "a", "response": {"body": {"x": float("nan")}}})
    assert os.path.getsize(path) == 0


# ---------------------------------------------------------------------------- the job


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def job(tmp_path):
    inp = _write(tmp_path / "in.jsonl", mixed_lines(40))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"fake model")

    def make(out="out.jsonl", **kw):
        kw.setdefault("progress", False)
        return JobConfig(input=inp, output=str(tmp_path / out), model=str(model), **kw)

    return make


def test_every_line_gets_exactly_one_record(job):
    cfg = job()
    engine = FakeEngine(slots=4)
    summary = run_job(cfg, engine=engine)
    lines = open(cfg.input).read().splitlines()
    recs = canonical(cfg.output)
    assert len(recs) == len(lines) and summary["complete"]
    assert engine.max_in_flight <= 4  # the input is pulled lazily
    by_code = {}
    for key, rec in recs.items():
        r = json.loads(rec)
        code = r["error"]["code"] if r["error"] else r["response"]["status_code"]
        by_code.setdefault(code, []).append(key)
    assert sorted(k for k in by_code[200]) == sorted(f"req-{i}" for i in range(40))
    assert sorted(by_code[400]) == ["bad-temperature", "unknown-field"]
    assert by_code["duplicate_custom_id"] and by_code["missing_custom_id"]
    assert by_code["invalid_url"] == ["wrong-url"] and by_code["invalid_method"] == ["wrong-method"]
    refused = json.loads(recs["bad-temperature"])["response"]["body"]["error"]
    assert refused["param"] == "temperature" and refused["type"] == "invalid_request_error"
    t = summary["records"]
    assert (t["ok"], t["refused"], t["failed"]) == (40, 2, len(lines) - 42)
    saved = json.load(open(cfg.output + ".summary.json"))
    assert saved["records"] == t and saved["complete"]


@given(st.integers(0, 41), st.integers(0, 3), st.booleans())
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(job, crash_after, order, torn):
    name = os.path.join(tempfile.mkdtemp(dir=os.path.dirname(job().output)), "out.jsonl")
    whole = job(out=name.replace("out.jsonl", "whole.jsonl"))
    run_job(whole, engine=FakeEngine(slots=5))
    cfg = job(out=name)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=FakeEngine(slots=3, fail_after=crash_after, order_seed=order))
    ran_before = sum(json.loads(r)["response"] is not None for r in canonical(cfg.output).values())
    assert ran_before == crash_after
    if torn:
        with open(cfg.output, "ab") as f:
            f.write(b'{"id":"batch_req_x","custom_id":"req-3","resp')
    engine = FakeEngine(slots=7, order_seed=order + 1)
    summary = run_job(cfg, engine=engine)
    assert canonical(cfg.output) == canonical(whole.output)
    assert engine.results == 42 - ran_before  # nothing done before the crash ran again
    assert summary["this_run"]["requests"] == summary["lines"] - summary["this_run"]["skipped_done"]


def test_finished_job_does_not_load_the_engine(job):
    cfg = job()
    run_job(cfg, engine=FakeEngine())

    def boom():
        raise AssertionError("loaded the engine for a complete job")

    summary = run_job(cfg, engine_factory=boom)
    assert summary["complete"] and summary["this_run"]["requests"] == 0
    from jaxsample.batch.summary import format_summary

    text = format_summary(summary)  # no rates over 0 requests in 0.0 s
    lines = summary["lines"]
    assert f"this run: nothing left to run, {lines} already done" in text and "req/s" not in text


@pytest.mark.parametrize(
    "change",
    ["input", "model", "job_seed", "dtype", "max_seq_len", "shard", "seed_rule"],
)
def test_resume_with_other_input_model_or_settings_is_refused(job, change, tmp_path, monkeypatch):
    cfg = job()
    with pytest.raises(RuntimeError):
        run_job(cfg, engine=FakeEngine(fail_after=5))
    if change == "input":
        with open(cfg.input, "a") as f:
            f.write(request_line("new", chat_body("x")) + "\n")
    elif change == "model":
        with open(cfg.model, "ab") as f:
            f.write(b"!")
    elif change == "seed_rule":  # a job started by a jaxsample that derived seeds otherwise
        import jaxsample.batch.job as job_module

        monkeypatch.setattr(job_module, "SEED_RULE", job_module.SEED_RULE + 1)
    else:
        value = {"job_seed": 1, "dtype": "bfloat16", "max_seq_len": 64}
        cfg = job(**{change: value[change]}) if change != "shard" else job(shard=(0, 1))
        if change == "shard":  # the same output path read as a shard of two
            os.rename(cfg.output, shard_output(cfg.output, 0, 2))
            os.rename(
                cfg.output + ".manifest.json", shard_output(cfg.output, 0, 2) + ".manifest.json"
            )
            cfg = job(shard=(0, 2))
    before = open(shard_output(cfg.output, *cfg.shard), "rb").read()
    with pytest.raises(ManifestError, match="will not resume") as err:
        run_job(cfg, engine=FakeEngine())
    assert (change if change in ("input", "model") else f"settings.{change}") in str(
        err.value
    ) or change == "shard"
    assert open(shard_output(cfg.output, *cfg.shard), "rb").read() == before


def test_a_request_that_failed_unexpectedly_is_status_500():
    def body(kind):
        return {"error": {"message": "x", "type": kind, "param": None, "code": None}}

    assert response_record("a", body("server_error"))["response"]["status_code"] == 500
    assert response_record("b", body("invalid_request_error"))["response"]["status_code"] == 400


def test_server_errors_are_counted_apart_from_refusals(tmp_path, capsys):
    """A 500 (the request failed unexpectedly while it was prepared) is not the request's
    fault: the summary counts it apart from the 400 refusals, in the file and on stderr."""
    from jaxsample.batch.job import print_summary

    class Failing(FakeEngine):
        def answer(self, key, body, job_seed):
            if key == "boom":
                return {"error": {"message": "x", "type": "server_error", "param": None}}
            return super().answer(key, body, job_seed)

    lines = [
        request_line("ok", chat_body("x")),
        request_line("boom", chat_body("x")),
        request_line("bad", chat_body("x", temperature=-1)),
        "{bad json",
    ]
    inp = _write(tmp_path / "in.jsonl", lines)
    (tmp_path / "m.gguf").write_bytes(b"fake model")
    cfg = JobConfig(inp, str(tmp_path / "out.jsonl"), str(tmp_path / "m.gguf"), progress=False)
    summary = run_job(cfg, engine=Failing())
    t = summary["records"]
    assert (t["ok"], t["refused"], t["server_errors"], t["failed"]) == (1, 1, 1, 1)
    assert t["records"] == t["ok"] + t["errors"] == 4
    print_summary(summary)
    assert "(1 ok, 1 refused, 1 server errors, 1 failed lines)" in capsys.readouterr().err
    resumed = run_job(cfg, engine=Failing())  # counted again from the output on resume
    assert resumed["records"] == t


def test_a_run_that_wrote_nothing_does_not_tie_the_output(job):
    """A run that failed before its first record (say, on a model file that would not load)
    left a manifest and an empty output: a run with another model (or input, or settings)
    replaces that manifest instead of refusing, since no record depends on it."""
    cfg = job()

    def broken_model():
        raise RuntimeError("the model file would not load")

    with pytest.raises(RuntimeError, match="would not load"):
        run_job(cfg, engine_factory=broken_model)
    assert os.path.getsize(cfg.output) == 0 and os.path.exists(cfg.output + ".manifest.json")
    with open(cfg.model, "ab") as f:  # another model file
        f.write(b"!")
    summary = run_job(cfg, engine=FakeEngine())
    assert summary["complete"]
    assert json.loads(open(cfg.output + ".manifest.json").read())["model"]["size"] == (
        os.path.getsize(cfg.model)
    )


def test_output_not_written_by_the_job_is_refused(job):
    cfg = job()
    with open(cfg.output, "w") as f:
        f.write("precious\n")
    with pytest.raises(ManifestError, match="was not started by jaxsample batch"):
        run_job(cfg, engine=FakeEngine())
    assert open(cfg.output).read() == "precious\n"


def _count_parses(monkeypatch) -> list[int]:
    from jaxsample.batch import reader

    calls = [0]
    check = reader.check_line

    def counted(*args, **kwargs):
        calls[0] += 1
        return check(*args, **kwargs)

    monkeypatch.setattr(reader, "check_line", counted)
    return calls


def test_a_resume_parses_lines_done_or_of_other_shards_once(job, monkeypatch):
    """The input is read twice (to count, then to run), but the second pass parses only the
    lines it runs: a line already done, or another process's, is parsed once. (It was
    parsed twice: a resume at 80% of a 50,000-line job parsed 90,000 lines more than it
    ran, scripts/bench_batch_scale.py.)"""
    n_lines = len(open(job().input).read().splitlines())
    whole = job(out="whole.jsonl")
    run_job(whole, engine=FakeEngine(slots=5))
    cfg = job()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=FakeEngine(slots=3, fail_after=25))
    parses = _count_parses(monkeypatch)
    summary = run_job(cfg, engine=FakeEngine(slots=4))
    run = summary["this_run"]
    assert 0 < run["requests"] < n_lines - 25 and run["skipped_done"] >= 25
    assert parses[0] == n_lines + run["requests"]  # each done line once
    assert canonical(cfg.output) == canonical(whole.output)
    for k in range(3):
        parses[0] = 0
        summary = run_job(job(out="sharded.jsonl", shard=(k, 3)), engine=FakeEngine())
        assert 0 < summary["lines"] < n_lines
        assert parses[0] == n_lines + summary["lines"]  # another shard's line once
    merge_shards(job(out="sharded.jsonl").output, 3)
    assert canonical(job(out="sharded.jsonl").output) == canonical(whole.output)


def test_the_engine_hashes_the_model_graph_once_not_per_request(tmp_path, monkeypatch):
    """The model's graph definition is a static argument of the engine's compiled calls
    (one admission per request, one chunk per round trip), which jit hashes at every call:
    flax walks every node of it (710 µs per call for SmolLM2 here). The host loop hashes it
    once; a job through the real engine (a tiny GGUF model) computes no GraphDef hash per
    request."""
    from flax import nnx
    from tiny_gguf import write_tiny_gguf

    from jaxsample.batch.job import load_engine

    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model)

    def config(name: str, n: int) -> JobConfig:
        lines = [request_line(f"r{i}", chat_body("hi", max_tokens=1 + i % 3)) for i in range(n)]
        inp = _write(tmp_path / f"{name}.jsonl", lines)
        out = str(tmp_path / f"{name}.out.jsonl")
        return JobConfig(input=inp, output=out, model=str(model), slots=4, progress=False)

    warm = config("warm", 4)
    engine = load_engine(warm)
    run_job(warm, engine=engine)  # compiles
    hashes = [0]
    plain = nnx.GraphDef.__hash__

    def counted(self):
        hashes[0] += 1
        return plain(self)

    monkeypatch.setattr(nnx.GraphDef, "__hash__", counted)
    summary = run_job(config("job", 24), engine=engine)
    assert summary["complete"] and summary["records"]["ok"] == 24
    assert hashes[0] <= 1  # it was at least one per request (24 admissions + the chunks)
    monkeypatch.undo()
    again = run_job(config("again", 24), engine=engine)  # same answers, per custom_id
    assert canonical(again["output"]) == canonical(summary["output"])


def test_shards_cover_the_input_once_and_merge_equals_one_process(job):
    single = job(out="single.jsonl")
    run_job(single, engine=FakeEngine())
    shards = [job(out="multi.jsonl", shard=(k, 3)) for k in range(3)]
    with pytest.raises(MergeError, match="3 of 3 shards are missing or incomplete"):
        merge_shards(shards[0].output, 3)
    sizes = []
    for cfg in shards:
        s = run_job(cfg, engine=FakeEngine(order_seed=cfg.shard[0]))
        sizes.append(s["lines"])
        assert os.path.exists(shard_output(cfg.output, *cfg.shard))
    assert min(sizes) > 0
    merged = merge_shards(shards[0].output, 3)
    assert canonical(shards[0].output) == canonical(single.output)
    assert merged["records"]["records"] == len(canonical(single.output)) == sum(sizes)


# ---------------------------------------------------------------------------- memory


def _peak_bytes(tmp_path, monkeypatch, n: int) -> int:
    from jaxsample.batch import manifest
    from jaxsample.batch.manifest import file_identity

    inp = _write(tmp_path / f"in{n}.jsonl", mixed_lines(n, bad=False))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"m")
    cfg = JobConfig(
        input=inp,
        output=str(tmp_path / f"out{n}.jsonl"),
        model=str(model),
        progress=False,
        sync_lines=10**6,
        sync_seconds=3600,
    )
    # the manifest hashes the input in blocks of up to 4 MiB: with the whole (small) file in
    # one block, that block was the peak, and the test measured the input's size per line
    monkeypatch.setattr(manifest, "file_identity", functools.partial(file_identity, block=4096))
    tracemalloc.start()
    try:
        run_job(cfg, engine=FakeEngine(slots=16))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_only_with_the_custom_id_sets(tmp_path, monkeypatch):
    """Peak Python memory for 1,000 and 4,000 lines: the difference per line stays under
    250 bytes (the custom_ids, in the reader's set while the lines are counted, then in the
    set of those done: 83 bytes here), not a line's body or output (~400 and ~600 bytes
    here). docs/batch.md has the RSS of a 100,000-line run."""
    small, big = _peak_bytes(tmp_path, monkeypatch, 1000), _peak_bytes(tmp_path, monkeypatch, 4000)
    per_line = (big - small) / 3000
    print(f"peak {small} -> {big} bytes: {per_line:.0f} bytes per line")
    assert per_line < 250, (small, big, per_line)


def test_output_equal_to_input_and_bad_shard_are_refused(job):
    from jaxsample.batch.job import JobError

    cfg = job()
    with pytest.raises(JobError, match="is the input file"):
        run_job(JobConfig(input=cfg.input, output=cfg.input, model=cfg.model), engine=FakeEngine())
    with pytest.raises(JobError, match="process index"):
        run_job(job(shard=(2, 2)), engine=FakeEngine())


def test_a_second_run_on_the_same_output_is_refused_while_the_lock_is_held(job):
    import fcntl

    from jaxsample.batch.job import JobError, lock_path

    cfg = job()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=FakeEngine(fail_after=5))
    before = {p: open(p, "rb").read() for p in (cfg.output, cfg.output + ".manifest.json")}
    holder = os.open(lock_path(cfg.output), os.O_RDWR)  # as another running job holds it
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(holder, b"4242 otherhost\n", 0)
    try:
        engine = FakeEngine()
        with pytest.raises(JobError) as err:
            run_job(cfg, engine=engine)
        msg = str(err.value)
        assert cfg.output in msg and lock_path(cfg.output) in msg
        assert "pid 4242 on otherhost" in msg and "wait for it" in msg and "stop it" in msg
        assert engine.results == 0
        assert {p: open(p, "rb").read() for p in before} == before
        assert not os.path.exists(cfg.output + ".summary.json")
    finally:
        os.close(holder)  # released: as when the other job exits (or is killed)
    summary = run_job(cfg, engine=FakeEngine())
    assert summary["complete"]
    assert summary["this_run"]["skipped_done"] == before[cfg.output].count(b"\n") > 0


def test_a_shard_has_its_own_lock(job):
    import fcntl

    from jaxsample.batch.job import JobError, lock_path

    shard = job(shard=(1, 2))
    holder = os.open(lock_path(shard_output(shard.output, 1, 2)), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(JobError, match="shard-00001-of-00002.lock"):
            run_job(shard, engine=FakeEngine())
        assert run_job(job(shard=(0, 2)), engine=FakeEngine())["complete"]
    finally:
        os.close(holder)


def test_a_torn_tail_cut_on_resume_is_in_the_printed_summary(job):
    from jaxsample.batch.summary import format_summary

    cfg = job()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=FakeEngine(fail_after=3))
    with open(cfg.output, "ab") as f:
        f.write(b'{"custom_id": "req-1", "resp')
    text = format_summary(run_job(cfg, engine=FakeEngine()))
    assert "28 bytes of a torn last line cut off" in text and "fsyncs" in text
    assert "model load" in text


def test_no_default_model_is_a_job_error(job, monkeypatch):
    import jaxsample.model
    from jaxsample.batch.job import JobError

    def missing():
        raise jaxsample.model.ModelNotFoundError("no default model; install it with: pip ...")

    monkeypatch.setattr(jaxsample.model, "default_model_path", missing)
    cfg = dataclasses.replace(job(), model=None)
    with pytest.raises(JobError, match="install it with"):
        run_job(cfg, engine=FakeEngine())
    assert not os.path.exists(cfg.output)


# ---------------------------------------------------------------------------- the command


def _cut_gguf(path) -> str:
    """A tiny GGUF file without its last 1000 bytes of tensor data."""
    from tiny_gguf import write_tiny_gguf

    write_tiny_gguf(path)
    os.truncate(path, os.path.getsize(path) - 1000)
    return str(path)


def _command(tmp_path, *flags, input_path=None):
    """Runs ``jaxsample batch`` in this process on a one-line input (or ``input_path``) with a
    whole (tiny) GGUF file; returns its exit status and the files it added to ``tmp_path``."""
    from tiny_gguf import write_tiny_gguf

    from jaxsample.batch.command import run
    from jaxsample.cli import _parser

    inp = _write(tmp_path / "in.jsonl", [request_line("a", chat_body("x"))])
    inp = inp if input_path is None else str(input_path)
    gguf = tmp_path / "m.gguf"
    write_tiny_gguf(gguf)
    before = set(os.listdir(tmp_path))
    argv = ["batch", inp, "--no-compile-cache", "--model", str(gguf), *flags]
    status = run(_parser().parse_args(argv))
    return status, sorted(set(os.listdir(tmp_path)) - before)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-dir", "no directory"),
        ("output-dir", "is a directory"),
        ("no-model", "No such file"),
        ("not-gguf", "is not a GGUF file"),
        ("cut-gguf", "is truncated: expected"),
        ("process-id", "--process-id 5: must lie in [0, 2)"),
        ("no-process-id", "several hosts need --process-id too"),
        ("no-num-processes", "several hosts need --num-processes too"),
        ("max-seq-len", "--max-seq-len 100000000: must lie in [1, 512], the context length"),
        ("devices", "--devices 99: this process has"),
        ("sync-nan", "--sync-seconds nan: must be a finite number >= 0"),
        ("merge-timeout", "--merge-timeout -1.0: must be a finite number >= 0"),
        ("input-pipe", "is not a regular file"),
    ],
)
def test_bad_paths_and_flags_exit_2_without_writing(tmp_path, capsys, case, message):
    out = str(tmp_path / "out.jsonl")
    flags = {
        "no-dir": ["-o", str(tmp_path / "nonexistent" / "out.jsonl")],
        "output-dir": ["-o", str(tmp_path)],
        "no-model": ["-o", out, "--model", str(tmp_path / "nope.gguf")],
        "not-gguf": ["-o", out, "--model", _write(tmp_path / "text.gguf", ["not a model"])],
        "cut-gguf": ["-o", out, "--model", _cut_gguf(tmp_path / "cut.gguf")],
        "process-id": ["-o", out, "--num-processes", "2", "--process-id", "5"]
        + ["--coordinator-address", "127.0.0.1:1"],
        "no-process-id": ["-o", out, "--num-processes", "2"],
        "no-num-processes": ["-o", out, "--process-id", "0", "--coordinator-address", "h:1"],
        "max-seq-len": ["-o", out, "--max-seq-len", "100000000"],  # the file's context: 512
        "devices": ["-o", out, "--devices", "99"],  # was status 1, after the manifest
        "sync-nan": ["-o", out, "--sync-seconds", "nan"],  # never synced by time
        "merge-timeout": ["-o", out, "--merge-timeout", "-1"],
        "input-pipe": ["-o", out],  # as <(zcat requests.jsonl.gz) gives
    }[case]
    pipe = None
    if case == "input-pipe":
        pipe = tmp_path / "pipe"
        os.mkfifo(pipe)
    status, left = _command(tmp_path, *flags, input_path=pipe)
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsample batch: ") and message in err and "Traceback" not in err
    assert left == []


def test_a_max_seq_len_beyond_the_context_is_a_job_error(job):
    """Through the job's API (no command line checks): refused with the range, before any
    record is written, instead of allocating every slot's KV cache for it."""
    from tiny_gguf import write_tiny_gguf

    from jaxsample.batch.job import JobError

    cfg = job()
    write_tiny_gguf(cfg.model)  # context length 512
    cfg = dataclasses.replace(cfg, max_seq_len=10**8, slots=2)
    with pytest.raises(
        JobError, match=r"--max-seq-len 100000000: must be an integer in \[1, 512\]"
    ):
        run_job(cfg)
    assert os.path.getsize(cfg.output) == 0
    # another setting the engine refuses is named as itself, not as --max-seq-len
    cfg = dataclasses.replace(cfg, max_seq_len=None, chunk_steps=0)
    with pytest.raises(JobError, match=r"^--chunk-steps 0: must be an integer >= 1"):
        run_job(cfg)


def test_job_seed_outside_int64_is_a_usage_error(capsys):
    from jaxsample.cli import _parser

    for seed in ("99999999999999999999999", str(-(2**63) - 1)):
        with pytest.raises(SystemExit) as exit:
            _parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl", "--job-seed", seed])
        assert exit.value.code == 2
        assert "[-2**63, 2**63 - 1]" in capsys.readouterr().err
    args = _parser().parse_args(["batch", "i", "-o", "o", "--job-seed", str(2**63 - 1)])
    assert args.job_seed == 2**63 - 1


def test_distributed_flags_from_a_bad_environment_variable_are_a_usage_error(monkeypatch, capsys):
    from jaxsample.cli import _parser

    monkeypatch.setenv("JAXSAMPLE_PROCESS_ID", "-1")
    with pytest.raises(SystemExit) as exit:
        _parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl"])
    assert exit.value.code == 2 and "--process-id" in capsys.readouterr().err
    _parser().parse_args(["generate", "--prompt", "hi"])  # other commands do not read it


# ---------------------------------------------------------------------------- as an operator


def _operator_command(tmp_path, monkeypatch, engine, *flags, lines=None, out="out.jsonl"):
    """Runs ``jaxsample batch`` in this process as an operator types it, on ``lines``
    (default: the mixed 40-request input), with ``engine`` in place of the model's (the
    command's own checks, the lock, the manifest, the journal and the messages are real).
    Returns (exit status, output path)."""
    from tiny_gguf import write_tiny_gguf

    import jaxsample.batch.job as job_module
    from jaxsample.batch.command import run
    from jaxsample.cli import _parser

    inp = tmp_path / "in.jsonl"
    if lines is not None or not inp.exists():
        _write(inp, mixed_lines(40) if lines is None else lines)
    gguf = tmp_path / "m.gguf"
    if not gguf.exists():
        write_tiny_gguf(gguf)
    monkeypatch.setattr(job_module, "load_engine", lambda cfg, model_name=None: engine)
    output = str(tmp_path / out)
    argv = ["batch", str(inp), "-o", output, "--model", str(gguf), "--no-compile-cache"]
    return run(_parser().parse_args([*argv, "--no-progress", *flags])), output


def _reference(tmp_path, monkeypatch) -> dict:
    """The uninterrupted run's records of the mixed 40-request input."""
    status, out = _operator_command(tmp_path, monkeypatch, FakeEngine(), out="whole.jsonl")
    assert status == 0
    return canonical(out)


@pytest.mark.parametrize("where", ["record", "fsync", "summary"])
def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch, capsys, where):
    """ENOSPC while a record is written (a part of the line reaches the file), while the
    journal syncs, or while the summary is written: exit status 1 and one line naming the
    file and the cause, no traceback; once there is room the same command resumes, and the
    output equals an uninterrupted run's."""
    import errno

    import jaxsample.batch.journal as journal_module
    import jaxsample.batch.summary as summary_module

    whole = _reference(tmp_path, monkeypatch)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_write, real_fsync, real_dump = os.write, os.fsync, json.dump
    calls = {"n": 0}

    class Disk:  # the os module as journal.py sees it, with a disk that fills up
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            calls["n"] += 1
            if where == "record" and calls["n"] > 12:
                real_write(fd, bytes(data[:10]))
                raise full
            return real_write(fd, data)

        def fsync(self, fd):
            if where == "fsync" and calls["n"] > 20:
                raise full
            return real_fsync(fd)

    def dump(obj, f, **kw):
        if "this_run" in obj:  # the summary
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(journal_module, "os", Disk())
    if where == "summary":
        monkeypatch.setattr(summary_module.json, "dump", dump)
    capsys.readouterr()
    status, out = _operator_command(tmp_path, monkeypatch, FakeEngine(), "--sync-lines", "4")
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "resume" in err
    assert (out if where != "summary" else out + ".summary.json") in err
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no half-written file
    monkeypatch.undo()  # room again
    status, out = _operator_command(tmp_path, monkeypatch, FakeEngine())
    assert status == 0
    assert canonical(out) == whole


def test_sigterm_stops_with_a_message_status_143_and_synced_lines(tmp_path, monkeypatch, capsys):
    """SIGTERM (a preemption notice, a scheduler stopping the job) used to end the process at
    once, with no message and no fsync of the last group of lines. Now it stops like Ctrl-C:
    one line naming the output, exit status 143, every written line synced, and the same
    command resumes to an output equal to an uninterrupted run's."""
    import signal

    whole = _reference(tmp_path, monkeypatch)
    sent, syncs_after = [], []
    real_fsync = os.fsync

    def fsync(fd):
        if sent:
            syncs_after.append(fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    class Preempted(FakeEngine):
        def answer(self, key, body, job_seed):
            if self.results == 10:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode
            return super().answer(key, body, job_seed)

    # the test's own handler stands in for the default one (which would end pytest): a
    # command that does not handle SIGTERM runs on to status 0
    ignored = []

    def mine(*args):
        ignored.append(args)

    before = signal.signal(signal.SIGTERM, mine)
    try:
        capsys.readouterr()
        status, out = _operator_command(
            tmp_path, monkeypatch, Preempted(), "--sync-lines", "1000", "--sync-seconds", "3600"
        )
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert sent and not ignored and status == 143, err
    assert restored is mine  # the command puts the handler it found back
    assert "SIGTERM" in err and out in err and "resume" in err and "Traceback" not in err
    written = open(out, "rb").read()
    assert 0 < written.count(b"\n") < len(whole) and written.endswith(b"\n")
    assert syncs_after  # the lines since the last sync were synced on the way out
    status, out = _operator_command(tmp_path, monkeypatch, FakeEngine())
    assert status == 0 and canonical(out) == whole


def test_ctrl_c_while_process_0_waits_for_the_other_shards_is_status_130(
    tmp_path, monkeypatch, capsys
):
    """Process 0 finished its shard and waits for the others: Ctrl-C there printed a
    traceback from time.sleep; now the one-line message and status 130."""
    import jaxsample.batch.command as command_module
    import jaxsample.batch.merge as merge_module

    monkeypatch.setattr(command_module, "_shard", lambda args: (0, 2))

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module.time, "sleep", interrupted)
    capsys.readouterr()
    try:
        status, out = _operator_command(tmp_path, monkeypatch, FakeEngine())
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command (a traceback)")
    err = capsys.readouterr().err
    assert status == 130, err
    assert "Ctrl-C" in err and "Traceback" not in err
    assert read_summary_complete(shard_output(out, 0, 2))


def read_summary_complete(path) -> bool:
    from jaxsample.batch.summary import read_summary

    return bool((read_summary(path) or {}).get("complete"))


def test_distributed_without_a_cluster_is_one_line_not_a_jax_traceback(tmp_path):
    """``--distributed`` on a machine where JAX finds no cluster (no TPU pod, no SLURM):
    jax.distributed.initialize raised ValueError deep in JAX; now a usage error (status 2)
    that says which flags to give, and nothing is written. (A process of its own: in this
    one JAX has started its backend, after which initialize refuses for another reason.)"""
    import subprocess
    import sys

    from tiny_gguf import write_tiny_gguf

    inp = _write(tmp_path / "in.jsonl", [request_line("a", chat_body("x"))])
    write_tiny_gguf(tmp_path / "m.gguf")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSAMPLE_")}
    env.update(PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["batch", inp, "-o", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "m.gguf")]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsample.cli", *argv, "--distributed"],
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.startswith("jaxsample batch: --distributed") and "Traceback" not in err
    assert "--coordinator-address" in err and len(err.strip().splitlines()) == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.jsonl")]


def test_an_engine_failure_is_one_line_with_the_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    """The engine fails part way (here out of memory, as with too many --slots): one line
    with the cause and a hint, the traceback in OUTPUT.error.log, status 1; the records
    written are kept, and a resume with fewer slots (slots do not change an answer)
    completes the output, equal to an uninterrupted run's."""
    whole = _reference(tmp_path, monkeypatch)

    class OutOfMemory(FakeEngine):
        def answer(self, key, body, job_seed):
            if self.results == 6:
                raise MemoryError("Unable to allocate 124. GiB for an array")
            return super().answer(key, body, job_seed)

    capsys.readouterr()
    status, out = _operator_command(tmp_path, monkeypatch, OutOfMemory(), "--slots", "512")
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "MemoryError: Unable to allocate 124. GiB" in err and "fewer --slots" in err
    log = open(out + ".error.log").read()
    assert log.startswith("Traceback") and "MemoryError" in log and out + ".error.log" in err
    assert open(out, "rb").read().count(b"\n") > 0  # records written before: kept
    status, out = _operator_command(tmp_path, monkeypatch, FakeEngine(), "--slots", "16")
    assert status == 0 and canonical(out) == whole
    assert not os.path.exists(out + ".error.log")  # stale once the job has completed


@pytest.mark.parametrize("change", ["slots", "chunk_steps"])
def test_a_resume_may_change_slots_and_chunk_steps(job, change):
    """The engine's answers do not depend on the slot count or the chunk steps (the engine's
    contract; tests/test_batch_cli.py resumes a real run with other values), and a resume
    on a smaller machine, or after running out of memory with too many slots, needs other
    values: a resume with them continues instead of refusing."""
    whole = job(out="whole.jsonl")
    run_job(whole, engine=FakeEngine())
    cfg = job()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=FakeEngine(fail_after=5))
    other = job(**{change: {"slots": 3, "chunk_steps": 7}[change]})
    summary = run_job(other, engine=FakeEngine(slots=3))
    assert summary["complete"] and summary["this_run"]["skipped_done"] > 0
    assert canonical(other.output) == canonical(whole.output)


def test_a_bfloat16_resume_may_change_the_slot_count(job):
    """bfloat16 answers do not depend on the slot count either (since session 16; before,
    a batch filling the invariant width exactly rounded differently and this was refused)."""
    cfg = job(dtype="bfloat16")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=FakeEngine(fail_after=5))
    summary = run_job(job(dtype="bfloat16", slots=3, chunk_steps=7), engine=FakeEngine(slots=3))
    assert summary["complete"] and summary["this_run"]["skipped_done"] > 0


def test_a_stale_complete_summary_does_not_let_a_partial_shard_be_merged(job):
    """An operator reran a finished two-process job from scratch (the shard outputs removed,
    their summaries left); process 1 is part way when process 0 looks. Its old summary said
    complete, so process 0 merged the partial shard: records were lost from the merged
    output. Now a run removes its summary when it starts, and the merge counts each shard's
    records against its summary."""
    shards = [job(out="two.jsonl", shard=(k, 2)) for k in range(2)]
    for cfg in shards:
        run_job(cfg, engine=FakeEngine())
    one = shard_output(shards[1].output, 1, 2)
    total = len(canonical(one))
    os.remove(one)  # start over, the summary left behind
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(shards[1], engine=FakeEngine(fail_after=3))
    assert not read_summary_complete(one)
    with pytest.raises(MergeError, match="missing or incomplete"):
        merge_shards(shards[0].output, 2)
    run_job(shards[1], engine=FakeEngine())
    assert len(canonical(one)) == total
    # a complete shard that lost lines after its run (a copy cut short, say) is refused
    data = open(one, "rb").read().splitlines(keepends=True)
    open(one, "wb").write(b"".join(data[:-2]))
    with pytest.raises(MergeError, match=f"has {total - 2} records, its summary says {total}"):
        merge_shards(shards[0].output, 2)
    open(one, "wb").write(b"".join(data[:-1]) + b"not json\n")
    with pytest.raises(MergeError, match="line .* is not a whole record"):
        merge_shards(shards[0].output, 2)


def test_an_input_file_that_grows_while_the_job_runs_is_refused_not_half_run(job):
    """The input is still being written (a copy not finished, a generator still appending)
    when the job starts. The lines added during the run used to run too, under a manifest
    that hashed only the first bytes, and the job then called itself INCOMPLETE while a
    resume was refused. Now the job reads only the bytes it hashed and says the file changed
    (JobError, exit status 1 from the command)."""
    from jaxsample.batch.job import JobError

    cfg = job()
    original = {line.key for line in read_lines(cfg.input)}

    class Appending(FakeEngine):
        def answer(self, key, body, job_seed):
            if self.results == 2:
                with open(cfg.input, "a") as f:
                    f.write(request_line("late-1", chat_body("x")) + "\n")
                    f.write(request_line("late-2", chat_body("y")) + "\n")
            return super().answer(key, body, job_seed)

    with pytest.raises(JobError, match="changed while the job ran"):
        run_job(cfg, engine=Appending())
    assert set(canonical(cfg.output)) == original  # every hashed line, none of the new ones


def test_a_ctrl_c_after_the_job_is_done_does_not_turn_it_into_a_traceback(tmp_path):
    """Ctrl-C landing after the summary, while JAX and Python shut down, printed a
    KeyboardInterrupt traceback from JAX's exit handlers and the process ended with -2
    (SIGINT) although the output was complete (seen in a loop of Ctrl-C at random moments).
    The command, run as a program, ignores SIGINT once its work is done."""
    import subprocess
    import sys

    from tiny_gguf import write_tiny_gguf

    inp = _write(tmp_path / "in.jsonl", mixed_lines(5))
    model = tmp_path / "m.gguf"
    write_tiny_gguf(model)
    out = str(tmp_path / "out.jsonl")
    cfg = JobConfig(inp, out, str(model), progress=False)
    assert run_job(cfg, engine=FakeEngine())["complete"]  # the command loads no engine now
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal\n"
        "import jaxsample.cli as cli\n"
        f"sys.argv = ['jaxsample', 'batch', {inp!r}, '-o', {out!r}, '--model', {str(model)!r}]\n"
        "status = cli.main()\n"
        "os.kill(os.getpid(), signal.SIGINT)  # the user's late Ctrl-C\n"
        "time.sleep(0.2)\n"
        "sys.exit(status)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "complete" in proc.stderr


def test_a_killed_merge_leaves_no_temporary_file_behind(job):
    """A merge killed while it copies the shards (process 0 preempted) left
    OUTPUT.merge-tmp-PID, as large as the whole output, and nothing ever removed it. The next
    merge removes it, under OUTPUT.lock so that no running merge loses its file."""
    shards = [job(out="m.jsonl", shard=(k, 2)) for k in range(2)]
    for cfg in shards:
        run_job(cfg, engine=FakeEngine())
    stale = shards[0].output + ".merge-tmp-99999"
    with open(stale, "wb") as f:
        f.write(b'{"half": "of a merge"')
    merge_shards(shards[0].output, 2)
    assert not os.path.exists(stale)
    single = job(out="single.jsonl")
    run_job(single, engine=FakeEngine())
    assert canonical(shards[0].output) == canonical(single.output)
