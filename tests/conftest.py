import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No engine programs kept on disk between test runs (jaxsample.engine.programs): tests patch
# functions and settings, and must not share traced programs through the user's cache
# folder; tests/test_programs.py and the multi-device engine test turn them on in a fresh
# folder. (Engine.load still turns on XLA's compilation cache, keyed by the program itself.)
os.environ.setdefault("JAXSAMPLE_PROGRAM_CACHE", "0")
# Nor does Engine.load turn on XLA's persistent cache in the test processes (it would write
# every later test's programs to the user's ~/.cache); the command tests that use the cache
# give their subprocesses a folder of their own and drop this variable.
os.environ.setdefault("JAXSAMPLE_COMPILE_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import gc  # noqa: E402

import pytest  # noqa: E402

from jaxsample.engine import programs  # noqa: E402

# A test process compiles hundreds of engine programs (every test's settings), JAX keeps them
# all, and on a CPU each maps hundreds to thousands of memory regions: past the kernel's
# vm.max_map_count (65530) XLA aborted the worker in its next compile (seen at the end of
# full runs). Freeing the compiled programs once 55% of the limit is used (below the 60% at
# which a new engine warns; about 29,000 maps, many chunk programs, are left for the next
# test) keeps the workers under it; the programs of later tests compile again as they would
# in a new process.
MAPS_CLEAR_SHARE = 0.55


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    maps = programs.memory_maps()
    if maps is not None and maps[0] > MAPS_CLEAR_SHARE * maps[1]:
        gc.collect()
        jax.clear_caches()
        gc.collect()
    yield
