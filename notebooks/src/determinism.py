# %% [markdown]
# # Seeds in practice: what a seed guarantees, and what happens without one
#
# SPEC.md's promise: a request's draws depend only on its seed, the output position and
# the processed distribution — never on the batch size, its position in the batch, the
# other requests, or when it arrived. The slot engine adds the other half: the model's
# arithmetic for a request is bit-identical whatever the other slots hold (batch-invariant
# matmuls), so the logits, hence the whole answer, reproduce exactly.
#
# This notebook checks that on the real model, shows where a request without a seed gets
# its seed, and draws the per-position keys.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

import jaxsample
from jaxsample import SamplingParams, derive_seed, sample
from jaxsample.explore import use_compile_cache

use_compile_cache()  # compiled programs kept on disk: the decode loop compiles once
plt.rcParams.update({"figure.dpi": 72, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})

# batch-invariant model arithmetic (the default), 16 slots, 256 positions per slot
engine = jaxsample.Engine.load(max_seq_len=256)
print(engine.engine_options)

# %% [markdown]
# ## The same request, three ways
#
# One seeded request at temperature 1 (so every token is a real draw): alone; first in a
# batch of 24 mixed requests; and last in that batch. With 24 requests and 16 slots, the
# last one waits until a slot frees up, then runs next to whatever is still decoding there.

# %%
target = ([{"role": "user", "content": "Invent a name for a dragon and describe it."}],
          SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24,
                         logprobs=True))
others = [([{"role": "user", "content": q}],
           SamplingParams(temperature=t, seed=s, max_tokens=m, top_k=k))
          for q, t, s, m, k in [
              ("Write a haiku about rain.", 0.7, 1, 20, 0),
              ("What is 12 times 12?", 0.0, 2, 8, 0),
              ("List three colours.", 1.2, 3, 16, 40),
              ("Tell me a joke.", 0.9, 4, 24, 0),
              ("Explain gravity in one sentence.", 0.5, 5, 24, 10),
              ("Say hello in French.", 1.0, 6, 6, 0),
          ] * 4][:22]

[alone] = engine.generate([target[0]], [target[1]])
batch = [target] + others + [target]
out = engine.generate([b[0] for b in batch], [b[1] for b in batch])
first, last = out[0], out[-1]

print("alone:", repr(alone.text))
for name, c in [("first of 24", first), ("last of 24", last)]:
    same_tokens = c.token_ids == alone.token_ids
    same_lp = [e["logprob"] for e in c.logprobs] == [e["logprob"] for e in alone.logprobs]
    print(f"{name:>11}: same tokens {same_tokens}, bit-identical log probabilities {same_lp}")
    assert same_tokens and same_lp

# %% [markdown]
# And across runs: a second `generate` call (the engine's slots now hold leftovers of the
# previous batch) gives the same answer again.

# %%
[again] = engine.generate([target[0]], [target[1]])
assert again.token_ids == alone.token_ids
print("rerun identical:", again.token_ids == alone.token_ids)

# %% [markdown]
# ## Completion order is not input order
#
# `Engine.stream(items)` yields `(key, Completion)` as requests finish: short requests come
# back first (a chunk of decode steps ends as soon as a slot is free and requests wait; the
# requests finished by then are yielded). `generate` puts them back in input order. Neither
# changes any answer (here the batch of 24 above, streamed).

# %%
items = [(f"req-{i}", b[0], b[1]) for i, b in enumerate(batch)]
order, streamed = [], {}
for key, c in engine.stream(items):
    order.append(key)
    streamed[key] = c
print("finished in this order:", order)
assert all(streamed[f"req-{i}"].token_ids == c.token_ids for i, c in enumerate(out))

# %% [markdown]
# ## Without a seed
#
# A request without a seed gets `derive_seed(job_seed, key)`: for `generate`, the key is the
# request's index in the call; for `stream`, the key you give (an int or a string such as a
# batch job's `custom_id`). The seed used is reported in `Completion.seed`, so any answer can
# be reproduced later by passing that seed explicitly.

# %%
unseeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12)
prompt = [{"role": "user", "content": "Name an animal."}]
job = engine.generate([prompt] * 3, unseeded, job_seed=7)
for i, c in enumerate(job):
    assert c.seed == derive_seed(7, i)
    print(f"index {i}: seed {c.seed:>21}  {c.text!r}")

# the same job again: the same seeds, the same answers
assert [c.token_ids for c in engine.generate([prompt] * 3, unseeded, job_seed=7)] == [
    c.token_ids for c in job]
# another job seed: other seeds
assert engine.generate([prompt], unseeded, job_seed=8)[0].seed != job[0].seed
# reproduce one answer on its own, from its reported seed
[redo] = engine.generate([prompt], SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12,
                                                  seed=job[2].seed))
assert redo.token_ids == job[2].token_ids
print("index 2 reproduced alone from its seed:", redo.text == job[2].text)

# %% [markdown]
# With string keys the seed follows the key, not the position: reorder the items, or
# resume half a job later, and each request keeps its seed.

# %%
keys = ["cat-question", "dog-question", "owl-question"]
a = dict(engine.stream([(k, prompt, unseeded) for k in keys], job_seed=7))
b = dict(engine.stream([(k, prompt, unseeded) for k in reversed(keys)], job_seed=7))
for k in keys:
    assert a[k].seed == b[k].seed == derive_seed(7, k) and a[k].token_ids == b[k].token_ids
    print(f"{k:>13}: seed {a[k].seed:>21}  {a[k].text!r}")

# %% [markdown]
# ## The per-position keys
#
# The key of a draw is `fold_in(key(seed), i)` for output position `i`: a pure function of
# two numbers. Below, with the host sampler on a flat distribution over 8 tokens (every
# token equally likely), the token drawn for each seed (rows) at each position (columns):
# each cell is an independent draw, and a cell's value never depends on the rest of the
# grid. The check below puts the same requests in other batches, in other orders, next to
# other parameters, and gets the same cells back.

# %%
# figure: docs/determinism_keys.png
V, seeds, positions = 8, list(range(16)), list(range(32))
flat = np.zeros((len(seeds), V), np.float32)
params = [SamplingParams(seed=s) for s in seeds]
grid = np.stack([sample(flat, params, step=i).tokens for i in positions], axis=1)

# the same cells from differently composed batches: reversed order, mixed with other rows
noise = [SamplingParams(seed=99, temperature=0.5), SamplingParams(top_k=3)]
for i in [0, 7, 31]:
    mixed = params[::-1] + noise
    logits = np.zeros((len(mixed), V), np.float32)
    got = sample(logits, mixed, step=i).tokens[: len(seeds)][::-1]
    assert np.array_equal(got, grid[:, i])

fig, ax = plt.subplots(figsize=(9, 4))
cmap = ListedColormap(plt.cm.tab10.colors[:V])
im = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=V - 0.5, aspect="auto")
ax.set_xlabel("output position i")
ax.set_ylabel("seed")
ax.set_title("token drawn from a uniform distribution over 8 tokens, key = fold_in(key(seed), i)")
fig.colorbar(im, ax=ax, ticks=range(V), label="token")
plt.show()

counts = np.bincount(grid.ravel(), minlength=V)
print("each token's share of the 512 draws:", np.round(counts / counts.sum(), 3))

# %% [markdown]
# What this means for experiments:
#
# - Fix the seed and compare settings: draws with the same seed share their random numbers
#   position by position (common random numbers; see sweep.ipynb).
# - Batch freely: a request's answer does not change with the batch it is put in, the slot
#   it lands in or the requests next to it.
# - Record `Completion.seed` (or the job seed and the keys): that is enough to reproduce
#   every answer.
