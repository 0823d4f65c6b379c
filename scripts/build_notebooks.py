"""Build the notebooks from their plain-Python sources, run them, save them with outputs.

Each notebook has a source ``notebooks/src/NAME.py`` in the "percent" format (a line
``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines start with
``# ``), so that the notebooks are reviewed and diffed as code. This script turns a source
into ``notebooks/NAME.ipynb``, executes it top to bottom in a fresh kernel with nbclient
(the repository root on ``PYTHONPATH``, one persistent XLA compilation cache shared by all
notebooks), and writes it with its outputs. A code cell whose first line is
``# figure: docs/FILE.png`` also has its first PNG output written to that file.

Usage::

    python scripts/build_notebooks.py                 # every source
    python scripts/build_notebooks.py parameters      # one notebook
    python scripts/build_notebooks.py --no-execute    # just regenerate the .ipynb files
    python scripts/build_notebooks.py --text-only sweep   # new markdown, code unchanged

Needs the ``notebooks`` extra (``pip install -e '.[notebooks]'``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
FIGURE = re.compile(r"^# figure: (\S+\.png)\s*$")
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
KERNEL = "jaxsample-notebooks"


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` from a percent-format file; kind is 'code' or 'markdown'.

    >>> parse_cells("# %% [markdown]\\n# # Title\\n#\\n# text\\n\\n# %%\\nx = 1\\n")
    [('markdown', '# Title\\n\\ntext'), ('code', 'x = 1')]
    """
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        src = "\n".join(lines).strip("\n")
        if src:
            out.append((kind, src))
    return out


def make_notebook(src_path: pathlib.Path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(parse_cells(src_path.read_text())):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(src, id=f"cell-{i:02d}"))  # stable ids: rebuilds diff cleanly
    return nb


def kernel_env() -> dict[str, str]:
    """The environment the notebooks run in: this checkout first on the path, CPU, and a
    shared persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR`` if set, else the
    jaxsample cache folder's ``xla``, as the command uses)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    if not env.get("JAX_COMPILATION_CACHE_DIR"):
        sys.path.insert(0, str(ROOT))
        from jaxsample.model.gguf_file import cache_dir

        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir() / "xla")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def _kernelspec_dir(tmp: str) -> str:
    """A kernelspec that runs this very interpreter (not whatever 'python3' a machine has
    registered), in ``tmp/kernels/``; returns the folder to put on ``JUPYTER_PATH``."""
    spec = pathlib.Path(tmp) / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "jaxsample", "language": "python"})
    )
    return tmp


def execute(nb, *, timeout: int = 600):
    """Runs ``nb`` in place in a fresh kernel of this interpreter (cwd notebooks/); raises
    ``nbclient.exceptions.CellExecutionError`` on the first failing cell."""
    from nbclient import NotebookClient

    old = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        env = kernel_env()
        paths = [_kernelspec_dir(tmp), env.get("JUPYTER_PATH")]
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, paths))
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            client = NotebookClient(
                nb,
                timeout=timeout,
                kernel_name=KERNEL,
                resources={"metadata": {"path": str(NOTEBOOKS)}},
            )
            client.execute()
        finally:
            os.environ.clear()
            os.environ.update(old)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)  # saved for readers: a plain python3 kernel
    return nb


def strip_run_metadata(nb) -> None:
    """Drops per-run noise (execution timestamps) so that rebuilt notebooks diff cleanly."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)


def save_figures(nb) -> list[pathlib.Path]:
    written = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        m = FIGURE.match(cell.source.splitlines()[0]) if cell.source else None
        if not m:
            continue
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                path = ROOT / m.group(1)
                path.write_bytes(base64.b64decode(png))
                written.append(path)
                break
        else:
            raise RuntimeError(f"cell marked '{m.group(0)}' produced no PNG")
    return written


def update_text(name: str) -> None:
    """Puts the source's markdown into the saved notebook, keeping its code cells and their
    outputs; refuses when any code cell changed (then the notebook must run again)."""
    import nbformat

    out = NOTEBOOKS / f"{name}.ipynb"
    saved = nbformat.read(out, as_version=4)
    new = make_notebook(SOURCES / f"{name}.py")
    old_code = [c for c in saved.cells if c.cell_type == "code"]
    if [c.source for c in old_code] != [c.source for c in new.cells if c.cell_type == "code"]:
        raise SystemExit(f"{name}: code cells changed; rebuild it without --text-only")
    it = iter(old_code)
    new.cells = [next(it) if c.cell_type == "code" else c for c in new.cells]
    nbformat.write(new, out)
    print(f"{name:>16}: markdown updated")


def build(name: str, *, run: bool = True) -> None:
    import nbformat

    src = SOURCES / f"{name}.py"
    nb = make_notebook(src)
    t0 = time.perf_counter()
    if run:
        execute(nb)
        strip_run_metadata(nb)
        figs = save_figures(nb)
    else:
        figs = []
    out = NOTEBOOKS / f"{name}.ipynb"
    nbformat.write(nb, out)
    took = time.perf_counter() - t0
    kb = out.stat().st_size / 1024
    print(f"{name:>16}: {took:6.1f} s, {kb:6.1f} KB, figures: {[str(f.name) for f in figs]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="notebook names (default: every source)")
    ap.add_argument("--no-execute", action="store_true", help="write the notebooks unexecuted")
    ap.add_argument(
        "--text-only", action="store_true", help="update markdown cells, keep code and outputs"
    )
    args = ap.parse_args(argv)
    names = args.names or sorted(p.stem for p in SOURCES.glob("*.py"))
    for name in names:
        if args.text_only:
            update_text(name)
        else:
            build(name, run=not args.no_execute)


if __name__ == "__main__":
    main()
