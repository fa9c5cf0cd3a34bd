"""Export a params pytree (plus a small JSON of metadata and asset files) to Orbax, and load it.

Layout of an exported directory (an Orbax composite checkpoint):

    <directory>/params/     the params pytree (`StandardSave`: OCDBT/Zarr, sharded-aware)
    <directory>/metadata/   a JSON object: config, statistics, step, ...
    <directory>/assets/     files copied in verbatim, e.g. `tokenizer.model` (`AssetsSave`)

Loading into an abstract tree (`jax.ShapeDtypeStruct`s, optionally carrying `.sharding`)
restores each array straight onto its target devices with the requested dtype, so a 7B
model is never gathered on one host; without an abstract tree the arrays come back as
they were saved, on the default device. A `None` leaf in the abstract tree skips that
array (a partial restore).

`AssetsSave` / `AssetsRestore` are an Orbax item of their own (also used by the training
checkpoints, `training/checkpoint.py`): the files are read when the save starts and written
into the item directory by the (possibly asynchronous) commit, so they are part of the
same atomic checkpoint as the arrays (openpi keeps its norm stats in `assets/` likewise).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"
ASSETS_ITEM = "assets"
# Files Orbax itself may put into an item directory (not assets).
_ORBAX_FILES = ("commit_success.txt",)


def _is_asset_name(name: str) -> bool:
    return bool(name) and "/" not in name and name[0] not in "._" and name not in _ORBAX_FILES


# ------------------------------------------------------------------ the assets item


class AssetsHandler(ocp.handlers.AsyncCheckpointHandler):
    """Writes files (name -> bytes) into the item directory; restores name -> path."""

    async def _write(self, directory: epath.Path, files: Mapping[str, bytes]) -> None:
        for name, data in files.items():
            (directory / name).write_bytes(data)

    async def async_save(self, directory: epath.Path, args: AssetsSave) -> list[Any]:
        files = {}
        if jax.process_index() == 0:  # one host writes, as Orbax's JSON items do
            # Read now, in the caller's thread: the checkpoint holds the files as they are
            # when the save starts, even if the commit runs later in the background.
            files = {name: epath.Path(src).read_bytes() for name, src in args.files.items()}
        return [
            ocp.future.CommitFutureAwaitingContractedSignals(
                self._write(directory, files), name="assets_save"
            )
        ]

    def save(self, directory: epath.Path, args: AssetsSave) -> None:
        if jax.process_index() == 0:
            for name, src in args.files.items():
                (epath.Path(directory) / name).write_bytes(epath.Path(src).read_bytes())

    def restore(self, directory: epath.Path, args: AssetsRestore | None = None) -> dict[str, str]:
        del args
        directory = epath.Path(directory)
        if not directory.exists():
            return {}
        return {
            p.name: os.fspath(p)
            for p in directory.iterdir()
            if _is_asset_name(p.name) and p.is_file()
        }


@ocp.args.register_with_handler(AssetsHandler, for_save=True)
@dataclasses.dataclass
class AssetsSave(ocp.args.CheckpointArgs):
    """Files to copy into the item: asset name (a file name) -> source path (local or URL)."""

    files: Mapping[str, str]

    def __post_init__(self):
        for name, src in self.files.items():
            if not _is_asset_name(name):
                raise ValueError(
                    f"Asset name {name!r} must be a plain file name (not starting with '.' or "
                    f"'_', not one of Orbax's {_ORBAX_FILES})."
                )
            if not epath.Path(src).is_file():
                raise FileNotFoundError(f"Asset {name!r}: no file at {os.fspath(src)!r}.")
        self.files = {name: os.fspath(src) for name, src in self.files.items()}


@ocp.args.register_with_handler(AssetsHandler, for_restore=True)
@dataclasses.dataclass
class AssetsRestore(ocp.args.CheckpointArgs):
    """Restores the asset item as {name: path of the file inside the checkpoint}."""


def assets_in(item_dir: str | os.PathLike) -> dict[str, str]:
    """{name: path} of the files in an assets item directory ({} if there is none)."""
    return AssetsHandler().restore(epath.Path(item_dir))


# ------------------------------------------------------------------ params exports


def _unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _path(directory: str | os.PathLike) -> epath.Path:
    # Orbax needs absolute paths; a URL (gs://...) is one already and must stay a URL.
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def save_params(
    directory: str | os.PathLike,
    params: Any,
    metadata: dict | None = None,
    *,
    assets: Mapping[str, str] | None = None,
    force: bool = False,
) -> str:
    """Writes `params` (flax `Partitioned` boxes are unboxed), `metadata` and `assets`.

    Args:
      directory: target directory (local or `gs://...`); must not exist unless `force`
        (then it is replaced).
      params: a pytree of jax or numpy arrays.
      metadata: JSON-serialisable dict (numpy arrays are not: convert with `.tolist()`).
      assets: files copied into `<directory>/assets/`: name -> source path.
      force: overwrite an existing export.

    Returns:
      The absolute path (or URL) written.
    """
    path = _path(directory)
    if path.exists() and not force:
        raise FileExistsError(
            f"{path} already exists; pass force=True to overwrite it or choose a new directory"
        )
    items = {
        PARAMS_ITEM: ocp.args.StandardSave(_unbox(params)),
        METADATA_ITEM: ocp.args.JsonSave(dict(metadata or {})),
    }
    if assets:
        items[ASSETS_ITEM] = AssetsSave(dict(assets))
    with _checkpointer() as ckptr:
        ckptr.save(path, args=ocp.args.Composite(**items), force=force)
    return os.fspath(path)


def _check_export(path: epath.Path) -> None:
    if not (path / PARAMS_ITEM).is_dir():
        raise FileNotFoundError(
            f"no Orbax params export at {path} (expected a '{PARAMS_ITEM}/' subdirectory "
            "written by pixelvla_jax.weights.orbax_io.save_params)"
        )


def is_export(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a `save_params` export (params and metadata items)."""
    path = _path(directory)
    return (path / PARAMS_ITEM).is_dir() and (path / METADATA_ITEM).is_dir()


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
        target structure, dtypes and shardings (`.sharding`; none: the default device);
        `Partitioned` boxes are unboxed; `None` leaves are not read. None -> restore all
        as saved.

    Returns:
      The params pytree (plain dicts of jax arrays; `None` where the target had `None`).
    """
    path = _path(directory)
    _check_export(path)
    if abstract_params is None:
        with _checkpointer() as ckptr:
            out = ckptr.restore(
                path, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore()})
            )
        return out[PARAMS_ITEM]
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda x: (
            x
            if getattr(x, "sharding", None) is not None
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
        ),
        jax.tree_util.tree_map(_as_abstract, _unbox(abstract_params)),
    )
    restore = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    with _checkpointer() as ckptr:
        out = ckptr.restore(path, args=ocp.args.Composite(**{PARAMS_ITEM: restore}))
    return out[PARAMS_ITEM]


def load_metadata(directory: str | os.PathLike) -> dict:
    """The metadata JSON of an export ({} if none was written)."""
    path = _path(directory)
    _check_export(path)
    if not (path / METADATA_ITEM).is_dir():
        return {}
    with _checkpointer() as ckptr:
        out = ckptr.restore(
            path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
    return dict(out[METADATA_ITEM] or {})


def load_assets(directory: str | os.PathLike) -> dict[str, str]:
    """{name: path} of the files in an export's `assets/` item ({} for older exports)."""
    path = _path(directory)
    _check_export(path)
    return assets_in(path / ASSETS_ITEM)
