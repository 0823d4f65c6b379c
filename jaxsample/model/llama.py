"""The Llama decoder as a Flax NNX module with a preallocated KV cache.

Architecture (per layer): ``x += Wo · attn(RoPE(Wq·n1(x)), RoPE(Wk·n1(x)), Wv·n1(x))`` then
``x += Wdown · (silu(Wgate·n2(x)) * Wup·n2(x))`` with ``n1, n2`` RMSNorm; grouped-query
attention (H query heads share K key/value heads); final RMSNorm; logits against the
(tied) token embedding. Q/K/V are one fused matmul ``[D, (H+2K)d]`` and gate/up another
``[D, 2F]``.

RoPE layout: the module uses the "rotate-half" convention (HF transformers): a head's
vector is split into halves ``(x1, x2)`` and the pair ``(x1[i], x2[i])`` is rotated by
``pos * theta**(-2i/d)``. GGUF Llama files store Q/K rows permuted for llama.cpp's
interleaved-pair RoPE (pairs ``(x[2i], x[2i+1])``); :func:`weights_from_gguf` undoes that
permutation, so both give the same attention scores.

Attention is blockwise with an online softmax over fixed blocks of ``attn_block`` keys:
a block that is entirely masked for a row contributes exactly zero (its max is ``-inf``,
the running max does not change, the rescale factor is exactly 1 and the added terms are
exactly 0). So a row's attention output does not depend on the cache size, on how many
blocks the batch needs, or on other rows. Decode visits only the blocks up to the largest
position in the batch (a ``while_loop`` with a data-dependent trip count).

Example::

    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    cache = model.init_cache(batch=2, max_len=64)
    tokens = jnp.array([[5, 6, 7], [8, 9, 0]], jnp.int32)        # right padded
    logits, cache = model.prefill(tokens, jnp.array([3, 2], jnp.int32), cache)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, cache = model.decode(nxt, jnp.array([3, 2], jnp.int32), cache)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsample.model.config import INVARIANT_TILE, LlamaConfig, invariant_width
from jaxsample.model.gguf_file import ModelFileError


class KVCache(NamedTuple):
    """Preallocated keys/values, one array per layer (so each layer updates in place).

    k[l], v[l]: ``[B, K, S, d]`` in the model dtype; S (``max_len``) is a multiple of
    ``config.attn_block``. Entry ``[b, :, s]`` holds the key/value of row b's token at
    position s; entries beyond a row's current position are ignored (masked).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def _sum_rows(x: jax.Array) -> jax.Array:
    """Sum over axis 0 of x [D, N] -> [1, N] by repeated halving (elementwise adds only).

    XLA CPU's reduce over an axis rounds differently for different N (its vectorization
    changes with the shape); a fixed tree of elementwise adds gives every column the same
    bits whatever N, which keeps rows batch-invariant.
    """
    while x.shape[0] > 1:
        n = x.shape[0]
        half = n // 2
        y = x[:half] + x[half : 2 * half]
        x = jnp.concatenate([y, x[2 * half :]], axis=0) if n % 2 else y
    return x


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Feature-major RMSNorm: ``x / sqrt(mean(x**2, axis=0) + eps) * w``; x [D, N], w [D]."""
    x = x.astype(jnp.float32)
    ms = _sum_rows(x * x) * (1.0 / x.shape[0])
    return x * jax.lax.rsqrt(ms + eps) * w.astype(jnp.float32).reshape(-1, 1)


def _mm(w: jax.Array, x: jax.Array) -> jax.Array:
    """``w @ x`` (w [out, in], x [in, N]) with x cast to w's dtype, float32 result.

    Feature-major on purpose: with the large weight as the left operand XLA CPU's matmul
    is 2-3x faster at N = 8..32 than ``x.T @ w.T``.
    """
    return jnp.dot(w, x.astype(w.dtype), preferred_element_type=jnp.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin of ``theta**(-2i/d) * positions[n]``, i < d/2: each [d/2, N]; positions [N]."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = jnp.asarray(inv_freq, jnp.float32).reshape(-1, 1)
    ang = inv_freq * positions.astype(jnp.float32).reshape(1, -1)
    return jnp.cos(ang), jnp.sin(ang)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE, feature-major. x [n, d, N] (n heads); cos/sin [d/2, N]."""
    half = x.shape[1] // 2
    x1, x2 = x[:, :half], x[:, half:]
    c, s = cos[None], sin[None]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_last(x: jax.Array, n: int) -> jax.Array:
    """Zero-pad the last axis of x to length n, as an array XLA cannot see through.

    The padded array goes through ``optimization_barrier``: otherwise XLA rewrites
    ``dot(W, pad(x))`` into ``pad(dot(W, x))`` and the matmul runs on the unpadded width
    again, which defeats ``batch_invariant``. When x already has n columns it is still
    padded (by one column, then sliced back): a bare x, often a transposed view, let XLA
    CPU fold the transpose into the matmul and pick another kernel than for a padded
    operand. With bfloat16 weights that kernel rounded differently (a float32 matmul on
    converted weights instead of XNNPACK's bfloat16 fusion), so a batch that fills the
    invariant width exactly (16, 48 rows) gave other last bits than a padded one. Float32
    bits are the same either way (tests/test_model.py).
    """
    extra = n - x.shape[-1]
    pad = [(0, 0)] * (x.ndim - 1) + [(0, max(extra, 1))]
    padded = jax.lax.optimization_barrier(jnp.pad(x, pad))
    return padded if extra > 0 else padded[..., :n]


def _attend_row(qh, q_pos, ck, cv, n_blocks, blk: int, row=None):
    """One row's blockwise causal attention with an online softmax over key blocks.

    qh: float32 [K, G, T, d] queries, already scaled by d**-0.5 (K kv heads, G query heads
    per kv head); q_pos: int32 [1, 1, T, 1], each query's position (it sees keys at
    positions <= q_pos); ck, cv: [K, S, d] the row's cache, or with ``row`` (an int32
    scalar) the whole batch's [B, K, S, d], of which each block is read at that row (so the
    row's cache is never copied out whole); n_blocks: int32 scalar, the blocks
    0..n_blocks-1 of ``blk`` keys to visit. Returns float32 [K, G, T, d].

    Per block: ``m' = max(m, max s)``, ``l' = e^(m-m') l + sum e^(s-m')``,
    ``acc' = e^(m-m') acc + e^(s-m') v``. A block masked entirely for a query leaves
    (m, l, acc) bit-for-bit unchanged, so visiting extra blocks never changes a result.
    Block 0 always holds position 0, so m is finite after it.
    """
    K, G, T, d = qh.shape

    def block(c, j):
        if row is None:
            return jax.lax.dynamic_slice_in_dim(c, j * blk, blk, axis=1).astype(jnp.float32)
        one = jax.lax.dynamic_slice(c, (row, 0, j * blk, 0), (1, K, blk, d))
        return one[0].astype(jnp.float32)

    def body(j, carry):
        m, l, acc = carry
        kb, vb = block(ck, j), block(cv, j)
        s = jnp.einsum("kgtd,ksd->kgts", qh, kb, preferred_element_type=jnp.float32)
        k_pos = (j * blk + jnp.arange(blk, dtype=jnp.int32)).reshape(1, 1, 1, blk)
        s = jnp.where(k_pos <= q_pos, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("kgts,ksd->kgtd", p, vb, preferred_element_type=jnp.float32)
        return m_new, l, alpha[..., None] * acc + pv

    init = (
        jnp.full((K, G, T), -jnp.inf, jnp.float32),
        jnp.zeros((K, G, T), jnp.float32),
        jnp.zeros((K, G, T, d), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return acc / l[..., None]


def _attend(qh, q_pos, ck, cv, last_pos, blk: int, batched: bool | None = None):
    """Attention for every row: one row at a time (``lax.map``) or all at once (``vmap``).

    qh [B, K, G, T, d]; q_pos [B, 1, 1, T, 1]; ck, cv [B', K, S, d] with B' >= B (row b of
    qh reads cache row b; rows past B are not read); last_pos int32 [B], the
    largest query position of each row that matters (row b visits blocks
    0..last_pos[b] // blk only). Returns float32 [B, K, G, T, d].

    Row by row (the CPU default): every row runs the same-shaped computation whatever the
    batch, so its result is bit-identical alone or in any batch (a batched einsum is not: XLA
    CPU vectorizes it differently for different batch sizes), and it is faster on CPU.
    Batched (``batched=True``, the GPU/TPU default; None = by backend): one ``vmap`` over the
    rows; the block loop runs to the largest row's block count, and the extra blocks a row
    visits are fully masked for it, so they leave its result unchanged.
    """

    if batched is None:
        batched = jax.default_backend() != "cpu"
    if batched:
        B = qh.shape[0]
        if ck.shape[0] != B:  # a cache with more rows than the batch (decode): rows 0..B-1
            ck, cv = ck[:B], cv[:B]
        return jax.vmap(lambda q, qp, k, v, last: _attend_row(q, qp, k, v, last // blk + 1, blk))(
            qh, q_pos, ck, cv, last_pos
        )

    # Row by row, each block read from the whole cache at the row's index: mapping over the
    # cache itself made XLA copy out every row's whole cache at every layer (a decode step
    # cost grew with max_len, 59 -> 175 ms for SmolLM2 at 16 slots, 256 -> 2048 positions).
    def one(args):
        q, qp, last, b = args
        return _attend_row(q, qp, ck, cv, last // blk + 1, blk, row=b)

    rows = jnp.arange(qh.shape[0], dtype=jnp.int32)
    return jax.lax.map(one, (qh, q_pos, last_pos, rows))


class Block(nnx.Module):
    """One decoder layer's weights, stored ``[out, in]`` (as in GGUF / PyTorch).

    wqkv [(H+2K)d, D] (Q rows, then K, then V; Q/K rows in rotate-half order),
    wo [D, H d], w_gate_up [2F, D] (gate rows then up rows), w_down [D, F]; norms [D].
    """

    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs | None, weights=None):
        D, H, K, d, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
        if weights is None:
            init = jax.nn.initializers.normal

            def w(shape):
                return init(shape[1] ** -0.5)(rngs.params(), shape, jnp.float32)

            weights = {
                "attn_norm": jnp.ones((D,), jnp.float32),
                "wqkv": w(((H + 2 * K) * d, D)),
                "wo": w((D, H * d)),
                "ffn_norm": jnp.ones((D,), jnp.float32),
                "w_gate_up": w((2 * F, D)),
                "w_down": w((D, F)),
            }
        self.attn_norm = nnx.Param(jnp.asarray(weights["attn_norm"], jnp.float32))
        self.wqkv = nnx.Param(jnp.asarray(weights["wqkv"], dtype))
        self.wo = nnx.Param(jnp.asarray(weights["wo"], dtype))
        self.ffn_norm = nnx.Param(jnp.asarray(weights["ffn_norm"], jnp.float32))
        self.w_gate_up = nnx.Param(jnp.asarray(weights["w_gate_up"], dtype))
        self.w_down = nnx.Param(jnp.asarray(weights["w_down"], dtype))

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: LlamaConfig):
        """x [D, N] -> q [H, d, N], k [K, d, N] (both rotated), v [K, d, N]."""
        H, K, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = _mm(self.wqkv[...], _rms_norm(x, self.attn_norm[...], cfg.norm_eps))
        n = qkv.shape[1]
        q = _apply_rope(qkv[: H * d].reshape(H, d, n), cos, sin)
        k = _apply_rope(qkv[H * d : (H + K) * d].reshape(K, d, n), cos, sin)
        return q, k, qkv[(H + K) * d :].reshape(K, d, n)

    def finish(self, x: jax.Array, attn: jax.Array, cfg: LlamaConfig) -> jax.Array:
        """Residual + output projection + SwiGLU MLP. x [D, N], attn [H d, N] -> [D, N]."""
        x = x + _mm(self.wo[...], attn)
        gu = _mm(self.w_gate_up[...], _rms_norm(x, self.ffn_norm[...], cfg.norm_eps))
        F = cfg.hidden_dim
        return x + _mm(self.w_down[...], jax.nn.silu(gu[:F]) * gu[F:])


class Llama(nnx.Module):
    """Llama decoder with tied (or separate) output embedding and a preallocated KV cache.

    Construct randomly (``Llama(cfg, rngs=nnx.Rngs(0))``) or from converted weights
    (``Llama(cfg, weights=weights_from_gguf(gf, cfg))``; see :func:`load_model`).

    ``prefill`` and ``decode`` are pure in (module state, inputs, cache): use them inside
    ``jax.jit`` through ``nnx.split`` / ``nnx.merge``::

        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, tokens, positions, cache):
            return nnx.merge(graphdef, state).decode(tokens, positions, cache)
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
        weights: dict | None = None,
    ):
        if weights is None and rngs is None:
            raise ValueError("Llama needs rngs (random init) or weights")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        cfg = config
        if weights is None:
            emb = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), jnp.float32)
            weights = {"embed": emb, "norm": jnp.ones((cfg.dim,), jnp.float32)}
            if not cfg.tie_embeddings:
                weights["output"] = cfg.dim**-0.5 * jax.random.normal(
                    rngs.params(), (cfg.vocab_size, cfg.dim), jnp.float32
                )
            layers = [None] * cfg.n_layers
        else:
            layers = weights["layers"]
        self.embed = nnx.Param(jnp.asarray(weights["embed"], dtype))
        self.norm = nnx.Param(jnp.asarray(weights["norm"], jnp.float32))
        if not cfg.tie_embeddings:
            self.output = nnx.Param(jnp.asarray(weights["output"], dtype))
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs, weights=lw) for lw in layers])

    # ----------------------------------------------------------------- helpers
    def _embed(self, tokens: jax.Array) -> jax.Array:
        """int32 [N] -> float32 [D, N] (embedding rows, feature-major)."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32).T

    def _logits(self, h: jax.Array) -> jax.Array:
        """h [D, N] -> float32 logits [N, V] (final RMSNorm, then the output embedding)."""
        n = h.shape[1]
        if self.config.batch_invariant:
            h = _pad_last(h, invariant_width(n))
        h = _rms_norm(h, self.norm[...], self.config.norm_eps)
        out = self.embed[...] if self.config.tie_embeddings else self.output[...]
        # The barrier keeps XLA from folding the transpose into the matmul (it would pick a
        # different matmul kernel depending on whether the batch was padded).
        return jax.lax.optimization_barrier(_mm(out, h))[:, :n].T

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """Zeroed KV cache for ``batch`` rows and at least ``max_len`` positions.

        The length is rounded up to a multiple of ``config.attn_block``; returns a
        :class:`KVCache` with k[l], v[l] of shape [batch, K, S, d].
        """
        cfg = self.config
        if max_len < 1 or batch < 1:
            raise ValueError(
                f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}"
            )
        blk = cfg.attn_block
        S = -(-max_len // blk) * blk
        shape = (batch, cfg.n_kv_heads, S, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(cfg.n_layers))
        return KVCache(k=zeros, v=tuple(jnp.zeros(shape, self.dtype) for _ in range(cfg.n_layers)))

    # ----------------------------------------------------------------- prefill
    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
        """Run right-padded prompts through the model in one pass and fill the cache.

        Args:
          tokens: int32 [B, T], row b's prompt in ``tokens[b, :lengths[b]]`` (the rest is
            padding; any id). T <= cache.max_len.
          lengths: int32 [B], 1 <= lengths[b] <= T.
          cache: :class:`KVCache` with batch B (its content is overwritten for 0..T-1).

        Returns:
          (logits float32 [B, V] at each row's last prompt token ``lengths[b]-1``, cache).
        """
        h, last, cache = self._forward(tokens, lengths, cache)
        B = tokens.shape[0]
        h_last = jnp.take_along_axis(h, last.reshape(1, B, 1), axis=2)
        return self._logits(h_last.reshape(-1, B)), cache

    def _forward(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
        """The layers of :meth:`prefill`: ``(h, last, cache)`` with h float32 [D, B, T'] the
        final hidden states (before the final norm) of every position, T' the padded length
        (``T`` rounded up to whole tiles in batch-invariant mode), last int32 [B] each row's
        last prompt position, and the cache filled for positions 0..T'-1."""
        cfg = self.config
        B, T = tokens.shape
        S, blk = cache.max_len, cfg.attn_block
        if T > S:
            raise ValueError(f"prompt length {T} exceeds the cache length {S}")
        H, K, d, G = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.group_size
        if cfg.batch_invariant:  # rows padded to whole tiles, as in any batch
            T = min(_round_up(T, INVARIANT_TILE), S)
            tokens = _pad_last(tokens, T)
        # Row b's queries that matter end at lengths[b]-1; later (padding) queries still see
        # block 0 at least, so they stay finite.
        last = jnp.clip(lengths.astype(jnp.int32) - 1, 0, T - 1)
        # With batch_invariant, the matmuls run on an odd number of tiles of columns (zero
        # columns appended): see invariant_width.
        N = B * T
        Np = invariant_width(N) if cfg.batch_invariant else N
        x = self._embed(_pad_last(tokens.reshape(-1), Np))  # [D, Np], column b*T + t
        pos = jnp.arange(T, dtype=jnp.int32)
        cos, sin = rope_angles(_pad_last(jnp.tile(pos, B), Np), d, cfg.rope_theta)
        q_pos = jnp.broadcast_to(pos.reshape(1, 1, 1, T, 1), (B, 1, 1, T, 1))
        new_k, new_v = [], []
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin, cfg)
            q, k, v = q[..., :N], k[..., :N], v[..., :N]
            k = k.reshape(K, d, B, T).transpose(2, 0, 3, 1).astype(self.dtype)  # [B,K,T,d]
            v = v.reshape(K, d, B, T).transpose(2, 0, 3, 1).astype(self.dtype)
            ck = jax.lax.dynamic_update_slice(cache.k[li], k, (0, 0, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache.v[li], v, (0, 0, 0, 0))
            new_k.append(ck)
            new_v.append(cv)
            qh = (q * d**-0.5).reshape(K, G, d, B, T).transpose(3, 0, 1, 4, 2)  # [B,K,G,T,d]
            attn = _attend(qh, q_pos, ck, cv, last, blk, cfg.batched_attention)
            attn = attn.transpose(1, 2, 4, 0, 3).reshape(H * d, N)
            x = layer.finish(x, _pad_last(attn, Np), cfg)
        return x[:, :N].reshape(-1, B, T), last, KVCache(k=tuple(new_k), v=tuple(new_v))

    # ----------------------------------------------------------------- every position
    def hidden(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """The final hidden states (before the final norm) of every position of right-padded
        prompts, as :meth:`prefill` computes them (with a KV cache of its own, dropped).

        Args:
          tokens: int32 [B, T], row b's prompt in ``tokens[b, :lengths[b]]``.
          lengths: int32 [B], 1 <= lengths[b] <= T.

        Returns:
          float32 [D, B, T'] (feature-major; T' >= T is the padded length, see
          :meth:`prefill`): column ``[:, b, t]`` is position t of row b, meaningful for
          ``t < lengths[b]``. ``position_logits(h[:, b, t:t+1])`` gives the logits
          ``prefill`` gives for the prompt ``tokens[b, :t+1]``; in batch-invariant mode the
          same bits, whatever the batch, the padding or t's place in it.
        """
        h, _, _ = self._forward(tokens, lengths, self.init_cache(*tokens.shape))
        return h

    def position_logits(self, h: jax.Array) -> jax.Array:
        """float32 logits [N, V] of final hidden states h [D, N] (from :meth:`hidden`): the
        final RMSNorm and the output projection, as :meth:`prefill` and :meth:`decode` apply
        them (padded to the invariant width in batch-invariant mode)."""
        return self._logits(h)

    # ----------------------------------------------------------------- decode
    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """One decode step for every row at its own position.

        Args:
          tokens: int32 [B], the token at ``positions[b]`` of row b.
          positions: int32 [B], 0 <= positions[b] < cache.max_len.
          cache: :class:`KVCache`; rows' entries 0..positions[b]-1 must be filled. It may
            have more rows than B (the slot engine's narrow chunks): token b uses cache row
            b, and the rows past B are left as they are.

        Returns:
          (float32 logits [B, V] predicting position ``positions[b] + 1``, the cache with
          K/V written at ``positions[b]``). Row b attends to cache entries 0..positions[b].
        """
        cfg = self.config
        (B,) = tokens.shape
        blk = cfg.attn_block
        H, K, d, G = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.group_size
        positions = positions.astype(jnp.int32)
        # With batch_invariant, the matmuls run on Bp >= B columns (zero tokens appended).
        Bp = invariant_width(B) if cfg.batch_invariant else B
        x = self._embed(_pad_last(tokens, Bp))  # [D, Bp]
        cos, sin = rope_angles(_pad_last(positions, Bp), d, cfg.rope_theta)  # [d/2, Bp]
        rows = jnp.arange(B, dtype=jnp.int32).reshape(B, 1)
        heads = jnp.arange(K, dtype=jnp.int32).reshape(1, K)
        pos_col = positions.reshape(B, 1)
        q_pos = positions.reshape(B, 1, 1, 1, 1)
        new_k, new_v = [], []
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin, cfg)
            q, k, v = q[..., :B], k[..., :B], v[..., :B]
            k = k.transpose(2, 0, 1).astype(self.dtype)  # [B, K, d]
            v = v.transpose(2, 0, 1).astype(self.dtype)
            ck = cache.k[li].at[rows, heads, pos_col].set(k)
            cv = cache.v[li].at[rows, heads, pos_col].set(v)
            new_k.append(ck)
            new_v.append(cv)
            qh = (q * d**-0.5).reshape(K, G, d, B).transpose(3, 0, 1, 2).reshape(B, K, G, 1, d)
            attn = _attend(qh, q_pos, ck, cv, positions, blk, cfg.batched_attention)
            x = layer.finish(x, _pad_last(attn.reshape(B, H * d).T, Bp), cfg)
        return self._logits(x[:, :B]), KVCache(k=tuple(new_k), v=tuple(new_v))


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF (interleaved-pair) row order -> rotate-half row order, per head.

    llama.cpp's converter maps HF row ``half * d/2 + i`` of each head to GGUF row
    ``2 * i + half``; this is the inverse. w: [n_heads * d, in].
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> ``[out, in]`` shape of every tensor a GGUF file of ``cfg`` holds (the
    llama.cpp names; ``output.weight`` only when the embedding is not tied)."""
    D, H, K, d, F, V = (
        cfg.dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.hidden_dim,
        cfg.vocab_size,
    )
    out = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (V, D)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        out |= {
            p + "attn_norm.weight": (D,),
            p + "attn_q.weight": (H * d, D),
            p + "attn_k.weight": (K * d, D),
            p + "attn_v.weight": (K * d, D),
            p + "attn_output.weight": (D, H * d),
            p + "ffn_norm.weight": (D,),
            p + "ffn_gate.weight": (F, D),
            p + "ffn_up.weight": (F, D),
            p + "ffn_down.weight": (D, F),
        }
    return out


def check_gguf_tensors(gf, cfg: LlamaConfig) -> None:
    """Check a GGUF file's tensor table against ``cfg`` without reading any tensor data.

    Raises :class:`~jaxsample.model.gguf_file.ModelFileError` naming the file when a
    tensor is missing, has another shape than the metadata implies, has a type the
    ``gguf`` package cannot dequantize, or when the file holds a tensor the model would
    not use: biases, ``rope_freqs.weight`` (Llama 3.1 RoPE frequency factors), experts...
    A file whose extra tensors were ignored would run as another model (llama.cpp refuses
    it too: "wrong number of tensors").
    """
    import gguf

    want = expected_tensors(cfg)
    names = gf.tensor_names
    problems = []
    extra = [n for n in names if n not in want]
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        problems.append(f"tensors the Llama model here does not use ({shown}): not supported")
    have = set(names)
    missing = [n for n in want if n not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.append(f"lacks tensor {missing[0]}{more}")
    for name, shape in want.items():
        if name in have and gf.tensor_shape(name) != shape:
            problems.append(
                f"tensor {name} has shape {gf.tensor_shape(name)}, the metadata implies {shape}"
            )
            break
    for qtype in sorted({gf.tensor_type(n) for n in have}):
        _, type_size = gguf.constants.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:
            problems.append(
                f"tensors of type {qtype.name}, which the gguf package cannot dequantize"
            )
    if problems:
        raise ModelFileError(f"{gf.path}: " + "; ".join(problems))


def weights_from_gguf(gf, cfg: LlamaConfig) -> dict:
    """Convert GGUF tensors (``token_embd``, ``blk.N.attn_q`` ...) to this module's layout.

    Returns float32 numpy arrays: embed [V, D], norm [D], optional output [V, D], and
    ``layers``: a list of dicts with attn_norm [D], wqkv [(H+2K)d, D] (Q/K rows un-permuted
    to rotate-half order), wo [D, H d], ffn_norm [D], w_gate_up [2F, D], w_down [D, F]
    (all ``[out, in]``). The tensor table is checked first (:func:`check_gguf_tensors`).
    """
    check_gguf_tensors(gf, cfg)
    H, K = cfg.n_heads, cfg.n_kv_heads
    out = {"embed": gf.tensor("token_embd.weight"), "norm": gf.tensor("output_norm.weight")}
    if not cfg.tie_embeddings:
        out["output"] = gf.tensor("output.weight")
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        q = _unpermute_rope_rows(gf.tensor(p + "attn_q.weight"), H)
        k = _unpermute_rope_rows(gf.tensor(p + "attn_k.weight"), K)
        v = gf.tensor(p + "attn_v.weight")
        gate, up = gf.tensor(p + "ffn_gate.weight"), gf.tensor(p + "ffn_up.weight")
        layers.append(
            {
                "attn_norm": gf.tensor(p + "attn_norm.weight"),
                "wqkv": np.concatenate([q, k, v], axis=0),
                "wo": gf.tensor(p + "attn_output.weight"),
                "ffn_norm": gf.tensor(p + "ffn_norm.weight"),
                "w_gate_up": np.concatenate([gate, up], axis=0),
                "w_down": gf.tensor(p + "ffn_down.weight"),
            }
        )
    out["layers"] = layers
    return out
