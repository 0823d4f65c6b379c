"""One request's sampling parameters: validated on the host, packed into device rows.

Data flows one way (docs/DESIGN.md)::

    request dict --SamplingParams.from_request--> SamplingParams (validated, immutable)
        --check_for_model--> resolved max_tokens (needs vocabulary and context sizes)
        --pack_rows--> RowParams of numpy arrays with a leading batch axis

Every bad value is refused here, before any device work, with an
:class:`InvalidRequestError` that names the field, the value and the allowed range. Nothing
is clamped: a value that is accepted is kept exactly as given. The ranges are those of
``../shared/SPEC.md``; the decisions it leaves open are written down in ``docs/params.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams
from jaxsample.transforms import (
    FLOAT32_MAX,
    GREEDY_TEMPERATURE,
    TransformError,
    check_chain,
    check_user_output,
)

#: The device capacity of logit_bias per row (``NB`` in docs/DESIGN.md). Every row is padded
#: to exactly this many entries, so the number of biased tokens never changes a shape.
LOGIT_BIAS_MAX = 1024

#: The longest stop string, in UTF-8 bytes: the static size of the stop automaton.
STOP_MAX_BYTES = 64

#: At most this many stop strings per request (as the OpenAI API).
STOP_MAX_COUNT = 4

#: The bound on logit_bias values (both signs).
LOGIT_BIAS_LIMIT = 100.0

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
LOGPROBS_MODES = ("raw", "processed")

_REPR_LIMIT = 200


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts (4300), or one inside
        if _is_int(value):
            sign = "negative " if value < 0 else ""
            return f"<{sign}int of {int(value).bit_length()} bits>"
        return f"<{type(value).__name__} holding an int too large to show>"
    except RecursionError:  # a structure nested too deeply to show
        return f"<{type(value).__name__} nested too deeply to show>"
    except Exception:  # an object whose own __repr__ raises: the error still names it
        return f"<{type(value).__name__} object>"
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    return text


def _key_text(key: Any) -> str:
    """A map key as text for a field name or a list of keys: a string as is, anything else
    as its short repr (``str(10**5000)`` raises ValueError)."""
    return key if isinstance(key, str) else _short_repr(key)


class InvalidRequestError(ValueError):
    """A request that cannot be run; names the field, the offending value and what is allowed.

    Attributes:
      field: the request field at fault, e.g. ``"top_p"``.
      value: the offending value (for a map such as logit_bias, the offending entry).
      allowed: a human description of the allowed values, e.g. ``"a number in [0.0, 1.0]"``.
      reason: an optional extra word on why (``"a boolean is not a number"``), or None.
      index: the position of the request in a batch, set by the caller that knows it, or None.

    Example::

        >>> err = InvalidRequestError("top_p", 1.5, "a number in [0.0, 1.0]")
        >>> str(err)
        "invalid request: 'top_p' = 1.5; allowed: a number in [0.0, 1.0]"
    """

    def __init__(
        self, field: str, value: Any, allowed: str, *, reason: str | None = None, index=None
    ):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.reason = reason
        self.index = index
        super().__init__(self._message())

    def _message(self) -> str:
        where = "" if self.index is None else f" (request {self.index})"
        why = "" if self.reason is None else f" ({self.reason})"
        return (
            f"invalid request{where}: {self.field!r} = {_short_repr(self.value)}{why}; "
            f"allowed: {self.allowed}"
        )

    def __str__(self) -> str:  # the index may be set after construction
        return self._message()


# ----------------------------------------------------------------------------- checkers


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not _is_bool(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not _is_bool(value)


def _type_reason(value: Any, convert: str) -> str:
    """Why a value of the wrong type is refused: its type, and for an array (a 0-d numpy or
    JAX array from a sweep, ``jnp.linspace(...)[i]``) how to pass it."""
    name = type(value).__name__
    if isinstance(value, (np.ndarray, jax.Array)):
        return f"{name} of shape {tuple(value.shape)}, not a Python number: pass {convert}(x)"
    return name


def _number(field: str, value: Any, lo: float, hi: float, allowed: str | None = None) -> float:
    """Checks a float field: a finite int or float (not a bool) in [lo, hi]; returns a float."""
    allowed = allowed or f"a number in [{lo!r}, {hi!r}]"
    if _is_bool(value):
        raise InvalidRequestError(field, value, allowed, reason="a boolean is not a number")
    if not _is_number(value):
        raise InvalidRequestError(field, value, allowed, reason=_type_reason(value, "float"))
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        raise InvalidRequestError(field, value, allowed, reason="not finite")
    if not lo <= value <= hi:  # compared before float(): a huge int never overflows
        raise InvalidRequestError(field, value, allowed, reason="out of range")
    return float(value)


def _integer(field: str, value: Any, lo: int | None, hi: int | None, allowed: str) -> int:
    """Checks an int field: an int (not a bool, not a float) in [lo, hi]; returns an int."""
    if _is_bool(value):
        raise InvalidRequestError(field, value, allowed, reason="a boolean is not an integer")
    if not _is_int(value):
        raise InvalidRequestError(field, value, allowed, reason=_type_reason(value, "int"))
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(field, value, allowed, reason="out of range")
    return value


_DECIMAL = re.compile(r"[0-9]+")
_BIAS_KEY = "token ids as ints >= 0 or decimal strings of ASCII digits"
_BIAS_ALLOWED = f"a map of at most {LOGIT_BIAS_MAX} {_BIAS_KEY} to numbers in [-100.0, 100.0]"


def _bias_key(key: Any) -> int:
    if _is_int(key) and key >= 0:
        return int(key)
    if isinstance(key, str) and _DECIMAL.fullmatch(key):
        try:
            return int(key)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits())
            pass
    raise InvalidRequestError(
        "logit_bias", key, _BIAS_ALLOWED, reason=f"key {_short_repr(key)} is not a token id"
    )


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in value
    ):
        items = [tuple(p) for p in value]
    else:
        raise InvalidRequestError("logit_bias", value, _BIAS_ALLOWED, reason="not a map")
    if len(items) > LOGIT_BIAS_MAX:
        raise InvalidRequestError(
            "logit_bias",
            f"<map with {len(items)} entries>",
            _BIAS_ALLOWED,
            reason=f"more than {LOGIT_BIAS_MAX} entries",
        )
    out: dict[int, float] = {}
    for key, bias in items:
        token = _bias_key(key)
        if token in out:
            raise InvalidRequestError(
                "logit_bias", key, _BIAS_ALLOWED, reason=f"token id {token} given twice"
            )
        try:
            out[token] = _number("logit_bias", bias, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
        except InvalidRequestError as err:
            raise InvalidRequestError(
                "logit_bias", {key: bias}, _BIAS_ALLOWED, reason=err.reason
            ) from None
    return tuple(sorted(out.items()))


_STOP_ALLOWED = (
    f"a string or a list of at most {STOP_MAX_COUNT} non-empty strings, "
    f"each at most {STOP_MAX_BYTES} bytes in UTF-8"
)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        strings = [value]
    elif isinstance(value, (list, tuple)):
        strings = list(value)
    else:
        raise InvalidRequestError("stop", value, _STOP_ALLOWED, reason="not a string or list")
    if len(strings) > STOP_MAX_COUNT:
        raise InvalidRequestError(
            "stop", value, _STOP_ALLOWED, reason=f"more than {STOP_MAX_COUNT} strings"
        )
    for s in strings:
        if not isinstance(s, str):
            raise InvalidRequestError("stop", s, _STOP_ALLOWED, reason="not a string")
        if not s:
            raise InvalidRequestError("stop", s, _STOP_ALLOWED, reason="empty string")
        try:
            size = len(s.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "stop", s, _STOP_ALLOWED, reason="not encodable as UTF-8"
            ) from None
        if size > STOP_MAX_BYTES:
            raise InvalidRequestError("stop", s, _STOP_ALLOWED, reason=f"{size} bytes")
    return tuple(strings)


_FORMAT_ALLOWED = (
    '{"type": "text"}, {"type": "json_object"} or '
    '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}'
)
_SCHEMA_KEYS = ("name", "schema", "strict", "description")


class _IntTooLarge(Exception):
    """An integer of a JSON Schema that no double holds (``float(i)`` overflows)."""


def _double_int(digits: str) -> int:
    """``json.loads``' ``parse_int`` for a schema: the int, if a double can hold it."""
    value = int(digits)
    try:
        float(value)
    except OverflowError:
        raise _IntTooLarge(_short_repr(value)) from None
    return value


def _check_text(field: str, text: str) -> None:
    """Refuses a string that cannot be encoded as UTF-8 (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            field,
            text,
            "text encodable as UTF-8",
            reason=f"a lone surrogate {text[err.start]!r} at character {err.start}",
        ) from None


def _json_schema_object(value: Any) -> str:
    """The ``json_schema`` object of a response_format, validated (the schema against the
    supported subset too), as canonical JSON text: ``{"name", "schema", "strict"}``."""
    from jaxsample.automata import json_schema as js

    field = "response_format.json_schema"
    allowed = '{"name": "<1-64 of a-z A-Z 0-9 _ ->", "schema": {...}, "strict": true|false}'
    if not isinstance(value, Mapping):
        raise InvalidRequestError(field, value, allowed, reason="not an object")
    extra = sorted(_key_text(k) for k in value if k not in _SCHEMA_KEYS)
    if extra:
        raise InvalidRequestError(field, value, allowed, reason=f"unknown keys {extra}")
    name = value.get("name")
    ok_name = isinstance(name, str) and 1 <= len(name) <= 64
    if not ok_name or not all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
        raise InvalidRequestError(f"{field}.name", name, "1-64 characters of a-z A-Z 0-9 _ -")
    strict = value.get("strict", False)
    if strict is None:
        strict = False
    if not _is_bool(strict):
        raise InvalidRequestError(f"{field}.strict", strict, "a boolean (true or false)")
    description = value.get("description")
    if description is not None:  # no effect on the output, but it must be what OpenAI takes
        if not isinstance(description, str):
            raise InvalidRequestError(
                f"{field}.description", description, "a string (or null)", reason="not a string"
            )
        _check_text(f"{field}.description", description)
    if "schema" not in value or not isinstance(value["schema"], (Mapping, bool)):
        raise InvalidRequestError(
            f"{field}.schema",
            value.get("schema"),
            "a JSON Schema object",
            reason="missing or not an object",
        )
    try:
        text = js.canonical(value["schema"])
        text.encode("utf-8")  # a lone surrogate in a literal would fail in the compiler
        # a number a double cannot hold (an int of 400 digits) raised OverflowError inside
        # the schema checks; JSON parsers read such numbers as doubles, so it is refused here
        json.loads(text, parse_int=_double_int)
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"{field}.schema",
            value["schema"],
            "a JSON Schema object encodable as UTF-8",
            reason=f"a lone surrogate {text[err.start]!r}",
        ) from None
    except RecursionError:  # json.dumps of a schema nested thousands deep
        raise InvalidRequestError(
            f"{field}.schema",
            "<a schema nested too deeply>",
            "a JSON Schema object",
            reason="nested too deeply",
        ) from None
    except _IntTooLarge as err:
        raise InvalidRequestError(
            f"{field}.schema",
            value["schema"],
            "a JSON Schema object whose numbers are finite doubles (magnitude below 1.8e308)",
            reason=f"the number {err.args[0]} is too large",
        ) from None
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"{field}.schema", value["schema"], "a JSON Schema object", reason="not JSON"
        ) from None
    js.check_schema(text, strict=bool(strict))
    return js.canonical({"name": name, "schema": json.loads(text), "strict": bool(strict)})


def _response_format(value: Any, stored_schema: Any = None) -> tuple[str, str | None]:
    """(type string, canonical json_schema object text or None)."""
    if value is None:
        return "text", None
    kind = value
    if isinstance(value, Mapping):
        if "type" not in value:
            raise InvalidRequestError("response_format", value, _FORMAT_ALLOWED, reason="no 'type'")
        kind = value["type"]
    if not isinstance(kind, str) or kind not in RESPONSE_FORMATS:
        raise InvalidRequestError("response_format", value, _FORMAT_ALLOWED, reason="unknown type")
    known = ("type", "json_schema") if kind == "json_schema" else ("type",)
    extra = (
        sorted(_key_text(k) for k in value if k not in known) if isinstance(value, Mapping) else []
    )
    if extra:
        raise InvalidRequestError(
            "response_format", value, _FORMAT_ALLOWED, reason=f"unknown keys {extra}"
        )
    if kind != "json_schema":
        if stored_schema is not None:
            raise InvalidRequestError(
                "json_schema", stored_schema, "None unless response_format is json_schema"
            )
        return kind, None
    if isinstance(value, Mapping):
        if "json_schema" not in value:
            raise InvalidRequestError(
                "response_format", value, _FORMAT_ALLOWED, reason="no 'json_schema'"
            )
        return kind, _json_schema_object(value["json_schema"])
    if isinstance(stored_schema, str):  # dataclasses.replace: the stored canonical text
        try:
            obj = json.loads(stored_schema)
        except ValueError:
            obj = stored_schema
        return kind, _json_schema_object(obj)
    raise InvalidRequestError(
        "response_format", value, _FORMAT_ALLOWED, reason="json_schema without its schema"
    )


_TRANSFORM_ALLOWED = (
    "a map of user transform names to maps of parameter names to numbers (finite in float32:"
    " magnitude at most 3.4028235e+38)"
)


def _transform_params(value: Any) -> tuple:
    """``{name: {param: number}}`` as a sorted, hashable tuple (values checked per chain in
    :func:`pack_rows`, which knows the transforms). A name or a parameter given twice (in the
    pairs form) is refused, never resolved silently."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out: dict[Any, dict[Any, Any]] = {}
    try:
        for name, params in items:
            if name in out:
                raise InvalidRequestError(
                    "transform_params", name, _TRANSFORM_ALLOWED, reason="transform given twice"
                )
            out[name] = {}
            for k, v in params.items() if isinstance(params, Mapping) else params:
                if k in out[name]:
                    raise InvalidRequestError(
                        "transform_params",
                        {name: {k: v}},
                        _TRANSFORM_ALLOWED,
                        reason="parameter given twice",
                    )
                out[name][k] = v
    except InvalidRequestError:
        raise
    except (TypeError, ValueError):
        raise InvalidRequestError("transform_params", value, _TRANSFORM_ALLOWED) from None
    for name, pairs in out.items():
        if not isinstance(name, str):
            raise InvalidRequestError("transform_params", name, _TRANSFORM_ALLOWED)
        for k, v in pairs.items():
            if not isinstance(k, str):
                raise InvalidRequestError("transform_params", {name: {k: v}}, _TRANSFORM_ALLOWED)
            try:
                _number("transform_params", v, -FLOAT32_MAX, FLOAT32_MAX, _TRANSFORM_ALLOWED)
            except InvalidRequestError as err:  # name the entry, not the bare value
                raise InvalidRequestError(
                    "transform_params", {name: {k: v}}, _TRANSFORM_ALLOWED, reason=err.reason
                ) from None
    return tuple(
        sorted((n, tuple(sorted((k, float(v)) for k, v in p.items()))) for n, p in out.items())
    )


def _user_values(params_list, chain) -> tuple:
    """The per-row values of a user transform chain: one ``{param: f32[B]}`` per transform."""
    known = {t.name: t for t in chain}
    for i, p in enumerate(params_list):
        for name, pairs in p.transform_params:
            if name not in known:
                raise InvalidRequestError(
                    "transform_params",
                    name,
                    f"a transform of the chain in use: {sorted(known)}",
                    reason="unknown transform"
                    if known
                    else "no transform chain was given: pass transforms=(UserTransform(...),)"
                    " to Engine, generate, sample or processed_logprobs",
                    index=i,
                )
            t = known[name]
            ranges = dict(t.ranges)
            for k, v in pairs:
                if k not in dict(t.params):
                    raise InvalidRequestError(
                        "transform_params",
                        {name: {k: v}},
                        f"parameters of {name!r}: {sorted(dict(t.params))}",
                        reason="unknown parameter",
                        index=i,
                    )
                lo, hi = ranges.get(k, (-math.inf, math.inf))
                if not lo <= v <= hi:
                    raise InvalidRequestError(
                        "transform_params",
                        {name: {k: v}},
                        f"{name}.{k} a number in [{lo!r}, {hi!r}]",
                        reason="out of range",
                        index=i,
                    )
    values = []
    for t in chain:
        columns = {}
        for k, default in t.params:
            col = [
                dict(dict(p.transform_params).get(t.name, ())).get(k, default) for p in params_list
            ]
            columns[k] = np.array(col, np.float32).reshape(len(params_list))
        values.append(columns)
    return tuple(values)


@functools.lru_cache(maxsize=256)
def _check_output(t, vocab_size: int) -> None:
    """Traces one user transform on an abstract row (``jax.eval_shape``: nothing runs) and
    refuses, naming it, a transform that fails to trace or whose output is not ``f32[V]``-like
    (a floating-point array of the row's shape): a scalar or ``[1]`` would broadcast to every
    token and an integer or boolean array be read as logits, silently."""
    from jaxsample.sampler import History

    z = jax.ShapeDtypeStruct((vocab_size,), jnp.float32)
    params = {k: jax.ShapeDtypeStruct((), jnp.float32) for k, _ in t.params}
    hist = History(
        counts=jax.ShapeDtypeStruct((vocab_size,), jnp.int32),
        in_prompt=jax.ShapeDtypeStruct((vocab_size,), jnp.bool_),
    )
    what = f"user transform {t.name!r} (fn(z, params, hist) with z: f32[{vocab_size}])"
    try:
        out = jax.eval_shape(t.fn, z, params, hist)
    except Exception as err:
        raise TransformError(
            f"{what} failed when traced on one row, params {sorted(params)}: "
            f"{type(err).__name__}: {err}"
        ) from err
    check_user_output(t, out, vocab_size)


def check_chain_outputs(chain, vocab_size: int) -> tuple:
    """Checks a user transform chain against a vocabulary size and returns it as a tuple.

    Each transform is traced on an abstract row (``jax.eval_shape``, cached per transform and
    vocabulary size: nothing runs on a device); one that fails to trace, or returns anything
    but a floating-point array of shape ``(vocab_size,)``, raises :class:`TransformError`
    naming it.

    Example::

        >>> from jaxsample import UserTransform
        >>> ok = UserTransform("half", lambda z, p, hist: z * 0.5)
        >>> bad = UserTransform("argmax", lambda z, p, hist: jnp.argmax(z))
        >>> len(check_chain_outputs((ok,), vocab_size=7))
        1
        >>> try:
        ...     check_chain_outputs((ok, bad), vocab_size=7)
        ... except TransformError as err:
        ...     print(str(err).split(";")[0])
        user transform 'argmax' returned int32[]
    """
    chain = check_chain(chain)
    for t in chain:
        try:
            hash(t)
        except TypeError as err:
            raise TransformError(
                f"user transform {t.name!r} is not hashable ({err}): a chain is a static"
                " argument of the compiled sampler; pass per-row values as params, not as"
                " arrays held by fn"
            ) from None
        _check_output(t, vocab_size)
    return chain


# ----------------------------------------------------------------------------- SamplingParams

#: The most choices one request may ask for (``n``), as the OpenAI API.
N_MAX = 128

#: Body fields that describe the request rather than sampling; accepted here and left to the
#: API layer (``messages``, ``prompt``, ``n``), or accepted and ignored because they cannot
#: change the output (``model``, ``user``, ``metadata``, ``safety_identifier``,
#: ``prompt_cache_key``; ``stream`` and ``store`` only false). Checked in ``from_request``.
REQUEST_FIELDS = (
    "model",
    "messages",
    "prompt",
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "stream",
    "store",
    "n",
)

#: The endpoints a request body may be written for: ``"chat"`` (OpenAI/OpenRouter chat
#: completions, ``/v1/chat/completions``) and ``"completions"`` (OpenAI's legacy text
#: completions, ``/v1/completions``: raw ``prompt`` text or token ids, no chat template).
ENDPOINTS = ("chat", "completions")

#: Body fields of a text-completions request beside the sampling fields: left to the API
#: layer (``prompt``, ``echo``, ``n``), checked and ignored (``model``, ``user``; ``stream``
#: only false), or checked here (``logprobs`` an integer in [0, ``TEXT_LOGPROBS_MAX``];
#: ``best_of`` only null or ``n``; ``suffix`` only null).
TEXT_REQUEST_FIELDS = (
    "model",
    "prompt",
    "user",
    "stream",
    "n",
    "echo",
    "best_of",
    "suffix",
    "logprobs",
)

#: ``max_tokens`` of a text-completions body that does not give it (OpenAI's documented
#: default for ``/v1/completions``), lowered to the room the context leaves after the prompt.
TEXT_MAX_TOKENS = 16

#: The largest ``logprobs`` of a text-completions body (OpenAI's limit).
TEXT_LOGPROBS_MAX = 5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters, validated on construction against SPEC.md.

    Field names, ranges and defaults are OpenRouter's (docs/params.md has the table). The
    object is immutable and hashable: ``logit_bias`` is stored as a sorted tuple of
    ``(token_id, bias)`` pairs, ``stop`` as a tuple of strings and ``response_format`` as its
    type string; the constructor also takes a dict, a string or list, and the OpenAI
    ``{"type": ...}`` form. ``dataclasses.replace`` works and validates again.

    ``logprobs_mode`` is a jaxsample extension: ``"raw"`` reports ``log_softmax`` of the
    model's logits (as the OpenAI API), ``"processed"`` the exact distribution of the draw.

    Example::

        >>> p = SamplingParams(temperature=0.7, logit_bias={"50256": -100}, stop="\\n\\n")
        >>> p.logit_bias, p.stop
        (((50256, -100.0),), ('\\n\\n',))
        >>> try:
        ...     SamplingParams(top_p=1.5)
        ... except InvalidRequestError as err:
        ...     print(err)
        invalid request: 'top_p' = 1.5 (out of range); allowed: a number in [0.0, 1.0]
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    top_a: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    logit_bias: Any = ()  # stored: tuple[tuple[int, float], ...], sorted by id
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: Any = "text"  # stored: "text" | "json_object" | "json_schema"
    stop: Any = ()  # stored: tuple[str, ...]
    logprobs_mode: str = "raw"  # jaxsample extension: "raw" | "processed"
    # stored: canonical JSON text of response_format's json_schema object, else None
    json_schema: Any = None
    transform_params: Any = ()  # jaxsample extension: {transform: {param: number}}, see below

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("temperature", _number("temperature", self.temperature, 0.0, 2.0))
        put("top_p", _number("top_p", self.top_p, 0.0, 1.0))
        put("top_k", _integer("top_k", self.top_k, 0, None, "an integer >= 0 (0 = off)"))
        for name in ("frequency_penalty", "presence_penalty"):
            put(name, _number(name, getattr(self, name), -2.0, 2.0))
        put(
            "repetition_penalty",
            _number("repetition_penalty", self.repetition_penalty, 0.0, 2.0),
        )
        put("min_p", _number("min_p", self.min_p, 0.0, 1.0))
        put("top_a", _number("top_a", self.top_a, 0.0, 1.0))
        if self.seed is not None:
            put("seed", _integer("seed", self.seed, INT64_MIN, INT64_MAX, _SEED_ALLOWED))
        if self.max_tokens is not None:
            put("max_tokens", _integer("max_tokens", self.max_tokens, 1, None, "an integer >= 1"))
        put("logit_bias", _logit_bias(self.logit_bias))
        if not _is_bool(self.logprobs):
            raise InvalidRequestError("logprobs", self.logprobs, "a boolean (true or false)")
        put("logprobs", bool(self.logprobs))
        put(
            "top_logprobs",
            _integer(
                "top_logprobs",
                self.top_logprobs,
                0,
                TOP_LOGPROBS_MAX,
                f"an integer in [0, {TOP_LOGPROBS_MAX}]",
            ),
        )
        if self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs",
                self.top_logprobs,
                f"an integer in [0, {TOP_LOGPROBS_MAX}], and > 0 only with logprobs=true",
                reason="logprobs is false",
            )
        kind, schema = _response_format(self.response_format, self.json_schema)
        put("response_format", kind)
        put("json_schema", schema)
        put("stop", _stop(self.stop))
        if self.stop and self.response_format != "text":
            # a stop string cuts the text wherever it occurs, which can leave unclosed JSON
            raise InvalidRequestError(
                "stop",
                list(self.stop),
                "no stop strings with a JSON response_format (the constrained output ends "
                "when the JSON value is complete)",
                reason=f"response_format is {self.response_format!r}",
            )
        if not isinstance(self.logprobs_mode, str) or self.logprobs_mode not in LOGPROBS_MODES:
            raise InvalidRequestError("logprobs_mode", self.logprobs_mode, "'raw' or 'processed'")
        put("transform_params", _transform_params(self.transform_params))

    @property
    def logit_bias_dict(self) -> dict[int, float]:
        """``logit_bias`` as a plain ``{token_id: bias}`` dict."""
        return dict(self.logit_bias)

    @classmethod
    def from_request(cls, body: Any, *, endpoint: str = "chat") -> SamplingParams:
        """Builds the params of an OpenRouter/OpenAI request body.

        ``endpoint="chat"`` (a chat-completions body): keeps the sampling fields; checks the
        request fields of ``REQUEST_FIELDS`` (``stream`` and ``store`` only false, ``n`` an
        integer in [1, ``N_MAX``], read with :func:`request_n`) and leaves them to the API
        layer; ``max_completion_tokens`` is taken as ``max_tokens``. A JSON ``null`` means
        the default. Any other field is refused, naming it.

        ``endpoint="completions"`` (a legacy text-completions body): the same sampling fields
        but ``top_logprobs`` (and no ``max_completion_tokens``); the fields of
        ``TEXT_REQUEST_FIELDS``; ``logprobs`` is the number of most likely tokens to report
        (an integer in [0, 5]), read as ``logprobs=True, top_logprobs=k``. ``max_tokens``
        stays None when absent: the API layer gives it ``TEXT_MAX_TOKENS`` (docs/api.md);
        ``max_tokens: 0`` is accepted with ``echo: true`` only (scoring the prompts, nothing
        generated: :func:`text_scoring_only`), and read as None too.

        Example::

            >>> body = {"model": "m", "messages": [], "temperature": 0.2, "seed": 7}
            >>> SamplingParams.from_request(body).temperature
            0.2
            >>> text = {"prompt": "a", "logprobs": 2}
            >>> p = SamplingParams.from_request(text, endpoint="completions")
            >>> p.logprobs, p.top_logprobs
            (True, 2)
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r}: expected one of {ENDPOINTS}")
        if not isinstance(body, Mapping):
            raise InvalidRequestError(
                "body", body, "a JSON object (dict) of request fields", reason="not an object"
            )
        text = endpoint == "completions"
        sampling = _TEXT_SAMPLING_FIELDS if text else _SAMPLING_FIELDS
        fields = TEXT_REQUEST_FIELDS if text else REQUEST_FIELDS
        kwargs: dict[str, Any] = {}
        for key, value in body.items():
            if key in sampling:
                if value is not None:
                    kwargs[key] = value
            elif key == "max_completion_tokens" and not text:
                pass  # merged below
            elif key in fields:
                _check_request_field(key, value)
            else:
                chat_only = text and key in _CHAT_ONLY
                raise InvalidRequestError(
                    _key_text(key),
                    value,
                    _unknown_allowed(key, endpoint),
                    reason=_CHAT_ONLY[key] if chat_only else "unsupported field",
                )
        if text:
            kwargs.update(_text_fields(body))
        alias = None if text else body.get("max_completion_tokens")
        if alias is not None:
            alias = _integer("max_completion_tokens", alias, 1, None, "an integer >= 1")
            if "max_tokens" in kwargs and kwargs["max_tokens"] != alias:
                raise InvalidRequestError(
                    "max_completion_tokens",
                    alias,
                    f"the same value as max_tokens ({_short_repr(kwargs['max_tokens'])})",
                    reason="both given and different",
                )
            kwargs.setdefault("max_tokens", alias)
        if "response_format" in kwargs and not isinstance(kwargs["response_format"], Mapping):
            raise InvalidRequestError(
                "response_format",
                kwargs["response_format"],
                _FORMAT_ALLOWED,
                reason="not an object",
            )
        if "logit_bias" in kwargs and not isinstance(kwargs["logit_bias"], Mapping):
            raise InvalidRequestError(
                "logit_bias", kwargs["logit_bias"], _BIAS_ALLOWED, reason="not an object"
            )
        tp = kwargs.get("transform_params")
        if tp is not None and not isinstance(tp, Mapping):
            raise InvalidRequestError(
                "transform_params", tp, _TRANSFORM_ALLOWED, reason="not an object"
            )
        return cls(**kwargs)


_SEED_ALLOWED = "an integer in [-2**63, 2**63 - 1]"
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"json_schema"}
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))
#: a text-completions body's sampling fields: logprobs is its own (an integer), and the
#: top tokens are its value, not a top_logprobs field
_TEXT_SAMPLING_FIELDS = _SAMPLING_FIELDS - {"logprobs", "top_logprobs"}
_CHAT_ONLY_REASON = "a chat-completions field, not one of a text-completions body"
#: fields of a chat-completions body that a text-completions body refuses: why
_CHAT_ONLY = {
    **{k: _CHAT_ONLY_REASON for k in REQUEST_FIELDS if k not in TEXT_REQUEST_FIELDS},
    "messages": f"{_CHAT_ONLY_REASON}: give the raw text as 'prompt' (no chat template)",
    "top_logprobs": f"{_CHAT_ONLY_REASON}: 'logprobs' (an integer in [0, 5]) is the number of"
    " most likely tokens reported",
    "max_completion_tokens": f"{_CHAT_ONLY_REASON}: the name here is 'max_tokens'",
}
_TEXT_LOGPROBS_ALLOWED = f"an integer in [0, {TEXT_LOGPROBS_MAX}], or null (no log probabilities)"

#: Keyword arguments that other libraries' sampling parameters take and SamplingParams does
#: not: what to do instead (a TypeError without a hint was raised for them).
_OTHER_LIBRARIES = {
    "n": "n is a request field, not a sampling parameter: pass the input n times with the"
    " seeds choice_seed(seed, i) (or no seed: each input gets derive_seed(job_seed, i)), or"
    " send a chat body with 'n' to Engine.chat_completions",
    "max_new_tokens": "the name here is max_tokens",
    "max_completion_tokens": "the name here is max_tokens (from_request takes both names)",
    "max_length": "the name here is max_tokens (the number of output tokens)",
    "do_sample": "greedy decoding is temperature=0",
    "stop_token_ids": "stop takes strings, not token ids: give the text that ends the answer,"
    " stop=[text] (the end-of-sequence token always stops a row)",
    "ignore_eos": "ban the end-of-sequence token with logit_bias={eos_id: -100}",
}


def _init_checking_names(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for key in kwargs:
            if key not in _FIELD_NAMES:  # an InvalidRequestError with a hint, not a TypeError
                known = sorted(_SAMPLING_FIELDS)
                hint = _OTHER_LIBRARIES.get(key) or _did_you_mean(key, known)
                raise InvalidRequestError(
                    str(key),
                    kwargs[key],
                    "a SamplingParams field: " + ", ".join(known),
                    reason="not a SamplingParams field" + (f"; {hint}" if hint else ""),
                )
        init(self, *args, **kwargs)

    return __init__


SamplingParams.__init__ = _init_checking_names(SamplingParams.__init__)


def text_scoring_only(body: Mapping) -> bool:
    """Whether a (checked) text-completions body only scores its prompts: ``max_tokens: 0``
    with ``echo: true``, OpenAI's form (nothing is generated; docs/api.md, "Text
    completions").

    >>> text_scoring_only({"prompt": "a", "echo": True, "max_tokens": 0})
    True
    """
    value = body.get("max_tokens")
    return _is_int(value) and value == 0 and _is_bool(body.get("echo")) and bool(body["echo"])


def _text_fields(body: Mapping) -> dict:
    """The SamplingParams fields of a text-completions body's own fields: ``logprobs`` (an
    integer k in [0, 5], or null) as ``logprobs=True, top_logprobs=k``; ``max_tokens: 0``
    (scoring) as no ``max_tokens``, refused without ``echo: true``; a ``best_of`` other than
    ``n`` refused (docs/api.md, "Text completions")."""
    fields: dict = {}
    if _is_int(body.get("max_tokens")) and body["max_tokens"] == 0:
        if not text_scoring_only(body):
            raise InvalidRequestError(
                "max_tokens",
                0,
                "an integer >= 1, or 0 with echo: true (the prompt scored, nothing generated)",
                reason="echo is not true",
            )
        fields["max_tokens"] = None  # the API layer generates nothing (text_scoring_only)
    best_of = body.get("best_of")
    if best_of is not None:
        n = request_n(body.get("n"))
        best_of = _integer("best_of", best_of, 1, N_MAX, f"an integer in [1, {N_MAX}]")
        if best_of != n:
            raise InvalidRequestError(
                "best_of",
                best_of,
                f"null or the request's n ({n})",
                reason="choosing the best of several completions is not supported",
            )
    k = body.get("logprobs")
    if k is not None:
        k = _integer("logprobs", k, 0, TEXT_LOGPROBS_MAX, _TEXT_LOGPROBS_ALLOWED)
        fields.update(logprobs=True, top_logprobs=k)
    return fields


def _check_request_field(key: str, value: Any) -> None:
    if key == "stream" and value is not None and value is not False:
        raise InvalidRequestError("stream", value, "false (streaming is not supported)")
    if key == "store" and value is not None and value is not False:
        raise InvalidRequestError("store", value, "false (completions are not stored)")
    if key == "n" and value is not None:
        request_n(value)
    if key in ("user", "safety_identifier", "prompt_cache_key") and value is not None:
        if not isinstance(value, str):
            raise InvalidRequestError(key, value, "a string", reason=type(value).__name__)
    if key == "metadata" and value is not None and not isinstance(value, Mapping):
        raise InvalidRequestError(key, value, "an object of string keys and values")
    if key == "echo" and value is not None and not _is_bool(value):
        raise InvalidRequestError(key, value, "a boolean (true or false)")
    if key == "suffix" and value is not None:
        raise InvalidRequestError(
            key, value, "null", reason="inserting text before a suffix is not supported"
        )


def request_n(value: Any) -> int:
    """The number of choices ``n`` of a request body (JSON ``null`` or absent means 1).

    >>> request_n(None), request_n(3)
    (1, 3)
    """
    if value is None:
        return 1
    return _integer("n", value, 1, N_MAX, f"an integer in [1, {N_MAX}]")


def _did_you_mean(key: Any, known) -> str | None:
    close = difflib.get_close_matches(_key_text(key), known, n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _unknown_allowed(key: Any, endpoint: str = "chat") -> str:
    if endpoint == "completions":
        known = sorted(_TEXT_SAMPLING_FIELDS | set(TEXT_REQUEST_FIELDS))
    else:
        known = sorted(_SAMPLING_FIELDS | set(REQUEST_FIELDS) | {"max_completion_tokens"})
    hint = _did_you_mean(key, known)
    return "a supported field: " + ", ".join(known) + (f"; {hint}" if hint else "")


# ----------------------------------------------------------------------------- model checks


def _check_bias_ids(params: SamplingParams, vocab_size: int, index: int | None = None) -> None:
    for token, _ in params.logit_bias:
        if token >= vocab_size:
            raise InvalidRequestError(
                "logit_bias",
                token,
                f"token ids in [0, {vocab_size - 1}] (the vocabulary has {vocab_size})",
                reason="token id out of the vocabulary",
                index=index,
            )


def token_id_array(field: str, ids: Any, vocab_size: int) -> np.ndarray:
    """``int64[n]`` from a flat list, numpy or jax array of token ids (None: none), each in
    ``[0, vocab_size)``; otherwise an :class:`InvalidRequestError` naming ``field`` (floats
    and bools are refused, never rounded; a nested list is not flattened).

    >>> token_id_array("prompt", [3, 1], 5).tolist()
    [3, 1]
    """
    allowed = "a flat sequence of int token ids (a list, numpy or jax array)"
    try:
        arr = np.asarray([] if ids is None else ids)
    except Exception:  # ragged lists, objects numpy refuses (or whose repr raises)
        raise InvalidRequestError(field, ids, allowed) from None
    if arr.ndim == 1 and arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim == 1 and arr.dtype == object and all(_is_int(t) for t in arr.tolist()):
        # Python ints past int64/uint64 (2**70): out of any vocabulary, shown as given
        bad = [int(t) for t in arr.tolist() if not 0 <= t < vocab_size]
        arr = np.asarray([0] * len(arr)) if bad else arr.astype(np.int64)
    elif not (np.issubdtype(arr.dtype, np.integer) and arr.ndim == 1):
        raise InvalidRequestError(field, f"<{arr.dtype} array of shape {arr.shape}>", allowed)
    else:  # compared in the array's own dtype: uint64 ids >= 2**63 are not read as negative
        bad = arr[(arr < 0) | (arr >= vocab_size)].tolist()
    if bad:
        raise InvalidRequestError(
            field,
            int(bad[0]),
            f"token ids in [0, {vocab_size - 1}] (the vocabulary has {vocab_size})",
            reason=f"token id out of the vocabulary ({len(bad)} of {arr.size} ids)",
        )
    return arr.astype(np.int64)


#: An engine's KV cache length when ``max_seq_len`` is not given: the model's context, at most
#: this many tokens.
DEFAULT_MAX_SEQ_LEN = 2048


def resolve_max_seq_len(value: Any, context_length: int) -> int:
    """An engine's ``max_seq_len`` (each slot's KV cache length): ``min(context_length,
    DEFAULT_MAX_SEQ_LEN)`` when ``value`` is None, else ``value`` checked as an integer in
    ``[1, context_length]``: positions past the model's context can never be used, yet every
    slot's cache would hold them (10**8 ran out of memory deep inside XLA).

    >>> resolve_max_seq_len(None, 8192), resolve_max_seq_len(512, 8192)
    (2048, 512)
    """
    if value is None:
        return min(context_length, DEFAULT_MAX_SEQ_LEN)
    allowed = f"an integer in [1, {context_length}] (the model's context length)"
    return _integer("max_seq_len", value, 1, context_length, allowed)


def check_engine_options(slots, chunk_steps, refill_free, devices, prefetch, widths=None) -> tuple:
    """The slot engine's settings, checked (``InvalidRequestError`` naming the setting) by
    :class:`jaxsample.Engine` when it is built and by :class:`jaxsample.engine.SlotEngine`:
    ``(slots, chunk_steps, refill_free, devices, prefetch, widths)``, ``devices`` a list (or
    None: one device), ``prefetch`` None resolved to ``slots`` and ``widths`` resolved by
    :func:`check_widths`. ``slots=True`` is not one slot,
    and ``devices="cpu"`` is not three devices 'c', 'p', 'u'."""
    if devices is not None:
        if isinstance(devices, (str, bytes, Mapping)) or not isinstance(devices, Iterable):
            raise InvalidRequestError(
                "devices", devices, "None (one device) or a list of jax devices (jax.devices())"
            )
        devices = list(devices)
        wrong = [d for d in devices if not isinstance(d, jax.Device)]
        if not devices or wrong:
            raise InvalidRequestError(
                "devices",
                devices,
                "None (one device) or a non-empty list of jax devices (jax.devices())",
                reason=f"{_short_repr(wrong[0])} is not a jax.Device" if wrong else "empty",
            )
    n_devices = 1 if devices is None else len(devices)
    allowed = f"an integer >= 1, a multiple of the {n_devices} device(s)"
    slots = _integer("slots", slots, 1, None, allowed)
    if slots % n_devices:
        raise InvalidRequestError("slots", slots, allowed, reason="not a multiple")
    chunk_steps = _integer("chunk_steps", chunk_steps, 1, None, "an integer >= 1")
    refill_free = _integer(
        "refill_free", refill_free, 1, slots, f"an integer in [1, slots = {slots}]"
    )
    prefetch = (
        slots
        if prefetch is None
        else _integer("prefetch", prefetch, 0, None, "an integer >= 0, or None (= slots)")
    )
    widths = check_widths(widths, slots, devices)
    return slots, chunk_steps, refill_free, devices, prefetch, widths


def check_widths(widths, slots: int, devices=None, *, platform: str | None = None) -> tuple:
    """The row counts a chunk of the slot engine may run at, per device: ``widths`` checked
    (``InvalidRequestError`` naming ``widths``), sorted, with the slots per device
    (``slots // len(devices)``, the full width) always among them. ``devices``: the engine's
    (None: one, the default device); ``platform`` overrides theirs.

    ``None`` (the default) picks by platform: on a CPU, where a decode step costs about in
    proportion to its rows, the powers of 4 below the full width and the full width (16
    slots: ``(1, 4, 16)``); on GPU and TPU, where a small step costs about what a full one
    does, the full width alone. ``()`` also means the full width alone.

    >>> check_widths(None, 16, platform="cpu"), check_widths(None, 16, platform="gpu")
    ((1, 4, 16), (16,))
    >>> check_widths([2, 8], 16, jax.devices()[:1] * 2, platform="cpu")
    (2, 8)
    """
    n_devices = 1 if devices is None else len(devices)
    platform = platform or (devices or jax.devices())[0].platform
    local = slots // n_devices
    allowed = f"None, or a list of integers in [1, {local}] (the slots per device)"
    if widths is None:
        if platform != "cpu":
            return (local,)
        out, w = [], 1
        while w < local:
            out.append(w)
            w *= 4
        return (*out, local)
    if isinstance(widths, (str, bytes, Mapping)) or not isinstance(widths, Iterable):
        raise InvalidRequestError("widths", widths, allowed)
    values = {_integer("widths", w, 1, local, allowed) for w in widths}
    return tuple(sorted(values | {local}))


def check_for_model(
    params: SamplingParams,
    *,
    vocab_size: int,
    context_length: int,
    prompt_length: int,
    model_context: int | None = None,
    prompt_field: str = "messages",
) -> int:
    """Checks what needs the model and returns the resolved ``max_tokens``.

    Refuses a logit_bias token id ``>= vocab_size`` (field ``logit_bias``), a prompt of
    ``>= context_length`` tokens (field ``messages``), and ``max_tokens >
    context_length - prompt_length`` (field ``max_tokens``). Without ``max_tokens`` the
    result is ``context_length - prompt_length``. ``model_context``: the model's own context,
    when ``context_length`` is an engine's smaller ``max_seq_len`` (the messages then name
    that limit and how to raise it); ``prompt_field`` is the field a prompt that does not fit
    is blamed on (``"prompt"`` for raw text).

    Example::

        >>> check_for_model(SamplingParams(), vocab_size=100, context_length=50, prompt_length=8)
        42
    """
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("params", params, "a SamplingParams")
    vocab_size = _integer("vocab_size", vocab_size, 1, 2**31 - 1, "an integer in [1, 2**31 - 1]")
    context_length = _integer("context_length", context_length, 1, None, "an integer >= 1")
    prompt_length = _integer("prompt_length", prompt_length, 0, None, "an integer >= 0")
    _check_bias_ids(params, vocab_size)
    limit = f"the context length ({context_length} tokens)"
    if model_context is not None and context_length < model_context:
        limit = (
            f"the engine's max_seq_len ({context_length} tokens; the model's context is"
            f" {model_context}: Engine.load(max_seq_len=...) or --max-seq-len raises it)"
        )
    if prompt_length >= context_length:
        raise InvalidRequestError(
            prompt_field, f"<prompt of {prompt_length} tokens>", f"a prompt shorter than {limit}"
        )
    room = context_length - prompt_length
    if params.max_tokens is None:
        return room
    if params.max_tokens > room:
        raise InvalidRequestError(
            "max_tokens",
            params.max_tokens,
            f"an integer in [1, {room}] ({limit} minus the prompt's {prompt_length} tokens)",
        )
    return params.max_tokens


# ----------------------------------------------------------------------------- seeds


def seed_words(seed: int) -> np.ndarray:
    """The 64-bit two's-complement ``seed`` as ``uint32[2]`` words ``[hi, lo]``.

    ``jax.random.wrap_key_data(jnp.asarray(seed_words(s)), impl="threefry2x32")`` is the key
    ``jax.random.PRNGKey(s)`` builds with 64-bit integers enabled (``jax_enable_x64``). Without
    x64, ``PRNGKey`` keeps only the low 32 bits; these words keep all 64, so distinct seeds
    always give distinct keys.

    Example::

        >>> seed_words(-1)
        array([4294967295, 4294967295], dtype=uint32)
    """
    seed = _integer("seed", seed, INT64_MIN, INT64_MAX, _SEED_ALLOWED)
    u = seed % 2**64
    return np.array([u >> 32, u & 0xFFFFFFFF], dtype=np.uint32)


_U32 = 0xFFFFFFFF
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: int, k2: int, x1: int, x2: int) -> tuple[int, int]:
    """The Threefry-2x32 block (20 rounds) of one counter pair under key ``(k1, k2)``, in
    Python integers: the function behind JAX's ``threefry2x32`` keys (Salmon et al., 2011)."""
    ks = (k1, k2, k1 ^ k2 ^ 0x1BD11BDA)
    x1, x2 = (x1 + ks[0]) & _U32, (x2 + ks[1]) & _U32
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x1 = (x1 + x2) & _U32
            x2 = (((x2 << r) | (x2 >> (32 - r))) & _U32) ^ x1
        x1 = (x1 + ks[(i + 1) % 3]) & _U32
        x2 = (x2 + ks[(i + 2) % 3] + i + 1) & _U32
    return x1, x2


def _derived_bits(words: Sequence[int], index: Sequence[int]) -> tuple[int, int]:
    """``jax.random.bits(fold_in(...fold_in(key, index[0])...), (2,), uint32)`` for the
    threefry key with data ``words``, computed on the host: ``fold_in(key, d)`` is the block
    of the counter ``(0, d)`` under the key, and word ``j`` of the bits is the xor of the
    block of ``(0, j)`` (JAX's partitionable form, its default since 0.5). The same numbers
    as JAX's (tested against it), without a device call per request: a call queued behind
    the decoding loop's chunk on an accelerator, and a rule that no JAX setting changes."""
    k1, k2 = (int(w) for w in words)
    for d in index:
        k1, k2 = _threefry2x32(k1, k2, 0, int(d))
    return tuple(a ^ b for a, b in (_threefry2x32(k1, k2, 0, j) for j in range(2)))


#: Folded in before the two words of a string key, so that string and integer keys never
#: share a derivation path (an integer key folds in one word, a string key three).
_STRING_KEY_TAG = 0x5354524B  # "STRK"


def _key_words(key: int | str) -> np.ndarray:
    if isinstance(key, str):
        # "surrogatepass": a lone surrogate (JSON allows "\ud800" in a custom_id) has bytes
        # of its own, which no valid string's UTF-8 shares; strict UTF-8 raised here
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        hi, lo = int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:8], "big")
        return np.array([_STRING_KEY_TAG, hi, lo], np.uint32)
    index = _integer("index", key, 0, 2**32 - 1, "an integer in [0, 2**32 - 1] or a string")
    return np.array([index], np.uint32)


#: The rule :func:`derive_seed` follows (a batch job's manifest records it, so a job is never
#: resumed under another rule): 2 is the top 53 bits (1, before it, was all 64 bits, signed).
SEED_RULE = 2


def check_job_seed(job_seed: Any) -> int:
    """A call's or job's ``job_seed``: a signed 64-bit integer, refused naming ``job_seed``
    (before any request, not blamed on each request's ``seed``).

    >>> check_job_seed(7)
    7
    """
    return _integer("job_seed", job_seed, INT64_MIN, INT64_MAX, _SEED_ALLOWED)


def derive_seed(job_seed: int, key: int | str) -> int:
    """The seed of a request that carries none, from the job seed and a stable request key.

    ``key`` is the request's index in the job (an int in ``[0, 2**32)``) or a string such as
    a batch job's ``custom_id``. The result is the top 53 bits of
    ``bits(fold_in(key(job_seed), index))`` for an int (two uint32 words ``[hi, lo]`` read as
    one unsigned 64-bit int, shifted right by 11; ``key(job_seed)`` is built from
    :func:`seed_words`, so the whole 64-bit job seed counts), and for a string the same with
    three words folded in: a tag, then the first 64 bits of the string's SHA-256.
    Deterministic and independent of the order in which requests arrive; distinct keys give
    independent seeds. A derived seed lies in ``[0, 2**53)``, so it is exact as a JSON number
    in every client (a JavaScript double holds it): a reported seed sent back reproduces the
    answer.

    Example::

        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
        True
        >>> a = derive_seed(7, "request-42")
        >>> a == derive_seed(7, "request-42") != derive_seed(8, "request-42")
        True
        >>> 0 <= derive_seed(-1, 2**32 - 1) < 2**53
        True
    """
    words = seed_words(check_job_seed(job_seed))
    hi, lo = _derived_bits(words, _key_words(key))
    return ((hi << 32) | lo) >> 11


# ----------------------------------------------------------------------------- packing


def _listed(field: str, value: Any, allowed: str) -> list:
    """``value`` (a list, tuple or other iterable; not a string, bytes, dict or array
    scalar) as a list, else an :class:`InvalidRequestError` naming ``field``."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequestError(field, value, allowed, reason=type(value).__name__)
    try:
        return list(value)
    except TypeError:  # a 0-d numpy or jax array: iterable by type, not in fact
        raise InvalidRequestError(
            field, value, allowed, reason="a 0-d array is not a list"
        ) from None


def pack_rows(
    params_list: Sequence[SamplingParams],
    *,
    vocab_size: int,
    seeds: Sequence[int],
    transforms: Sequence = (),
) -> RowParams:
    """Packs B requests into one :class:`RowParams` of numpy arrays with a leading axis B.

    ``seeds`` holds each row's resolved seed (its own, or :func:`derive_seed`'s). logit_bias is
    padded to ``LOGIT_BIAS_MAX`` entries with id 0 and value 0.0 (adding 0 changes nothing).
    ``top_k`` is stored as ``min(top_k, vocab_size)``: both mean "off". Greedy is decided
    here, in float64: ``temperature < 1e-5`` is stored as 0.0 (so 9.9999999e-6, which rounds
    to 1e-5 in float32, is greedy). A token id outside the vocabulary raises
    :class:`InvalidRequestError` with ``index`` set to the row. ``transforms`` is the user
    transform chain: each request's ``transform_params`` are checked against it (unknown
    names or parameters, values out of a declared range: refused) and packed into
    ``RowParams.user``, with each parameter's default where a request sets none.

    Example::

        >>> rows = pack_rows([SamplingParams(), SamplingParams(top_k=5)], vocab_size=10,
        ...                  seeds=[1, 2])
        >>> rows.top_k, rows.bias_ids.shape
        (array([0, 5], dtype=int32), (2, 1024))
    """
    if isinstance(params_list, SamplingParams):
        raise InvalidRequestError(
            "params", params_list, "a list of SamplingParams (one per row)", reason="not a list"
        )
    params_list = _listed("params", params_list, "a list of SamplingParams (one per row)")
    for i, p in enumerate(params_list):
        if not isinstance(p, SamplingParams):
            raise InvalidRequestError("params", p, "a SamplingParams", index=i)
    vocab_size = _integer("vocab_size", vocab_size, 1, 2**31 - 1, "an integer in [1, 2**31 - 1]")
    seeds = _listed("seeds", seeds, f"a list of {len(params_list)} int seeds (one per row)")
    if len(seeds) != len(params_list):
        raise ValueError(f"{len(params_list)} params but {len(seeds)} seeds")
    b = len(params_list)
    bias_ids = np.zeros((b, LOGIT_BIAS_MAX), np.int32)
    bias_values = np.zeros((b, LOGIT_BIAS_MAX), np.float32)
    words = np.zeros((b, 2), np.uint32)
    for i, (p, seed) in enumerate(zip(params_list, seeds, strict=True)):
        _check_bias_ids(p, vocab_size, index=i)
        for j, (token, bias) in enumerate(p.logit_bias):
            bias_ids[i, j] = token
            bias_values[i, j] = bias
        try:
            words[i] = seed_words(seed)
        except InvalidRequestError as err:
            err.index = i
            raise

    def column(name, dtype):
        return np.array([getattr(p, name) for p in params_list], dtype=dtype).reshape(b)

    user = _user_values(params_list, check_chain_outputs(transforms, vocab_size))
    temps = [0.0 if p.temperature < GREEDY_TEMPERATURE else p.temperature for p in params_list]
    return RowParams(
        temperature=np.array(temps, np.float32).reshape(b),
        top_k=np.array([min(p.top_k, vocab_size) for p in params_list], np.int32).reshape(b),
        top_p=column("top_p", np.float32),
        top_a=column("top_a", np.float32),
        min_p=column("min_p", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        bias_ids=bias_ids,
        bias_values=bias_values,
        seed_words=words,
        logprobs=column("logprobs", np.bool_),
        top_logprobs=column("top_logprobs", np.int32),
        processed_logprobs=np.array(
            [p.logprobs_mode == "processed" for p in params_list], np.bool_
        ).reshape(b),
        user=user,
    )
