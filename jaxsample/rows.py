"""The per-row sampling parameters as a device pytree.

Every sampling value of a request is an array leaf here, so a jitted sampler that takes a
``RowParams`` never recompiles when a value changes. Shapes below are for one row; a batch
adds a leading axis ``B`` to every field.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

#: The device always computes this many top log probabilities; the host keeps ``n``.
TOP_LOGPROBS_MAX = 20


@struct.dataclass
class RowParams:
    """One row's sampling parameters (see docs/DESIGN.md and ../shared/SPEC.md)."""

    temperature: jax.Array  # shape=(), float32; < 1e-5 means greedy (pack_rows stores 0.0)
    top_k: jax.Array  # shape=(), int32; 0 = off
    top_p: jax.Array  # shape=(), float32; 1.0 = off
    top_a: jax.Array  # shape=(), float32; 0.0 = off
    min_p: jax.Array  # shape=(), float32; 0.0 = off
    repetition_penalty: jax.Array  # shape=(), float32; 1.0 = off
    frequency_penalty: jax.Array  # shape=(), float32; 0.0 = off
    presence_penalty: jax.Array  # shape=(), float32; 0.0 = off
    bias_ids: jax.Array  # shape=(NB,), int32; padded with 0
    bias_values: jax.Array  # shape=(NB,), float32; padded with 0.0
    seed_words: jax.Array  # shape=(2,), uint32; the 64-bit seed as [hi, lo]
    logprobs: jax.Array  # shape=(), bool; report log probabilities (else NaN, and none on top)
    top_logprobs: jax.Array  # shape=(), int32; 0..TOP_LOGPROBS_MAX
    processed_logprobs: jax.Array  # shape=(), bool; logprobs of the processed distribution
    # the user transform chain's per-row values: one dict {param: f32[]} per transform, in
    # chain order (empty without a chain)
    user: Any = ()
