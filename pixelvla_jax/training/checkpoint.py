"""Orbax checkpoints of a run: train state, data iterator, config, statistics, metadata.

Layout of one checkpoint (`<workdir>/checkpoints/<step>/`), one Orbax item per entry:

    state/               TrainState (step, params, opt_state, rng[, ema_params])  StandardSave
    data_state/          the data iterator's `get_state()`               JsonSave
    config/              the run's config as JSON                         JsonSave
    dataset_statistics/  action/proprio normalisation statistics          JsonSave
    metadata/            tokenizer name, dataset names, model preset, ...  JsonSave
    assets/              files copied in, e.g. tokenizer.model            AssetsSave

A checkpoint is enough to act, anywhere (docs/design.md §2.2): `evaluate` needs nothing but this
directory, which may be moved or copied to another machine or bucket. The tokenizer file
itself is an asset of every checkpoint (`pixelvla_jax.runs` loads a run; checkpoints written
before assets existed still load from the absolute tokenizer path in their metadata).

Saving is asynchronous (the train loop continues while arrays are written) and atomic:
Orbax writes into a temporary directory and renames it when done. On restore, a step
directory that is nevertheless incomplete (an item missing, no commit marker, unreadable)
is skipped with a warning, moved aside as `<step>.incomplete-<time>`, and the previous
step is used: nothing half-written ever counts as the latest.

Restoring takes the target shardings, so a checkpoint written on one mesh restores onto
another mesh shape or device count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from pixelvla_jax.errors import MissingInputError
from pixelvla_jax.training.param_rules import TRAINED
from pixelvla_jax.training.train_state import ema_or_params
from pixelvla_jax.weights.orbax_io import AssetsRestore, AssetsSave

logger = logging.getLogger(__name__)

STATE = "state"
DATA_STATE = "data_state"
CONFIG = "config"
DATASET_STATISTICS = "dataset_statistics"
METADATA = "metadata"
ASSETS = "assets"
ITEMS = (STATE, DATA_STATE, CONFIG, DATASET_STATISTICS, METADATA)  # required in every step
OPTIONAL_ITEMS = (ASSETS,)  # absent in checkpoints written before it existed
JSON_ITEMS = (DATA_STATE, CONFIG, DATASET_STATISTICS, METADATA)


@functools.cache
def _save_arrays_whole_in_one_process() -> None:
    """In a single process, Orbax's jax.Array handler without replica-parallel saving.

    Replica-parallel saving splits each replicated array across the replicas holding it, so
    that on a pod every host writes a share; it slices each array with a jitted op per
    distinct shape first. In one process every share is written by the same process anyway,
    and the slices only cost compilations: measured on the 8-device CPU mesh the tests use,
    the first save of 150 replicated arrays of distinct shapes took 70.8 s with it and 0.38 s
    without (Orbax already turns it off on GPUs). Registered once per process (Orbax's type
    handlers are process-wide), only when `jax.process_count() == 1`; multi-host runs keep
    Orbax's default. The files written are the same either way."""
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_BYTES_KEY = "__bytes_utf8__"


@dataclasses.dataclass
class RestoredCheckpoint:
    """What `restore` returns. `state` is None when only the JSON items were read."""

    step: int
    state: Any
    data_state: Any
    config: dict[str, Any]
    dataset_statistics: dict[str, Any]
    metadata: dict[str, Any]
    assets: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> path inside


def to_jsonable(value: Any) -> Any:
    """Config / statistics / iterator state -> JSON-compatible (numpy arrays -> lists).

    Bytes (e.g. a Grain DataLoader iterator state) are kept exactly via a UTF-8 wrapper.
    """
    if isinstance(value, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return json.loads(value.to_json_best_effort())
    if isinstance(value, bytes):
        return {_BYTES_KEY: value.decode("utf-8")}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    return value


def from_jsonable(value: Any) -> Any:
    """Inverse of the bytes wrapping of `to_jsonable`."""
    if isinstance(value, dict):
        if set(value) == {_BYTES_KEY}:
            return value[_BYTES_KEY].encode("utf-8")
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract_state` carrying the target `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def checkpoint_dir(path: str | os.PathLike) -> str:
    """A run's workdir or its `checkpoints/` dir -> the `checkpoints/` dir (local or URL)."""
    path = os.fspath(path)
    nested = os.path.join(path, "checkpoints")
    if epath.Path(nested).is_dir():
        return nested
    if epath.Path(path).is_dir() and any(p.name.isdigit() for p in epath.Path(path).iterdir()):
        return path
    shown = path if "://" in path else os.path.abspath(path)
    raise MissingInputError(
        f"No checkpoints found at {shown}: expected a training workdir holding "
        "checkpoints/<step>/ (python -m pixelvla_jax.train --workdir=DIR) or that checkpoints/ "
        "directory itself."
    )


class Checkpointer:
    """A run's checkpoints: keep the last `max_to_keep`, plus every `keep_period`-th step.

    Args:
      directory: where step directories go (local path or `gs://...`).
      max_to_keep: number of most recent checkpoints kept (None: all).
      keep_period: steps that are multiples of this are never deleted (None: off).
      async_save: write in a background thread; call `wait_until_finished` before reading.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        directory = os.fspath(directory)
        if "://" not in directory:  # Orbax needs absolute paths (a relative workdir is common)
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        _save_arrays_whole_in_one_process()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEMS + OPTIONAL_ITEMS
        )

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        config: Any = None,
        dataset_statistics: Any = None,
        metadata: Any = None,
        assets: Mapping[str, str | os.PathLike] | None = None,
        force: bool = True,
    ) -> bool:
        """Starts saving checkpoint `step` (returns before the arrays are on disk when async).

        Args:
          step: the step number (directory name).
          state: the TrainState (sharded jax.Arrays).
          data_state: the data iterator's `get_state()` (JSON-able dict or bytes).
          config: the run's config (ConfigDict or dict).
          dataset_statistics: normalisation statistics (dicts of lists / numpy arrays).
          metadata: anything needed to act, e.g. `{"datasets": [...], ...}` (JSON).
          assets: files copied into `<step>/assets/` as part of the same atomic save:
            file name -> source path, e.g. `{"tokenizer.model": tokenizer_path}`. They are
            read when the save starts.
          force: save even if the manager's interval policy would skip this step.
        """
        if step in self._manager.all_steps():
            raise ValueError(
                f"A checkpoint for step {step} already exists in {self.directory}; "
                "restore from it or delete it before saving that step again."
            )
        items = {
            STATE: ocp.args.StandardSave(state),
            DATA_STATE: ocp.args.JsonSave(to_jsonable({"value": data_state})),
            CONFIG: ocp.args.JsonSave(to_jsonable(config or {})),
            DATASET_STATISTICS: ocp.args.JsonSave(to_jsonable(dataset_statistics or {})),
            METADATA: ocp.args.JsonSave(to_jsonable(metadata or {})),
        }
        if assets:
            items[ASSETS] = AssetsSave({name: os.fspath(src) for name, src in assets.items()})
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk (and old checkpoints are deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- listing
    def all_steps(self) -> list[int]:
        """Steps that have a step directory (complete or not), ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def _incomplete_reason(self, step: int) -> str | None:
        """Why step directory `step` is not a complete checkpoint, or None if it is."""
        step_dir = self.directory / str(step)
        if not step_dir.exists():
            return f"{step_dir} does not exist"
        if not (step_dir / _STEP_METADATA).exists():
            return f"{step_dir} has no {_STEP_METADATA}"
        if self._uses_commit_markers() and not (step_dir / _COMMIT_MARKER).exists():
            return f"{step_dir} has no {_COMMIT_MARKER} (the save did not finish)"
        for item in ITEMS:
            if not (step_dir / item).exists():
                return f"{step_dir} lacks the item '{item}'"
        return None

    def _uses_commit_markers(self) -> bool:
        # This Orbax version writes a commit marker into every finished step directory;
        # only then does a missing marker mean "unfinished" (robust to versions that don't).
        return any(
            (self.directory / str(s) / _COMMIT_MARKER).exists() for s in self._manager.all_steps()
        )

    def latest_complete_step(self) -> int | None:
        """The newest step whose directory is a complete checkpoint (None if none)."""
        for step in reversed(self.all_steps()):
            if self._incomplete_reason(step) is None:
                return step
        return None

    def complete_steps(self) -> list[int]:
        """Steps whose directories are complete checkpoints, ascending."""
        return [s for s in self.all_steps() if self._incomplete_reason(s) is None]

    # -------------------------------------------------------------- restoring
    def restore(self, step: int, abstract_state: Any = None, shardings: Any = None):
        """Restores checkpoint `step`.

        Args:
          step: which step.
          abstract_state: the TrainState as ShapeDtypeStructs (e.g. from
            `abstract_train_state`); None reads only the JSON items.
          shardings: target NamedShardings with the structure of `abstract_state` (any mesh);
            None uses the shardings carried by `abstract_state`'s ShapeDtypeStructs.

        Returns:
          A `RestoredCheckpoint`.
        """
        reason = self._incomplete_reason(step)
        if reason is not None:
            raise FileNotFoundError(f"Checkpoint step {step} is incomplete: {reason}.")
        items: dict[str, Any] = {name: ocp.args.JsonRestore() for name in JSON_ITEMS}
        if (self.directory / str(step) / ASSETS).exists():
            items[ASSETS] = AssetsRestore()
        if abstract_state is not None:
            target = abstract_state
            if shardings is not None:
                target = with_shardings(abstract_state, shardings)
            items[STATE] = ocp.args.StandardRestore(target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return RestoredCheckpoint(
            step=step,
            state=restored[STATE] if abstract_state is not None else None,
            data_state=from_jsonable(restored[DATA_STATE])["value"],
            config=restored[CONFIG],
            dataset_statistics=restored[DATASET_STATISTICS],
            metadata=restored[METADATA],
            assets=dict(restored[ASSETS]) if ASSETS in items else {},
        )

    def restore_params(
        self,
        step: int | None,
        abstract_params: Any,
        shardings: Any = None,
        *,
        ema_labels: Any = None,
    ) -> tuple[int, Any]:
        """Reads only the parameters (no optimizer state), e.g. for evaluation.

        Args:
          step: which step; None -> the newest complete one.
          abstract_params: the unboxed parameter tree as ShapeDtypeStructs (None leaves are
            not read and stay None).
          shardings: target shardings (structure of `abstract_params`); None uses those of
            the ShapeDtypeStructs (or a single-device default when they carry none).
          ema_labels: the freeze labels of a run trained with an EMA
            (`config.train.ema_decay` > 0): its trained leaves are read from
            `state.ema_params`, the frozen ones from `state.params` (what the run acts
            with). None: everything from `state.params`.

        Returns:
          `(step, params)`.
        """
        if step is None:
            step = self.latest_complete_step()
            if step is None:
                raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        reason = self._incomplete_reason(step)
        if reason is not None:
            raise FileNotFoundError(f"Checkpoint step {step} is incomplete: {reason}.")
        target = (
            abstract_params if shardings is None else with_shardings(abstract_params, shardings)
        )
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: (
                x
                if getattr(x, "sharding", None) is not None
                else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
            ),
            target,
        )
        if ema_labels is None:
            item = {"params": target}
        else:
            item = {
                "params": _leaves_labelled(target, ema_labels, trained=False),
                "ema_params": _leaves_labelled(target, ema_labels, trained=True),
            }
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        restored = self._manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
        if ema_labels is None:
            return step, restored["params"]
        if "ema_params" not in restored:
            raise MissingInputError(
                f"Checkpoint step {step} in {self.directory} holds no ema_params although its "
                "config sets train.ema_decay > 0; it was not written by this run's training."
            )
        return step, ema_or_params(restored["params"], restored["ema_params"])

    def restore_latest(
        self, abstract_state: Any = None, shardings: Any = None
    ) -> RestoredCheckpoint | None:
        """Restores the newest complete checkpoint; None if there is none (fresh run).

        Incomplete step directories newer than it (missing item, metadata or commit marker)
        are skipped with a warning and moved aside (by process 0) so that a later save of that
        step number can succeed. A complete checkpoint that fails to restore raises.
        """
        self.wait_until_finished()
        for step in reversed(self.all_steps()):
            reason = self._incomplete_reason(step)
            if reason is None:
                try:
                    return self.restore(step, abstract_state, shardings)
                except Exception as e:
                    # Not moved aside: a changed model/optimizer config also ends up here,
                    # and must not cost the run its checkpoints.
                    raise RuntimeError(
                        f"Restoring checkpoint step {step} from {self.directory} failed "
                        f"({type(e).__name__}: {e}). If the model or optimizer config changed "
                        "since it was written, restore with the original config; if the "
                        "checkpoint is corrupt, move that step directory away and rerun."
                    ) from e
            logger.warning(
                "Skipping checkpoint step %d in %s: %s. Falling back to the previous one.",
                step,
                self.directory,
                reason,
            )
            self._move_aside(step)
        return None

    def _move_aside(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        if src.exists():
            dst = self.directory / f"{step}.incomplete-{int(time.time())}"
            src.rename(dst)
            logger.warning("Moved incomplete checkpoint %s to %s", src, dst)
        self._manager.reload()


def _is_none(x: Any) -> bool:
    return x is None


def _leaves_labelled(tree: Any, labels: Any, *, trained: bool) -> Any:
    """`tree` keeping the leaves labelled "trained" (`trained`) or the others (not
    `trained`), None in place of the rest (already-None leaves stay None)."""
    return jax.tree.map(
        lambda x, label: x if (label == TRAINED) == trained else None,
        tree,
        labels,
        is_leaf=_is_none,
    )
