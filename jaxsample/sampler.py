"""The sampler: SPEC.md's chain over one row, the exact draw, history and log probabilities.

The functional core works on one row and is batched with ``jax.vmap``:

* :func:`sample_row` -> :class:`SampleOut` (token, its log probability, the top 20, ``ok``);
* :func:`processed_logprobs_row` -> ``f32[V]``, the log probabilities of exactly the
  distribution the draw uses (``-inf`` for removed tokens).

:func:`sample_rows` and :func:`processed_logprobs_rows` are the batched versions (jit them, or
call them inside a jitted decode loop); :func:`sample_batch` and
:func:`processed_logprobs_batch` are jitted. :func:`sample` and :func:`processed_logprobs` are
thin host wrappers that take :class:`jaxsample.SamplingParams`.

How a row is sampled without sorting the vocabulary (docs/sampler.md has the details): the
``C`` largest scaled logits come from ``lax.top_k`` (a partial selection), the full-vocabulary
normalizer from one ``exp`` pass. top_k, top_p, top_a and min_p are thresholds, exact from the
sorted candidates whenever the kept set ends inside them, and the draw is then an inverse CDF
over the candidates with one uniform. Rows the candidates cannot resolve (flat logits, large
top_k, no filter at all) take an exact full-vocabulary path (threshold bisection, blocked
inverse CDF) under a batch-level ``lax.cond``, so a batch pays for it only when a row needs it.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jaxsample import transforms as tf
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams

#: How many of a row's largest logits the fast path looks at (``lax.top_k``).
NUM_CANDIDATES = 128
#: Block length of the full-vocabulary inverse-CDF draw.
DRAW_BLOCK = 256
#: logit_bias is applied over the first 16, 128 or all entries, whichever the batch needs.
BIAS_TIERS = (16, 128)
_AXIS = "rows"


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
        """Builds a history on the host from token-id lists (``None`` is empty)."""
        prompt = np.asarray(list(prompt_ids or ()), np.int64).reshape(-1)
        output = np.asarray(list(output_ids or ()), np.int64).reshape(-1)
        for name, ids in (("prompt", prompt), ("output", output)):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"{name} token ids must be in [0, {vocab_size - 1}]")
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


# --------------------------------------------------------------------------------------------
# The chain and the draw
# --------------------------------------------------------------------------------------------


class SampleOut(NamedTuple):
    """One row's draw (batched: a leading axis ``B`` on every field)."""

    token: jax.Array  # shape=(), int32; -1 when ok is False
    logprob: jax.Array  # shape=(), float32; raw or processed log probability of token
    top_ids: jax.Array  # shape=(20,), int32; the 20 most likely tokens (-1 past V)
    top_logprobs: jax.Array  # shape=(20,), float32; their log probabilities
    ok: jax.Array  # shape=(), bool; False when no token is allowed at all


class _Dist(NamedTuple):
    """The step-10 distribution of one row: kept = (z >= z_min) & (w >= w_min) & (z > -inf),
    w = exp(z - shift), probability w / mass."""

    z: jax.Array  # (V,) f32 scaled logits after steps 1-5
    cands: tf.Candidates  # the candidates after steps 6-9
    shift: jax.Array  # () f32 max of z
    z_min: jax.Array  # () f32
    w_min: jax.Array  # () f32
    mass: jax.Array  # () f32
    greedy: jax.Array  # () bool
    ok: jax.Array  # () bool
    token: jax.Array  # () i32 the drawn token (greedy, candidates or full vocabulary)


def _batch_any(x: jax.Array, axis_name: str | None) -> jax.Array:
    """``any(x)`` over the batch axis ``axis_name`` (an unbatched scalar under vmap)."""
    x = x.astype(jnp.int32)
    return (x if axis_name is None else lax.psum(x, axis_name)) > 0


def _scale(x, allowed, bias, row: RowParams, seen, counts):
    """Steps 1-5 elementwise: mask, bias, repetition, frequency/presence, temperature.

    Works on any shape: the whole row ``[V]`` (with ``bias = None``: no bias) or the few
    biased entries gathered from it, so both give bit-identical values.
    """
    z = x if allowed is None else tf.hard_mask(x, allowed)
    if bias is not None:
        z = tf.add_bias(z, bias)
    z = tf.repetition_penalty(z, row.repetition_penalty, seen)
    z = tf.frequency_presence_penalty(z, counts, row.frequency_penalty, row.presence_penalty)
    return tf.temperature(z, row.temperature)


def _steps_1_to_5(logits, row: RowParams, hist: History, allowed, axis_name=None):
    """Steps 1-5 over the row: ``z[V]``, with logit_bias applied sparsely.

    Every token goes through the elementwise chain without bias; then a row's biased entries
    are gathered, run through the same chain with their bias and written back (ids are
    distinct per row; entries with bias 0, the padding included, are skipped), so no dense
    ``[V]`` bias vector is ever built and both give bit-identical values. Scattering costs
    about 0.2-0.4 us per entry on CPU, so only as many entries as the batch uses are visited:
    the tier (none, 16, 128 or all) is chosen for the whole batch by a ``lax.switch`` on a
    batch-level maximum. Each branch computes ``z`` itself (from the unsanitized logits), so
    neither the sanitized logits nor a copy of ``z`` is materialized for the switch.
    """
    ids, values = row.bias_ids, row.bias_values
    nb, vocab = ids.shape[-1], logits.shape[-1]
    used = jnp.max(jnp.where(values != 0, jnp.arange(nb) + 1, 0))
    if axis_name is not None:
        used = lax.pmax(used, axis_name)
    tiers = [t for t in BIAS_TIERS if t < nb] + [nb]

    def unbiased():
        seen = hist.in_prompt | (hist.counts > 0)
        return _scale(tf.sanitize(logits), allowed, None, row, seen, hist.counts)

    def biased(t):
        i, v = ids[:t], values[:t]
        counts = hist.counts[i]
        a = None if allowed is None else allowed[i]
        new = _scale(tf.sanitize(logits[i]), a, v, row, hist.in_prompt[i] | (counts > 0), counts)
        return unbiased().at[jnp.where(v != 0, i, vocab)].set(new, mode="drop")

    branches = [unbiased] + [partial(biased, t) for t in tiers]
    index = jnp.where(used == 0, 0, 1 + jnp.sum(jnp.array(tiers[:-1]) < used))
    return lax.switch(index, branches)


def _when(pred, axis_name, fn, x):
    """``fn(x)`` if ``pred`` holds for some row of the batch, else ``x`` (a batch-level cond)."""
    return lax.cond(_batch_any(pred, axis_name), fn, lambda x: x, x)


def _draw_candidates(c: tf.Candidates, u: jax.Array) -> jax.Array:
    """Inverse CDF over the kept candidates: the first with ``cum > u * mass``."""
    last = jnp.maximum(c.n - 1, 0)
    j = jnp.sum(c.cum <= u * c.cum[last]).astype(jnp.int32)
    return c.ids[jnp.minimum(j, last)]


def _draw_full(w: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse CDF over the whole vocabulary with one uniform ``u`` in [0, 1).

    ``w: f32[V]`` unnormalized weights (0 for removed tokens). Block sums, the block where
    ``u * total`` falls, then the token inside it: two short cumulative sums, no sort.
    """
    vocab = w.shape[0]
    blocks = jnp.pad(w, (0, (-vocab) % DRAW_BLOCK)).reshape(-1, DRAW_BLOCK)
    sums = jnp.sum(blocks, axis=1)
    cum = jnp.cumsum(sums)
    target = u * cum[-1]
    last_block = jnp.max(jnp.where(sums > 0, jnp.arange(sums.shape[0]), 0))
    b = jnp.minimum(jnp.sum(cum <= target), last_block)
    inner = target - jnp.where(b > 0, cum[jnp.maximum(b - 1, 0)], 0.0)
    block = lax.dynamic_index_in_dim(blocks, b, keepdims=False)
    last = jnp.max(jnp.where(block > 0, jnp.arange(DRAW_BLOCK), 0))
    j = jnp.minimum(jnp.sum(jnp.cumsum(block) <= inner), last)
    return (b * DRAW_BLOCK + j).astype(jnp.int32)


def _distribution(
    logits, row: RowParams, hist: History, allowed, u, *, num_candidates, axis_name, draw
) -> _Dist:
    """Steps 1-10 for one row; the full-vocabulary path runs only if some row needs it."""
    vocab = logits.shape[-1]
    z = _steps_1_to_5(logits, row, hist, allowed, axis_name)
    greedy = tf.is_greedy(row.temperature)
    c0 = tf.init_candidates(z, num_candidates, total=False)
    ok = c0.values[0] > -jnp.inf
    shift = jnp.where(ok, c0.values[0], 0.0)
    ck = tf.top_k(c0, row.top_k, vocab_size=vocab)
    # The full-vocabulary normalizer (one exp pass) only matters to a filter that runs while
    # every token is still kept, that is when top_k did not cut: skipped when no row needs it.
    filters = (row.top_p < 1.0) | (row.top_a > 0.0) | (row.min_p > 0.0)
    need_total = ok & ~greedy & ck.kept_all & filters
    total = lax.cond(
        _batch_any(need_total, axis_name),
        lambda: tf.vocabulary_total(z, c0.values[0]),
        lambda: jnp.float32(jnp.nan),
    )
    ck = ck._replace(total=total)
    c = tf.min_p(tf.top_a(tf.top_p(ck, row.top_p), row.top_a), row.min_p)
    resolved = c.exact & ~c.kept_all
    need_full = ok & ~greedy & ~resolved
    last = jnp.maximum(c.n - 1, 0)

    def full_path():
        # top_k's threshold is reused from the candidates when they resolved it.
        k_known = ck.exact & ~ck.kept_all
        s = tf.init_full(z)
        s = s._replace(z_min=jnp.where(k_known, ck.values[jnp.maximum(ck.n - 1, 0)], -jnp.inf))
        # each full-vocabulary filter runs only if some row of the batch needs it
        run_k = need_full & ~k_known & (row.top_k > 0) & (row.top_k < vocab)
        run_p = need_full & (row.top_p < 1.0)
        run_a = need_full & (row.top_a > 0.0)
        s = _when(
            run_k, axis_name, lambda s: tf.top_k_full(s, row.top_k, run_k, vocab_size=vocab), s
        )
        s = _when(run_p, axis_name, lambda s: tf.top_p_full(s, row.top_p, run_p), s)
        s = _when(run_a, axis_name, lambda s: tf.top_a_full(s, row.top_a), s)
        s = tf.min_p_full(s, row.min_p)
        w = jnp.where(tf.full_keep(s), s.weights, 0.0)
        token = _draw_full(w, u) if draw else jnp.int32(0)
        return s.z_min, s.w_min, jnp.sum(w), token

    def skip():
        return jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(1.0), jnp.int32(0)

    z_min, w_min, mass, token = lax.cond(_batch_any(need_full, axis_name), full_path, skip)
    token = jnp.where(need_full, token, _draw_candidates(c, u) if draw else 0)
    token = jnp.where(greedy, c0.ids[0], token)
    return _Dist(
        z=z,
        cands=c,
        shift=shift,
        z_min=jnp.where(need_full, z_min, c.values[last]),
        w_min=jnp.where(need_full, w_min, 0.0),
        mass=jnp.where(need_full, mass, c.cum[last]),
        greedy=greedy,
        ok=ok,
        token=jnp.where(ok, token, -1),
    )


def _processed(d: _Dist, values: jax.Array, ids: jax.Array) -> jax.Array:
    """Processed log probabilities of tokens ``ids`` with scaled logits ``values``."""
    w = jnp.exp(values - d.shift)
    keep = (values >= d.z_min) & (w >= d.w_min) & (values > -jnp.inf)
    sampled = jnp.where(keep, values - d.shift - jnp.log(d.mass), -jnp.inf)
    greedy = jnp.where(ids == d.cands.ids[0], 0.0, -jnp.inf)
    return jnp.where(d.ok, jnp.where(d.greedy, greedy, sampled), -jnp.inf)


def _raw_logsumexp(raw: jax.Array, top: jax.Array) -> jax.Array:
    return jnp.where(top == -jnp.inf, 0.0, top) + jnp.log(tf.vocabulary_total(raw, top))


def _row_key(row: RowParams, position) -> jax.Array:
    key = jax.random.wrap_key_data(row.seed_words.astype(jnp.uint32), impl="threefry2x32")
    return jax.random.fold_in(key, position)


def sample_row(
    logits: jax.Array,
    row: RowParams,
    hist: History,
    allowed: jax.Array | None,
    position: jax.Array,
    *,
    num_candidates: int = NUM_CANDIDATES,
    axis_name: str | None = None,
) -> SampleOut:
    """Draws one token for one row (SPEC.md steps 1-10) and reports log probabilities.

    Args:
      logits: ``[V]`` model logits, any float dtype (computed in float32; NaN = removed).
      row: the row's :class:`RowParams` (0-d leaves, ``bias_*`` of shape ``[NB]``).
      hist: the row's :class:`History`.
      allowed: ``bool[V]`` hard constraint (True = allowed), or None.
      position: the output position ``i``; the draw uses ``fold_in(key(seed), i)`` only.
      num_candidates: static; how many largest logits the fast path uses.
      axis_name: the ``vmap`` axis name when batched (see :func:`sample_rows`); it lets the
        full-vocabulary fallback be skipped for the whole batch when no row needs it.

    Returns:
      :class:`SampleOut`. Greedy rows (temperature < 1e-5) take the argmax of the processed
      logits (ties: lowest id). ``logprob``/``top_logprobs`` are ``log_softmax(logits)`` (raw,
      default) or the processed distribution (``row.processed_logprobs``); a row with
      ``row.logprobs`` False gets ``logprob = NaN`` and no top entries (ids -1), and when no
      row of the batch wants raw log probabilities their full-row pass is skipped. ``ok`` is
      False and ``token = -1`` when no token is allowed.

    Example::

        >>> from jaxsample import SamplingParams, pack_rows
        >>> rows = pack_rows([SamplingParams(temperature=0.0)], vocab_size=3, seeds=[0])
        >>> row = jax.tree.map(lambda x: jnp.asarray(x[0]), rows)
        >>> hist = History.from_tokens([], [], vocab_size=3)
        >>> int(sample_row(jnp.array([0.0, 5.0, 1.0]), row, hist, None, 0).token)
        1
    """
    u = jax.random.uniform(_row_key(row, position), (), jnp.float32)
    d = _distribution(
        logits,
        row,
        hist,
        allowed,
        u,
        num_candidates=num_candidates,
        axis_name=axis_name,
        draw=True,
    )
    token = d.token
    safe = jnp.maximum(token, 0)
    proc_lp = _processed(d, d.z[safe], safe)

    # processed top 20: the leading candidates (the kept set is an upper set of the logits)
    vocab = logits.shape[-1]
    k = min(TOP_LOGPROBS_MAX, d.cands.values.shape[0])
    pad = TOP_LOGPROBS_MAX - k
    cand_ids = jnp.pad(d.cands.ids[:k], (0, pad), constant_values=-1)
    cand_lp = jnp.pad(
        _processed(d, d.cands.values[:k], d.cands.ids[:k]), (0, pad), constant_values=-jnp.inf
    )

    def no_top():
        return (
            jnp.full((TOP_LOGPROBS_MAX,), -1, jnp.int32),
            jnp.full((TOP_LOGPROBS_MAX,), -jnp.inf, jnp.float32),
        )

    # Raw log probabilities need log_softmax's normalizer over the whole row (an exp pass) and
    # the raw top 20 a selection over it: both run only if some row of the batch asks.
    wants_raw = row.logprobs & ~row.processed_logprobs
    wants_raw_top = wants_raw & (row.top_logprobs > 0)

    def raw_stats():
        raw = tf.sanitize(logits)
        block_max = tf.block_max(raw)  # one pass: the max for lse and the top-20's stage 1
        lse = _raw_logsumexp(raw, jnp.max(block_max))

        def raw_top():
            vals, ids = tf.top_candidates(raw, min(TOP_LOGPROBS_MAX, vocab), block_max)
            lp = jnp.where(vals > -jnp.inf, vals - lse, -jnp.inf)
            return (
                jnp.pad(ids, (0, TOP_LOGPROBS_MAX - ids.shape[0]), constant_values=-1),
                jnp.pad(lp, (0, TOP_LOGPROBS_MAX - lp.shape[0]), constant_values=-jnp.inf),
            )

        return (lse, *lax.cond(_batch_any(wants_raw_top, axis_name), raw_top, no_top))

    lse, raw_ids, raw_lps = lax.cond(
        _batch_any(wants_raw, axis_name), raw_stats, lambda: (jnp.float32(jnp.nan), *no_top())
    )
    raw_lp = tf.sanitize(logits[safe]) - lse
    logprob = jnp.where(d.ok, jnp.where(row.processed_logprobs, proc_lp, raw_lp), -jnp.inf)
    # a row that asked for no top_logprobs gets none, whatever the rest of the batch asked
    none_ids, none_lps = no_top()
    wants_top = row.logprobs & (row.top_logprobs > 0)
    use_proc = row.processed_logprobs
    top_ids = jnp.where(use_proc, cand_ids, raw_ids)
    top_lps = jnp.where(use_proc, cand_lp, raw_lps)
    return SampleOut(
        token=token,
        logprob=jnp.where(row.logprobs, logprob, jnp.nan),
        top_ids=jnp.where(wants_top, top_ids, none_ids),
        top_logprobs=jnp.where(wants_top, top_lps, none_lps),
        ok=d.ok,
    )


def processed_logprobs_row(
    logits: jax.Array,
    row: RowParams,
    hist: History,
    allowed: jax.Array | None,
    *,
    num_candidates: int = NUM_CANDIDATES,
    axis_name: str | None = None,
) -> jax.Array:
    """``f32[V]``: log probabilities of exactly the distribution :func:`sample_row` draws from.

    Removed tokens are ``-inf``. A greedy row is the point mass on its argmax (0 there); a row
    with no allowed token is all ``-inf``. Arguments as in :func:`sample_row`.
    """
    d = _distribution(
        logits,
        row,
        hist,
        allowed,
        jnp.float32(0.0),
        num_candidates=num_candidates,
        axis_name=axis_name,
        draw=False,
    )
    return _processed(d, d.z, jnp.arange(d.z.shape[0]))


# --------------------------------------------------------------------------------------------
# Batched versions
# --------------------------------------------------------------------------------------------


def sample_rows(
    logits: jax.Array,
    rows: RowParams,
    hist: History,
    allowed: jax.Array | None,
    position: jax.Array,
    *,
    num_candidates: int = NUM_CANDIDATES,
) -> SampleOut:
    """:func:`sample_row` over a batch: every argument with a leading axis ``B``
    (``position`` may be a scalar shared by all rows). Use this rather than a plain
    ``vmap(sample_row)``: it names the batch axis so the fallback and the raw top-20 are
    skipped for the whole batch when no row needs them.
    """
    batch = logits.shape[0]
    position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (batch,))
    fn = partial(sample_row, num_candidates=num_candidates, axis_name=_AXIS)
    in_axes = (0, 0, 0, None if allowed is None else 0, 0)
    return jax.vmap(fn, in_axes=in_axes, axis_name=_AXIS)(logits, rows, hist, allowed, position)


def processed_logprobs_rows(
    logits: jax.Array,
    rows: RowParams,
    hist: History,
    allowed: jax.Array | None,
    *,
    num_candidates: int = NUM_CANDIDATES,
) -> jax.Array:
    """:func:`processed_logprobs_row` over a batch: ``[B, V]``."""
    fn = partial(processed_logprobs_row, num_candidates=num_candidates, axis_name=_AXIS)
    in_axes = (0, 0, 0, None if allowed is None else 0)
    return jax.vmap(fn, in_axes=in_axes, axis_name=_AXIS)(logits, rows, hist, allowed)


sample_batch = jax.jit(sample_rows, static_argnames=("num_candidates",))
sample_batch.__doc__ = "Jitted :func:`sample_rows`."
processed_logprobs_batch = jax.jit(processed_logprobs_rows, static_argnames=("num_candidates",))
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
    seeds: tuple  # [B] the seed each row used (its own, or derive_seed(0, row))


def _host_inputs(logits, params, prompt_tokens, output_tokens):
    from jaxsample.params import SamplingParams, derive_seed, pack_rows

    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    batch, vocab = logits.shape
    plist = [params] * batch if isinstance(params, SamplingParams) else list(params)
    if len(plist) != batch:
        raise ValueError(f"{len(plist)} params for {batch} rows of logits")
    for name, lists in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
        if lists is not None and len(lists) != batch:
            raise ValueError(f"{name} must hold {batch} lists, got {len(lists)}")
    seeds = tuple(p.seed if p.seed is not None else derive_seed(0, i) for i, p in enumerate(plist))
    rows = pack_rows(plist, vocab_size=vocab, seeds=seeds)
    # the host wrappers always report log probabilities (the loop computes them on request)
    rows = jax.tree.map(jnp.asarray, rows.replace(logprobs=np.ones(batch, np.bool_)))
    hist = History.stack(
        [
            History.from_tokens(
                prompt_tokens[i] if prompt_tokens is not None else (),
                output_tokens[i] if output_tokens is not None else (),
                vocab,
            )
            for i in range(batch)
        ]
    )
    return logits, rows, hist, seeds


def sample(logits, params, *, prompt_tokens=None, output_tokens=None, step=0) -> SampleResult:
    """Draws one token per row on the host's behalf.

    ``logits [B, V]``; ``params`` one :class:`SamplingParams` (for every row) or a list of B;
    ``prompt_tokens``/``output_tokens`` lists of B token-id lists (for the penalties);
    ``step`` the output position ``i`` of this draw (the key is ``fold_in(key(seed), i)``).
    A request without a seed uses ``derive_seed(0, row_index)`` (reported in ``seeds``).
    The chosen token's log probability is always reported here, whatever ``logprobs`` says
    (``top_logprobs`` still sets how many top entries a row gets).

    Example::

        >>> from jaxsample import SamplingParams
        >>> sample(jnp.array([[0.0, 9.0, 1.0]]), SamplingParams(temperature=0.0)).tokens
        array([1], dtype=int32)
    """
    logits, rows, hist, seeds = _host_inputs(logits, params, prompt_tokens, output_tokens)
    out = jax.device_get(sample_batch(logits, rows, hist, None, jnp.int32(step)))
    return SampleResult(
        tokens=out.token,
        logprobs=out.logprob,
        top_ids=out.top_ids,
        top_logprobs=out.top_logprobs,
        ok=out.ok,
        seeds=seeds,
    )


def processed_logprobs(logits, params, *, prompt_tokens=None, output_tokens=None) -> np.ndarray:
    """``[B, V]`` log probabilities of exactly the distribution :func:`sample` draws from.

    Arguments as in :func:`sample`; ``-inf`` marks removed tokens.

    Example::

        >>> from jaxsample import SamplingParams
        >>> lp = processed_logprobs(jnp.array([[0.0, 9.0, 1.0]]), SamplingParams(top_k=1))
        >>> lp.tolist()
        [[-inf, 0.0, -inf]]
    """
    logits, rows, hist, _ = _host_inputs(logits, params, prompt_tokens, output_tokens)
    return np.asarray(processed_logprobs_batch(logits, rows, hist, None))
