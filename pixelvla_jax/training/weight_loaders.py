"""Where a new run's params start from, as loaders with one interface (as openpi's).

    for loader in loaders_from_config(cfg):
        params = loader.load(params)

`params` is the freshly initialised, sharded parameter tree; a loader returns a tree of the
same structure with some leaves replaced, placed on the same shardings. Each key of
`config.init` that names a source has its loader class in `INIT_LOADERS`, applied in that
order (a public checkpoint first: OpenVLA's for the OpenVLA-based family, openpi's π0 for
the π0 family; then a previous run on top); a new model family adds its own class and one
entry there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections

from pixelvla_jax.models.pixelvla import PixelVLAConfig
from pixelvla_jax.training import config as config_lib

log = logging.getLogger(__name__)


@runtime_checkable
class WeightLoader(Protocol):
    def load(self, params: Any) -> Any:
        """Returns `params` with the leaves this source provides replaced (same shardings)."""

    def check(self) -> None:
        """Raises FileNotFoundError, naming the setting, if the source is not there: called
        before the state is initialised (a compilation), so a mistyped path fails at once."""


def check_local_source(path: str, config_key: str) -> None:
    """FileNotFoundError naming `config_key` if the local `path` does not exist (a remote
    one, `gs://...`, is left to the loader's own read)."""
    if path and "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(
            f"{config_key}={path}: no such file or directory; give the path of an existing "
            "checkpoint (or unset the setting)."
        )


class OpenVLAWeightLoader:
    """The vision towers, projector and LLM of an OpenVLA HF checkpoint directory
    (`config.init.openvla_checkpoint`); LoRA adapters and PixelVLA's own parts are kept."""

    config_key = "config.init.openvla_checkpoint"  # named in errors: the setting to fix

    def __init__(self, checkpoint_dir: str, model_cfg: PixelVLAConfig):
        self.checkpoint_dir = checkpoint_dir
        self.model_cfg = model_cfg

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> OpenVLAWeightLoader:
        return cls(cfg.init.openvla_checkpoint, config_lib.model_config(cfg))

    def check(self) -> None:
        check_local_source(self.checkpoint_dir, self.config_key)

    def load(self, params: Any) -> Any:
        from pixelvla_jax.weights import openvla

        imported = openvla.import_openvla(
            self.checkpoint_dir,
            self.model_cfg,
            dtype=jnp.float32,
            shardings=jax.tree.map(lambda x: x.sharding, params),
        )
        return openvla.merge_imported(params, imported.params)


class Pi0WeightLoader:
    """SigLIP, both Gemma experts and the action projections of an openpi π0 checkpoint's
    `params/` directory (`config.init.pi0_checkpoint`, an Orbax PyTree); LoRA adapters and
    PixelVLA's pixel / prompt encoders keep their init."""

    config_key = "config.init.pi0_checkpoint"  # named in errors: the setting to fix

    def __init__(self, params_dir: str, model_cfg: Any):
        self.params_dir = params_dir
        self.model_cfg = model_cfg

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Pi0WeightLoader:
        return cls(cfg.init.pi0_checkpoint, config_lib.model_config(cfg))

    def check(self) -> None:
        check_local_source(self.params_dir, self.config_key)

    def load(self, params: Any) -> Any:
        from pixelvla_jax.weights import pi0

        try:
            imported = pi0.import_openpi(
                self.params_dir,
                self.model_cfg,
                dtype=jnp.float32,
                shardings=jax.tree.map(lambda x: x.sharding, params),
            )
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.config_key}={self.params_dir}: {e}") from None
        log.info("Initialising from the openpi checkpoint %s", self.params_dir)
        return pi0.merge_imported(params, imported)


class PreviousRunWeightLoader:
    """Every param of a previous run that this model has with the same shape (stage 1 ->
    stage 2), read onto this model's shardings. `path` is anything `runs.load_run` takes: the
    run's workdir, its `checkpoints/` dir, or an export; `step` None is the newest."""

    def __init__(
        self, path: str, step: int | None = None, config_key: str = "config.init.from_checkpoint"
    ):
        self.path = path
        self.step = step
        self.config_key = config_key  # named in errors: the setting to fix

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> PreviousRunWeightLoader:
        return cls(cfg.init.from_checkpoint)

    def check(self) -> None:
        check_local_source(self.path, self.config_key)

    def load(self, params: Any) -> Any:
        from pixelvla_jax import runs

        try:
            run = runs.load_run(self.path, self.step, params_target=shared_params_target(params))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.config_key}={self.path}: {e}") from None
        log.info("Initialising from %s (%s step %d)", run.path, run.kind, run.step)
        return copy_matching(params, run.params)


def shared_params_target(params: Any) -> Callable[[Any], Any]:
    """`abstract -> target`: the leaves of `abstract` (a run's params) that `params` has
    with the same shape, as ShapeDtypeStructs on `params`' shardings; None elsewhere."""
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])

    def target(abstract: Any) -> Any:
        def leaf(path, x):
            ours = flat.get(path)
            if ours is None or ours.shape != x.shape:
                return None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ours.sharding)

        return jax.tree_util.tree_map_with_path(leaf, abstract)

    return target


def copy_matching(params: Any, source: Any) -> Any:
    """`params` with every leaf that `source` has at the same path replaced (in
    `params`' dtype); `source` may hold None for leaves it skipped."""
    flat = {p: x for p, x in jax.tree_util.tree_flatten_with_path(source)[0] if x is not None}
    log.info("Copied %d params", len(flat))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: flat[p].astype(x.dtype) if p in flat else x, params
    )


# config.init key -> its loader, applied in this order when the key is set.
INIT_LOADERS: tuple[tuple[str, Callable[[ml_collections.ConfigDict], WeightLoader]], ...] = (
    ("openvla_checkpoint", OpenVLAWeightLoader.from_config),
    ("pi0_checkpoint", Pi0WeightLoader.from_config),
    ("from_checkpoint", PreviousRunWeightLoader.from_config),
)


def loaders_from_config(cfg: ml_collections.ConfigDict) -> list[WeightLoader]:
    """The loaders of the `config.init` sources that are set, in `INIT_LOADERS` order (a
    config saved before a source existed lacks its key: unset)."""
    return [make(cfg) for key, make in INIT_LOADERS if cfg.init.get(key)]
