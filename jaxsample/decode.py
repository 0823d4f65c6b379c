"""A static batch: prefill, then one on-device loop until every row is done.

Every entry point (``Engine.generate``, ``stream``, the command, the batch job) runs on the
slot engine (:mod:`jaxsample.engine`); :func:`decode` is the one-shot static batch, kept as
a baseline for tests and benchmarks. One call runs a whole batch to completion inside a
single jitted ``jax.lax.while_loop`` (the slot engine's chunk loop with every row running
from the start: the same step function, :func:`jaxsample.engine.slots.step`), with no
host round trip per token. Every row carries its own sampling parameters
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

from jaxsample.automata import json_mode, json_schema, stop
from jaxsample.rows import RowParams
from jaxsample.sampler import History

# finish codes, per row
RUNNING = 0
FINISH_EOS = 1  # end-of-sequence token (finish_reason "stop")
FINISH_LENGTH = 2  # max_tokens reached (finish_reason "length")
FINISH_STOP = 3  # a stop string was completed (finish_reason "stop")
FINISH_NO_TOKEN = 4  # no token was allowed at all (finish_reason "content_filter")
# (the finish_reason strings are jaxsample.api.FINISH_REASONS)


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
    from jaxsample.engine import slots as sl

    grammar = constraints.json_grammar

    def per_row(x):
        return jax.tree.map(lambda v: jnp.broadcast_to(v, (batch,) + v.shape), x)

    slots = sl.Slots(
        logits=logits.astype(jnp.float32),
        cache=cache,
        hist=hist,
        rows=rows,
        json_on=constraints.json_enabled,
        json_state=per_row(json_mode.init_state(grammar)),
        schema_on=jnp.zeros((batch,), jnp.bool_),
        schema_state=per_row(json_schema.init_state(0)),
        stops=constraints.stops,
        stop_state=stop.init_state(constraints.stops),
        prompt_len=prompt_lengths,
        n_out=jnp.zeros((batch,), jnp.int32),
        budget=max_tokens,
        finish=jnp.full((batch,), RUNNING, jnp.int32),
    )
    shared = sl.Shared(grammar, constraints.token_bytes, schemas=None)
    _, out = sl.run_chunk(
        model, shared, slots, batch + 1, chunk_steps=n_steps, transforms=transforms, eos_id=eos_id
    )
    return out.tokens, out.n_out, out.logprobs, out.top_ids, out.top_logprobs, out.finish


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
