"""The batch job's layers with a fast fake engine (no model): reader, journal, manifest,
resume, shards and merge, memory. The real-engine runs (kill -9, two processes) are in
tests/test_batch_cli.py."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import tracemalloc

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
        url = "/v1/completions" if kind == "url" else "/v1/chat/completions"
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
    import hashlib

    assert shard_of("x", 7) == int(hashlib.sha256(b"x").hexdigest()[:16], 16) % 7


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


@pytest.mark.parametrize(
    "change",
    ["input", "model", "slots", "job_seed", "dtype", "max_seq_len", "shard", "seed_rule"],
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
        value = {"slots": 99, "job_seed": 1, "dtype": "bfloat16", "max_seq_len": 64}
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


def _peak_bytes(tmp_path, n: int) -> int:
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
    tracemalloc.start()
    try:
        run_job(cfg, engine=FakeEngine(slots=16))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_only_with_the_custom_id_sets(tmp_path):
    """Peak Python memory for 1,000 and 4,000 lines: the difference per line stays under
    400 bytes (the sets of seen and done custom_ids), not a line's body or output (~400 and
    ~600 bytes here). docs/batch.md has the RSS of a 100,000-line run."""
    small, big = _peak_bytes(tmp_path, 1000), _peak_bytes(tmp_path, 4000)
    per_line = (big - small) / 3000
    print(f"peak {small} -> {big} bytes: {per_line:.0f} bytes per line")
    assert per_line < 400, (small, big, per_line)


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


def _command(tmp_path, *flags):
    """Runs ``jaxsample batch`` in this process on a one-line input with a whole (tiny) GGUF
    file; returns its exit status and the files it added to ``tmp_path``."""
    from tiny_gguf import write_tiny_gguf

    from jaxsample.batch.command import run
    from jaxsample.cli import _parser

    inp = _write(tmp_path / "in.jsonl", [request_line("a", chat_body("x"))])
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
        ("no-coordinator", "several hosts need --coordinator-address too"),
        ("max-seq-len", "--max-seq-len 100000000: must lie in [1, 512], the context length"),
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
        "no-coordinator": ["-o", out, "--num-processes", "2", "--process-id", "0"],
        "max-seq-len": ["-o", out, "--max-seq-len", "100000000"],  # the file's context: 512
    }[case]
    status, left = _command(tmp_path, *flags)
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
