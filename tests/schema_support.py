"""Test helpers for JSON Schema outputs: the real vocabulary, an llguidance matcher built
from the same token bytes, a jitted sampling loop over the schema mask, and a validator."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import re
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.automata import json_schema as js


@functools.lru_cache(maxsize=1)
def real_vocab():
    """(token_bytes, eos_id, special_ids) of SmolLM2 from the installed GGUF file."""
    from jaxsample.model import Tokenizer, default_model_path, read_gguf

    tok = Tokenizer.from_gguf(read_gguf(default_model_path()))
    return list(tok.token_bytes), int(tok.eos_id), sorted(int(i) for i in tok.special_ids)


class GreedyTokenizer:
    """The tokenizer object llguidance's TokenizerWrapper wants (greedy longest match;
    llguidance only uses it for forced text, never for the masks compared here)."""

    def __init__(self, vocab, eos, specials):
        self.eos_token_id = eos
        self.bos_token_id = None
        self.tokens = [b if b else b"\xff[SPECIAL_%d]" % i for i, b in enumerate(vocab)]
        self.special_token_ids = list(specials)
        self._lut = {b: i for i, b in enumerate(vocab) if b}

    def __call__(self, s):
        s = s.encode() if isinstance(s, str) else s
        out, i = [], 0
        while i < len(s):
            for n in range(min(81, len(s) - i), 0, -1):
                if s[i : i + n] in self._lut:
                    out.append(self._lut[s[i : i + n]])
                    i += n
                    break
            else:
                raise ValueError(f"byte {s[i]} has no token")
        return out


@functools.lru_cache(maxsize=2)
def ll_tokenizer(key):
    import llguidance as llg

    vocab, eos, specials = real_vocab()
    return llg.LLTokenizer(llg.TokenizerWrapper(GreedyTokenizer(vocab, eos, specials)))


def ll_matcher(schema):
    import llguidance as llg

    tok = ll_tokenizer("real")
    g = llg.LLMatcher.grammar_from_json_schema(schema)
    m = llg.LLMatcher(tok, g, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def ll_mask(m, V) -> np.ndarray:
    bm = np.frombuffer(m.compute_bitmask(), np.uint32)
    return (((bm[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool)).reshape(-1)[:V]


# ------------------------------------------------------------------------ sampling loop
@functools.partial(jax.jit, static_argnames=("steps",))
def rollout(pool, starts, bias, budgets, key, *, steps):
    """Sample up to ``steps`` tokens per row under the schema mask (budget-aware), with
    logits ``bias[b]`` plus noise; stops early once every row is done. Returns (tokens
    int32[B, steps] (-1 after the end), complete bool[B]). ``budgets[b]``: max_tokens."""
    B, V = bias.shape
    table = jax.random.gumbel(key, (16, V))  # per-step noise: a row of a small table
    rows = jnp.arange(B)

    def cond(c):
        return (c[2] < steps) & ~jnp.all(c[1])

    def body(c):
        st, done, i, toks = c
        mask = jax.vmap(js.allowed, in_axes=(None, 0, 0))(pool, st, budgets - i)
        logits = jnp.where(mask, bias + table[(rows * 7 + i) % 16], -jnp.inf)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        live = ~done & (i < budgets) & jnp.any(mask, -1)
        new = jax.vmap(js.advance, in_axes=(None, 0, 0))(pool, st, tok)
        st = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, st)
        out = jnp.where(live & (tok != pool.eos_id), tok, -1)
        toks = jax.lax.dynamic_update_slice(toks, out[:, None], (0, i))
        return st, done | ~live | (tok == pool.eos_id), i + 1, toks

    st0 = jax.vmap(js.init_state)(starts)
    init = (st0, jnp.zeros(B, bool), jnp.int32(0), jnp.full((B, steps), -1, jnp.int32))
    st, _, _, toks = jax.lax.while_loop(cond, body, init)
    return toks, jax.vmap(js.is_complete, in_axes=(None, 0))(pool, st)


@functools.lru_cache(maxsize=2)
def _categories(vocab_key):
    vocab, eos, _ = real_vocab() if vocab_key == "real" else vocab_key
    cat = {
        "close": np.array([any(c in t for c in b"}]") for t in vocab]),
        "quote": np.array([b'"' in t for t in vocab]),
        "digit": np.array([t[:1].isdigit() for t in vocab]),
        "ws": np.array([bool(t) and t.strip() == b"" for t in vocab]),
    }
    return cat


def adversarial_bias(vocab, eos, rng: np.random.Generator, strength=6.0) -> np.ndarray:
    """float32[V]: random logits pushed toward closers, quotes, digits, whitespace, EOS
    (one of them, or all)."""
    cat = _categories("real" if len(vocab) == len(real_vocab()[0]) else (tuple(vocab), eos, ()))
    b = rng.normal(0, 1, len(vocab)).astype(np.float32)
    pick = rng.choice(["close", "quote", "digit", "ws", "eos", "mixed"])
    for name, m in cat.items():
        if pick in (name, "mixed"):
            b[m] += strength
    if pick in ("eos", "mixed"):
        b[eos] += 2 * strength
    return b


# ---------------------------------------------------------------------------- validation
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_TIME_RE = re.compile(r"^\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def check_hostname(name: str):
    """RFC 1123: dot-separated labels of letters, digits and inner hyphens, each at most 63
    bytes, the whole name at most 253 bytes."""
    assert len(name.encode()) <= 253, (len(name), name)
    for x in name.split("."):
        assert _LABEL.match(x) and len(x) <= 63, (len(x), name)


def check_formats(schema, inst, root=None):
    """Raise AssertionError if a string with a supported ``format`` is not valid (our own
    strict checks: Python's datetime / ipaddress / uuid parsers)."""
    root = root if root is not None else schema
    if isinstance(schema, dict) and "$ref" in schema:
        node = root
        for part in schema["$ref"][2:].split("/") if schema["$ref"] != "#" else []:
            node = node[part]
        return check_formats(node, inst, root)
    if not isinstance(schema, dict):
        return
    for sub in schema.get("anyOf", []):
        try:
            from jsonschema import Draft202012Validator

            Draft202012Validator(sub | {"$defs": root.get("$defs", {})}).validate(inst)
        except Exception:
            continue
        check_formats(sub, inst, root)
    f = schema.get("format")
    if f and isinstance(inst, str):
        if f == "date":
            datetime.date.fromisoformat(inst)
        elif f == "time":
            assert _TIME_RE.match(inst), inst
            datetime.time.fromisoformat(inst.replace("Z", "+00:00"))
        elif f == "date-time":
            d, t = inst.split("T")
            datetime.date.fromisoformat(d)
            assert _TIME_RE.match(t), inst
        elif f == "uuid":
            uuid.UUID(inst)
        elif f == "ipv4":
            ipaddress.IPv4Address(inst)
        elif f == "ipv6":
            ipaddress.IPv6Address(inst)
        elif f == "email":
            local, _, domain = inst.rpartition("@")
            assert _LOCAL.match(local) and len(local.encode()) <= 64, inst
            check_hostname(domain)
        elif f == "hostname":
            check_hostname(inst)
    if isinstance(inst, dict):
        for k, v in inst.items():
            if k in schema.get("properties", {}):
                check_formats(schema["properties"][k], v, root)
    if isinstance(inst, list):
        pre = schema.get("prefixItems", [])
        for i, v in enumerate(inst):
            sub = pre[i] if i < len(pre) else schema.get("items", {})
            check_formats(sub, v, root)


def validate(schema, text: bytes):
    """Parse ``text`` and validate it against ``schema`` (jsonschema, formats checked)."""
    from jsonschema import Draft202012Validator

    inst = json.loads(text.decode("utf-8"))
    # the 2020-12 format checker (the generic FormatChecker() checks "time" as draft 3's
    # HH:MM:SS without offset when rfc3339-validator is absent; RFC 3339 requires one, and
    # check_formats checks that)
    checker = Draft202012Validator.FORMAT_CHECKER
    # jsonschema checks "hostname" only when the optional fqdn package is installed
    assert "hostname" in checker.checkers, "pip install fqdn (the dev extra)"
    v = Draft202012Validator(schema, format_checker=checker)
    v.validate(inst)
    check_formats(schema, inst)
    return inst
