"""Prefill and the on-device decoding loop.

One call of :func:`decode` runs a whole batch to completion inside a single jitted
``jax.lax.while_loop``: model step -> hard constraints (JSON mode) -> sampler -> stop checks,
with no host round trip per token. Every row carries its own sampling parameters
(:class:`jaxsample.rows.RowParams`), token history, seed, budget, stop strings and JSON
state, so rows stop on their own and one compiled program serves any mix of values.

Shapes are bucketed (prompt length, number of new tokens) so that different requests reuse
compiled programs; values never cause a recompile.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxsample.automata import json_mode, stop
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams
from jaxsample.sampler import History, sample_rows

# finish codes, per row
RUNNING = 0
FINISH_EOS = 1  # end-of-sequence token (finish_reason "stop")
FINISH_LENGTH = 2  # max_tokens reached (finish_reason "length")
FINISH_STOP = 3  # a stop string was completed (finish_reason "stop")
FINISH_NO_TOKEN = 4  # no token was allowed at all (finish_reason "stop", documented)

FINISH_REASONS = {
    FINISH_EOS: "stop",
    FINISH_LENGTH: "length",
    FINISH_STOP: "stop",
    FINISH_NO_TOKEN: "stop",
}


def bucket(n: int, minimum: int = 16) -> int:
    """The static size used for a dynamic length ``n``: the next power of two >= ``minimum``.

    >>> bucket(5), bucket(17), bucket(100)
    (16, 32, 128)
    """
    size = minimum
    while size < n:
        size *= 2
    return size


@struct.dataclass
class Constraints:
    """The per-row constraint tables of a batch (leading axis B on every row leaf)."""

    json_grammar: Any  # json_mode grammar tables, shared by all rows (no batch axis)
    json_enabled: jax.Array  # shape=(B,), bool
    stops: Any  # stop.compile_stops(...) pytree, batched
    token_bytes: Any  # stop.TokenBytes, shared (no batch axis)


class DecodeOutput(NamedTuple):
    """What one batch produced; host numpy arrays."""

    tokens: np.ndarray  # [B, N] int32, valid up to n_tokens[b]
    n_tokens: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B, N] float32
    top_ids: np.ndarray  # [B, N, 20] int32
    top_logprobs: np.ndarray  # [B, N, 20] float32
    finish: np.ndarray  # [B] int32 finish codes


@struct.dataclass
class LoopState:
    step: jax.Array  # shape=(), int32; output position of the token drawn next
    logits: jax.Array  # shape=(B, V), float32; the model's logits for the next token
    cache: Any  # the model's KV cache
    hist: History  # batched: counts [B, V], in_prompt [B, V]
    json_state: Any  # batched json_mode state
    stop_state: Any  # batched stop state
    tokens: jax.Array  # shape=(B, N), int32
    logprobs: jax.Array  # shape=(B, N), float32
    top_ids: jax.Array  # shape=(B, N, 20), int32
    top_logprobs: jax.Array  # shape=(B, N, 20), float32
    n_out: jax.Array  # shape=(B,), int32; tokens produced so far
    finish: jax.Array  # shape=(B,), int32; RUNNING or a finish code


def _where_rows(mask, new, old):
    """Per row b, ``new`` where ``mask[b]`` else ``old`` (pytrees with a leading axis B)."""
    return jax.tree.map(
        lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old
    )


def _decode_loop(
    model,
    logits,
    cache,
    hist: History,
    rows: RowParams,
    prompt_lengths,
    max_tokens,
    eos_id,
    constraints: Constraints,
    n_steps: int,
    transforms=(),
):
    """The while_loop over decode steps; pure function of arrays (traced under jit)."""
    batch = logits.shape[0]
    grammar = constraints.json_grammar

    def allowed_mask(state: LoopState):
        def json_masks():
            remaining = max_tokens - state.n_out
            json_mask = jax.vmap(json_mode.allowed, in_axes=(None, 0, 0))(
                grammar, state.json_state, remaining
            )
            return json_mask | ~constraints.json_enabled[:, None]

        def all_allowed():
            return jnp.ones(state.logits.shape, jnp.bool_)

        # a batch-level cond on a scalar: plain batches skip the mask's pass over V
        return jax.lax.cond(jnp.any(constraints.json_enabled), json_masks, all_allowed)

    def cond(state: LoopState):
        return (state.step < n_steps) & jnp.any(state.finish == RUNNING)

    def body(state: LoopState):
        running = state.finish == RUNNING
        allowed = allowed_mask(state)
        out = sample_rows(
            state.logits, rows, state.hist, allowed, state.step, transforms=transforms
        )
        token = jnp.where(running & out.ok, out.token, -1)
        i = state.step
        tokens = state.tokens.at[:, i].set(token)
        logprobs = state.logprobs.at[:, i].set(out.logprob)
        top_ids = state.top_ids.at[:, i].set(out.top_ids)
        top_logprobs = state.top_logprobs.at[:, i].set(out.top_logprobs)

        emitted = running & out.ok
        n_out = state.n_out + emitted.astype(jnp.int32)
        hist = jax.vmap(History.append)(state.hist, token)
        safe_token = jnp.maximum(token, 0)
        json_state = jax.vmap(json_mode.advance, in_axes=(None, 0, 0))(
            grammar, state.json_state, safe_token
        )
        json_state = _where_rows(emitted & constraints.json_enabled, json_state, state.json_state)
        stop_state, hit = jax.vmap(stop.advance, in_axes=(0, 0, 0, None))(
            constraints.stops, state.stop_state, safe_token, constraints.token_bytes
        )
        stop_state = _where_rows(emitted, stop_state, state.stop_state)

        finish = state.finish
        finish = jnp.where(running & ~out.ok, FINISH_NO_TOKEN, finish)
        finish = jnp.where(emitted & (token == eos_id), FINISH_EOS, finish)
        finish = jnp.where(emitted & (finish == RUNNING) & hit, FINISH_STOP, finish)
        finish = jnp.where(
            emitted & (finish == RUNNING) & (n_out >= max_tokens), FINISH_LENGTH, finish
        )

        still = finish == RUNNING
        # finished rows step at position 0 so that they add no attention blocks
        positions = jnp.where(still, prompt_lengths + state.step, 0)

        def step_model(cache):
            return model.decode(jnp.where(still, token, 0), positions, cache)

        def skip_model(cache):
            return state.logits, cache

        next_logits, cache = jax.lax.cond(jnp.any(still), step_model, skip_model, state.cache)
        return LoopState(
            step=state.step + 1,
            logits=next_logits.astype(jnp.float32),
            cache=cache,
            hist=hist,
            json_state=json_state,
            stop_state=stop_state,
            tokens=tokens,
            logprobs=logprobs,
            top_ids=top_ids,
            top_logprobs=top_logprobs,
            n_out=n_out,
            finish=finish,
        )

    init = LoopState(
        step=jnp.zeros((), jnp.int32),
        logits=logits.astype(jnp.float32),
        cache=cache,
        hist=hist,
        json_state=jax.vmap(lambda _: json_mode.init_state(grammar))(jnp.arange(batch)),
        stop_state=stop.init_state(constraints.stops),
        tokens=jnp.full((batch, n_steps), -1, jnp.int32),
        logprobs=jnp.zeros((batch, n_steps), jnp.float32),
        top_ids=jnp.zeros((batch, n_steps, TOP_LOGPROBS_MAX), jnp.int32),
        top_logprobs=jnp.zeros((batch, n_steps, TOP_LOGPROBS_MAX), jnp.float32),
        n_out=jnp.zeros((batch,), jnp.int32),
        finish=jnp.full((batch,), RUNNING, jnp.int32),
    )
    return jax.lax.while_loop(cond, body, init)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "n_steps", "max_len", "eos_id", "transforms")
)
def _generate_jit(
    graphdef,
    model_state,
    prompt_tokens,
    prompt_lengths,
    rows,
    max_tokens,
    constraints,
    *,
    n_steps: int,
    max_len: int,
    eos_id: int,
    transforms=(),
):
    model = nnx.merge(graphdef, model_state)
    batch = prompt_tokens.shape[0]
    vocab = model.config.vocab_size
    cache = model.init_cache(batch, max_len)
    logits, cache = model.prefill(prompt_tokens, prompt_lengths, cache)
    valid = jnp.arange(prompt_tokens.shape[1])[None, :] < prompt_lengths[:, None]
    ids = jnp.where(valid, prompt_tokens, vocab)  # padding points past the table: dropped
    in_prompt = jax.vmap(lambda t: jnp.zeros((vocab,), jnp.bool_).at[t].set(True, mode="drop"))(ids)
    hist = History(counts=jnp.zeros((batch, vocab), jnp.int32), in_prompt=in_prompt)
    final = _decode_loop(
        model,
        logits,
        cache,
        hist,
        rows,
        prompt_lengths,
        max_tokens,
        eos_id,
        constraints,
        n_steps,
        transforms,
    )
    return (
        final.tokens,
        final.n_out,
        final.logprobs,
        final.top_ids,
        final.top_logprobs,
        final.finish,
    )


def decode(
    model,
    prompts: list[list[int]],
    rows: RowParams,
    max_tokens: list[int],
    constraints: Constraints,
    *,
    eos_id: int,
    transforms=(),
) -> DecodeOutput:
    """Run prefill and the whole decode loop for a batch of tokenised prompts.

    Args:
      model: a :class:`jaxsample.model.Llama` (NNX module).
      prompts: B lists of prompt token ids (each non-empty).
      rows: the batch's :class:`RowParams` (leading axis B).
      max_tokens: each row's budget of new tokens (already checked against the context).
      constraints: stop strings and JSON mode tables for the batch.
      eos_id: the end-of-sequence token id.
      transforms: a user transform chain (static; its values are in ``rows.user``).

    Returns:
      A :class:`DecodeOutput` of host arrays.
    """
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    t_pad = bucket(int(lengths.max()))
    n_steps = bucket(int(max(max_tokens)))
    max_len = min(t_pad + n_steps, bucket(model.config.context_length))
    max_len = max(max_len, int((lengths + np.array(max_tokens)).max()))
    tokens = np.zeros((batch, t_pad), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    graphdef, model_state = nnx.split(model)
    out = _generate_jit(
        graphdef,
        model_state,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.tree.map(jnp.asarray, rows),
        jnp.asarray(np.array(max_tokens, np.int32)),
        constraints,
        n_steps=n_steps,
        max_len=max_len,
        eos_id=int(eos_id),
        transforms=tuple(transforms),
    )
    return DecodeOutput(*jax.device_get(out))
