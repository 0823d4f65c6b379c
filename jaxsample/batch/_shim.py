"""TEMPORARY SHIM: delete this file once ``Engine.stream_chat`` is on main (issue 11); job.py
calls :func:`stream_chat` only when the engine has no ``stream_chat`` of its own.

It gives the interface of ``Engine.stream_chat(bodies, *, job_seed)`` (interfaces item 3)
over the slot engine's items-level ``Engine.stream`` (item 2): each body is read into
SamplingParams and messages as ``Engine.chat_completions`` reads them, and each Completion is
turned into a ``chat.completion`` with ``Engine.response``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator


def stream_chat(engine, bodies: Iterable[tuple], *, job_seed: int = 0) -> Iterator[tuple]:
    """``(key, chat.completion or OpenAI error object)`` for each ``(key, body)``, as each
    request finishes; a request without a seed gets ``derive_seed(job_seed, key)``."""
    from jaxsample.api import _validate_messages, error_response
    from jaxsample.params import InvalidRequestError, SamplingParams

    refused: collections.deque = collections.deque()  # bodies refused before the engine
    params: dict = {}  # key -> SamplingParams of the requests in the engine

    def items():
        for key, body in bodies:
            try:
                p = SamplingParams.from_request(body)
                if "messages" in body:
                    _validate_messages(body["messages"])
                    item = body["messages"]
                elif isinstance(body.get("prompt"), str):
                    item = body["prompt"]
                else:
                    raise InvalidRequestError(
                        "messages", body.get("messages"), "a non-empty list of messages"
                    )
            except InvalidRequestError as err:
                err.index = key
                refused.append((key, error_response(err)))
                continue
            params[key] = p
            yield key, item, p

    for key, c in engine.stream(items(), job_seed=job_seed):
        while refused:
            yield refused.popleft()
        p = params.pop(key)
        yield key, (error_response(c.error) if c.error else engine.response(c, p))
    while refused:
        yield refused.popleft()
