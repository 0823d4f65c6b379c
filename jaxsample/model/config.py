"""The Llama hyperparameters, read from GGUF metadata or built for tests.

Example::

    cfg = tiny_config()            # 2 layers, dim 64, GQA 4 query heads over 2 kv heads
    cfg.n_heads // cfg.n_kv_heads  # 2
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Token-axis tile: XLA CPU's matmul gives a column the same bits whatever the number of
# columns and whatever its place among them, as long as that number is an ODD multiple of 16
# (measured: 16, 48, 80, 112, ... all agree with each other; 32, 64, 96, ... take another
# kernel path and agree only among themselves; 8 is not enough). See invariant_width.
INVARIANT_TILE = 16


def invariant_width(n: int) -> int:
    """The number of matmul columns used for ``n`` columns in batch-invariant mode: the
    smallest odd multiple of ``INVARIANT_TILE`` that is >= n.

    >>> [invariant_width(n) for n in (1, 16, 17, 32, 33, 48, 49)]
    [16, 16, 48, 48, 48, 48, 80]
    """
    tiles = max(1, -(-n // INVARIANT_TILE))
    return (tiles + (tiles % 2 == 0)) * INVARIANT_TILE


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static hyperparameters of a Llama-architecture decoder (hashable: used as jit static).

    Fields: vocab_size V, dim D (residual width), n_layers L, n_heads H (query heads),
    n_kv_heads K (key/value heads, H % K == 0 for grouped-query attention), head_dim d
    (H * d need not equal D), hidden_dim F (SwiGLU width), rope_theta (RoPE base),
    norm_eps (RMSNorm epsilon), context_length (maximum positions), bos_id / eos_id
    (token ids), tie_embeddings (output projection = token embedding), attn_block
    (keys per block in the blockwise attention; cache lengths are multiples of it),
    batch_invariant (pad the token axis of every matmul to an odd multiple of
    ``INVARIANT_TILE``, :func:`invariant_width`, so a row's arithmetic, hence its logits
    bit for bit, does not depend on the batch size, its place in the batch or the prompt
    padding; costs speed at small batches, see docs/model.md), batched_attention
    (attention for all rows at once with ``vmap`` instead of one row at a time with
    ``lax.map``; None = auto: per row on CPU, where it is faster and keeps rows
    bit-identical whatever the batch, batched on GPU/TPU, where a per-row loop of small
    kernels serializes the batch).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    context_length: int = 2048
    bos_id: int = 1
    eos_id: int = 2
    tie_embeddings: bool = True
    attn_block: int = 128
    batch_invariant: bool = False
    batched_attention: bool | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.attn_block < 1:
            raise ValueError(f"attn_block={self.attn_block} must be >= 1")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (G = H / K)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, tie_embeddings: bool) -> LlamaConfig:
        """Build from GGUF metadata keys ``llama.*`` and ``tokenizer.ggml.*``."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ValueError(
                f"general.architecture={arch!r}: only 'llama' GGUF files are supported"
            )

        def get(key, default=None):
            v = meta.get(f"llama.{key}", default)
            if v is None:
                raise ValueError(f"GGUF metadata lacks llama.{key}")
            return v

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv = int(get("attention.head_count_kv", n_heads))
        head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
        rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(f"partial RoPE (rope.dimension_count={rope_dims}) is not supported")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(meta.get("llama.vocab_size", len(tokens) if tokens is not None else 0))
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_dim=int(get("feed_forward_length")),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(get("context_length", 2048)),
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
            tie_embeddings=tie_embeddings,
        )


def tiny_config(
    vocab_size: int = 49152,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    hidden_dim: int = 128,
    **kw: Any,
) -> LlamaConfig:
    """A small configuration of the same architecture for fast tests (GQA, tied embeddings).

    The default vocabulary is SmolLM2's (49152) so the real tokenizer can drive it; the
    special ids match SmolLM2's (bos 1 = <|im_start|>, eos 2 = <|im_end|>).

    Example::

        model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    """
    kw.setdefault("rope_theta", 10000.0)
    kw.setdefault("context_length", 1024)
    kw.setdefault("attn_block", 32)
    return LlamaConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_dim=hidden_dim,
        **kw,
    )
