# %% [markdown]
# # What each sampling parameter does to a real next-token distribution
#
# The default model (SmolLM2-135M-Instruct) gives a distribution over its 49152 tokens at
# every step. Here we take that distribution for a few chat prompts and look at it before
# and after each parameter: `temperature`, `top_k`, `top_p`, `top_a`, `min_p`, the three
# penalties and `logit_bias`; then how the chain combines them, and where `top_a` and `min_p`
# cut differently from `top_p` on a confident and on an uncertain step.
#
# `jaxsample.processed_logprobs(logits, params)` returns the log probabilities of exactly
# the distribution a draw uses (`-inf` = removed), computed by the same jitted code as the
# decode loop. Every picture below is checked against a plain numpy version of the
# definition in SPEC.md.

# %%

import matplotlib.pyplot as plt
import numpy as np

import jaxsample
from jaxsample import SamplingParams, processed_logprobs
from jaxsample.explore import next_token_logits, token_texts, use_compile_cache

use_compile_cache()  # compiled programs kept on disk: the decode loop compiles once
plt.rcParams.update({"figure.dpi": 72, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})

engine = jaxsample.Engine.load(max_seq_len=256)  # the default GGUF file, offline
tok = engine.tokenizer
print(engine.model_name, "vocabulary:", engine.vocab_size)

# %% [markdown]
# ## Next-token logits from the model
#
# `next_token_logits(engine, inputs)` runs one jitted prefill and returns the logits for the
# token after each input. An input is a chat message list (rendered with the chat template,
# assistant turn opened) or a raw string; to look at a later step of an answer we pass the
# rendered prompt plus the answer so far.

# %%
def chat(question):
    return [{"role": "user", "content": question}]


def after(question, answer_so_far):
    """The raw text of a chat prompt followed by the start of the assistant's answer."""
    return tok.apply_chat_template(chat(question), add_generation_prompt=True) + answer_so_far


steps = {
    "capital": chat("What is the capital of France?"),
    "poem": chat("Write a short poem about autumn."),
    "paris": after("What is the capital of France?", "The capital of France is"),
    "land": after("Tell me a story about a dragon.", "Once upon a time, in a"),
    "dragon": after("Tell me a story about a dragon.", "Once upon a time, there was a dragon named"),
    "fruits": after("List five fruits.", "1. Apple\n2. Banana\n3. Orange\n4. Apple\n5."),
}
logits = dict(zip(steps, next_token_logits(engine, list(steps.values()))))

PLAIN = SamplingParams()  # temperature 1, no filter: the model's own distribution


def probs(name, params=PLAIN, **history):
    return np.exp(processed_logprobs(logits[name][None], params, **history)[0])


for name in steps:
    p = probs(name)
    top = np.argsort(-p)[:5]
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    print(f"{name:>9}  entropy {entropy:4.2f} nats  top: "
          + ", ".join(f"{t!r} {q:.2f}" for t, q in zip(token_texts(tok, top), p[top])))

# %% [markdown]
# A plain numpy reference for the model's distribution: with the default parameters the
# processed distribution is just `softmax(logits)`.

# %%
def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


for name in steps:
    np.testing.assert_allclose(probs(name), softmax(logits[name]), atol=1e-6)

# %% [markdown]
# ## One picture per parameter
#
# Each panel shows the most likely tokens (by their text; `␣` is a space, `↵` a newline):
# the model's probability in grey, the probability after the parameter in blue, and a red
# `×` under each token the parameter removed. The title counts the kept tokens.

# %%
def label(t):
    return t.replace(" ", "␣").replace("\n", "↵")


def panel(ax, name, params, title, n=12, extra_ids=(), **history):
    before, now = probs(name), probs(name, params, **history)
    ids = list(np.argsort(-before)[:n])
    ids += [i for i in extra_ids if i not in ids]
    x = np.arange(len(ids))
    ax.bar(x - 0.2, before[ids], 0.4, color="0.75", label="model")
    ax.bar(x + 0.2, now[ids], 0.4, color="C0", label="after")
    gone = [k for k, i in enumerate(ids) if now[i] == 0]
    ax.plot(gone, np.zeros(len(gone)), "x", color="C3", ms=8, mew=2, clip_on=False,
            label="removed")
    ax.set_xticks(x, [label(t) for t in token_texts(tok, ids)], rotation=60, fontsize=8)
    kept = int((now > 0).sum())
    ax.set_title(f"{title}\nkept {kept} of {len(now)}", fontsize=9)
    return now


fig, axes = plt.subplots(1, 3, figsize=(11, 3), sharey=True)
for ax, t in zip(axes, [0.5, 1.0, 1.5]):
    now = panel(ax, "poem", SamplingParams(temperature=t), f"temperature={t}")
    np.testing.assert_allclose(now, softmax(logits["poem"] / t), atol=1e-6)
axes[0].set_ylabel("probability")
axes[0].legend()
fig.suptitle("“Write a short poem about autumn.” — first token", y=1.08)
plt.show()

# %% [markdown]
# Temperature divides the logits: below 1 the mass moves to the leading tokens, above 1 it
# spreads into the tail. Nothing is removed (a tail token at 1e-9 stays possible), which is
# why temperature is usually paired with a filter.
#
# ### The four filters
#
# `top_k` keeps the k largest logits, `top_p` the smallest head of the distribution whose
# mass reaches p, `top_a` drops tokens below `a * p_max²` and `min_p` those below
# `m * p_max`. The numpy versions below follow SPEC.md's definitions literally (sort, cumulate,
# compare) and must keep exactly the same tokens as the sampler, which never sorts the
# vocabulary.

# %%
def keep_top_k(p, k):
    return p >= np.sort(p)[::-1][k - 1]


def keep_top_p(p, top_p):
    s = np.sort(p)[::-1]
    cut = s[np.searchsorted(np.cumsum(s), top_p - 1e-6)]  # first rank whose cumsum reaches p
    return p >= cut


def keep_top_a(p, a):
    return p >= a * p.max() ** 2


def keep_min_p(p, m):
    return p >= m * p.max()


filters = [
    (SamplingParams(top_k=5), "top_k=5", lambda p: keep_top_k(p, 5)),
    (SamplingParams(top_p=0.7), "top_p=0.7", lambda p: keep_top_p(p, 0.7)),
    (SamplingParams(top_a=0.8), "top_a=0.8", lambda p: keep_top_a(p, 0.8)),
    (SamplingParams(min_p=0.15), "min_p=0.15", lambda p: keep_min_p(p, 0.15)),
]

# %%
# figure: docs/parameters_filters.png
fig, axes = plt.subplots(1, 4, figsize=(13, 3), sharey=True)
p0 = probs("capital")
for ax, (params, title, ref) in zip(axes, filters):
    now = panel(ax, "capital", params, title, n=16)
    keep = ref(p0)
    assert np.array_equal(now > 0, keep), title  # same kept set as the numpy definition
    np.testing.assert_allclose(now, np.where(keep, p0, 0) / p0[keep].sum(), atol=1e-6)
axes[0].set_ylabel("probability")
axes[0].legend()
fig.suptitle("“What is the capital of France?” — first token", y=1.08)
plt.show()

# %% [markdown]
# The kept tokens are renormalised: the blue bars of the survivors are the grey ones scaled
# up by the same factor. On this step the model hesitates between many ways of starting
# (`The`, `L`/`La` as in "La capitale", `Al`, ...); the values above are chosen so that each
# filter's cut falls inside the window (common values such as `top_p=0.9` or `min_p=0.05`
# keep 30-50 tokens here).
#
# ### logit_bias
#
# `logit_bias` adds a number to chosen token ids' logits before everything else: `-100`
# bans a token, a positive value promotes one. Here we ban `The` and push ` Paris`
# (a token far outside the top 10) up by 8.

# %%
the, paris = tok.encode("The")[0], tok.encode(" Paris")[0]
bias = SamplingParams(logit_bias={str(the): -100, str(paris): 8})
fig, ax = plt.subplots(figsize=(6, 3))
now = panel(ax, "capital", bias, "logit_bias={The: -100, ␣Paris: +8}", n=10,
            extra_ids=[paris])
z = logits["capital"].astype(np.float64).copy()
z[the] -= 100
z[paris] += 8
np.testing.assert_allclose(now, softmax(z), atol=1e-6)
print(f"P(' Paris') {probs('capital')[paris]:.4f} -> {now[paris]:.3f};  P('The') -> {now[the]:.1e}")
plt.show()

# %% [markdown]
# ## The penalties look at the history
#
# The three penalties need to know what was already said. At the step below the answer so
# far is a list that already repeats `Apple`; the model's favourite next item is ` Gra`
# (Grapes), and the items already listed still have some probability.
#
# - `repetition_penalty r` divides positive logits (multiplies negative ones) by `r` for
#   every token of the prompt **or** the output;
# - `frequency_penalty f` subtracts `f × count` for tokens of the output;
# - `presence_penalty p` subtracts `p` once for any token of the output.
#
# The host API takes the history as token lists (`prompt_tokens`, `output_tokens`).

# %%
prompt_ids = engine.encode_input(chat("List five fruits."))
answer_ids = tok.encode("1. Apple\n2. Banana\n3. Orange\n4. Apple\n5.")
history = {"prompt_tokens": [prompt_ids], "output_tokens": [answer_ids]}
counts = np.bincount(answer_ids, minlength=engine.vocab_size)
in_prompt = np.zeros(engine.vocab_size, bool)
in_prompt[prompt_ids] = True
z = logits["fruits"].astype(np.float64)

seen = (counts > 0) | in_prompt
r, f, pres = 1.3, 0.8, 0.8
references = {
    f"repetition_penalty={r}": np.where(seen, np.where(z > 0, z / r, z * r), z),
    f"frequency_penalty={f}": z - f * counts,
    f"presence_penalty={pres}": z - pres * (counts > 0),
}
penalties = [SamplingParams(repetition_penalty=r), SamplingParams(frequency_penalty=f),
             SamplingParams(presence_penalty=pres)]

fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, params, (title, ref_z) in zip(axes, penalties, references.items()):
    now = panel(ax, "fruits", params, title, **history)
    np.testing.assert_allclose(now, softmax(ref_z), atol=1e-6)
    for tick, i in zip(ax.get_xticklabels(), np.argsort(-probs("fruits"))[:12]):
        if counts[i]:
            tick.set_color("C3")  # tokens already in the answer
axes[0].set_ylabel("probability")
axes[0].legend()
fig.suptitle("“List five fruits.” after “1. Apple 2. Banana 3. Orange 4. Apple 5.” "
             "(red labels: already in the answer)", y=1.08)
plt.show()

# %% [markdown]
# The repeated items (` Orange`, ` Ban`, ` Apple`) lose probability to new fruit. The
# frequency penalty hits ` Apple` (said twice) twice as hard; the repetition penalty also
# reaches tokens of the prompt and scales the logit rather than shifting it.
#
# ## How the chain combines
#
# One request usually sets several parameters. They apply in a fixed order (SPEC.md):
# constraints → `logit_bias` → penalties → `temperature` → `top_k` → `top_p` → `top_a` →
# `min_p` → draw, and each filter sees the distribution renormalised over what the previous
# one kept. Adding the parameters of a typical request one at a time, on the uncertain step
# after "there was a dragon named":

# %%
chain = [
    ("model", {}),
    ("+ temperature 0.8", {"temperature": 0.8}),
    ("+ top_k 40", {"top_k": 40}),
    ("+ top_p 0.9", {"top_p": 0.9}),
    ("+ top_a 0.1", {"top_a": 0.1}),
    ("+ min_p 0.05", {"min_p": 0.05}),
]
kw, rows = {}, []
for title, add in chain:
    kw.update(add)
    p = probs("dragon", SamplingParams(**kw))
    rows.append((title, int((p > 0).sum()), p.max()))
    print(f"{title:<18} kept {rows[-1][1]:>6}   P(top token) {rows[-1][2]:.3f}")

# numpy: the same chain, step by step on renormalised distributions
p = softmax(logits["dragon"] / 0.8)
for keep in [lambda p: keep_top_k(p, 40), lambda p: keep_top_p(p, 0.9),
             lambda p: keep_top_a(p, 0.1), lambda p: keep_min_p(p, 0.05)]:
    p = np.where(keep(p), p, 0)
    p /= p.sum()
np.testing.assert_allclose(probs("dragon", SamplingParams(**kw)), p, atol=1e-6)

# %% [markdown]
# Because the filters come after temperature, the temperature changes what they keep. With
# `top_p=0.9` fixed, the number of tokens that survive grows quickly with the temperature on
# the uncertain step, and not at all on the confident one:

# %%
temps = np.round(np.linspace(0.2, 1.6, 15), 2)
fig, ax = plt.subplots(figsize=(5.5, 3))
for name, title in [("dragon", "uncertain (…a dragon named)"),
                    ("paris", "confident (…capital of France is)")]:
    kept = [int((probs(name, SamplingParams(temperature=t, top_p=0.9)) > 0).sum())
            for t in temps]
    ax.plot(temps, kept, "o-", ms=3, label=title)
ax.set_yscale("log")
ax.set_xlabel("temperature")
ax.set_ylabel("tokens kept by top_p=0.9")
ax.legend()
plt.show()

# %% [markdown]
# ## Where top_a and min_p cut differently from top_p
#
# `top_p` cuts where the cumulated mass reaches p, so its cut depends on the whole tail.
# `min_p` and `top_a` are thresholds relative to the most likely token, `m·p_max` and
# `a·p_max²`. Both rise with the model's confidence, `top_a`'s faster: the two thresholds
# are equal at `p_max = m / a` (0.25 for `min_p=0.05`, `top_a=0.2`), so `top_a` is the
# stricter of the two on a confident step and the looser on an uncertain one. `top_p` cares
# about neither: on a flat step it must take a long tail of unlikely tokens to reach its
# mass.
#
# Below, each step's tokens sorted by probability (log-log), with each method's cut: a
# token is kept if it lies left of the `top_p` line, and above a threshold line for
# `min_p` / `top_a`.

# %%
# figure: docs/parameters_cut_points.png
cuts = {"top_p=0.95": SamplingParams(top_p=0.95), "min_p=0.05": SamplingParams(min_p=0.05),
        "top_a=0.2": SamplingParams(top_a=0.2)}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
table = {}
for ax, (name, title) in zip(axes, [("land", "confident: “Once upon a time, in a”"),
                                    ("dragon", "uncertain: “…there was a dragon named”")]):
    p = probs(name)
    s = np.sort(p)[::-1]
    ranks = np.arange(1, 2001)
    ax.loglog(ranks, s[:2000], color="0.3", lw=1.5, label="model, sorted")
    kept = {k: int((probs(name, v) > 0).sum()) for k, v in cuts.items()}
    table[name] = kept
    ax.axvline(kept["top_p=0.95"] + 0.5, color="C0", ls="--", label=f"top_p=0.95 keeps "
               f"{kept['top_p=0.95']}")
    ax.axhline(0.05 * s[0], color="C1", label=f"min_p=0.05: p ≥ 0.05·p_max, keeps {kept['min_p=0.05']}")
    ax.axhline(0.2 * s[0] ** 2, color="C2", label=f"top_a=0.2: p ≥ 0.2·p_max², keeps {kept['top_a=0.2']}")
    ax.set_title(title + f"  (p_max={s[0]:.2f})", fontsize=9)
    ax.set_xlabel("rank")
    ax.set_ylim(1e-5, 1.5)
    ax.legend(fontsize=7, loc="lower left")
    # the thresholds agree with the numpy definitions
    assert kept["min_p=0.05"] == keep_min_p(p, 0.05).sum()
    assert kept["top_a=0.2"] == keep_top_a(p, 0.2).sum()
    assert kept["top_p=0.95"] == keep_top_p(p, 0.95).sum()
axes[0].set_ylabel("probability")
plt.show()
print(table)

# %% [markdown]
# On the confident step (` land` at 0.61) `top_a=0.2` keeps the fewest tokens and `top_p`
# the most: to reach 0.95 it takes a tail of words each below 1%. On the uncertain step
# (` Z` at 0.21, below the 0.25 crossover) the order of `min_p` and `top_a` flips, and
# `top_p=0.95` has to take over a hundred tokens. Relative thresholds adapt to the model's
# confidence; `top_p` adapts to the shape of the tail.
#
# Next: [sweep.ipynb](sweep.ipynb) measures what these choices do to whole answers.
