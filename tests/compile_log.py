"""Counts the programs jit lowers, by function name, from JAX's compile log.

A jitted function's `_cache_size()` is the size of its entries in JAX's shared C++ dispatch cache, an LRU
over every jitted function of the process: under pytest-xdist a worker that ran many files before may
evict an old entry while a test adds a new one, and a count taken from it comes out one short. The compile
log records each lowering, which happens only when no cache holds the program."""

import collections
import contextlib
import logging
import re

import jax

_LOGGER = "jax._src.interpreters.pxla"
_COMPILING = re.compile(r"Compiling jit\(([^)]+)\)")


class _Names(logging.Handler):
    def __init__(self, names: tuple[str, ...]):
        super().__init__(logging.DEBUG)
        self.names = names
        self.counts = collections.Counter()

    def emit(self, record):
        found = _COMPILING.match(record.getMessage())
        if found and found.group(1) in self.names:
            self.counts[found.group(1)] += 1


@contextlib.contextmanager
def lowered(*names: str):
    """Yields a Counter, function name -> programs lowered inside the `with` block, of the jitted
    functions called `names` (a function's `__name__`, e.g. "_layer")."""
    handler = _Names(names)
    logger = logging.getLogger(_LOGGER)
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler.counts
    finally:
        logger.removeHandler(handler)
