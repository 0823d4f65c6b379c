"""Every notebook runs top to bottom (nbclient, a fresh kernel each), as saved.

Marked real_model: the notebooks use the default model. Each notebook checks its own
numbers (against plain numpy references, a parse of the JSON answer, ...) with ``assert``
cells, so a wrong result fails here, not only an exception. The kernels share one
persistent XLA compilation cache (``$JAX_COMPILATION_CACHE_DIR``, else the jaxsample cache
folder's ``xla``), so programs compiled by one notebook are loaded by the next.

Also checked without running anything: the saved ``.ipynb`` holds exactly the cells of its
source ``notebooks/src/NAME.py`` (rebuild with ``scripts/build_notebooks.py``), was saved
with its outputs and without errors, and stays small.
"""

from __future__ import annotations

import pathlib
import time

import nbformat  # the `notebooks` extra (also in `dev`)
import pytest

from scripts import build_notebooks as build

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_KB = 300


def _ids(p):
    return p.stem


def test_every_source_has_a_notebook():
    sources = {p.stem for p in (ROOT / "notebooks" / "src").glob("*.py")}
    assert sources == {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_saved_notebook_matches_source_and_has_outputs(path):
    nb = nbformat.read(path, as_version=4)
    src = build.make_notebook(ROOT / "notebooks" / "src" / f"{path.stem}.py")
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        (c.cell_type, c.source) for c in src.cells
    ], "stale notebook: run scripts/build_notebooks.py " + path.stem
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "saved without running"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert path.stat().st_size < MAX_KB * 1024


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    t0 = time.perf_counter()
    build.execute(nb)  # raises CellExecutionError with the failing cell's traceback
    took = time.perf_counter() - t0
    print(f"{path.name}: {took:.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)


# ---- jaxsample.explore, the notebooks' helpers (small random model, real vocabulary) ----


@pytest.fixture(scope="module")
def tiny_engine():
    from flax import nnx

    from jaxsample import Engine
    from jaxsample.model import Llama, Tokenizer, default_model_path, read_gguf, tiny_config

    tok = Tokenizer.from_gguf(read_gguf(default_model_path()))
    cfg = tiny_config(vocab_size=tok.vocab_size, context_length=256, eos_id=tok.eos_id)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...] * 0.1  # softer logits, so that rows really sample
    return Engine(model, tok, model_name="tiny-random")


def test_next_token_logits_equal_unpadded_prefill(tiny_engine):
    """Batched, bucket-padded prefill == each input alone at its exact length."""
    import jax.numpy as jnp
    import numpy as np

    from jaxsample.explore import next_token_logits

    inputs = ["Hello", [{"role": "user", "content": "Name a colour."}], [5, 17, 300, 2, 9]]
    got = next_token_logits(tiny_engine, inputs)
    assert got.shape == (3, tiny_engine.vocab_size) and got.dtype == np.float32
    model = tiny_engine.model
    for b, item in enumerate(inputs):
        ids = item if b == 2 else tiny_engine.encode_input(item)
        cache = model.init_cache(1, len(ids))
        want, _ = model.prefill(jnp.asarray([ids]), jnp.asarray([len(ids)]), cache)
        np.testing.assert_allclose(got[b], np.asarray(want[0]), rtol=1e-5, atol=1e-5)


def test_json_allowed_masks_replay_the_loop(tiny_engine):
    """The replayed masks allow every token the loop drew and match the automaton's own
    step-by-step answer (allowed after the prefix, independently recomputed per step)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxsample import SamplingParams
    from jaxsample.automata import json_mode
    from jaxsample.explore import json_allowed_masks

    p = SamplingParams(temperature=0.9, seed=3, max_tokens=12, response_format="json_object")
    [c] = tiny_engine.generate(["Give me JSON."], p)
    masks = json_allowed_masks(tiny_engine, c.token_ids, 12)
    assert masks.shape == (len(c.token_ids), tiny_engine.vocab_size)
    assert masks[np.arange(len(c.token_ids)), c.token_ids].all()
    g, s = tiny_engine.grammar(), json_mode.init_state(tiny_engine.grammar())
    for i, t in enumerate(c.token_ids):
        np.testing.assert_array_equal(masks[i], np.asarray(json_mode.allowed(g, s, 12 - i)))
        s = json_mode.advance(g, s, jnp.int32(t))
