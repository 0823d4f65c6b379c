"""Host tables kept on disk between processes (what every process start would recompute).

A table set is a dict of numpy arrays computed from a vocabulary by code in this package
(the JSON grammar, the JSON Schema pool's template). :func:`cached_arrays` keeps it in
``tables/`` of jaxsample's cache directory (``$JAXSAMPLE_CACHE``, else
``$XDG_CACHE_HOME/jaxsample``, else ``~/.cache/jaxsample``, as for the CPU kernels), keyed
by the caller's key and a hash of the source file that computes it, so an edit to that code
never reads an old file. Files are written whole (a temporary file, then a rename), the
:data:`KEEP` most recently used of each kind are kept, and a file that cannot be read is
computed again: the cache only ever saves time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxsample.native import cache_dir

#: How many files of each kind are kept (the most recently used).
KEEP = 8


def directory() -> Path:
    """``tables/`` in jaxsample's cache directory (:func:`jaxsample.native.cache_dir`)."""
    return cache_dir() / "tables"


@functools.cache
def source_hash(path: str) -> str:
    """A hash of the file at ``path`` (the code that computes a table set)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def cached_arrays(
    kind: str, key, source: str, names: tuple[str, ...], compute: Callable[[], dict]
) -> dict[str, np.ndarray]:
    """The arrays ``compute()`` returns (a dict with exactly ``names``), from the disk when a
    process computed them before with the same ``key`` and the same ``source`` file."""
    digest = hashlib.sha1(repr((key, source_hash(source))).encode()).hexdigest()
    folder = directory()
    path = folder / f"{kind}-{digest}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            if sorted(f.files) == sorted(names):
                arrays = {k: f[k] for k in names}
                os.utime(path)  # recently used: kept by the pruning below
                return arrays
    except (OSError, ValueError, EOFError):
        pass
    arrays = compute()
    if sorted(arrays) != sorted(names):
        raise ValueError(f"{kind}: computed {sorted(arrays)}, expected {sorted(names)}")
    write_whole(path, lambda f: np.savez(f, **arrays), f"{kind}-*.npz", KEEP)
    return arrays


def write_whole(path: Path, write: Callable, pattern: str, keep: int) -> None:
    """Writes a cache file whole or not at all: ``write(f)`` into a temporary file of the
    same folder, then a rename (several writers each leave a complete file); then keeps the
    ``keep`` most recently used files matching ``pattern`` in that folder. A failure to
    write (a read-only or full disk) is ignored: a cache only ever saves time."""
    folder = path.parent
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # whole or absent, even with several writers
        files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
        for stale in files[:-keep]:
            stale.unlink(missing_ok=True)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
