"""One small pure function per sampling parameter, over one row of logits.

Everything here works on a single row (``z: f32[V]``) with every parameter a 0-d array leaf;
a batch is ``jax.vmap``. A removed token has logit ``-inf`` and nothing else means removed.
A logit that was finite stays finite: arithmetic that overflows is clipped to
``[-FLOAT32_MAX, FLOAT32_MAX]``, so no step can turn a kept token into ``-inf`` or ``NaN``.

Steps 1-5 of SPEC.md (hard mask, logit_bias, repetition_penalty, frequency/presence penalty,
temperature) are elementwise functions ``f32[V] -> f32[V]``.

Steps 6-9 (top_k, top_p, top_a, min_p) are filters. Each filter keeps the tokens whose logit is
at or above a threshold, so every kept set is "all tokens ``>= t``". Each filter has two exact
implementations that share that meaning:

* a fast one on :class:`Candidates`, the ``C`` largest logits of the row (a two-stage top-k,
  :func:`top_candidates`, which does not sort the vocabulary). It works whenever the kept
  set lies inside the candidates, and otherwise says so (``Candidates.exact`` becomes False);
* a full-vocabulary one on :class:`FullRow` that finds the threshold by a search over the
  float32 order (about 32 counting passes), used only for the rows the candidates cannot
  resolve.

Example::

    >>> import jax.numpy as jnp
    >>> z = sanitize(jnp.array([2.0, jnp.nan, 0.5, 1.0]))
    >>> z = temperature(z, jnp.float32(0.5))
    >>> c = top_k(init_candidates(z, 4), jnp.int32(2), vocab_size=4)
    >>> c.ids[: c.n].tolist()
    [0, 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsample import native

#: The largest finite float32; finite logits are kept inside [-FLOAT32_MAX, FLOAT32_MAX].
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: A row with ``temperature`` below this is greedy (SPEC.md step 5).
GREEDY_TEMPERATURE = 1e-5
#: ``repetition_penalty`` is evaluated as ``max(r, floor)`` so that r = 0 stays finite.
REPETITION_PENALTY_FLOOR = 1e-6


# --------------------------------------------------------------------------------------------
# Steps 1-5: elementwise transforms f32[V] -> f32[V]
# --------------------------------------------------------------------------------------------


def _refinite(new: jax.Array, old: jax.Array) -> jax.Array:
    """Keeps removed tokens at -inf, clips every other value into the finite float32 range and
    writes -0.0 as +0.0: the two are equal logits, but ``top_k`` and sorts order -0.0 below
    +0.0, so without this a tie between them would not go to the lower id (greedy, top_k)."""
    finite = _plus_zero(_clip_finite(new))
    return jnp.where(old == -jnp.inf, -jnp.inf, finite)


def _clip_finite(x: jax.Array) -> jax.Array:
    """``x`` clipped into the finite float32 range (±inf to ±FLOAT32_MAX; NaN stays NaN)."""
    return jnp.clip(x, -FLOAT32_MAX, FLOAT32_MAX)


def _plus_zero(x: jax.Array) -> jax.Array:
    """``x`` with -0.0 written as +0.0 (everything else unchanged)."""
    return jnp.where(x == 0.0, 0.0, x)


def sanitize(logits: jax.Array) -> jax.Array:
    """Converts a row of logits of any float dtype to float32: NaN -> -inf, +inf -> FLOAT32_MAX.

    ``f32[V] <- any float[V]``. NaN is a removed token; +inf is the largest finite value, so
    softmax never meets ``inf - inf``.

    >>> sanitize(jnp.array([1.0, jnp.nan, jnp.inf], jnp.bfloat16)).tolist()[:2]
    [1.0, -inf]
    """
    z = jnp.asarray(logits).astype(jnp.float32)
    return jnp.where(jnp.isnan(z), -jnp.inf, jnp.minimum(z, FLOAT32_MAX))


def hard_mask(z: jax.Array, allowed: jax.Array) -> jax.Array:
    """Step 1: ``z[t] = -inf`` where ``allowed[t]`` is False. ``f32[V], bool[V] -> f32[V]``.

    >>> hard_mask(jnp.array([1.0, 2.0]), jnp.array([True, False])).tolist()
    [1.0, -inf]
    """
    return jnp.where(allowed, z, -jnp.inf)


def bias_vector(ids: jax.Array, values: jax.Array, vocab_size: int) -> jax.Array:
    """The dense bias ``b[V]`` with ``b[ids[j]] += values[j]`` (duplicates add up).

    A scatter into zeros: cheaper on CPU than scattering into the logits, and the add then
    fuses with the other elementwise steps. Ids outside ``[0, V)`` add nothing (on the device
    nothing can raise; :func:`jaxsample.pack_rows` refuses them on the host): a negative id
    such as the padding id -1 is not read from the end, which numpy-style indexing would do
    (``-1`` biased the last token of the vocabulary).

    >>> bias_vector(jnp.array([1, -1, 3]), jnp.array([5.0, 7.0, 9.0]), 3).tolist()
    [0.0, 5.0, 0.0]
    """
    ids = jnp.asarray(ids)
    ids = jnp.where(ids < 0, vocab_size, ids)  # past the end: dropped, never wrapped
    return jnp.zeros(vocab_size, jnp.float32).at[ids].add(values.astype(jnp.float32), mode="drop")


def add_bias(z: jax.Array, bias: jax.Array) -> jax.Array:
    """Step 2 with a dense bias: ``z + bias``; a removed token stays removed."""
    return _refinite(z + bias, z)


# The steps' arithmetic before ``_refinite``: the public steps re-finite each result; the
# sampler's fused pass (``sampler._scale``) clips each and settles the rest once.


def _repetition(z: jax.Array, r: jax.Array, seen: jax.Array) -> jax.Array:
    r = jnp.maximum(r, REPETITION_PENALTY_FLOOR)
    return jnp.where(seen, jnp.where(z > 0, z / r, z * r), z)


def _frequency_presence(
    z: jax.Array, counts: jax.Array, frequency: jax.Array, presence: jax.Array
) -> jax.Array:
    penalty = frequency * counts.astype(jnp.float32) + presence * (counts > 0).astype(jnp.float32)
    return z - penalty


def _temperature(z: jax.Array, t: jax.Array) -> jax.Array:
    return z / jnp.where(is_greedy(t), 1.0, t)


def logit_bias(z: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """Step 2: ``z[ids[j]] += values[j]`` (a sparse scatter-add). ``f32[V], i32[NB], f32[NB]``.

    Padding entries are ``(0, 0.0)`` and add nothing; a removed token stays removed; ids
    outside ``[0, V)`` add nothing (:func:`bias_vector`).

    >>> logit_bias(jnp.zeros(3), jnp.array([2, 0]), jnp.array([5.0, 0.0])).tolist()
    [0.0, 0.0, 5.0]
    """
    return add_bias(z, bias_vector(ids, values, z.shape[-1]))


def repetition_penalty(z: jax.Array, r: jax.Array, seen: jax.Array) -> jax.Array:
    """Step 3: for seen tokens ``z / r`` if ``z > 0`` else ``z * r``. ``f32[V], f32[], bool[V]``.

    ``r`` is evaluated as ``max(r, 1e-6)``: r = 0 (inside the allowed range) behaves as the limit
    r -> 0+ in finite arithmetic (positive seen logits become very large, negative ones close to
    0), and results stay finite (clipped to FLOAT32_MAX).

    >>> repetition_penalty(jnp.array([2.0, -2.0, 2.0]), jnp.float32(2.0),
    ...                    jnp.array([True, True, False])).tolist()
    [1.0, -4.0, 2.0]
    """
    return _refinite(_repetition(z, r, seen), z)


def frequency_presence_penalty(
    z: jax.Array, counts: jax.Array, frequency: jax.Array, presence: jax.Array
) -> jax.Array:
    """Step 4: ``z -= frequency * counts + presence * (counts > 0)``. ``f32[V], i32[V]``.

    ``counts`` are the occurrences of each token in the output so far (not the prompt).

    >>> frequency_presence_penalty(jnp.zeros(3), jnp.array([0, 1, 3]), jnp.float32(0.5),
    ...                            jnp.float32(1.0)).tolist()
    [0.0, -1.5, -2.5]
    """
    return _refinite(_frequency_presence(z, counts, frequency, presence), z)


def is_greedy(t: jax.Array) -> jax.Array:
    """True when the row is greedy: ``temperature < 1e-5``."""
    return t < GREEDY_TEMPERATURE


def temperature(z: jax.Array, t: jax.Array) -> jax.Array:
    """Step 5: ``z / t``; a greedy row (``t < 1e-5``) is left unchanged (its argmax is taken).

    >>> temperature(jnp.array([1.0, -jnp.inf]), jnp.float32(0.5)).tolist()
    [2.0, -inf]
    """
    return _refinite(_temperature(z, t), z)


# --------------------------------------------------------------------------------------------
# Steps 6-9 on the candidates (fast path)
# --------------------------------------------------------------------------------------------


#: Block length of :func:`top_candidates`' first stage.
CANDIDATE_BLOCK = 32


def _maybe(flag, yes, no):
    """``yes()`` if ``flag`` else ``no()``: a Python branch for a constant, else ``lax.cond``."""
    if isinstance(flag, (bool, np.bool_)):
        return yes() if flag else no()
    return lax.cond(flag, yes, no)


def _blocks(x: jax.Array) -> jax.Array:
    """``x`` padded with -inf to a multiple of CANDIDATE_BLOCK, as ``[V / 32, 32]``."""
    pad = (-x.shape[0]) % CANDIDATE_BLOCK
    return jnp.pad(x, (0, pad), constant_values=-jnp.inf).reshape(-1, CANDIDATE_BLOCK)


def block_max(x: jax.Array) -> jax.Array:
    """``f32[ceil(V / 32)]``: the maximum of each block of 32 (one pass; its max is max(x)).

    :func:`jaxsample.native.block_max` (a kernel on CPU; a row without NaN)."""
    return native.block_max(x, CANDIDATE_BLOCK)


def top_candidates(
    x: jax.Array, k: int, block_max: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)`` (values descending, ties by lower index) in two cheap stages.

    ``f32[V] -> (f32[k], i32[k])``. The k largest elements lie in the k blocks (of 32) with
    the largest block maxima, so: one max-reduction pass over ``x``, ``top_k`` over the
    ``V/32`` block maxima, then ``top_k`` over the ``32k`` gathered elements (blocks in
    ascending order, so ties still go to the lower index). On CPU this is several times faster
    than ``lax.top_k`` over the whole row, and nothing sorts the vocabulary. ``block_max``
    (from :func:`block_max`) may be passed when already computed.

    >>> top_candidates(jnp.arange(100.0) % 7, 3)[1].tolist()
    [6, 13, 20]
    """
    vocab = x.shape[0]
    block = CANDIDATE_BLOCK
    if LARGE_TOP_K not in ("sort", "count"):
        raise ValueError(
            f"jaxsample.transforms.LARGE_TOP_K must be 'sort' or 'count', got {LARGE_TOP_K!r}"
        )
    select = top_k_by_count if LARGE_TOP_K == "count" and k >= LARGE_K else native.top_k
    if k * block * 2 > vocab:
        # The barrier keeps XLA from rewriting top_k into a full sort when its output feeds
        # other work (seen on CPU: a slice of the result fused into a consumer). One barrier
        # per output: a barrier on top_k's tuple itself crashes XLA's SPMD partitioner (the
        # slot engine on several devices).
        values, ids = select(x, k)
        return lax.optimization_barrier(values), lax.optimization_barrier(ids)
    blocks = _blocks(x)
    if block_max is None:
        block_max = native.block_max(x, CANDIDATE_BLOCK)
    _, chosen = native.top_k(block_max, k)
    chosen = native.sort_distinct(chosen)  # ascending: keeps the lower-index-first tie order
    values, pos = select(blocks[chosen].reshape(-1), k)
    ids = chosen[pos // block] * block + pos % block
    return lax.optimization_barrier((values, ids.astype(jnp.int32)))


class Candidates(NamedTuple):
    """The ``C`` largest logits of one row and the filter state over them.

    The kept set is always "every token ``>= values[n - 1]``" (the first ``n`` candidates),
    or every finite token while ``kept_all``.
    """

    values: jax.Array  # shape=(C,), float32; the C largest logits, descending, ties by lower id
    ids: jax.Array  # shape=(C,), int32
    weights: jax.Array  # shape=(C,), float32; exp(values - values[0])
    cum: jax.Array  # shape=(C,), float32; cumulative sum of weights
    total: jax.Array  # shape=(), float32; sum of exp(z - max z) over the whole vocabulary
    n: jax.Array  # shape=(), int32; number of leading candidates kept (when not kept_all)
    kept_all: jax.Array  # shape=(), bool; no filter has cut yet: every finite token is kept
    exact: jax.Array  # shape=(), bool; False once the kept set is not known from the candidates


def init_candidates(
    z: jax.Array,
    num_candidates: int,
    *,
    total: bool = True,
    block_max: jax.Array | None = None,
    half=False,
) -> Candidates:
    """Takes the ``C = min(num_candidates, V)`` largest logits of ``z`` (``lax.top_k``).

    ``f32[V] -> Candidates``. When the candidates hold every finite token (``C == V``, or the
    smallest candidate is ``-inf``), the kept set is the finite candidates (``kept_all`` False).
    ``total=False`` skips the full-vocabulary ``exp`` pass (``total`` is then NaN): only a
    filter that runs while ``kept_all`` reads it, and a caller that knows none will (top_k
    has cut) or computes it later (see :func:`vocabulary_total`) saves that pass.
    ``block_max`` (from :func:`block_max`) may be passed when already computed.

    ``half`` (a bool, or a scalar bool array: a ``lax.cond``) selects only the ``C // 2``
    largest and repeats the smallest of them to fill the ``C`` slots: half the selection's
    cost, for a caller that knows top_k keeps at most ``C // 2`` tokens. The state is still
    right for top_k with ``k <= C // 2``: a tie block at the k-th value that reaches the last
    real candidate reaches the end of the slots too, so the cut is not claimed exact (the
    repeated value bounds every token outside, as the ``C``-th largest would). Any other filter
    must run after such a top_k has cut (SPEC.md's order does that).
    """
    vocab = z.shape[-1]
    c = min(num_candidates, vocab)
    h = c // 2

    def full():
        return top_candidates(z, c, block_max)

    def halved():
        values, ids = top_candidates(z, h, block_max)
        pad = c - h
        return (
            jnp.concatenate([values, jnp.broadcast_to(values[-1], (pad,))]),
            jnp.concatenate([ids, jnp.broadcast_to(ids[-1], (pad,))]),
        )

    if h == 0 or c == vocab or half is False:
        values, ids = full()
    elif half is True:
        values, ids = halved()
    else:
        values, ids = lax.cond(half, halved, full)
    total = vocabulary_total(z, values[0]) if total else jnp.float32(jnp.nan)
    return _candidates(values, ids, total, vocab)


def first_candidates(
    z: jax.Array, num_candidates: int, *, total=True, half=False
) -> tuple[jax.Array, Candidates]:
    """``(block_max(z), init_candidates(z, num_candidates, total=total, half=half))`` in one
    call: on CPU one kernel (:func:`jaxsample.native.candidates`), which reads the row once
    for the block maxima and the normalizer and always selects all ``C`` candidates (``half``
    is then ignored: the state is the full selection's, which is at least as exact).

    ``total``: a bool or a scalar bool array (a ``lax.cond``); False gives ``total = NaN``.
    The kernel's normalizer is within about 1 ulp of the exact sum, not the bits of
    :func:`vocabulary_total`, which the JAX form (every other backend) uses.
    """
    vocab = z.shape[-1]
    c = min(num_candidates, vocab)

    def xla(z, total):
        zb = block_max(z)
        c0 = init_candidates(z, num_candidates, total=False, block_max=zb, half=half)
        nan = jnp.float32(jnp.nan)
        t = _maybe(total, lambda: vocabulary_total(z, c0.values[0]), lambda: nan)
        return zb, c0.values, c0.ids, t

    zb, values, ids, t = native.candidates(z, c, CANDIDATE_BLOCK, total, xla)
    return zb, _candidates(values, ids, t, vocab)


def _candidates(values: jax.Array, ids: jax.Array, total: jax.Array, vocab: int) -> Candidates:
    """The state of :func:`init_candidates` for the ``C`` largest ``(values, ids)`` of a row
    of ``vocab`` tokens and its normalizer ``total``."""
    c = values.shape[0]
    top = values[0]
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    weights = jnp.exp(values - shift)
    cum = jnp.cumsum(weights)
    finite = jnp.sum(values > -jnp.inf).astype(jnp.int32)
    complete = (values[-1] == -jnp.inf) | (c == vocab)
    return Candidates(
        values=values,
        ids=ids,
        weights=weights,
        cum=cum,
        total=total,
        n=jnp.where(complete, finite, c).astype(jnp.int32),
        kept_all=~complete,
        exact=jnp.bool_(True),
    )


#: A row of at least this many tokens is first folded into ``ROW_SUM_FOLD`` slices.
ROW_SUM_FOLD_FROM = 4096
#: How many equal slices :func:`row_sum` adds elementwise before the pairwise tree.
ROW_SUM_FOLD = 8


def _tree_sum(y: jax.Array) -> jax.Array:
    """The sum over the last axis in a fixed order: zeros appended up to a power of two, then
    halves added. Elementwise adds only, so the order (and the bits) is the expression's
    whatever XLA fuses or however large the batch."""
    n = y.shape[-1]
    y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, (1 << (n - 1).bit_length()) - n)])
    while y.shape[-1] > 1:
        h = y.shape[-1] // 2
        y = y[..., :h] + y[..., h:]
    return y[..., 0]


def vocabulary_total(z: jax.Array, top: jax.Array) -> jax.Array:
    """``sum(exp(z - top))`` over the row (``top``: its max; ``-inf`` for an empty row),
    summed by :func:`row_sum`."""
    return row_sum(jnp.exp(z - jnp.where(top == -jnp.inf, 0.0, top)))


def row_sum(x: jax.Array) -> jax.Array:
    """``sum(x)`` over a row ``f32[V]`` in a fixed order, so its bits do not depend on the
    batch or on what XLA fuses around it. Every mass over the vocabulary that a decision
    reads (the normalizers, the kept mass, the threshold search's amounts) is summed with it.

    A row of ``ROW_SUM_FOLD_FROM`` tokens or more is cut into ``ROW_SUM_FOLD`` equal slices
    (zeros appended) that are added pairwise elementwise, then the remaining ``V / 8`` are
    summed by :func:`_tree_sum`; a shorter row goes to :func:`_tree_sum` directly. XLA's CPU
    ``jnp.sum`` changed its last bit with the batch size for rows of up to about 2000 tokens,
    and inside the sampler it is one single-threaded reduction that the exponentials fuse
    into (2.3 ms for ``[64, 49152]``); the fold runs as two parallel elementwise passes
    (about half that, measured in the sampler's program).
    """
    n = x.shape[-1]
    if n >= ROW_SUM_FOLD_FROM:
        w = -(-n // ROW_SUM_FOLD)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, w * ROW_SUM_FOLD - n)])
        parts = [x[..., i * w : (i + 1) * w] for i in range(ROW_SUM_FOLD)]
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
        x = parts[0]
    return _tree_sum(x)


def candidate_mass(s: Candidates) -> jax.Array:
    """The unnormalized mass ``S`` of the kept set (``sum exp(z - max)`` over it)."""
    return jnp.where(s.kept_all, s.total, s.cum[jnp.maximum(s.n - 1, 0)])


def _cut(s: Candidates, keep: jax.Array, active: jax.Array, found: jax.Array = True) -> Candidates:
    """Restricts the kept set to the leading candidates where ``keep`` (a prefix mask) holds.

    While ``kept_all``, the result is exact only if the cut stays strictly inside the
    candidates (the first excluded candidate bounds every token outside them).
    """
    c = s.values.shape[0]
    limit = jnp.where(s.kept_all, c, s.n)
    count = jnp.sum(keep & (jnp.arange(c) < limit)).astype(jnp.int32)
    inside = ~s.kept_all | (found & (count < c))
    return s._replace(
        n=jnp.where(active, count, s.n),
        kept_all=s.kept_all & ~active,
        exact=s.exact & (inside | ~active),
    )


def top_k(s: Candidates, k: jax.Array, *, vocab_size: int) -> Candidates:
    """Step 6: keep tokens whose logit is >= the k-th largest (ties kept). k = 0 or >= V: off.

    Exact from the candidates when ``k <= C`` and the tie block at the k-th value ends inside
    them.
    """
    c = s.values.shape[0]
    active = (k > 0) & (k < vocab_size)
    kth = s.values[jnp.clip(k, 1, c) - 1]
    return _cut(s, s.values >= kth, active, found=k <= c)


def top_p(s: Candidates, p: jax.Array) -> Candidates:
    """Step 7: keep tokens with probability >= that of the token at which the descending
    cumulative sum first reaches ``p`` of the kept mass (ties kept). p >= 1: off; p = 0 keeps
    the most likely token(s).
    """
    c = s.values.shape[0]
    target = p * candidate_mass(s)
    first = jnp.sum(s.cum < target).astype(jnp.int32)
    boundary = s.values[jnp.minimum(first, c - 1)]
    return _cut(s, s.values >= boundary, p < 1.0, found=first < c)


def _renormalized(s: Candidates) -> tuple[jax.Array, jax.Array]:
    """Probabilities of the candidates and of the top token, renormalized over the kept set."""
    mass = candidate_mass(s)
    return s.weights / mass, 1.0 / mass


def top_a(s: Candidates, a: jax.Array) -> Candidates:
    """Step 8: on the renormalized kept distribution, drop tokens with ``p < a * p_max**2``.

    The threshold depends on the kept mass: ``p_max = 1 / S`` in units of ``exp(z - max)``.
    a = 0: off.
    """
    prob, p_max = _renormalized(s)
    return _cut(s, prob >= a * p_max * p_max, a > 0.0)


def min_p(s: Candidates, m: jax.Array) -> Candidates:
    """Step 9: on the renormalized kept distribution, drop tokens with ``p < m * p_max``.
    m = 0: off.
    """
    prob, p_max = _renormalized(s)
    return _cut(s, prob >= m * p_max, m > 0.0)


# --------------------------------------------------------------------------------------------
# Steps 6-9 on the full vocabulary (exact fallback)
# --------------------------------------------------------------------------------------------


class FullRow(NamedTuple):
    """Filter state over the whole vocabulary: the kept set is
    ``(z >= z_min) & (weights >= w_min) & (z > -inf)``.
    """

    z: jax.Array  # shape=(V,), float32; scaled logits
    weights: jax.Array  # shape=(V,), float32; exp(z - max z)
    z_min: jax.Array  # shape=(), float32; logit threshold (top_k, top_p)
    w_min: jax.Array  # shape=(), float32; weight threshold (top_a, min_p)


def init_full(z: jax.Array) -> FullRow:
    """Starts the full-vocabulary filter state: every finite token kept."""
    top = jnp.max(z)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    return FullRow(z, jnp.exp(z - shift), jnp.float32(-jnp.inf), jnp.float32(0.0))


def kept(z: jax.Array, w: jax.Array, z_min: jax.Array, w_min: jax.Array) -> jax.Array:
    """The kept-set rule of steps 6-9, on any shape: ``z >= z_min``, ``w >= w_min`` and
    ``z > -inf`` (``w = exp(z - max z)``; the thresholds from top_k/top_p and top_a/min_p)."""
    return (z >= z_min) & (w >= w_min) & (z > -jnp.inf)


def full_keep(s: FullRow) -> jax.Array:
    """``bool[V]``: the tokens the filters have kept so far."""
    return kept(s.z, s.weights, s.z_min, s.w_min)


def full_mass(s: FullRow) -> jax.Array:
    """The unnormalized mass of the kept set."""
    return row_sum(jnp.where(full_keep(s), s.weights, 0.0))


#: Maps float32 to int32 so that integer order equals float order (-0.0 just below +0.0).
_order_key = native._order_keys


def _from_order_key(k: jax.Array) -> jax.Array:
    """Inverse of :func:`_order_key`."""
    return lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k), jnp.float32)


#: Bits of the order key that each pass of the full-vocabulary threshold search settles
#: (:func:`_largest_threshold_xla`; read when a function is traced): ``2**bits - 1`` sums per
#: pass, ``32 / bits`` passes. ``"auto"``: 2 when JAX's default backend is a GPU (16 passes of
#: 3 sums, unrolled: on an H200 0-15% faster than 4 bits a pass where the search ran, on real
#: logits at B = 64), else 1 (32 passes of one sum in a loop, the least work). One of 1, 2, 4,
#: 8 or ``"auto"``; the threshold is the same whichever.
THRESHOLD_BITS: int | str = "auto"


def _threshold_bits() -> int:
    if THRESHOLD_BITS == "auto":
        return 2 if native.default_is_gpu() else 1
    if THRESHOLD_BITS not in (1, 2, 4, 8):
        raise ValueError(
            "jaxsample.transforms.THRESHOLD_BITS must be 1, 2, 4, 8 or 'auto', "
            f"got {THRESHOLD_BITS!r}"
        )
    return THRESHOLD_BITS


def _largest_threshold(
    s: FullRow, amount: jax.Array, target: jax.Array, run: jax.Array
) -> jax.Array:
    """The largest token logit ``t`` with ``sum(amount[kept & z >= t]) >= target``.

    ``amount: f32[V] >= 0`` (ones for a count, the weights for a mass). Returns ``-inf`` when
    ``run`` is False or no threshold reaches ``target``. On CPU a kernel
    (:func:`jaxsample.native.mass_threshold`, its sums in double precision); elsewhere
    :func:`_largest_threshold_xla`.
    """
    keep = full_keep(s)
    x = jnp.where(keep, s.z, -jnp.inf)
    amount = jnp.where(keep, amount, 0.0)
    return native.mass_threshold(x, amount, target, run, _largest_threshold_xla)


_SIGN = np.uint32(0x80000000)


def _largest_threshold_xla(
    x: jax.Array, amount: jax.Array, target: jax.Array, run: jax.Array
) -> jax.Array:
    """:func:`_largest_threshold`'s JAX form over the kept logits ``x`` (-inf: not kept) and
    their amounts (0 where not kept): a radix search of a fixed number of passes.

    The logits' order keys, as unsigned ints ``u`` (integer order = float order), are searched
    from the top bit down, :data:`THRESHOLD_BITS` bits a pass: a pass sums the amount at or
    above each of the ``2**bits - 1`` pivots ``K + i * 2**shift`` (by :func:`row_sum`) and
    moves ``K`` to the largest pivot whose amount reaches ``target``. Float addition is
    monotone, so the amount at or above ``u`` never grows with ``u`` and the search ends on
    the largest ``K`` whose amount reaches ``target``: the key of a kept token (the amount
    falls just above it), or past the largest logit when ``target <= 0`` (then the largest
    logit). The same ``K`` for any number of bits a pass. With 2 or more bits the passes are
    unrolled, so on a GPU the host never waits for a loop's condition.
    """
    keep = x > -jnp.inf
    u = _unsigned_keys(x)
    reachable = row_sum(amount) >= target
    k = _largest_key(u, amount, target)
    top = jnp.max(jnp.where(keep, u, 0))
    found = lax.bitcast_convert_type(jnp.minimum(k, top) ^ _SIGN, jnp.int32)
    return jnp.where(run & reachable & jnp.any(keep), _from_order_key(found), -jnp.inf)


def _unsigned_keys(x: jax.Array) -> jax.Array:
    """``u32`` keys whose order is ``lax.top_k``'s order of the float32 ``x``."""
    return lax.bitcast_convert_type(_order_key(x), jnp.uint32) ^ _SIGN


def _largest_key(u: jax.Array, amount, target: jax.Array, bits: int | None = None) -> jax.Array:
    """The largest ``K`` (``u32``) with ``row_sum(amount[u >= K]) >= target`` (0 when none):
    :func:`_largest_threshold_xla`'s radix search, ``bits`` (default
    :data:`THRESHOLD_BITS`) bits a pass. ``amount=None`` counts instead (an int32 sum, exact
    in any order, so a plain reduction; ``target`` an int)."""
    bits = _threshold_bits() if bits is None else bits
    steps = jnp.arange(1, 1 << bits, dtype=jnp.uint32)

    def total(above):
        if amount is None:
            return jnp.sum(above, axis=-1, dtype=jnp.int32)
        return row_sum(jnp.where(above, amount[None, :], 0.0))

    def one_pass(i, k):
        shift = jnp.uint32(32 - bits) - jnp.uint32(bits) * i.astype(jnp.uint32)
        pivots = k + (steps << shift)
        sums = total(u[None, :] >= pivots[:, None])
        return k + (jnp.sum(sums >= target, dtype=jnp.uint32) << shift)  # a prefix of trues

    # k = 0 to start: the amount at or above 0 is the whole row's. Unrolled up to 16 passes
    # (on a GPU a loop's every condition would be a host wait); 32 passes are a loop (the
    # CPU's: unrolled, they take seconds to compile)
    return lax.fori_loop(0, 32 // bits, one_pass, jnp.uint32(0), unroll=bits >= 2)


def top_k_by_count(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)``, bit for bit, without sorting the row: ``f32[n] -> (f32[k], i32[k])``.

    The k-th largest order key ``K`` by :func:`_largest_key` (counting, 4 bits a pass: 8
    passes of one fused count each), then the elements above it and the first of those equal
    to it (lower index first), as many as make k, gathered in index order (one cumulative
    count of both kinds, and a scatter), then ordered by :func:`jaxsample.native.top_k` over
    those k alone (ties stay lower index first: the gathered elements are in index order).
    For a large k on a GPU, where XLA sorts the whole row for ``lax.top_k`` (see
    :data:`LARGE_TOP_K`).

    >>> top_k_by_count(jnp.array([1.0, 3.0, 3.0, -0.0, 0.0]), 4)[1].tolist()
    [1, 2, 0, 4]
    """
    n = x.shape[-1]
    u = _unsigned_keys(x)
    kth = _largest_key(u, None, jnp.int32(k), bits=4)  # k <= n: reachable
    above, tied = u > kth, u == kth
    counts = jnp.cumsum(jnp.stack([above, tied]), axis=-1, dtype=jnp.int32)
    need = k - counts[0, -1]  # >= 1: fewer than k lie above the k-th
    taken_tied = jnp.minimum(counts[1], need)  # the tied ones taken up to here
    take = above | (tied & (counts[1] <= need))
    slot = jnp.where(take, counts[0] + taken_tied - 1, k)  # k: dropped
    pos = jnp.zeros(k, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    values, order = native.top_k(x[pos], k)
    return values, pos[order]


#: How :func:`top_candidates` selects ``k >= LARGE_K`` candidates (the second tier's 1024;
#: read when a function is traced): ``"sort"`` (the default), its two stages of
#: ``native.top_k``; ``"count"``, its last stage (the whole row when ``V < 64 k``) by
#: :func:`top_k_by_count`. On an H200 the second tier's ``lax.top_k`` over a row of 49152
#: was a segmented sort (18 kernels), 0.69 of the 0.89 ms of kernel time of a B = 64 step on
#: real logits that needed the tier (docs/sampler.md); the count form is a GPU candidate,
#: not yet timed on one.
LARGE_TOP_K = "sort"
#: The smallest ``k`` that :data:`LARGE_TOP_K` applies to.
LARGE_K = 512


def top_k_full(s: FullRow, k: jax.Array, run: jax.Array, *, vocab_size: int) -> FullRow:
    """Step 6 on the whole vocabulary: the k-th largest logit (ties kept), by search."""
    active = (k > 0) & (k < vocab_size)
    ones = jnp.ones_like(s.z)
    kth = _largest_threshold(s, ones, k.astype(jnp.float32), run & active)
    return s._replace(z_min=jnp.maximum(s.z_min, kth))


def top_p_full(s: FullRow, p: jax.Array, run: jax.Array) -> FullRow:
    """Step 7 on the whole vocabulary: the boundary logit by a search on the kept mass."""
    boundary = _largest_threshold(s, s.weights, p * full_mass(s), run & (p < 1.0))
    return s._replace(z_min=jnp.maximum(s.z_min, boundary))


def top_a_full(s: FullRow, a: jax.Array) -> FullRow:
    """Step 8 on the whole vocabulary: ``p >= a * p_max**2`` is ``w >= a / S``."""
    mass = full_mass(s)
    threshold = jnp.where(a > 0.0, a / mass, 0.0)
    return s._replace(w_min=jnp.maximum(s.w_min, threshold))


def min_p_full(s: FullRow, m: jax.Array) -> FullRow:
    """Step 9 on the whole vocabulary: ``p >= m * p_max`` is ``w >= m``."""
    return s._replace(w_min=jnp.maximum(s.w_min, m))


# --------------------------------------------------------------------------------------------
# User transforms
# --------------------------------------------------------------------------------------------

#: Where a user transform may run in SPEC.md's order: after step 1 (hard constraints), after
#: step 2 (logit_bias), after steps 3-4 (the penalties) or after step 5 (temperature), that is
#: just before top_k. Filters (steps 6-9) and the draw keep their exact candidate paths.
POSITIONS = ("before_bias", "before_penalties", "before_temperature", "before_filters")


class TransformError(ValueError):
    """A user transform that cannot run in the sampler: it fails when traced on one row, or
    returns something other than the row's logits (a floating-point ``[V]`` array). A
    programming error of the chain, not of a request: raised by :func:`jaxsample.pack_rows`
    (so also by :func:`jaxsample.sample` and :func:`jaxsample.processed_logprobs`), when an
    :class:`jaxsample.Engine` is built, and when the sampler is traced with the chain."""


def check_user_output(t: UserTransform, out: Any, vocab_size: int) -> None:
    """Raises :class:`TransformError`, naming ``t``, unless its output ``out`` (an array, a
    tracer or a ``jax.ShapeDtypeStruct``) is a floating-point array of shape
    ``(vocab_size,)``: a scalar or ``[1]`` would broadcast to every token, and an integer or
    boolean array be read as logits, silently."""
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape is None or dtype is None:
        got = type(out).__name__
    elif tuple(shape) != (vocab_size,) or not jnp.issubdtype(dtype, jnp.floating):
        got = f"{dtype}{list(shape)}"
    else:
        return
    raise TransformError(
        f"user transform {t.name!r} returned {got}; it must return the row's logits: a"
        f" floating-point array of shape ({vocab_size},), -inf for removed tokens"
    )


def _number_default(name: str, key: Any, value: Any) -> float:
    """A transform parameter's default (or a range bound): a real number, not a bool or a
    string that ``float()`` would read."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"user transform {name!r}: parameter {key!r} has {value!r}; defaults and range"
            " bounds are numbers (int or float), not bools or strings"
        )
    return float(value)


def _pairs(name: str, what: str, value: Any) -> dict:
    """A transform's ``params`` or ``ranges`` (a mapping, or ``(key, value)`` pairs) as a
    dict, else a ValueError that says what it must be."""
    try:
        return dict(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"user transform {name!r}: {what} must be a dict (or (name, value) pairs),"
            f" got {value!r}"
        ) from None


@dataclasses.dataclass(frozen=True)
class UserTransform:
    """A per-row transform written by a user, run inside the sampler (and the decode loop).

    ``fn(z, params, hist) -> z'``: ``z: f32[V]`` the row's logits at ``position``,
    ``params`` a dict of the transform's per-row values (0-d float32 arrays, one per name of
    ``params``), ``hist`` the row's :class:`jaxsample.History`. It must be a pure JAX
    function of one row (it is vmapped). ``-inf`` means removed: a token removed before the
    transform stays removed whatever ``fn`` returns, NaN becomes ``-inf`` and ``+inf`` the
    largest float32.

    ``params`` maps each parameter name to its default (the value of a request that does not
    set it); ``ranges`` optionally maps a name to the inclusive ``(lo, hi)`` its values must
    lie in (checked on the host by :func:`jaxsample.pack_rows`). The values are array leaves
    of :class:`jaxsample.RowParams` (field ``user``), so changing them never recompiles. A
    chain is a tuple of transforms; it is static (hashable) and names must be distinct.
    Requests set values with ``SamplingParams(transform_params={name: {param: value}})``.

    Example (epsilon sampling: drop tokens whose probability is below ``eps``)::

        >>> import jax
        >>> def epsilon(z, p, hist):
        ...     return jnp.where(jax.nn.softmax(z) < p["eps"], -jnp.inf, z)
        >>> eps = UserTransform("epsilon", epsilon, {"eps": 0.0}, ranges={"eps": (0.0, 1.0)})
        >>> out = apply_user(eps, jnp.log(jnp.array([0.5, 0.45, 0.05])), {"eps": 0.1}, None)
        >>> out.tolist()[2]
        -inf
    """

    name: str
    fn: Callable
    params: Any = ()  # stored: tuple of (name, default float) pairs, in the order given
    position: str = "before_filters"
    ranges: Any = ()  # stored: tuple of (name, (lo, hi)) pairs

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a user transform needs a non-empty name, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"user transform {self.name!r}: fn must be callable")
        if self.position not in POSITIONS:
            raise ValueError(
                f"user transform {self.name!r}: position {self.position!r} is not one of "
                f"{POSITIONS}"
            )
        params = _pairs(self.name, "params", self.params)
        ranges = _pairs(self.name, "ranges", self.ranges)
        for key, value in params.items():  # the values are float32 leaves
            value = _number_default(self.name, key, value)
            if not isinstance(key, str) or not abs(value) <= FLOAT32_MAX:
                raise ValueError(
                    f"user transform {self.name!r}: parameter {key!r} has default {value!r};"
                    " a default is a number finite in float32"
                )
        unknown = set(ranges) - set(params)
        if unknown:
            raise ValueError(f"user transform {self.name!r}: ranges for unknown {unknown}")
        for key, bounds in ranges.items():
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise ValueError(
                    f"user transform {self.name!r}: range of {key!r} is {bounds!r}; a range"
                    " is (lo, hi) with lo <= hi"
                )
        ranges = {
            k: (_number_default(self.name, k, lo), _number_default(self.name, k, hi))
            for k, (lo, hi) in ranges.items()
        }
        for key, (lo, hi) in ranges.items():
            if not lo <= hi:  # NaN bounds fail too
                raise ValueError(
                    f"user transform {self.name!r}: range of {key!r} is ({lo}, {hi}); a range"
                    " is (lo, hi) with lo <= hi"
                )
            if not lo <= float(params[key]) <= hi:
                raise ValueError(
                    f"user transform {self.name!r}: default {key!r}={params[key]!r} lies outside"
                    f" its own range [{lo}, {hi}] (a request that sets nothing gets the default)"
                )
        object.__setattr__(self, "params", tuple((k, float(v)) for k, v in params.items()))
        object.__setattr__(self, "ranges", tuple(ranges.items()))


def check_chain(chain) -> tuple:
    """Returns the chain as a tuple of :class:`UserTransform` with distinct names (one
    transform alone is a chain of one)."""
    from jaxsample.params import InvalidRequestError  # (params imports this module)

    allowed = "a UserTransform, or a tuple of UserTransform objects with distinct names"
    if isinstance(chain, UserTransform):
        chain = (chain,)
    if chain is None:
        chain = ()
    # a string was iterated as its characters, an array failed on its truth value
    if isinstance(chain, (str, bytes, Mapping, np.ndarray, jax.Array)):
        raise InvalidRequestError(
            "transforms", chain, allowed, reason="a transform chain is a tuple of UserTransform"
        )
    try:
        chain = tuple(chain)
    except TypeError:
        raise InvalidRequestError(
            "transforms", chain, allowed, reason="a transform chain is a tuple of UserTransform"
        ) from None
    for t in chain:
        if not isinstance(t, UserTransform):
            raise InvalidRequestError(
                "transforms", t, allowed, reason="a transform chain holds UserTransform objects"
            )
    names = [t.name for t in chain]
    if len(set(names)) != len(names):
        raise InvalidRequestError(
            "transforms", names, allowed, reason="user transform names must be distinct"
        )
    return chain


def apply_user(t: UserTransform, z: jax.Array, params, hist) -> jax.Array:
    """Runs one user transform on a row: removed stays removed, NaN -> -inf, clipped. An
    output that is not the row's logits raises :class:`TransformError` when traced."""
    out = t.fn(z, params, hist)
    check_user_output(t, out, z.shape[-1])
    new = _plus_zero(sanitize(out))
    return jnp.where(z == -jnp.inf, -jnp.inf, new)
