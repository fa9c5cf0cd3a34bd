"""The one builder of a run's model, optimizer, abstract train state and jitted train step.

    step = build_step(cfg)                                   # nothing materialised
    state = jax.jit(step.init_fn, out_shardings=step.shardings)(step.rng)
    state, metrics = step.train_step(state, batch)

`experiment.setup` (training) and `memory_plan.abstract_step` (memory plans, benchmarks)
both call `build_step`, so what is planned is what trains: the same freeze labels, frozen
dtype, shardings, and a train step jitted with the batch sharding as its input sharding.

Both model families (`config.model.family`: the OpenVLA-based PixelVLA, π0) go through the
same builder: `config.build_model` makes the module, `make_loss_fn` calls its `loss`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixelvla_jax.data import config as data_config_lib
from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig
from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import mesh as mesh_lib
from pixelvla_jax.training import metrics as metrics_lib
from pixelvla_jax.training import optimizer as optimizer_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training.param_rules import TRAINED, path_str
from pixelvla_jax.training.train_state import TrainState, abstract_train_state, make_train_step

OBS_KEYS = tuple(f.name for f in dataclasses.fields(Observation))


def sequence_length(cfg: ml_collections.ConfigDict, model_cfg: Any) -> int:
    """LLM tokens per example: prefix (BOS, vision, pixel/prompt tokens, text) + suffix
    (the L1 head's action slots, or the discrete head's decoded tokens + EOS; π0: the
    state token and the H action tokens; OFT mode: + the stop token)."""
    return model_cfg.prefix_length(cfg.data.max_tokens) + model_cfg.suffix_length


def batch_to_observation(batch: Mapping[str, Any]) -> Observation:
    """The model inputs of a batch; the optional fields (wrist camera, state) when present."""
    return Observation(**{k: batch[k] for k in OBS_KEYS if k in batch})


def make_loss_fn(model: Any):
    """`(params, batch, rng) -> (loss, metrics)` of a module `config.build_model` made;
    per-dimension metrics ([D]) are split into scalars `name/i`.

    PixelVLA's loss is deterministic (the rng is unused) and takes the grounding targets;
    every other family's is `loss(obs, actions, action_pad_mask, rng)` (π0 draws its noise
    and flow time from the rng, the train step's `fold_in(state.rng, step)`), plus the
    grounding targets (mask, target point) when the model has π0's optional grounding.
    """

    def loss_fn(params, batch, rng):
        obs = batch_to_observation(batch)
        grounding = {key: batch.get(key) for key in GROUNDING_KEYS}
        if isinstance(model, PixelVLA):
            loss, metrics = model.apply(
                {"params": params},
                obs,
                batch["actions"],
                batch["action_pad_mask"],
                **grounding,
                method=PixelVLA.loss,
            )
        else:
            if not _uses_grounding_targets(model.config):
                grounding = {}
            loss, metrics = model.apply(
                {"params": params},
                obs,
                batch["actions"],
                batch["action_pad_mask"],
                rng,
                **grounding,
                method=type(model).loss,
            )
        out = {}
        for key, value in metrics.items():
            if getattr(value, "ndim", 0) == 1:
                for i in range(value.shape[0]):
                    out[f"{key}/{i}"] = value[i]
            else:
                out[key] = value
        return loss, out

    return loss_fn


# The batch keys of the grounding targets (keyword arguments of `PixelVLA.loss`, and of
# `Pi0.loss` with π0's optional grounding).
GROUNDING_KEYS = ("grounding_mask", "has_grounding_mask", "target_point", "has_target_point")


def _uses_grounding_targets(model_cfg: Any) -> bool:
    """π0's optional grounding (patch BCE, the target point generated with the actions)."""
    return (
        getattr(model_cfg, "patch_grounding_weight", 0.0) > 0.0
        or getattr(model_cfg, "target_point_scale", 0.0) > 0.0
    )


def abstract_batch(
    cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `cfg` (`config.data.batch_size` rows) as sharded ShapeDtypeStructs.

    Raises ConfigError when the batch size does not split over the batch mesh axes.
    """
    # The global batch: `data_config` resolves the inherited knobs but splits over hosts.
    data = dataclasses.replace(config_lib.data_config(cfg, ""), batch_size=cfg.data.batch_size)
    spec = data_config_lib.batch_spec(data)
    sharding = sharding_lib.batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(sharding.spec[0]))
    if cfg.data.batch_size % shards:
        raise config_lib.ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} is not a multiple of the {shards} "
            f"batch shards of mesh {dict(mesh.shape)}; change the batch size or config.mesh."
        )
    return {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for key, (shape, dtype) in spec.items()
    }


@dataclasses.dataclass
class AbstractStep:
    """A train step and its inputs as shapes and shardings (nothing allocated).

    Attributes:
      cfg: the training config.
      model_cfg: the model it describes (PixelVLAConfig or Pi0Config).
      model: the Flax module (PixelVLA or Pi0).
      mesh, rules: device mesh and logical axis rules.
      rng: the raw PRNG key (`config.seed`) that `init_fn` initialises from.
      optim: the optimizer section with the stage's freeze rules (`config.optim_config`).
      tx: the optax optimizer.
      labels: freeze labels per parameter ("trained" / "frozen").
      state: the TrainState as ShapeDtypeStructs carrying their shardings.
      shardings: the TrainState of NamedShardings.
      batch: the global batch as ShapeDtypeStructs ([B, ...] leaves, batch-sharded).
      loss_fn: `(params, batch, rng) -> (loss, metrics)`.
      train_step: the jitted `(state, batch) -> (state, metrics)`.
      eval_step: the jitted `(params, batch) -> metrics` (no update; a stochastic loss
        draws from a fixed key, so validation sees the same noise every time).
      init_fn: `rng -> TrainState` (jit it with `out_shardings=shardings` to materialise).
      tokens_per_example: LLM sequence length of one example (prefix + suffix).
      ema_decay: `config.train.ema_decay` (0: the state has no EMA).
    """

    cfg: ml_collections.ConfigDict
    model_cfg: Any
    model: Any
    mesh: jax.sharding.Mesh
    rules: Any
    rng: jax.Array
    optim: ml_collections.ConfigDict
    tx: Any
    labels: Any
    state: TrainState
    shardings: TrainState
    batch: dict[str, jax.ShapeDtypeStruct]
    loss_fn: Any
    train_step: Any
    eval_step: Any
    init_fn: Any
    tokens_per_example: int
    ema_decay: float = 0.0

    def flops_per_step(self, params: Any = None) -> float:
        """Model FLOPs of one train step (forward + backward) on the global batch."""
        params = self.state.params if params is None else params
        return model_flops_per_step(
            params, self.labels, self.model_cfg, self.tokens_per_example, self.cfg.data.batch_size
        )


def model_flops_per_step(
    params: Any, labels: Any, model_cfg: Any, tokens_per_example: int, batch_size: int
) -> float:
    """Model FLOPs of one train step: `metrics.model_flops_per_step` for PixelVLA; for π0
    the same rule (2 FLOPs per weight per token forward, 2 more for activation gradients,
    2 more for trained weights' gradients) with the SigLIP tower on each camera's patches,
    the VLM expert on the prefix and the action expert on the suffix."""
    if isinstance(model_cfg, PixelVLAConfig):
        return metrics_lib.model_flops_per_step(
            params, labels, model_cfg, tokens_per_example, batch_size
        )
    sizes = [
        (path_str(p), int(math.prod(x.shape)), label == TRAINED)
        for (p, x), label in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(labels), strict=True
        )
    ]
    suffix = model_cfg.suffix_length
    prefix = tokens_per_example - suffix
    patches = model_cfg.num_image_tokens * model_cfg.num_cameras
    total = 0.0
    for path, n, trained in sizes:
        if "embedder" in path or "pos_embedding" in path:
            continue  # lookups, no matmul
        if path.startswith("PaliGemma/img/"):
            tokens = patches
        elif path.startswith("PaliGemma/llm/"):
            tokens = suffix if _is_expert_param(path) else prefix
        else:
            tokens = suffix  # action projections; the small encoders are negligible
        total += 2.0 * n * tokens * (2 + trained)
    return total * batch_size


def _is_expert_param(path: str) -> bool:
    """A Gemma parameter of the action expert (openpi's `_1` suffix on its module names;
    `layers_1` is the VLM's second layer when the layers are not scanned)."""
    return any(p.endswith("_1") and not p.startswith("layers_") for p in path.split("/"))


def build_step(
    cfg: ml_collections.ConfigDict,
    *,
    model_cfg: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = True,
) -> AbstractStep:
    """Builds the model, optimizer, abstract sharded train state and train step of `cfg`.

    Args:
      cfg: a training config (`config.base_config()` layout); validated first.
      model_cfg: overrides `config.model_config(cfg)` (e.g. a custom-size model; a
        PixelVLAConfig or a Pi0Config, as `config.model.family` says).
      mesh: default `mesh.make_mesh(config.mesh)` over all devices.
      donate: donate the state to the step (as training does).
    """
    config_lib.validate_config(cfg, model_cfg)
    model_cfg = model_cfg or config_lib.model_config(cfg)
    mesh = mesh or mesh_lib.make_mesh(dict(cfg.mesh))
    rules = sharding_lib.normalize_rules(cfg.sharding_rules)
    batch = abstract_batch(cfg, mesh, rules)
    model = config_lib.build_model(cfg, model_cfg)
    init_params = config_lib.init_params_fn(model)
    rng = jax.random.PRNGKey(cfg.seed)
    optim = config_lib.optim_config(cfg)
    params = jax.eval_shape(init_params, rng)
    labels = optimizer_lib.freeze_labels(optim, params)
    tx = optimizer_lib.make_optimizer(optim, params)
    frozen_dtype = jnp.dtype(cfg.model.frozen_dtype) if cfg.model.frozen_dtype else None
    ema_decay = float(cfg.train.get("ema_decay", 0.0))
    init_fn, state, shardings = abstract_train_state(
        init_params,
        tx,
        mesh,
        rules,
        rng,
        labels=labels,
        frozen_dtype=frozen_dtype,
        ema_decay=ema_decay,
    )
    loss_fn = make_loss_fn(model)
    train_step = make_train_step(
        loss_fn,
        tx,
        shardings,
        labels=labels,
        learning_rate_fn=optimizer_lib.learning_rate_fn(optim),
        grad_accum_steps=int(optim.grad_accum_steps),
        batch_sharding=sharding_lib.batch_sharding(mesh, rules),
        donate=donate,
        ema_decay=ema_decay,
    )
    eval_rng = jax.random.fold_in(rng, 2**31 - 1)  # a key no train step draws
    return AbstractStep(
        cfg=cfg,
        model_cfg=model_cfg,
        model=model,
        mesh=mesh,
        rules=rules,
        rng=rng,
        optim=optim,
        tx=tx,
        labels=labels,
        state=state,
        shardings=shardings,
        batch=batch,
        loss_fn=loss_fn,
        train_step=train_step,
        eval_step=jax.jit(lambda params, batch: loss_fn(params, batch, eval_rng)[1]),
        init_fn=init_fn,
        tokens_per_example=sequence_length(cfg, model_cfg),
        ema_decay=ema_decay,
    )
