"""Shared test set-up: CPU-sized hypothesis settings and tiny random HF models built locally."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI, the demo, the notebook and `experiments.run` turn on JAX's persistent compilation cache under
# ~/.cache/snapkv_jax; tests must neither write there nor be sped up by what an earlier run left there
# (test_compile_cache.py turns it on in a temporary directory of its own).
os.environ.setdefault("SNAPKV_JAX_COMPILATION_CACHE", "off")
# Four CPU devices for the mesh tests (test_mesh.py); every other test runs on the first. Most of the
# suite's time is compiling small programs: LLVM's optimisation level 0 compiles them about a third
# faster (XLA's HLO passes are unchanged; float results may differ from level 2's in the last bits).
for flag in ("--xla_force_host_platform_device_count=4", "--xla_backend_optimization_level=0"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Every example compiles a small program; keep the counts CI-sized and never time out on compilation.
settings.register_profile("ci", deadline=None, max_examples=12, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_file():
    """Drops every compiled program when a test file ends. A pytest-xdist worker runs half the suite in
    one process; on this 2-core machine two fresh-clone runs (2026-12-03) had a worker segfault inside
    XLA's CPU compiler three quarters of the way through (test_cache_properties, which passes alone).
    The cause was not found; freeing what a worker has piled up is a guess at it, and a file's programs
    are rarely reused by another file."""
    yield
    jax.clear_caches()
