# Cells to append to notebooks/src/constraints.py once JSON Schema (issue 13) runs in the
# slot engine on main. Kept here so that the section is ready; not built into a notebook.

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
# An independent check in plain Python: every answer parses and fits the schema.

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
