"""The Llama hyperparameters, read from GGUF metadata or built for tests.

Example::

    cfg = tiny_config()            # 2 layers, dim 64, GQA 4 query heads over 2 kv heads
    cfg.n_heads // cfg.n_kv_heads  # 2
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxsample.model.gguf_file import ModelFileError

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
        """Build from GGUF metadata keys ``llama.*`` and ``tokenizer.ggml.*``.

        Raises :class:`~jaxsample.model.gguf_file.ModelFileError` for a file this module
        would not compute as written: another architecture, a missing or malformed
        hyperparameter, or any key of :func:`unsupported_metadata` (RoPE scaling, mixture
        of experts, sliding-window attention, ...). Silently running without such a
        feature would give other logits than the model's.
        """
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ModelFileError(
                f"general.architecture={arch!r}: only 'llama' GGUF files are supported"
            )
        problems = unsupported_metadata(meta)
        if problems:
            raise ModelFileError("not supported: " + "; ".join(problems))

        def get(key, default=None, *, cast=int):
            v = meta.get(f"llama.{key}", default)
            if v is None:
                raise ModelFileError(f"GGUF metadata lacks llama.{key}")
            if isinstance(v, (list, tuple)):  # llama.cpp allows per-layer values
                if not v or any(x != v[0] for x in v):
                    raise ModelFileError(
                        f"llama.{key} differs between layers ({_short(v)}): not supported"
                    )
                v = v[0]
            try:
                out = cast(v)
            except (TypeError, ValueError):
                raise ModelFileError(f"llama.{key}={_short(v)} is not a number") from None
            if cast is int and out < 1:
                raise ModelFileError(f"llama.{key}={out} must be >= 1")
            return out

        dim = get("embedding_length")
        n_heads = get("attention.head_count")
        n_kv = get("attention.head_count_kv", n_heads)
        head_dim = get("attention.key_length", dim // n_heads or None)
        value_dim = get("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise ModelFileError(
                f"llama.attention.value_length={value_dim} differs from the key length "
                f"{head_dim}: not supported"
            )
        rope_dims = get("rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise ModelFileError(
                f"llama.rope.dimension_count={rope_dims}: partial RoPE (fewer rotated "
                f"dimensions than the head size {head_dim}) is not supported"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get("vocab_size", len(tokens) if tokens else None)
        try:
            return cls(
                vocab_size=vocab,
                dim=dim,
                n_layers=get("block_count"),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                hidden_dim=get("feed_forward_length"),
                rope_theta=get("rope.freq_base", 10000.0, cast=float),
                norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, cast=float),
                context_length=get("context_length", 2048),
                bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
                eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
                tie_embeddings=tie_embeddings,
            )
        except ModelFileError:
            raise
        except (TypeError, ValueError) as err:  # __post_init__: heads, odd head size
            raise ModelFileError(str(err)) from None


def _short(v: Any) -> str:
    """``repr(v)``, cut to 60 characters (a metadata value may be a long list)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# llama.* keys the model reads (LlamaConfig fields, or checked against them).
READ_KEYS = frozenset(
    {
        "vocab_size",
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "rope.dimension_count",
        "rope.freq_base",
    }
)

# llama.* keys accepted at the values that change nothing (llama.cpp's defaults), with
# what the feature is. Any other value is refused.
NEUTRAL_KEYS = {
    "expert_count": ((0,), "mixture of experts"),
    "expert_used_count": ((0,), "mixture of experts"),
    "attention.sliding_window": ((0,), "sliding-window attention"),
    "attention.causal": ((True,), "non-causal attention"),
    "attention.clamp_kqv": ((0,), "clamped Q/K/V"),
    "attention.max_alibi_bias": ((0,), "ALiBi position bias"),
    "attn_logit_softcapping": ((0,), "attention logit soft-capping"),
    "final_logit_softcapping": ((0,), "final logit soft-capping"),
    "logit_scale": ((1,), "scaled logits"),
    "embedding_scale": ((1,), "a scaled embedding"),
    "residual_scale": ((1,), "a scaled residual"),
    "pooling_type": ((0,), "pooled (embedding-model) output"),
    "rope.scaling.attn_factor": ((1,), "RoPE attention scaling"),
}

# llama.* keys with no effect on the computation here: what the RoPE scaling was trained
# with (used only with scaling, refused below) and the tensor layout of an old converter
# (its files hold the same Q/K row order).
INERT_KEYS = frozenset(
    {"rope.scaling.original_context_length", "rope.scaling.finetuned", "tensor_data_layout"}
)


# Read together by unsupported_metadata.
_ROPE_SCALING_KEYS = frozenset({"rope.scaling.type", "rope.scaling.factor", "rope.scale_linear"})


def unsupported_metadata(meta: dict[str, Any]) -> list[str]:
    """Every metadata entry of a Llama GGUF file that asks for something this module does
    not compute, as ``"key=value (what)"`` strings (empty: the file is supported).

    - RoPE scaling: ``llama.rope.scaling.type`` other than ``"none"`` with a factor
      (``llama.rope.scaling.factor``, or the older ``llama.rope.scale_linear``) other than
      1; llama.cpp reads an absent or 0 factor as 1 and an absent type as linear.
    - :data:`NEUTRAL_KEYS` (mixture of experts, sliding window, ALiBi, soft-capping,
      logit/embedding/residual scales, ...) at any value but the neutral one.
    - ``split.count`` > 1: a model split over several files.
    - any other ``llama.*`` key: the loader does not know what it changes, so it refuses it
      rather than ignore it (:data:`READ_KEYS` and :data:`INERT_KEYS` are the known ones).
    """
    out = []
    stype = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if stype != "none" and factor not in (None, 0, 1):
        key = "llama.rope.scaling.factor"
        if key not in meta:
            key = "llama.rope.scale_linear"
        what = f"llama.rope.scaling.type={stype!r} with " if stype is not None else ""
        out.append(f"{what}{key}={factor!r} (RoPE scaling; only type 'none' or factor 1)")
    for key, value in meta.items():
        if key == "split.count" and isinstance(value, int) and value > 1:
            out.append(f"split.count={value} (a model split over several files)")
        if not key.startswith("llama."):
            continue
        k = key[len("llama.") :]
        if k in READ_KEYS or k in INERT_KEYS or k in _ROPE_SCALING_KEYS:
            continue
        if k in NEUTRAL_KEYS:
            neutral, what = NEUTRAL_KEYS[k]
            if not (isinstance(value, (int, float)) and value in neutral):
                out.append(f"{key}={_short(value)} ({what})")
        else:
            out.append(f"{key}={_short(value)} (a key this loader does not implement)")
    return out


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
