"""Notebook and OpenAI-shaped APIs over the decode loop.

``Engine`` holds a model, its tokenizer and the compiled constraint tables. ``generate``
takes prompts or chat messages with one :class:`SamplingParams` each and returns
:class:`Completion` objects; ``stream`` does the same lazily over ``(key, input, params)``
items; ``stream_chat`` / ``chat_completions`` take OpenRouter/OpenAI chat-completions request
bodies and give OpenAI ``chat.completion`` dicts (or OpenAI error objects);
``stream_text_completions`` / ``text_completions`` do the same for OpenAI's legacy
``/v1/completions`` bodies (``text_completion`` dicts), and ``stream_requests`` serves either
endpoint, request by request (the batch job's mixed files).

Decisions (see docs/api.md):
- Inputs: a string is ONE prompt, a list of message dicts is ONE conversation, a list of
  token ids is ONE prompt given as ids, a list of any of these is a batch
  (:func:`normalize_inputs`, for ``Engine.generate``, ``generate`` and ``jaxsample.explore``).
- A request without a seed gets ``derive_seed(job_seed, key)`` (``key``: its index in the
  job, or a str such as a batch job's custom_id); choice ``i`` of a request with ``n``
  choices has :func:`choice_seed` ``(seed, i)``. The seed is reported in every response.
- A bad request in a batch fails alone: its completion carries the
  :class:`InvalidRequestError` in ``error`` and the others run (``strict=True`` raises).
- Responses never hold NaN or infinity: a token with no probability has log probability
  ``NO_PROBABILITY`` (-9999.0, the value the OpenAI API documents for it).
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import inspect
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import decode as _decode
from jaxsample.automata import json_mode, stop
from jaxsample.model.chat import ChatTemplateError
from jaxsample.params import (
    ENDPOINTS,
    INT64_MAX,
    INT64_MIN,
    TEXT_MAX_TOKENS,
    InvalidRequestError,
    SamplingParams,
    _integer,
    _key_text,
    _short_repr,
    check_chain_outputs,
    check_engine_options,
    check_for_model,
    check_job_seed,
    derive_seed,
    pack_rows,
    request_n,
    resolve_max_seq_len,
    text_scoring_only,
    token_id_array,
)
from jaxsample.rows import TOP_LOGPROBS_MAX
from jaxsample.scoring import PromptLogprobs, PromptScorer

#: The log probability written for a token with no probability (``-inf``): the value the
#: OpenAI API documents for "very unlikely". JSON has no infinity.
NO_PROBABILITY = -9999.0

#: finish code (jaxsample.decode) -> OpenAI ``finish_reason``. "No token allowed" is
#: ``content_filter``: the constraints of the request (logit_bias, JSON mode, ...) or
#: non-finite logits removed every token, which a strict OpenAI client accepts and which
#: differs from a normal stop.
FINISH_REASONS = {
    _decode.FINISH_EOS: "stop",
    _decode.FINISH_LENGTH: "length",
    _decode.FINISH_STOP: "stop",
    _decode.FINISH_NO_TOKEN: "content_filter",
}

#: finish code -> the precise reason, reported as ``native_finish_reason`` (as OpenRouter
#: reports its providers' own reasons beside the normalised one).
NATIVE_FINISH_REASONS = {
    _decode.FINISH_EOS: "eos",
    _decode.FINISH_LENGTH: "length",
    _decode.FINISH_STOP: "stop_string",
    _decode.FINISH_NO_TOKEN: "no_token_allowed",
}

ROLES = ("system", "user", "assistant", "developer")
_MESSAGE_KEYS = ("role", "content")
_IDS_ALLOWED = "a non-empty list or 1-d integer array of token ids"
_MESSAGES_ALLOWED = (
    "a non-empty list of messages {'role': one of system, user, assistant, developer, "
    "'content': a string or a list of text parts {'type': 'text', 'text': str}}"
)


@dataclasses.dataclass
class Completion:
    """One request's result (one choice).

    ``finish_reason`` is the OpenAI value ("stop", "length", "content_filter" when no token
    was allowed, or "error" for a refused request); ``native_finish_reason`` says which
    stop it was ("eos", "stop_string", "length", "no_token_allowed").
    """

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict] | None = None  # OpenAI logprobs.content entries, when asked
    prompt_tokens: int = 0
    seed: int | None = None
    error: InvalidRequestError | RequestFailed | None = None
    native_finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestFailed(RuntimeError):
    """A request that failed while it was prepared for an unexpected reason (an exception
    other than :class:`InvalidRequestError`: a bug, or an input nothing checks yet). It fails
    alone, as an OpenAI ``server_error``: one such line never stops a batch job, which would
    otherwise stop at the same line on every resume."""

    field = None  # no request field is at fault

    def __init__(self, cause: BaseException):
        super().__init__(f"the request could not be prepared: {type(cause).__name__}: {cause}")
        self.index = None


def _request_error(err: Exception) -> InvalidRequestError | RequestFailed:
    """What a request's exception is to its caller: a refusal as it is, anything else a
    :class:`RequestFailed` (that request fails alone)."""
    return err if isinstance(err, (InvalidRequestError, RequestFailed)) else RequestFailed(err)


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def _refused(err: InvalidRequestError | RequestFailed, seed: int | None = None) -> Completion:
    return Completion(finish_reason="error", native_finish_reason="error", error=err, seed=seed)


def is_token_ids(item: Any) -> bool:
    """Whether ``item`` is one input given as token ids: a non-empty list or tuple of ints
    (numpy integers too; not bools), or a 1-d integer numpy/JAX array."""
    if isinstance(item, (np.ndarray, jax.Array)):
        return item.ndim == 1 and item.size > 0 and jnp.issubdtype(item.dtype, jnp.integer)
    return (
        isinstance(item, (list, tuple))
        and bool(item)
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in item)
    )


def normalize_inputs(inputs: Any) -> list:
    """The list of inputs of a ``generate`` call: a string is one prompt, a list of message
    dicts one conversation, a list (or 1-d integer array) of token ids one prompt given as
    ids, a 2-d integer array a batch of id rows, any other list (or iterable) a batch of
    prompts/conversations/id lists.

    >>> normalize_inputs("Hi")
    ['Hi']
    >>> normalize_inputs([{"role": "user", "content": "Hi"}])
    [[{'role': 'user', 'content': 'Hi'}]]
    >>> normalize_inputs(["Hi", [{"role": "user", "content": "Hi"}]])
    ['Hi', [{'role': 'user', 'content': 'Hi'}]]
    >>> normalize_inputs([1, 2, 3]), normalize_inputs([[1, 2], "Hi"])
    ([[1, 2, 3]], [[1, 2], 'Hi'])
    """
    if isinstance(inputs, str) or is_token_ids(inputs):
        return [inputs]
    if isinstance(inputs, (np.ndarray, jax.Array)):
        if inputs.ndim == 2:
            return list(np.asarray(inputs))  # a batch of id rows
        kind = np.dtype(inputs.dtype).kind
        if inputs.ndim != 1 or (inputs.size and kind not in "USO"):  # 1-d: prompts or []
            raise InvalidRequestError(
                "inputs",
                f"<{inputs.dtype} array of shape {tuple(inputs.shape)}>",
                "a 1-d integer array (one prompt as token ids), a 2-d one (a batch of them),"
                " or a list of prompts, message lists and token id lists",
            )
    if isinstance(inputs, (Mapping, bytes, bytearray)) or not isinstance(inputs, Iterable):
        raise InvalidRequestError(
            "inputs",
            inputs,
            "a prompt string, a list of messages, or a list of prompts and message lists",
            reason="bytes: decode them to a str first" if isinstance(inputs, bytes) else None,
        )
    items = list(inputs)
    if any(isinstance(x, Mapping) for x in items):  # messages: one conversation
        return [items]
    numbers = (int, float, np.number, np.bool_)
    if isinstance(inputs, (list, tuple)) and items and all(isinstance(x, numbers) for x in items):
        # numbers with a float or bool among them: ONE prompt of (bad) token ids, refused on
        # field prompt, not one request per number each failing on messages
        return [inputs]
    return items


class _RenderedChat(str):
    """A chat already rendered with the template (``stream_chat`` renders each body once):
    a prompt that does not fit is the fault of its ``messages``, not of a ``prompt``."""


def _prompt_field(item: Any) -> str:
    """The request field a prompt's faults are named on: ``prompt`` for raw text and token
    ids, ``messages`` for a conversation."""
    if isinstance(item, str):
        return "messages" if isinstance(item, _RenderedChat) else "prompt"
    return "prompt" if is_token_ids(item) else "messages"


def _check_utf8(field: str, text: str, shown: Any) -> None:
    """Refuses text that cannot be encoded as UTF-8: a lone surrogate (``"\\ud800"``, which
    JSON parsers accept) would otherwise fail inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            field,
            shown,
            "text encodable as UTF-8",
            reason=f"a lone surrogate {text[err.start]!r} at character {err.start}",
        ) from None


def _content_text(content: Any) -> str:
    """A message's content as one string: a string, or text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)) or not content:
        raise InvalidRequestError(
            "messages", content, _MESSAGES_ALLOWED, reason="content is not a string or parts"
        )
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not (isinstance(kind, str) and kind == "text"):  # an array's != is elementwise
            reason = (
                f"content part type {kind!r} is not supported: the model reads text only"
                if isinstance(kind, str)
                else "a content part must be an object with a 'type'"
            )
            raise InvalidRequestError("messages", part, _MESSAGES_ALLOWED, reason=reason)
        extra = sorted(_key_text(k) for k in part if k not in ("type", "text"))
        if not isinstance(part.get("text"), str) or extra:
            raise InvalidRequestError(
                "messages",
                part,
                _MESSAGES_ALLOWED,
                reason=f"unknown keys {extra}" if extra else "'text' is not a string",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict]:
    """Checks a chat message list and returns it with every content as one string.

    Roles are system, user, assistant, developer; a message has exactly the keys ``role``
    and ``content``; content is a string or a non-empty list of text parts (joined with
    ``"\\n"``). Anything else raises :class:`InvalidRequestError` with field ``messages``.

    >>> validate_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
    ...                                                 {"type": "text", "text": "b"}]}])
    [{'role': 'user', 'content': 'a\\nb'}]
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages", messages, _MESSAGES_ALLOWED)
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise InvalidRequestError("messages", m, _MESSAGES_ALLOWED, reason="not an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequestError(
                "messages",
                m,
                _MESSAGES_ALLOWED,
                reason=f"role {_short_repr(role)} is not supported",
            )
        extra = sorted(_key_text(k) for k in m if k not in _MESSAGE_KEYS)
        if extra:
            raise InvalidRequestError(
                "messages", m, _MESSAGES_ALLOWED, reason=f"unsupported keys {extra}"
            )
        if "content" not in m:
            raise InvalidRequestError("messages", m, _MESSAGES_ALLOWED, reason="no content")
        text = _content_text(m["content"])
        _check_utf8("messages", text, m)
        out.append({"role": role, "content": text})
    return out


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request with seed ``seed`` (``n`` choices).

    Choice 0 uses the request's seed (so ``n = 1`` is the plain request); choice ``i > 0``
    uses ``derive_seed(seed, i)``. A request with ``n`` choices equals the same request sent
    ``n`` times with these seeds.

    >>> choice_seed(7, 0), choice_seed(7, 1) == choice_seed(7, 1) != choice_seed(8, 1)
    (7, True)
    """
    # both checked first: choice_seed("7", 0) returned "7", choice_seed(7, 0.0) returned 7
    seed = _integer("seed", seed, INT64_MIN, INT64_MAX, "an integer in [-2**63, 2**63 - 1]")
    index = _integer("index", index, 0, 2**32 - 1, "an integer in [0, 2**32 - 1]")
    return seed if index == 0 else derive_seed(seed, index)


def _logprob(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else NO_PROBABILITY


class Engine:
    """A model, its tokenizer and cached constraint tables, ready to generate.

    Example::

        engine = Engine.load()            # the default SmolLM2-135M-Instruct GGUF
        [c] = engine.generate([{"role": "user", "content": "Hi"}],
                              SamplingParams(temperature=0.7, seed=1, max_tokens=20))
        print(c.text)
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str = "SmolLM2-135M-Instruct",
        slots: int = 16,
        chunk_steps: int = 32,
        refill_free: int = 1,
        max_seq_len: int | None = None,
        devices=None,
        transforms=(),
        prefetch: int | None = None,
        widths=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        #: the user transform chain run in the loop (docs/sampler.md); each transform is
        #: traced on an abstract row here, so a bad one fails now, naming it
        #: (:class:`jaxsample.TransformError`), not inside the compiled loop
        self.transforms = check_chain_outputs(transforms, model.config.vocab_size)
        slots, chunk_steps, refill_free, devices, prefetch, widths = check_engine_options(
            slots, chunk_steps, refill_free, devices, prefetch, widths
        )
        #: the slot engine's settings (see :class:`jaxsample.engine.SlotEngine`)
        self.engine_options = {
            "slots": slots,
            "chunk_steps": chunk_steps,
            "refill_free": refill_free,
            # checked now, not at the first request
            "max_seq_len": resolve_max_seq_len(max_seq_len, model.config.context_length),
            "devices": devices,
            "transforms": self.transforms,
            # requests a background thread takes in ahead of the slots
            "prefetch": prefetch,
            # the row counts a chunk may run at (a few requests run at a few rows' cost)
            "widths": widths,
        }
        self._token_bytes = None
        self._grammar = None
        self._slot_engine = None
        self._scorer = None
        self._scorer_lock = threading.Lock()  # the API's two threads may both ask for it

    @classmethod
    def load(
        cls,
        path: str | None = None,
        *,
        dtype=jnp.float32,
        batch_invariant: bool = True,
        compile_cache: bool = True,
        **options,
    ) -> Engine:
        """Loads a GGUF file (default: SmolLM2-135M-Instruct) into an engine.

        ``batch_invariant=True`` (the default) makes every request's tokens and log
        probabilities bit-identical whatever shares the batch (docs/engine.md); ``options``
        are the slot engine's settings (``slots``, ``chunk_steps``, ``refill_free``,
        ``max_seq_len``, ``devices``, ``transforms``, ``prefetch``, ``widths``).
        ``compile_cache=True`` (the default) turns on JAX's persistent compilation cache
        (``jaxsample.explore.use_compile_cache``; the folder JAX is configured with, else
        ``~/.cache/jaxsample/xla``) and with it the engine's programs kept on disk
        (``jaxsample.engine.programs``), so that a new process neither compiles nor traces
        the decode loop again; ``False`` leaves JAX's configuration as it is.
        """
        from jaxsample.model import load_model

        # the settings that do not need the model are checked before it loads (seconds)
        bound = inspect.signature(cls).bind(None, None, **options)  # unknown name: TypeError
        bound.apply_defaults()
        names = ("slots", "chunk_steps", "refill_free", "devices", "prefetch", "widths")
        check_engine_options(*(bound.arguments[k] for k in names))
        if compile_cache:
            from jaxsample.engine.programs import use_compile_cache

            use_compile_cache()
        model, tok = load_model(path, dtype=dtype, batch_invariant=batch_invariant)
        name = "SmolLM2-135M-Instruct" if path is None else str(path).rsplit("/", 1)[-1]
        return cls(model, tok, model_name=name, **options)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def context_length(self) -> int:
        """Positions per request (prompt + output): the model's context, or the engine's
        smaller ``max_seq_len`` (each slot's KV cache length)."""
        return min(self.model.config.context_length, self.engine_options["max_seq_len"])

    def slot_engine(self):
        """The :class:`jaxsample.engine.SlotEngine` behind :meth:`stream` (built once)."""
        if self._slot_engine is None:
            from jaxsample.automata import json_schema
            from jaxsample.engine import SlotEngine

            tok = self.tokenizer
            self._slot_engine = SlotEngine(
                self.model,
                grammar=self.grammar(),
                token_bytes=self.token_bytes(),
                schema_pool=json_schema.SchemaPool(
                    tok.token_bytes, eos_id=tok.eos_id, special_ids=tok.special_ids
                ),
                **self.engine_options,
            )
        return self._slot_engine

    def scorer(self) -> PromptScorer:
        """The prompt-scoring program (:class:`jaxsample.scoring.PromptScorer`, built once):
        a separate compiled program, one per prompt bucket, beside the slot engine's."""
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = PromptScorer(self.model, self.context_length)
            return self._scorer

    def prompt_logprobs(self, inputs, *, top_logprobs: int = 0) -> list[PromptLogprobs]:
        """The raw log probability of every token of each prompt given the tokens before it,
        and the ``top_logprobs`` most likely tokens at each position (scoring: nothing is
        generated; docs/api.md, "Prompt log probabilities").

        ``inputs`` as :meth:`generate` takes them (:func:`normalize_inputs`: a string is raw
        text, a message list goes through the chat template, token ids are used as is).
        ``top_logprobs``: an integer in [0, 20]. Every input is checked (and tokenised)
        before any device work: a bad one raises :class:`InvalidRequestError` naming its
        field (``prompt`` or ``messages``; an empty prompt, a prompt longer than the
        engine's context) and its index. Returns one
        :class:`jaxsample.scoring.PromptLogprobs` per input (``logprobs[0]`` is NaN).

        Example::

            [r] = engine.prompt_logprobs("The capital of France is Paris", top_logprobs=2)
            r.tokens[-1], r.logprobs[-1], r.top_ids[-1]   # ' Paris', its log probability, top 2
        """
        allowed = f"an integer in [0, {TOP_LOGPROBS_MAX}]"
        k = _integer("top_logprobs", top_logprobs, 0, TOP_LOGPROBS_MAX, allowed)
        prompts = []
        for i, item in enumerate(normalize_inputs(inputs)):
            try:
                prompts.append(self.scoring_ids(item))
            except InvalidRequestError as err:
                err.index = i
                raise
        return [self._scored(ids, k) for ids in prompts]

    def _scored(self, ids: list[int], k: int) -> PromptLogprobs:
        """One run of the scoring program (:meth:`scorer`) on checked token ids, as a
        :class:`PromptLogprobs` with the top ``k`` (position 0: NaN and ids -1)."""
        s = self.scorer()(ids)
        n = len(ids)
        lps = np.full((n,), np.nan, np.float32)
        top_ids = np.full((n, k), -1, np.int32)
        top_lps = np.full((n, k), np.nan, np.float32)
        lps[1:], top_ids[1:], top_lps[1:] = s.logprobs, s.top_ids[:, :k], s.top_logprobs[:, :k]
        shown = self.tokenizer.shown_bytes
        tokens = [shown[t].decode("utf-8", errors="replace") for t in ids]
        return PromptLogprobs(ids, tokens, lps, top_ids, top_lps)

    def scoring_ids(self, item) -> list[int]:
        """The token ids of a prompt to score (:meth:`encode_input`), refused on its field
        when it is longer than the engine's context (a prompt to score may fill it)."""
        ids = self.encode_input(item)
        if len(ids) > self.context_length:
            raise InvalidRequestError(
                _prompt_field(item),
                f"<prompt of {len(ids)} tokens>",
                f"a prompt of at most {self.context_length} tokens (the engine's context)",
            )
        return ids

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
        for p in plist:  # the static batch has no schema pool: never run a schema row as text
            if p.response_format == "json_schema":
                raise InvalidRequestError(
                    "response_format", "json_schema", "text or json_object in a static batch",
                    reason="json_schema rows run in the slot engine (Engine.stream/generate)",
                )  # fmt: skip
        return _decode.Constraints(
            json_grammar=self.grammar(),
            json_enabled=jnp.asarray([p.response_format == "json_object" for p in plist]),
            stops=stop.compile_stops([tuple(p.stop) for p in plist], self.token_bytes()),
            token_bytes=self.token_bytes(),
        )

    # ---- inputs -----------------------------------------------------------------------

    def render(self, messages: Any) -> str:
        """The prompt text of a chat: ``messages`` checked (:func:`validate_messages`) and
        rendered with the model file's chat template (a generation prompt added).

        Every failure, including a template that raises (``raise_exception``) and a model
        file without a template, is an :class:`InvalidRequestError` with field ``messages``.
        """
        messages = validate_messages(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as err:
            raise InvalidRequestError(
                "messages", messages, "messages the model's chat template accepts", reason=str(err)
            ) from err

    def encode_input(self, item) -> list[int]:
        """The prompt token ids of one input: a prompt string (tokenised as is), a list of
        chat messages (rendered with the chat template first) or token ids (a non-empty list
        or 1-d integer array, used as is; each in ``[0, vocab_size)``, field ``prompt``). An
        input that is an exception (a request that failed before it got here) raises it."""
        if isinstance(item, Exception):
            raise item
        if is_token_ids(item):  # used as is: no chat template, no special tokens added
            return token_id_array("prompt", item, self.vocab_size).tolist()
        if isinstance(item, (np.ndarray, jax.Array)):
            raise InvalidRequestError(
                "prompt",
                f"<{item.dtype} array of shape {tuple(item.shape)}>",
                _IDS_ALLOWED,
                reason="not a non-empty 1-d integer array",
            )
        if (
            isinstance(item, (list, tuple))
            and item
            and all(isinstance(t, (int, float, np.number, np.bool_)) for t in item)
        ):  # meant as token ids, never rounded: 1.0 or True is not a token id
            bad = next(t for t in item if not isinstance(t, (int, np.integer)) or _is_bool(t))
            why = f"a token id is an int, not {type(bad).__name__}"
            raise InvalidRequestError("prompt", bad, _IDS_ALLOWED, reason=why)
        if isinstance(item, str):
            field, text = _prompt_field(item), item
            _check_utf8(field, text, item)
        elif isinstance(item, (list, tuple)):
            field, text = "messages", self.render(item)
        else:
            raise InvalidRequestError(
                "messages", item, "a prompt string, a list of chat messages or token ids"
            )
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidRequestError(field, item, "a prompt of at least one token")
        return ids

    def prepare(self, item, params) -> tuple[list[int], int]:
        """``(prompt ids, resolved max_tokens)`` of one request, or InvalidRequestError."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", params, "a SamplingParams")
        ids = self.encode_input(item)
        max_tokens = check_for_model(
            params,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            prompt_length=len(ids),
            model_context=self.model.config.context_length,
            prompt_field=_prompt_field(item),
        )
        return ids, max_tokens

    def _request(self, key, item, p, job_seed: int):
        """Validates, tokenises and packs one request into a slot request (raises
        :class:`InvalidRequestError`)."""
        from jaxsample.engine import SlotRequest

        ids, max_tokens = self.prepare(item, p)
        if p.seed is not None:
            seed = p.seed
        else:  # a request without a seed takes one from its key: a key that cannot give one
            try:  # is the request's fault, on its seed
                seed = derive_seed(job_seed, key)
            except InvalidRequestError as err:
                raise InvalidRequestError(
                    "seed",
                    None,
                    f"a seed, or a request key to derive one from ({err.allowed})",
                    reason=f"the key is {_short_repr(key)}",
                ) from None
        return SlotRequest(
            key=(key, ids, p, seed),
            prompt=ids,
            rows=pack_rows(
                [p], vocab_size=self.vocab_size, seeds=[seed], transforms=self.transforms
            ),
            max_tokens=max_tokens,
            stops=tuple(p.stop),
            json_mode=p.response_format == "json_object",
            schema=self.compiled_schema(p, max_tokens),
        )

    def compiled_schema(self, p: SamplingParams, max_tokens: int | None = None):
        """The compiled JSON Schema of a ``json_schema`` request (cached by content), or None.

        Refuses (:class:`InvalidRequestError`) a schema outside the supported subset, naming
        the keyword and its JSON pointer, and a ``max_tokens`` below the shortest valid answer.
        """
        if p.response_format != "json_schema":
            return None
        from jaxsample.automata import json_schema

        obj = json.loads(p.json_schema)
        tok = self.tokenizer
        compiled = json_schema.compile_schema(
            obj["schema"],
            tok.token_bytes,
            eos_id=tok.eos_id,
            special_ids=tok.special_ids,
            strict=obj["strict"],
        )
        json_schema.check_budget(max_tokens, compiled)
        return compiled

    def stream(
        self, items: Iterable[tuple[Any, Any, SamplingParams]], *, job_seed: int = 0
    ) -> Iterator[tuple[Any, Completion]]:
        """Runs ``(key, input, SamplingParams)`` items through the slot engine; yields
        ``(key, Completion)`` as each request finishes (completion order).

        Items are pulled lazily as slots free up, so an endless iterable costs constant
        memory. A request without a seed gets ``derive_seed(job_seed, key)`` (``key`` an int
        or a str, e.g. a batch job's custom_id), reported in ``Completion.seed``. A bad item
        comes back as a Completion whose ``error`` is its :class:`InvalidRequestError`
        (``finish_reason == "error"``) as soon as the engine pulls it; the others run. An
        item that is a :class:`jaxsample.engine.PassThrough` of a ``(key, Completion)`` is
        yielded as it is, in its turn, with nothing generated (how :meth:`stream_requests`
        answers a scoring request, ``max_tokens: 0``). Left early (closed, or ``items``
        raises), the requests still running are dropped and the engine's slots and schema
        pool freed (:meth:`jaxsample.engine.SlotEngine.run`).
        """
        from jaxsample.engine import PassThrough

        job_seed = check_job_seed(job_seed)

        def requests():
            for n, entry in enumerate(items):
                if isinstance(entry, PassThrough):  # answered already: nothing to generate
                    yield entry
                    continue
                try:
                    key, item, p = entry
                except (TypeError, ValueError):  # the call's mistake, not one request's
                    raise ValueError(
                        "stream items are (key, input, SamplingParams) tuples;"
                        f" item {n} is {entry!r:.100}"
                    ) from None
                try:
                    yield self._request(key, item, p, job_seed)
                except Exception as err:  # a refusal, or unexpected: it fails alone
                    err = _request_error(err)
                    err.index = key
                    # answered as soon as the engine pulls it: refusals never pile up
                    yield PassThrough((key, _refused(err)))

        # one stream at a time: the slot engine refuses a run beside an open one
        runs = self.slot_engine().run(requests())
        try:
            for res in runs:
                if isinstance(res, PassThrough):
                    yield res.value
                    continue
                key, ids, p, seed = res.key
                if res.error is not None:  # the schema pool had no room for it
                    err = InvalidRequestError(
                        "response_format",
                        "<json_schema>",
                        "a schema that fits the engine's schema pool beside the running ones",
                        reason=str(res.error),
                        index=key,
                    )
                    yield key, _refused(err, seed)
                    continue
                yield key, self._completion(_as_batch(res), 0, ids, p, seed)
        finally:
            runs.close()  # its slots are emptied before another stream may start

    def generate(
        self,
        inputs,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        job_seed: int = 0,
        strict: bool = False,
    ) -> list[Completion]:
        """Generate one completion per input (see :func:`normalize_inputs`: a string is one
        prompt, a message list one conversation, a list of either a batch).

        Args:
          inputs: a prompt (raw text, no chat template), a chat message list, a prompt as
            token ids (a list or 1-d integer array, used as is), or a list of any of these
            (a 2-d integer array: one prompt per row).
          params: one SamplingParams for all, or one per input (default: SamplingParams()).
          job_seed: the job-level seed from which rows without a seed get theirs
            (``derive_seed(job_seed, index)``).
          strict: raise the first InvalidRequestError (before any device work) instead of
            returning it in ``Completion.error``.
        """
        inputs = normalize_inputs(inputs)
        job_seed = check_job_seed(job_seed)
        if not _is_bool(strict):  # strict="false" (a truthy string) ran strict
            raise InvalidRequestError("strict", strict, "a boolean (True or False)")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(inputs)
        if (
            isinstance(params, (Mapping, str, bytes))
            or not isinstance(params, Iterable)
            or (isinstance(params, (np.ndarray, jax.Array)) and params.ndim == 0)  # not iterable
        ):
            raise InvalidRequestError(
                "params",
                params,
                "one SamplingParams for all inputs or a list of one per input",
                reason="a dict is not a SamplingParams: SamplingParams(**d), or "
                "SamplingParams.from_request(body) for a request body"
                if isinstance(params, Mapping)
                else type(params).__name__,
            )
        params = list(params)
        if len(params) != len(inputs):
            raise InvalidRequestError(
                "params", len(params), f"one SamplingParams per input ({len(inputs)})"
            )
        items = list(zip(range(len(inputs)), inputs, params))
        if strict:
            for i, item, p in items:
                try:
                    self._request(i, item, p, job_seed)
                except InvalidRequestError as err:
                    err.index = i
                    raise
        results: list[Completion | None] = [None] * len(inputs)
        for i, c in self.stream(items, job_seed=job_seed):
            results[i] = c
        return results

    def _completion(self, out, b: int, prompt_ids, p: SamplingParams, seed: int) -> Completion:
        """Row ``b`` of a :class:`jaxsample.decode.DecodeOutput` as a :meth:`completion`."""
        n = int(out.n_tokens[b])
        return self.completion(
            out.tokens[b, :n],
            int(out.finish[b]),
            p,
            seed=seed,
            prompt_tokens=len(prompt_ids),
            logprobs=out.logprobs[b, :n],
            top_ids=out.top_ids[b, :n],
            top_logprobs=out.top_logprobs[b, :n],
        )

    def completion(
        self,
        token_ids: Sequence[int],
        finish_code: int,
        p: SamplingParams,
        *,
        seed: int,
        prompt_tokens: int,
        logprobs=None,
        top_ids=None,
        top_logprobs=None,
    ) -> Completion:
        """One row's :class:`Completion` from what the device produced.

        Args:
          token_ids: the N tokens emitted (the end-of-sequence token included, if any).
          finish_code: the row's finish code (``jaxsample.decode.FINISH_*``).
          p: the request's params (stop strings, logprobs, top_logprobs).
          seed: the seed the row used; prompt_tokens: the prompt's length.
          logprobs: f32[N] and top_ids i32[N, 20], top_logprobs f32[N, 20]: the sampler's
            values per emitted token (needed when ``p.logprobs``).
        """
        tb = self.tokenizer.token_bytes
        ids = [int(t) for t in token_ids]
        # the text: EOS is not part of it; a stop string and what follows are cut away
        content_ids = ids[:-1] if finish_code == _decode.FINISH_EOS and ids else ids
        pieces = [tb[t] for t in content_ids]
        raw = b"".join(pieces)
        cut = False
        if p.stop:
            raw, cut = stop.truncate(raw, tuple(p.stop))
        entries = None
        if p.logprobs:
            entries = []
            start = 0
            for j, t in enumerate(content_ids):
                if cut and start >= len(raw):
                    break  # this token lies wholly inside the cut-away stop string
                start += len(pieces[j])
                top = [(int(top_ids[j, k]), top_logprobs[j, k]) for k in range(p.top_logprobs)]
                entries.append(self.logprob_entry(t, logprobs[j], top))
        return Completion(
            text=raw.decode("utf-8", errors="replace"),
            token_ids=ids,
            finish_reason=FINISH_REASONS.get(finish_code, "length"),
            native_finish_reason=NATIVE_FINISH_REASONS.get(finish_code, "length"),
            logprobs=entries,
            prompt_tokens=prompt_tokens,
            seed=seed,
        )

    def logprob_entry(self, token: int, logprob, top: Sequence[tuple[int, Any]]) -> dict:
        """One OpenAI ``logprobs.content`` entry: ``token`` (text), ``logprob``, ``bytes``,
        ``top_logprobs`` (from ``top``, ``(id, logprob)`` pairs; ids outside the vocabulary
        are padding and left out).

        A special token shows its own text (``"<|im_end|>"``) and that text's UTF-8 bytes;
        a log probability of -inf (no probability) is written ``NO_PROBABILITY``.
        """
        shown = self.tokenizer.shown_bytes

        def entry(t: int, lp) -> dict:
            bts = shown[t]
            return {
                "token": bts.decode("utf-8", errors="replace"),
                "logprob": _logprob(lp),
                "bytes": list(bts),
            }

        e = entry(token, logprob)
        e["top_logprobs"] = [entry(t, lp) for t, lp in top if 0 <= t < len(shown)]
        return e

    # ---- OpenAI-shaped requests and responses ---------------------------------------

    def _seeded(self, p: SamplingParams, key: Any, job_seed: int) -> SamplingParams:
        """``p`` with the request's seed: its own, else ``derive_seed(job_seed, key)``."""
        if p.seed is not None:
            return p
        if not isinstance(key, (int, str)):
            raise InvalidRequestError(
                "seed", None, "a seed, or an int or str request key to derive one from"
            )
        return dataclasses.replace(p, seed=derive_seed(job_seed, key))

    def _chat_request(self, body: Any, key: Any, job_seed: int) -> _Plan:
        """The :class:`_Plan` of one chat-completions body: its one prompt (the rendered
        messages, or raw ``prompt`` text), ``n`` choices, a ``chat.completion``."""
        p = SamplingParams.from_request(body)
        n = request_n(body.get("n"))
        messages, prompt = body.get("messages"), body.get("prompt")
        if messages is not None and prompt is not None:
            raise InvalidRequestError(
                "prompt", prompt, "either messages or prompt, not both", reason="both given"
            )
        if messages is not None:
            text = _RenderedChat(self.render(messages))
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequestError("prompt", prompt, "a string (raw text)")
            text = prompt
        else:
            raise InvalidRequestError("messages", None, _MESSAGES_ALLOWED, reason="missing")
        p = self._seeded(p, key, job_seed)
        return _Plan([(text, p)], n, lambda choices: self.response(choices, p))

    def _text_request(self, body: Any, key: Any, job_seed: int) -> _Plan:
        """The :class:`_Plan` of one text-completions body: each prompt tokenised once (its
        faults named on ``prompt``), ``n`` choices each, a ``text_completion``."""
        p = SamplingParams.from_request(body, endpoint="completions")
        n = request_n(body.get("n"))
        p = self._seeded(p, key, job_seed)
        generate = not text_scoring_only(body)  # max_tokens 0 with echo: score the prompts
        prompts, echoes = [], [] if body.get("echo") else None
        for prompt in _text_prompts(body.get("prompt")):
            # token ids checked, text tokenised as is (a prompt to score may fill the context)
            ids = self.encode_input(prompt) if generate else self.scoring_ids(prompt)
            q = p
            if p.max_tokens is None and generate:  # OpenAI's default, within the room left
                room = self.context_length - len(ids)  # (none: the prompt is refused)
                q = dataclasses.replace(p, max_tokens=max(1, min(TEXT_MAX_TOKENS, room)))
            prompts.append((ids, q))
            if echoes is not None:
                echoes.append(prompt if isinstance(prompt, str) else self.shown_text(ids))

        def respond(choices: list[Completion]) -> dict:
            scored = None
            if echoes is not None and p.logprobs:  # the prompts' own, once per prompt
                scored = [self.prompt_legacy(ids, p.top_logprobs) for ids, _ in prompts]
            return self.text_response(choices, p, n, echoes, scored)

        return _Plan(prompts, n, respond, generate)

    def stream_requests(
        self, items: Iterable[tuple[Any, str, Any]], *, job_seed: int = 0
    ) -> Iterator[tuple[Any, dict]]:
        """Answer ``(key, endpoint, body)`` requests lazily, yielding ``(key, dict)`` as each
        request finishes (all its choices). ``endpoint`` is ``"chat"`` (a chat-completions
        body, answered with a ``chat.completion``) or ``"completions"`` (a legacy
        text-completions body, answered with a ``text_completion``); one stream may mix both.

        The dict is that object or an OpenAI error object (:func:`error_response`); a bad
        request fails alone. A request without a seed gets ``derive_seed(job_seed, key)``
        (key an int or a str such as a custom_id); choice ``j`` of each of its prompts runs
        with :func:`choice_seed` ``(seed, j)``. Bodies are pulled as the engine takes
        requests, so an endless iterator runs in flat memory.
        """
        from jaxsample.engine import PassThrough

        job_seed = check_job_seed(job_seed)
        plans = {"chat": self._chat_request, "completions": self._text_request}
        pending: dict[int, dict] = {}

        def requests():
            for serial, entry in enumerate(items):
                if (
                    isinstance(entry, Mapping)
                    or not (isinstance(entry, (tuple, list)) and len(entry) == 3)
                    or not (isinstance(entry[1], str) and entry[1] in plans)
                ):  # the call's mistake, not one request's
                    raise ValueError(
                        "stream_requests items are (key, endpoint, body) triples, endpoint"
                        f" one of {ENDPOINTS}; item {serial} is {entry!r:.100}"
                    )
                key, endpoint, body = entry
                try:
                    plan = plans[endpoint](body, key, job_seed)
                except Exception as err:  # refused, or failed unexpectedly
                    # one item that the engine answers with this error (stream makes it a
                    # refusal or a RequestFailed), in order
                    pending[serial] = {"key": key, "total": 1, "respond": None, "done": {}}
                    yield (serial, 0), err, SamplingParams(seed=0)
                    continue
                total = len(plan.prompts) * plan.n
                pending[serial] = {"key": key, "total": total, "respond": plan.respond, "done": {}}
                for index, item, p in plan.choices():
                    if plan.generate:
                        yield (serial, index), item, p
                    else:  # answered in its turn, never given to the slot engine
                        yield PassThrough(((serial, index), _not_generated(item, p)))

        for (serial, index), c in self.stream(requests(), job_seed=job_seed):
            state = pending[serial]
            state["done"][index] = c
            if len(state["done"]) < state["total"]:
                continue
            del pending[serial]
            choices = [state["done"][k] for k in range(state["total"])]
            key = state["key"]
            error = next((c.error for c in choices if c.error is not None), None)
            if error is None:
                try:  # the response (with echo and logprobs it runs the scoring program)
                    response = state["respond"](choices)
                except Exception as err:  # unexpected: this request fails alone
                    error = _request_error(err)
            if error is not None:
                error.index = key if isinstance(key, (int, str)) else None
                response = error_response(error)
            yield key, response

    def stream_chat(
        self, bodies: Iterable[tuple[Any, Any]], *, job_seed: int = 0
    ) -> Iterator[tuple[Any, dict]]:
        """Answer ``(key, body)`` chat-completions requests lazily, yielding ``(key, dict)``
        as each request finishes (all its ``n`` choices): :meth:`stream_requests` with the
        endpoint ``"chat"``.

        The dict is a ``chat.completion`` object or an OpenAI error object
        (:func:`error_response`); a bad request fails alone. A request without a seed gets
        ``derive_seed(job_seed, key)`` (key an int or a str such as a custom_id); choice
        ``i`` runs with :func:`choice_seed` ``(seed, i)``. Bodies are pulled as the engine
        takes requests, so an endless iterator runs in flat memory.
        """
        _check_bodies(bodies, "(key, body) pairs", "chat_completion")
        items = _tagged(bodies, "chat", "stream_chat", "chat_completions")
        yield from self.stream_requests(items, job_seed=job_seed)

    def stream_text_completions(
        self, bodies: Iterable[tuple[Any, Any]], *, job_seed: int = 0
    ) -> Iterator[tuple[Any, dict]]:
        """:meth:`stream_chat` for legacy text-completions bodies (``/v1/completions``):
        ``(key, body)`` in, ``(key, text_completion or error object)`` out as each request
        finishes (all its prompts' ``n`` choices)."""
        _check_bodies(bodies, "(key, body) pairs", "text_completion")
        items = _tagged(bodies, "completions", "stream_text_completions", "text_completions")
        yield from self.stream_requests(items, job_seed=job_seed)

    def _answer_all(self, bodies: Any, endpoint: str, one: str, job_seed: int) -> list[dict]:
        _check_bodies(bodies, "request bodies (dicts)", one)
        bodies = list(bodies)
        items = ((i, endpoint, body) for i, body in enumerate(bodies))
        results = dict(self.stream_requests(items, job_seed=job_seed))
        return [results[i] for i in range(len(bodies))]

    def chat_completions(self, bodies: Sequence[dict], *, job_seed: int = 0) -> list[dict]:
        """Answer a list of chat-completions request bodies (the key of each is its index);
        a bad one fails alone (an OpenAI error object in its place)."""
        return self._answer_all(bodies, "chat", "chat_completion", job_seed)

    def chat_completion(self, body: dict, *, job_seed: int = 0) -> dict:
        """Answer one chat-completions request body (key 0) with a ``chat.completion`` dict."""
        return self.chat_completions([body], job_seed=job_seed)[0]

    def text_completions(self, bodies: Sequence[dict], *, job_seed: int = 0) -> list[dict]:
        """Answer a list of legacy text-completions request bodies (``/v1/completions``;
        the key of each is its index) with ``text_completion`` dicts; a bad one fails alone
        (an OpenAI error object in its place). docs/api.md, "Text completions"."""
        return self._answer_all(bodies, "completions", "text_completion", job_seed)

    def text_completion(self, body: dict, *, job_seed: int = 0) -> dict:
        """Answer one text-completions request body (key 0) with a ``text_completion``."""
        return self.text_completions([body], job_seed=job_seed)[0]

    def _envelope(self, prefix: str, kind: str, out: list, choices, n: int) -> dict:
        """The response object around its choices ``out``: ``usage.prompt_tokens`` counts
        each prompt once (choice ``i * n`` is prompt ``i``'s first), ``completion_tokens``
        the tokens of all choices; ``seed`` is the request's seed (choice 0's)."""
        prompt_tokens = sum(c.prompt_tokens for c in choices[::n])
        completion_tokens = sum(c.completion_tokens for c in choices)
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": out,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "seed": choices[0].seed,
        }

    def response(self, choices: Completion | Sequence[Completion], p: SamplingParams) -> dict:
        """The OpenAI ``chat.completion`` object of one request's choices.

        ``usage.prompt_tokens`` counts the prompt once, ``completion_tokens`` the tokens of
        all choices (an end-of-sequence token included); ``seed`` is the request's seed
        (choice 0's). Each choice also carries ``native_finish_reason``.
        """
        if isinstance(choices, Completion):
            choices = [choices]
        out = []
        for i, c in enumerate(choices):
            out.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "finish_reason": c.finish_reason,
                    "native_finish_reason": c.native_finish_reason,
                    "logprobs": {"content": c.logprobs, "refusal": None} if p.logprobs else None,
                }
            )
        return self._envelope("chatcmpl", "chat.completion", out, choices, len(choices))

    def text_response(
        self,
        choices: Completion | Sequence[Completion],
        p: SamplingParams,
        n: int = 1,
        echoes: Sequence[str] | None = None,
        prompt_logprobs: Sequence[dict] | None = None,
    ) -> dict:
        """The OpenAI ``text_completion`` object of one request's choices, prompt-major:
        choice ``i * n + j`` is choice ``j`` of prompt ``i``.

        ``echoes``: each prompt's text, put before its choices' text (``echo``), or None.
        With ``p.logprobs`` each choice has the legacy ``logprobs`` object
        (:meth:`legacy_logprobs`, ``p.top_logprobs`` most likely tokens per position),
        after ``prompt_logprobs[i]`` when given (each prompt's own, :meth:`prompt_legacy`:
        the echo's). ``usage.prompt_tokens`` sums the prompts; each choice also carries
        ``native_finish_reason``, and ``seed`` is the request's seed.
        """
        if isinstance(choices, Completion):
            choices = [choices]
        out = []
        for i, c in enumerate(choices):
            prefix = echoes[i // n] if echoes is not None else ""
            logprobs = self.legacy_logprobs(c, len(prefix)) if p.logprobs else None
            if logprobs is not None and prompt_logprobs is not None:
                first = prompt_logprobs[i // n]
                logprobs = {name: first[name] + part for name, part in logprobs.items()}
            out.append(
                {
                    "text": prefix + c.text,
                    "index": i,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "native_finish_reason": c.native_finish_reason,
                }
            )
        return self._envelope("cmpl", "text_completion", out, choices, n)

    def legacy_logprobs(self, c: Completion, start: int = 0) -> dict:
        """The legacy (``/v1/completions``) ``logprobs`` object of a completion whose
        ``logprobs`` entries were asked for: ``tokens`` (each token's text, as
        :meth:`logprob_entry` shows it), ``token_logprobs``, ``top_logprobs`` (per position
        a map token text -> log probability: the entry's ``top_logprobs`` tokens, then the
        drawn token if its text is not among them, so up to k + 1 keys; a text that two
        tokens share keeps the first, likelier one) and ``text_offset`` (the character of
        the choice's text in which each token's first byte lies, plus ``start``, the length
        of an echoed prompt before it; a special token adds no text: it has the next
        character's offset)."""
        entries = c.logprobs or []
        tb = self.tokenizer.token_bytes
        offsets = _char_offsets([tb[t] for t in c.token_ids[: len(entries)]])
        return {**_legacy_fields(entries), "text_offset": [start + o for o in offsets]}

    def prompt_legacy(self, ids: Sequence[int], top_logprobs: int) -> dict:
        """The legacy ``logprobs`` object of a prompt's own tokens (``echo`` with
        ``logprobs``), as :meth:`legacy_logprobs` writes a completion's: ``tokens`` (each
        prompt token's text, special tokens shown), ``token_logprobs`` (null for the first
        token, then the raw log probability of each given those before it),
        ``top_logprobs`` (null, then the ``top_logprobs`` most likely tokens and the prompt's
        own) and ``text_offset`` (from 0 over the prompt's shown text, the echo). One run of
        the scoring program (:meth:`scorer`)."""
        r = self._scored(ids, top_logprobs)
        entries = [
            self.logprob_entry(t, lp, zip(top_ids.tolist(), top_lps, strict=True))
            for t, lp, top_ids, top_lps in zip(
                ids[1:], r.logprobs[1:], r.top_ids[1:], r.top_logprobs[1:], strict=True
            )
        ]
        fields = _legacy_fields(entries)
        return {
            "tokens": r.tokens,  # the entries' texts, and the first token's
            "token_logprobs": [None, *fields["token_logprobs"]],
            "top_logprobs": [None, *fields["top_logprobs"]],
            "text_offset": _char_offsets([self.tokenizer.shown_bytes[t] for t in ids]),
        }

    def shown_text(self, ids: Sequence[int]) -> str:
        """The text of token ids as the responses show tokens: special tokens by their text
        (``<|im_end|>``), bytes that are not UTF-8 as U+FFFD (the echo of an id prompt)."""
        shown = self.tokenizer.shown_bytes
        return b"".join(shown[int(t)] for t in ids).decode("utf-8", errors="replace")


@dataclasses.dataclass
class _Plan:
    """One request body made ready: its prompts, each with its params (the request's seed
    set), ``n`` choices of each, and how the choices become the response."""

    prompts: list[tuple[Any, SamplingParams]]
    n: int
    respond: Callable[[list[Completion]], dict]
    #: False: nothing is generated (a scoring request, ``max_tokens: 0``); each choice is
    #: answered at once by :func:`_not_generated`
    generate: bool = True

    def choices(self) -> Iterator[tuple[int, Any, SamplingParams]]:
        """``(index, input, params)`` of every choice, prompt-major (index ``i * n + j``):
        choice ``j`` of every prompt runs with :func:`choice_seed` ``(seed, j)``, the seed
        it has when its prompt is sent alone."""
        for i, (item, p) in enumerate(self.prompts):
            for j in range(self.n):
                yield i * self.n + j, item, dataclasses.replace(p, seed=choice_seed(p.seed, j))


def _not_generated(ids: Sequence[int], p: SamplingParams) -> Completion:
    """The choice of a request that generates nothing (``max_tokens: 0`` with ``echo``): no
    token, ``finish_reason`` "length" (its budget, 0, is spent), as OpenAI answers it."""
    return Completion(
        finish_reason="length",
        native_finish_reason="length",
        logprobs=[] if p.logprobs else None,
        prompt_tokens=len(ids),
        seed=p.seed,
    )


def _tagged(bodies: Iterable, endpoint: str, name: str, alone: str) -> Iterator[tuple]:
    """``(key, endpoint, body)`` of each ``(key, body)`` pair of a stream (ValueError for an
    item that is not a pair: the call's mistake, not one request's)."""
    for serial, entry in enumerate(bodies):
        if isinstance(entry, Mapping) or not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            # a dict was unpacked as its keys
            raise ValueError(
                f"{name} items are (key, body) pairs ({alone} takes the bodies alone);"
                f" item {serial} is {entry!r:.100}"
            )
        yield entry[0], endpoint, entry[1]


_TEXT_PROMPT_ALLOWED = (
    "a non-empty string, a non-empty list of them, a non-empty list of token ids, or a"
    " non-empty list of non-empty lists of token ids"
)


def _text_prompts(prompt: Any) -> list:
    """The prompts of a text-completions body's ``prompt``: a string, a list of strings, a
    list of token ids (one prompt) or a list of lists of token ids. The ids themselves (ints
    in the vocabulary) are checked by :meth:`Engine.encode_input`."""
    numbers = (int, float, np.number, np.bool_)  # ids; floats and bools refused by name there
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt:
        if all(isinstance(x, str) for x in prompt):
            return list(prompt)
        if all(isinstance(x, numbers) for x in prompt):
            return [list(prompt)]  # one prompt given as token ids
        if all(
            isinstance(x, (list, tuple)) and x and all(isinstance(t, numbers) for t in x)
            for x in prompt
        ):
            return [list(x) for x in prompt]
    if prompt is None:
        reason = "missing"
    elif isinstance(prompt, (list, tuple)):
        reason = "an empty list" if not prompt else "not one of these forms"
    else:
        reason = type(prompt).__name__
    raise InvalidRequestError("prompt", prompt, _TEXT_PROMPT_ALLOWED, reason=reason)


def _legacy_fields(entries: Sequence[dict]) -> dict:
    """``tokens``, ``token_logprobs`` and ``top_logprobs`` of the legacy ``logprobs`` object
    from ``logprobs.content`` entries: per position a map token text -> log probability, the
    entry's ``top_logprobs`` tokens, then its own token if its text is not among them (a
    text that two tokens share keeps the first, likelier one)."""
    top = []
    for e in entries:
        best: dict[str, float] = {}
        for t in e["top_logprobs"]:
            best.setdefault(t["token"], t["logprob"])
        best.setdefault(e["token"], e["logprob"])
        top.append(best)
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": top,
    }


def _char_starts(raw: bytes) -> list[int]:
    """The first byte of each character of ``raw.decode("utf-8", errors="replace")``: a
    valid run's characters by their UTF-8 lengths, each ill-formed span (the one a strict
    decode reports, which ``"replace"`` turns into one U+FFFD) as one character. Linear:
    each strict decode starts at the last span's end, on a memoryview (no copy)."""
    view = memoryview(raw)
    starts: list[int] = []
    pos = 0
    while pos < len(raw):
        try:
            text, _ = codecs.utf_8_decode(view[pos:], "strict", True)
            bad = None
        except UnicodeDecodeError as err:
            text, _ = codecs.utf_8_decode(view[pos : pos + err.start], "strict", True)
            bad = (pos + err.start, pos + err.end)
        for ch in text:
            starts.append(pos)
            pos += len(ch.encode("utf-8", "surrogatepass"))
        if bad is None:
            break
        starts.append(bad[0])
        pos = bad[1]
    return starts


def _char_offsets(pieces: Sequence[bytes]) -> list[int]:
    """For each piece, the index of the character in which its first byte lies in
    ``b"".join(pieces).decode("utf-8", errors="replace")`` (a piece that starts inside a
    multi-byte character gets that character's; an empty piece, or one at the end, the
    next character's)."""
    raw = b"".join(pieces)
    starts = _char_starts(raw)
    offsets, first = [], 0
    for piece in pieces:
        offsets.append(bisect.bisect_right(starts, first) - 1 if first < len(raw) else len(starts))
        first += len(piece)
    return offsets


def _check_bodies(bodies: Any, what: str, one: str) -> None:
    """Refuses, naming ``bodies``, one request body (a dict) or a string given where a list
    of them belongs: iterating it would make one failed request per key or character
    (``one``: the method that answers one body)."""
    if isinstance(bodies, (Mapping, str, bytes)) or not isinstance(bodies, Iterable):
        raise InvalidRequestError(
            "bodies",
            bodies,
            f"an iterable of {what}",
            reason=f"one body: use {one}(body)"
            if isinstance(bodies, Mapping)
            else type(bodies).__name__,
        )


def _as_batch(res) -> _decode.DecodeOutput:
    """One slot result as a batch of one (the shape :meth:`Engine._completion` reads)."""
    return _decode.DecodeOutput(
        tokens=res.tokens[None],
        n_tokens=np.array([len(res.tokens)], np.int32),
        logprobs=res.logprobs[None],
        top_ids=res.top_ids[None],
        top_logprobs=res.top_logprobs[None],
        finish=np.array([res.finish], np.int32),
    )


def error_response(err: InvalidRequestError | RequestFailed) -> dict:
    """The OpenAI error object for a refused request (``server_error`` for a
    :class:`RequestFailed`)."""
    return {
        "error": {
            "message": str(err),
            "type": "server_error" if isinstance(err, RequestFailed) else "invalid_request_error",
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

    ``inputs`` may be one prompt string, one message list, one list of token ids, or a list
    of any of these (:func:`normalize_inputs`, the same rule as ``Engine.generate``).
    ``transforms``: a user transform chain to run in the decode loop (the engine's own chain
    when None); requests set its values with ``SamplingParams(transform_params=...)``.

    Example::

        from jaxsample import generate, SamplingParams
        [c] = generate([{"role": "user", "content": "Name a colour."}],
                       SamplingParams(temperature=0.0, max_tokens=8))
    """
    if engine is not None and not isinstance(engine, Engine):
        raise InvalidRequestError(
            "engine", engine, "an Engine (Engine.load(...)), or None for the default model"
        )
    engine = engine or default_engine()
    if transforms is not None:
        options = {**engine.engine_options, "transforms": transforms}
        engine = Engine(engine.model, engine.tokenizer, model_name=engine.model_name, **options)
    return engine.generate(inputs, params, job_seed=job_seed, strict=strict)


__all__ = [
    "FINISH_REASONS",
    "NATIVE_FINISH_REASONS",
    "NO_PROBABILITY",
    "Completion",
    "Engine",
    "choice_seed",
    "default_engine",
    "error_response",
    "generate",
    "is_token_ids",
    "normalize_inputs",
    "validate_messages",
]
