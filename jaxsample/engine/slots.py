"""The device side of the slot engine: per-slot state, prefill into a slot, the chunk loop.

Three pure verbs over one state (docs/engine.md has the whole design):

* :func:`prefill` runs one prompt through the model in a bucketed shape ``[1, T]`` and returns
  its next-token logits and its keys/values;
* :func:`insert` writes that request into slot ``s`` of :class:`Slots` (its KV cache rows, its
  ``RowParams``, history, JSON-mode and stop-string state, budget, position) with
  ``dynamic_update_slice`` / ``.at[s].set`` on every per-slot array: the slot index is data,
  so a new request never recompiles;
* :func:`run_chunk` decodes every running slot inside one ``lax.while_loop`` of at most ``K``
  steps (``K`` static) that leaves early once at least ``free_target`` slots are free (a
  traced value), and returns the tokens each slot produced in this chunk.

Every slot's arithmetic is its own: the sampler's key is ``fold_in(key(seed), n_out)``, the
model runs in batch-invariant mode (every matmul sees a fixed multiple of the invariant tile
of columns, attention runs row by row over fixed blocks), and the batch-level conditionals
only skip work that no running slot needs. So a seeded request's tokens and log probabilities
are bit-identical whatever slot it lands in, whatever the other slots hold, whenever it
arrives and whatever ``K`` and the refill threshold are.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxsample.automata import json_mode, json_schema, stop
from jaxsample.decode import FINISH_EOS, FINISH_LENGTH, FINISH_NO_TOKEN, FINISH_STOP, RUNNING
from jaxsample.model.llama import KVCache
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams
from jaxsample.sampler import History, sample_rows

#: The finish code of a slot that holds no request (never filled, or drained).
EMPTY = -1


@struct.dataclass
class Slots:
    """Every slot's whole state; each leaf has a leading axis ``S`` (the slot)."""

    logits: jax.Array  # shape=(S, V), float32; the next token's logits
    cache: KVCache  # k[l], v[l]: [S, K, L, d]; slot s owns row s
    hist: History  # counts [S, V] int32 (output so far), in_prompt [S, V] bool
    rows: RowParams  # [S] sampling values, seeds and logprobs settings
    json_on: jax.Array  # shape=(S,), bool; JSON mode
    json_state: Any  # json_mode.State, [S]
    schema_on: jax.Array  # shape=(S,), bool; a JSON Schema constrains the slot
    schema_state: Any  # json_schema.State, [S]; q indexes the shared schema pool
    stops: stop.StopTables  # [S] stop-string automata
    stop_state: stop.StopState  # [S]
    prompt_len: jax.Array  # shape=(S,), int32
    n_out: jax.Array  # shape=(S,), int32; tokens produced (= output position of the next)
    budget: jax.Array  # shape=(S,), int32; max_tokens
    finish: jax.Array  # shape=(S,), int32; RUNNING, a finish code, or EMPTY


class Shared(NamedTuple):
    """Tables every slot reads (no slot axis): loop invariants of the chunk."""

    grammar: Any  # json_mode.Grammar
    token_bytes: stop.TokenBytes
    schemas: Any  # json_schema.Pool: every schema the slots use, written in as data (or None)


class ChunkOut(NamedTuple):
    """What one chunk produced. Slot s emitted ``n_out_after[s] - n_out_before[s]`` tokens, at
    local steps ``0, 1, ...`` (a running slot emits one token per step until it finishes)."""

    tokens: jax.Array  # shape=(S, K), int32; -1 where nothing was emitted
    logprobs: jax.Array  # shape=(S, K), float32
    top_ids: jax.Array  # shape=(S, K, 20), int32
    top_logprobs: jax.Array  # shape=(S, K, 20), float32
    n_out: jax.Array  # shape=(S,), int32; after the chunk
    finish: jax.Array  # shape=(S,), int32; after the chunk
    steps: jax.Array  # shape=(), int32; steps run


def init_slots(model, shared: Shared, n_slots: int, max_len: int, dummy_rows: RowParams) -> Slots:
    """Every slot EMPTY. ``dummy_rows``: a one-row RowParams (any values) giving the leaves'
    shapes and dtypes; the cache has ``max_len`` positions per slot (rounded up to the
    attention block)."""
    vocab = model.config.vocab_size
    S = n_slots
    rows = jax.tree.map(
        lambda x: jnp.zeros((S,) + jnp.shape(x)[1:], jnp.asarray(x).dtype), dummy_rows
    )
    stops = stop.compile_stops([()] * S)
    json0 = json_mode.init_state(shared.grammar)
    return Slots(
        logits=jnp.zeros((S, vocab), jnp.float32),
        cache=model.init_cache(S, max_len),
        hist=History(
            counts=jnp.zeros((S, vocab), jnp.int32), in_prompt=jnp.zeros((S, vocab), jnp.bool_)
        ),
        rows=rows,
        json_on=jnp.zeros((S,), jnp.bool_),
        json_state=jax.tree.map(lambda x: jnp.broadcast_to(x, (S,) + x.shape), json0),
        schema_on=jnp.zeros((S,), jnp.bool_),
        schema_state=jax.tree.map(
            lambda x: jnp.broadcast_to(x, (S,) + x.shape), json_schema.init_state(0)
        ),
        stops=stops,
        stop_state=stop.init_state(stops),
        prompt_len=jnp.zeros((S,), jnp.int32),
        n_out=jnp.zeros((S,), jnp.int32),
        budget=jnp.zeros((S,), jnp.int32),
        finish=jnp.full((S,), EMPTY, jnp.int32),
    )


def prefill(model, tokens: jax.Array, length: jax.Array):
    """One prompt through the model: ``tokens [1, T]`` (right padded), ``length [1]``.

    Returns (logits f32[1, V] for the next token, keys, values): per layer ``[1, K, C, d]``
    with ``C`` = T rounded up to the attention block. Batch-invariant mode makes the result
    independent of ``T`` (the padding), so the bucket a prompt lands in does not matter.
    """
    cache = model.init_cache(1, tokens.shape[1])
    logits, cache = model.prefill(tokens, length, cache)
    return logits.astype(jnp.float32), cache.k, cache.v


def _put(a: jax.Array, index: jax.Array, mine: jax.Array, value: jax.Array) -> jax.Array:
    """``a[index] = value`` if ``mine`` (``value`` has a's shape without the leading axis,
    or a leading-axis-1 block that is written at ``(index, 0, ...)``)."""
    if value.ndim == a.ndim:  # a block [1, ...] written at (index, 0, ...)
        at = (index,) + (0,) * (a.ndim - 1)
        old = jax.lax.dynamic_slice(a, at, value.shape)
        return jax.lax.dynamic_update_slice(a, jnp.where(mine, value.astype(a.dtype), old), at)
    return a.at[index].set(jnp.where(mine, value.astype(a.dtype), a[index]))


def insert(
    slots: Slots,
    shared: Shared,
    index: jax.Array,
    mine: jax.Array,
    logits: jax.Array,
    keys,
    values,
    tokens: jax.Array,
    length: jax.Array,
    rows: RowParams,
    json_on: jax.Array,
    schema_start: jax.Array,
    stops: stop.StopTables,
    budget: jax.Array,
) -> Slots:
    """Writes one prefilled request into slot ``index`` if ``mine`` (both traced: a new
    request never recompiles; ``mine`` is False on the devices that do not own the slot).

    ``logits [1, V]``, ``keys``/``values`` per layer ``[1, K, C, d]`` (from :func:`prefill`),
    ``tokens [1, T]`` and ``length [1]`` (the prompt, for the repetition penalty's history),
    ``rows``/``stops`` one-row pytrees, ``json_on [1]``, ``schema_start [1]`` (the pool
    state a schema row starts in; 0 = no schema), ``budget [1]`` (max_tokens).
    Cache entries of the slot past ``C`` keep stale values from an earlier request; attention
    never reads past a row's position, so they are never seen.
    """
    vocab = slots.logits.shape[1]

    def put(a, v):
        return _put(a, index, mine, v)

    def put_rows(tree, value):  # value: the same pytree with a leading axis 1
        return jax.tree.map(lambda a, v: put(a, v[0]), tree, value)

    valid = jnp.arange(tokens.shape[1]) < length[0]
    ids = jnp.where(valid, tokens[0], vocab)  # padding points past the table: dropped
    in_prompt = jnp.zeros((vocab,), jnp.bool_).at[ids].set(True, mode="drop")
    json0 = json_mode.init_state(shared.grammar)
    return slots.replace(
        logits=put(slots.logits, logits[0]),
        cache=KVCache(
            k=tuple(put(c, k) for c, k in zip(slots.cache.k, keys)),
            v=tuple(put(c, v) for c, v in zip(slots.cache.v, values)),
        ),
        hist=History(
            counts=put(slots.hist.counts, jnp.zeros((vocab,), jnp.int32)),
            in_prompt=put(slots.hist.in_prompt, in_prompt),
        ),
        rows=put_rows(slots.rows, rows),
        json_on=put(slots.json_on, json_on[0]),
        json_state=jax.tree.map(put, slots.json_state, json0),
        schema_on=put(slots.schema_on, schema_start[0] > 0),
        schema_state=jax.tree.map(put, slots.schema_state, json_schema.init_state(schema_start[0])),
        stops=put_rows(slots.stops, stops),
        stop_state=slots.stop_state.replace(
            pos=put(slots.stop_state.pos, jnp.zeros_like(slots.stop_state.pos[0]))
        ),
        prompt_len=put(slots.prompt_len, length[0]),
        n_out=put(slots.n_out, jnp.int32(0)),
        budget=put(slots.budget, budget[0]),
        finish=put(slots.finish, jnp.int32(RUNNING)),
    )


def _where_rows(mask, new, old):
    """Per slot s, ``new`` where ``mask[s]`` else ``old`` (pytrees with a leading axis S)."""
    return jax.tree.map(
        lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old
    )


def _allowed(shared: Shared, slots: Slots, running):
    """bool[S, V]: the JSON-mode mask of JSON rows, the schema mask of schema rows, all True
    elsewhere; each mask's pass over the vocabulary runs only when some running slot needs
    it."""
    remaining = slots.budget - slots.n_out

    def all_allowed():
        return jnp.ones(slots.logits.shape, jnp.bool_)

    def with_json():
        mask = jax.vmap(json_mode.allowed, in_axes=(None, 0, 0))(
            shared.grammar, slots.json_state, remaining
        )
        return mask | ~slots.json_on[:, None]

    def with_schema(mask):
        schema = jax.vmap(json_schema.allowed, in_axes=(None, 0, 0))(
            shared.schemas, slots.schema_state, remaining
        )
        return jnp.where(slots.schema_on[:, None], schema, mask)

    mask = jax.lax.cond(jnp.any(slots.json_on & running), with_json, all_allowed)
    if shared.schemas is None:  # a static batch without schema rows
        return mask
    return jax.lax.cond(jnp.any(slots.schema_on & running), with_schema, lambda m: m, mask)


def step(model, shared: Shared, slots: Slots, *, transforms=(), eos_id: int | None = None):
    """One decode step of every slot: constraints -> sampler -> stop checks -> model.

    Returns (slots after the step, the :class:`jaxsample.SampleOut` of the draw with ``token``
    set to -1 where the slot emitted nothing).
    """
    running = slots.finish == RUNNING
    allowed = _allowed(shared, slots, running)
    out = sample_rows(
        slots.logits, slots.rows, slots.hist, allowed, slots.n_out, transforms=transforms
    )
    emitted = running & out.ok
    token = jnp.where(emitted, out.token, -1)
    hist = jax.vmap(History.append)(slots.hist, token)
    safe = jnp.maximum(token, 0)
    json_state = jax.vmap(json_mode.advance, in_axes=(None, 0, 0))(
        shared.grammar, slots.json_state, safe
    )
    json_state = _where_rows(emitted & slots.json_on, json_state, slots.json_state)
    schema_state = slots.schema_state
    if shared.schemas is not None:
        new_state = jax.vmap(json_schema.advance, in_axes=(None, 0, 0))(
            shared.schemas, slots.schema_state, safe
        )
        schema_state = _where_rows(emitted & slots.schema_on, new_state, schema_state)
    stop_state, hit = jax.vmap(stop.advance, in_axes=(0, 0, 0, None))(
        slots.stops, slots.stop_state, safe, shared.token_bytes
    )
    stop_state = _where_rows(emitted, stop_state, slots.stop_state)
    n_out = slots.n_out + emitted.astype(jnp.int32)

    eos_id = model.config.eos_id if eos_id is None else eos_id
    finish = slots.finish
    finish = jnp.where(running & ~out.ok, FINISH_NO_TOKEN, finish)
    finish = jnp.where(emitted & (token == eos_id), FINISH_EOS, finish)
    finish = jnp.where(emitted & (finish == RUNNING) & hit, FINISH_STOP, finish)
    finish = jnp.where(
        emitted & (finish == RUNNING) & (n_out >= slots.budget), FINISH_LENGTH, finish
    )

    still = finish == RUNNING
    # slots that are not running step at position 0 of their own cache row: they add no
    # attention blocks, and a later insert overwrites what they write there
    positions = jnp.where(still, slots.prompt_len + slots.n_out, 0)

    def step_model(cache):
        return model.decode(jnp.where(still, token, 0), positions, cache)

    def skip_model(cache):
        return slots.logits, cache

    logits, cache = jax.lax.cond(jnp.any(still), step_model, skip_model, slots.cache)
    new = slots.replace(
        logits=logits.astype(jnp.float32),
        cache=cache,
        hist=hist,
        json_state=json_state,
        schema_state=schema_state,
        stop_state=stop_state,
        n_out=n_out,
        finish=finish,
    )
    return new, out._replace(token=token)


def head(slots: Slots, width: int) -> Slots:
    """The first ``width`` slots: every per-slot leaf cut to its first ``width`` rows, except
    the KV cache, which stays whole (decode reads and writes rows 0..width-1 of it in place:
    cutting it would copy every row's cache at every chunk)."""
    rest = jax.tree.map(lambda x: x[:width], slots.replace(cache=None))
    return rest.replace(cache=slots.cache)


def put_head(slots: Slots, part: Slots) -> Slots:
    """``slots`` with its first rows replaced by ``part`` (from :func:`head`) and its cache
    by ``part``'s."""

    def put(full, rows):
        return jax.lax.dynamic_update_slice_in_dim(full, rows, 0, axis=0)

    rest = jax.tree.map(put, slots.replace(cache=None), part.replace(cache=None))
    return rest.replace(cache=part.cache)


def run_chunk(
    model,
    shared: Shared,
    slots: Slots,
    free_target: jax.Array,
    *,
    chunk_steps: int,
    transforms=(),
    axis_name: str | None = None,
    eos_id: int | None = None,
    width: int | None = None,
):
    """Up to ``chunk_steps`` decode steps; leaves early once no slot runs or at least
    ``free_target`` slots are not running (counted over every device when ``axis_name``
    names the mesh axis the slots are split over).

    ``width`` (static): run the model and the sampler on the first ``width`` slots only (a
    narrow chunk; default: every slot). The caller guarantees that no slot past them is
    running; they count as free, and their outputs are empty (tokens -1). Each row's
    arithmetic is its own whatever the width (batch-invariant mode), so a narrow chunk
    gives the same bits as a full one, at the cost of ``width`` rows.

    Returns (slots, :class:`ChunkOut`).
    """
    S = slots.finish.shape[0]
    if width is not None and width < S:
        full = slots
        past = S - width  # slots past the width: free (on every device)
        past = past if axis_name is None else jax.lax.psum(past, axis_name)
        slots, out = run_chunk(
            model,
            shared,
            head(full, width),
            free_target - past,
            chunk_steps=chunk_steps,
            transforms=transforms,
            axis_name=axis_name,
            eos_id=eos_id,
        )
        slots = put_head(full, slots)

        def pad(x, fill):  # the rows past the width emitted nothing
            return jnp.pad(x, [(0, S - width)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)

        out = ChunkOut(
            tokens=pad(out.tokens, -1),
            logprobs=pad(out.logprobs, 0),
            top_ids=pad(out.top_ids, -1),
            top_logprobs=pad(out.top_logprobs, 0),
            n_out=slots.n_out,
            finish=slots.finish,
            steps=out.steps,
        )
        return slots, out
    K = chunk_steps

    def count(x):
        x = jnp.sum(x.astype(jnp.int32))
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def cond(carry):
        i, slots, _ = carry
        running = count(slots.finish == RUNNING)
        total = S if axis_name is None else jax.lax.psum(S, axis_name)
        return (i < K) & (running > 0) & (total - running < free_target)

    def body(carry):
        i, slots, outs = carry
        slots, out = step(model, shared, slots, transforms=transforms, eos_id=eos_id)
        outs = (
            outs[0].at[:, i].set(out.token),
            outs[1].at[:, i].set(out.logprob),
            outs[2].at[:, i].set(out.top_ids),
            outs[3].at[:, i].set(out.top_logprobs),
        )
        return i + 1, slots, outs

    outs = (
        jnp.full((S, K), -1, jnp.int32),
        jnp.zeros((S, K), jnp.float32),
        jnp.full((S, K, TOP_LOGPROBS_MAX), -1, jnp.int32),
        jnp.zeros((S, K, TOP_LOGPROBS_MAX), jnp.float32),
    )
    i, slots, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, outs))
    return slots, ChunkOut(*outs, n_out=slots.n_out, finish=slots.finish, steps=i)
