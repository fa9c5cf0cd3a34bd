"""Logical axis rules -> shardings of parameters, optimizer state and batches.

Modules name the axes of their parameters (`embed`, `mlp`, `heads`, ...) with
`nn.with_logical_partitioning`; a list of `(logical_name, mesh_axes)` rules from the config
maps those names onto the mesh axes ('data', 'fsdp', 'tensor'). A dim whose size does not
divide the mesh axes it is mapped to is replicated instead (never an error), so one rule set
serves a 7B model on a pod and a tiny model on 8 simulated CPU devices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixelvla_jax.training.param_rules import path_str

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)


def normalize_rules(rules: Sequence[Sequence[Any]] | None) -> LogicalRules:
    """Turns rules from a config (lists of lists, maybe ConfigDict tuples) into hashable tuples.

    Each rule is `(logical_name, mesh_axes)` where mesh_axes is a mesh axis name, a sequence of
    them, or None (replicated). `None` for the whole argument means `DEFAULT_RULES`.
    """
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"Logical axis rule {rule!r} is not a (logical_name, mesh_axes) pair; write e.g. "
                '("embed", "fsdp") or ("batch", ("data", "fsdp")).'
            )
        name, axes = rule
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
            if len(axes) == 1:
                axes = axes[0]
        out.append((name, axes))
    return tuple(out)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def _fit_axes_to_dim(mesh: Mesh, axes: MeshAxes, dim: int) -> MeshAxes:
    """The longest prefix of `axes` whose mesh size divides `dim` (None if none does)."""
    if axes is None:
        return None
    seq = (axes,) if isinstance(axes, str) else tuple(axes)
    for n in range(len(seq), 0, -1):
        if dim % _axis_size(mesh, seq[:n]) == 0:
            return seq[0] if n == 1 else seq[:n]
    return None


def mesh_spec_for(
    logical: Sequence[str | None] | PartitionSpec,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[Sequence[Any]] | None = None,
) -> PartitionSpec:
    """Mesh `PartitionSpec` for an array of `shape` whose dims have logical names `logical`.

    Dims that do not divide their assigned mesh axes fall back to fewer axes or replication.
    """
    rules = normalize_rules(rules)
    logical = tuple(logical)
    if len(logical) > len(shape):
        raise ValueError(
            f"Logical axis names {logical} have more entries than the array's shape {tuple(shape)}."
        )
    mesh_axes = nn.logical_to_mesh_axes(logical, rules)
    fitted = [_fit_axes_to_dim(mesh, ax, dim) for ax, dim in zip(mesh_axes, shape)]
    return PartitionSpec(*fitted)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def param_shardings(
    abstract_params: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None
) -> Any:
    """NamedShardings for a (boxed) parameter tree, e.g. `jax.eval_shape(model.init, ...)`.

    Args:
      abstract_params: a pytree whose leaves are `nn.Partitioned` boxes (from
        `nn.with_logical_partitioning`) around arrays / ShapeDtypeStructs, or plain leaves
        (replicated).
      mesh: the device mesh.
      rules: logical axis rules (default `DEFAULT_RULES`).

    Returns:
      A pytree with the structure of `nn.unbox(abstract_params)` and `NamedSharding` leaves.
    """
    rules = normalize_rules(rules)

    def one(leaf: Any) -> NamedSharding:
        if _is_box(leaf):
            spec = mesh_spec_for(leaf.names, np.shape(leaf.value), mesh, rules)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_params, is_leaf=_is_box)


def match_shardings_by_path(
    abstract_tree: Any, reference_tree: Any, reference_shardings: Any, mesh: Mesh
) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters by path.

    Optimizer states hold copies of the parameter tree (Adam's mu/nu, accumulated
    gradients, ...) under extra prefixes. A leaf whose path *ends with* a parameter's path
    and has the same shape gets that parameter's sharding; every other leaf (step counters,
    scalars) is replicated.

    Args:
      abstract_tree: tree of arrays / ShapeDtypeStructs to place (e.g. `opt_state`).
      reference_tree: the unboxed parameter tree (arrays / ShapeDtypeStructs).
      reference_shardings: NamedShardings with the structure of `reference_tree`.
      mesh: mesh for the replicated leaves.
    """
    ref_leaves = jax.tree_util.tree_flatten_with_path(reference_tree)[0]
    ref_shards = jax.tree.leaves(reference_shardings)
    by_path: dict[str, tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, leaf), sharding in zip(ref_leaves, ref_shards, strict=True):
        by_path[path_str(path)] = (tuple(np.shape(leaf)), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        parts = path_str(path).split("/")
        shape = tuple(np.shape(leaf))
        for start in range(len(parts)):
            hit = by_path.get("/".join(parts[start:]))
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_axes(rules: Sequence[Sequence[Any]] | None = None) -> MeshAxes:
    """The mesh axes the `batch` logical axis maps to."""
    for name, axes in normalize_rules(rules):
        if name == "batch":
            return axes
    return None


def batch_sharding(mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None) -> NamedSharding:
    """Sharding of a batch leaf: the leading dim over the batch mesh axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def shard_batch(batch: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None) -> Any:
    """Makes global `jax.Array`s from this host's part of the batch (numpy leaves).

    Every host passes its local rows; the global batch is their concatenation along dim 0.
    """
    sharding = batch_sharding(mesh, rules)
    num_shards = _axis_size(mesh, batch_axes(rules))

    def check(path, x):
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count() if x.ndim else 0
        if x.ndim == 0 or global_rows % num_shards:
            raise ValueError(
                f"Batch entry '{path_str(path)}' has shape {x.shape}: its leading (batch) dim "
                f"times {jax.process_count()} hosts must be a multiple of the {num_shards} "
                f"batch shards of mesh {dict(mesh.shape)}; change the batch size."
            )
        return x

    batch = jax.tree_util.tree_map_with_path(check, batch)
    if jax.process_count() == 1:
        # One batched transfer for the whole tree (per-leaf calls cost ~1 ms each on CPU).
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None) -> Iterator[None]:
    """Activates `mesh` and the logical rules so `nn.with_logical_constraint` takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules)):
        yield


def describe_shardings(shardings: Any) -> str:
    """One line per leaf, `path: spec`, for logs."""
    lines = []
    for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        lines.append(f"{path_str(path)}: {getattr(s, 'spec', s)}")
    return "\n".join(lines)
