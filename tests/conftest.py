"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import gc
import os

from novarl_jax.core.distributed import set_cpu_devices  # imports no JAX

set_cpu_devices(8)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", False)

# Property tests draw the same examples on every run, so a red CI always reproduces;
# HYPOTHESIS_PROFILE=explore draws fresh ones (run it when changing a tested function).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}"
    return devs


# Compile each distinct program once per machine: tests build many identical tiny models.
_CACHE = os.environ.get(
    "NOVARL_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "novarl_jax_tests")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
# The command lines the tests start use it too (their --compilation_cache default), unbounded
# like this process's: JAX's bounded cache reads all of its thousands of entries per write.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program when a test module ends.

    Each loaded XLA:CPU executable keeps memory mappings; a test worker that held every
    program of its share of the suite reached the kernel's limit of mappings per process
    (``vm.max_map_count``, 65530 by default) and crashed loading the next one. Programs
    a later module needs again come back from the compilation cache.
    """
    yield
    jax.clear_caches()
    gc.collect()
