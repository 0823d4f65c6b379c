"""The sampler: SPEC.md's chain over one row, the exact draw, history and log probabilities.

The functional core works on one row and is batched with ``jax.vmap``:

* :func:`distribution` -> :class:`Distribution` (steps 1-9), then :func:`draw` (step 10, with
  an explicit key), :func:`log_prob` and :func:`top_logprobs`;
* :func:`sample_row` -> :class:`SampleOut`: ``draw(distribution(...), fold_in(key(seed), i))``
  and the log probabilities the row asked for;
* :func:`processed_logprobs_row` -> ``f32[V]``, ``log_prob`` over the whole vocabulary.

:func:`sample_rows`, :func:`distributions` and :func:`processed_logprobs_rows` are the batched
versions: they decide the batch's :class:`Plan` once per step (which optional work any row
needs) and pass it to per-row code that has no collective; a plain ``jax.vmap`` of the row
functions gives the same numbers. :func:`sample_batch` and :func:`processed_logprobs_batch`
are jitted. :func:`sample` and :func:`processed_logprobs` are host wrappers that take
:class:`jaxsample.SamplingParams`.

How a row is sampled without sorting the vocabulary (docs/sampler.md has the details): the
``C = 128`` largest scaled logits come from a two-stage top-k (:func:`jaxsample.native.top_k`:
``lax.top_k``, or jaxsample's kernel on CPU, bit for bit the same); top_k, top_p, top_a and
min_p are thresholds, exact from the sorted candidates whenever the kept set ends inside
them; rows they cannot resolve retry on 1024 candidates, then on the full vocabulary
(threshold search). The draw is an exponential race whose noise depends on the key and
the token id only, so every path draws the same token from the same distribution.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jaxsample import native
from jaxsample import transforms as tf
from jaxsample.params import (
    InvalidRequestError,
    _integer,
    _listed,
    check_job_seed,
    token_id_array,
)
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams
from jaxsample.transforms import _maybe

#: How many of a row's largest logits the fast path looks at (a two-stage top-k).
NUM_CANDIDATES = 128
#: The second candidate tier: rows the first cannot resolve retry on this many largest
#: logits (only when some row of the batch needs it) before the full-vocabulary threshold search.
SECOND_TIER = 1024
#: Block length of the full-vocabulary inverse-CDF draw.
DRAW_BLOCK = 256
#: logit_bias is applied over the first 16, 128 or all entries, whichever the batch needs.
BIAS_TIERS = (16, 128)
#: Which batch-level skips the batched sampler compiles (read when it is traced): ``"many"``
#: (the logit_bias tiers, the history read only with penalties, the halved selection, the
#: rare stages gathered 4 or 16 rows at a time, only the full-vocabulary filters some row
#: needs: least work, best where a branch is cheap, as on a CPU or a TPU); ``"few"`` (every
#: cheap part always runs and only the rare stages are branches, over all rows: best where
#: each branch costs a CUDA graph node or a wait for the device); ``"one"`` (one batch-level
#: branch for every rare stage, the second tier and the full-vocabulary thresholds, placed
#: last so that the host waits for its predicate only when the device has nothing left to
#: run; every row's token from one race over the whole vocabulary, a transcendental per token
#: where a GPU has them to spare); ``"auto"``: ``"one"`` when JAX's default backend is a GPU,
#: else ``"many"``. On an H100 "one" was the fastest of the three at every point timed
#: (docs/sampler.md). Same numbers in every mode.
BRANCHES = "auto"


# --------------------------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------------------------


@struct.dataclass
class History:
    """A row's token history for the penalties: 5 bytes per vocabulary entry.

    ``counts`` is how often each token occurs in the output so far (frequency, presence and
    repetition penalties); ``in_prompt`` whether it occurs in the prompt (repetition penalty
    only). Batched, both fields get a leading axis ``B``.

    Example::

        >>> h = History.from_tokens([3, 3], [1], vocab_size=5).append(jnp.int32(1))
        >>> h.counts.tolist(), h.in_prompt.tolist()
        ([0, 2, 0, 0, 0], [False, False, False, True, False])
    """

    counts: jax.Array  # shape=(V,), int32; occurrences in the output so far
    in_prompt: jax.Array  # shape=(V,), bool; occurs in the prompt

    @classmethod
    def from_tokens(cls, prompt_ids, output_ids, vocab_size: int) -> History:
        """Builds a history on the host from token ids (``None`` is empty).

        ``prompt_ids``/``output_ids``: a Python list, a numpy array or a jax array of ints.
        """
        # int32 token ids, as pack_rows: 2**63 overflowed inside numpy, 2**32 asked for 32 GiB
        _integer("vocab_size", vocab_size, 1, 2**31 - 1, "an integer in [1, 2**31 - 1]")
        prompt = token_id_array("prompt_ids", prompt_ids, vocab_size)
        output = token_id_array("output_ids", output_ids, vocab_size)
        counts = np.bincount(output, minlength=vocab_size).astype(np.int32)
        in_prompt = np.zeros(vocab_size, np.bool_)
        in_prompt[prompt] = True
        return cls(counts=jnp.asarray(counts), in_prompt=jnp.asarray(in_prompt))

    @classmethod
    def stack(cls, histories) -> History:
        """Stacks per-row histories into one batched history (leading axis ``B``)."""
        return jax.tree.map(
            lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *histories
        )

    def append(self, token: jax.Array) -> History:
        """Counts one output token (device update; ``token = -1`` appends nothing)."""
        vocab = self.counts.shape[-1]
        index = jnp.where(token >= 0, token, vocab)
        return self.replace(counts=self.counts.at[index].add(1, mode="drop"))


class SampleOut(NamedTuple):
    """One row's draw (batched: a leading axis ``B`` on every field)."""

    token: jax.Array  # shape=(), int32; -1 when ok is False
    logprob: jax.Array  # shape=(), float32; raw or processed log probability of token
    top_ids: jax.Array  # shape=(20,), int32; the 20 most likely tokens (-1 past V)
    top_logprobs: jax.Array  # shape=(20,), float32; their log probabilities
    ok: jax.Array  # shape=(), bool; False when no token is allowed at all


# --------------------------------------------------------------------------------------------
# The plan: the batch's decisions, made once per step
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Plan:
    """What a batch needs this step, decided once in :func:`sample_rows` (no batch axis).

    Per-row code takes a plan and branches on its fields with ``lax.cond``: the fields are
    scalars shared by every row, so under ``jax.vmap`` each cond stays a real branch and the
    per-row code needs no collective. ``Plan.everything()`` (Python constants, no branch at all)
    is what a row function uses when no plan is given; it computes every optional part and
    gives the same numbers as any plan that covers the batch.
    """

    bias: Any  # i32[] or int: logit_bias branch (0 none, then BIAS_TIERS, then all NB entries)
    total: Any  # bool: some row needs the full-vocabulary normalizer (a filter while kept_all)
    tier2: Any  # bool: some row retries on the second candidate tier
    full: Any  # bool: some row's kept set is not resolved by the candidates
    full_k: Any  # bool: some such row needs top_k's threshold by search
    full_p: Any  # bool: ... top_p's
    full_a: Any  # bool: ... top_a's (one mass pass)
    raw: Any  # i32[] or int: 0 no raw log probabilities, 1 the normalizer, 2 also the top 20
    penalties: Any = True  # bool: some row has a repetition, frequency or presence penalty
    mass: Any = True  # bool: some row reports processed log probabilities (the kept mass)
    k_max: Any = None  # i32[]: the largest cutting top_k of a sampled row (None: unknown)

    @classmethod
    def everything(cls) -> Plan:
        """The plan that computes everything (static: no branch); the default of row code."""
        return cls(
            bias=-1, total=True, tier2=True, full=True, full_k=True, full_p=True, full_a=True, raw=2
        )


def _branches() -> str:
    """The mode :data:`BRANCHES` names: ``"many"``, ``"few"`` or ``"one"``."""
    if BRANCHES not in ("auto", "few", "many", "one"):
        raise ValueError(
            f"sampler.BRANCHES must be 'auto', 'few', 'many' or 'one', got {BRANCHES!r}"
        )
    if BRANCHES == "auto":
        return "one" if native.default_is_gpu() else "many"
    return BRANCHES


def _fewer(plan: Plan) -> Plan:
    """``plan`` with the cheap parts made static (computed for every row, no branch): every
    logit_bias entry, the history, the normalizer, the full candidate selection."""
    return plan.replace(bias=-1, total=True, penalties=True, mass=True, k_max=None)


def _bias_used(row: RowParams) -> jax.Array:
    """How many leading logit_bias entries a row uses (past its last nonzero value: none)."""
    nb = row.bias_values.shape[-1]
    return jnp.max(jnp.where(row.bias_values != 0, jnp.arange(nb) + 1, 0), axis=-1)


def _bias_tiers(nb: int) -> list[int]:
    return [t for t in BIAS_TIERS if t < nb] + [nb]


def _k_cuts(row: RowParams, vocab: int) -> jax.Array:
    return (row.top_k > 0) & (row.top_k < vocab)


def _filters(row: RowParams) -> jax.Array:
    return (row.top_p < 1.0) | (row.top_a > 0.0) | (row.min_p > 0.0)


def _raw_needed(rows: RowParams) -> jax.Array:
    """:attr:`Plan.raw`: 0 no row reports raw log probabilities, 1 some do, 2 some also
    their top ones."""
    wants_raw = rows.logprobs & ~rows.processed_logprobs
    return jnp.where(
        jnp.any(wants_raw & (rows.top_logprobs > 0)), 2, jnp.where(jnp.any(wants_raw), 1, 0)
    )


def _mass_needed(rows: RowParams) -> jax.Array:
    """:attr:`Plan.mass` when sampling: some row reports processed log probabilities."""
    return jnp.any(rows.logprobs & rows.processed_logprobs)


def plan_rows(rows: RowParams, *, vocab_size: int, for_sampling: bool = False) -> Plan:
    """The parameter-only part of a batch's plan (``rows`` with a leading axis B).

    The data-dependent fields (``full*``) are set to True here; :func:`distributions` narrows
    them once the candidates have run. ``for_sampling`` (only the reported outputs are
    needed) computes the kept mass only when some row reports processed log probabilities.
    """
    used = jnp.max(_bias_used(rows))
    tiers = _bias_tiers(rows.bias_values.shape[-1])
    bias = jnp.where(used == 0, 0, 1 + jnp.sum(jnp.array(tiers[:-1]) < used))
    greedy = tf.is_greedy(rows.temperature)
    total = jnp.any(~greedy & _filters(rows) & ~_k_cuts(rows, vocab_size))
    raw = _raw_needed(rows)
    true = jnp.bool_(True)
    penalties = (
        (rows.repetition_penalty != 1.0)
        | (rows.frequency_penalty != 0.0)
        | (rows.presence_penalty != 0.0)
    )
    # every non-greedy row whose top_k cuts keeps at most k_max tokens (0: no row's cuts):
    # the candidate selection is halved when k_max fits in half of it (a row that the half
    # leaves unresolved is selected again in full, see _reselect_stage)
    k_max = jnp.max(jnp.where(greedy | ~_k_cuts(rows, vocab_size), 0, rows.top_k))
    return Plan(
        bias=bias,
        total=total,
        tier2=true,
        full=true,
        full_k=true,
        full_p=true,
        full_a=true,
        raw=raw,
        penalties=jnp.any(penalties),
        mass=_mass_needed(rows) if for_sampling else True,
        k_max=k_max,
    )


# --------------------------------------------------------------------------------------------
# Steps 1-9: the distribution
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Distribution:
    """One row's step-10 distribution (batched: a leading axis ``B`` on every field).

    Token ``t`` is kept when ``ok`` and ``z[t] >= z_min``, ``exp(z[t] - shift) >= w_min`` and
    ``z[t] > -inf`` (a greedy row keeps ``ids[0]`` alone); its probability is
    ``exp(z[t] - shift - log_mass)``. The kept set is always the tokens at or above a
    threshold, so it is an upper set of ``z``; when ``in_candidates`` it is exactly the first
    ``n`` candidates. Build it with :func:`distribution`; use it with :func:`draw`,
    :func:`log_prob` and :func:`top_logprobs`.

    From a batch whose candidate selection was halved (see :func:`plan_rows`), a row that the
    half resolved holds the ``C / 2`` largest in the first slots and the ``C / 2``-th repeated
    in the rest (its kept set lies inside the first ``C / 2``).
    """

    z: jax.Array  # shape=(V,), float32; logits after steps 1-5 (and user transforms)
    ids: jax.Array  # shape=(C,), int32; the C largest z, descending, ties by lower id
    values: jax.Array  # shape=(C,), float32; z[ids]
    shift: jax.Array  # shape=(), float32; max z (0 when no token is allowed)
    z_min: jax.Array  # shape=(), float32; logit threshold (top_k, top_p)
    w_min: jax.Array  # shape=(), float32; weight threshold (top_a, min_p)
    log_mass: jax.Array  # shape=(), float32; log of the kept weights' sum
    n: jax.Array  # shape=(), int32; number of kept candidates (of the tier that holds them)
    in_candidates: jax.Array  # shape=(), bool; the kept set is the first n candidates
    ids2: jax.Array  # shape=(C2,), int32; the second tier's candidates (when in_tier2)
    values2: jax.Array  # shape=(C2,), float32
    in_tier2: jax.Array  # shape=(), bool; the kept set is the first n second-tier candidates
    greedy: jax.Array  # shape=(), bool; temperature < 1e-5: the point mass on ids[0]
    ok: jax.Array  # shape=(), bool; False when no token is allowed at all


class _Front(NamedTuple):
    """Steps 1-9 on the candidates for one row, before any full-vocabulary work."""

    z: jax.Array
    ck: tf.Candidates  # after top_k
    c: tf.Candidates  # after every filter
    ok: jax.Array
    greedy: jax.Array
    need_full: jax.Array  # the candidates cannot resolve the kept set
    c2: tf.Candidates | None = None  # the second tier after every filter (when it ran)
    in_tier2: jax.Array | bool = False  # the second tier resolved the kept set
    token2: jax.Array | int = 0  # the race over the second tier (when given a key)
    zb: jax.Array | None = None  # block maxima of z (blocks of 32), for the race's bounds


def _scale(x, allowed, bias, row: RowParams, seen, counts):
    """Steps 1-5 elementwise: mask, bias, repetition, frequency/presence, temperature.

    Works on any shape: the whole row ``[V]`` (with ``bias = None``: no bias) or the few
    biased entries gathered from it, so both give bit-identical values. ``seen = None``
    skips the penalties (the history is not read): the same values as neutral penalties
    (``z / 1``, ``z * 1`` and ``z - 0`` are ``z``).

    The same values as composing the public transforms (``hard_mask``, ``add_bias``,
    ``repetition_penalty``, ``frequency_presence_penalty``, ``temperature``) with fewer
    operations: each of those clips into the finite range, keeps removed tokens at -inf and
    writes -0.0 as +0.0; here each step only clips, and the removed tokens (-inf after
    ``sanitize``, or not allowed) and the zero sign are settled once at the end. That is
    exact: a clipped value stays finite, so the removed set is the same at every step, and
    a zero's sign never changes a later step's nonzero result (it only reaches other zeros).
    """
    removed = x == -jnp.inf
    if allowed is not None:
        removed = removed | ~allowed
    clip = tf._clip_finite
    z = x
    if bias is not None:
        z = clip(z + bias)
    if seen is not None:
        z = clip(tf._repetition(z, row.repetition_penalty, seen))
        z = clip(tf._frequency_presence(z, counts, row.frequency_penalty, row.presence_penalty))
    z = clip(tf._temperature(z, row.temperature))
    return jnp.where(removed, -jnp.inf, tf._plus_zero(z))


def _user(chain, position, z, row: RowParams, hist: History):
    for i, t in enumerate(chain):
        if t.position == position:
            z = tf.apply_user(t, z, row.user[i], hist)
    return z


def _dense_steps_1_to_5(logits, row: RowParams, hist: History, allowed, chain):
    """Steps 1-5 with a dense bias vector and the user transforms at their positions."""
    z = tf.sanitize(logits)
    z = z if allowed is None else tf.hard_mask(z, allowed)
    z = _user(chain, "before_bias", z, row, hist)
    z = tf.add_bias(z, tf.bias_vector(row.bias_ids, row.bias_values, z.shape[-1]))
    z = _user(chain, "before_penalties", z, row, hist)
    seen = hist.in_prompt | (hist.counts > 0)
    z = tf.repetition_penalty(z, row.repetition_penalty, seen)
    z = tf.frequency_presence_penalty(z, hist.counts, row.frequency_penalty, row.presence_penalty)
    z = _user(chain, "before_temperature", z, row, hist)
    return tf.temperature(z, row.temperature)


def _steps_1_to_5(logits, row: RowParams, hist: History, allowed, bias, chain, penalties=True):
    """Steps 1-5 over the row: ``z[V]``, with logit_bias applied sparsely.

    Every token goes through the elementwise chain without bias; then a row's biased entries
    are gathered, run through the same chain with their bias and written back (ids are
    distinct per row; entries with bias 0, the padding included, are skipped), so no dense
    ``[V]`` bias vector is ever built and both give bit-identical values. Scattering costs
    about 0.2-0.4 us per entry on CPU, so only as many entries as the batch uses are visited:
    ``bias`` (from the plan) picks the tier (none, 16, 128 or all). Each branch computes ``z``
    itself (from the unsanitized logits), so nothing is copied into the switch. When no row
    of the batch has a penalty (``penalties``, from the plan), the dense pass does not read
    the history (two ``[V]`` arrays, as many bytes as the logits). A chain with user
    transforms before step 5 uses the dense form (same values).
    """
    if any(t.position != "before_filters" for t in chain):
        z = _dense_steps_1_to_5(logits, row, hist, allowed, chain)
        return _user(chain, "before_filters", z, row, hist)
    ids, values = row.bias_ids, row.bias_values
    vocab = logits.shape[-1]
    tiers = _bias_tiers(ids.shape[-1])

    def dense(with_penalties: bool):
        x = tf.sanitize(logits)
        if not with_penalties:
            return _scale(x, allowed, None, row, None, None)
        seen = hist.in_prompt | (hist.counts > 0)
        return _scale(x, allowed, None, row, seen, hist.counts)

    def unbiased():
        return _maybe(penalties, partial(dense, True), partial(dense, False))

    def biased(t):
        i, v = ids[:t], values[:t]
        counts = hist.counts[i]
        a = None if allowed is None else allowed[i]
        new = _scale(tf.sanitize(logits[i]), a, v, row, hist.in_prompt[i] | (counts > 0), counts)
        return unbiased().at[jnp.where(v != 0, i, vocab)].set(new, mode="drop")

    branches = [unbiased] + [partial(biased, t) for t in tiers]
    if isinstance(bias, int):
        z = branches[bias]()
    else:
        z = lax.switch(bias, branches)
    return _user(chain, "before_filters", z, row, hist)


def _front(logits, row, hist, allowed, plan: Plan, num_candidates, chain) -> _Front:
    vocab = logits.shape[-1]
    z = _steps_1_to_5(logits, row, hist, allowed, plan.bias, chain, plan.penalties)
    greedy = tf.is_greedy(row.temperature)
    small = _halved(plan, num_candidates, vocab)
    # The full-vocabulary normalizer (one exp pass) only matters to a filter that runs while
    # every token is still kept, that is when top_k did not cut: skipped when no row needs it.
    if _branches() == "one":  # (no halving: _fewer's plans have no k_max; the full
        # selection is at least as exact, as with the CPU kernel)
        zb, c0 = _first_candidates_one(z, num_candidates, plan.total)
        ck, c = _filter_candidates_one(c0, row, vocab, c0.total)
    else:
        zb, c0 = tf.first_candidates(z, num_candidates, total=plan.total, half=small)
        ck, c = _filter_candidates(c0, row, vocab, c0.total)
    ok = c0.values[0] > -jnp.inf
    return _Front(z, ck, c, ok, greedy, _unresolved(c, ok, greedy), zb=zb)


def _unresolved(c: tf.Candidates, ok, greedy) -> jax.Array:
    """A sampled row whose kept set the candidates ``c`` do not pin down."""
    return ok & ~greedy & ~(c.exact & ~c.kept_all)


def _halved(plan: Plan, num_candidates: int, vocab: int):
    """Whether the first selection takes only half the candidates (a batch-level bool):
    when no sampled row's top_k keeps more than half. Every row then gets the half; a row
    whose filters it leaves unresolved is selected again in full (:func:`_reselect_stage`)."""
    half = min(num_candidates, vocab) // 2
    if plan.k_max is None or half < TOP_LOGPROBS_MAX or native.kernels_alone():
        return False  # (the CPU kernel selects every candidate in the same pass)
    return plan.k_max <= half


def _reselect_stage(f: _Front, row: RowParams, run, num_candidates: int):
    """The full candidate selection and the filters again, if ``run``, for a row whose
    halved selection left its kept set unresolved (its filters need more than half the
    candidates, or a tie block reached the half's end): ``(ck, c)``, else the row's own."""
    vocab = f.z.shape[-1]

    def go():
        c0 = tf.init_candidates(f.z, num_candidates, total=False, block_max=f.zb)
        return _filter_candidates(c0, row, vocab, f.ck.total)

    return _maybe(run, go, lambda: (f.ck, f.c))


def _reselect_apply(f: _Front, ck: tf.Candidates, c: tf.Candidates) -> _Front:
    return f._replace(ck=ck, c=c, need_full=_unresolved(c, f.ok, f.greedy))


def _filter_candidates(c0: tf.Candidates, row: RowParams, vocab: int, total):
    """Steps 6-9 on a candidate set: ``(ck, c)``, the state after top_k (with the normalizer
    ``total``) and after every filter."""
    ck = tf.top_k(c0, row.top_k, vocab_size=vocab)._replace(total=total)
    return ck, tf.min_p(tf.top_a(tf.top_p(ck, row.top_p), row.top_a), row.min_p)


def _first_candidates_one(z: jax.Array, num_candidates: int, total):
    """:func:`jaxsample.transforms.first_candidates` (``half=False``) under
    ``BRANCHES = "one"``: the same bits, and on CPU the same kernel; its JAX form selects the
    candidates by :func:`_rank_candidates` where the rank form of top-k applies."""
    vocab = z.shape[-1]
    c = min(num_candidates, vocab)
    block = tf.CANDIDATE_BLOCK

    def xla(z, total):
        zb = tf.block_max(z)
        large = tf.LARGE_TOP_K == "count" and c >= tf.LARGE_K  # (its count form instead)
        if _rank_fits(c, vocab) and not large:
            values, ids = _rank_candidates(c, block)(z, zb)
        else:
            values, ids = tf.top_candidates(z, c, zb)
        nan = jnp.float32(jnp.nan)
        t = _maybe(total, lambda: tf.vocabulary_total(z, values[0]), lambda: nan)
        return zb, values, ids, t

    zb, values, ids, t = native.candidates(z, c, block, total, xla)
    return zb, tf._candidates(values, ids, t, vocab)


def _rank_fits(k: int, vocab: int) -> bool:
    """Whether the top ``k`` of a row of ``vocab`` is selected by :func:`_rank_candidates`
    (the rank form of top-k in use, and ``k`` blocks of candidates in half the row)."""
    return native.top_k_form() == "rank" and k * tf.CANDIDATE_BLOCK * 2 <= vocab


def _rank_candidates_rows(x: jax.Array, zb: jax.Array, k: int, block: int, keys: bool):
    """``lax.top_k(x, k)`` over rows ``x`` (``[R, V]``, no NaN and no -0.0, as ``z``) from
    their block maxima ``zb`` (``[R, ceil(V / block)]``), in two counting stages: the rank of
    each block maximum (larger value, or the same at a lower block), the ``k`` blocks of rank
    below ``k`` (in that order), then the rank of each of their elements by (value, id).
    The same set of blocks as :func:`jaxsample.transforms.top_candidates`, and since the
    second stage breaks ties by the token id rather than by place, those blocks need not be
    sorted first: three kernels fewer on a GPU (the sort's count and pick, and the order
    keys: without NaN and -0.0, comparing values orders as ``lax.top_k``'s keys do).
    ``keys`` compares ``lax.top_k``'s order keys instead, for rows that may hold NaN or -0.0
    (the raw logits)."""
    order = native._order_keys if keys else (lambda v: v)
    nb = zb.shape[-1]
    b = jnp.arange(nb, dtype=jnp.int32)
    za, zi = order(zb)[:, None, :], order(zb)[:, :, None]
    rank = jnp.sum(
        (za > zi) | ((za == zi) & (b[None, None, :] < b[None, :, None])), axis=-1, dtype=jnp.int32
    )
    chosen = native._pick_slots(rank, jnp.broadcast_to(b, zb.shape), k)  # [R, k]
    pad = nb * block - x.shape[-1]
    rows = jnp.pad(x, [(0, 0), (0, pad)], constant_values=-jnp.inf).reshape(-1, nb, block)
    g = jnp.take_along_axis(rows, chosen[:, :, None], axis=1).reshape(x.shape[0], -1)
    gid = (chosen[:, :, None] * block + jnp.arange(block, dtype=jnp.int32)[None, None, :]).reshape(
        g.shape
    )
    g = order(g)
    ga, gi = g[:, None, :], g[:, :, None]
    above = (ga > gi) | ((ga == gi) & (gid[:, None, :] < gid[:, :, None]))
    rank = jnp.sum(above, axis=-1, dtype=jnp.int32)
    values = native._pick_slots(rank, g, k)  # one-hot sums: exact (no -0.0 without keys)
    if keys:  # (the order key map is its own inverse)
        values = lax.bitcast_convert_type(native._order_keys(values), jnp.float32)
    return values, native._pick_slots(rank, gid, k)


@functools.cache
def _rank_candidates(k: int, block: int, keys: bool = False):
    """``tf.top_candidates(z, k, zb)`` for rows of ``z`` (no NaN, no -0.0; any row with
    ``keys``): by :func:`_rank_candidates_rows` where both stages' pairs over the batch's
    rows fit in ``native.RANK_LIMIT``, else :func:`jaxsample.transforms.top_candidates`
    (whose stages pick their own form). The per-row code does not know the batch: a
    ``custom_vmap`` (as ``native._by_rows``) decides on the batched input."""

    @jax.custom_batching.custom_vmap
    def fn(z, zb):
        lead = z.shape[:-1]
        rows = int(np.prod(lead, dtype=np.int64))
        x, xb = z.reshape(rows, z.shape[-1]), zb.reshape(rows, zb.shape[-1])
        pairs = max(zb.shape[-1], k * block) ** 2
        if rows * pairs <= native.RANK_LIMIT:
            values, ids = _rank_candidates_rows(x, xb, k, block, keys)
        else:
            values, ids = jax.vmap(lambda r, rb: tf.top_candidates(r, k, rb))(x, xb)
        values, ids = values.reshape(lead + (k,)), ids.reshape(lead + (k,))
        return lax.optimization_barrier((values, ids))  # as tf.top_candidates

    @fn.def_vmap
    def _rule(axis_size, in_batched, z, zb):
        if not all(in_batched):
            z, zb = (
                x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                for x, b in zip((z, zb), in_batched)
            )
        out = fn(z, zb)
        return out, (True, True)

    return fn


def _filter_candidates_one(c0: tf.Candidates, row: RowParams, vocab: int, total):
    """:func:`_filter_candidates` in fewer kernels on a GPU (``BRANCHES = "one"``), the same
    ``(ck, c)`` bit for bit.

    Each filter reads the state the one before it left: its count of kept candidates is a
    reduction over the candidates, and there, a reduction whose input depends on the last
    one's result, so XLA makes one kernel per filter (and two for top_p). Every filter's
    state is a prefix length ``n`` (0 to ``C``) or "every finite token" (``kept_all``), so
    each count is tabulated here for all ``C + 2`` states at once with the same arithmetic
    (mass ``cum[n - 1]`` or ``total``, limit ``n`` or ``C``): one multi-output reduction over
    ``[C + 2, C]``, after which the chain only picks entries. top_k's and top_p's counts of
    ``values >= values[f]`` are each a prefix of the descending values (no NaN: ``z`` has
    none), whose length ``ends[f]`` is the same table's, cut at the state's limit."""
    c = c0.values.shape[0]
    values, weights, cum = c0.values, c0.weights, c0.cum
    j = jnp.arange(c, dtype=jnp.int32)
    m = jnp.arange(c + 2, dtype=jnp.int32)
    every = m == c + 1  # the state "kept_all"; m <= c: the prefix of length m
    n_m = jnp.minimum(m, c)
    # tf.candidate_mass of each state: cum[max(m - 1, 0)], then total
    mass = jnp.concatenate([cum[:1], cum, jnp.reshape(total, (1,))])
    limit = jnp.where(every, c, n_m)
    inside = j[None, :] < limit[:, None]

    def count(keep):
        return jnp.sum(keep, axis=-1).astype(jnp.int32)

    first_p = count(cum[None, :] < (row.top_p * mass)[:, None])  # tf.top_p's ``first``
    prob, p_max = weights[None, :] / mass[:, None], (1.0 / mass)[:, None]  # tf._renormalized
    count_a = count((prob >= row.top_a * p_max * p_max) & inside)
    count_m = count((prob >= row.min_p * p_max) & inside)
    ends = count(values[None, :] >= values[jnp.minimum(m, c - 1)][:, None])
    k = row.top_k
    count_k = count((values >= values[jnp.clip(k, 1, c) - 1])[None, :] & inside)

    def cut(s: tf.Candidates, counted, active, found=True) -> tf.Candidates:  # tf._cut
        state = jnp.where(s.kept_all, c + 1, s.n)
        n = counted(state, jnp.where(s.kept_all, c, s.n))
        inside = ~s.kept_all | (found & (n < c))
        return s._replace(
            n=jnp.where(active, n, s.n),
            kept_all=s.kept_all & ~active,
            exact=s.exact & (inside | ~active),
        )

    ck = cut(c0, lambda m, _: count_k[m], (k > 0) & (k < vocab), k <= c)
    ck = ck._replace(total=total)
    first = first_p[jnp.where(ck.kept_all, c + 1, ck.n)]
    at = jnp.minimum(first, c - 1)
    s = cut(ck, lambda _, lim: jnp.minimum(ends[at], lim), row.top_p < 1.0, first < c)
    s = cut(s, lambda m, _: count_a[m], row.top_a > 0.0)
    return ck, cut(s, lambda m, _: count_m[m], row.min_p > 0.0)


def _tier2_needed(f: _Front, row: RowParams) -> jax.Array:
    """A row the first tier left unresolved that a filter may resolve on a larger tier."""
    return f.need_full & (_filters(row) | _k_cuts(row, f.z.shape[-1]))


def _tier2_stage(f: _Front, row: RowParams, run, size: int, words=None):
    """The filters retried on the ``size`` largest logits, if ``run`` (a plan flag), and with
    the row's key ``words`` the race over them: ``(Candidates, token)``."""
    vocab = f.z.shape[-1]
    size = max(1, min(size, vocab))

    def go():
        c0 = tf.init_candidates(f.z, size, total=False)
        _, c2 = _filter_candidates(c0, row, vocab, f.ck.total)
        if words is None:
            return c2, jnp.int32(0)
        return c2, _race_candidates(c2.ids, c2.values, c2.n, c2.values[0], words)

    def skip():
        zeros = jnp.zeros((size,), jnp.float32)
        false = jnp.bool_(False)
        ids = jnp.zeros((size,), jnp.int32)
        c2 = tf.Candidates(zeros, ids, zeros, zeros, zeros[0], jnp.int32(0), false, false)
        return c2, jnp.int32(0)

    return _maybe(run, go, skip)


def _tier2_apply(f: _Front, row: RowParams, c2: tf.Candidates, token2) -> _Front:
    """A row the second tier resolved no longer needs the full vocabulary."""
    resolved = _tier2_needed(f, row) & c2.exact & ~c2.kept_all
    return f._replace(c2=c2, in_tier2=resolved, need_full=f.need_full & ~resolved, token2=token2)


def _k_known(f: _Front) -> jax.Array:
    return f.ck.exact & ~f.ck.kept_all


def _full_needs(f: _Front, row: RowParams):
    """Which full-vocabulary filters the row runs: (top_k, top_p, top_a)."""
    vocab = f.z.shape[-1]
    run_k = f.need_full & ~_k_known(f) & _k_cuts(row, vocab)
    return run_k, f.need_full & (row.top_p < 1.0), f.need_full & (row.top_a > 0.0)


def _shift(f: _Front) -> jax.Array:
    top = f.c.values[0]  # the largest z
    return jnp.where(top == -jnp.inf, 0.0, top)


def _kept_mass(z, shift, z_min, w_min) -> jax.Array:
    """The unnormalized mass of the tokens a row keeps (one pass over the vocabulary)."""
    w = jnp.exp(z - shift)
    return tf.row_sum(jnp.where(tf.kept(z, w, z_min, w_min), w, 0.0))


def _known_thresholds(f: _Front, row: RowParams):
    """``(z_min, w_min)`` of a row that needs no full-vocabulary search: top_k's threshold
    from the candidates when they resolved it (else -inf), and min_p's weight."""
    k_value = f.ck.values[jnp.maximum(f.ck.n - 1, 0)]
    z_min = jnp.where(_k_known(f), k_value, -jnp.inf)
    return z_min, jnp.maximum(jnp.float32(0.0), row.min_p)  # min_p: w >= m


def _full_thresholds(f: _Front, row: RowParams, plan: Plan):
    """``(z_min, w_min)`` on the full vocabulary: each filter the row runs there
    (:func:`_full_needs`) by search, each only if the plan says some row needs it; the
    rest as :func:`_known_thresholds`. The weights ``exp(z - shift)`` are computed inside each
    filter's branch and never stored as a ``[V]`` array outside one."""
    vocab = f.z.shape[-1]
    run_k, run_p, run_a = _full_needs(f, row)
    shift = _shift(f)
    th = (_known_thresholds(f, row)[0], jnp.float32(0.0))

    def filtered(flag, fn, th):
        def go():
            s = fn(tf.FullRow(f.z, jnp.exp(f.z - shift), *th))
            return s.z_min, s.w_min

        return _maybe(flag, go, lambda: th)

    th = filtered(plan.full_k, lambda s: tf.top_k_full(s, row.top_k, run_k, vocab_size=vocab), th)
    th = filtered(plan.full_p, lambda s: tf.top_p_full(s, row.top_p, run_p), th)
    th = filtered(plan.full_a, lambda s: tf.top_a_full(s, jnp.where(run_a, row.top_a, 0)), th)
    return th[0], jnp.maximum(th[1], row.min_p)  # min_p: w >= m


def _full_stage(f: _Front, row: RowParams, plan: Plan, words=None):
    """The kept set's thresholds on the full vocabulary (if ``plan.full``,
    :func:`_full_thresholds`), its mass, and with the row's key ``words`` the race over it:
    ``(z_min, w_min, mass, token, certified)``. The mass is NaN when ``plan.mass`` is False
    (no row reports processed log probabilities).
    """

    def full_path():
        z_min, w_min = _full_thresholds(f, row, plan)
        shift = _shift(f)

        def mass():
            return _kept_mass(f.z, shift, z_min, w_min)

        m = _maybe(plan.mass, mass, lambda: jnp.float32(jnp.nan))
        if words is None:
            return z_min, w_min, m, jnp.int32(0), jnp.bool_(True)
        race = _race_full_fast(f.z, shift, z_min, w_min, f.c.ids, f.c.values, f.zb, words)
        return z_min, w_min, m, *race

    def skip():
        zero = jnp.float32(0.0)
        return jnp.float32(-jnp.inf), zero, jnp.float32(1.0), jnp.int32(0), jnp.bool_(True)

    return _maybe(plan.full, full_path, skip)


def _finish(f: _Front, full_out, words=None):
    """The :class:`Distribution` from whichever path resolved the kept set, and with the
    row's key ``words`` also the token (each race ran in the branch of its path)."""
    z_min, w_min, mass, token_full, _ = full_out
    c = f.c
    last = jnp.maximum(c.n - 1, 0)
    full, t2, c2 = f.need_full, f.in_tier2, f.c2
    last2 = jnp.maximum(c2.n - 1, 0)
    z_min = jnp.where(full, z_min, jnp.where(t2, c2.values[last2], c.values[last]))
    mass = jnp.where(full, mass, jnp.where(t2, c2.cum[last2], c.cum[last]))
    dist = Distribution(
        z=f.z,
        ids=c.ids,
        values=c.values,
        shift=jnp.where(f.ok, c.values[0], 0.0),
        z_min=z_min,
        w_min=jnp.where(full, w_min, 0.0),
        log_mass=jnp.log(jnp.where(f.ok, mass, 1.0)),
        n=jnp.where(f.greedy, 1, jnp.where(t2, c2.n, c.n)).astype(jnp.int32),
        in_candidates=~full & ~t2,
        ids2=c2.ids,
        values2=c2.values,
        in_tier2=t2,
        greedy=f.greedy,
        ok=f.ok,
    )
    if words is None:
        return dist
    token_c = _race_candidates(c.ids, c.values, c.n, dist.shift, words)
    return dist, _pick(dist, token_c, f.token2, token_full)


def distribution(
    logits: jax.Array,
    row: RowParams,
    hist: History | None,
    allowed: jax.Array | None,
    *,
    plan: Plan | None = None,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
    transforms=(),
) -> Distribution:
    """SPEC.md steps 1-9 for one row: the :class:`Distribution` that step 10 draws from.

    Args:
      logits: ``[V]`` model logits, any float dtype (computed in float32; NaN = removed).
      row: the row's :class:`RowParams` (0-d leaves, ``bias_*`` of shape ``[NB]``).
      hist: the row's :class:`History`, or None (no tokens yet).
      allowed: ``bool[V]`` hard constraint (True = allowed), or None.
      plan: the batch's :class:`Plan` (from :func:`sample_rows`); None computes everything,
        so a plain ``jax.vmap`` of this function is correct.
      num_candidates: static; how many largest logits the fast path uses.
      transforms: static chain of :class:`jaxsample.transforms.UserTransform`.

    Example::

        >>> from jaxsample import SamplingParams, pack_rows
        >>> rows = pack_rows([SamplingParams(top_k=2)], vocab_size=3, seeds=[0])
        >>> row = jax.tree.map(lambda x: jnp.asarray(x[0]), rows)
        >>> d = jax.jit(distribution)(jnp.log(jnp.array([0.5, 0.3, 0.2])), row,
        ...                  History.from_tokens([], [], 3), None)
        >>> np.round(np.exp(log_prob(d, jnp.arange(3))), 3).tolist()
        [0.625, 0.375, 0.0]
    """
    hist = _check_shapes(logits, row, hist, allowed, batched=False)
    _check_static(num_candidates, second_tier)
    plan = Plan.everything() if plan is None else plan
    chain = tf.check_chain(transforms)
    f = _front(logits, row, hist, allowed, plan, num_candidates, chain)
    halved = _halved(plan, num_candidates, logits.shape[-1])
    if halved is not False:
        rerun = halved & _tier2_needed(f, row)
        f = _reselect_apply(f, *_reselect_stage(f, row, rerun, num_candidates))
    tier2_on = plan.tier2 if second_tier > num_candidates else False
    c2, token2 = _tier2_stage(f, row, tier2_on, second_tier)
    f = _tier2_apply(f, row, c2, token2)
    return _finish(f, _full_stage(f, row, plan))


# --------------------------------------------------------------------------------------------
# Step 10: the draw, and log probabilities
# --------------------------------------------------------------------------------------------


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer mixer (xorshift-multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def race_noise(words: jax.Array, ids: jax.Array) -> jax.Array:
    """``f32[...]``: an Exp(1) variate per token id, a function of ``(words, id)`` alone.

    ``words: u32[2]`` (a key's data), ``ids: i32[...]``. A counter-based hash of the id and the
    key (two mixing rounds), read as a uniform with 32 bits (fine near 0, where the race is
    decided) and mapped by ``-log1p(-u)``. Evaluated on the candidates only or on the whole
    vocabulary, token ``t`` always gets the same value.
    """
    return -jnp.log1p(-race_uniform(words, ids))


def _race_hash(words: jax.Array, ids: jax.Array) -> jax.Array:
    """``u32[...]``: the hash of ``(key, id)`` (two mixing rounds, the key's words between)."""
    w = words.astype(jnp.uint32)
    x = ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + w[0]
    return _mix32(_mix32(x) ^ w[1])


def _hash_uniform(h: jax.Array) -> jax.Array:
    """The uniform in (0, 1] of a hash (an increasing map): ``(h + 0.5) / 2**32``."""
    return (h.astype(jnp.float32) + 0.5) * jnp.float32(2.0**-32)


def race_uniform(words: jax.Array, ids: jax.Array) -> jax.Array:
    """The uniform in (0, 1] behind :func:`race_noise`: ``(hash(key, id) + 0.5) / 2**32``."""
    return _hash_uniform(_race_hash(words, ids))


#: What a key argument may be.
KEY_ALLOWED = "one PRNG key (jax.random.key(seed)) or its uint32[2] data (jax.random.PRNGKey)"


def _one_key(key) -> jax.Array:
    """``key`` as an array if it is one PRNG key (typed, any implementation) or its ``u32[2]``
    data, else :class:`InvalidRequestError` naming what it is (a batch of keys, a float,
    ``u32[3]``...). Shapes and dtypes are static: checked on the host and when traced."""
    try:
        key = jnp.asarray(key)
    except Exception:  # None, 2**31, a lone surrogate, an object whose repr raises ...
        raise InvalidRequestError("key", key, KEY_ALLOWED) from None
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.shape != (() if typed else (2,)) or not (typed or key.dtype == jnp.uint32):
        raise InvalidRequestError("key", f"<{key.dtype} array of shape {key.shape}>", KEY_ALLOWED)
    return key


#: The race's words for a key whose words are both zero (``jax.random.key(0)``,
#: ``PRNGKey(0)``): the hash's mixer fixes 0, so with zero words token 0 would get the
#: smallest uniform of all (about 1e-10) and win every draw it is kept in. Any other words
#: serve; these are the golden ratio's and sqrt(2)'s first 32 fraction bits.
ZERO_KEY_WORDS = (0x9E3779B9, 0x6A09E667)


def _key_words(key: jax.Array) -> jax.Array:
    """``u32[2]``: the race's words of one key (:func:`_one_key`). A threefry2x32 key
    (``jax.random.key``, the default) gives its own two words; a key of another
    implementation (more words) gives two words drawn from it (``jax.random.bits``), so
    every word of it counts. Two zero words become :data:`ZERO_KEY_WORDS`."""
    key = _one_key(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
        key = data if data.shape == (2,) else jax.random.bits(key, (2,), jnp.uint32)
    zero = (key[0] == 0) & (key[1] == 0)  # (jnp.all is a reduction: one kernel more on a GPU)
    return jnp.where(zero, jnp.array(ZERO_KEY_WORDS, jnp.uint32), key)


def _winner(score: jax.Array, ids: jax.Array) -> jax.Array:
    """The id with the largest score; ties: the lowest id (two plain reductions)."""
    best = jnp.max(score)
    return jnp.min(jnp.where(score == best, ids, np.iinfo(np.int32).max)).astype(jnp.int32)


def _race_full(z, w, kept, words: jax.Array, argmax: bool = False) -> jax.Array:
    """The race over the whole vocabulary: the largest ``w / E`` over the kept tokens
    (``w = exp(z - shift)``; ties: the lowest id). Exact, and costs a ``log1p`` per token.
    ``argmax``: the first largest score (the lowest id's) in one reduction of (score, id)
    pairs, the same token: fewer kernels on a GPU, 1.3x slower than two plain reductions on
    a CPU ([64, 49152])."""
    ids = jnp.arange(z.shape[-1], dtype=jnp.int32)
    score = jnp.where(kept, w / race_noise(words, ids), -1.0)
    return jnp.argmax(score).astype(jnp.int32) if argmax else _winner(score, ids)


#: The fast full-vocabulary race scores the tokens of this many blocks (of 32) exactly, besides
#: the candidates.
RACE_BLOCKS = 16


def _block_min_hash(words: jax.Array, vocab: int) -> jax.Array:
    """``f32[ceil(V / 32)]``: the smallest race uniform of each block of 32 token ids (ids
    past the vocabulary included: a smaller minimum only loosens the bound). Integer work
    only: the minimum is taken over the hashes, then converted (the map is increasing)."""
    block = tf.CANDIDATE_BLOCK
    n = -(-vocab // block)
    ids = jnp.arange(n * block, dtype=jnp.uint32).reshape(n, block)
    return _hash_uniform(jnp.min(_race_hash(words, ids), axis=1))


def _race_full_fast(
    z, shift, z_min, w_min, cand_ids, cand_values, zb, words: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The race over the whole vocabulary without a transcendental per token:
    ``(token, certified)``.

    The candidates (the ``C`` largest ``z``, ``cand_ids``/``cand_values``) are scored
    exactly. Every other token of block ``b`` (32 ids) has ``z <= min(zb[b], z_C)`` (``zb``:
    the block maxima of ``z``; ``z_C``: the smallest candidate) and a uniform at least the
    block's smallest, and ``E = -log1p(-u) >= u``, so ``exp(min(zb[b], z_C) - shift) /
    u_min[b]`` bounds its score from above; the only pass over the vocabulary hashes the ids
    (integers, no ``exp``). The ``RACE_BLOCKS`` blocks with the largest bounds are scored
    exactly too; when the next bound is below the best exact score (with a margin for
    rounding), no other token can win and the token is the exact race's (``certified``).
    The candidates hold most of the mass, so the bounds left are small and certification
    rarely fails (measured in tests/test_distribution.py); the caller then runs
    :func:`_race_full`.
    """
    vocab = z.shape[-1]
    block = tf.CANDIDATE_BLOCK

    def score(ids):
        zi = jnp.where(ids < vocab, z[jnp.minimum(ids, vocab - 1)], -jnp.inf)
        w = jnp.exp(zi - shift)
        return jnp.where(tf.kept(zi, w, z_min, w_min), w / race_noise(words, ids), -1.0)

    cap = jnp.minimum(zb, cand_values[-1])
    bound = jnp.where(
        (cap >= z_min) & (cap > -jnp.inf),
        jnp.exp(cap - shift) / _block_min_hash(words, vocab),
        -1.0,
    )
    m = min(RACE_BLOCKS, bound.shape[0])
    if m < bound.shape[0]:
        top, chosen = native.top_k(bound, m + 1)
        # (a barrier per output keeps XLA from rewriting this top_k into a full sort on CPU)
        top, chosen = lax.optimization_barrier(top), lax.optimization_barrier(chosen)[:m]
    else:
        top, chosen = None, jnp.arange(m)
    ids = jnp.concatenate(
        [cand_ids, (chosen[:, None] * block + jnp.arange(block)[None, :]).reshape(-1)]
    ).astype(jnp.int32)
    scores = score(ids)
    best = jnp.max(scores)
    certified = jnp.bool_(True) if top is None else top[m] < best * jnp.float32(1.0 - 2.0**-20)
    return _winner(scores, ids), certified


def _race_dist_exact(d: Distribution, words: jax.Array, argmax: bool = False) -> jax.Array:
    w = jnp.exp(d.z - d.shift)
    return _race_full(d.z, w, tf.kept(d.z, w, d.z_min, d.w_min), words, argmax)


def _race_dist(d: Distribution, words: jax.Array) -> jax.Array:
    """The full-vocabulary race for a distribution: the fast one, exact when uncertified."""
    zb = tf.block_max(d.z)
    token, certified = _race_full_fast(d.z, d.shift, d.z_min, d.w_min, d.ids, d.values, zb, words)
    return jnp.where(certified, token, _race_dist_exact(d, words))


def _race_candidates(ids, values, n, shift, words: jax.Array) -> jax.Array:
    """The same race over the first ``n`` candidates (ties: the lowest id)."""
    w = jnp.exp(values - shift)
    return _winner(jnp.where(jnp.arange(ids.shape[0]) < n, w / race_noise(words, ids), -1.0), ids)


def draw(dist: Distribution, key: jax.Array, *, plan: Plan | None = None) -> jax.Array:
    """Step 10: one token from ``dist`` with ``key`` (a PRNG key or its ``u32[2]`` data).

    An exponential race: every kept token ``t`` gets ``E_t ~ Exp(1)`` from
    :func:`race_noise` ``(key, t)`` and the token with the largest ``w_t / E_t`` wins
    (``w_t = exp(z_t - shift)``), which picks ``t`` with probability ``w_t / sum(w)``
    exactly. Since ``E_t`` depends on the key and ``t`` alone, the token is a function of the
    key and the distribution only: the candidates (when they hold the kept set) and the whole
    vocabulary give the same token. ``-1`` when ``not dist.ok``; ``ids[0]`` when greedy.
    ``plan.full`` False skips the full-vocabulary race (no row needs it).

    Example::

        >>> h = History.from_tokens([], [], 4)
        >>> d = jax.jit(distribution)(jnp.zeros(4), _neutral_row(4), h, None)
        >>> int(jax.jit(draw)(d, jax.random.key(0))) in range(4)
        True
    """
    _check_dist(dist)
    plan = Plan.everything() if plan is None else plan
    words = _key_words(key)
    d = dist
    tok_c = _race_candidates(d.ids, d.values, d.n, d.shift, words)
    tok_2 = _maybe(
        plan.tier2,
        lambda: _race_candidates(d.ids2, d.values2, d.n, d.shift, words),
        lambda: jnp.int32(0),
    )
    tok_f = _maybe(plan.full, lambda: _race_dist(d, words), lambda: jnp.int32(0))
    return _pick(d, tok_c, tok_2, tok_f)


def _pick(d: Distribution, tok_c, tok_2, tok_f) -> jax.Array:
    """The token of the path that holds the kept set (greedy: ids[0]; none: -1)."""
    token = jnp.where(d.in_candidates, tok_c, jnp.where(d.in_tier2, tok_2, tok_f))
    token = jnp.where(d.greedy, d.ids[0], token)
    return jnp.where(d.ok, token, -1)


def _check_dist(dist) -> None:
    if not isinstance(dist, Distribution):  # an AttributeError ('... has no attribute z')
        raise InvalidRequestError(
            "dist", f"<{type(dist).__name__}>", "a Distribution (jaxsample.distribution(...))"
        )


_IDS_ALLOWED = "integer token ids (int32: ids outside [0, V) give -inf)"


def _ids(ids) -> jax.Array:
    """``ids`` as an integer array, else :class:`InvalidRequestError`: a float id (1.5 failed
    inside JAX as an indexer), a bool (read as 0 or 1) or an int that int32 cannot hold."""
    try:
        arr = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    except Exception:  # whatever numpy cannot read as an array
        raise InvalidRequestError("ids", ids, _IDS_ALLOWED) from None
    if arr.dtype == np.bool_ or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise InvalidRequestError("ids", f"<{arr.dtype} array>", _IDS_ALLOWED)
    if isinstance(arr, np.ndarray) and arr.size:
        info = np.iinfo(np.int32)
        low, high = arr.min(), arr.max()
        if low < info.min or high > info.max:  # JAX would wrap or refuse it
            raise InvalidRequestError(
                "ids", int(low if low < info.min else high), _IDS_ALLOWED, reason="not int32"
            )
    return jnp.asarray(arr)


def log_prob(dist: Distribution, ids: jax.Array) -> jax.Array:
    """``f32[...]``: log probabilities of tokens ``ids`` (any shape) under ``dist``.

    ``-inf`` for removed tokens and for ids outside ``[0, V)``; a greedy row gives 0 for its
    argmax; a row with no allowed token gives ``-inf`` everywhere.
    """
    _check_dist(dist)
    ids = _ids(ids)
    vocab = dist.z.shape[-1]
    inside = (ids >= 0) & (ids < vocab)
    values = jnp.where(inside, dist.z[jnp.clip(ids, 0, vocab - 1)], -jnp.inf)
    w = jnp.exp(values - dist.shift)
    sampled = jnp.where(
        tf.kept(values, w, dist.z_min, dist.w_min), values - dist.shift - dist.log_mass, -jnp.inf
    )
    greedy = jnp.where(ids == dist.ids[0], 0.0, -jnp.inf)
    return jnp.where(dist.ok & inside, jnp.where(dist.greedy, greedy, sampled), -jnp.inf)


def top_logprobs(dist: Distribution, n: int = TOP_LOGPROBS_MAX) -> tuple[jax.Array, jax.Array]:
    """``(i32[n], f32[n])``: the ``n`` (static) most likely tokens and their log probabilities.

    Descending, ties by lower id; past the kept set the log probability is ``-inf`` (those ids
    are the next candidates). The distribution holds its ``num_candidates`` most likely
    tokens in order (128 by default): past them the ids are -1 and the log probabilities
    ``-inf``, whether or not those tokens are kept (a larger ``num_candidates`` holds more).
    """
    _check_dist(dist)
    held = dist.ids.shape[-1]
    n = _integer("n", n, 0, 2**31 - 1, "an integer in [0, 2**31 - 1] (static)")
    k = min(n, held)
    ids = dist.ids[:k]
    lp = log_prob(dist, ids)
    return (
        jnp.pad(ids, (0, n - k), constant_values=-1),
        jnp.pad(lp, (0, n - k), constant_values=-jnp.inf),
    )


_POSITION_ALLOWED = "an integer (the output position): a Python int or an integer array"


def _position(position) -> jax.Array:
    """``position`` as an integer array; a float, a bool or a string is refused (checked
    when traced: dtypes are static), not truncated."""
    try:
        arr = jnp.asarray(position)
    except TypeError:
        raise InvalidRequestError("position", position, _POSITION_ALLOWED) from None
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise InvalidRequestError("position", f"<{arr.dtype} array>", _POSITION_ALLOWED)
    return arr


def row_key(row: RowParams, position) -> jax.Array:
    """The row's key at output position ``i``: ``fold_in(key(seed), i)``."""
    key = jax.random.wrap_key_data(row.seed_words.astype(jnp.uint32), impl="threefry2x32")
    return jax.random.fold_in(key, _position(position))


def _neutral_row(vocab: int) -> RowParams:
    """A row with every parameter neutral (doctest helper)."""
    from jaxsample.params import SamplingParams, pack_rows

    rows = pack_rows([SamplingParams()], vocab_size=vocab, seeds=[0])
    return jax.tree.map(lambda x: jnp.asarray(x[0]), rows)


# --------------------------------------------------------------------------------------------
# One row: the draw and its report
# --------------------------------------------------------------------------------------------


def _no_top():
    return (
        jnp.full((TOP_LOGPROBS_MAX,), -1, jnp.int32),
        jnp.full((TOP_LOGPROBS_MAX,), -jnp.inf, jnp.float32),
    )


def _raw_row(logits, k: int, with_top: bool, exact: bool, rank: bool = False):
    """One row's raw ``log_softmax`` normalizer and top ``k``, the JAX form of
    :func:`jaxsample.native.log_total_top_k`: ``(log_total, values[k], ids[k])`` (without
    ``with_top``, the max in every value and -1 for the ids: the top k is not computed).

    ``exact`` False is the fast form: it reads the logits as they are, with no masking
    inside the passes (XLA's CPU reductions fuse arithmetic but store any ``select`` they
    read as a whole ``[V]`` array first). It equals the exact form bit for bit whenever
    every logit is finite, and its ``log_total`` is not finite otherwise (NaN and ``inf``
    reach the sum; a row of -inf only gives -inf), which is how :func:`_raw_xla` knows to
    run the exact form. ``rank`` (``BRANCHES = "one"``) selects the top k by
    :func:`_rank_candidates` where the rank form of top-k applies (the same bits).
    """
    x = tf.sanitize(logits) if exact else logits
    # one pass: the max for the normalizer and the top-k's stage 1 (the barrier keeps XLA
    # from turning the max of the block maxima back into a second pass over the row)
    block_max = lax.optimization_barrier(tf.block_max(x))
    top = jnp.max(block_max)
    log_total = jnp.log(tf.vocabulary_total(x, top))
    if not with_top:
        return log_total, jnp.full((k,), top, jnp.float32), jnp.full((k,), -1, jnp.int32)
    if rank and _rank_fits(k, x.shape[-1]):
        values, ids = _rank_candidates(k, tf.CANDIDATE_BLOCK, True)(x, block_max)
    else:
        values, ids = tf.top_candidates(x, k, block_max)
    return log_total, values, ids


def _raw_xla(logits, k: int, with_top: bool):
    """:func:`_raw_row` over a batch: the fast form, and the exact form only when some row's
    logits are not all finite (a batch-level branch)."""
    fast = jax.vmap(partial(_raw_row, k=k, with_top=with_top, exact=False))(logits)
    exact = partial(jax.vmap(partial(_raw_row, k=k, with_top=with_top, exact=True)), logits)
    return _maybe(jnp.all(jnp.isfinite(fast[0])), lambda: fast, exact)


def _raw_batch(
    logits: jax.Array, raw, exact_only: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The raw ``log_softmax`` normalizer of each row and its top 20 as the plan's ``raw``
    asks (0 none, 1 the normalizer, 2 also the top 20): ``((top, log_total), ids[20],
    log_probs[20])`` (``log_softmax(x) = (x - top) - log_total``: exact whatever the size of
    ``top``), from :func:`jaxsample.native.log_total_top_k` (one kernel on CPU; :func:`_raw_xla`
    elsewhere, or with ``exact_only`` the exact form alone: where the masking fuses into
    the passes, as on a GPU, it costs nothing and saves a branch)."""
    batch, vocab = logits.shape
    logits = logits.astype(jnp.float32)

    def none():
        ids, lps = _no_top()
        nan = jnp.full((batch,), jnp.nan, jnp.float32)
        return (
            (nan, nan),
            jnp.broadcast_to(ids, (batch, ids.shape[0])),
            jnp.broadcast_to(lps, (batch, lps.shape[0])),
        )

    def some(with_top: bool):
        k = min(TOP_LOGPROBS_MAX, vocab) if with_top else 1
        xla = partial(_raw_xla, k=k, with_top=with_top)
        if exact_only:
            xla = jax.vmap(partial(_raw_row, k=k, with_top=with_top, exact=True, rank=True))
        log_total, values, ids = native.log_total_top_k(logits, k, otherwise=xla)
        norm = (values[:, 0], log_total)  # values[:, 0]: the row's max, in both forms
        if not with_top:
            return (norm, *none()[1:])
        lp = jnp.where(values > -jnp.inf, (values - values[:, :1]) - log_total[:, None], -jnp.inf)
        pad = [(0, 0), (0, TOP_LOGPROBS_MAX - k)]
        return (
            norm,
            jnp.pad(ids, pad, constant_values=-1),
            jnp.pad(lp, pad, constant_values=-jnp.inf),
        )

    branches = [none, partial(some, False), partial(some, True)]
    if isinstance(raw, int):
        return branches[raw]()
    return lax.switch(raw, branches)


def raw_logprob(logit, normalizer):
    """A token's raw log probability from its logit and its row's ``(top, log_total)`` (the
    first part of :func:`_raw_batch`'s result): the one formula of the generated tokens'
    reports and of the prompt scores (:mod:`jaxsample.scoring`)."""
    top, log_total = normalizer
    return (tf.sanitize(logit) - top) - log_total


def _report(logits, row: RowParams, dist: Distribution, token, raw_stats) -> SampleOut:
    """The token's log probability and the top 20 (raw or processed), as the row asked;
    ``raw_stats`` is the row's part of :func:`_raw_batch`."""
    safe = jnp.maximum(token, 0)
    proc_lp = log_prob(dist, safe)
    cand_ids, cand_lp = top_logprobs(dist, TOP_LOGPROBS_MAX)
    normalizer, raw_ids, raw_lps = raw_stats
    raw_lp = raw_logprob(logits[safe], normalizer)
    logprob = jnp.where(dist.ok, jnp.where(row.processed_logprobs, proc_lp, raw_lp), -jnp.inf)
    # a row that asked for no top_logprobs gets none, whatever the rest of the batch asked
    none_ids, none_lps = _no_top()
    wants_top = row.logprobs & (row.top_logprobs > 0)
    use_proc = row.processed_logprobs
    return SampleOut(
        token=token,
        logprob=jnp.where(row.logprobs, logprob, jnp.nan),
        top_ids=jnp.where(wants_top, jnp.where(use_proc, cand_ids, raw_ids), none_ids),
        top_logprobs=jnp.where(wants_top, jnp.where(use_proc, cand_lp, raw_lps), none_lps),
        ok=dist.ok,
    )


def sample_row(
    logits: jax.Array,
    row: RowParams,
    hist: History | None,
    allowed: jax.Array | None,
    position: jax.Array,
    *,
    plan: Plan | None = None,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
    transforms=(),
) -> SampleOut:
    """Draws one token for one row (SPEC.md steps 1-10) and reports log probabilities.

    The composition ``draw(distribution(...), fold_in(key(seed), position))`` plus the log
    probabilities the row asked for. Arguments as in :func:`distribution`; ``position`` is
    the output position ``i``. A plain ``jax.vmap`` of this function gives the same numbers
    as :func:`sample_rows` (which decides a :class:`Plan` once per batch to skip work).

    Returns:
      :class:`SampleOut`. Greedy rows (temperature < 1e-5) take the argmax of the processed
      logits (ties: lowest id). ``logprob``/``top_logprobs`` are ``log_softmax(logits)`` (raw,
      default) or the processed distribution (``row.processed_logprobs``); a row with
      ``row.logprobs`` False gets ``logprob = NaN`` and no top entries (ids -1). ``ok`` is
      False and ``token = -1`` when no token is allowed.

    Example::

        >>> from jaxsample import SamplingParams, pack_rows
        >>> rows = pack_rows([SamplingParams(temperature=0.0)], vocab_size=3, seeds=[0])
        >>> row = jax.tree.map(lambda x: jnp.asarray(x[0]), rows)
        >>> hist = History.from_tokens([], [], vocab_size=3)
        >>> int(jax.jit(sample_row)(jnp.array([0.0, 5.0, 1.0]), row, hist, None, 0).token)
        1
    """
    plan = Plan.everything() if plan is None else plan
    dist = distribution(
        logits,
        row,
        hist,
        allowed,
        plan=plan,
        num_candidates=num_candidates,
        second_tier=second_tier,
        transforms=transforms,
    )
    token = draw(dist, row_key(row, position), plan=plan)
    raw = _raw_batch(logits[None], plan.raw)
    return _report(logits, row, dist, token, jax.tree.map(lambda x: x[0], raw))


def processed_logprobs_row(
    logits: jax.Array,
    row: RowParams,
    hist: History | None,
    allowed: jax.Array | None,
    *,
    plan: Plan | None = None,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
    transforms=(),
) -> jax.Array:
    """``f32[V]``: log probabilities of exactly the distribution :func:`sample_row` draws from.

    ``log_prob(distribution(...), arange(V))``: removed tokens are ``-inf``; a greedy row is
    the point mass on its argmax (0 there); a row with no allowed token is all ``-inf``.
    """
    d = distribution(
        logits,
        row,
        hist,
        allowed,
        plan=plan,
        num_candidates=num_candidates,
        second_tier=second_tier,
        transforms=transforms,
    )
    return log_prob(d, jnp.arange(d.z.shape[0]))


# --------------------------------------------------------------------------------------------
# Batched versions: the plan decided once per step
# --------------------------------------------------------------------------------------------


def _check_shapes(logits, row: RowParams, hist: History | None, allowed, *, batched: bool):
    """Static shape checks of the sampler's arrays (``[V]`` per row; ``batched``: ``[B, V]``),
    each refusal an :class:`InvalidRequestError` naming the argument, not an error from
    inside JAX. Returns ``hist``, or for ``None`` an empty history (no tokens yet)."""
    want = "[B, V]" if batched else "[V] (one row; the batched functions take [B, V])"
    ndim = 2 if batched else 1
    if not isinstance(logits, (np.ndarray, jax.Array)):  # a list failed on logits.shape inside
        raise InvalidRequestError(
            "logits", logits, f"a numpy or jax array of shape {want}", reason="not an array"
        )
    dtype = _dtype_of("logits", logits)
    shape = _shape_of("logits", logits)
    if len(shape) != ndim or 0 in shape:
        raise InvalidRequestError(
            "logits", f"<array of shape {shape}>", f"an array of shape {want}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):  # complex lost its imaginary part, bool was 0/1
        raise InvalidRequestError(
            "logits", f"<{dtype} array>", "a floating-point array (float32, bfloat16, ...)"
        )
    name = "rows" if batched else "row"
    if not isinstance(row, RowParams):
        raise InvalidRequestError(
            name, f"<{type(row).__name__}>", "a RowParams (jaxsample.pack_rows(...))"
        )
    lead = tuple(jnp.shape(row.temperature))
    if lead != shape[:-1]:
        raise InvalidRequestError(
            name,
            f"<RowParams of batch shape {lead}>",
            f"RowParams of batch shape {shape[:-1]}, as the logits"
            + (
                ""
                if batched
                else " (one row: jax.tree.map(lambda x: x[b], rows), or the batched"
                " sample_rows / distributions for all rows)"
            ),
        )
    if hist is None:  # no history: nothing drawn or prompted yet
        hist = History(counts=jnp.zeros(shape, jnp.int32), in_prompt=jnp.zeros(shape, jnp.bool_))
    if not isinstance(hist, History):
        raise InvalidRequestError(
            "hist", f"<{type(hist).__name__}>", "a History (History.from_tokens), or None"
        )
    for name, arr, kind in (
        ("hist.counts", hist.counts, jnp.integer),
        ("hist.in_prompt", hist.in_prompt, jnp.bool_),
    ):
        if _shape_of(name, arr) != shape:
            raise InvalidRequestError(
                name,
                f"<array of shape {_shape_of(name, arr)}>",
                f"the logits' shape {shape} (History.from_tokens(..., vocab_size=V))",
            )
        got = _dtype_of(name, arr)
        if not jnp.issubdtype(got, kind):  # float counts, or a float in_prompt failed inside
            want_dtype = "an integer" if kind is jnp.integer else "a bool"
            raise InvalidRequestError(
                name, f"<{got} array>", f"{want_dtype} array (History.from_tokens(...))"
            )
    if allowed is not None:
        got = _dtype_of("allowed", allowed)
        got_shape = _shape_of("allowed", allowed)
        if got_shape != shape or got != jnp.bool_:
            # a float mask failed inside JAX; an int mask was read bitwise (~2 is -3: True)
            raise InvalidRequestError(
                "allowed",
                f"<{got} array of shape {got_shape}>",
                f"None or a bool array of the logits' shape {shape}",
            )
    return hist


def _shape_of(name: str, x) -> tuple:
    """The shape of an array argument (a tracer, an array, or a list numpy reads), else an
    :class:`InvalidRequestError` naming it."""
    if hasattr(x, "shape") and not isinstance(x, (str, bytes)):
        return tuple(x.shape)
    try:
        return tuple(np.shape(x))
    except Exception:  # a ragged list
        raise InvalidRequestError(name, x, "an array") from None


def _dtype_of(name: str, x) -> np.dtype:
    """The dtype of an array argument (a tracer, an array, or a list numpy reads), else an
    :class:`InvalidRequestError` naming it."""
    if hasattr(x, "dtype") and not isinstance(x, (str, bytes)):
        return x.dtype
    try:
        return np.asarray(x).dtype
    except Exception:  # whatever numpy cannot read as an array
        raise InvalidRequestError(name, x, "an array") from None


def _check_static(num_candidates, second_tier) -> None:
    """The sampler's static sizes: ``num_candidates`` an integer >= 1, ``second_tier`` an
    integer >= 0 (0 candidates failed with an IndexError inside, a float inside a shape)."""
    _integer("num_candidates", num_candidates, 1, 2**31 - 1, "an integer in [1, 2**31 - 1]")
    _integer("second_tier", second_tier, 0, 2**31 - 1, "an integer in [0, 2**31 - 1]")


def _rows_axes(allowed):
    return None if allowed is None else 0


def distributions(
    logits: jax.Array,
    rows: RowParams,
    hist: History | None,
    allowed: jax.Array | None,
    *,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
    transforms=(),
    keys: jax.Array | None = None,
    for_sampling: bool = False,
    then=None,
):
    """:func:`distribution` over a batch (leading axis ``B``) and the batch's :class:`Plan`.

    The plan is decided here, outside the per-row code: the parameter-only part first, then,
    after the first candidates, whether any row retries on the second tier, then whether any
    row needs the full vocabulary and which of its filters. Returns ``(dist, plan)``; with
    ``keys`` (``[B]`` PRNG keys) ``(dist, plan, tokens)``, each race run inside the branch that
    computed its kept set (the same tokens as ``vmap(draw)``, with fewer branches).
    ``for_sampling`` (what :func:`sample_rows` passes) computes a full-vocabulary row's kept
    mass only when some row reports processed log probabilities (else its ``log_mass`` is
    NaN); by default every field of every distribution is complete. Under
    ``BRANCHES = "one"`` the stages after the first candidates are :func:`_rest_one`'s.
    ``then`` (a function of ``(dist, plan, tokens)``; tokens None without ``keys``) returns
    its result instead: under ``"one"`` it runs inside the last branch, which is how
    :func:`sample_rows` puts its reports there.
    """
    hist = _check_shapes(logits, rows, hist, allowed, batched=True)
    _check_static(num_candidates, second_tier)
    words = None if keys is None else jax.vmap(_key_words)(keys)
    chain = tf.check_chain(transforms)
    vocab = logits.shape[-1]
    mode = _branches()
    few = mode != "many"
    plan = plan_rows(rows, vocab_size=vocab, for_sampling=for_sampling)
    if few:
        # ("one" keeps the kept mass's flag: sample_rows adds the mass in a branch of its
        # own, _with_kept_mass, taken when some row reports processed log probabilities)
        plan = _fewer(plan).replace(mass=plan.mass if mode == "one" else True)
    front = partial(_front, plan=plan, num_candidates=num_candidates, chain=chain)
    f = jax.vmap(lambda lg, r, h, a: front(lg, r, h, a), in_axes=(0, 0, 0, _rows_axes(allowed)))(
        logits, rows, hist, allowed
    )
    if mode == "one":
        return _rest_one(f, rows, plan, words, num_candidates, second_tier, then)
    # the full selection again, on the few rows the halved one left unresolved
    halved = _halved(plan, num_candidates, vocab)
    if halved is not False:

        def reselect(args, active):
            fs, rs = args
            return jax.vmap(lambda f, r: _reselect_stage(f, r, active, num_candidates))(fs, rs)

        need1 = jax.vmap(_tier2_needed)(f, rows) & halved
        f = jax.vmap(_reselect_apply)(f, *_compacted(need1, reselect, (f, rows), halves=True))
    # the second tier, on the few rows that need it (or on all when many do)
    need2 = jax.vmap(_tier2_needed)(f, rows)
    tier2_on = second_tier > num_candidates

    def tier2(args, active):
        fs, rs, ws = args
        return jax.vmap(lambda f, r, w: _tier2_stage(f, r, active, second_tier, w))(fs, rs, ws)

    c2, token2 = _compacted(need2 & tier2_on, tier2, (f, rows, words), few=few)
    f = jax.vmap(_tier2_apply)(f, rows, c2, token2)

    # the full vocabulary, likewise; which filters it runs is decided over those rows
    def full(args, active):
        fs, rs, ws = args
        run_k, run_p, run_a = jax.vmap(_full_needs)(fs, rs)

        def flag(x):
            return (True if few else jnp.any(x)) if active else False

        sub = plan.replace(full=active, full_k=flag(run_k), full_p=flag(run_p), full_a=flag(run_a))
        return jax.vmap(lambda f, r, w: _full_stage(f, r, sub, w))(fs, rs, ws)

    full_out = _compacted(f.need_full, full, (f, rows, words), few=few)
    plan = plan.replace(tier2=jnp.any(need2) & tier2_on, full=jnp.any(f.need_full))
    if words is None:
        out = jax.vmap(_finish)(f, full_out), plan
        return out if then is None else then(*out, None)
    dist, tokens = jax.vmap(_finish)(f, full_out, words)

    # the exact full-vocabulary race, for the rare row whose fast race is not certified
    def exact(args, active):
        ds, ws = args
        return jax.vmap(lambda d, w: _race_dist_exact(d, w) if active else jnp.int32(0))(ds, ws)

    uncertified = f.need_full & ~full_out[4]
    tokens = jnp.where(uncertified, _compacted(uncertified, exact, (dist, words), few=few), tokens)
    return (dist, plan, tokens) if then is None else then(dist, plan, tokens)


def _rest_one(
    f: _Front, rows: RowParams, plan: Plan, words, num_candidates: int, second_tier: int, then
):
    """:func:`distributions` after the first candidates under ``BRANCHES = "one"``.

    Everything is computed first as if no row retried on the second tier; then one
    batch-level branch, taken when some row does, computes it all again with that tier on
    every row and (a branch inside it) the full-vocabulary searches on every row when
    some row still needs one. The branch comes last, with ``then`` (the caller's remaining
    work, such as the reports) inside it, so the host, which reads its predicate, waits
    only when the device has nothing left to do. With ``then``, that branch is one
    ``lax.switch`` whose other sides are the common stages for each static value of the
    plan's ``raw`` and ``mass`` (what :func:`sample_rows`'s reports branch on), so the common
    path has one batch-level branch: one point where the host waits, and no values copied
    into a branch's outputs. A row the candidates leave unresolved
    only because nothing cut its kept set (plain sampling, min_p) needs no search: its
    thresholds are known (:func:`_known_thresholds`). The kept mass of the rows on the full
    vocabulary is computed here when ``plan.mass`` is a Python True, else left NaN for
    :func:`_with_kept_mass`. Every row's token comes from the race over the whole
    vocabulary (:func:`_race_dist_exact`: one fused pass), which equals the race over its
    candidates or its tier whenever they hold the kept set. The plan returned says
    ``full`` for any row the candidates left unresolved (a superset: :func:`draw` then
    runs the full race, which is right for every row).
    """
    tier2_on = second_tier > num_candidates
    need2 = jax.vmap(_tier2_needed)(f, rows)
    plan = plan.replace(tier2=jnp.any(need2) & tier2_on, full=jnp.any(f.need_full))

    def stages(rare: bool, plan: Plan = plan):
        # What a side can compute from the parameters, it computes itself: an array
        # computed before the switch and read inside is an operand of the switch, which XLA
        # must store first (one kernel each on a GPU), where the switch's index alone fuses
        # into the kernel that computes it. So: the greedy flags, and on the rare side the
        # plan's raw and mass needs (plan_rows's, from the same parameters).
        f_ = f._replace(greedy=tf.is_greedy(rows.temperature))
        if not isinstance(plan.raw, int):
            plan = plan.replace(raw=_raw_needed(rows))
        if not isinstance(plan.mass, (bool, np.bool_)):
            plan = plan.replace(mass=_mass_needed(rows))
        stage = jax.vmap(lambda f, r: _tier2_stage(f, r, rare and tier2_on, second_tier))
        g = jax.vmap(_tier2_apply)(f_, rows, *stage(f_, rows))
        if rare:
            search = jnp.any(jnp.stack(jax.vmap(_full_needs)(g, rows)))
            z_min, w_min = lax.cond(
                search,
                lambda: jax.vmap(lambda f, r: _full_thresholds(f, r, plan))(g, rows),
                lambda: jax.vmap(_known_thresholds)(g, rows),
            )
        else:
            z_min, w_min = jax.vmap(_known_thresholds)(g, rows)
        if plan.mass is True:
            mass = jax.vmap(_kept_mass)(g.z, jax.vmap(_shift)(g), z_min, w_min)
        else:
            mass = jnp.full(z_min.shape, jnp.nan, jnp.float32)
        nothing = (jnp.zeros(z_min.shape, jnp.int32), jnp.ones(z_min.shape, jnp.bool_))
        dist = jax.vmap(_finish)(g, (z_min, w_min, mass, *nothing))
        tokens = None
        if words is not None:

            def token(d, w):
                t = _race_dist_exact(d, w, argmax=True)
                return _pick(d, t, t, t)

            tokens = jax.vmap(token)(dist, words)
        if then is not None:
            return then(dist, plan, tokens)
        return dist if tokens is None else (dist, tokens)

    if then is None:
        out = lax.cond(jnp.any(need2), lambda: stages(True), lambda: stages(False))
        return (out, plan) if words is None else (out[0], plan, out[1])
    # one switch: the common stages for each (raw, mass) as constants, in the order of
    # 2 * raw + mass, then the rare stages (which branch on the plan's own values inside)
    common = [plan.replace(raw=r, mass=m) for r in (0, 1, 2) for m in (False, True)]
    index = 2 * jnp.asarray(plan.raw, jnp.int32) + jnp.asarray(plan.mass, jnp.int32)
    index = jnp.where(jnp.any(need2), len(common), index)
    branches = [partial(stages, False, p) for p in common] + [partial(stages, True)]
    return lax.switch(index, branches)


def _with_kept_mass(dist: Distribution, mass) -> Distribution:
    """``dist`` with the kept mass of its rows on the full vocabulary, when ``mass`` (the
    plan's flag: some row reports processed log probabilities) says so; :func:`_rest_one`
    leaves it NaN under a traced flag."""

    def fill():
        m = jax.vmap(lambda d: _kept_mass(d.z, d.shift, d.z_min, d.w_min))(dist)
        full = ~dist.in_candidates & ~dist.in_tier2 & dist.ok
        return dist.replace(log_mass=jnp.where(full, jnp.log(m), dist.log_mass))

    return _maybe(mass, fill, lambda: dist)


#: Batch-level work that only a few rows need runs on the rows that need it, gathered into a
#: batch of ``B // COMPACT`` rows when they fit (else ``B // (COMPACT * COMPACT)`` first, when
#: that is smaller); more rows than that: all rows. ``COMPACT = 1`` turns compaction off.
COMPACT = 4


def _compact_sizes(batch: int) -> list[int]:
    """The gathered batch sizes :func:`_compacted` tries, smallest first (all ``< batch``).

    >>> _compact_sizes(64), _compact_sizes(8), _compact_sizes(1)
    ([4, 16], [1, 2], [])
    """
    if COMPACT <= 1:
        return []
    sizes = {max(1, batch // (COMPACT * COMPACT)), max(1, batch // COMPACT)}
    return sorted(k for k in sizes if k < batch)


def _compacted(need: jax.Array, run, args, *, halves: bool = False, few: bool = False):
    """``run(args, active)`` for the rows where ``need`` holds, as cheaply as possible.

    ``run`` maps a batch (leading axis) of per-row inputs to per-row outputs; with the static
    ``active`` False it returns the rows' skip outputs without doing the work. One
    batch-level ``lax.switch``: no row needs it (skip); at most ``k`` rows do, for ``k`` in
    :func:`_compact_sizes` (they are gathered into a batch of k, run, and written back; the
    smallest k that holds them); more (all rows). A row gathered only to fill the k gets its
    own outputs, which it does not use. ``halves`` adds a size of half the batch. ``few``
    (see :data:`BRANCHES`): one ``lax.cond``, all rows or none.
    """
    batch = need.shape[0]
    count = jnp.sum(need)

    def none():
        return run(args, False)

    def every():
        return run(args, True)

    def gathered(k):
        idx = jnp.argsort(~need, stable=True)[:k]  # the rows that need it first
        sub = run(jax.tree.map(lambda x: x[idx], args), True)
        return jax.tree.map(lambda o, s: o.at[idx].set(s), run(args, False), sub)

    sizes = [] if few else _compact_sizes(batch)
    if halves and COMPACT > 1 and batch // 2 > max(sizes, default=0):
        sizes.append(batch // 2)
    if not sizes:
        return lax.cond(count > 0, every, none)
    index = jnp.where(count == 0, 0, len(sizes) + 1)
    for i, k in reversed(list(enumerate(sizes))):
        index = jnp.where((count > 0) & (count <= k), i + 1, index)
    return lax.switch(index, [none, *(partial(gathered, k) for k in sizes), every])


def tier_stats(
    logits: jax.Array,
    rows: RowParams,
    hist: History | None,
    *,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Diagnostics per row (``[B]`` each): resolved on the first candidate tier, resolved on
    the second, and the size of the kept set (scripts/real_logits.py reports the rates)."""
    dist, _ = distributions(
        logits, rows, hist, None, num_candidates=num_candidates, second_tier=second_tier
    )
    lp = jax.vmap(lambda d: log_prob(d, jnp.arange(d.z.shape[0])))(dist)
    return dist.in_candidates, dist.in_tier2, jnp.sum(lp > -jnp.inf, axis=-1)


def sample_rows(
    logits: jax.Array,
    rows: RowParams,
    hist: History | None,
    allowed: jax.Array | None,
    position: jax.Array,
    *,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
    transforms=(),
    keys: jax.Array | None = None,
) -> SampleOut:
    """:func:`sample_row` over a batch: every argument with a leading axis ``B``
    (``position`` may be a scalar shared by all rows).

    The batch's :class:`Plan` is decided once (logit_bias tier, the normalizer, whether any
    row needs the full vocabulary and which filters, raw log probabilities), so work no row
    needs is skipped for the whole batch; the per-row code has no collective and gives the
    same numbers as a plain ``jax.vmap(sample_row)``. ``keys`` (``[B]`` PRNG keys) replaces
    the per-row ``fold_in(key(seed), position)``.
    """
    hist = _check_shapes(logits, rows, hist, allowed, batched=True)
    batch = logits.shape[0]
    if keys is None:
        position = jnp.broadcast_to(_position(position).astype(jnp.int32), (batch,))
        keys = jax.vmap(row_key)(rows, position)
    one = _branches() == "one"
    # the raw log probabilities depend on the logits and the parameters alone: computed once,
    # outside every branch of the plan; under "one", in each side of its last switch, with
    # the plan's raw and mass static on the common sides (see _rest_one)
    raw_stats = None if one else _raw_batch(logits, _raw_needed(rows))

    def report(dist, plan, token):
        stats = raw_stats
        if one:
            stats = _raw_batch(logits, plan.raw, exact_only=True)
            if plan.mass is not True:
                dist = _with_kept_mass(dist, plan.mass)
        return jax.vmap(_report)(logits, rows, dist, token, stats)

    return distributions(
        logits,
        rows,
        hist,
        allowed,
        num_candidates=num_candidates,
        second_tier=second_tier,
        transforms=transforms,
        keys=keys,
        for_sampling=True,
        then=report,
    )


def processed_logprobs_rows(
    logits: jax.Array,
    rows: RowParams,
    hist: History | None,
    allowed: jax.Array | None,
    *,
    num_candidates: int = NUM_CANDIDATES,
    second_tier: int = SECOND_TIER,
    transforms=(),
) -> jax.Array:
    """:func:`processed_logprobs_row` over a batch: ``[B, V]``."""
    dist, _ = distributions(
        logits,
        rows,
        hist,
        allowed,
        num_candidates=num_candidates,
        second_tier=second_tier,
        transforms=transforms,
    )
    return jax.vmap(lambda d: log_prob(d, jnp.arange(d.z.shape[0])))(dist)


_STATIC = ("num_candidates", "second_tier", "transforms")
sample_batch = jax.jit(sample_rows, static_argnames=_STATIC)
sample_batch.__doc__ = "Jitted :func:`sample_rows`."
processed_logprobs_batch = jax.jit(processed_logprobs_rows, static_argnames=_STATIC)
processed_logprobs_batch.__doc__ = "Jitted :func:`processed_logprobs_rows`."


# --------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------


class SampleResult(NamedTuple):
    """What :func:`sample` returns (numpy arrays, leading axis ``B``)."""

    tokens: np.ndarray  # [B] int32; -1 for a row with no allowed token
    logprobs: np.ndarray  # [B] float32
    top_ids: np.ndarray  # [B, 20] int32; keep the first top_logprobs of each row
    top_logprobs: np.ndarray  # [B, 20] float32
    ok: np.ndarray  # [B] bool
    seeds: tuple  # [B] the seed each row used (its own, or derive_seed(job_seed, row));
    # None for every row when an explicit key= was given


_LOGITS_SHAPE = "a [B, V] array with B >= 1 and V >= 1"
_PARAMS_ALLOWED = (
    "one SamplingParams or a list of B of them (SamplingParams.from_request(body) makes one"
    " from a request dict)"
)
_STEP_ALLOWED = "an integer in [0, 2**31 - 1] (the output position)"


def _host_logits(logits) -> jax.Array:
    """The host wrappers' logits: a floating-point ``[B, V]`` array (any float dtype; lists
    too), else :class:`InvalidRequestError` naming what it is."""
    try:  # a ragged list or an object numpy refuses: named, not numpy's ValueError
        arr = logits if isinstance(logits, jax.Array) else np.asarray(logits)
    except Exception:  # whatever numpy cannot read as an array
        raise InvalidRequestError("logits", logits, _LOGITS_SHAPE) from None
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise InvalidRequestError(
            "logits", f"<{arr.dtype} array>", "a floating-point array (float32, bfloat16, ...)"
        )
    if arr.ndim != 2 or 0 in arr.shape:
        raise InvalidRequestError("logits", f"<array of shape {tuple(arr.shape)}>", _LOGITS_SHAPE)
    return jnp.asarray(arr)


def _host_step(step) -> int:
    """``step`` as an int in ``[0, 2**31 - 1]`` (int32 on the device); a bool, a float or a
    string is refused, not converted (a 0-d integer array is an int)."""
    if isinstance(step, (np.ndarray, jax.Array)) and step.shape == ():
        if jnp.issubdtype(step.dtype, jnp.integer):
            step = int(step)
    return _integer("step", step, 0, np.iinfo(np.int32).max, _STEP_ALLOWED)


def _host_inputs(logits, params, prompt_tokens, output_tokens, job_seed, key, transforms):
    from jaxsample.params import SamplingParams, derive_seed, pack_rows

    logits = _host_logits(logits)
    batch, vocab = logits.shape
    if isinstance(params, SamplingParams):
        plist = [params] * batch
    else:
        plist = _listed("params", params, _PARAMS_ALLOWED)
    for i, p in enumerate(plist):
        if not isinstance(p, SamplingParams):
            raise InvalidRequestError(f"params[{i}]", p, _PARAMS_ALLOWED)
        # the host wrappers see logits, not text: what needs the decoding loop is refused,
        # never silently left out of the distribution
        if p.response_format != "text":
            raise InvalidRequestError(
                "response_format",
                p.response_format,
                "'text' here: JSON mode and JSON Schema need the decoding loop (generate,"
                " Engine), or pass their mask as allowed= to sample_rows / distributions",
                index=i,
            )
        if p.stop:
            raise InvalidRequestError(
                "stop",
                list(p.stop),
                "none here: stop strings act on the decoded text, in the decoding loop"
                " (generate, Engine)",
                index=i,
            )
    if len(plist) != batch:
        raise InvalidRequestError(
            "params",
            f"<{len(plist)} SamplingParams>",
            f"one SamplingParams, or a list of {batch}: one per row of the logits",
        )
    token_lists = {}
    for name, lists in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
        per_row = f"one token list per row of the logits ({batch}), e.g. [[1, 2]] for one row"
        lists = [None] * batch if lists is None else _listed(name, lists, per_row)
        if len(lists) != batch:
            raise InvalidRequestError(name, f"<{len(lists)} entries>", per_row)
        for i, entry in enumerate(lists):
            try:
                flat = entry is None or np.ndim(entry) == 1
            except Exception:  # a ragged list numpy cannot read
                flat = False
            if not flat:  # a flat list of ints is not one list per row
                raise InvalidRequestError(
                    f"{name}[{i}]",
                    entry,
                    f"row {i}'s list of token ids (or None): one list per row, e.g. [[1, 2]]",
                )
        # each list named as the caller wrote it (History.from_tokens says prompt_ids)
        token_lists[name] = [token_id_array(f"{name}[{i}]", e, vocab) for i, e in enumerate(lists)]
    if key is not None:
        if job_seed is not None:
            raise InvalidRequestError(
                "key", "<a key>", "key= or job_seed=, not both", reason="both were given"
            )
        seeded = [i for i, p in enumerate(plist) if p.seed is not None]
        if seeded:
            raise InvalidRequestError(
                "key",
                "<a key>",
                "key= without per-request seeds: it replaces them",
                reason=f"rows {seeded} set a seed; drop the seeds or the key",
            )
        seeds = (None,) * batch
        pack_seeds = [0] * batch
    else:
        job_seed = check_job_seed(0 if job_seed is None else job_seed)
        seeds = tuple(
            p.seed if p.seed is not None else derive_seed(job_seed, i) for i, p in enumerate(plist)
        )
        pack_seeds = list(seeds)
    rows = pack_rows(plist, vocab_size=vocab, seeds=pack_seeds, transforms=transforms)
    # the host wrappers always report log probabilities (the loop computes them on request)
    rows = jax.tree.map(jnp.asarray, rows.replace(logprobs=np.ones(batch, np.bool_)))
    hist = History.stack(
        [
            History.from_tokens(
                token_lists["prompt_tokens"][i], token_lists["output_tokens"][i], vocab
            )
            for i in range(batch)
        ]
    )
    return logits, rows, hist, seeds


def _row_keys(key, batch: int):
    """Row ``b`` of an explicit ``key`` draws with ``fold_in(key, b)``."""
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32), impl="threefry2x32")
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def sample(
    logits,
    params,
    *,
    prompt_tokens=None,
    output_tokens=None,
    step=0,
    key=None,
    job_seed=None,
    transforms=(),
) -> SampleResult:
    """Draws one token per row on the host's behalf.

    ``logits [B, V]``; ``params`` one :class:`SamplingParams` (for every row) or a list of B;
    ``prompt_tokens``/``output_tokens`` B token-id sequences (Python lists, numpy or jax
    arrays) for the penalties; ``step`` the output position ``i`` of this draw (the key is
    ``fold_in(key(seed), i)``). A request without a seed uses ``derive_seed(job_seed,
    row_index)`` (``job_seed`` 0 by default; reported in ``seeds``). Or pass ``key=`` (a PRNG
    key): row ``b`` then draws with ``fold_in(key, b)`` and ``step`` is not used (requests must
    not set a seed: refused rather than ignored). The chosen token's log probability is
    always reported here, whatever ``logprobs`` says (``top_logprobs`` still sets how many top
    entries a row gets). ``transforms``: a user transform chain.

    Example::

        >>> from jaxsample import SamplingParams
        >>> sample(jnp.array([[0.0, 9.0, 1.0]]), SamplingParams(temperature=0.0)).tokens
        array([1], dtype=int32)
        >>> int(sample(jnp.zeros((1, 4)), SamplingParams(), key=jax.random.key(1)).tokens[0]) < 4
        True
    """
    step = _host_step(step)  # checked first: an array step failed on its truth value here
    if key is not None and step != 0:
        raise InvalidRequestError(
            "step",
            step,
            "0 with key=: step is the position folded into each seed's key; with key= fold"
            " it into the key yourself",
            reason="key= was given",
        )
    chain = tf.check_chain(transforms)
    logits, rows, hist, seeds = _host_inputs(
        logits, params, prompt_tokens, output_tokens, job_seed, key, chain
    )
    keys = None if key is None else _row_keys(_one_key(key), logits.shape[0])
    out = jax.device_get(
        sample_batch(logits, rows, hist, None, jnp.int32(step), keys=keys, transforms=chain)
    )
    return SampleResult(
        tokens=out.token,
        logprobs=out.logprob,
        top_ids=out.top_ids,
        top_logprobs=out.top_logprobs,
        ok=out.ok,
        seeds=seeds,
    )


def processed_logprobs(
    logits, params, *, prompt_tokens=None, output_tokens=None, transforms=()
) -> np.ndarray:
    """``[B, V]`` log probabilities of exactly the distribution :func:`sample` draws from.

    Arguments as in :func:`sample`; ``-inf`` marks removed tokens. (The distribution does not
    depend on the key, so there is no ``key=`` here.)

    Example::

        >>> from jaxsample import SamplingParams
        >>> lp = processed_logprobs(jnp.array([[0.0, 9.0, 1.0]]), SamplingParams(top_k=1))
        >>> lp.tolist()
        [[-inf, 0.0, -inf]]
    """
    chain = tf.check_chain(transforms)
    logits, rows, hist, _ = _host_inputs(
        logits, params, prompt_tokens, output_tokens, None, None, chain
    )
    return np.asarray(processed_logprobs_batch(logits, rows, hist, None, transforms=chain))
