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
