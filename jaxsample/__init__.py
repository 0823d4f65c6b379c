"""jaxsample: every OpenRouter sampling parameter as a pure, per-row JAX function."""

from jaxsample import automata as automata
from jaxsample import transforms as transforms
from jaxsample.api import Completion as Completion
from jaxsample.api import Engine as Engine
from jaxsample.api import choice_seed as choice_seed
from jaxsample.api import generate as generate
from jaxsample.automata import json_mode as json_mode
from jaxsample.automata import stop as stop
from jaxsample.params import LOGIT_BIAS_MAX as LOGIT_BIAS_MAX
from jaxsample.params import STOP_MAX_BYTES as STOP_MAX_BYTES
from jaxsample.params import InvalidRequestError as InvalidRequestError
from jaxsample.params import SamplingParams as SamplingParams
from jaxsample.params import check_for_model as check_for_model
from jaxsample.params import derive_seed as derive_seed
from jaxsample.params import pack_rows as pack_rows
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams
from jaxsample.sampler import Distribution as Distribution
from jaxsample.sampler import History as History
from jaxsample.sampler import Plan as Plan
from jaxsample.sampler import SampleOut as SampleOut
from jaxsample.sampler import SampleResult as SampleResult
from jaxsample.sampler import distribution as distribution
from jaxsample.sampler import distributions as distributions
from jaxsample.sampler import draw as draw
from jaxsample.sampler import log_prob as log_prob
from jaxsample.sampler import processed_logprobs as processed_logprobs
from jaxsample.sampler import processed_logprobs_batch as processed_logprobs_batch
from jaxsample.sampler import processed_logprobs_row as processed_logprobs_row
from jaxsample.sampler import processed_logprobs_rows as processed_logprobs_rows
from jaxsample.sampler import sample as sample
from jaxsample.sampler import sample_batch as sample_batch
from jaxsample.sampler import sample_row as sample_row
from jaxsample.sampler import sample_rows as sample_rows
from jaxsample.sampler import top_logprobs as top_logprobs
from jaxsample.scoring import PromptLogprobs as PromptLogprobs
from jaxsample.transforms import POSITIONS as TRANSFORM_POSITIONS
from jaxsample.transforms import TransformError as TransformError
from jaxsample.transforms import UserTransform as UserTransform

__all__ = [
    "InvalidRequestError",
    "SamplingParams",
    "check_for_model",
    "derive_seed",
    "choice_seed",
    "pack_rows",
    "LOGIT_BIAS_MAX",
    "STOP_MAX_BYTES",
    "RowParams",
    "TOP_LOGPROBS_MAX",
    "History",
    "SampleOut",
    "SampleResult",
    "processed_logprobs",
    "processed_logprobs_batch",
    "processed_logprobs_row",
    "processed_logprobs_rows",
    "sample",
    "sample_batch",
    "sample_row",
    "sample_rows",
    "Completion",
    "Engine",
    "generate",
    "PromptLogprobs",
    "Distribution",
    "Plan",
    "distribution",
    "distributions",
    "draw",
    "log_prob",
    "top_logprobs",
    "UserTransform",
    "TransformError",
    "TRANSFORM_POSITIONS",
    "transforms",
    "automata",
    "json_mode",
    "stop",
    "load_model",
]


#: Submodules the docs name as ``jaxsample.NAME.function`` that ``import jaxsample`` does not
#: load itself: imported on first use (``jaxsample.explore.use_compile_cache()``).
_LAZY_SUBMODULES = ("explore", "engine")


def __getattr__(name):
    # load_model pulls in the model package (GGUF reader, tokenizer): imported on first use
    if name == "load_model":
        from jaxsample.model import load_model

        return load_model
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"jaxsample.{name}")
    raise AttributeError(f"module 'jaxsample' has no attribute {name!r}")
