"""Test configuration: CPU only, 8 simulated devices for sharding tests, nothing downloaded."""

import os

# Must happen before jax is imported anywhere (chex imports jax; JAX reads JAX_PLATFORMS then).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")


def _compilation_cache_dir() -> str:
    """A persistent XLA compilation cache of this test session (this xdist worker's own: JAX's
    cache files are not written atomically), removed at exit. Many tests build the same tiny
    models and train steps, several times in one process (setup, resume) or in subprocesses
    (which inherit it through the environment): each distinct program compiles once per
    worker. Set JAX_COMPILATION_CACHE_DIR to choose (and keep) the directory."""
    import atexit
    import shutil
    import tempfile

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = tempfile.mkdtemp(prefix=f"pixelvla_jax_test_xla_cache_{worker}_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache_dir()
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import chex  # noqa: E402

# Must happen before JAX's backend initialises (the first jax.devices() or computation).
# Each pytest-xdist worker imports this file too, before any of its tests run.
chex.set_n_cpu_devices(8)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
