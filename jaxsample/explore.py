"""Helpers for notebooks and experiments: look at what the model and the constraints see.

* :func:`next_token_logits`: the model's logits for the token after each input (a prompt
  string or a chat message list, as :meth:`jaxsample.Engine.generate` takes them), from one
  jitted prefill; feed them to :func:`jaxsample.processed_logprobs` to see what each
  sampling parameter does to a real distribution.
* :func:`token_texts`: readable text of token ids (for plot labels).
* :func:`json_allowed_masks`: replay JSON mode's automaton over a token sequence and return
  the allowed-token mask of every step (what the decode loop applied).
* :func:`use_compile_cache`: keep XLA's compiled programs on disk, so that the decode loop
  compiles once, not once per notebook or session.

These are host conveniences over the public pieces (``Engine``, the model's ``prefill``,
``jaxsample.automata.json_mode``); nothing in the decode loop uses them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsample.api import normalize_inputs
from jaxsample.automata import json_mode
from jaxsample.decode import bucket
from jaxsample.params import InvalidRequestError, _integer, token_id_array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill_logits(graphdef, state, tokens, lengths):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    return model.prefill(tokens, lengths, cache)[0]


def _input_ids(engine, item) -> list[int]:
    """One input's prompt ids, as :meth:`jaxsample.Engine.encode_input` reads it (a prompt
    string, a conversation or token ids; :class:`jaxsample.InvalidRequestError` otherwise)."""
    return engine.encode_input(item)


def next_token_logits(engine, inputs: Sequence) -> np.ndarray:
    """``float32[B, V]``: the model's logits for the next token after each of B inputs.

    Each input is a prompt string (used as is, no chat template), a list of chat messages
    (rendered with the chat template and the assistant turn opened, exactly as
    :meth:`~jaxsample.Engine.generate` renders it) or a list of token ids (used as is).
    ``inputs`` follows ``generate``'s rule: a string is ONE prompt, a message list ONE
    conversation, a list (or 1-d integer array) of token ids ONE input, a 2-d integer array
    a batch of rows, any other list a batch. To
    look at a later step of an answer, pass the prompt's ids plus the answer's ids so far
    (or the rendered prompt plus the answer as a string, which is tokenised anew). Inputs
    are right-padded to a power-of-two length, and the batch to a power-of-two number of
    rows (past 64, a multiple of 64), so that similar calls reuse one compiled prefill.

    Example::

        engine = Engine.load()
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        logits = next_token_logits(engine, [msgs])          # [1, 49152]
        lp = processed_logprobs(logits, SamplingParams(top_p=0.9))
    """
    ids = [_input_ids(engine, item) for item in normalize_inputs(inputs)]
    if not ids:
        raise InvalidRequestError("inputs", inputs, "at least one input", reason="no inputs")
    context = engine.model.config.context_length
    longest = max(len(t) for t in ids)
    if longest > context:
        raise InvalidRequestError(
            "inputs",
            f"<input of {longest} tokens>",
            f"inputs of at most the model's context ({context} tokens)",
        )
    # the batch is padded too (rows of one token 0), so that 5 or 7 inputs share the compile
    # of 8: a loop over answers of different lengths compiled once per answer. Past 64 rows
    # to a multiple of 64, so that padding never nearly doubles a large batch's KV cache.
    rows = bucket(len(ids), minimum=1) if len(ids) <= 64 else -(-len(ids) // 64) * 64
    lengths = np.ones(rows, np.int32)
    lengths[: len(ids)] = [len(t) for t in ids]
    tokens = np.zeros((rows, bucket(int(lengths.max()))), np.int32)
    for b, t in enumerate(ids):
        tokens[b, : len(t)] = t
    graphdef, state = nnx.split(engine.model)
    out = _prefill_logits(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths))
    return np.asarray(out[: len(ids)], np.float32)


def _id_array(field: str, ids, allowed: str) -> np.ndarray:
    """Token ids as a numpy integer array: integer (not boolean) values only, never rounded
    (a float id is a mistake: 1.7 was read as token 1)."""
    try:
        arr = np.asarray(ids.tolist() if isinstance(ids, jax.Array) else ids)
    except Exception:  # a ragged list, or an object numpy cannot read
        raise InvalidRequestError(field, ids, allowed, reason="not an array of ids") from None
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidRequestError(
            field, f"<{arr.dtype} array of shape {arr.shape}>", allowed, reason="not integers"
        )
    return arr


def token_texts(tokenizer, ids) -> list[str]:
    """The text of each token id, for plot labels: invalid UTF-8 pieces shown with U+FFFD, a
    special token by its own text (``'<|im_end|>'``, as log probabilities show it), ``-1``
    (padding) as ''. ``ids`` is an int or any array-like of ints (flattened)."""
    shown = tokenizer.shown_bytes
    allowed = f"integer token ids in [0, {len(shown)}) or -1 (padding)"
    ids = [int(i) for i in _id_array("ids", ids, allowed).reshape(-1)]
    bad = [i for i in ids if not -1 <= i < len(shown)]
    if bad:
        raise InvalidRequestError("ids", bad[0], allowed, reason="out of range")
    return [shown[i].decode("utf-8", errors="replace") if i >= 0 else "" for i in ids]


@jax.jit
def _json_replay(grammar, tokens, max_tokens):
    def step(s, x):
        i, t = x
        mask = json_mode.allowed(grammar, s, max_tokens - i)
        return json_mode.advance(grammar, s, t), mask

    n = tokens.shape[0]
    _, masks = jax.lax.scan(step, json_mode.init_state(grammar), (jnp.arange(n), tokens))
    return masks


def json_allowed_masks(engine, token_ids, max_tokens: int) -> np.ndarray:
    """``bool[N, V]``: JSON mode's allowed-token mask before each of N output tokens.

    Replays :mod:`jaxsample.automata.json_mode` over ``token_ids`` (the output of a
    ``response_format={"type": "json_object"}`` request) with the same budget steering as
    the decode loop (``max_tokens - i`` tokens left at step ``i``). Row ``i`` is the mask the
    loop applied when it drew ``token_ids[i]``, so ``masks[i, token_ids[i]]`` is True.
    """
    # one answer: a 2-d array (a batch of answers) is refused, not flattened into one
    ids = token_id_array("token_ids", token_ids, engine.vocab_size)
    max_tokens = _integer(
        "max_tokens",
        max_tokens,
        max(1, ids.size),
        2**31 - 1,
        "an integer >= the number of tokens (the budget the answer was generated with)",
    )
    tokens = jnp.asarray(ids.astype(np.int32))
    masks = _json_replay(engine.grammar(), tokens, jnp.int32(max_tokens))
    return np.asarray(masks)


def use_compile_cache() -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder (None when none can be
    made: a read-only home runs without it).

    Uses the folder JAX is already configured with (e.g. ``$JAX_COMPILATION_CACHE_DIR``),
    else ``xla`` under the jaxsample cache folder (``~/.cache/jaxsample/xla``, as the
    command uses). Programs that took at least a second to compile are kept, and with the
    cache on the engine keeps its traced programs too (docs/engine.md, "Start-up").
    ``Engine.load`` calls it (``compile_cache=True``, the default): call it yourself before
    building an ``Engine`` from a model you loaded.
    """
    from jaxsample.engine.programs import use_compile_cache as turn_on

    return turn_on()


__all__ = ["json_allowed_masks", "next_token_logits", "token_texts", "use_compile_cache"]
