"""The `jaxsample` command and the real model end to end (marked real_model; run in CI)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxsample import cli

pytestmark = pytest.mark.real_model


def run_cli(args, stdin: str | None = None, cache_dir=None):
    env = dict(os.environ)
    env.pop("JAXSAMPLE_COMPILE_CACHE", None)  # the command's own default: the cache on
    if cache_dir is not None:  # the compile cache (and model lookup) folder
        env["JAXSAMPLE_MODEL_DIR"] = str(cache_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsample.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return proc


def test_generate_prompt_greedy_answers(tmp_path):
    proc = run_cli(
        [
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ],
        cache_dir=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    # the command kept its compiled programs for the next run
    assert any((tmp_path / "xla").iterdir())


def test_generate_request_prints_chat_completion(monkeypatch, capsys):
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 6,
        "seed": 3,
        "temperature": 0.8,
        "logprobs": True,
        "top_logprobs": 3,
        "stop": ["\n\n"],
    }
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(body)))
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert cli.main(["generate", "--request", "-", "--no-compile-cache"]) == 0
        # --no-compile-cache: JAX's configuration left alone (Engine.load turns it on)
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    out = json.loads(capsys.readouterr().out)
    assert out["object"] == "chat.completion" and out["seed"] == 3
    choice = out["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 6
    text = "".join(bytes(e["bytes"]).decode("utf-8", "replace") for e in content)
    assert text.startswith(choice["message"]["content"])
    for e in content:
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert len(lps) == 3 and lps == sorted(lps, reverse=True) and e["logprob"] <= 0
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_bad_request_is_an_error_object_not_a_traceback(tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 2}))
    proc = run_cli(["generate", "--request", str(path)])
    assert proc.returncode == 2
    err = json.loads(proc.stdout)["error"]
    assert err["param"] == "top_p" and "2" in err["message"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, stdin, says",
    [
        # nothing is dropped: with --request the body is the whole request
        (["--request", "-", "--max-tokens", "3", "--n", "2"], "{}", "--max-tokens, --n given too"),
        (["--request", "-", "--stop", "x", "--raw"], "{}", "--stop, --raw given too"),
        (["--request", "-"], "{not json", "the request is not JSON"),
        (["--request", "/nonexistent/body.json"], None, "cannot read the request"),
        (["--prompt", "hi", "--logit-bias", "{bad"], None, "--logit-bias is not JSON"),
        (["--prompt", "hi", "--model", "/nonexistent/m.gguf"], None, "no model file"),
    ],
)
def test_bad_flags_and_files_exit_2_before_loading(monkeypatch, capsys, args, stdin, says):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate --prompt hi", "batch in.jsonl -o out.jsonl"])
def test_job_seed_out_of_range_is_a_flag_error(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command.split(), "--job-seed", str(2**64)])
    assert exit_.value.code == 2
    assert "[-2**63, 2**63 - 1]" in capsys.readouterr().err


def test_a_corrupt_model_file_is_one_line_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + bytes(96))  # the magic, then a header cut short
    assert cli.main(["generate", "--prompt", "hi", "--model", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxsample: ") and str(bad) in err and "Traceback" not in err


def test_a_max_seq_len_beyond_the_model_context_is_a_flag_error(tmp_path, capsys):
    """Not an out-of-memory deep inside XLA (the KV cache of every slot at that length)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_gguf import write_tiny_gguf

    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model)  # context length 512
    argv = ["generate", "--prompt", "hi", "--model", str(model), "--no-compile-cache"]
    assert cli.main([*argv, "--max-seq-len", "100000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsample: --max-seq-len 100000000: must be an integer in [1, 512]")
    assert "Traceback" not in err


def test_a_lone_surrogate_field_name_is_refused_as_json_not_a_traceback(monkeypatch, capsys):
    """JSON lets a request escape a lone surrogate (here as a field name); the refusal names
    that field, and the error object is printed with \\u escapes (valid JSON), since the
    name has no UTF-8 form."""
    body = '{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}'
    monkeypatch.setattr(sys, "stdin", io.StringIO(body))
    assert cli.main(["generate", "--request", "-", "--no-compile-cache"]) == 2
    out = capsys.readouterr().out
    err = json.loads(out)["error"]
    assert err["param"] == "\ud800" and err["type"] == "invalid_request_error"
    assert "\\ud800" in out


@pytest.mark.parametrize("n,slots", [(None, 1), (3, 4), (40, 16)])
def test_generate_gives_its_request_as_many_slots_as_choices(tmp_path, monkeypatch, n, slots):
    """One request, not a 16-slot engine with a full cache per slot: the choices' count
    rounded up to a power of two (at most 16); the answers do not depend on it."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_gguf import write_tiny_gguf

    from jaxsample.api import Engine

    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model)
    seen = []

    def load(*args, **kwargs):
        seen.append(kwargs["slots"])
        raise SystemExit(7)  # the engine's size is all this test needs

    monkeypatch.setattr(Engine, "load", load)
    argv = ["generate", "--prompt", "hi", "--model", str(model), "--no-compile-cache"]
    with pytest.raises(SystemExit):
        cli.main(argv + ([] if n is None else ["--n", str(n)]))
    assert seen == [slots]
