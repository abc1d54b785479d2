"""Test helpers that chex does not provide."""

import contextlib
import logging
import re

import jax


@contextlib.contextmanager
def log_compilations():
    """Collects the names of the functions XLA compiles inside the ``with`` block.

    Example::

        with log_compilations() as compiled:
            step(state, batch, new_route)
        assert "train_step" not in compiled   # a new route of the same shape reuses the program
    """
    compiled: list[str] = []
    pattern = re.compile(r"Compiling (?:jit\()?([^\s)]+)")

    class Collector(logging.Handler):
        def emit(self, record):
            match = pattern.match(record.getMessage())
            if match:
                compiled.append(match.group(1))

    handler = Collector(level=logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield compiled
    finally:
        logger.removeHandler(handler)
