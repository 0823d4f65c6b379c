"""JSON Schema outputs: the device mask against llguidance, instances from
hypothesis-jsonschema, fuzzed rollouts validated with jsonschema, refusals, the pool."""

from __future__ import annotations

import json
import os
import random
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import schema_support as S

from jaxsample.automata import json_schema as js
from jaxsample.params import InvalidRequestError

pytest.importorskip("llguidance")
pytest.importorskip("jsonschema")

OBJ = {"type": "object", "additionalProperties": False}

SCHEMAS = {
    "person": {
        **OBJ,
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
            "ok": {"type": ["boolean", "null"]},
        },
        "required": ["name", "age", "tags"],
    },
    "tree": {
        "$defs": {
            "node": {
                **OBJ,
                "properties": {
                    "v": {"type": "integer", "exclusiveMinimum": -10, "maximum": 99999},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v", "kids"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "anyof": {
        **OBJ,
        "properties": {
            "x": {
                "anyOf": [{"type": "string", "minLength": 2}, {"type": "integer"}, {"type": "null"}]
            },
            "y": {"type": "number"},
        },
        "required": ["x", "y"],
    },
    "optional": {
        **OBJ,
        "properties": {
            k: {"type": t} for k, t in zip("abcd", ["string", "integer", "boolean", "number"])
        },
        "required": ["c"],
    },
    "tuple": {
        **OBJ,
        "properties": {
            "t": {
                "type": "array",
                "prefixItems": [
                    {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"},
                    {"const": 7},
                ],
                "items": False,
                "minItems": 1,
            },
            "lst": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
        },
        "required": ["t", "lst"],
    },
    "enum": {
        **OBJ,
        "properties": {
            "e": {"enum": ["x", 1, None, {"k": [1, 2]}, True, 'é"q']},
            "s": {"type": "string", "minLength": 3, "maxLength": 5},
        },
        "required": ["e", "s"],
    },
    "formats": {
        **OBJ,
        "properties": {
            f: {"type": "string", "format": f}
            for f in [
                "date",
                "time",
                "date-time",
                "duration",
                "uuid",
                "email",
                "hostname",
                "ipv4",
                "ipv6",
            ]
        },
        "required": ["date", "uuid", "ipv4", "date-time"],
    },
    "extra": {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "additionalProperties": {"type": "boolean"},
    },
    "bounds": {
        **OBJ,
        "properties": {
            "p": {"type": "number", "minimum": 0, "maximum": 1},
            "q": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 3},
            "i": {"type": "integer", "minimum": -1234, "maximum": -7},
            "o": {
                "oneOf": [
                    {"type": "string", "maxLength": 3},
                    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                    {"type": "integer", "minimum": 5},
                ]
            },
        },
        "required": ["p", "q", "i", "o"],
    },
    "pattern": {"type": "string", "pattern": "ab+c|^x[^0-9]?$"},
    "hosts": {
        **OBJ,
        "properties": {
            "h": {"type": "string", "format": "hostname"},
            "e": {"type": "string", "format": "email"},
            "alt": {"anyOf": [{"type": "null"}, {"format": "hostname"}]},
        },
        "required": ["h", "e", "alt"],
    },
}
# llguidance compares where both implement the same language (no number bounds with
# fractions: ours are a documented conservative subset; formats: regexes differ)
LLG = ["person", "tree", "anyof", "optional", "tuple", "enum", "extra"]
STRICT = {"extra": False}


@pytest.fixture(scope="module")
def vocab():
    return S.real_vocab()


@pytest.fixture(scope="module")
def pool(vocab):
    tb, eos, specials = vocab
    sp = js.SchemaPool(tb, eos_id=eos, special_ids=specials, size="medium")
    handles = {}
    for name, sch in SCHEMAS.items():
        c = js.compile_schema(
            sch, tb, eos_id=eos, special_ids=specials, strict=STRICT.get(name, True)
        )
        handles[name] = sp.add(c)
    return sp, handles


_allowed = jax.jit(js.allowed)
_advance = jax.jit(js.advance)


def _excused_mine_only(m, t, vocab, in_string, text):
    """A token our mask allows and llguidance's mask does not: fine if llguidance still
    accepts it when consumed (its mask keeps forced text to one tokenization), or it holds
    DEL inside a string (JSON allows it; llguidance does not)."""
    mm = m.deep_copy()
    if mm.try_consume_tokens([int(t)]) == 1:
        return True
    # JSON allows DEL raw, the escape \\/ and \\uXXXX of any non-surrogate; llguidance
    # does not (docs/constraints.md)
    near = text[-6:] + vocab[t]
    return in_string and (b"\x7f" in vocab[t] or b"\\/" in near or b"\\u" in near)


def _compare_walk(sp, h, m, vocab, eos, rng, steps, forced=None):
    """Walk (random tokens from the common mask, or ``forced``), comparing the masks."""
    pool = sp.pool
    s = js.init_state(h.start)
    V = len(vocab)
    n_cmp = 0
    text = b""
    toks = forced if forced is not None else [None] * steps
    for forced_t in toks:
        mine = np.asarray(_allowed(pool, s, 1 << 20))
        theirs = S.ll_mask(m, V)
        in_str = bool(sp.np["in_string"][int(s.q)])
        for t in np.flatnonzero(theirs & ~mine):
            # whitespace-run cap; one spelling per character in constrained strings (a key
            # of additionalProperties: llguidance also takes \uXXXX for any character)
            ws = vocab[t].strip() == b"" and int(s.ws_run) >= js.WS_RUN_MAX
            assert ws or (in_str and b"\\u" in text[-6:] + vocab[t]), (
                f"llguidance allows {vocab[t]!r} after {text!r}"
            )
        for t in np.flatnonzero(mine & ~theirs):
            assert _excused_mine_only(m, t, vocab, in_str, text), (
                f"we allow {vocab[t]!r} after {text!r}"
            )
        n_cmp += 1
        if forced_t is None:
            both = np.flatnonzero(mine & theirs)
            if len(both) == 0:
                break
            t = int(rng.choice(both))
        else:
            t = int(forced_t)
            assert mine[t], f"valid instance token {vocab[t]!r} refused after {text!r}"
        if t == eos:
            break
        s = _advance(pool, s, jnp.int32(t))
        assert m.consume_token(t)
        text += vocab[t]
    return n_cmp, s


@pytest.mark.parametrize("name", LLG)
def test_mask_equals_llguidance_random_walks(vocab, pool, name):
    tb, eos, _ = vocab
    sp, handles = pool
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # hash() differs per process
    total = 0
    for _ in range(3):
        m = S.ll_matcher(SCHEMAS[name])
        n, _ = _compare_walk(sp, handles[name], m, tb, eos, rng, steps=30)
        total += n
    assert total >= 10


def _segment(text: bytes, index, rng: random.Random):
    out, i = [], 0
    while i < len(text):
        cands = [n for n in range(1, min(12, len(text) - i) + 1) if text[i : i + n] in index]
        if not cands:  # a character this vocabulary cannot spell (e.g. U+40000 and up)
            return None
        n = rng.choice(cands)
        out.append(index[text[i : i + n]])
        i += n
    return out


def _ordered(schema, inst, root):
    """The instance with object keys in schema order (the order we generate)."""
    if isinstance(schema, dict) and "$ref" in schema:
        node = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        return _ordered(node, inst, root)
    if isinstance(inst, dict) and isinstance(schema, dict):
        props = schema.get("properties", {})
        keys = [k for k in props if k in inst] + [k for k in inst if k not in props]
        return {k: _ordered(props.get(k, {}), inst[k], root) for k in keys}
    if isinstance(inst, list) and isinstance(schema, dict):
        pre = schema.get("prefixItems", [])
        return [
            _ordered(pre[i] if i < len(pre) else schema.get("items", {}), v, root)
            for i, v in enumerate(inst)
        ]
    return inst


def _instances(schema, root, depth=0):
    """A hypothesis strategy of valid instances: hypothesis-jsonschema for the leaves;
    objects, arrays, anyOf and $ref composed here (hypothesis-jsonschema 0.23's object
    strategy uses a Hypothesis internal that Hypothesis 6.170 no longer has)."""
    from hypothesis import strategies as st
    from hypothesis_jsonschema import from_schema

    if "$ref" in schema:
        node = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        return _instances(node, root, depth)
    if "anyOf" in schema:
        return st.one_of([_instances(x, root, depth) for x in schema["anyOf"]])
    if schema.get("type") == "object":
        props, req = schema.get("properties", {}), set(schema.get("required", []))
        sub = {k: _instances(v, root, depth + 1) for k, v in props.items()}
        return st.fixed_dictionaries(
            {k: v for k, v in sub.items() if k in req},
            optional={k: v for k, v in sub.items() if k not in req},
        )
    if schema.get("type") == "array":
        pre = [_instances(x, root, depth + 1) for x in schema.get("prefixItems", [])]
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", 4)
        if depth >= 4:
            hi = min(hi, lo)
        if schema.get("items") is False:
            hi = min(hi, len(pre))
        rest = _instances(schema.get("items", {}), root, depth + 1) if len(pre) < hi else None
        n_rest = st.integers(max(0, lo - len(pre)), max(0, hi - len(pre)))
        head = st.tuples(*pre).map(list) if pre else st.just([])
        return st.tuples(head, n_rest).flatmap(
            lambda hn: (
                st.lists(rest, min_size=hn[1], max_size=hn[1]).map(lambda r: hn[0] + r)
                if rest is not None
                else st.just(hn[0])
            )
        )
    return from_schema(schema)


@pytest.mark.parametrize("name", ["person", "tree", "anyof", "optional", "tuple", "enum"])
def test_instances_from_hypothesis_jsonschema(vocab, pool, name):
    """Random valid instances, randomly tokenized: every prefix token is allowed by our mask
    and llguidance's (then masks compared), and the end is complete."""
    from hypothesis import HealthCheck, assume, given, settings

    tb, eos, _ = vocab
    sp, handles = pool
    index = {b: i for i, b in enumerate(tb) if b}
    schema = SCHEMAS[name]
    seen = []

    @settings(
        max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(_instances(schema, schema))
    def run(inst):
        text = json.dumps(_ordered(schema, inst, schema), ensure_ascii=False, separators=(",", ":"))
        toks = _segment(text.encode(), index, random.Random(len(seen)))
        assume(toks is not None)
        m = S.ll_matcher(schema)
        _, s = _compare_walk(sp, handles[name], m, tb, eos, None, 0, forced=toks)
        assert bool(js.is_complete(sp.pool, s)), text
        seen.append(text)

    run()
    assert seen


# ----------------------------------------------------------------------------- fuzzing
def _fuzz(vocab, pool, names, n_rows, budgets, seed, steps):
    tb, eos, _ = vocab
    sp, handles = pool
    rng = np.random.default_rng(seed)
    rows = [names[i % len(names)] for i in range(n_rows)]
    starts = jnp.asarray([handles[r].start for r in rows], jnp.int32)
    bias = jnp.asarray(np.stack([S.adversarial_bias(tb, eos, rng) for _ in rows]))
    bud = jnp.asarray(budgets, jnp.int32)
    toks, complete = S.rollout(sp.pool, starts, bias, bud, jax.random.key(seed), steps=steps)
    toks = np.asarray(toks)
    for r, name in enumerate(rows):
        text = b"".join(tb[t] for t in toks[r] if t >= 0)
        assert complete[r], (name, text)
        S.validate(SCHEMAS[name], text)
    return len(rows)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fuzz_rollouts_validate(vocab, pool, seed):
    """4 x 256 = 1024 adversarial rollouts over all schemas, half with budgets of the
    minimum to minimum + 3 tokens, half up to 40: every answer is complete and validates."""
    names = list(SCHEMAS)
    sp, handles = pool
    rng = np.random.default_rng(100 + seed)
    n = 256
    budgets = []
    for i in range(n):
        lo = handles[names[i % len(names)]].min_tokens
        budgets.append(
            int(rng.integers(lo, lo + 4)) if i % 2 else int(rng.integers(lo, max(lo, 40) + 1))
        )
    assert _fuzz(vocab, pool, names, n, budgets, seed, steps=max(budgets)) == n


@pytest.mark.skipif(not os.environ.get("JAXSAMPLE_SLOW"), reason="long fuzz: JAXSAMPLE_SLOW=1")
def test_fuzz_rollouts_validate_many(vocab, pool):
    names = list(SCHEMAS)
    for seed in range(10, 30):
        _fuzz(vocab, pool, names, 256, [128] * 256, seed, steps=128)


# ----------------------------------------------------------------------- pool, recompile
def test_new_schema_is_data_not_a_new_program(vocab):
    """Schemas added one after another: the jitted loop traces once."""
    tb, eos, specials = vocab
    sp = js.SchemaPool(tb, eos_id=eos, special_ids=specials, size="small")
    traces = []

    @jax.jit
    def step(pool, st):
        traces.append(1)
        m = jax.vmap(js.allowed, in_axes=(None, 0, None))(pool, st, 50)
        t = jnp.argmax(m, -1).astype(jnp.int32)
        return jax.vmap(js.advance, in_axes=(None, 0, 0))(pool, st, t)

    for name in ["person", "enum", "bounds", "pattern"]:
        c = js.compile_schema(SCHEMAS[name], tb, eos_id=eos, special_ids=specials)
        h = sp.add(c)
        st = jax.vmap(js.init_state)(jnp.full(4, h.start, jnp.int32))
        step(sp.pool, st)
    assert len(traces) == 1


def test_pool_evicts_unused_and_reuses(vocab):
    tb, eos, specials = vocab
    sp = js.SchemaPool(tb, eos_id=eos, special_ids=specials, size="small")
    a = sp.add(js.compile_schema(SCHEMAS["person"], tb, eos_id=eos, special_ids=specials))
    assert sp.add(js.compile_schema(SCHEMAS["person"], tb, eos_id=eos, special_ids=specials)) is a
    assert a.refs == 2


def test_compiled_schemas_are_cached_within_a_bound(vocab, monkeypatch):
    """compile_schema keeps the SCHEMA_CACHE_SIZE most recently used schemas (a job can bring
    a new schema with every request); a dropped one compiles again to the same tables, which
    the pool recognises by content."""
    tb, eos, specials = vocab
    monkeypatch.setattr(js, "SCHEMA_CACHE_SIZE", 2)
    monkeypatch.setattr(js, "_SCHEMAS", js.OrderedDict())
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(4)]
    first = js.compile_schema(schemas[0], tb, eos_id=eos, special_ids=specials)
    sp = js.SchemaPool(tb, eos_id=eos, special_ids=specials, size="small")
    h = sp.add(first)
    assert js.compile_schema(schemas[0], tb, eos_id=eos, special_ids=specials) is first  # cached
    for s in schemas[1:]:
        js.compile_schema(s, tb, eos_id=eos, special_ids=specials)
    assert len(js._SCHEMAS) == 2
    again = js.compile_schema(schemas[0], tb, eos_id=eos, special_ids=specials)
    assert again is not first and again.key == first.key  # dropped, compiled anew
    assert again.tables.keys() == first.tables.keys() and again.start == first.start
    for name, table in first.tables.items():
        np.testing.assert_array_equal(np.asarray(again.tables[name]), np.asarray(table))
    assert sp.add(again) is h  # the pool's handle, by content
    # the most recently used stays: schema 3 was compiled last, then schema 0 again
    assert list(js._SCHEMAS)[-1][1] == js.canonical(schemas[0])


# ----------------------------------------------------------------------- min tokens
def _shortest_tokenization(text: bytes, vocab) -> int:
    index = {b for b in vocab if b}
    best = [0] + [1 << 30] * len(text)
    for i in range(1, len(text) + 1):
        for j in range(max(0, i - 81), i):
            if text[j:i] in index:
                best[i] = min(best[i], best[j] + 1)
    return best[-1]


@pytest.mark.parametrize(
    "const",
    [
        "hello world, this is a constant",
        -12.5e3,
        17,
        {"a": 1},
        [1, 2, 3],
        {"k": {"n": [True, None]}},
    ],
)
def test_min_tokens_of_a_const_is_its_shortest_tokenization(vocab, const):
    """Scalars: exactly the shortest tokenization; objects and arrays may use whitespace
    inside (flexible, as llguidance), so at most the compact text's."""
    tb, eos, specials = vocab
    c = js.compile_schema({"const": const}, tb, eos_id=eos, special_ids=specials)
    text = json.dumps(const, separators=(",", ":")).encode()
    if isinstance(const, (dict, list)):
        assert 1 <= js.min_tokens(c) <= _shortest_tokenization(text, tb)
    else:
        assert js.min_tokens(c) == _shortest_tokenization(text, tb)


@pytest.mark.parametrize("huge", [2**30, 2**63, 10**30])
def test_a_max_length_past_any_answer_is_no_limit(vocab, huge):
    """maxLength 2**63 overflowed the int64 tables (a server error); any maxLength of 2**30
    characters or more is no limit (no answer that fits a context is that long): the same
    tables as a string without maxLength."""
    tb, eos, specials = vocab
    free = js.compile_schema({"type": "string"}, tb, eos_id=eos, special_ids=specials)
    c = js.compile_schema(
        {"type": "string", "maxLength": huge}, tb, eos_id=eos, special_ids=specials
    )
    assert c.n_states == free.n_states and c.min_tokens == free.min_tokens
    for k, table in free.tables.items():
        np.testing.assert_array_equal(np.asarray(c.tables[k]), np.asarray(table), err_msg=k)


# ----------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "schema,keyword,pointer",
    [
        ({"allOf": [{"type": "string"}]}, "allOf", "/allOf"),
        (
            {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
            "not",
            "/properties/a/not",
        ),
        ({"if": {}, "then": {}}, "if", "/if"),
        (
            {"type": "object", "patternProperties": {"^a": {}}},
            "patternProperties",
            "/patternProperties",
        ),
        ({"type": "object", "dependentSchemas": {}}, "dependentSchemas", "/dependentSchemas"),
        ({"type": "string", "format": "uri"}, "format", "/format"),
        (
            {"anyOf": [{"format": "email"}, {"type": "string", "format": "hostname"}]},
            "format",
            "/anyOf/1/format",
        ),
        ({"type": "string", "pattern": "(?=a)b"}, "pattern", "/pattern"),
        ({"type": "string", "pattern": "(a)\\1"}, "pattern", "/pattern"),
        ({"$ref": "https://example.com/s.json"}, "$ref", "/$ref"),
        ({"type": "array", "maxItems": 1000}, "maxItems", "/maxItems"),
        (
            {"type": "array", "items": {"oneOf": [{"type": "string"}, {"enum": ["a", 1]}]}},
            "oneOf",
            "/items/oneOf/1",
        ),
        (
            {"type": "object", "properties": {"a~/b": {"type": "integer", "multipleOf": 2}}},
            "multipleOf",
            "/properties/a~0~1b/multipleOf",
        ),
        (
            {"type": "object", "additionalProperties": True},
            "additionalProperties",
            "/additionalProperties",
        ),
        ({"type": "object", "properties": {}, "required": ["x"]}, "required", "/required"),
    ],
)
def test_refusals_name_keyword_and_pointer(vocab, schema, keyword, pointer):
    tb, eos, specials = vocab
    with pytest.raises(InvalidRequestError) as e:
        js.compile_schema(schema, tb, eos_id=eos, special_ids=specials, strict=True)
    msg = str(e.value)
    assert f"'{keyword}' at {pointer}" in msg, msg


def test_max_tokens_below_minimum_refused(vocab):
    from jaxsample.params import SamplingParams

    tb, eos, specials = vocab
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": SCHEMAS["person"], "strict": True},
    }
    p = SamplingParams(response_format=rf, max_tokens=3)
    c = js.compile_schema(json.loads(p.json_schema)["schema"], tb, eos_id=eos, special_ids=specials)
    assert c.min_tokens > 3
    with pytest.raises(InvalidRequestError) as e:
        js.check_budget(p.max_tokens, c)
    assert e.value.field == "max_tokens" and str(c.min_tokens) in str(e.value)
    js.check_budget(c.min_tokens, c)


def test_params_response_format_json_schema():
    from jaxsample.params import SamplingParams

    sch = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": sch, "strict": False}}
    p = SamplingParams(response_format=rf)
    assert p.response_format == "json_schema"
    assert json.loads(p.json_schema) == {"name": "x", "schema": sch, "strict": False}
    assert hash(p) == hash(SamplingParams(response_format=rf))
    q = __import__("dataclasses").replace(p, temperature=0.5)
    assert q.json_schema == p.json_schema
    body = {"model": "m", "messages": [], "response_format": rf}
    assert SamplingParams.from_request(body).json_schema == p.json_schema
    bad = [
        ({"type": "json_schema"}, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"schema": sch}},
            "response_format.json_schema.name",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": sch, "strict": "yes"}},
            "response_format.json_schema.strict",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": sch, "extra": 1}},
            "response_format.json_schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"allOf": []}}},
            "response_format.json_schema.schema",
        ),
    ]
    for value, field in bad:
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(response_format=value)
        assert e.value.field == field, (value, e.value)
    with pytest.raises(InvalidRequestError):
        SamplingParams.from_request({"model": "m", "messages": [], "json_schema": "{}"})


def test_table_limit_refusal_names_the_pattern(vocab):
    """A pattern whose states each allow most of the vocabulary, past the walk budget: the
    refusal names the pattern and its pointer (and comes quickly)."""
    tb, eos, specials = vocab
    pat = ".*".join("abcdefghijklmnopqrstuvwxyz")
    schema = {
        **OBJ,
        "properties": {"a": {"type": "string"}, "c": {"type": "string", "pattern": pat}},
    }
    with pytest.raises(InvalidRequestError) as e:
        js.compile_schema(schema, tb, eos_id=eos, special_ids=specials)
    assert "'pattern' at /properties/c/pattern: too large for the tables" in str(e.value)


# ------------------------------------------------------------- hostname / email lengths
_HOST_CHARS = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _long_label_bias(tb, eos, rng, kind):
    """Logits that push toward long labels: long letter/digit/hyphen tokens up, quotes (and
    dots, or hyphens, depending on ``kind``) pushed so that only the limits stop a label."""
    b = rng.normal(0, 1, len(tb)).astype(np.float32)
    for t, x in enumerate(tb):
        body = x.strip(b'"')
        if body and set(body) <= _HOST_CHARS:
            b[t] += 0.5 * len(body)
            if kind == "hyphen" and b"-" in body:
                b[t] += 8
        if b'"' in x:
            b[t] -= 12
        if kind == "dots" and b"." in x:
            b[t] += 4
    b[eos] -= 20
    return b


@pytest.mark.parametrize("seed", [0, 1])
def test_hostnames_and_emails_under_long_label_logits_validate(vocab, pool, seed):
    """Rollouts pushed toward the longest labels (letters and digits, hyphens, dots):
    every hostname and email validates with jsonschema's FormatChecker (fqdn) and the
    explicit limits: labels <= 63 bytes, names <= 253, email local parts <= 64."""
    tb, eos, _ = vocab
    sp, handles = pool
    rng = np.random.default_rng(seed)
    kinds = ["long", "hyphen", "dots"]
    rows = 24
    bias = np.stack([_long_label_bias(tb, eos, rng, kinds[r % 3]) for r in range(rows)])
    starts = jnp.full(rows, handles["hosts"].start, jnp.int32)
    budgets = jnp.asarray([400 if r % 4 else 60 for r in range(rows)], jnp.int32)
    toks, complete = S.rollout(
        sp.pool, starts, jnp.asarray(bias), budgets, jax.random.key(seed), steps=400
    )
    toks = np.asarray(toks)
    longest = 0
    for r in range(rows):
        text = b"".join(tb[t] for t in toks[r] if t >= 0)
        assert complete[r], text
        inst = S.validate(SCHEMAS["hosts"], text)
        S.check_hostname(inst["h"])
        local, domain = inst["e"].rsplit("@", 1)
        assert len(local) <= js.LOCAL_MAX
        S.check_hostname(domain)
        longest = max(longest, max(len(x) for x in inst["h"].split(".")))
    assert longest == js.LABEL_MAX  # the logits did reach the label limit


def _single(tb, ch: bytes) -> int:
    return tb.index(ch)


def _walk_text(sp, h, tb, text: bytes):
    s = js.init_state(h.start)
    for ch in text:
        s = _advance(sp.pool, s, jnp.int32(_single(tb, bytes([ch]))))
        assert int(s.q) != js.DEAD, text
    return s


def _allows(sp, s, tb, ch: bytes) -> bool:
    return bool(np.asarray(_allowed(sp.pool, s, 1 << 20))[_single(tb, ch)])


def _format_pool(vocab, fmt):
    """(pool, handle) of the schema ``{"format": fmt}`` alone in a small pool."""
    tb, eos, specials = vocab
    sp = js.SchemaPool(tb, eos_id=eos, special_ids=specials, size="small")
    return sp, sp.add(js.compile_schema({"format": fmt}, tb, eos_id=eos, special_ids=specials))


def test_mask_refuses_the_64th_label_byte_and_the_254th_name_byte(vocab):
    tb = vocab[0]
    sp, h = _format_pool(vocab, "hostname")
    s = _walk_text(sp, h, tb, b'"' + b"a" * 62)
    assert _allows(sp, s, tb, b"a") and _allows(sp, s, tb, b".")
    assert not _allows(sp, s, tb, b"-")  # a 63rd byte '-' could never end the label
    s = _walk_text(sp, h, tb, b'"' + b"a" * 63)
    assert not _allows(sp, s, tb, b"a") and not _allows(sp, s, tb, b"-")
    assert _allows(sp, s, tb, b".") and _allows(sp, s, tb, b'"')
    # a multi-byte token is refused when it would cross the limit, allowed up to it
    s = _walk_text(sp, h, tb, b'"' + b"a" * 60)
    mask = np.asarray(_allowed(sp.pool, s, 1 << 20))
    for t, x in enumerate(tb):
        if x and set(x) <= _HOST_CHARS and x[:1] != b"-" and x[-1:] != b"-":
            assert mask[t] == (len(x) <= 3), x
    # the name: 63 + 1 + 63 + 1 + 63 + 1 + 61 = 253 bytes
    name = b".".join([b"a" * 63] * 3 + [b"a" * 60])
    s = _walk_text(sp, h, tb, b'"' + name)  # 252 bytes
    assert _allows(sp, s, tb, b"a")
    assert not _allows(sp, s, tb, b".") and not _allows(sp, s, tb, b"-")
    s = _walk_text(sp, h, tb, b'"' + name + b"a")  # 253 bytes
    assert not _allows(sp, s, tb, b"a") and not _allows(sp, s, tb, b".")
    assert _allows(sp, s, tb, b'"')
    s = _walk_text(sp, h, tb, b'"' + name[:-2])  # 250 bytes: "." then one byte still fits
    assert _allows(sp, s, tb, b".")
    s = _advance(sp.pool, s, jnp.int32(_single(tb, b".")))
    assert _allows(sp, s, tb, b"a") and not _allows(sp, s, tb, b"-")
    # a refused token advances to DEAD
    s = _walk_text(sp, h, tb, b'"' + b"a" * 63)
    assert int(_advance(sp.pool, s, jnp.int32(_single(tb, b"a"))).q) == js.DEAD


def test_mask_refuses_the_65th_local_part_byte(vocab):
    tb = vocab[0]
    sp, h = _format_pool(vocab, "email")
    s = _walk_text(sp, h, tb, b'"' + b"a" * 62)
    assert _allows(sp, s, tb, b".") and _allows(sp, s, tb, b"a")
    s = _walk_text(sp, h, tb, b'"' + b"a" * 63)
    assert not _allows(sp, s, tb, b".") and _allows(sp, s, tb, b"a")
    s = _walk_text(sp, h, tb, b'"' + b"a" * 64)
    assert not _allows(sp, s, tb, b"a") and _allows(sp, s, tb, b"@")
    # the domain counts from the '@': its labels and length as a hostname's
    s = _walk_text(sp, h, tb, b'"' + b"a" * 64 + b"@" + b"b" * 63)
    assert not _allows(sp, s, tb, b"b") and _allows(sp, s, tb, b".")
    assert _allows(sp, s, tb, b'"')
    name = b".".join([b"b" * 63] * 3 + [b"b" * 61])
    s = _walk_text(sp, h, tb, b'"x@' + name)
    assert not _allows(sp, s, tb, b"b") and _allows(sp, s, tb, b'"')


def test_hostname_tokens_entering_and_crossing_count():
    """A synthetic vocabulary with tokens that open the string inside a label (``"www``),
    cross the '@' (``x@gmail``), cross dots, and hold a whole too-long label: the counters
    start at the token's bytes inside the region, and long inner labels are refused."""
    extra = [b'"www', b"x@gmail", b"ab.cd", b"ab.", b'com"', b'"' + b"a" * 63 + b'"']
    extra += [b'"' + b"a" * 64 + b'"', b'"' + b"a" * 64]
    tb = [bytes([i]) for i in range(256)] + extra + [b"</s>"]
    eos = len(tb) - 1
    sp = js.SchemaPool(tb, eos_id=eos, size="small")
    tid = {x: i for i, x in enumerate(tb)}

    def walk(h, toks):
        s = js.init_state(h.start)
        for x in toks:
            s = _advance(sp.pool, s, jnp.int32(tid[x]))
            assert int(s.q) != js.DEAD, toks
        return s

    def ok(s, x):
        return bool(np.asarray(_allowed(sp.pool, s, 1 << 20))[tid[x]])

    host = sp.add(js.compile_schema({"format": "hostname"}, tb, eos_id=eos))
    s = js.init_state(host.start)
    assert ok(s, b'"' + b"a" * 63 + b'"') and not ok(s, b'"' + b"a" * 64 + b'"')
    assert not ok(s, b'"' + b"a" * 64)
    s = walk(host, [b'"www'])
    assert int(s.cnt) == (3 << 8 | 3)
    s = walk(host, [b'"www', b"ab.cd"])
    assert int(s.cnt) == (8 << 8 | 2)
    s = walk(host, [b'"www'] + [b"a"] * 58)  # label of 61: "ab." would make it 63
    assert ok(s, b"ab.") and ok(s, b"ab.cd")
    s = walk(host, [b'"www'] + [b"a"] * 59)  # label of 62
    assert not ok(s, b"ab.") and not ok(s, b"ab.cd") and ok(s, b"a") and ok(s, b".")
    email = sp.add(js.compile_schema({"format": "email"}, tb, eos_id=eos))
    s = walk(email, [b'"', b"x@gmail"])
    assert int(s.cnt) == (5 << 8 | 5)
    s = walk(email, [b'"'] + [b"a"] * 63)  # local part 63 + 'x' = 64 fits
    assert ok(s, b"x@gmail")
    s = walk(email, [b'"'] + [b"a"] * 64)
    assert not ok(s, b"x@gmail") and ok(s, b"@")
    s = walk(email, [b'"', b"x@gmail"] + [b"b"] * 57)  # domain label 62: "com" too long
    assert not ok(s, b'com"') and ok(s, b"b") and ok(s, b'"')


def test_properties_are_generated_in_the_declared_order(vocab):
    """SamplingParams keeps the schema's key order (its text was sorted: every object came
    out in alphabetical order), and the compiled schema writes the properties in it."""
    from jaxsample.params import SamplingParams

    tb, eos, specials = vocab
    props = {"b": {"type": "integer"}, "a": {"type": "integer"}}
    sch = {"type": "object", "properties": props, "required": ["b", "a"]}
    sch["additionalProperties"] = False
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": sch, "strict": True}}
    stored = json.loads(SamplingParams(response_format=rf).json_schema)["schema"]
    assert list(stored["properties"]) == ["b", "a"]
    sp = js.SchemaPool(tb, eos_id=eos, special_ids=specials, size="small")
    h = sp.add(js.compile_schema(stored, tb, eos_id=eos, special_ids=specials))
    _walk_text(sp, h, tb, b'{"b":1,"a":2}')  # the declared order is allowed
    s = js.init_state(h.start)
    for ch in b'{"a':
        s = _advance(sp.pool, s, jnp.int32(_single(tb, bytes([ch]))))
    assert int(s.q) == js.DEAD  # "a" first is not
