"""Export a params pytree (plus a small JSON of metadata) to Orbax, and load it back.

Layout of an exported directory (an Orbax composite checkpoint):

    <directory>/params/     the params pytree (`StandardSave`: OCDBT/Zarr, sharded-aware)
    <directory>/metadata/   a JSON object: config name, norm_stats, tokenizer path, ...

Loading into an abstract tree (`jax.ShapeDtypeStruct`s, optionally carrying `.sharding`)
restores each array straight onto its target devices with the requested dtype, so a 7B
model is never gathered on one host; without an abstract tree the arrays come back as
they were saved, on the default device.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"


def _unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(
    directory: str | os.PathLike,
    params: Any,
    metadata: dict | None = None,
    *,
    force: bool = False,
) -> str:
    """Writes `params` (flax `Partitioned` boxes are unboxed) and `metadata` to `directory`.

    Args:
      directory: target directory; must not exist unless `force` (then it is replaced).
      params: a pytree of jax or numpy arrays.
      metadata: JSON-serialisable dict (numpy arrays are not: convert with `.tolist()`).
      force: overwrite an existing export.

    Returns:
      The absolute path written.
    """
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not force:
        raise FileExistsError(
            f"{path} already exists; pass force=True to overwrite it or choose a new directory"
        )
    args = ocp.args.Composite(
        **{
            PARAMS_ITEM: ocp.args.StandardSave(_unbox(params)),
            METADATA_ITEM: ocp.args.JsonSave(dict(metadata or {})),
        }
    )
    with _checkpointer() as ckptr:
        ckptr.save(path, args=args, force=force)
    return path


def _check_export(path: str) -> None:
    if not os.path.isdir(os.path.join(path, PARAMS_ITEM)):
        raise FileNotFoundError(
            f"no Orbax params export at {path} (expected a '{PARAMS_ITEM}/' subdirectory "
            "written by pixelvla_jax.weights.orbax_io.save_params)"
        )


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def load_params(
    directory: str | os.PathLike,
    abstract_params: Any | None = None,
) -> Any:
    """Restores the params pytree of an export.

    Args:
      directory: a directory written by `save_params`.
      abstract_params: optional pytree of `jax.ShapeDtypeStruct` (or arrays) giving the
        target structure, dtypes and shardings (`.sharding`); `Partitioned` boxes are
        unboxed. None -> restore as saved.

    Returns:
      The params pytree (plain dicts of jax arrays).
    """
    path = os.path.abspath(os.fspath(directory))
    _check_export(path)
    if abstract_params is None:
        restore = ocp.args.StandardRestore()
    else:
        target = jax.tree_util.tree_map(_as_abstract, _unbox(abstract_params))
        restore = ocp.args.StandardRestore(target)
    with _checkpointer() as ckptr:
        out = ckptr.restore(path, args=ocp.args.Composite(**{PARAMS_ITEM: restore}))
    return out[PARAMS_ITEM]


def load_metadata(directory: str | os.PathLike) -> dict:
    """The metadata JSON of an export ({} if none was written)."""
    path = os.path.abspath(os.fspath(directory))
    _check_export(path)
    if not os.path.isdir(os.path.join(path, METADATA_ITEM)):
        return {}
    with _checkpointer() as ckptr:
        out = ckptr.restore(
            path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
    return dict(out[METADATA_ITEM] or {})
