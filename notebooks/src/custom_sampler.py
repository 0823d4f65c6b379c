# %% [markdown]
# # A sampler of your own: top-nσ as a user transform
#
# jaxsample ships OpenRouter's parameters, but research moves faster than APIs. A **user
# transform** is a pure JAX function of one row's logits, its own per-row parameters and
# the row's token history; the sampler runs it at a chosen point of SPEC.md's chain, inside
# the compiled decoding loop, with per-row values as array leaves (changing them never
# recompiles).
#
# As an example we write **top-nσ** (Tang et al., 2024, "Top-nσ: Not All Logits Are You
# Need"): keep the tokens whose logit is within `n` standard deviations of the largest
# logit. It needs no sort, and since temperature scales the max and the standard deviation
# alike, the kept set does not depend on the temperature. Jaxsample does not ship it.

# %%

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxsample
from jaxsample import SamplingParams, UserTransform, processed_logprobs
from jaxsample.explore import next_token_logits, token_texts, use_compile_cache

use_compile_cache()  # compiled programs kept on disk: the decode loop compiles once
plt.rcParams.update({"figure.dpi": 72, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})

# %% [markdown]
# ## The transform: a few lines
#
# `fn(z, params, hist)` gets the row's logits `z: f32[V]` (`-inf` = already removed),
# `params` a dict of this transform's per-row values (0-d arrays) and the row's history;
# it returns new logits. `n = 0` (the default, for requests that do not set it) leaves the
# row alone.

# %%
def top_n_sigma(z, params, hist):
    n = params["n"]
    finite = z > -jnp.inf
    count = jnp.maximum(finite.sum(), 1)
    mean = jnp.where(finite, z, 0.0).sum() / count
    sigma = jnp.sqrt(jnp.where(finite, (z - mean) ** 2, 0.0).sum() / count)
    keep = z >= z.max() - n * sigma
    return jnp.where((n > 0) & ~keep, -jnp.inf, z)


nsigma = UserTransform("top_n_sigma", top_n_sigma, {"n": 0.0}, ranges={"n": (0.0, 10.0)},
                       position="before_filters")
chain = (nsigma,)


def with_n(n, **kw):
    """SamplingParams that set this transform's per-row value."""
    return SamplingParams(**kw, transform_params={"top_n_sigma": {"n": n}})

# %% [markdown]
# ## Check it against plain numpy, on the model's real distributions
#
# The numpy version follows the definition literally (float64). The sampler's processed
# distribution with the transform must keep exactly the same tokens, with the same
# renormalised probabilities.

# %%
engine = jaxsample.Engine.load(max_seq_len=256)  # short answers: a short KV cache per slot
tok = engine.tokenizer


def chat(q):
    return [{"role": "user", "content": q}]


def after(q, answer):
    return tok.apply_chat_template(chat(q), add_generation_prompt=True) + answer


titles = {"confident": "confident: “Once upon a time, in a”",
          "uncertain": "uncertain: “…there was a dragon named”"}
steps = {
    "confident": after("Tell me a story about a dragon.", "Once upon a time, in a"),
    "uncertain": after("Tell me a story about a dragon.",
                       "Once upon a time, there was a dragon named"),
    "poem": chat("Write a short poem about autumn."),
}
logits = dict(zip(steps, next_token_logits(engine, list(steps.values()))))


def numpy_top_n_sigma(z, n, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    keep = z >= z.max() - n * z.std()
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


for name, z in logits.items():
    for n in [0.5, 1.0, 2.0, 3.0]:
        for t in [0.7, 1.0, 1.5]:
            got = np.exp(processed_logprobs(z[None], with_n(n, temperature=t),
                                            transforms=chain)[0])
            want = numpy_top_n_sigma(z, n, t)
            assert np.array_equal(got > 0, want > 0), (name, n, t)
            np.testing.assert_allclose(got, want, atol=2e-6)
print("the transform agrees with numpy on", len(logits), "steps x 4 n x 3 temperatures")

# %% [markdown]
# How many tokens it keeps, against `top_p` and `min_p`, as the temperature rises. Top-nσ
# is flat (its kept set does not depend on the temperature); `top_p` opens up by orders of
# magnitude; `min_p` grows too, more slowly (its threshold follows `p_max`, which falls as
# the temperature flattens the distribution).

# %%
# figure: docs/custom_sampler_top_n_sigma.png
temps = np.round(np.linspace(0.3, 2.0, 12), 2)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for ax, name in zip(axes, ["confident", "uncertain"]):
    z = logits[name][None]
    for label, make in [("top_n_sigma n=1.5", lambda t: with_n(1.5, temperature=t)),
                        ("top_p=0.9", lambda t: SamplingParams(temperature=t, top_p=0.9)),
                        ("min_p=0.05", lambda t: SamplingParams(temperature=t, min_p=0.05))]:
        kept = [int((processed_logprobs(z, make(t), transforms=chain)[0] > -np.inf).sum())
                for t in temps]
        ax.plot(temps, kept, "o-", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("temperature")
    ax.set_title(titles[name], fontsize=9)
axes[0].set_ylabel("tokens kept")
axes[0].legend()
plt.show()

# %% [markdown]
# ## The distribution as an object, and the draw
#
# `jaxsample.distribution(logits, row, hist, allowed, transforms=...)` returns the public
# `Distribution` that step 10 draws from; `jaxsample.draw(dist, key)` draws with any key,
# `jaxsample.log_prob(dist, ids)` scores tokens. Vmapping the draw over 20000 keys gives the
# empirical frequencies of the top-1σ distribution at the uncertain step; they must match
# its probabilities (a chi-square test; the draw is exact, not an approximation).

# %%
params = with_n(1.0)
rows = jaxsample.pack_rows([params], vocab_size=engine.vocab_size, seeds=[0], transforms=chain)
row = jax.tree.map(lambda x: jnp.asarray(x[0]), rows)
hist = jaxsample.History.from_tokens([], [], engine.vocab_size)
dist = jaxsample.distribution(jnp.asarray(logits["uncertain"]), row, hist, None,
                              transforms=chain)
keys = jax.random.split(jax.random.key(0), 20000)
tokens = np.asarray(jax.jit(jax.vmap(lambda k: jaxsample.draw(dist, k)))(keys))
kept = np.flatnonzero(numpy_top_n_sigma(logits["uncertain"], 1.0))
probs = np.exp(np.asarray(jaxsample.log_prob(dist, jnp.asarray(kept))))
observed = np.array([(tokens == t).sum() for t in kept])
assert set(np.unique(tokens)) <= set(kept)  # never a token outside the kept set
chi2 = float((((observed - probs * len(keys)) ** 2) / (probs * len(keys))).sum())
print(f"{len(kept)} kept tokens; chi-square {chi2:.1f} on {len(kept) - 1} degrees of freedom")
assert chi2 < len(kept) - 1 + 5 * np.sqrt(2 * (len(kept) - 1))  # mean + 5 sd of chi2(k-1)

# %% [markdown]
# ## Inside the compiled decoding loop
#
# An `Engine` takes the chain at construction (it is part of the compiled program's static
# structure); each request then sets its own `n`. One batch: the same prompt and seed at a
# hot temperature (1.5), with top-nσ off, at `n=1` and at `n=2`, and a row at `n=0` on an
# engine without the transform, which must give exactly the same tokens as the `n=0` row
# (a transform that does nothing changes nothing).

# %%
custom = jaxsample.Engine(engine.model, tok, max_seq_len=256, transforms=chain)
prompt = chat("Tell me a story about a dragon.")
ns = [0.0, 1.0, 2.0]
outs = custom.generate([prompt] * 3, [with_n(n, temperature=1.5, seed=5, max_tokens=32)
                                      for n in ns])
for n, c in zip(ns, outs):
    print(f"--- T=1.5, top_n_sigma n={n}: {c.text!r}")

# %%
[plain] = engine.generate([prompt], SamplingParams(temperature=1.5, seed=5, max_tokens=32))
assert plain.token_ids == outs[0].token_ids  # n=0 is the identity, inside the loop too
print("n=0 row == engine without the transform:", plain.token_ids == outs[0].token_ids)

# %% [markdown]
# Did the loop really apply it? Rerun the model's prefill on the prompt plus each prefix of
# the `n=1` answer and check, with the numpy definition, that every token the loop drew was
# inside the top-1σ set at its step.

# %%
c = outs[1]
ids = engine.encode_input(prompt)
prefix_logits = next_token_logits(engine, [ids + c.token_ids[:j]
                                           for j in range(len(c.token_ids))])
kept_sizes = []
for j, (z, t) in enumerate(zip(prefix_logits, c.token_ids)):
    keep = numpy_top_n_sigma(z, 1.0) > 0
    kept_sizes.append(int(keep.sum()))
    assert keep[t], (j, token_texts(tok, [t]))
print("every drawn token was in its step's top-1σ set; kept-set sizes:", kept_sizes)

# %% [markdown]
# The same pattern works for any per-row rule over the logits: locally typical sampling,
# epsilon/eta sampling, a classifier-free-guidance style mix with a second set of logits
# passed through the history, a penalty of your own. Put it at the position in the chain
# where it belongs (`before_bias`, `before_penalties`, `before_temperature` or
# `before_filters`), give its knobs as `params`, and the sampler's guarantees hold: exact
# draws, per-row values without recompiling, seeds independent of the batch.
