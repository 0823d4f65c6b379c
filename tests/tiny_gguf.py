"""Test helper: write a small random Llama GGUF file (synthetic byte-level BPE vocabulary).

Tensors are stored as llama.cpp stores them (PyTorch ``[out, in]`` layout, Q/K rows in
llama.cpp's interleaved-RoPE order: random weights have no "true" order, the reference
and the model must simply agree on how the file is read). The token embedding is
quantized to Q8_0 and one matrix to Q4_1, to exercise dequantization.
"""

from __future__ import annotations

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A few merges over GPT-2's byte alphabet ("Ġ" is the space byte).
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "o n", "Ġ 1"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab():
    """(tokens, token_types, merges): 3 control tokens, the 256 byte tokens, merged tokens."""
    from jaxsample.model.tokenizer import bytes_to_unicode

    tokens = list(SPECIALS) + [bytes_to_unicode()[b] for b in range(256)]
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, list(MERGES)


def write_tiny_gguf(
    path,
    *,
    seed=0,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden=96,
    theta=10000.0,
    tied=True,
    quantize=True,
    pre="smollm",
    tokenizer_model="gpt2",
    metadata=None,
    extra_tensors=None,
):
    """Write the file; returns the number of tokens (vocab size).

    ``metadata``: more keys, {key: value} (str, bool, int as uint32 or int32, float as
    float32, or a list of ints as an int32 array); ``extra_tensors``: {name: float32 array}
    appended after the model's tensors (files the loader must refuse).
    """
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    V = len(tokens)
    d = dim // n_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(d)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_array(key, list(value))

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def add(name, arr, qtype=None):
        if qtype is None or not quantize:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add(
        "token_embd.weight",
        rng.standard_normal((V, dim)).astype(np.float32),
        gguf.GGMLQuantizationType.Q8_0,
    )
    add("output_norm.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    if not tied:
        add("output.weight", mat(V, dim))
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        add(p + "attn_q.weight", 2 * mat(n_heads * d, dim), gguf.GGMLQuantizationType.Q4_1)
        add(p + "attn_k.weight", 2 * mat(n_kv_heads * d, dim))
        add(p + "attn_v.weight", mat(n_kv_heads * d, dim))
        add(p + "attn_output.weight", mat(dim, n_heads * d))
        add(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        add(p + "ffn_gate.weight", mat(hidden, dim))
        add(p + "ffn_up.weight", mat(hidden, dim))
        add(p + "ffn_down.weight", mat(dim, hidden))
    for name, arr in (extra_tensors or {}).items():
        add(name, np.asarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return V
