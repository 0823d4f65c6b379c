"""The engine's programs kept on disk (jaxsample.engine.programs): the same bits as the plain
jit, never traced again when kept, never used when anything that shaped them changed."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_engine import real_tokenizer, small_model

from jaxsample import SamplingParams
from jaxsample import sampler as sm
from jaxsample.api import Engine
from jaxsample.engine import programs


@pytest.fixture
def xla_cache(tmp_path):
    """XLA's persistent compilation cache in a fresh folder (as Engine.load turns it on)."""
    old = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """Programs on, kept in a fresh folder, nothing loaded in this process."""
    monkeypatch.setattr(programs, "ENABLED", True)
    monkeypatch.setattr(programs, "directory", lambda: tmp_path / "programs")
    programs.clear()
    yield tmp_path / "programs"
    programs.clear()


def _files(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{name}-*.jaxexport")) if folder.exists() else []


def _outputs(engine: Engine, items) -> dict:
    return {
        k: (c.token_ids, c.finish_reason, c.text, json.dumps(c.logprobs))
        for k, c in engine.stream(items)
    }


def test_kept_programs_give_the_same_bits_and_are_not_traced_again(kept, xla_cache, monkeypatch):
    tok = real_tokenizer()
    model = small_model(tok)
    items = [
        (0, "hello there", SamplingParams(seed=1, max_tokens=7, temperature=0.9, top_p=0.9)),
        (1, "a b c", SamplingParams(seed=2, max_tokens=5, logprobs=True, top_logprobs=3)),
        (2, "tell me", SamplingParams(seed=3, max_tokens=6, stop=["e", "ab"], top_k=20)),
        (3, "json", SamplingParams(seed=4, max_tokens=9, response_format={"type": "json_object"})),
    ]
    monkeypatch.setattr(programs, "ENABLED", False)
    expected = _outputs(Engine(model, tok, slots=2, chunk_steps=4), items)
    assert not _files(kept, "chunk")

    monkeypatch.setattr(programs, "ENABLED", True)
    exported = _outputs(Engine(model, tok, slots=2, chunk_steps=4), items)
    assert exported == expected
    # the chunk loop at both widths of two slots (1 row once one request is left), a prefill
    assert len(_files(kept, "chunk")) == 2 and len(_files(kept, "admit")) == 1

    # a new process's view: nothing loaded, and exporting (tracing) again would fail
    programs.clear()

    def exported(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(programs.export, "export", exported)
    loaded = _outputs(Engine(model, tok, slots=2, chunk_steps=4), items)
    assert loaded == expected
    # every program came from its file (None would be the plain program's fallback)
    assert list(programs._loaded.values()) == ["read", "read", "read"]
    assert len(_files(kept, "chunk")) == 2 and len(_files(kept, "admit")) == 1


@functools.partial(jax.jit, static_argnames=("scale",), donate_argnums=(0,))
def _toy(x, y, *, scale):
    """A stand-in program that reads a module setting of jaxsample when traced."""
    return {"x": x * scale + sm.NUM_CANDIDATES, "y": y.sum()}


def _run_toy(x, y, scale=2, **kw):
    return programs.run(
        "toy",
        _toy,
        (),
        (x, y),
        {"scale": scale},
        donate=0,
        out_tree=lambda args: jax.tree.structure({"x": 0, "y": 0}),
        **kw,
    )


def _expect(x, y, scale=2):
    return {"x": np.asarray(x) * scale + sm.NUM_CANDIDATES, "y": np.asarray(y).sum()}


def _check(out, want):
    assert set(out) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(out[k]), want[k])


def test_what_shaped_a_program_is_its_key(kept, monkeypatch):
    y = np.arange(6, dtype=np.int32).reshape(2, 3)
    want = _expect(np.ones(4, np.float32), y)
    _check(_run_toy(jnp.ones(4, jnp.float32), y), want)
    assert len(_files(kept, "toy")) == 1
    _check(_run_toy(jnp.ones(4, jnp.float32), y), want)  # loaded in this process: no new file
    assert len(_files(kept, "toy")) == 1

    # a module setting that the trace reads: a new program, with the new value in it
    monkeypatch.setattr(sm, "NUM_CANDIDATES", sm.NUM_CANDIDATES + 1)
    programs.clear()
    _check(_run_toy(jnp.ones(4, jnp.float32), y), _expect(np.ones(4, np.float32), y))
    assert len(_files(kept, "toy")) == 2

    # a static option, a shape, a dtype: each its own program
    _check(_run_toy(jnp.ones(4, jnp.float32), y, scale=3), _expect(np.ones(4), y, scale=3))
    _check(_run_toy(jnp.ones(5, jnp.float32), y), _expect(np.ones(5, np.float32), y))
    _check(_run_toy(jnp.ones(4, jnp.int32), y), _expect(np.ones(4, np.int32), y))
    assert len(_files(kept, "toy")) == 5

    # not cacheable (a user transform chain): the plain jit, nothing written
    _check(_run_toy(jnp.ones(6, jnp.float32), y, cacheable=False), _expect(np.ones(6), y))
    assert len(_files(kept, "toy")) == 5


def test_a_function_replaced_at_run_time_is_never_run_from_an_old_program(kept, monkeypatch):
    """A program traced before a monkeypatch (or a notebook's replacement of a sampler
    function or of a model method) is not used after it, and the reverse."""
    y = np.arange(3, dtype=np.int32)
    _check(_run_toy(jnp.ones(4, jnp.float32), y), _expect(np.ones(4, np.float32), y))

    def front(*args, **kwargs):  # a stand-in with other code
        return None

    monkeypatch.setattr(sm, "_front", front)
    programs.clear()
    _run_toy(jnp.ones(4, jnp.float32), y)
    assert len(_files(kept, "toy")) == 2

    # a method of a class of the traced modules (a notebook's experiment on the model)
    from jaxsample.model import llama

    monkeypatch.setattr(llama.Block, "finish", front)
    programs.clear()
    _run_toy(jnp.ones(4, jnp.float32), y)
    assert len(_files(kept, "toy")) == 3


def test_the_donated_argument_is_consumed(kept):
    x = jnp.ones(8, jnp.float32)
    _run_toy(x, np.zeros(3, np.int32))
    assert x.is_deleted()


def test_a_damaged_file_is_built_again(kept):
    y = np.arange(3, dtype=np.int32)
    _run_toy(jnp.ones(4, jnp.float32), y)
    [name] = _files(kept, "toy")
    (kept / name).write_bytes(b"not a program")
    programs.clear()
    _check(_run_toy(jnp.ones(4, jnp.float32), y), _expect(np.ones(4, np.float32), y))
    assert _files(kept, "toy") == [name] and (kept / name).stat().st_size > 100


def test_on_with_the_compilation_cache_unless_turned_off(monkeypatch, tmp_path):
    monkeypatch.setattr(programs, "ENABLED", None)
    monkeypatch.delenv("JAXSAMPLE_PROGRAM_CACHE", raising=False)
    old = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert not programs.enabled()
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert programs.enabled()
        monkeypatch.setenv("JAXSAMPLE_PROGRAM_CACHE", "0")
        assert not programs.enabled()
        # use_compile_cache keeps the folder JAX was given
        assert programs.use_compile_cache() == str(tmp_path)
        # $JAXSAMPLE_COMPILE_CACHE=0: it changes nothing (Engine.load, the commands)
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("JAXSAMPLE_COMPILE_CACHE", "0")
        assert programs.use_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        # otherwise it turns the cache on, in the model cache folder
        monkeypatch.delenv("JAXSAMPLE_COMPILE_CACHE")
        monkeypatch.setenv("JAXSAMPLE_MODEL_DIR", str(tmp_path / "models"))
        assert programs.use_compile_cache() == str(tmp_path / "models" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "models" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    import test_programs as t
    from jaxsample.engine import programs
    programs.ENABLED = True
    programs.directory = lambda: Path({folder!r})
    out = t._run_toy(jnp.ones(4, jnp.float32), np.arange(3, dtype=np.int32))
    print("X", float(out["x"][0]))
    """
)


def test_a_program_kept_by_one_process_is_found_by_another(kept, monkeypatch):
    """Another process (another hash seed) keeps the program; this one loads it untraced."""
    child = _CHILD.format(tests=str(Path(__file__).parent), folder=str(kept))
    env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_files(kept, "toy")) == 1

    def exported(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(programs.export, "export", exported)
    y = np.arange(3, dtype=np.int32)
    _check(_run_toy(jnp.ones(4, jnp.float32), y), _expect(np.ones(4, np.float32), y))
    assert len(_files(kept, "toy")) == 1


_LATE = textwrap.dedent(
    """
    import jax
    jax.jit(lambda x: x + 1)(1.0)  # a compile before the cache is turned on
    from jaxsample.engine.programs import use_compile_cache
    print("DIR", use_compile_cache())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.jit(lambda x: x * 3 - 1)(2.0)
    """
)


def test_the_compilation_cache_is_used_even_after_an_earlier_compile(tmp_path):
    """A notebook that ran JAX before ``Engine.load`` still gets the cache."""
    env = dict(os.environ, JAXSAMPLE_MODEL_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    env.pop("JAXSAMPLE_COMPILE_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", _LATE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"DIR {tmp_path / 'xla'}" in proc.stdout
    assert any((tmp_path / "xla").iterdir())


def test_a_new_engine_warns_when_the_memory_maps_run_low(monkeypatch):
    """Each compiled program maps regions; past vm.max_map_count XLA aborts the process, so a
    new engine warns first, naming the remedies. The real counts are read on Linux."""
    import warnings

    used, limit = programs.memory_maps()
    assert 0 < used < limit
    tok = real_tokenizer()
    model = small_model(tok)

    def build():
        return Engine(model, tok, slots=2).slot_engine()

    monkeypatch.setattr(programs, "memory_maps", lambda: (int(0.7 * limit), limit))
    with pytest.warns(ResourceWarning, match=r"jax\.clear_caches\(\).*vm\.max_map_count"):
        build()
    monkeypatch.setattr(programs, "memory_maps", lambda: (int(0.5 * limit), limit))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        build()
