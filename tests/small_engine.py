"""Small engines for the API tests: the real vocabulary and chat template, tiny random weights.

``small_engine()`` is the model of tests/test_decode.py's fixture (logits softened to std ~0.8
so rows really sample). ``nan_engine(engine)`` shares its tokenizer and model structure
with NaN weights, so no token is ever allowed; the compiled loop is shared (same shapes,
same structure). ``with_template(engine, source)`` is the same model with another chat
template (None: a model file without one).
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
from flax import nnx

from jaxsample.api import Engine
from jaxsample.model import Llama, Tokenizer, default_model_path, read_gguf, tiny_config


def small_model(tok: Tokenizer, *, context_length: int = 256, dtype=jnp.float32) -> Llama:
    """A tiny random Llama over the real vocabulary, in the engine's batch-invariant mode, its
    random tied embedding softened (logit std ~8 -> ~0.8) so that rows really sample."""
    cfg = tiny_config(
        vocab_size=tok.vocab_size,
        context_length=context_length,
        eos_id=tok.eos_id,
        batch_invariant=True,
        attn_block=128,
    )
    model = Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    model.embed[...] = model.embed[...] * 0.1
    return model


def real_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(default_model_path()))


def small_engine() -> Engine:
    tok = real_tokenizer()
    return Engine(small_model(tok), tok, model_name="tiny-random")


def nan_engine(engine: Engine) -> Engine:
    model = Llama(engine.model.config, rngs=nnx.Rngs(0))
    model.embed[...] = jnp.full_like(model.embed[...], jnp.nan)
    return Engine(model, engine.tokenizer, model_name="tiny-nan")


def with_template(engine: Engine, source: str | None) -> Engine:
    tok = copy.copy(engine.tokenizer)
    tok.chat_template = source
    return Engine(engine.model, tok, model_name=engine.model_name)


#: A short chat (a system message replaces the template's long default one): its prompt
#: stays within 32 tokens, so most tests share one compiled prompt size.
SYSTEM = {"role": "system", "content": "Be brief."}
HI = [SYSTEM, {"role": "user", "content": "Hi"}]

#: A template that refuses two messages of the same role in a row (as many GGUF templates
#: do with raise_exception), then renders like the model's own.
ALTERNATE_CHECK = (
    "{% for m in messages %}{% if not loop.first and m['role'] == messages[loop.index0 - 1]"
    "['role'] %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% endfor %}"
)
