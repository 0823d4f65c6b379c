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
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsample.api import normalize_inputs
from jaxsample.automata import json_mode
from jaxsample.decode import bucket
from jaxsample.params import _integer


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill_logits(graphdef, state, tokens, lengths):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    return model.prefill(tokens, lengths, cache)[0]


def _is_ids(item) -> bool:
    """A sequence of token ids: a list or tuple of ints, or a 1-d integer numpy/jax array."""
    if isinstance(item, (np.ndarray, jax.Array)):
        return item.ndim == 1 and jnp.issubdtype(item.dtype, jnp.integer)
    return (
        isinstance(item, (list, tuple))
        and bool(item)
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in item)
    )


def _inputs(inputs) -> list:
    """The inputs of a call, by the rule of :meth:`jaxsample.Engine.generate`
    (:func:`jaxsample.api.normalize_inputs`: a string is one prompt, a list of message dicts
    one conversation), and a sequence of token ids (or a 1-d integer array) is one input; a
    2-d integer array is a batch of rows."""
    if _is_ids(inputs):
        return [inputs]
    if isinstance(inputs, (np.ndarray, jax.Array)) and inputs.ndim == 2:
        return list(np.asarray(inputs))
    return normalize_inputs(inputs)


def _input_ids(engine, item) -> list[int]:
    if isinstance(item, str) or (
        isinstance(item, (list, tuple)) and any(isinstance(m, Mapping) for m in item)
    ):
        return engine.encode_input(item)  # a prompt or a conversation (InvalidRequestError)
    ids = [int(t) for t in np.asarray(item)] if _is_ids(item) else []
    if not ids:
        raise ValueError(
            "an input is a prompt string, a list of chat messages or a non-empty list of token"
            f" ids (ints, not bools), got {item!r:.80}"
        )
    if min(ids) < 0 or max(ids) >= engine.vocab_size:
        raise ValueError(f"token ids must be in [0, {engine.vocab_size}), got {item!r:.80}")
    return ids


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
    are right-padded to a power-of-two length so that similar ones reuse one compiled
    prefill.

    Example::

        engine = Engine.load()
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        logits = next_token_logits(engine, [msgs])          # [1, 49152]
        lp = processed_logprobs(logits, SamplingParams(top_p=0.9))
    """
    ids = [_input_ids(engine, item) for item in _inputs(inputs)]
    if not ids:
        raise ValueError("next_token_logits needs at least one input")
    context = engine.model.config.context_length
    longest = max(len(t) for t in ids)
    if longest > context:
        raise ValueError(f"an input of {longest} tokens is longer than the context ({context})")
    lengths = np.array([len(t) for t in ids], np.int32)
    tokens = np.zeros((len(ids), bucket(int(lengths.max()))), np.int32)
    for b, t in enumerate(ids):
        tokens[b, : len(t)] = t
    graphdef, state = nnx.split(engine.model)
    out = _prefill_logits(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths))
    return np.asarray(out, np.float32)


def token_texts(tokenizer, ids) -> list[str]:
    """The text of each token id (invalid UTF-8 pieces shown with U+FFFD, ``-1`` as '')."""
    tb = tokenizer.token_bytes
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    bad = [i for i in ids if not -1 <= i < len(tb)]
    if bad:
        raise ValueError(f"token ids must be in [0, {len(tb)}) or -1 (padding), got {bad[:5]}")
    return [tb[i].decode("utf-8", errors="replace") if i >= 0 else "" for i in ids]


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
    ids = np.asarray(token_ids).reshape(-1)
    if ids.size and not (jnp.issubdtype(ids.dtype, jnp.integer) and ids.dtype != np.bool_):
        raise ValueError(f"token_ids must be ints, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= engine.vocab_size):
        raise ValueError(f"token_ids must be in [0, {engine.vocab_size})")
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


def use_compile_cache() -> str:
    """Turns on JAX's persistent compilation cache; returns its folder.

    Uses the folder JAX is already configured with (e.g. ``$JAX_COMPILATION_CACHE_DIR``),
    else ``xla`` under the jaxsample cache folder (``~/.cache/jaxsample/xla``, as the
    command uses). Programs that took at least a second to compile are kept.
    """
    from jaxsample.model.gguf_file import cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return jax.config.jax_compilation_cache_dir


__all__ = ["json_allowed_masks", "next_token_logits", "token_texts", "use_compile_cache"]
