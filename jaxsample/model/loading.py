"""``load_model``: a GGUF file -> (Llama module, Tokenizer)."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from jaxsample.model.config import LlamaConfig
from jaxsample.model.gguf_file import ModelFileError, default_model_path, read_gguf
from jaxsample.model.llama import Llama, check_gguf_tensors, weights_from_gguf
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

    Raises:
      ModelNotFoundError: no file at ``path`` (or no verified default file).
      ModelFileError: the file is not a readable GGUF file, or holds a model this package
        does not run (see docs/model.md, "Supported files"). Every check runs before the
        first weight is converted.

    Example::

        model, tok = load_model()
        model.config.n_layers   # 30
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype}: allowed float32 or bfloat16")
    gf = read_gguf(default_model_path() if path is None else path)
    # Everything that can refuse the file runs before any weight is converted (seconds
    # for a real file): the hyperparameters, the tensor table and the tokenizer.
    tied = "output.weight" not in gf.tensor_names
    try:
        cfg = LlamaConfig.from_gguf_metadata(gf.metadata, tie_embeddings=tied)
    except ModelFileError as err:
        raise ModelFileError(f"{gf.path}: {err}") from None
    cfg = dataclasses.replace(
        cfg, attn_block=int(attn_block), batch_invariant=bool(batch_invariant)
    )
    check_gguf_tensors(gf, cfg)
    tok = Tokenizer.from_gguf(gf)
    if tok.vocab_size != cfg.vocab_size:
        raise ModelFileError(
            f"{gf.path}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}"
        )
    model = Llama(cfg, weights=weights_from_gguf(gf, cfg), dtype=dtype)
    return model, tok
