"""Test-wide JAX settings: 8 fake CPU devices and strict numerics, set before any backend use."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
# dtype promotion stays "standard": optax's Adam bias correction computes float ** int32.
