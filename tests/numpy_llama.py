"""An independent, straightforward Llama forward pass in numpy (float64), test-only.

It reads a GGUF file on its own (``gguf.GGUFReader`` + ``gguf.quants.dequantize``) and
uses the GGUF tensors as stored: Q/K rows in llama.cpp's order, so RoPE rotates
interleaved pairs ``(x[2i], x[2i+1])`` by ``pos * theta**(-2i/d)`` (llama.cpp's "normal"
rope mode). No KV cache, no blocks, no fusion: full causal softmax attention over the
whole sequence, one token row at a time through plain matrix products.
"""

from __future__ import annotations

import numpy as np


class NumpyLlama:
    """Reference forward: ``NumpyLlama(path).logits(ids)`` -> float64 [T, V]."""

    def __init__(self, path: str):
        import gguf

        reader = gguf.GGUFReader(path, "r")
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self.meta = meta
        self.w = {}
        for t in reader.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            self.w[t.name] = arr.reshape([int(n) for n in reversed(t.shape)])
        self.n_layers = int(meta["llama.block_count"])
        self.n_heads = int(meta["llama.attention.head_count"])
        self.n_kv = int(meta["llama.attention.head_count_kv"])
        self.dim = int(meta["llama.embedding_length"])
        self.head_dim = self.dim // self.n_heads
        if "llama.attention.key_length" in meta:
            self.head_dim = int(meta["llama.attention.key_length"])
        self.theta = float(meta.get("llama.rope.freq_base", 10000.0))
        self.eps = float(meta["llama.attention.layer_norm_rms_epsilon"])

    def _rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope_interleaved(self, x, positions):
        """x [T, n, d]: rotate (x[..., 2i], x[..., 2i+1]) by positions[t] * theta**(-2i/d)."""
        d = x.shape[-1]
        out = x.copy()
        for t, p in enumerate(positions):
            for i in range(d // 2):
                ang = p * self.theta ** (-2.0 * i / d)
                c, s = np.cos(ang), np.sin(ang)
                a, b = x[t, :, 2 * i], x[t, :, 2 * i + 1]
                out[t, :, 2 * i] = a * c - b * s
                out[t, :, 2 * i + 1] = a * s + b * c
        return out

    def logits(self, ids) -> np.ndarray:
        """Logits (float64) after each of the tokens ``ids`` (positions 0..T-1): [T, V]."""
        w = self.w
        T = len(ids)
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        x = w["token_embd.weight"][np.asarray(ids)]
        pos = np.arange(T)
        for layer in range(self.n_layers):
            p = f"blk.{layer}."
            h = self._rms(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(T, H, d)
            k = (h @ w[p + "attn_k.weight"].T).reshape(T, K, d)
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, K, d)
            q = self._rope_interleaved(q, pos)
            k = self._rope_interleaved(k, pos)
            out = np.zeros((T, H, d))
            for head in range(H):
                kv = head // (H // K)
                scores = q[:, head] @ k[:, kv].T / np.sqrt(d)  # [T, T]
                scores[np.triu(np.ones((T, T), bool), 1)] = -np.inf
                scores -= scores.max(axis=1, keepdims=True)
                prob = np.exp(scores)
                prob /= prob.sum(axis=1, keepdims=True)
                out[:, head] = prob @ v[:, kv]
            x = x + out.reshape(T, H * d) @ w[p + "attn_output.weight"].T
            h = self._rms(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            up = h @ w[p + "ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
        x = self._rms(x, w["output_norm.weight"])
        out_w = w.get("output.weight", w["token_embd.weight"])
        return x @ out_w.T
