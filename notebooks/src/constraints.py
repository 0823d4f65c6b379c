# %% [markdown]
# # Constraints on the device: JSON mode and stop strings
#
# Both run inside the compiled decoding loop, per row, with no host round trip per token:
#
# - **JSON mode** (`response_format={"type": "json_object"}`) removes, at every step, each
#   token that would make the output stop being a prefix of a JSON object. The automaton
#   also knows how many tokens the object needs to close, and steers towards closing when
#   `max_tokens` runs short.
# - **Stop strings** are matched on bytes across token boundaries; the text is cut before
#   the stop string.
#
# This notebook looks at the mask step by step on the real model, at the budget-aware
# closing, at a stop string that spans several tokens, and at JSON Schema.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

import jaxsample
from jaxsample import SamplingParams
from jaxsample.explore import json_allowed_masks, token_texts, use_compile_cache

use_compile_cache()  # compiled programs kept on disk: the decode loop compiles once
plt.rcParams.update({"figure.dpi": 72, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})

# 16 slots; a 256-position KV cache per slot is plenty for these short answers
# (the default 2048 holds 8x the memory: 1.4 GiB for 16 slots instead of 180 MiB)
engine = jaxsample.Engine.load(max_seq_len=256)
tok = engine.tokenizer

# %% [markdown]
# ## One batch, four requests
#
# Every row of a batch carries its own constraints, so one call (one compiled loop) runs a
# JSON answer with room to spare, the same request (same seed) with budgets of 12, 16 and 20
# tokens, the 16-token budget without JSON mode, and a greedy answer with and without a
# stop string.

# %%
cat = [{"role": "user", "content": "Give a JSON object with the name and age of a cat."}]
capital = [{"role": "user", "content": "What is the capital of France?"}]
def cat_request(max_tokens, json_mode=True):
    return cat, SamplingParams(temperature=0.7, seed=0, max_tokens=max_tokens,
                               response_format="json_object" if json_mode else "text")


requests = {
    "json, 64 tokens": cat_request(64),
    "json, 12 tokens": cat_request(12),
    "json, 16 tokens": cat_request(16),
    "json, 20 tokens": cat_request(20),
    "text, 16 tokens": cat_request(16, json_mode=False),
    "stop 'France is P'": (capital, SamplingParams(temperature=0.0, max_tokens=24,
                                                   stop=["France is P"])),
    "greedy, no stop": (capital, SamplingParams(temperature=0.0, max_tokens=24)),
}
out = dict(zip(requests, engine.generate([r[0] for r in requests.values()],
                                         [r[1] for r in requests.values()])))
for name, c in out.items():
    print(f"--- {name}: {c.completion_tokens} tokens, finish_reason={c.finish_reason!r}")
    print(c.text)

# %%
answer = out["json, 64 tokens"]
parsed = json.loads(answer.text)  # JSON mode: the answer parses
parsed

# %% [markdown]
# ## The mask at every step
#
# `json_allowed_masks(engine, token_ids, max_tokens)` replays JSON mode's automaton over the
# answer's tokens and returns the mask the loop applied before each one (`bool[steps, V]`).
# Below, the share of the vocabulary that was allowed at each step (top), and the same
# share within a few groups of tokens (heat map). The x axis is the token drawn at that
# step.

# %%
masks = json_allowed_masks(engine, answer.token_ids, 64)
assert masks[np.arange(len(answer.token_ids)), answer.token_ids].all()  # every draw allowed

texts = token_texts(tok, range(engine.vocab_size))


def group(t):
    s = t.strip()
    if not t or "\ufffd" in t:
        return "partial UTF-8 / special"
    if not s:
        return "whitespace only"
    if any(ch in s for ch in "{}[]:,"):
        return "has { } [ ] : ,"
    if '"' in s:
        return 'has "'
    if s.lstrip("-").replace(".", "").isdigit():
        return "number"
    if s.isalpha():
        return "letters"
    return "other"


groups = np.array([group(t) for t in texts])
for i in tok.special_ids:
    groups[i] = "partial UTF-8 / special"
names = ["letters", "number", 'has "', "has { } [ ] : ,", "whitespace only",
         "partial UTF-8 / special", "other"]
share = np.array([[m[groups == g].mean() for m in masks] for g in names])
total = masks.mean(axis=1)
print("vocabulary per group:", {g: int((groups == g).sum()) for g in names})

# %%
# figure: docs/constraints_json_mask.png
steps = len(answer.token_ids)
labels = [t.replace(" ", "␣").replace("\n", "↵") for t in token_texts(tok, answer.token_ids)]
fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(13, 4.6), sharex=True,
                               gridspec_kw={"height_ratios": [1, 1.6]})
ax0.semilogy(np.arange(steps), total, "o-", ms=3, color="C0")
ax0.set_ylabel("allowed share\nof vocabulary")
ax0.set_ylim(1e-5, 1.5)
ax0.set_title("JSON mode on SmolLM2: allowed tokens before each token of the answer")
im = ax1.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
ax1.set_yticks(range(len(names)), names)
ax1.set_xticks(range(steps), labels, rotation=90, fontsize=7)
fig.colorbar(im, ax=[ax0, ax1], shrink=0.6, label="share of the group allowed")
plt.show()

# %% [markdown]
# Outside strings (before a key, after a colon, between members) only a tiny share of the
# vocabulary is allowed: a quote, a bracket, a number, `true`/`false`/`null`, whitespace.
# Inside a string almost everything is allowed except tokens holding a quote that would end
# the string at the wrong place, or a bracket after it. The last step allows the
# end-of-sequence token only once the object is complete.
#
# An independent check of the first step: every allowed token must start (after
# whitespace) with `{`, the only way a JSON object can begin.

# %%
first = np.flatnonzero(masks[0])
starts = {texts[i].lstrip(" \t\n\r")[:1] for i in first}
print(f"{len(first)} tokens allowed at step 0; first non-blank characters: {starts}")
assert starts <= {"{", ""}  # "" = a whitespace-only token (allowed before the object)
no_brace = [i for i in range(engine.vocab_size) if "{" not in texts[i] and texts[i].strip()]
assert not masks[0][no_brace].any()

# %% [markdown]
# ## Closing in time when the budget is short
#
# With a small `max_tokens` JSON mode still returns a complete object: the automaton knows,
# for each of its states, how many tokens the shortest way to close needs, and once the
# remaining budget gets tight it only allows tokens after which the object can still be
# closed in time. It does not force an early close: a member that still fits may be opened.
# Without JSON mode the same budget stops mid-sentence.

# %%
for name in ["json, 12 tokens", "json, 16 tokens", "json, 20 tokens", "text, 16 tokens"]:
    c = out[name]
    print(f"{name}: {c.finish_reason:>6}  {c.text!r}")
for name in ["json, 12 tokens", "json, 16 tokens", "json, 20 tokens"]:
    json.loads(out[name].text)  # complete, although the budget ran out

# %%
# figure: docs/constraints_budget.png
short = out["json, 12 tokens"]
short_masks = json_allowed_masks(engine, short.token_ids, 12)
roomy_masks = json_allowed_masks(engine, short.token_ids, 64)  # same tokens, budget 64
fig, ax = plt.subplots(figsize=(9, 3))
ax.semilogy(roomy_masks.mean(1), "o-", ms=4, label="max_tokens=64")
ax.semilogy(short_masks.mean(1), "s-", ms=4, label="max_tokens=12")
for i, t in enumerate(token_texts(tok, short.token_ids)):
    ax.annotate(t.replace(" ", "␣").replace("\n", "↵"), (i, short_masks[i].mean()),
                textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7,
                color="C1")
ax.set_xlabel("step")
ax.set_ylabel("allowed share of vocabulary")
ax.set_title("the 12-token answer's tokens replayed under two budgets: the short one narrows")
ax.legend()
plt.show()

# %% [markdown]
# Both curves replay the same tokens; only the budget differs. Where they part, the short
# request's mask removes every token that would open
# something it could no longer close (a long key, a long string), and the answer ends with
# the closing tokens just in time. The 12-token answer also shows the limit of steering: the
# model chose to open one more member while it still fitted, and the budget then only
# allowed the shortest member, `"":""`. The object is valid but says nothing; steering
# guarantees a parse, a sensible budget is still the caller's job.
#
# ## A stop string that spans tokens
#
# The greedy answer to "What is the capital of France?" is "The capital of France is
# Paris." With `stop=["France is P"]` the stop string starts inside one token and ends
# inside another: the automaton matches bytes, not tokens. The loop stops after the token
# that completes the match; the text is cut before the stop string.

# %%
stopped = out["stop 'France is P'"]
full = out["greedy, no stop"]
pieces = token_texts(tok, stopped.token_ids)
print("tokens emitted:", pieces)
print("text returned :", repr(stopped.text), stopped.finish_reason)
print("without stop  :", repr(full.text))

# the stopped answer is the unstopped one, cut before the first occurrence of the stop string
cut = full.text.index("France is P")
assert stopped.text == full.text[:cut]
assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
assert "France is P" in "".join(pieces) and "France is P" not in "".join(pieces[:-1])

# %%
# figure: docs/constraints_stop.png
fig, ax = plt.subplots(figsize=(9, 1.6))
x = 0
joined = "".join(pieces)
start = joined.index("France is P")
for i, piece in enumerate(pieces):
    w = len(piece)
    ax.add_patch(plt.Rectangle((x, 0), w, 1, fill=False, ec="0.4"))
    for j, ch in enumerate(piece):
        inside = start <= x + j < start + len("France is P")
        ax.text(x + j + 0.5, 0.5, ch.replace(" ", "␣"), ha="center", va="center",
                family="monospace", color="C3" if inside else "k",
                weight="bold" if inside else "normal")
    ax.text(x + w / 2, -0.35, f"token {i}", ha="center", fontsize=7, color="0.4")
    x += w
ax.set_xlim(0, x)
ax.set_ylim(-0.6, 1.1)
ax.axis("off")
ax.set_title("stop='France is P' (red) spans three tokens and ends inside ␣Paris; "
             "text returned: everything before it", fontsize=9)
plt.show()

# %% [markdown]
# The stop string is matched by a small automaton per row (Knuth–Morris–Pratt over the
# bytes of each token), so the check costs a few table lookups per token whatever the
# tokenisation.

# %% [markdown]
# ## JSON Schema
#
# `response_format={"type": "json_schema", "json_schema": {...}}` constrains the answer to
# one schema: here an object with a string `name`, an integer `age` in 0..30 and a list of
# at most three strings `toys`, every key required. Every row may have its own schema; the
# compiled tables of all schemas in flight share one pool on the device.

# %%
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "toys": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "toys"],
    "additionalProperties": False,
}
fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}
cats = engine.generate([cat] * 4, [SamplingParams(temperature=0.9, seed=s, max_tokens=64,
                                                  response_format=fmt) for s in range(4)])
for c in cats:
    print(c.finish_reason, c.text)

# %% [markdown]
# The properties come out in the order the schema declares them (`name`, `age`, `toys`:
# `SamplingParams` keeps the schema as compact JSON with its keys in the order given), and
# the model still chooses the whitespace between them. An independent check in plain Python: every answer
# parses and fits the schema.

# %%
for c in cats:
    obj = json.loads(c.text)
    assert set(obj) == {"name", "age", "toys"}
    assert isinstance(obj["name"], str)
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert 0 <= obj["age"] <= 30
    assert isinstance(obj["toys"], list) and len(obj["toys"]) <= 3
    assert all(isinstance(t, str) for t in obj["toys"])
print("all", len(cats), "answers fit the schema")
