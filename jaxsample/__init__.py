"""jaxsample: every OpenRouter sampling parameter as a pure, per-row JAX function."""

from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams

__all__ = [
    "RowParams",
    "TOP_LOGPROBS_MAX",
]
