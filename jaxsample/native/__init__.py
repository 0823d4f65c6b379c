"""Exact top-k: XLA's, or jaxsample's own kernel on XLA's CPU backend.

:func:`top_k` has the contract of ``lax.top_k`` (float32 rows, the ``k`` largest along the
last axis, descending, ties by the lower index, the same order of ``-0.0``, ``inf`` and NaN)
and gives the same bits. On a TPU or a GPU it is ``lax.top_k``. On XLA's CPU backend it
calls ``topk.cc`` in this directory through XLA's FFI: XLA's CPU TopK sorts through a
comparator call per comparison and runs every row on one core; the kernel rejects most
elements with one integer comparison and shares the rows out to XLA's intra-op threads
(1.7-4.8x faster per call at B = 64 on 2 cores, the whole sampler 1.1-1.9x on real logits:
docs/sampler.md, scripts/bench_topk.py).

The kernel is compiled on first use with the C++ compiler found as ``$CXX``, ``c++``,
``g++`` or ``clang++``, against the installed jaxlib's FFI headers, into a cache directory
(``$JAXSAMPLE_CACHE``, else ``$XDG_CACHE_HOME/jaxsample``, else ``~/.cache/jaxsample``; one
file per source, jaxlib version and compiler, about 2 s once). When there is no compiler,
or the build or the load fails, :func:`top_k` is ``lax.top_k`` everywhere, with a warning
naming the reason; :func:`status` says which is in use and why. ``TOPK = "xla"`` (read when
a function is traced) or the environment variable ``JAXSAMPLE_TOPK=xla`` turns the kernel
off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

#: ``"auto"``: jaxsample's kernel on XLA's CPU backend when it builds, ``lax.top_k``
#: elsewhere; ``"xla"``: ``lax.top_k`` everywhere. Read when a function is traced.
TOPK = os.environ.get("JAXSAMPLE_TOPK", "auto")

_TARGET = "jaxsample_topk"
_SOURCE = Path(__file__).with_name("topk.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "path": str, "lib": the loaded library


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    if os.environ.get("JAXSAMPLE_CACHE"):
        return Path(os.environ["JAXSAMPLE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxsample"


def _build(compiler: str) -> Path:
    """Compiles the kernel (once per source, jaxlib and compiler) and returns the library."""
    import jaxlib

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    tag = hashlib.sha256(
        _SOURCE.read_bytes()
        + jaxlib.__version__.encode()
        + version.encode()
        + " ".join(_FLAGS).encode()
    ).hexdigest()[:16]
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "jaxsample"
        cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"topk-{tag}.so"
    if lib.exists():
        return lib
    # build under a unique name, then rename: concurrent builds (test workers) never see a
    # partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.unlink(tmp)
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} failed: {' | '.join(tail)}")
    os.replace(tmp, lib)
    return lib


def _load() -> bool:
    """Builds, loads and registers the kernel once per process; True when it is usable."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler ($CXX, c++, g++ or clang++) on the PATH")
            path = _build(compiler)
            lib = ctypes.CDLL(str(path))
            jax.ffi.register_ffi_target(
                _TARGET, jax.ffi.pycapsule(lib.JaxsampleTopK), platform="cpu"
            )
        except Exception as e:  # any failure: XLA's top_k, said once
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
            warnings.warn(
                f"jaxsample: the native CPU top-k is off ({_state['reason']}); "
                "using lax.top_k (same results, slower on CPU)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        _state.update(ok=True, reason="built and registered", path=str(path), lib=lib)
        return True


def _wanted() -> bool:
    """Whether ``TOPK`` asks for the kernel (ValueError naming it when it is neither value)."""
    if TOPK not in ("auto", "xla"):
        raise ValueError(f"jaxsample.native.TOPK must be 'auto' or 'xla', got {TOPK!r}")
    return TOPK == "auto"


def status() -> dict:
    """Which top-k :func:`top_k` uses on CPU: ``{"native": bool, "reason": str, "path": str}``
    (builds the kernel if that has not been tried yet and ``TOPK`` allows it)."""
    if not _wanted():
        return {"native": False, "reason": f"TOPK = {TOPK!r}", "path": None}
    ok = _load()
    return {"native": ok, "reason": _state["reason"], "path": _state.get("path")}


def _platforms() -> set:
    """The platforms of the backends this process has (empty if JAX cannot say)."""
    try:
        return set(jax.extend.backend.backends())
    except Exception:  # an older JAX without jax.extend.backend.backends
        return set()


def _native(x: jax.Array, k: int):
    shape = x.shape[:-1] + (k,)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    values, ids = jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(x)
    return values, ids


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)``, bit for bit: on XLA's CPU backend through jaxsample's kernel.

    ``x``: float32 ``[..., n]``; ``k``: a static int in ``[1, n]``. Other dtypes, and every
    backend but the CPU, use ``lax.top_k``. Batches under ``jax.vmap``. In a process whose
    only backend is the CPU the program holds the kernel's call alone; when the default
    backend is an accelerator, ``lax.top_k`` is used everywhere; with a CPU default and
    accelerators too, ``lax.platform_dependent`` picks the kernel when the program is
    lowered for the CPU.

    >>> top_k(jnp.array([1.0, 3.0, 3.0, -0.0, 0.0]), 5)[1].tolist()
    [1, 2, 0, 4, 3]
    """
    x = jnp.asarray(x)
    if not _wanted() or x.dtype != jnp.float32 or x.ndim == 0 or not 1 <= k <= x.shape[-1]:
        return lax.top_k(x, k)
    platforms = _platforms()
    # a process whose default backend is an accelerator keeps XLA's top_k everywhere (its
    # programs, and their jaxprs, are what they were before this kernel)
    if "cpu" not in platforms or jax.default_backend() != "cpu" or not _load():
        return lax.top_k(x, k)
    if platforms == {"cpu"}:  # the usual CPU-only process: no branch in the program
        return _native(x, k)
    # a CPU default with accelerators too: the platform the program is lowered for decides
    values, ids = lax.platform_dependent(
        x, cpu=lambda x: _native(x, k), default=lambda x: tuple(lax.top_k(x, k))
    )
    return values, ids
