"""Host tables kept on disk between processes (jaxsample.automata.disk_cache).

The independent expectation is the same tables computed in this process; a file is used
only when it holds what the computation would give (same key, same source code), and a
corrupt file or an unwritable directory only costs the time of computing again.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_json_mode import EOS, SPECIALS, VOCAB

from jaxsample.automata import disk_cache
from jaxsample.automata import json_mode as jm
from jaxsample.automata import json_schema as js


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSAMPLE_CACHE", str(tmp_path))
    return tmp_path / "tables"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


def test_grammar_tables_come_back_from_the_disk_equal(cache, monkeypatch):
    vocab = list(VOCAB)
    expected = jm.compile_tables(vocab, EOS, tuple(SPECIALS), 4)
    computed = []
    real_compile = jm.compile_tables

    def counting(*args):
        computed.append(1)
        return real_compile(*args)

    monkeypatch.setattr(jm, "compile_tables", counting)

    def tables():  # what compile_grammar does past its in-process cache
        return jm._tables(("test-key",), vocab, EOS, tuple(SPECIALS), 4)

    assert _same(tables(), expected) and len(computed) == 1
    [path] = cache.glob("json-grammar-*.npz")
    assert _same(tables(), expected) and len(computed) == 1  # read from the file
    path.write_bytes(b"not an npz file")
    assert _same(tables(), expected) and len(computed) == 2  # corrupt: computed, rewritten
    assert _same(tables(), expected) and len(computed) == 2
    monkeypatch.setattr(disk_cache, "source_hash", lambda path: "other code")
    assert _same(tables(), expected) and len(computed) == 3  # other code: a file of its own
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob("*.tmp"))


def test_only_the_most_recently_used_files_are_kept(cache, monkeypatch):
    monkeypatch.setattr(disk_cache, "KEEP", 2)
    for i in range(4):
        disk_cache.cached_arrays("kind", i, jm.__file__, ("x",), lambda: {"x": np.arange(3)})
    disk_cache.cached_arrays("other", 0, jm.__file__, ("x",), lambda: {"x": np.arange(3)})
    assert len(list(cache.glob("kind-*.npz"))) == 2  # each kind keeps its own
    assert len(list(cache.glob("other-*.npz"))) == 1


def test_an_unwritable_cache_directory_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("JAXSAMPLE_CACHE", str(blocker))  # tables/ cannot be made under it
    got = disk_cache.cached_arrays("kind", 0, jm.__file__, ("x",), lambda: {"x": np.ones(2)})
    assert np.array_equal(got["x"], np.ones(2))


def test_a_computation_that_returns_other_names_is_an_error(cache):
    with pytest.raises(ValueError, match="expected"):
        disk_cache.cached_arrays("kind", 0, jm.__file__, ("x",), lambda: {"y": np.ones(2)})


def test_a_schema_pool_from_the_disk_equals_one_built_from_the_vocabulary(cache, monkeypatch):
    """A new process (no vocabulary data in memory) builds its pool from the disk without
    the vocabulary's walks, to the same arrays; a schema added to it gives the same masks."""
    vocab = list(VOCAB)
    monkeypatch.setattr(js, "_VOCABS", {})
    js._get_vocab(vocab, EOS, SPECIALS)  # this process has the vocabulary's data
    fresh = js.SchemaPool(vocab, eos_id=EOS, special_ids=SPECIALS, size="small")
    assert list(cache.glob("schema-pool-*.npz")) == []  # built from it, not the disk

    monkeypatch.setattr(js, "_VOCABS", {})  # a new process: nothing in memory
    first = js.SchemaPool(vocab, eos_id=EOS, special_ids=SPECIALS, size="small")
    assert len(list(cache.glob("schema-pool-*.npz"))) == 1

    monkeypatch.setattr(js, "_VOCABS", {})

    def no_walks(*args):
        raise AssertionError("the vocabulary's data was built")

    monkeypatch.setattr(js, "_Vocab", no_walks)
    loaded = js.SchemaPool(vocab, eos_id=EOS, special_ids=SPECIALS, size="small")
    for pool in (first, loaded):
        assert _same(pool.np, fresh.np)
        for k in ("ws_only", "h_a", "h_b", "h_stay", "h_keep", "h_add", "h_suf"):
            a, b = getattr(pool.pool, k), getattr(fresh.pool, k)
            assert a.dtype == b.dtype and np.array_equal(a, b), k
