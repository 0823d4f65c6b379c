"""Batch files with ``/v1/completions`` lines beside ``/v1/chat/completions`` ones, through the
batch job in-process on the small random model (docs/batch.md, "Input"): each line is served
by its own endpoint, a bad line fails alone, and a resume after a crash (a torn last line
included) equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from batch_helpers import canonical, chat_body, request_line
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion
from small_engine import small_engine

from jaxsample.batch import JobConfig, run_job
from jaxsample.batch.reader import check_line
from jaxsample.params import derive_seed

TEXT_URL = "/v1/completions"
JOB_SEED = 3

BODIES = {  # custom_id -> (url, body)
    "chat-1": ("/v1/chat/completions", chat_body("Hi", max_tokens=4, seed=1)),
    "text-1": (
        TEXT_URL,
        {"model": "m", "prompt": "Once upon a time", "max_tokens": 5, "seed": 2, "logprobs": 2},
    ),  # fmt: skip
    "text-ids": (TEXT_URL, {"prompt": [[100, 200], [300]], "n": 2, "max_tokens": 3}),
    "text-bad": (TEXT_URL, {"prompt": "x", "logprobs": 9}),
    "chat-as-text": (TEXT_URL, chat_body("Hi")),  # messages on a completions line
    "text-as-chat": ("/v1/chat/completions", {"prompt": ["a", "b"]}),  # a list prompt in chat
    "wrong-url": ("/v1/embeddings", {"input": "x"}),
    "text-echo": (TEXT_URL, {"prompt": "Hello", "max_tokens": 4, "echo": True}),
    "chat-2": ("/v1/chat/completions", chat_body("Name a colour.", max_tokens=3)),
}
OK = ["chat-1", "text-1", "text-ids", "text-echo", "chat-2"]
REFUSED = {"text-bad": "logprobs", "chat-as-text": "messages", "text-as-chat": "prompt"}


@pytest.fixture(scope="module")
def engine():
    return small_engine()


@pytest.fixture
def job(tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [request_line(cid, body, url=url) for cid, (url, body) in BODIES.items()]
    inp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"the engine is given; the manifest hashes this file")

    def make(out: str) -> JobConfig:
        return JobConfig(
            input=str(inp),
            output=str(tmp_path / out),
            model=str(model),
            job_seed=JOB_SEED,
            progress=False,
        )

    return make


def _records(path: str) -> dict:
    """custom_id -> the output record, as written (ids and timestamps kept)."""
    canonical(path)  # one whole record per key
    with open(path, encoding="utf-8") as f:
        return {r["custom_id"]: r for r in map(json.loads, f)}


def _texts(body: dict) -> list[str]:
    return [c.get("text", (c.get("message") or {}).get("content")) for c in body["choices"]]


def test_each_line_is_served_by_its_own_endpoint(job, engine):
    cfg = job("out.jsonl")
    summary = run_job(cfg, engine=engine)
    assert summary["complete"]
    t = summary["records"]
    assert (t["ok"], t["refused"], t["failed"]) == (len(OK), len(REFUSED), 1)
    recs = _records(cfg.output)
    assert sorted(recs) == sorted(BODIES)
    for cid in OK:
        url, body = BODIES[cid]
        response = recs[cid]["response"]
        assert response["status_code"] == 200 and recs[cid]["error"] is None
        got = response["body"]
        # the same answer as the endpoint's own stream with the line's custom_id as key
        if url == TEXT_URL:
            OpenAICompletion.model_validate(got)
            stream = engine.stream_text_completions
        else:
            ChatCompletion.model_validate(got)
            stream = engine.stream_chat
        [(_, want)] = list(stream([(cid, body)], job_seed=JOB_SEED))
        assert _texts(got) == _texts(want) and got["usage"] == want["usage"], cid
        assert got["object"] == ("text_completion" if url == TEXT_URL else "chat.completion")
        assert got["seed"] == body.get("seed", derive_seed(JOB_SEED, cid))
    ids = recs["text-ids"]["response"]["body"]
    assert len(ids["choices"]) == 4 and ids["usage"]["prompt_tokens"] == 3
    assert recs["text-1"]["response"]["body"]["choices"][0]["logprobs"]["tokens"]
    assert recs["text-echo"]["response"]["body"]["choices"][0]["text"].startswith("Hello")
    for cid, field in REFUSED.items():
        response = recs[cid]["response"]
        assert response["status_code"] == 400, cid
        assert response["body"]["error"]["param"] == field, (cid, response)
    err = recs["wrong-url"]["error"]
    assert err["code"] == "invalid_url" and recs["wrong-url"]["response"] is None
    assert '"/v1/chat/completions"' in err["message"] and '"/v1/completions"' in err["message"]


class Crashing:
    """The engine, failing after ``after`` results (a crash in the middle of the job)."""

    def __init__(self, engine, after: int):
        self.engine, self.after, self.results = engine, after, 0

    def stream_requests(self, items, *, job_seed=0):
        inner = self.engine.stream_requests(items, job_seed=job_seed)
        try:
            for result in inner:
                if self.after is not None and self.results >= self.after:
                    raise RuntimeError("simulated crash")
                self.results += 1
                yield result
        finally:
            inner.close()  # the engine's slots are emptied for the next run


def test_a_resume_after_a_crash_equals_an_uninterrupted_run(job, engine):
    whole = job("whole.jsonl")
    run_job(whole, engine=engine)
    cfg = job("out.jsonl")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, engine=Crashing(engine, 3))
    done = _records(cfg.output)
    assert sum(r["response"] is not None for r in done.values()) == 3
    with open(cfg.output, "ab") as f:  # a torn last line, as after kill -9 mid-write
        f.write(b'{"id": "batch_req_x", "custom_id": "text-1", "resp')
    resumed = Crashing(engine, None)
    summary = run_job(cfg, engine=resumed)
    assert summary["complete"] and summary["this_run"]["repaired_bytes"] > 0
    assert canonical(cfg.output) == canonical(whole.output)
    # nothing done before the crash ran again (the wrong url's record was written then too)
    assert resumed.results == len(OK) + len(REFUSED) - 3
    assert summary["this_run"]["skipped_done"] == len(done)


def test_reader_names_the_endpoint_and_both_urls():
    line = request_line("a", {"prompt": "x"}, url=TEXT_URL).encode()
    ok = check_line(1, line, set())
    assert (ok.endpoint, ok.body, ok.error) == ("completions", {"prompt": "x"}, None)
    assert check_line(1, request_line("a", {}).encode(), set()).endpoint == "chat"
    for url in ("/v1/embeddings", None, ["/v1/completions"], "/v1/completions/"):
        bad = check_line(1, request_line("a", {}, url=url).encode(), set())
        assert bad.error["code"] == "invalid_url", url
        assert bad.error["message"].endswith('expected "/v1/chat/completions" or "/v1/completions"')
    body = json.dumps({"custom_id": "a", "method": "POST", "url": TEXT_URL, "body": "x"})
    bad = check_line(1, body.encode(), set())
    assert bad.error["code"] == "invalid_body" and "text-completions" in bad.error["message"]
