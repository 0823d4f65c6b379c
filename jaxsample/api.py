"""Notebook and OpenAI-shaped APIs over the decode loop.

``Engine`` holds a model, its tokenizer and the compiled constraint tables; its
``generate`` takes prompts or chat messages with one :class:`SamplingParams` each and returns
:class:`Completion` objects; ``chat_completion`` takes an OpenRouter/OpenAI chat-completions
request body and returns an OpenAI ``chat.completion`` dict.

Decisions (see docs/api.md):
- A request without a seed gets ``derive_seed(job_seed, index)`` where ``index`` is its
  position in the job; the seed used is reported in every completion.
- A bad request in a batch fails alone: its completion carries the
  :class:`InvalidRequestError` in ``error`` and the others run (``strict=True`` raises).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from jaxsample import decode as _decode
from jaxsample.automata import json_mode, stop
from jaxsample.params import (
    InvalidRequestError,
    SamplingParams,
    check_for_model,
    derive_seed,
    pack_rows,
)


@dataclasses.dataclass
class Completion:
    """One request's result."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict] | None = None  # OpenAI logprobs.content entries, when asked
    prompt_tokens: int = 0
    seed: int | None = None
    error: InvalidRequestError | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _messages_or_prompt(item) -> tuple[str, Any]:
    if isinstance(item, str):
        return "prompt", item
    if isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
        return "messages", list(item)
    raise InvalidRequestError(
        "messages", item, "a prompt string or a list of {'role', 'content'} messages"
    )


def _validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", messages, "a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError("messages", m, "each message a dict with a 'role' string")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise InvalidRequestError(
                "messages", m["role"], "role one of system, user, assistant, developer"
            )
        if not isinstance(m.get("content"), str):
            raise InvalidRequestError("messages", m.get("content"), "content a string")


class Engine:
    """A model, its tokenizer and cached constraint tables, ready to generate.

    Example::

        engine = Engine.load()            # the default SmolLM2-135M-Instruct GGUF
        [c] = engine.generate([[{"role": "user", "content": "Hi"}]],
                              SamplingParams(temperature=0.7, seed=1, max_tokens=20))
        print(c.text)
    """

    def __init__(
        self, model, tokenizer, *, model_name: str = "SmolLM2-135M-Instruct", transforms=()
    ):
        from jaxsample.transforms import check_chain

        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.transforms = check_chain(transforms)  # user transform chain, run in the loop
        self._token_bytes = None
        self._grammar = None

    @classmethod
    def load(cls, path: str | None = None, *, dtype=jnp.float32, transforms=()) -> Engine:
        from jaxsample.model import load_model

        model, tok = load_model(path, dtype=dtype)
        name = "SmolLM2-135M-Instruct" if path is None else str(path).rsplit("/", 1)[-1]
        return cls(model, tok, model_name=name, transforms=transforms)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def token_bytes(self):
        if self._token_bytes is None:
            self._token_bytes = stop.TokenBytes.from_vocab(self.tokenizer.token_bytes)
        return self._token_bytes

    def grammar(self):
        if self._grammar is None:
            tok = self.tokenizer
            self._grammar = json_mode.compile_grammar(
                tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids
            )
        return self._grammar

    def constraints(self, plist: Sequence[SamplingParams]) -> _decode.Constraints:
        """The stop-string and JSON-mode tables for a batch of requests.

        The JSON tables are part of the loop's static structure whatever the batch holds
        (compiled once per vocabulary and cached); the loop skips the mask when no row is
        in JSON mode.
        """
        return _decode.Constraints(
            json_grammar=self.grammar(),
            json_enabled=jnp.asarray([p.response_format == "json_object" for p in plist]),
            stops=stop.compile_stops([tuple(p.stop) for p in plist], self.token_bytes()),
            token_bytes=self.token_bytes(),
        )

    def encode_input(self, item) -> list[int]:
        kind, value = _messages_or_prompt(item)
        if kind == "messages":
            _validate_messages(value)
            text = self.tokenizer.apply_chat_template(value, add_generation_prompt=True)
        else:
            text = value
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidRequestError(kind, value, "a prompt of at least one token")
        return ids

    def generate(
        self,
        inputs: Sequence,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        job_seed: int = 0,
        strict: bool = False,
    ) -> list[Completion]:
        """Generate one completion per input (a prompt string or a list of chat messages).

        Args:
          inputs: B prompts (raw text, no chat template) or chat message lists.
          params: one SamplingParams for all, or one per input (default: SamplingParams()).
          job_seed: the job-level seed from which rows without a seed get theirs.
          strict: raise the first InvalidRequestError instead of returning it in
            ``Completion.error``.
        """
        inputs = list(inputs)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(inputs)
        params = list(params)
        if len(params) != len(inputs):
            raise InvalidRequestError(
                "params", len(params), f"one SamplingParams per input ({len(inputs)})"
            )
        results = [Completion() for _ in inputs]
        good = []  # (index, prompt ids, params, max_tokens, seed)
        for i, (item, p) in enumerate(zip(inputs, params)):
            try:
                if not isinstance(p, SamplingParams):
                    raise InvalidRequestError("params", p, "a SamplingParams")
                ids = self.encode_input(item)
                max_tokens = check_for_model(
                    p,
                    vocab_size=self.vocab_size,
                    context_length=self.context_length,
                    prompt_length=len(ids),
                )
            except InvalidRequestError as err:
                err.index = i
                if strict:
                    raise
                results[i].error = err
                results[i].finish_reason = "error"
                continue
            seed = p.seed if p.seed is not None else derive_seed(job_seed, i)
            good.append((i, ids, p, max_tokens, seed))
        if good:
            self._run(good, results)
        return results

    def _run(self, good, results) -> None:
        prompts = [g[1] for g in good]
        plist = [g[2] for g in good]
        max_tokens = [g[3] for g in good]
        seeds = [g[4] for g in good]
        rows = pack_rows(plist, vocab_size=self.vocab_size, seeds=seeds, transforms=self.transforms)
        out = _decode.decode(
            self.model,
            prompts,
            rows,
            max_tokens,
            self.constraints(plist),
            eos_id=self.tokenizer.eos_id,
            transforms=self.transforms,
        )
        for b, (i, ids, p, _, seed) in enumerate(good):
            results[i] = self._completion(out, b, ids, p, seed)

    def _completion(self, out, b: int, prompt_ids, p: SamplingParams, seed: int) -> Completion:
        tok = self.tokenizer
        n = int(out.n_tokens[b])
        ids = [int(t) for t in out.tokens[b, :n]]
        code = int(out.finish[b])
        # the text: EOS is not part of it; a stop string and what follows are cut away
        content_ids = ids[:-1] if code == _decode.FINISH_EOS and ids else ids
        pieces = [tok.token_bytes[t] for t in content_ids]
        raw = b"".join(pieces)
        cut = False
        if p.stop:
            raw, cut = stop.truncate(raw, tuple(p.stop))
        text = raw.decode("utf-8", errors="replace")
        logprobs = None
        if p.logprobs:
            logprobs = []
            start = 0
            for j, t in enumerate(content_ids):
                if cut and start >= len(raw):
                    break  # this token lies wholly inside the cut-away stop string
                start += len(pieces[j])
                logprobs.append(self._logprob_entry(out, b, j, t, p.top_logprobs))
        return Completion(
            text=text,
            token_ids=ids,
            finish_reason=_decode.FINISH_REASONS.get(code, "length"),
            logprobs=logprobs,
            prompt_tokens=len(prompt_ids),
            seed=seed,
        )

    def _logprob_entry(self, out, b: int, j: int, token: int, n_top: int) -> dict:
        tb = self.tokenizer.token_bytes

        def entry(t: int, lp: float) -> dict:
            bts = tb[t]
            return {
                "token": bts.decode("utf-8", errors="replace"),
                "logprob": float(lp),
                "bytes": list(bts),
            }

        e = entry(token, out.logprobs[b, j])
        e["top_logprobs"] = [
            entry(int(out.top_ids[b, j, k]), out.top_logprobs[b, j, k]) for k in range(n_top)
        ]
        return e

    # ---- OpenAI-shaped requests and responses ---------------------------------------

    def chat_completions(self, bodies: Sequence[dict], *, job_seed: int = 0) -> list[dict]:
        """Answer a batch of chat-completions request bodies; a bad one fails alone."""
        inputs, params, errors = [], [], {}
        for i, body in enumerate(bodies):
            try:
                p = SamplingParams.from_request(body)
                if "messages" in body:
                    _validate_messages(body["messages"])
                    item = body["messages"]
                elif "prompt" in body and isinstance(body["prompt"], str):
                    item = body["prompt"]
                else:
                    raise InvalidRequestError(
                        "messages", body.get("messages"), "a non-empty list of messages"
                    )
            except InvalidRequestError as err:
                err.index = i
                errors[i] = err
                item, p = "", SamplingParams()
            if p.seed is None:  # the seed follows the request's index in the whole job
                p = dataclasses.replace(p, seed=derive_seed(job_seed, i))
            inputs.append(item)
            params.append(p)
        keep = [i for i in range(len(bodies)) if i not in errors]
        done = self.generate([inputs[i] for i in keep], [params[i] for i in keep])
        results: list[dict] = []
        by_index = dict(zip(keep, done))
        for i in range(len(bodies)):
            if i in errors:
                results.append(error_response(errors[i]))
            else:
                c = by_index[i]
                results.append(error_response(c.error) if c.error else self.response(c, params[i]))
        return results

    def chat_completion(self, body: dict, *, job_seed: int = 0) -> dict:
        """Answer one chat-completions request body with a ``chat.completion`` dict."""
        return self.chat_completions([body], job_seed=job_seed)[0]

    def response(self, c: Completion, p: SamplingParams) -> dict:
        message = {"role": "assistant", "content": c.text}
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": c.finish_reason,
            "logprobs": {"content": c.logprobs} if p.logprobs else None,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens,
            },
            "seed": c.seed,
        }


def error_response(err: InvalidRequestError) -> dict:
    """The OpenAI error object for a refused request."""
    return {
        "error": {
            "message": str(err),
            "type": "invalid_request_error",
            "param": err.field,
            "code": None,
        }
    }


_DEFAULT_ENGINE: Engine | None = None


def default_engine() -> Engine:
    """The default model (SmolLM2-135M-Instruct), loaded once per process."""
    global _DEFAULT_ENGINE
    if _DEFAULT_ENGINE is None:
        _DEFAULT_ENGINE = Engine.load()
    return _DEFAULT_ENGINE


def generate(
    inputs,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    engine: Engine | None = None,
    job_seed: int = 0,
    strict: bool = False,
    transforms=None,
) -> list[Completion]:
    """Generate completions for prompts or chat messages (see :meth:`Engine.generate`).

    ``inputs`` may be one prompt string, one message list, or a list of either.
    ``transforms``: a user transform chain to run in the decode loop (the engine's own chain
    when None); requests set its values with ``SamplingParams(transform_params=...)``.

    Example::

        from jaxsample import generate, SamplingParams
        [c] = generate([{"role": "user", "content": "Name a colour."}],
                       SamplingParams(temperature=0.0, max_tokens=8))
    """
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and isinstance(inputs[0], dict)
    ):
        inputs = [inputs]
    engine = engine or default_engine()
    if transforms is not None:
        engine = Engine(
            engine.model, engine.tokenizer, model_name=engine.model_name, transforms=transforms
        )
    return engine.generate(inputs, params, job_seed=job_seed, strict=strict)


__all__ = ["Completion", "Engine", "default_engine", "error_response", "generate"]
