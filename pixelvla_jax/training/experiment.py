"""Wires config -> data, model, optimizer, mesh, checkpoints -> the training loop.

`train.py` is a thin flag reader around `train(config, workdir)`; tests call the functions
here directly. The config schema is `training/config.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixelvla_jax.data import pipeline as pipeline_lib
from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig, init_params_fn
from pixelvla_jax.training import checkpoint as checkpoint_lib
from pixelvla_jax.training import mesh as mesh_lib
from pixelvla_jax.training import metrics as metrics_lib
from pixelvla_jax.training import optimizer as optimizer_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training.config import (
    ConfigError,
    compute_dtype,
    data_config,
    model_config,
    optim_config,
    validate_config,
)
from pixelvla_jax.training.param_rules import TRAINED, path_str
from pixelvla_jax.training.preemption import PreemptionHandler
from pixelvla_jax.training.train_state import abstract_train_state, make_train_step

log = logging.getLogger(__name__)

OBS_KEYS = tuple(f.name for f in dataclasses.fields(Observation))
# ---------------------------------------------------------------------------- data


def ensure_data(cfg: ml_collections.ConfigDict) -> None:
    """Generates the configured dataset when it is absent; otherwise checks it exists."""
    gen = cfg.data_generator
    for name, _ in cfg.data.datasets:
        path = os.path.join(cfg.data.data_dir, name)
        if gen.kind == "pixelref" and name == gen.kind:
            from pixelvla_jax.envs import pixelref

            env_cfg = pixelref.PixelRefConfig(image_size=gen.image_size)
            if os.path.isdir(path):  # made from seeds: stale data is an error, not a surprise
                pixelref.check_generated(path, gen.num_episodes, cfg.seed, env_cfg)
                continue
            log.info("Generating %d PixelRef expert episodes in %s", gen.num_episodes, path)
            pixelref.generate_dataset(
                cfg.data.data_dir, num_episodes=gen.num_episodes, seed=cfg.seed, config=env_cfg
            )
            continue
        if os.path.isdir(path):
            continue
        if gen.kind and name == gen.kind:
            from pixelvla_jax.data import generate

            fmt = gen.kind.removeprefix("synthetic_")
            log.info("Generating dataset %s in %s", name, path)
            generate.write_synthetic_dataset(
                cfg.data.data_dir,
                fmt=fmt,
                num_episodes=gen.num_episodes,
                episode_lengths=gen.episode_length,
                image_size=gen.image_size,
                name=name,
                seed=cfg.seed,
            )
            continue
        raise FileNotFoundError(
            f"Dataset {name!r} not found: looked for {os.path.abspath(path)}. Download the RLDS "
            f"dataset into {os.path.abspath(cfg.data.data_dir)} (TFRecord datasets are converted "
            f"with `python -m pixelvla_jax.data.convert --dataset_dir={path}`), or pass "
            "--data_dir=DIR / --config.data.data_dir=DIR."
        )


def resolve_tokenizer(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Path of the sentencepiece model: configured, the OpenVLA checkpoint's, or a tiny one."""
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer

    if cfg.tokenizer.path:
        if not os.path.exists(cfg.tokenizer.path):
            raise FileNotFoundError(f"config.tokenizer.path={cfg.tokenizer.path} does not exist.")
        return cfg.tokenizer.path
    if cfg.init.openvla_checkpoint:
        path = os.path.join(cfg.init.openvla_checkpoint, "tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No tokenizer.model in {cfg.init.openvla_checkpoint}.")
        return path
    path = os.path.join(workdir, f"tokenizer_tiny_{cfg.tokenizer.tiny_vocab_size}.model")
    if not os.path.exists(path) and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        train_tiny_tokenizer(path, vocab_size=cfg.tokenizer.tiny_vocab_size)
    return path


# ---------------------------------------------------------------------------- run


@dataclasses.dataclass
class Experiment:
    """Everything a run is made of; built by `setup`, driven by `run`."""

    cfg: ml_collections.ConfigDict
    workdir: str
    model_cfg: PixelVLAConfig
    model: PixelVLA
    mesh: jax.sharding.Mesh
    rules: Any
    labels: Any
    state: Any
    shardings: Any
    train_step: Any
    data_iter: Any
    statistics: list[dict]
    dataset_names: list[str]
    tokenizer_path: str
    checkpointer: checkpoint_lib.Checkpointer
    start_step: int
    tokens_per_example: int
    val_dataset: Any = None
    eval_step: Any = None


def sequence_length(cfg: ml_collections.ConfigDict, model_cfg: PixelVLAConfig) -> int:
    """LLM tokens per example: prefix (BOS, vision, pixel/prompt tokens, text) + suffix
    (the L1 head's action slots, or the discrete head's decoded tokens + EOS)."""
    if cfg.model.head == "l1":
        suffix = model_cfg.num_action_slots
    else:
        suffix = model_cfg.num_decoded_tokens + 1
    return model_cfg.prefix_length(cfg.data.max_tokens) + suffix


def batch_to_observation(batch: Mapping[str, Any]) -> Observation:
    return Observation(**{k: batch[k] for k in OBS_KEYS})


def make_loss_fn(model: PixelVLA):
    def loss_fn(params, batch, rng):
        del rng  # the model has no stochastic layers
        loss, metrics = model.apply(
            {"params": params},
            batch_to_observation(batch),
            batch["actions"],
            batch["action_pad_mask"],
            batch.get("grounding_mask"),
            batch.get("has_grounding_mask"),
            batch.get("target_point"),
            batch.get("has_target_point"),
            method=PixelVLA.loss,
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


def _init_from_previous_run(exp_params: Any, from_dir: str, model_cfg_of) -> Any:
    """Copies every param that a previous run's newest checkpoint has (stage 1 -> stage 2).

    `from_dir` is the previous run's workdir or its `checkpoints/` dir, as for evaluation.
    """
    try:
        from_dir = checkpoint_lib.checkpoint_dir(from_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.init.from_checkpoint: {e}") from None
    previous = checkpoint_lib.Checkpointer(from_dir, async_save=False)
    step = previous.latest_complete_step()
    if step is None:
        raise FileNotFoundError(
            f"config.init.from_checkpoint={from_dir} holds no complete checkpoint."
        )
    saved = previous.restore(step)  # JSON items only
    prev_model_cfg = model_cfg_of(ml_collections.ConfigDict(saved.config))
    prev_init = init_params_fn(PixelVLA(prev_model_cfg))
    prev_params = jax.eval_shape(lambda r: nn.unbox(prev_init(r)), jax.random.key(0))
    flat_new = dict(jax.tree_util.tree_flatten_with_path(exp_params)[0])
    flat_prev = jax.tree_util.tree_flatten_with_path(prev_params)[0]
    shared = {p: x for p, x in flat_prev if p in flat_new and flat_new[p].shape == x.shape}
    subset_paths = set(shared)
    abstract = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat_new[p].sharding)
            if p in subset_paths
            else None
        ),
        prev_params,
    )
    _, restored = previous.restore_params(step, abstract)
    previous.close()
    restored_flat = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    log.info("Initialised %d params from %s step %d", len(restored_flat), from_dir, step)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: restored_flat[p].astype(x.dtype) if p in restored_flat else x, exp_params
    )


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Experiment:
    """Builds data, model, sharded train state (restored when the workdir has a checkpoint)."""
    validate_config(cfg)
    model_cfg = model_config(cfg)
    mesh = mesh_lib.make_mesh(dict(cfg.mesh))
    rules = sharding_lib.normalize_rules(cfg.sharding_rules)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % batch_shards:
        raise ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} is not a multiple of the "
            f"{batch_shards} batch shards of mesh {dict(mesh.shape)}; change the batch size "
            "or config.mesh."
        )
    ensure_data(cfg)
    tokenizer_path = resolve_tokenizer(cfg, workdir)
    dcfg = data_config(cfg, tokenizer_path)
    sources, statistics = pipeline_lib.build_sources(dcfg)
    val_dataset = None
    if cfg.train.holdout_every:
        from pixelvla_jax.data.splits import EpisodeSubset

        every = cfg.train.holdout_every
        val_sources = [EpisodeSubset(s, every, held_out=True) for s in sources]
        sources = [EpisodeSubset(s, every, held_out=False) for s in sources]
        val_cfg = dataclasses.replace(dcfg, augment=False, seed=dcfg.seed + 1)
        val_dataset = pipeline_lib.make_dataset(val_cfg, val_sources, statistics)
    dataset = pipeline_lib.make_dataset(dcfg, sources, statistics)

    model = PixelVLA(model_cfg, dtype=compute_dtype(cfg))
    init_params = init_params_fn(model)
    rng = jax.random.PRNGKey(cfg.seed)
    optim = optim_config(cfg)
    abstract_params = jax.eval_shape(init_params, rng)
    labels = optimizer_lib.freeze_labels(optim, abstract_params)
    tx = optimizer_lib.make_optimizer(optim, abstract_params)
    frozen_dtype = jnp.dtype(cfg.model.frozen_dtype) if cfg.model.frozen_dtype else None
    init_fn, abstract_state, shardings = abstract_train_state(
        init_params, tx, mesh, rules, rng, labels=labels, frozen_dtype=frozen_dtype
    )
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=cfg.train.keep_last,
        keep_period=cfg.train.keep_period or None,
        async_save=cfg.train.async_checkpoint,
    )
    data_iter = iter(dataset)
    with sharding_lib.sharding_context(mesh, rules):
        restored = checkpointer.restore_latest(abstract_state, shardings)
        if restored is not None:
            state = restored.state
            if restored.data_state is not None:
                data_iter.set_state(restored.data_state)
            start_step = int(restored.step)
            log.info("Resumed from %s step %d", workdir, start_step)
        else:
            state = jax.jit(init_fn, out_shardings=shardings)(rng)
            start_step = 0
            params = state.params
            if cfg.init.openvla_checkpoint:
                from pixelvla_jax.weights import openvla

                imported = openvla.import_openvla(
                    cfg.init.openvla_checkpoint,
                    model_cfg,
                    dtype=jnp.float32,
                    shardings=shardings.params,
                )
                params = openvla.merge_imported(params, imported.params)
            if cfg.init.from_checkpoint:
                params = _init_from_previous_run(params, cfg.init.from_checkpoint, model_config)
            params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, abstract_state.params)
            state = state.replace(params=jax.device_put(params, shardings.params))

    loss_fn = make_loss_fn(model)
    eval_step = jax.jit(lambda params, batch: loss_fn(params, batch, None)[1])
    train_step = make_train_step(
        loss_fn,
        tx,
        shardings,
        labels=labels,
        learning_rate_fn=optimizer_lib.learning_rate_fn(optim),
        grad_accum_steps=int(cfg.optim.grad_accum_steps),
    )
    tokens = sequence_length(cfg, model_cfg)
    return Experiment(
        cfg=cfg,
        workdir=workdir,
        model_cfg=model_cfg,
        model=model,
        mesh=mesh,
        rules=rules,
        labels=labels,
        state=state,
        shardings=shardings,
        train_step=train_step,
        data_iter=data_iter,
        statistics=list(statistics),
        dataset_names=[n for n, _ in cfg.data.datasets],
        tokenizer_path=tokenizer_path,
        checkpointer=checkpointer,
        start_step=start_step,
        tokens_per_example=tokens,
        val_dataset=val_dataset,
        eval_step=eval_step,
    )


def _flops_per_step(exp: Experiment) -> float:
    """Model FLOPs of one train step, counted per component.

    Matmul weights cost 2 FLOPs per token forward; backward costs 2 more per token for the
    activation gradients wherever a trained parameter lies at or before that component,
    plus 2 for the weight gradients of trained weights. The LLM body sees every token, the
    vision towers and projector see the image patches, embeddings and the (unused) lm_head
    cost nothing; the small encoders and the head see their own few tokens.
    """
    sizes = {
        path_str(p): (int(np.prod(x.shape)), lab)
        for (p, x), lab in zip(
            jax.tree_util.tree_flatten_with_path(exp.state.params)[0],
            jax.tree.leaves(exp.labels),
            strict=True,
        )
    }

    def group(prefix: str) -> tuple[int, int]:
        items = [v for k, v in sizes.items() if k.startswith(prefix)]
        return sum(n for n, _ in items), sum(n for n, lab in items if lab == TRAINED)

    mcfg = exp.model_cfg
    llm_tokens = exp.tokens_per_example
    llm_all, llm_trained = group("llm/layers")
    vis_all, vis_trained = group("vision/")
    proj_all, proj_trained = group("projector/")
    rest_all = sum(
        n for k, (n, _) in sizes.items() if not k.startswith(("llm/", "vision/", "projector/"))
    )
    rest_trained = sum(
        n
        for k, (n, lab) in sizes.items()
        if lab == TRAINED and not k.startswith(("llm/", "vision/", "projector/"))
    )
    encoders_trained = any(
        lab == TRAINED and k.startswith(("pixel_encoder/", "prompt_encoder/"))
        for k, (_, lab) in sizes.items()
    )
    # (weights, tokens, trained weights, whether activation gradients flow through it)
    parts = [
        (vis_all, mcfg.vision.num_patches, vis_trained, vis_trained > 0),
        (proj_all, mcfg.vision.num_patches, proj_trained, vis_trained + proj_trained > 0),
        (
            llm_all,
            llm_tokens,
            llm_trained,
            vis_trained + proj_trained + llm_trained > 0 or encoders_trained,
        ),
        (rest_all, mcfg.num_action_slots, rest_trained, True),
    ]
    per_example = sum(
        2.0 * n * t + (2.0 * n * t if grads else 0.0) + 2.0 * nt * t for n, t, nt, grads in parts
    )
    return per_example * exp.cfg.data.batch_size


def validation_metrics(exp: Experiment) -> dict[str, float]:
    """Mean metrics over the first `eval_batches` batches of the held-out episodes."""
    if exp.val_dataset is None:
        return {}
    totals: dict[str, float] = {}
    it = iter(exp.val_dataset)  # a fresh iterator: the same batches every time
    n = exp.cfg.train.eval_batches
    for _ in range(n):
        batch = sharding_lib.shard_batch(next(it), exp.mesh, exp.rules)
        for key, value in jax.device_get(exp.eval_step(exp.state.params, batch)).items():
            totals[key] = totals.get(key, 0.0) + float(value) / n
    return {f"val/{k}": v for k, v in totals.items()}


def save_checkpoint(exp: Experiment, step: int) -> None:
    stats = {name: s for name, s in zip(exp.dataset_names, exp.statistics, strict=True)}
    exp.checkpointer.save(
        step,
        exp.state,
        data_state=exp.data_iter.get_state(),
        config=exp.cfg.to_dict(),
        dataset_statistics=stats,
        metadata={
            "tokenizer": os.path.abspath(exp.tokenizer_path),
            "datasets": exp.dataset_names,
            "model_preset": exp.cfg.model.preset,
        },
    )


def run(exp: Experiment, stop_after: int | None = None) -> list[dict[str, float]]:
    """Trains from `exp.start_step` to `config.train.num_steps` (or `stop_after` steps).

    Returns the metrics of every step (host floats). Saves a checkpoint every
    `checkpoint_every` steps, at the end, and when SIGTERM arrives (then returns early).
    """
    cfg = exp.cfg
    end = cfg.train.num_steps if stop_after is None else min(cfg.train.num_steps, stop_after)
    peak = cfg.train.peak_flops
    if not peak and jax.default_backend() == "cpu":
        peak = metrics_lib.measure_matmul_peak_flops() / max(1, len(jax.devices()))
    flops = _flops_per_step(exp)
    writer = metrics_lib.MetricsWriter(
        exp.workdir,
        total_steps=cfg.train.num_steps,
        initial_step=exp.start_step,
        progress=cfg.train.progress,
    )
    history: list[dict[str, float]] = []
    # Metrics stay on the device until a log / eval / checkpoint / stop step needs them, so
    # the host dispatches step k + 1 (and prepares its batch) while step k computes.
    pending: list[Any] = []

    def fetch_pending() -> None:
        for metrics in jax.device_get(pending):
            history.append({k: float(v) for k, v in metrics.items()})
        pending.clear()

    step = exp.start_step
    last_time = time.perf_counter()
    with (
        PreemptionHandler(install=True) as preemption,
        sharding_lib.sharding_context(exp.mesh, exp.rules),
    ):
        while step < end:
            batch = sharding_lib.shard_batch(next(exp.data_iter), exp.mesh, exp.rules)
            exp.state, metrics = exp.train_step(exp.state, batch)
            step += 1
            pending.append(metrics)
            validate = exp.val_dataset is not None and (
                step % cfg.train.eval_every == 0 or step == end
            )
            log = step % cfg.train.log_every == 0 or step == end
            stop = preemption.should_stop(step)
            save = step % cfg.train.checkpoint_every == 0 or step == end or stop
            if not (validate or log or save):
                continue
            fetch_pending()
            host = history[-1]
            if validate:
                host.update(validation_metrics(exp))
            if log:
                now = time.perf_counter()
                seconds_per_step = (now - last_time) / cfg.train.log_every
                last_time = now
                host["tokens_per_s"] = (
                    exp.tokens_per_example * cfg.data.batch_size / seconds_per_step
                )
                if peak:
                    host["mfu"] = metrics_lib.mfu(
                        flops, seconds_per_step, peak * len(jax.devices())
                    )
                writer.write_scalars(step, host)
            if save:
                save_checkpoint(exp, step)
            if stop:
                break
    fetch_pending()
    exp.checkpointer.wait_until_finished()
    writer.close()
    exp.start_step = step
    return history


def train(cfg: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Sets up (resuming if `workdir` has checkpoints) and trains; returns per-step metrics."""
    mesh_lib.maybe_initialize_distributed()
    exp = setup(cfg, workdir)
    try:
        return run(exp)
    finally:
        exp.checkpointer.close()
