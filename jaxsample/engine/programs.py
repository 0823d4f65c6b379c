"""The engine's traced programs kept on disk, so that a new process neither traces nor lowers.

XLA's persistent compilation cache (``jaxsample.explore.use_compile_cache``, on by default in
``Engine.load`` and the commands) skips compiling the decode loop in a new process, not
tracing it: tracing the chunk loop and the prefill, then lowering them to StableHLO, took
about 6 s of a 9 s first ``generate`` call with SmolLM2 on a 2-core CPU (every process,
every notebook kernel). :func:`run` keeps each program as a serialized ``jax.export``
artifact in ``programs/`` of jaxsample's cache directory (``$JAXSAMPLE_CACHE``, as the
kernels and tables), and a later process deserializes it (milliseconds) and calls it; the
compiled executable then comes from XLA's cache.

A file is used only when everything that shaped its program is the same, so a stale program
is never run: the hash of every source file of this package (``.py``, and the CPU kernels'
``.cc``/``.h``), the versions of jax, jaxlib and flax, the backend, the static arguments
(the model's graph definition with its config, the chunk length, the mesh's shape), every
argument's structure, shape, dtype and sharding, the module-level settings of the modules
whose code the programs run (``sampler.BRANCHES``, ``native.KERNELS``, ...: every
upper-case number, string, boolean or tuple) and which function each of their names and
each method of their classes holds (a function or method replaced at run time changes the
key; other run-time changes, such as an instance's attribute, are not seen: turn the cache
off while experimenting that way), whether the CPU kernels are in use, and the
JAX settings that change a traced program's values (x64, the default matmul precision, the
PRNG implementation and ``jax_threefry_partitionable``). A program with a user transform
chain is never kept (user code is not in the hash). Files are written whole (a temporary
file and a rename), the :data:`KEEP` most recently used are kept, and a file that cannot be
read is rebuilt: the cache only ever saves time, and the outputs are the same bits either
way (the kept module is the program that the plain jit compiles).

It is on when :data:`ENABLED` is None (the default) and JAX's persistent compilation cache
is configured (without that cache the compile, not the trace, dominates), unless
``$JAXSAMPLE_PROGRAM_CACHE`` is ``0``; ``ENABLED = True`` / ``False`` forces it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import marshal
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax import export
from jax.sharding import NamedSharding

from jaxsample import native
from jaxsample.automata.disk_cache import write_whole

#: None: on when JAX's persistent compilation cache is configured (and
#: ``$JAXSAMPLE_PROGRAM_CACHE`` is not ``0``); True / False: always / never.
ENABLED: bool | None = None

#: How many program files are kept (the most recently used).
KEEP = 32

_log = logging.getLogger(__name__)
_PACKAGE = Path(__file__).resolve().parent.parent
# (name, function, static arguments, options, donated) -> the jitted wrapper that calls them
_dispatchers: dict = {}
# file name -> how this process got it: "read", "exported", or None (not exportable)
_loaded: dict = {}
# the arguments of the call being dispatched (a trace reads their shardings)
_calling = threading.local()
# the modules whose code the programs run: their settings are read when a program is traced
_TRACED = (
    "jaxsample.automata.json_mode",
    "jaxsample.automata.json_schema",
    "jaxsample.automata.stop",
    "jaxsample.decode",
    "jaxsample.engine.scheduler",
    "jaxsample.engine.slots",
    "jaxsample.model.config",
    "jaxsample.model.llama",
    "jaxsample.native",
    "jaxsample.params",
    "jaxsample.rows",
    "jaxsample.sampler",
    "jaxsample.transforms",
)


#: Warn when a new engine starts with more than this share of the process's memory maps used.
MAPS_WARN_SHARE = 0.6


def memory_maps() -> tuple[int, int] | None:
    """``(used, limit)``: the memory maps this process holds and the kernel's limit
    (``vm.max_map_count``, 65530 by default on Linux); None where they cannot be read.

    On a CPU each compiled engine program maps many regions (the chunk loop of SmolLM2 about
    1,500, a prefill bucket about 200: XLA's JIT maps each kernel's code and data), and JAX
    keeps every compiled program for the life of the process. A process that builds many
    engine settings in turn (a notebook, a test run) can reach the limit, and XLA then
    aborts the process in its next compile. ``jax.clear_caches()`` frees the programs of the
    engines no longer used.
    """
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return used, limit


def warn_if_maps_low() -> None:
    """Warns (``ResourceWarning``) when the process holds more than :data:`MAPS_WARN_SHARE`
    of its memory-map limit (:func:`memory_maps`), naming the remedies."""
    maps = memory_maps()
    if maps is None or maps[0] <= MAPS_WARN_SHARE * maps[1]:
        return
    import warnings

    warnings.warn(
        f"this process holds {maps[0]} memory maps of the kernel's limit of {maps[1]}"
        " (vm.max_map_count); each compiled engine program adds hundreds to thousands on a"
        " CPU, and XLA aborts the process when a compile finds none left. Call"
        " jax.clear_caches() to free the programs of engines no longer used (they compile"
        " again when next used), or raise vm.max_map_count",
        ResourceWarning,
        stacklevel=3,
    )


def enabled() -> bool:
    """Whether :func:`run` keeps programs on disk now (see :data:`ENABLED`)."""
    if ENABLED is not None:
        return bool(ENABLED)
    if os.environ.get("JAXSAMPLE_PROGRAM_CACHE", "") == "0":
        return False
    return bool(jax.config.jax_compilation_cache_dir)


def use_compile_cache() -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder (None if none can be
    made: a read-only home runs without it).

    Uses the folder JAX is already configured with (e.g. ``$JAX_COMPILATION_CACHE_DIR``),
    else ``xla`` under the model cache folder (``~/.cache/jaxsample/xla``; see
    :func:`jaxsample.model.cache_dir`). Programs that took at least a second to compile are
    kept. ``Engine.load`` and the commands call it (``compile_cache=False`` /
    ``--no-compile-cache`` to run without; ``$JAXSAMPLE_COMPILE_CACHE=0`` makes it change
    nothing, for every one of them).
    """
    from jaxsample.model.gguf_file import cache_dir

    if os.environ.get("JAXSAMPLE_COMPILE_CACHE", "") == "0":
        return jax.config.jax_compilation_cache_dir or None
    if not jax.config.jax_compilation_cache_dir:
        path = cache_dir() / "xla"
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return jax.config.jax_compilation_cache_dir


def directory() -> Path:
    """``programs/`` in jaxsample's cache directory (:func:`jaxsample.native.cache_dir`)."""
    return native.cache_dir() / "programs"


@functools.cache
def source_hash() -> str:
    """A hash of every source file of this package (paths and contents)."""
    h = hashlib.sha1()
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cc", ".h") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _settings() -> tuple:
    """The module-level settings of jaxsample's modules and the JAX settings a trace reads."""
    simple = (bool, int, float, str, tuple, type(None))
    found = []
    for name in _TRACED:
        for attr, value in sorted(vars(importlib.import_module(name)).items()):
            if attr.isupper() and isinstance(value, simple):
                found.append((name, attr, value))
            elif isinstance(value, type) and value.__module__ == name:  # a class defined here
                for method, fn in sorted(vars(value).items()):
                    fn = getattr(fn, "__func__", fn)  # staticmethod / classmethod
                    if callable(fn) and not isinstance(fn, type):
                        found.append((name, f"{attr}.{method}", _function_key(fn)))
            elif callable(value) and not isinstance(value, type):
                found.append((name, attr, _function_key(value)))
    config = jax.config
    jax_settings = (
        config.jax_enable_x64,
        str(config.jax_default_matmul_precision),
        str(config.jax_default_prng_impl),
        config.jax_threefry_partitionable,
    )
    mode = native._mode() if native.KERNELS == "auto" else "xla"
    return tuple(found), jax_settings, mode, jax.default_backend()


def _function_key(fn) -> tuple:
    """Which function a module name holds: its own module and name, and its code when it is
    not this package's (whose code the source hash covers). A function replaced at run time
    (a monkeypatch, a notebook's experiment) changes the key, so a program traced with it is
    never run in its place, nor it in the program's."""
    fn = getattr(fn, "__wrapped__", fn)
    where = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
    if str(where[0]).startswith("jaxsample"):
        return where
    code = getattr(fn, "__code__", None)
    digest = hashlib.sha1(marshal.dumps(code)).hexdigest() if code is not None else repr(fn)
    return (*where, digest)


def _versions() -> tuple:
    import flax
    import jaxlib

    return jax.__version__, jaxlib.__version__, flax.__version__


def _sharding_text(s) -> str:
    if s is None:
        return "-"
    return f"{s.mesh.axis_names}{tuple(s.mesh.devices.shape)}{s.spec}{s.memory_kind}"


def run(
    name: str,
    jitted: Callable,
    static: tuple,
    args: tuple,
    options: dict,
    *,
    donate: int | None,
    out_tree: Callable[[tuple], Any],
    cacheable: bool = True,
):
    """``jitted(*static, *args, **options)``, through a kept program when :func:`enabled`.

    ``jitted`` is a ``jax.jit`` function whose static arguments are ``static`` (positional,
    first) and ``options`` (keywords); ``args`` are its array arguments (pytrees), of which
    ``args[donate]`` is donated (the jit's own donation). ``out_tree(args)`` gives the
    treedef of the result from the arguments (without tracing). ``cacheable=False`` (a user
    transform chain among the options) calls ``jitted`` as is.

    Each call goes through one ``jax.jit`` per (name, static arguments, options), so that
    JAX's own dispatch (C++, microseconds) recognises arguments it has seen; only when it
    traces (new shapes) is the kept program found, or exported and kept, for them.
    """
    if not (cacheable and enabled()):
        return jitted(*static, *args, **options)
    key = (name, jitted, static, tuple(sorted(options.items())), donate)
    dispatch = _dispatchers.get(key)
    if dispatch is None:
        dispatch = _dispatchers[key] = _dispatcher(name, jitted, static, options, donate, out_tree)
    _calling.args = args  # the concrete arguments, whose shardings a trace reads
    try:
        return dispatch(*args)
    finally:
        _calling.args = None


def _dispatcher(name, jitted, static, options, donate, out_tree):
    def traced(*args):
        leaves, treedef = jax.tree.flatten(args)
        specs = []
        for tracer, given in zip(leaves, jax.tree.leaves(_calling.args), strict=True):
            aval = jax.typeof(tracer)
            sharding = _named(getattr(given, "sharding", None))
            specs.append(
                jax.ShapeDtypeStruct(
                    aval.shape, aval.dtype, weak_type=aval.weak_type, sharding=sharding
                )
            )
        exported = _program(name, jitted, static, options, specs, treedef)
        if exported is None:  # not exportable: the program itself, traced here
            return jitted.__wrapped__(*static, *args, **options)
        return jax.tree.unflatten(out_tree(args), exported.call(*leaves))

    return jax.jit(traced, donate_argnums=() if donate is None else (donate,))


def _named(sharding):
    return sharding if isinstance(sharding, NamedSharding) else None


def _program(name, jitted, static, options, specs, treedef):
    """The kept program for these arguments: read from its file, or exported and written
    there; None when it cannot be exported (the caller then traces the function itself)."""
    described = (
        name,
        _versions(),
        source_hash(),
        tuple(repr(s) for s in static),
        tuple(sorted((k, _option_text(v)) for k, v in options.items())),
        str(treedef),
        tuple((s.shape, str(s.dtype), s.weak_type, _sharding_text(s.sharding)) for s in specs),
        _settings(),
    )
    digest = hashlib.sha1(repr(described).encode()).hexdigest()
    path = directory() / f"{name}-{digest}.jaxexport"
    exported = _read(path)
    if exported is not None:
        _loaded[path.name] = "read"
        return exported
    body = jitted.__wrapped__

    def flat(*flat_args):
        out = body(*static, *jax.tree.unflatten(treedef, flat_args), **options)
        return jax.tree.leaves(out)

    checks = [export.DisabledSafetyCheck.custom_call(t) for t in native._TARGETS]
    try:
        exported = export.export(jax.jit(flat), disabled_checks=checks)(*specs)
        blob = exported.serialize()
    except Exception as err:  # the plain program instead (which raises any real error)
        _log.debug("jaxsample: program %s not kept: %s", name, err)
        _loaded[path.name] = None
        return None
    write_whole(path, lambda f: f.write(blob), "*.jaxexport", KEEP)
    _loaded[path.name] = "exported"
    return exported


def _option_text(value) -> str:
    if hasattr(value, "devices") and hasattr(value, "axis_names"):  # a Mesh: its shape only
        return f"mesh{value.axis_names}{tuple(value.devices.shape)}"
    return repr(value)


def _read(path: Path):
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        exported = export.deserialize(bytearray(blob))
    except Exception:  # a damaged or foreign file: rebuilt
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by the pruning
    return exported


def clear() -> None:
    """Forgets the programs loaded in this process (the files stay): the next call of each
    traces its wrapper again and reads the file."""
    _dispatchers.clear()
    _loaded.clear()
