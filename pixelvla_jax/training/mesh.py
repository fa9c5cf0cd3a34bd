"""Device mesh over the axes ('data', 'fsdp', 'tensor') and multi-host start-up.

One mesh spans every device of every host. `data` shards the batch only (parameters are
replicated along it), `fsdp` shards both the batch and the parameters (ZeRO-3 style), and
`tensor` shards parameter dims inside a layer (heads, mlp, vocab).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# Environment variables that mean "this process is one of several hosts of one job":
# (name, True if any non-empty value counts, else the value must be an integer > 1).
_MULTI_HOST_ENV = (
    ("JAX_COORDINATOR_ADDRESS", True),  # set by hand / launch scripts
    ("MEGASCALE_COORDINATOR_ADDRESS", True),
    ("JAX_NUM_PROCESSES", False),
    ("SLURM_NTASKS", False),
    ("OMPI_COMM_WORLD_SIZE", False),
)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Fills the one `-1` entry of `shape` so that the product equals `num_devices`.

    Args:
      shape: sizes per mesh axis, e.g. `{"data": -1, "fsdp": 1, "tensor": 1}`; missing axes
        count as 1; at most one axis may be -1.
      num_devices: number of devices the mesh must cover.

    Returns:
      The sizes of ('data', 'fsdp', 'tensor').
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"Mesh shape {dict(shape)} names unknown axes {sorted(unknown)}; use only {MESH_AXES}."
        )
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"Mesh shape {dict(shape)} has more than one -1; give at most one.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh shape {dict(shape)} has a size that is 0 or below -1.")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"Mesh shape {dict(shape)}: the fixed axes multiply to {known}, which does not "
                f"divide the {num_devices} devices; choose sizes whose product divides "
                f"{num_devices}."
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"Mesh shape {dict(shape)} covers {known} devices but {num_devices} are "
            f"available; make the product equal {num_devices} or set one axis to -1."
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds a `Mesh` over ('data', 'fsdp', 'tensor') with Auto axis types.

    Args:
      shape: sizes per axis (see `resolve_mesh_shape`); default all devices on `data`.
      devices: the devices to use (default `jax.devices()`, i.e. all hosts). Passing a
        subset builds a sub-mesh (tests use this to restore onto fewer devices).
    """
    shape = {"data": -1} if shape is None else dict(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        sizes = resolve_mesh_shape(shape, jax.device_count())
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto)
    devices = list(devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=auto)


def is_multi_host_environment() -> bool:
    """True when environment variables say that this process is one host of several."""
    # Cloud TPU VMs list every worker of the slice.
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    for name, any_value in _MULTI_HOST_ENV:
        value = os.environ.get(name, "")
        if not value:
            continue
        if any_value:
            return True
        if value.isdigit() and int(value) > 1:
            return True
    return False


def distributed_arguments_from_env(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """`jax.distributed.initialize` arguments from `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (the variables the README documents for GPU
    clusters and for several processes on one machine); empty when none is set (Cloud TPU,
    SLURM and Open MPI are detected by JAX itself)."""
    env = os.environ if env is None else env
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = {name: env.get(name, "") for name in names if env.get(name, "")}
    if not given:
        return {}
    if len(given) != len(names):
        missing = [name for name in names if name not in given]
        raise ValueError(
            f"Multi-process environment incomplete: {sorted(given)} set but {missing} not. Set "
            "all three: JAX_COORDINATOR_ADDRESS=host:port (process 0's address), "
            "JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=0..N-1 (a different one per process)."
        )
    try:
        num_processes = int(given["JAX_NUM_PROCESSES"])
        process_id = int(given["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(
            f"JAX_NUM_PROCESSES={given['JAX_NUM_PROCESSES']!r} and "
            f"JAX_PROCESS_ID={given['JAX_PROCESS_ID']!r} must be integers."
        ) from None
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"JAX_PROCESS_ID={process_id} is outside [0, JAX_NUM_PROCESSES={num_processes})."
        )
    return {
        "coordinator_address": given["JAX_COORDINATOR_ADDRESS"],
        "num_processes": num_processes,
        "process_id": process_id,
    }


def maybe_initialize_distributed(force: bool | None = None, **kwargs) -> bool:
    """Calls `jax.distributed.initialize()` once when running as one process per host.

    Must run before anything touches devices. On Cloud TPU no arguments are needed; on
    GPU clusters, or several processes on one machine, pass `coordinator_address`,
    `num_processes`, `process_id` via `kwargs` or set `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. CPU-only processes exchange collectives over
    Gloo (TCP), so several processes on one machine form one job with
    `JAX_PLATFORMS=cpu` (the multi-host tests run that way).

    Args:
      force: True -> always initialise; False -> never; None -> detect from environment.
      **kwargs: passed to `jax.distributed.initialize` (they win over the environment).

    Returns:
      Whether the distributed runtime was initialised by this call.
    """
    wanted = is_multi_host_environment() if force is None else force
    if not wanted:
        return False
    if jax.distributed.is_initialized():
        return False
    kwargs = {**distributed_arguments_from_env(), **kwargs}
    # Without CPU collectives every cross-process computation fails; Gloo needs nothing but
    # the coordinator (older JAX versions default to none).
    cpu_only = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if cpu_only and not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


_T = TypeVar("_T")


def process_zero_first(fn: Callable[[], _T], name: str) -> _T:
    """Runs `fn` on process 0, then (after a barrier) on every other process.

    For steps that write shared files when they are missing (a generated dataset, the tiny
    tokenizer): the other hosts then find them complete instead of racing to write or reading
    half-written ones; on hosts without a shared file system they make their own copy.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if jax.process_index() == 0 else None
    # A failure on process 0 raises there; the others then fail at this barrier.
    multihost_utils.sync_global_devices(name)
    return result if jax.process_index() == 0 else fn()
