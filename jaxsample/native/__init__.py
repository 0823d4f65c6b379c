"""jaxsample's CPU kernels: top-k, block maxima, log-sum-exp, candidates, mass thresholds.

Each function here has one meaning on every backend and a plain JAX form; on XLA's CPU
backend it calls a kernel in this directory (``topk.cc``, ``rows.cc``) through XLA's FFI:

* :func:`top_k` is ``lax.top_k``, bit for bit. XLA's CPU TopK sorts through a comparator
  call per comparison and runs every row on one core; the kernel rejects most elements with
  one integer comparison (1.7-4.8x faster per call at B = 64 on 2 cores: docs/sampler.md,
  scripts/bench_topk.py).
* :func:`block_max` is the maximum of each block of a row (XLA's CPU reduction runs on one
  core; the kernel is vectorized and shares the rows out).
* :func:`log_total_top_k` is a row's ``log(sum(exp(x - max x)))`` and its top k in one
  kernel (two passes over the row, the second from cache), where XLA makes a max pass, an
  ``exp`` pass that it writes out, a sum and two top-k stages. The caller gives the JAX form
  (``otherwise``) used elsewhere; the kernel's ``log_total`` is within about 1 ulp of the
  exact value, not the same bits as a JAX form.
* :func:`candidates` is the sampler's first candidate selection: a row's block maxima, its
  top k and (optionally) ``sum(exp(x - max))`` in one call, where XLA makes a block-maximum
  pass, two top-k stages around a gather, and an ``exp`` pass with its fold. Its top k starts
  from a floor that at least k block maxima reach and reads only the blocks that reach it.
* :func:`mass_threshold` is the full-vocabulary threshold of top_p and top_k (the largest
  value whose amount at or above it reaches a target), where XLA runs a ``while_loop`` of
  fused passes; the kernel's passes are vectorized double-precision sums around sampled
  median pivots.

Every kernel shares the rows of a batch out to XLA's intra-op threads, and its result for a
row depends on that row alone (not on the batch).

The kernels are compiled on first use with the C++ compiler found as ``$CXX``, ``c++``,
``g++`` or ``clang++``, against the installed jaxlib's FFI headers, into a cache directory
(``$JAXSAMPLE_CACHE``, else ``$XDG_CACHE_HOME/jaxsample``, else ``~/.cache/jaxsample``; one
file per source, jaxlib version and compiler, about 5 s once). When there is no compiler, or
the build or the load fails, every function here uses its JAX form, with a warning naming
the reason; :func:`status` says which is in use and why. ``KERNELS = "xla"`` (read when a
function is traced) or the environment variable ``JAXSAMPLE_KERNELS=xla`` turns the kernels
off.

The JAX form of :func:`top_k` (and :func:`sort_distinct`) is ``lax.top_k``, or with
``TOP_K_FORM = "rank"`` (``JAXSAMPLE_TOP_K_FORM=rank``; what ``"auto"`` picks on a GPU) a
count of ranks that needs no sort, for small rows (see :data:`TOP_K_FORM`).
"""

from __future__ import annotations

import ctypes
import functools
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
import numpy as np
from jax import lax

#: ``"auto"``: jaxsample's kernels on XLA's CPU backend when they build, the JAX forms
#: elsewhere; ``"xla"``: the JAX forms everywhere. Read when a function is traced.
KERNELS = os.environ.get("JAXSAMPLE_KERNELS", "auto")
#: The JAX form of :func:`top_k` and :func:`sort_distinct` (read when a function is traced;
#: the CPU kernels, where they run, do not read it): ``"sort"``, ``lax.top_k`` and
#: ``jnp.sort`` (on a GPU, XLA sorts each row for ``k > 16``: one sort kernel of a few
#: microseconds to tens of them per call, at any batch size); ``"rank"``, each element's rank
#: counted by comparing it with every element of its row (a fused reduction, no sort), where
#: the rows of the batch times ``n**2`` are at most :data:`RANK_LIMIT`, else the sort form;
#: ``"auto"`` (the default): ``"rank"`` when JAX's default backend is a GPU, else ``"sort"``.
#: Bit for bit the same results either way. On an H100 the rank form cut the sampler's kernel
#: time at B = 1 from 0.126 to 0.077 ms per call and its call time by 10-15%; at B = 64 the
#: call times were equal (scripts/bench_sampler_gpu.py times both; docs/sampler.md). With
#: XLA's CPU or TPU backends it stays the sort, whose speed there was never the problem.
TOP_K_FORM = os.environ.get("JAXSAMPLE_TOP_K_FORM", "auto")
#: The rank form's largest ``rows * n**2`` (comparisons per call).
RANK_LIMIT = 2**27

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "topk.cc", _HERE / "rows.cc"]
_HEADERS = [_HERE / "common.h"]
#: FFI target name -> the symbol of its handler in the library
_TARGETS = {
    "jaxsample_topk": "JaxsampleTopK",
    "jaxsample_block_max": "JaxsampleBlockMax",
    "jaxsample_log_total_top_k": "JaxsampleLogTotalTopK",
    "jaxsample_candidates": "JaxsampleCandidates",
    "jaxsample_mass_threshold": "JaxsampleMassThreshold",
}
# no contraction into fused multiply-adds: every instruction-set clone gives the same bits
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "path": str, "lib": the loaded library


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """jaxsample's cache directory for built and computed files: ``$JAXSAMPLE_CACHE``, else
    ``$XDG_CACHE_HOME/jaxsample``, else ``~/.cache/jaxsample`` (the kernels here, and the
    host tables of :mod:`jaxsample.automata.disk_cache`)."""
    if os.environ.get("JAXSAMPLE_CACHE"):
        return Path(os.environ["JAXSAMPLE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxsample"


def _build(compiler: str) -> Path:
    """Compiles the kernels (once per source, jaxlib and compiler) and returns the library."""
    import jaxlib

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    tag = hashlib.sha256(
        b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
        + jaxlib.__version__.encode()
        + version.encode()
        + " ".join(_FLAGS).encode()
    ).hexdigest()[:16]
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "jaxsample"
        cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"kernels-{tag}.so"
    if lib.exists():
        return lib
    # build under a unique name, then rename: concurrent builds (test workers) never see a
    # partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    sources = [str(path) for path in _SOURCES]
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *sources, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.unlink(tmp)
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} failed: {' | '.join(tail)}")
    os.replace(tmp, lib)
    return lib


def _load() -> bool:
    """Builds, loads and registers the kernels once per process; True when they are usable."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler ($CXX, c++, g++ or clang++) on the PATH")
            path = _build(compiler)
            lib = ctypes.CDLL(str(path))
            for target, symbol in _TARGETS.items():
                handler = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, handler, platform="cpu")
        except Exception as e:  # any failure: the JAX forms, said once
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
            warnings.warn(
                f"jaxsample: the native CPU kernels are off ({_state['reason']}); "
                "using the JAX forms (the same meaning, slower on CPU)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        _state.update(ok=True, reason="built and registered", path=str(path), lib=lib)
        return True


def _wanted() -> bool:
    """Whether ``KERNELS`` asks for the kernels (ValueError naming it when it is neither value)."""
    if KERNELS not in ("auto", "xla"):
        raise ValueError(f"jaxsample.native.KERNELS must be 'auto' or 'xla', got {KERNELS!r}")
    return KERNELS == "auto"


def status() -> dict:
    """Whether the functions here use the kernels on CPU: ``{"native": bool, "reason": str,
    "path": str}`` (builds them if that has not been tried yet and ``KERNELS`` allows it)."""
    if not _wanted():
        return {"native": False, "reason": f"KERNELS = {KERNELS!r}", "path": None}
    ok = _load()
    return {"native": ok, "reason": _state["reason"], "path": _state.get("path")}


def kernels_alone() -> bool:
    """Whether a program traced now calls the kernels with no other branch (:func:`_mode`
    is ``"kernel"``: a CPU-only process, ``KERNELS = "auto"``, the kernels built). A caller
    may then skip work that only the JAX forms need."""
    return _wanted() and _mode() == "kernel"


def _platforms() -> set:
    """The platforms of the backends this process has (empty if JAX cannot say)."""
    try:
        return set(jax.extend.backend.backends())
    except Exception:  # an older JAX without jax.extend.backend.backends
        return set()


def _mode() -> str:
    """How :func:`_dispatch` traces a call now: ``"kernel"`` in a process whose only backend
    is the CPU, with the kernels built; ``"otherwise"`` when the default backend is an
    accelerator, or the kernels did not build; ``"both"`` (``lax.platform_dependent``) with a
    CPU default and accelerators too."""
    platforms = _platforms()
    if "cpu" not in platforms or jax.default_backend() != "cpu" or not _load():
        return "otherwise"
    return "kernel" if platforms == {"cpu"} else "both"


def _dispatch(kernel, otherwise, *args):
    """``kernel(*args)`` where a program runs on XLA's CPU backend with the kernels built,
    ``otherwise(*args)`` elsewhere (:func:`_mode`). In a process whose only backend is the
    CPU the program holds the kernel's call alone; when the default backend is an
    accelerator, ``otherwise`` is used everywhere (its programs, and their jaxprs, are what
    they would be without the kernels); with a CPU default and accelerators too,
    ``lax.platform_dependent`` picks the kernel when the program is lowered for the CPU."""
    mode = _mode()
    if mode == "otherwise":
        return otherwise(*args)
    if mode == "kernel":  # the usual CPU-only process: no branch in the program
        return kernel(*args)
    return lax.platform_dependent(*args, cpu=kernel, default=otherwise)


def _call(target: str, x: jax.Array, shapes, *more: jax.Array, **attributes):
    """The FFI call of ``target`` on the rows of ``x`` (and the operands ``more``): one result
    per ``(tail, dtype)`` of ``shapes``, of shape ``x.shape[:-1] + tail``."""
    out = [jax.ShapeDtypeStruct(x.shape[:-1] + tail, dtype) for tail, dtype in shapes]
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return tuple(call(x, *more, **attributes))


def _rows_ok(x: jax.Array) -> bool:
    return _wanted() and x.dtype == jnp.float32 and x.ndim > 0 and x.shape[-1] > 0


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys whose order is ``lax.top_k``'s order of float32 (-0.0 just below +0.0)."""
    i = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _pick_slots(rank: jax.Array, values: jax.Array, k: int) -> jax.Array:
    """``out[..., s] = values[..., i]`` for the ``i`` of rank ``s`` (ranks distinct), ``s < k``:
    a one-hot sum, exact for ints."""
    slots = jnp.arange(k, dtype=jnp.int32).reshape((1,) * (rank.ndim - 1) + (k, 1))
    hit = rank[..., None, :] == slots
    return jnp.sum(jnp.where(hit, values[..., None, :], 0), axis=-1, dtype=values.dtype)


def _rank_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` by counting: the rank of element i is the number of elements above it
    in the order (a larger key, or the same key at a lower index), so the ranks are distinct
    and slot s of the result holds the element of rank s."""
    keys = _order_keys(x)
    n = x.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    kj, ki = keys[..., None, :], keys[..., :, None]
    lower = (idx[None, :] < idx[:, None]).reshape((1,) * (x.ndim - 1) + (n, n))
    above = (kj > ki) | ((kj == ki) & lower)
    rank = jnp.sum(above, axis=-1, dtype=jnp.int32)
    ids = _pick_slots(rank, jnp.broadcast_to(idx, x.shape), k)
    return jnp.take_along_axis(x, ids, axis=-1), ids


def _rank_sort_distinct(x: jax.Array) -> jax.Array:
    """``jnp.sort`` of distinct ints by counting: element i goes to the slot of the number of
    elements below it."""
    rank = jnp.sum(x[..., None, :] < x[..., :, None], axis=-1, dtype=jnp.int32)
    return _pick_slots(rank, x, x.shape[-1])


_SORT_FORMS = {
    "top_k": lambda x, k: tuple(lax.top_k(x, k)),
    "sort_distinct": lambda x, k: jnp.sort(x, axis=-1),
}
_RANK_FORMS = {"top_k": _rank_top_k, "sort_distinct": lambda x, k: _rank_sort_distinct(x)}


@functools.cache
def _by_rows(op: str, k: int, limit: int):
    """``op``'s rank form where the rows of its input times ``n**2`` fit in ``limit``, else its
    sort form. The per-row code that calls it does not know the batch: a ``custom_vmap``
    defers the choice to the input of the batched call, whose shape holds every batch axis
    of the ``jax.vmap`` calls around it."""

    @jax.custom_batching.custom_vmap
    def fn(x):
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
        form = _RANK_FORMS if rows * x.shape[-1] ** 2 <= limit else _SORT_FORMS
        return form[op](x, k)

    @fn.def_vmap
    def _rule(axis_size, in_batched, x):
        out = fn(x)  # batched: x has the batch axis first
        return out, jax.tree.map(lambda _: in_batched[0], out)

    return fn


def default_is_gpu() -> bool:
    """Whether JAX's default backend is a GPU: what the ``"auto"`` settings that differ on a
    GPU (this module's :data:`TOP_K_FORM`, ``sampler.BRANCHES``,
    ``transforms.THRESHOLD_BITS``) decide by."""
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def top_k_form() -> str:
    """The form :data:`TOP_K_FORM` names, ``"sort"`` or ``"rank"`` (``"auto"`` resolved by
    JAX's default backend; ValueError naming it when it is none of the three)."""
    if TOP_K_FORM not in ("auto", "sort", "rank"):
        raise ValueError(
            f"jaxsample.native.TOP_K_FORM must be 'auto', 'sort' or 'rank', got {TOP_K_FORM!r}"
        )
    if TOP_K_FORM == "auto":
        return "rank" if default_is_gpu() else "sort"
    return TOP_K_FORM


def _jax_form(op: str, x: jax.Array, k: int):
    """The JAX form of ``op`` (``"top_k"`` or ``"sort_distinct"``) that :data:`TOP_K_FORM`
    names."""
    # (the rank form reads float32 keys; lax.top_k's own errors for a bad k stay its own)
    floats = x.dtype == jnp.float32 and x.ndim > 0 and 1 <= k <= x.shape[-1]
    if top_k_form() == "sort" or (op == "top_k" and not floats):
        return _SORT_FORMS[op](x, k)
    return _by_rows(op, k, RANK_LIMIT)(x)


def sort_distinct(x: jax.Array) -> jax.Array:
    """``jnp.sort(x, axis=-1)`` for rows of distinct ints, in the form :data:`TOP_K_FORM`
    names (the same values either way).

    >>> sort_distinct(jnp.array([7, 2, 5])).tolist()
    [2, 5, 7]
    """
    x = jnp.asarray(x)
    return _jax_form("sort_distinct", x, x.shape[-1])


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)``, bit for bit: on XLA's CPU backend through jaxsample's kernel.

    ``x``: float32 ``[..., n]``; ``k``: a static int in ``[1, n]``. Other dtypes, and every
    backend but the CPU, use the JAX form :data:`TOP_K_FORM` names (``lax.top_k`` by
    default). Batches under ``jax.vmap``.

    >>> top_k(jnp.array([1.0, 3.0, 3.0, -0.0, 0.0]), 5)[1].tolist()
    [1, 2, 0, 4, 3]
    """
    x = jnp.asarray(x)
    xla = lambda x: _jax_form("top_k", x, k)  # noqa: E731
    if not _rows_ok(x) or not 1 <= k <= x.shape[-1]:
        return xla(x)
    kernel = lambda x: _call("jaxsample_topk", x, [((k,), jnp.float32), ((k,), jnp.int32)])  # noqa: E731
    values, ids = _dispatch(kernel, xla, x)
    return values, ids


def _block_max_xla(x: jax.Array, block: int) -> jax.Array:
    pad = (-x.shape[-1]) % block
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    return jnp.max(padded.reshape(x.shape[:-1] + (-1, block)), axis=-1)


def block_max(x: jax.Array, block: int) -> jax.Array:
    """The maximum of each block of ``block`` elements along the last axis: ``f32[..., n] ->
    f32[..., ceil(n / block)]`` (the last block may be shorter).

    For rows without NaN. The kernel orders values as ``lax.top_k`` does, so a block that
    holds both zeros has the maximum +0.0; XLA's maximum may give either zero there.

    >>> block_max(jnp.arange(10.0), 4).tolist()
    [3.0, 7.0, 9.0]
    """
    x = jnp.asarray(x)
    xla = lambda x: _block_max_xla(x, block)  # noqa: E731
    if not _rows_ok(x) or block < 1:
        return xla(x)
    blocks = -(-x.shape[-1] // block)
    kernel = lambda x: _call(  # noqa: E731
        "jaxsample_block_max", x, [((blocks,), jnp.float32)], block=np.int64(block)
    )[0]
    return _dispatch(kernel, xla, x)


def _log_total_top_k_xla(x: jax.Array, k: int):
    from jaxsample.transforms import sanitize  # transforms imports this module

    z = sanitize(x)
    values, ids = lax.top_k(z, k)
    top = jnp.max(z, axis=-1, keepdims=True)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    return jnp.log(jnp.sum(jnp.exp(z - shift), axis=-1)), values, ids


def log_total_top_k(x: jax.Array, k: int, otherwise=None):
    """``(log_total, values, ids)`` of each row of float32 logits: ``log_total =
    log(sum(exp(x - max x)))`` (``f32[...]``) and ``top_k(x, k)`` (``f32[..., k]``,
    ``i32[..., k]``), with NaN read as -inf and +inf as the largest float32
    (``transforms.sanitize``); a row of -inf only has ``log_total = -inf``. The row's
    ``log_softmax`` is ``(x - values[..., :1]) - log_total``: exact to float32 whatever the
    size of the max, where ``x - logsumexp(x)`` loses the normalizer's digits once the max
    is large (at a max of 1e7, float32's spacing is 1). ``otherwise(x)``, which must return
    the same, is used where the kernel is not (another backend, ``KERNELS = "xla"``, no
    compiler); by default a plain JAX form (``jnp.sum``, whose bits may change with the
    batch on CPU).

    The kernel's ``log_total`` is within about 1 ulp of the exact value (its ``exp`` is a
    polynomial, the sum is in double precision in a fixed order per row), so it need not
    have the bits of ``otherwise``'s; its top k has ``lax.top_k``'s.

    >>> log_total, values, ids = log_total_top_k(jnp.log(jnp.array([1.0, 3.0])), 1)
    >>> round(float(log_total), 5), ids.tolist()  # log((1 + 3) / 3)
    (0.28768, [1])
    """
    x = jnp.asarray(x)
    if otherwise is None:
        otherwise = lambda x: _log_total_top_k_xla(x, k)  # noqa: E731
    if not _rows_ok(x) or not 1 <= k <= x.shape[-1]:
        return otherwise(x)
    shapes = [((), jnp.float32), ((k,), jnp.float32), ((k,), jnp.int32)]
    kernel = lambda x: _call("jaxsample_log_total_top_k", x, shapes)  # noqa: E731
    return _dispatch(kernel, otherwise, x)


def candidates(x: jax.Array, k: int, block: int, total, otherwise):
    """A row's block maxima, top k and normalizer in one call: ``(block_max, values, ids,
    total)`` with ``block_max`` as :func:`block_max` (``f32[..., ceil(n / block)]``),
    ``(values, ids)`` as ``lax.top_k(x, k)`` and ``total = sum(exp(x - max x))``
    (``f32[...]``; NaN when ``total`` is False). For rows without NaN or +inf.

    ``total`` is a bool or a scalar bool array (a ``lax.cond`` between the two forms).
    ``otherwise(x, total)``, which must return the same, is used where the kernel is not; its
    ``total`` need not have the kernel's bits (the kernel's is within about 1 ulp of the
    exact sum, as :func:`log_total_top_k`'s). On CPU one pass over the row gives the block
    maxima (and the sum); a key that at least k block maxima reach bounds the k-th largest
    element from below, so the top k comes from the scan of the blocks that reach it.

    >>> x = jnp.log(jnp.array([1.0, 4.0, 2.0, 1.0, 8.0]))
    >>> xla = lambda x, t: (block_max(x, 2), *lax.top_k(x, 2), jnp.sum(jnp.exp(x - x.max())))
    >>> bm, values, ids, total = candidates(x, 2, 2, True, xla)
    >>> np.exp(bm).round(3).tolist(), ids.tolist(), round(float(total), 4)
    ([4.0, 2.0, 8.0], [4, 1], 2.0)
    """
    x = jnp.asarray(x)
    if not _rows_ok(x) or not 1 <= k <= x.shape[-1] or block < 1:
        return otherwise(x, total)
    blocks = -(-x.shape[-1] // block)
    shapes = [((blocks,), jnp.float32), ((k,), jnp.float32), ((k,), jnp.int32), ((), jnp.float32)]

    from jaxsample.transforms import _maybe  # transforms imports this module

    def call(x, with_total: bool):
        return _call("jaxsample_candidates", x, shapes, block=np.int64(block), total=with_total)

    def kernel(x):
        return _maybe(total, lambda: call(x, True), lambda: call(x, False))

    return _dispatch(kernel, lambda x: otherwise(x, total), x)


def mass_threshold(x: jax.Array, a: jax.Array, target: jax.Array, run: jax.Array, otherwise):
    """The largest value ``t`` of each row of ``x`` with ``sum(a[x >= t]) >= target``
    (``f32[...]``), or -inf when ``run`` is False, when ``sum(a) < target`` or when the row
    has no finite value: the full-vocabulary threshold of top_p (``a``: the weights) and
    top_k (``a``: ones). ``x``: ``f32[..., n]``, finite or -inf (-inf: not kept); ``a``:
    ``f32[..., n] >= 0``, 0 where ``x`` is -inf; ``target``: ``f32[...]``; ``run``:
    ``bool[...]``.

    ``otherwise(x, a, target, run)``, which must return the same, is used where the kernel is
    not. The kernel bisects over the values' order keys with each pass's amount summed in
    double precision (8 lanes) and sorts the last 256 elements between its bounds; the JAX
    form sums in float32, so at a boundary within its rounding of ``target`` the two may
    pick neighbouring values.

    >>> x = jnp.array([3.0, 1.0, 2.0, -jnp.inf])
    >>> a = jnp.array([0.5, 0.2, 0.3, 0.0])
    >>> float(mass_threshold(x, a, jnp.float32(0.7), jnp.bool_(True), None))
    2.0
    """
    x, a = jnp.asarray(x), jnp.asarray(a)
    target, run = jnp.asarray(target, jnp.float32), jnp.asarray(run, jnp.bool_)
    if not _rows_ok(x) or a.dtype != jnp.float32 or a.shape != x.shape:
        return otherwise(x, a, target, run)

    def kernel(x, a, t, r):
        return _call("jaxsample_mass_threshold", x, [((), jnp.float32)], a, t, r)[0]

    return _dispatch(kernel, otherwise, x, a, target, run)
