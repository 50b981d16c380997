"""JAX's persistent compilation cache (`snapkv_jax.compile_cache`): on in the directory the variable
names, off when it says so, and a second process loads what the first compiled (counted by JAX's own
'/jax/compilation_cache/cache_hits' events)."""

import os
import subprocess
import sys

PROGRAM = """
import jax, jax.numpy as jnp
import snapkv_jax as sk
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
print(sk.enable_compilation_cache())
jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((64, 64))).block_until_ready()
print(len(hits))
"""


def _run(cache: str) -> tuple[str, int]:
    env = dict(os.environ, SNAPKV_JAX_COMPILATION_CACHE=cache, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"the child process failed:\n{out.stderr[-2000:]}"
    path, hits = out.stdout.split()
    return path, int(hits)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = str(tmp_path / "xla")
    assert _run(cache) == (cache, 0)
    assert os.listdir(cache), "the first process wrote no compiled program"
    path, hits = _run(cache)
    assert path == cache and hits >= 1


def test_off_disables_it():
    assert _run("off") == ("None", 0)


def test_a_cache_path_that_cannot_be_a_directory_is_named(tmp_path):
    """A file where the directory should be raised FileExistsError from os.makedirs (an audit)."""
    import pytest

    import snapkv_jax as sk
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for path in (blocker, blocker / "under"):
        with pytest.raises(ValueError, match=f"the compilation cache directory {path} cannot be created"):
            sk.enable_compilation_cache(str(path))
