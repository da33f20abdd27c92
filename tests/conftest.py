"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

# Tests run a few steps of small programs: compile fast rather than run fast.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

assert jax.device_count() == 8, (
    "tests need 8 fake CPU devices; jax was imported before conftest.py")

# Many tests build the same small stage; compile each program once per session.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("R2D2_TEST_JAX_CACHE",
                                 tempfile.mkdtemp(prefix="r2d2_jax_cache_")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
