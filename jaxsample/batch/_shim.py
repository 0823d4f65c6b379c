"""TEMPORARY SHIM: delete this file once ``Engine.stream_chat`` and the slot engine are on
main (docs/batch.md, "Engine"). Nothing else in jaxsample.batch depends on its internals:
job.py calls :func:`load_engine` and :func:`stream_chat` only when the Engine class has no
``stream_chat`` of its own.

It gives the interface of ``Engine.stream_chat(bodies, *, job_seed)`` (docs/briefs:
interfaces item 3) over today's ``Engine.chat_completions``: bodies are taken ``group`` at a
time, each without a seed gets ``derive_seed(job_seed, key)``, and the group's results are
yielded in input order. The model is loaded with ``batch_invariant=True`` so that a request's
tokens do not depend on the other requests of its group (what makes a resumed job equal an
uninterrupted one), and ``max_seq_len`` caps the context a request may use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import islice


def load_engine(model_path: str, *, dtype, max_seq_len: int | None):
    """An ``Engine`` over today's static decode (batch-invariant, context capped)."""
    import os

    from jaxsample.api import Engine
    from jaxsample.model import load_model

    class _CappedEngine(Engine):
        @property
        def context_length(self) -> int:
            n = self.model.config.context_length
            return n if max_seq_len is None else min(n, max_seq_len)

    model, tok = load_model(model_path, dtype=dtype, batch_invariant=True)
    return _CappedEngine(model, tok, model_name=os.path.basename(str(model_path)))


def stream_chat(
    engine, bodies: Iterable[tuple], *, job_seed: int = 0, group: int = 16
) -> Iterator[tuple]:
    """``(key, response dict)`` for each ``(key, body)``, ``group`` requests per decode call."""
    from jaxsample.params import derive_seed

    it = iter(bodies)
    while chunk := list(islice(it, group)):
        keys = [k for k, _ in chunk]
        reqs = [
            {**b, "seed": derive_seed(job_seed, k)} if b.get("seed") is None else b
            for k, b in chunk
        ]
        for key, res in zip(keys, engine.chat_completions(reqs, job_seed=job_seed)):
            if "error" in res:  # the index in the group is no business of the batch job
                res["error"]["message"] = re.sub(r" \(request \d+\)", "", res["error"]["message"])
            yield key, res
