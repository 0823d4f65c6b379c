"""Every Python example in the README and docs/ runs against the current API.

A public name is a promise: an example that names a function, an argument or a field that
was renamed fails here. The examples run as written, with one substitution: ``Engine.load``
and the default engine of ``generate`` give the small random model over the real vocabulary
(tests/small_engine.py) with the settings the example asks for, so that each runs in
seconds; a request an example sends must not be refused. What they print is not checked
(the real model's answers are the notebooks' and the README command's business). Blocks
that list signatures rather than run are named in :data:`LISTINGS` by their first line; a
new block is one or the other.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from small_engine import real_tokenizer, small_model

import jaxsample.api as api
from jaxsample.api import Engine

ROOT = Path(__file__).resolve().parent.parent
FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

#: (file, start of the first line) of the blocks that list signatures (annotations, ``...``,
#: names bound elsewhere): read, not run.
LISTINGS = {
    ("docs/api.md", "for key, c in engine.stream(items, job_seed=0):  "),
    ("docs/constraints.md", "from jaxsample.automata import stop, json_mode"),
    ("docs/constraints.md", "from jaxsample.automata import json_schema as js"),
    ("docs/model.md", "from jaxsample.model import load_model, default_model_path"),
    ("docs/sampler.md", "from jaxsample import (Distribution, History, Plan,"),
}


def _listing(name: str, first: str) -> bool:
    return any(name == f and first.startswith(start) for f, start in LISTINGS)


def _blocks():
    for name in FILES:
        text = (ROOT / name).read_text()
        for m in re.finditer(r"^([ \t]*)```python\n(.*?)^\1```", text, re.S | re.M):
            code = textwrap.dedent(m.group(2))
            first = code.strip().splitlines()[0]
            yield name, text[: m.start()].count("\n") + 1, first, code


BLOCKS = list(_blocks())
RUNNABLE = [b for b in BLOCKS if not _listing(b[0], b[2])]


def test_every_listing_named_is_still_there():
    for f, start in LISTINGS:
        assert sum(b[0] == f and b[2].startswith(start) for b in BLOCKS) == 1, (f, start)
    assert len(RUNNABLE) >= 7  # README (3), api.md (2), engine.md, sampler.md


@pytest.fixture(scope="module")
def small():
    tok = real_tokenizer()
    model = small_model(tok)

    def build(options):
        for k in ("dtype", "batch_invariant", "compile_cache"):
            options.pop(k, None)
        return Engine(model, tok, model_name="tiny-random", **options)

    return build


@pytest.mark.parametrize("name,line,first,code", RUNNABLE, ids=[f"{b[0]}:{b[1]}" for b in RUNNABLE])
def test_example_runs(name, line, first, code, small, monkeypatch, capsys):
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, path=None, **kw: small(kw)))
    monkeypatch.setattr(api, "_DEFAULT_ENGINE", small({}))

    def refused(err, *args, **kwargs):  # a request the example sends must be a good one
        raise AssertionError(f"the example's request was refused: {err}")

    monkeypatch.setattr(api, "_refused", refused)
    monkeypatch.setattr(api, "error_response", refused)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__doc_example__"})
