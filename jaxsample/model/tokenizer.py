"""Byte-level BPE tokenizer built from GGUF metadata with the ``tokenizers`` package.

GGUF keys used: ``tokenizer.ggml.model`` (must be ``gpt2``: byte-level BPE),
``tokenizer.ggml.tokens`` (id -> token string in GPT-2's byte-to-unicode alphabet),
``tokenizer.ggml.merges`` ("a b" pairs in priority order), ``tokenizer.ggml.token_type``
(1 normal, 3 control, 4 user-defined; control and user-defined tokens are matched whole
in the input text before BPE), ``tokenizer.ggml.pre`` (the pre-tokenizer), the bos/eos ids
and ``tokenizer.chat_template``.

Pre-tokenizer for ``smollm`` (also starcoder, refact, ...): every Unicode number
character (``\\p{N}``) is its own piece, then GPT-2's split
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``. That
is HF's ``Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)])``
(SmolLM2's tokenizer.json) and llama.cpp's regex list for this pre type.

Example::

    tok = Tokenizer.from_gguf(read_gguf(default_model_path()))
    ids = tok.encode("Hello world")       # [19556, 905]
    tok.decode(ids)                        # 'Hello world'
"""

from __future__ import annotations

import functools
import json

from jaxsample.model.chat import ChatTemplateError, render_chat
from jaxsample.model.gguf_file import ModelFileError

# Pre-tokenizer types whose split is "each \p{N} alone, then GPT-2's regex".
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais", None}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (256 entries).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 upward
    in byte order.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Byte-level BPE tokenizer (``tokenizers`` backend) plus the model's chat template.

    Attributes:
      vocab_size: number of ids.
      bos_id, eos_id: special ids from the GGUF metadata.
      special_ids: frozenset of control/user-defined token ids (matched whole in text).
      token_bytes: list[bytes], the raw bytes each id stands for; b"" for special ids
        (a special token adds nothing to the generated text).
      shown_bytes: list[bytes], the bytes that log probabilities report for each id: the
        ``token_bytes`` of a normal id, the UTF-8 of the token's own text for a special id
        (``b"<|im_end|>"``), as the OpenAI API and vLLM show special tokens.
      missing_bytes: frozenset of the byte values (0..255) without a byte token: text
        with such a byte loses it when encoded (SmolLM2 lacks 21, e.g. 0x04 for U+0004).
      chat_template: the jinja2 source stored in the file (or None).
    """

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None,
        *,
        pre: str | None = "smollm",
        bos_id: int | None = None,
        eos_id: int | None = None,
        chat_template: str | None = None,
    ):
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if token_types is None:
            token_types = [1] * len(tokens)
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.special_ids = frozenset(i for i, t in enumerate(token_types) if t in (3, 4))
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=False)
        tk = HFTokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGITS_THEN_GPT2:
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        elif pre in _GPT2:
            tk.pre_tokenizer = byte_level
        else:
            raise ValueError(
                f"tokenizer.ggml.pre={pre!r} is not supported (known: "
                f"{sorted(p for p in _DIGITS_THEN_GPT2 | _GPT2 if p)})"
            )
        tk.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(tokens[i], special=True, normalized=False) for i in sorted(self.special_ids)
        ]
        tk.add_special_tokens(specials)
        self._tk = tk
        inv = {c: b for b, c in bytes_to_unicode().items()}
        tb = []
        shown = []
        for i, t in enumerate(tokens):
            if i in self.special_ids:
                tb.append(b"")
                shown.append(t.encode("utf-8"))
                continue
            try:
                tb.append(bytes(inv[c] for c in t))
            except KeyError:  # not a byte-level string: take its UTF-8
                tb.append(t.encode("utf-8"))
            shown.append(tb[-1])
        self.token_bytes: list[bytes] = tb
        self.shown_bytes: list[bytes] = shown
        self.missing_bytes = frozenset(b for b, c in bytes_to_unicode().items() if c not in vocab)

    @classmethod
    def from_gguf(cls, gf) -> Tokenizer:
        """Build from a :class:`~jaxsample.model.gguf_file.GGUFFile`'s metadata.

        Raises :class:`~jaxsample.model.gguf_file.ModelFileError`, naming the file, when
        the tokenizer is not byte-level BPE with a known pre-tokenizer, or its keys are
        missing or inconsistent (a bos/eos id outside the vocabulary, a merge of unknown
        tokens).
        """
        m = gf.metadata
        where = f"{gf.path}: " if getattr(gf, "path", None) else ""
        kind = m.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelFileError(
                f"{where}tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is supported"
            )
        tokens, merges = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ModelFileError(f"{where}the tokenizer lacks tokenizer.ggml.tokens or .merges")
        for key in ("bos", "eos"):
            i = m.get(f"tokenizer.ggml.{key}_token_id")
            if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
                raise ModelFileError(
                    f"{where}tokenizer.ggml.{key}_token_id={i!r} is not an id of the "
                    f"{len(tokens)} tokens"
                )
        try:
            return cls(
                list(tokens),
                list(merges),
                list(m.get("tokenizer.ggml.token_type") or []) or None,
                pre=m.get("tokenizer.ggml.pre"),
                bos_id=m.get("tokenizer.ggml.bos_token_id"),
                eos_id=m.get("tokenizer.ggml.eos_token_id"),
                chat_template=m.get("tokenizer.chat_template"),
            )
        except Exception as err:  # an unknown pre type; tokenizers' errors on bad merges
            raise ModelFileError(f"{where}{err}") from err

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added; special-token strings map to their ids,
        wherever they are (in a rendered chat, inside message content too: docs/model.md).

        Example: ``tok.encode("<|im_start|>user")`` -> ``[1, 4093]``.
        """
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel."""
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (bytes joined, invalid UTF-8 replaced by U+FFFD).

        Special tokens appear as their text (``<|im_end|>``) unless ``skip_special_tokens``.
        ``decode(encode(x)) == x`` for every str x whose UTF-8 bytes all have a token, i.e.
        none is in ``missing_bytes``: ``encode`` drops such a byte (no unknown token, as in
        HF tokenizers), so with SmolLM2's vocabulary ``decode(encode("a\x04b")) == "ab"``.
        (A str that is not valid UTF-8, a lone surrogate such as ``"\ud800"``, cannot be
        encoded at all.)
        """
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The stored token string of id i (GPT-2 byte alphabet)."""
        return self._tk.id_to_token(int(i))

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the file's template.

        Raises :class:`~jaxsample.model.chat.ChatTemplateError` when the file has no template
        or the template fails on these messages.

        Example::

            tok.apply_chat_template([{"role": "user", "content": "Hi"}])
            # '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...'
        """
        if not self.chat_template:
            raise ChatTemplateError("this model file has no tokenizer.chat_template")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._tk.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self._tk.id_to_token(self.eos_id) if self.eos_id is not None else "",
            **kwargs,
        )

    def to_json(self) -> str:
        """The underlying ``tokenizers`` JSON (for inspection or reuse)."""
        return json.dumps(json.loads(self._tk.to_str()))
