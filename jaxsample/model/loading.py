"""``load_model``: a GGUF file -> (Llama module, Tokenizer)."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from jaxsample.model.config import LlamaConfig
from jaxsample.model.gguf_file import default_model_path, read_gguf
from jaxsample.model.llama import Llama, weights_from_gguf
from jaxsample.model.tokenizer import Tokenizer


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    attn_block: int = 128,
    batch_invariant: bool = False,
):
    """Load a Llama-architecture GGUF file (default: the verified SmolLM2-135M-Instruct).

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32, then stored in
    ``dtype`` (float32 default, or bfloat16; norms stay float32). ``attn_block`` is the
    attention block size (keys per online-softmax step; cache lengths round up to it).
    ``batch_invariant=True`` makes a row's logits bit-identical whatever the batch (see
    :class:`LlamaConfig`), at a speed cost for small batches.

    Returns:
      (model: Llama, tok: Tokenizer).

    Example::

        model, tok = load_model()
        model.config.n_layers   # 30
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype}: allowed float32 or bfloat16")
    gf = read_gguf(default_model_path() if path is None else path)
    tied = "output.weight" not in gf.tensor_names
    cfg = LlamaConfig.from_gguf_metadata(gf.metadata, tie_embeddings=tied)
    cfg = dataclasses.replace(
        cfg, attn_block=int(attn_block), batch_invariant=bool(batch_invariant)
    )
    model = Llama(cfg, weights=weights_from_gguf(gf, cfg), dtype=dtype)
    tok = Tokenizer.from_gguf(gf)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens, model {cfg.vocab_size}")
    return model, tok
