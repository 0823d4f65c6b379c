"""``jaxsample batch`` as a user runs it: real processes on a tiny random GGUF model, killed
with SIGKILL at several moments and restarted, two processes through jax.distributed, and a
resume with another model file refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from batch_helpers import canonical, mixed_lines
from tiny_gguf import write_tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_REQUESTS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_cli")
    model = d / "tiny.gguf"
    write_tiny_gguf(model, seed=0)
    inp = d / "in.jsonl"
    lines = mixed_lines(N_REQUESTS)
    lines.append(  # longer than the tiny model's context (512 tokens)
        json.dumps(
            {
                "custom_id": "too-long",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "z" * 700}], "max_tokens": 4},
            }
        )
    )
    inp.write_text("".join(line + "\n" for line in lines))
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAXSAMPLE_MODEL_DIR": str(d / "cache"),  # the compile cache, shared by the runs
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("XLA_FLAGS", None)
    env.pop("JAXSAMPLE_COMPILE_CACHE", None)  # the command's own default: the cache on
    ref = d / "ref.jsonl"
    proc = _batch(env, inp, ref, model, "--progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return {"dir": d, "model": model, "input": inp, "env": env, "ref": ref, "stderr": err}


# ``python -m jaxsample.cli``, with Ctrl-C handled as in a terminal: a child of a background
# process starts with SIGINT ignored, and Python then never raises KeyboardInterrupt
_CLI = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('jaxsample.cli', run_name='__main__', alter_sys=True)"
)


def _batch(env, inp, out, model, *extra, slots=4):
    cmd = [sys.executable, "-c", _CLI, "batch", str(inp), "--output", str(out)]
    cmd += ["--model", str(model), "--slots", str(slots), "--job-seed", "5", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_reference_run_writes_every_record_and_a_summary(setup):
    recs = canonical(setup["ref"])
    n_lines = len(setup["input"].read_text().splitlines())
    assert len(recs) == n_lines
    too_long = json.loads(recs["too-long"])["response"]
    assert too_long["status_code"] == 400 and too_long["body"]["error"]["param"] == "messages"
    assert "context" in too_long["body"]["error"]["message"]
    ok = [json.loads(r) for r in recs.values() if '"status_code": 200' in r]
    assert len(ok) == N_REQUESTS
    for r in ok:  # a chat.completion with a seed derived from (job seed, custom_id) or given
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    summary = json.loads(open(str(setup["ref"]) + ".summary.json").read())
    assert summary["complete"] and summary["records"]["ok"] == N_REQUESTS
    assert "tok/s" in setup["stderr"] and "%|" in setup["stderr"]  # --progress: the bar
    assert "complete" in setup["stderr"]  # the summary


def test_kill_9_at_several_moments_then_resume_equals_uninterrupted(setup):
    """SIGKILL during start-up, after a few records and near the end (plus a torn line
    appended once, as a kill inside a write leaves); every restart resumes; the final output
    equals the uninterrupted run's record for record, apart from ids and timestamps."""
    out = setup["dir"] / "killed.jsonl"
    total = len(setup["input"].read_text().splitlines())
    before = -1
    for target, torn in ((0, False), (8, True), (total - 6, False)):
        proc = _batch(setup["env"], setup["input"], out, setup["model"])
        deadline = time.monotonic() + 240
        while _lines(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if target == 0:
            time.sleep(1.5)  # somewhere in start-up or the first group
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode in (-signal.SIGKILL, 0)
        n = _lines(out)
        assert n >= before  # nothing written is lost
        before = n
        if torn:
            with open(out, "ab") as f:
                f.write(b'{"id":"batch_req_1","custom_id":"req-0","response":{"status_co')
    # the last resume with other slots and chunk steps (a smaller machine): they do not
    # change an answer, so the manifest lets them change
    proc = _batch(setup["env"], setup["input"], out, setup["model"], "--chunk-steps", "8", slots=2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(open(str(out) + ".summary.json").read())
    assert summary["this_run"]["skipped_done"] == before
    assert canonical(out) == canonical(setup["ref"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_with_a_message_and_resume(setup, sig):
    """SIGTERM (a preemption, a scheduler) and SIGINT (Ctrl-C) part way through a real run:
    one line naming the output, status 143 / 130, no traceback (even when the signal lands
    inside the engine's compiled chunk), and the same command resumes to an output equal to
    the uninterrupted run's."""
    out = setup["dir"] / f"stopped-{sig.name}.jsonl"
    proc = _batch(setup["env"], setup["input"], out, setup["model"])
    deadline = time.monotonic() + 240
    while _lines(out) < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None  # 12 of 42 lines: most of the requests are still to run
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
    assert "Traceback" not in err and str(out) in err and "resume" in err
    assert ("SIGTERM" if sig == signal.SIGTERM else "Ctrl-C") in err
    assert err.strip().splitlines()[-1].startswith("jaxsample batch: stopped by")
    assert _lines(out) < len(setup["input"].read_text().splitlines())
    proc = _batch(setup["env"], setup["input"], out, setup["model"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert canonical(out) == canonical(setup["ref"])


def test_resume_with_another_model_file_is_refused(setup):
    out = setup["dir"] / "other-model.jsonl"
    for suffix in ("", ".manifest.json"):  # a finished job's output and manifest
        with open(str(setup["ref"]) + suffix, "rb") as src, open(str(out) + suffix, "wb") as dst:
            dst.write(src.read())
    other = setup["dir"] / "other.gguf"
    write_tiny_gguf(other, seed=1)
    before = out.read_bytes()
    proc = _batch(setup["env"], setup["input"], out, other)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "will not resume" in err and "model.sha256" in err
    assert out.read_bytes() == before


def test_resume_with_the_model_file_moved_answers_as_before(setup):
    """The manifest compares the model's hash, not its path (files move, say to another
    disk after a preemption): a resume with the same model under another name writes
    records equal to an uninterrupted run's, the response's ``model`` included."""
    out = setup["dir"] / "moved.jsonl"
    ref_lines = setup["ref"].read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(ref_lines[:5]))  # a run that stopped after 5 records
    with open(str(setup["ref"]) + ".manifest.json", "rb") as src:
        (setup["dir"] / "moved.jsonl.manifest.json").write_bytes(src.read())
    moved = setup["dir"] / "elsewhere"
    moved.mkdir()
    renamed = moved / "renamed-copy.gguf"
    renamed.write_bytes(setup["model"].read_bytes())
    proc = _batch(setup["env"], setup["input"], out, renamed)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    recs = canonical(out)
    assert recs == canonical(setup["ref"])
    models = {
        json.loads(r)["response"]["body"].get("model")
        for r in recs.values()
        if '"status_code": 200' in r
    }
    assert models == {setup["model"].name}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_shard_and_merge(setup):
    """Two processes through jax.distributed on 127.0.0.1; the merged output equals a
    one-process run. JAX does not use its persistent compile cache in multi-process mode, so
    this input keeps every request to one shape (one compile per process)."""
    from batch_helpers import chat_body, request_line

    inp = setup["dir"] / "two-in.jsonl"
    lines = [request_line(f"t{i}", chat_body("hello there", max_tokens=6)) for i in range(8)]
    lines += ["{bad json", request_line("t3", chat_body("again"))]
    inp.write_text("".join(line + "\n" for line in lines))
    one = setup["dir"] / "two-ref.jsonl"
    proc = _batch(setup["env"], inp, one, setup["model"], slots=1)
    assert proc.communicate(timeout=300) and proc.returncode == 0
    out = setup["dir"] / "two.jsonl"
    addr = f"127.0.0.1:{_free_port()}"
    flags = ["--coordinator-address", addr, "--num-processes", "2", "--process-id"]
    procs = [
        _batch(setup["env"], inp, out, setup["model"], *flags, str(k), slots=1) for k in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert all("%|" not in e and "complete" in e for e in errs)  # no bar off a terminal
    shards = [canonical(f"{out}.shard-0000{k}-of-00002") for k in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert len(canonical(one)) == len(lines)
    assert canonical(out) == canonical(one)  # merged by process 0
    # batch-merge does the same again from the shards
    os.remove(out)
    merge = subprocess.run(
        [sys.executable, "-m", "jaxsample.cli", "batch-merge", str(out), "--shards", "2"],
        cwd=ROOT,
        env=setup["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merge.returncode == 0, merge.stderr
    assert canonical(out) == canonical(one)


def test_independent_processes_resume_alone_and_merge(setup):
    """``--num-processes 2 --process-id K`` without a coordinator: independent processes (a
    process restarted alone into a running jax.distributed job aborts every process). Process
    1 is killed and restarted alone while process 0 has finished; process 0, rerun, merges;
    the merged output equals the one-process run."""
    out = setup["dir"] / "independent.jsonl"
    shard1 = f"{out}.shard-00001-of-00002"

    def process(k, *extra):
        return _batch(
            setup["env"],
            setup["input"],
            out,
            setup["model"],
            "--num-processes",
            "2",
            "--process-id",
            str(k),
            *extra,
        )

    one = process(1)
    deadline = time.monotonic() + 240
    while _lines(shard1) < 6 and one.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    one.send_signal(signal.SIGKILL)
    one.communicate()
    zero = process(0, "--merge-timeout", "0")
    _, err = zero.communicate(timeout=300)
    assert zero.returncode == 1 and "jaxsample batch-merge" in err, err  # shard 1 not done
    one = process(1)
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    assert not out.exists()  # only process 0 merges
    zero = process(0)
    _, err = zero.communicate(timeout=300)
    assert zero.returncode == 0, err
    assert canonical(out) == canonical(setup["ref"])


def test_four_simulated_devices_equal_one_device(setup):
    """The same job on 4 simulated CPU devices (the engine splits the slots over them) gives
    the one-device output record for record."""
    out = setup["dir"] / "four.jsonl"
    env = {**setup["env"], "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = _batch(env, setup["input"], out, setup["model"], "--devices", "4")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert canonical(out) == canonical(setup["ref"])
