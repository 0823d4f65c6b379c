"""Prompt log probabilities (scoring): the raw log probability of every token of a prompt.

For a prompt of n token ids, position t = 1..n-1 gets ``log_softmax(logits(prompt[:t]))``
at ``prompt[t]`` (float32, the model's own distribution: SPEC.md's "raw" log probabilities,
no sampling transform) and the ``TOP`` most likely tokens there with theirs; position 0 has
none (no context predicts it). This is what evaluation harnesses read from
``/v1/completions`` with ``echo``, ``logprobs`` and ``max_tokens: 0``, and what
:meth:`jaxsample.Engine.prompt_logprobs` returns.

One compiled program per prompt bucket (``jaxsample.engine.scheduler.prompt_bucket``, the
slot engine's geometric rule: 16, 48, 112, 240, ... positions), separate from the slot
engine's: the model's layers over the padded prompt once
(:meth:`jaxsample.model.Llama.hidden`), then the vocabulary projection in blocks of
``SCORE_BLOCK`` positions (a ``lax.map``), so that a long prompt never holds ``T x V``
logits at once (2048 x 49152 floats are 400 MB). Each block takes the sampler's own raw
normalizer and top 20 (``sampler._raw_batch``, the function that reports a generated
token's raw log probabilities: the same normalizer, the same order of ties), and the top 20
always: how many the caller shows is sliced on the host, so no value of ``k`` compiles
anything.

With a batch-invariant model (:meth:`jaxsample.Engine.load`'s default) a prompt's numbers
are the same bits in any bucket: every position's hidden state is (docs/model.md), and
every block has the same shape whatever the bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsample import sampler
from jaxsample.engine.scheduler import _HashedGraphDef, prompt_bucket
from jaxsample.model.config import INVARIANT_TILE
from jaxsample.rows import TOP_LOGPROBS_MAX

#: How many top tokens the program computes per position (sliced to ``k`` on the host).
TOP = TOP_LOGPROBS_MAX

#: Positions per block of the vocabulary projection: an odd number of tiles, the width the
#: batch-invariant matmuls run at anyway (no padding on top), and [48, V] float32 logits
#: per block (9.4 MB with SmolLM2's vocabulary).
SCORE_BLOCK = 3 * INVARIANT_TILE

_TRACES = [0]


def trace_count() -> int:
    """How many times the scoring program has been traced in this process (one per bucket
    and model structure; a new ``k`` or another prompt of a bucket traces nothing)."""
    return _TRACES[0]


class Scores(NamedTuple):
    """A prompt's scores (host numpy arrays), for positions 1..n-1 (entry ``t - 1`` is
    position t): ``logprobs`` f32[n-1] (the raw log probability of the prompt's token),
    ``top_ids`` i32[n-1, TOP] and ``top_logprobs`` f32[n-1, TOP] (the most likely tokens,
    by log probability then id; id -1 and -inf past a vocabulary smaller than TOP)."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@functools.partial(jax.jit, static_argnums=(0,))
def _score(graphdef, state, tokens: jax.Array, length: jax.Array):
    """``tokens`` i32[1, T] (the prompt right padded), ``length`` i32[1]: per position t of
    the padded prompt, the raw log probability of ``tokens[0, t + 1]`` and the top ``TOP``
    after ``tokens[0, :t + 1]`` (f32[T'], i32[T', TOP], f32[T', TOP]; T' >= T)."""
    _TRACES[0] += 1
    model = nnx.merge(graphdef, state)
    h = model.hidden(tokens, length)[:, 0]  # [D, T'], T' >= T
    dim, width = h.shape
    blocks = -(-width // SCORE_BLOCK)
    size = blocks * SCORE_BLOCK
    h = jnp.pad(h, ((0, 0), (0, size - width)))  # zero columns: finite logits, unused
    following = jnp.pad(tokens[0, 1:], (0, size - (tokens.shape[1] - 1)))
    exact_only = sampler._branches() == "one"  # as sample_rows reports raw log probabilities

    def block(args):
        hb, nxt = args  # [D, SCORE_BLOCK], [SCORE_BLOCK]
        logits = model.position_logits(hb)  # [SCORE_BLOCK, V] float32
        normalizer, ids, lps = sampler._raw_batch(logits, 2, exact_only=exact_only)
        logit = jnp.take_along_axis(logits, nxt[:, None], axis=1)[:, 0]
        return sampler.raw_logprob(logit, normalizer), ids, lps

    hb = h.reshape(dim, blocks, SCORE_BLOCK).transpose(1, 0, 2)
    lp, ids, lps = jax.lax.map(block, (hb, following.reshape(blocks, SCORE_BLOCK)))
    return lp.reshape(size), ids.reshape(size, -1), lps.reshape(size, -1)


class PromptScorer:
    """The scoring program of one model: ``PromptScorer(model, max_len)(ids)`` gives the
    :class:`Scores` of a prompt of 1..max_len token ids (``max_len``: the longest prompt,
    the engine's context). Thread-safe; the device work is one compiled call."""

    def __init__(self, model, max_len: int):
        graphdef, self._state = nnx.split(model)
        self._graphdef = _HashedGraphDef(graphdef)  # hashed once, not at every call
        self.max_len = max_len

    def bucket(self, n: int) -> int:
        return prompt_bucket(n, self.max_len)

    def __call__(self, ids) -> Scores:
        ids = np.asarray(ids, np.int32)
        n = len(ids)
        if not 1 <= n <= self.max_len:
            raise ValueError(f"a prompt of {n} tokens: expected 1 to {self.max_len}")
        if n == 1:  # no position to score
            return Scores(
                np.zeros((0,), np.float32),
                np.zeros((0, TOP), np.int32),
                np.zeros((0, TOP), np.float32),
            )
        tokens = np.zeros((1, self.bucket(n)), np.int32)
        tokens[0, :n] = ids
        out = _score(self._graphdef, self._state, tokens, np.array([n], np.int32))
        lp, top_ids, top_lps = jax.device_get(out)
        return Scores(lp[: n - 1], top_ids[: n - 1], top_lps[: n - 1])


@dataclasses.dataclass(frozen=True, eq=False)
class PromptLogprobs:
    """One prompt's raw log probabilities (:meth:`jaxsample.Engine.prompt_logprobs`).

    Attributes:
      token_ids: the prompt's n token ids.
      tokens: each token's text as the responses show tokens (special tokens by their
        text, bytes that are not UTF-8 as U+FFFD).
      logprobs: float32 [n]: ``logprobs[t]`` is ``log_softmax`` of the model's logits after
        ``token_ids[:t]``, at ``token_ids[t]`` (raw: no sampling parameter applies);
        ``logprobs[0]`` is NaN (nothing predicts the first token).
      top_ids: int32 [n, k]: the k most likely tokens at each position (by log probability,
        ties by the lower id, as ``jax.lax.top_k``); row 0 is -1.
      top_logprobs: float32 [n, k]: their log probabilities; row 0 is NaN.

    The values are the device's float32 numbers as they are (a logit that is not finite
    gives -inf or NaN here; the JSON responses write such a value as -9999.0).
    """

    token_ids: list[int]
    tokens: list[str]
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    def logprob_sum(self, start: int = 1) -> float:
        """The log probability of ``token_ids[start:]`` given the tokens before them (a
        float64 sum): with ``start = len(context_ids)``, a continuation's log-likelihood."""
        if not 1 <= start <= len(self.token_ids):
            raise ValueError(f"start {start}: expected 1 to {len(self.token_ids)}")
        return float(np.sum(self.logprobs[start:], dtype=np.float64))
