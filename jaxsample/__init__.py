"""jaxsample: every OpenRouter sampling parameter as a pure, per-row JAX function."""

from jaxsample.params import LOGIT_BIAS_MAX as LOGIT_BIAS_MAX
from jaxsample.params import STOP_MAX_BYTES as STOP_MAX_BYTES
from jaxsample.params import InvalidRequestError as InvalidRequestError
from jaxsample.params import SamplingParams as SamplingParams
from jaxsample.params import check_for_model as check_for_model
from jaxsample.params import derive_seed as derive_seed
from jaxsample.params import pack_rows as pack_rows
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams

__all__ = [
    "InvalidRequestError",
    "SamplingParams",
    "check_for_model",
    "derive_seed",
    "pack_rows",
    "LOGIT_BIAS_MAX",
    "STOP_MAX_BYTES",
    "RowParams",
    "TOP_LOGPROBS_MAX",
]
