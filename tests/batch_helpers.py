"""Test helpers for the batch job: request lines, a fast fake engine, output comparison."""

from __future__ import annotations

import hashlib
import json
import random

from jaxsample.api import error_response
from jaxsample.params import InvalidRequestError, SamplingParams

URL = "/v1/chat/completions"


def request_line(custom_id, body, *, method="POST", url=URL) -> str:
    obj = {"custom_id": custom_id, "method": method, "url": url, "body": body}
    return json.dumps(obj)


def chat_body(text: str, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **fields}


class FakeEngine:
    """``stream_requests`` without a model (a chat.completion for every line: the bodies are
    chat bodies, checked with the real ``SamplingParams.from_request``): lazy, at most
    ``slots`` requests in flight, finishing them in a pseudo-random order; each answer
    depends only on (job_seed, key, body), as the slot engine promises.

    ``fail_after``: raise RuntimeError after that many results (a crash in the middle).
    """

    def __init__(self, slots: int = 4, *, fail_after: int | None = None, order_seed: int = 0):
        self.slots = slots
        self.fail_after = fail_after
        self.order_seed = order_seed
        self.max_in_flight = 0
        self.results = 0

    def answer(self, key, body: dict, job_seed: int) -> dict:
        try:
            p = SamplingParams.from_request(body)
            if not body.get("messages"):
                raise InvalidRequestError("messages", body.get("messages"), "a non-empty list")
        except InvalidRequestError as err:
            return error_response(err)
        seed = p.seed if p.seed is not None else f"{job_seed}/{key}"
        digest = hashlib.sha256(f"{seed}|{json.dumps(body, sort_keys=True)}".encode()).hexdigest()
        n = 1 + int(digest[:2], 16) % 7
        return {
            "id": "chatcmpl-" + digest[:8] + str(random.random()),
            "object": "chat.completion",
            "created": random.randint(0, 10**9),
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": digest[: 4 * n]},
                    "finish_reason": "length",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
        }

    def stream_requests(self, items, *, job_seed=0):
        rng = random.Random(self.order_seed)
        it = iter(items)
        flight = []
        exhausted = False
        while True:
            while not exhausted and len(flight) < self.slots:
                item = next(it, None)
                if item is None:
                    exhausted = True
                else:
                    flight.append(item)
            self.max_in_flight = max(self.max_in_flight, len(flight))
            if not flight:
                return
            key, _, body = flight.pop(rng.randrange(len(flight)))
            if self.fail_after is not None and self.results >= self.fail_after:
                raise RuntimeError("simulated crash")
            self.results += 1
            yield key, self.answer(key, body, job_seed)


def canonical(path: str) -> dict:
    """key -> the record without ids and timestamps, as sorted JSON; asserts one line per key
    and that every line is complete JSON."""
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    assert not data or data.endswith(b"\n"), "a partial last line"
    for raw in data.splitlines():
        r = json.loads(raw)
        r.pop("id")
        if r["response"] is not None:
            r["response"].pop("request_id")
            r["response"]["body"].pop("id", None)
            r["response"]["body"].pop("created", None)
        key = r["custom_id"] if r["custom_id"] is not None else r["error"]["line"]
        assert key not in out, f"duplicate record for {key!r}"
        out[key] = json.dumps(r, sort_keys=True)
    return out


def mixed_lines(n: int, *, bad: bool = True) -> list[str]:
    """n requests (a third seeded) and, with ``bad``, one of every kind of bad line."""
    lines = []
    for i in range(n):
        fields = {"max_tokens": 2 + (i * 5) % 11, "temperature": 0.8}
        if i % 3 == 0:
            fields["seed"] = i
        lines.append(request_line(f"req-{i}", chat_body("hello " * (1 + i % 4), **fields)))
    if bad:
        extra = [
            "{not json",
            "[1, 2]",
            "",
            json.dumps({"method": "POST", "url": URL, "body": chat_body("x")}),
            request_line(7, chat_body("x")),
            request_line("req-1", chat_body("again")),
            request_line("wrong-url", chat_body("x"), url="/v1/embeddings"),
            request_line("wrong-method", chat_body("x"), method="GET"),
            json.dumps({"custom_id": "no-body", "method": "POST", "url": URL, "body": [1]}),
            request_line("bad-temperature", chat_body("x", temperature=-1)),
            request_line("unknown-field", chat_body("x", frobnicate=1)),
        ]
        for j, line in enumerate(extra):
            lines.insert(min(len(lines), 1 + 3 * j), line)
    return lines
