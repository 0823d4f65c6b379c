"""A plain, sort-based numpy reference of SPEC.md's sampling chain (test-only).

Written from SPEC.md, not from jaxsample: sort the row, walk the sorted probabilities. Steps
1-5 are done in float32 with the same elementary operations the spec names; the filters
(steps 6-9) compute probabilities in float64.

Float rounding makes a threshold comparison ambiguous when a probability lies within a relative
``slack`` of the threshold. ``reference_keep(..., slack=+s)`` keeps the most any correct float32
implementation may keep and ``slack=-s`` the least; a correct sampler's kept set lies between.
"""

from __future__ import annotations

import numpy as np

F32_MAX = np.float32(np.finfo(np.float32).max)


def make_rows(params: list[dict], nb: int = 4):
    """A batched RowParams (numpy leaves) from dicts of SPEC field values (test helper)."""
    from jaxsample.rows import RowParams

    b = len(params)
    defaults = dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        top_a=0.0,
        min_p=0.0,
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=0,
        logprobs=True,
        top_logprobs=0,
        processed_logprobs=False,
        logit_bias={},
    )
    full = [{**defaults, **p} for p in params]
    for p in full:
        unknown = set(p) - set(defaults)
        assert not unknown, unknown
    bias_ids = np.zeros((b, nb), np.int32)
    bias_values = np.zeros((b, nb), np.float32)
    for i, p in enumerate(full):
        for j, (t, v) in enumerate(sorted(p["logit_bias"].items())):
            bias_ids[i, j], bias_values[i, j] = t, v
    words = np.array(
        [[(p["seed"] % 2**64) >> 32, p["seed"] % 2**32] for p in full], np.uint32
    ).reshape(b, 2)

    def col(name, dtype):
        return np.array([p[name] for p in full], dtype).reshape(b)

    return RowParams(
        temperature=col("temperature", np.float32),
        top_k=col("top_k", np.int32),
        top_p=col("top_p", np.float32),
        top_a=col("top_a", np.float32),
        min_p=col("min_p", np.float32),
        repetition_penalty=col("repetition_penalty", np.float32),
        frequency_penalty=col("frequency_penalty", np.float32),
        presence_penalty=col("presence_penalty", np.float32),
        bias_ids=bias_ids,
        bias_values=bias_values,
        seed_words=words,
        logprobs=col("logprobs", np.bool_),
        top_logprobs=col("top_logprobs", np.int32),
        processed_logprobs=col("processed_logprobs", np.bool_),
    )


def _finite_or_removed(new, old):
    new = np.clip(new, -F32_MAX, F32_MAX)
    return np.where(old == -np.inf, -np.inf, new).astype(np.float32)


def scaled_logits(logits, p: dict, *, allowed=None, prompt=(), output=()):
    """Steps 1-5 in float32. Returns (z, greedy)."""
    with np.errstate(all="ignore"):
        z = np.asarray(logits).astype(np.float32)
        z = np.where(np.isnan(z), -np.inf, np.minimum(z, F32_MAX)).astype(np.float32)
        vocab = z.shape[0]
        if allowed is not None:
            z = np.where(allowed, z, -np.inf).astype(np.float32)
        for t, v in p.get("logit_bias", {}).items():
            z[t] = _finite_or_removed(z[t] + np.float32(v), z[t])
        counts = np.bincount(np.asarray(output, np.int64), minlength=vocab)
        seen = counts > 0
        seen[np.asarray(prompt, np.int64)] = True
        r = np.float32(max(p.get("repetition_penalty", 1.0), 1e-6))
        rep = np.where(z > 0, z / r, z * r)
        z = _finite_or_removed(np.where(seen, rep, z), z)
        f = np.float32(p.get("frequency_penalty", 0.0))
        pr = np.float32(p.get("presence_penalty", 0.0))
        pen = f * counts.astype(np.float32) + pr * (counts > 0).astype(np.float32)
        z = _finite_or_removed(z - pen, z)
        t = np.float32(p.get("temperature", 1.0))
        greedy = bool(t < 1e-5)
        if not greedy:
            z = _finite_or_removed(z / t, z)
        # XLA's CPU flushes subnormals to zero and the chain writes zeros as +0.0 (docs/sampler.md,
        # "Finite stays finite"): a subnormal logit ties with 0 there, so it does here too
        z = np.where(np.abs(z) < np.finfo(np.float32).tiny, np.float32(0.0), z)
    return z, greedy


def _probs(z, keep):
    """float64 probabilities renormalized over ``keep``."""
    zz = np.where(keep, z.astype(np.float64), -np.inf)
    m = zz.max()
    w = np.exp(zz - m)
    return w / w.sum()


def reference_keep(z, p: dict, *, slack=0.0):
    """Steps 6-9 on scaled logits ``z`` by sorting: the kept mask (bool[V]).

    ``slack > 0`` resolves every ambiguous comparison towards keeping, ``slack < 0`` towards
    dropping (relative size ``|slack|``).
    """
    vocab = z.shape[0]
    keep = z > -np.inf
    if not keep.any():
        return keep
    order = np.lexsort((np.arange(vocab), -z.astype(np.float64)))  # descending, ties by id
    k = int(p.get("top_k", 0))
    if 0 < k < vocab:
        kth = z[order[k - 1]]
        keep &= z >= kth
    top_p = float(p.get("top_p", 1.0))
    if top_p < 1.0:
        prob = _probs(z, keep)
        sorted_prob = prob[order]
        cum = np.cumsum(sorted_prob)
        target = top_p * (1.0 + slack)
        j = int(np.searchsorted(cum, target, side="left"))
        j = min(j, int(keep.sum()) - 1)
        keep &= z >= z[order[j]]
    a = float(p.get("top_a", 0.0))
    if a > 0:
        prob = _probs(z, keep)
        keep &= (prob >= a * prob.max() ** 2 * (1.0 - slack)) | (prob == prob.max())
    m = float(p.get("min_p", 0.0))
    if m > 0:
        prob = _probs(z, keep)
        keep &= (prob >= m * prob.max() * (1.0 - slack)) | (prob == prob.max())
    if slack < 0:  # probabilities below float32's range may count as 0
        prob = _probs(z, keep)
        keep &= (prob >= 1e-30 * prob.max()) | (z == z.max())
    return keep


def reference_probs(logits, p: dict, *, allowed=None, prompt=(), output=(), slack=0.0):
    """The step-10 distribution (float64 [V]) and ok; greedy rows are a point mass."""
    z, greedy = scaled_logits(logits, p, allowed=allowed, prompt=prompt, output=output)
    if not (z > -np.inf).any():
        return np.zeros(z.shape[0]), False
    if greedy:
        out = np.zeros(z.shape[0])
        out[int(np.argmax(z))] = 1.0
        return out, True
    keep = reference_keep(z, p, slack=slack)
    return _probs(z, keep) * keep, True


def sort_based_chain_keep(logits, p: dict, **kw):
    """(tight, loose) kept masks of the whole chain for a float32 implementation."""
    z, greedy = scaled_logits(logits, p, **kw)
    if greedy:
        one = np.zeros(z.shape[0], bool)
        if (z > -np.inf).any():
            one[int(np.argmax(z))] = True
        return one, one
    return reference_keep(z, p, slack=-1e-4), reference_keep(z, p, slack=1e-4)
