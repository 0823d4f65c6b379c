"""JSON Schema outputs with the real SmolLM2 model: extraction prompts answer with valid
instances (a small jitted greedy loop over prefill/decode and the schema mask)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import schema_support as S
from flax import nnx

from jaxsample.automata import json_schema as js

pytestmark = pytest.mark.real_model
pytest.importorskip("jsonschema")

OBJ = {"type": "object", "additionalProperties": False}
PERSON = {
    **OBJ,
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
}
EVENT = {
    **OBJ,
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["title", "date", "attendees"],
}
PRODUCT = {
    **OBJ,
    "properties": {
        "product": {"type": "string"},
        "price": {"type": "number", "minimum": 0},
        "in_stock": {"type": "boolean"},
        "category": {"enum": ["food", "tools", "toys", "other"]},
    },
    "required": ["product", "price", "in_stock", "category"],
}
PROMPTS = [
    ("Extract the person as JSON: Maria Lopez is 34 years old and lives in Madrid.", PERSON),
    ("Extract the event as JSON: The team meeting is on 2024-05-17 with Ann, Bob and Chen.", EVENT),
    ("Extract the product as JSON: A hammer costs 12.50 dollars and is in stock.", PRODUCT),
]


@pytest.fixture(scope="module")
def setup():
    from jaxsample.model.loading import load_model

    model, tok = load_model()
    vocab, eos, specials = list(tok.token_bytes), int(tok.eos_id), sorted(tok.special_ids)
    sp = js.SchemaPool(vocab, eos_id=eos, special_ids=specials, size="small")
    return model, tok, sp, vocab, eos, specials


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _greedy(graphdef, state, pool, tokens, lengths, starts, cache, *, steps):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens, lengths, cache)
    B = tokens.shape[0]

    def body(c, i):
        logits, st, done, cache = c
        mask = jax.vmap(js.allowed, in_axes=(None, 0, None))(pool, st, steps - i)
        tok = jnp.argmax(jnp.where(mask, logits, -jnp.inf), -1).astype(jnp.int32)
        live = ~done
        st = jax.tree.map(
            lambda a, b: jnp.where(live, a, b),
            jax.vmap(js.advance, in_axes=(None, 0, 0))(pool, st, tok),
            st,
        )
        done = done | (tok == pool.eos_id)
        logits, cache = model.decode(tok, lengths + i, cache)
        return (logits, st, done, cache), jnp.where(live, tok, -1)

    st0 = jax.vmap(js.init_state)(starts)
    (_, st, _, _), toks = jax.lax.scan(
        body, (logits, st0, jnp.zeros(B, bool), cache), jnp.arange(steps)
    )
    return toks.T, jax.vmap(js.is_complete, in_axes=(None, 0))(pool, st)


def test_extraction_prompts_answer_with_valid_instances(setup):
    model, tok, sp, vocab, eos, specials = setup
    ids, starts = [], []
    for text, schema in PROMPTS:
        msgs = [
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": text},
        ]
        ids.append(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True)))
        h = sp.add(js.compile_schema(schema, vocab, eos_id=eos, special_ids=specials))
        starts.append(h.start)
    T = max(len(x) for x in ids)
    tokens = np.zeros((len(ids), T), np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    lengths = jnp.asarray([len(x) for x in ids], jnp.int32)
    steps = 64
    cache = model.init_cache(len(ids), T + steps)
    graphdef, state = nnx.split(model)
    toks, complete = _greedy(
        graphdef,
        state,
        sp.pool,
        jnp.asarray(tokens),
        lengths,
        jnp.asarray(starts),
        cache,
        steps=steps,
    )
    toks = np.asarray(toks)
    answers = []
    for r, (_, schema) in enumerate(PROMPTS):
        text = b"".join(vocab[t] for t in toks[r] if t >= 0 and t != eos)
        assert complete[r], text
        answers.append(S.validate(schema, text))
    # the model read the prompts: some extracted value appears in its answer
    assert "Madrid" in json.dumps(answers[0]) or "Maria" in json.dumps(answers[0]), answers
