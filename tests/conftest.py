"""Test configuration: CPU only, 8 simulated devices for sharding tests, nothing downloaded."""

import os

# Must happen before jax is imported anywhere (chex imports jax; JAX reads JAX_PLATFORMS then).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import chex  # noqa: E402

# Must happen before JAX's backend initialises (the first jax.devices() or computation).
# Each pytest-xdist worker imports this file too, before any of its tests run.
chex.set_n_cpu_devices(8)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
