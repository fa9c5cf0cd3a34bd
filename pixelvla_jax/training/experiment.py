"""Wires config -> data, model, optimizer, mesh, checkpoints -> the training loop.

`train.py` is a thin flag reader around `train(config, workdir)`; tests call the functions
here directly. The config schema is `training/config.py`; the model, optimizer, abstract
state and train step come from `training/builder.py` (the one builder that memory plans
use too); initial weights from the loaders of `training/weight_loaders.py`; generated
datasets from `data/generators.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections

from pixelvla_jax.data import generators as generators_lib
from pixelvla_jax.data import pipeline as pipeline_lib
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig
from pixelvla_jax.training import builder as builder_lib
from pixelvla_jax.training import checkpoint as checkpoint_lib
from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import mesh as mesh_lib
from pixelvla_jax.training import metrics as metrics_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training import weight_loaders as weight_loaders_lib
from pixelvla_jax.training.preemption import PreemptionHandler

log = logging.getLogger(__name__)


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


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Experiment:
    """Builds data, model, sharded train state (restored when the workdir has a checkpoint,
    else initialised and then loaded by the `config.init` weight loaders in order)."""
    step = builder_lib.build_step(cfg)  # validates the config before anything is written
    generators_lib.ensure_data(config_lib.resolved(cfg))  # inherited sizes filled in
    tokenizer_path = resolve_tokenizer(cfg, workdir)
    dcfg = config_lib.data_config(cfg, tokenizer_path)
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

    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=cfg.train.keep_last,
        keep_period=cfg.train.keep_period or None,
        async_save=cfg.train.async_checkpoint,
    )
    data_iter = iter(dataset)
    with sharding_lib.sharding_context(step.mesh, step.rules):
        restored = checkpointer.restore_latest(step.state, step.shardings)
        if restored is not None:
            state = restored.state
            if restored.data_state is not None:
                data_iter.set_state(restored.data_state)
            start_step = int(restored.step)
            log.info("Resumed from %s step %d", workdir, start_step)
        else:
            state = jax.jit(step.init_fn, out_shardings=step.shardings)(step.rng)
            start_step = 0
            params = state.params
            for loader in weight_loaders_lib.loaders_from_config(cfg):
                params = loader.load(params)
            params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, step.state.params)
            state = state.replace(params=jax.device_put(params, step.shardings.params))

    return Experiment(
        cfg=cfg,
        workdir=workdir,
        model_cfg=step.model_cfg,
        model=step.model,
        mesh=step.mesh,
        rules=step.rules,
        labels=step.labels,
        state=state,
        shardings=step.shardings,
        train_step=step.train_step,
        data_iter=data_iter,
        statistics=list(statistics),
        dataset_names=[n for n, _ in cfg.data.datasets],
        tokenizer_path=tokenizer_path,
        checkpointer=checkpointer,
        start_step=start_step,
        tokens_per_example=step.tokens_per_example,
        val_dataset=val_dataset,
        eval_step=step.eval_step,
    )


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
    from pixelvla_jax.runs import TOKENIZER_ASSET

    stats = {name: s for name, s in zip(exp.dataset_names, exp.statistics, strict=True)}
    tokenizer = os.fspath(exp.tokenizer_path)
    exp.checkpointer.save(
        step,
        exp.state,
        data_state=exp.data_iter.get_state(),
        config=exp.cfg.to_dict(),
        dataset_statistics=stats,
        metadata={
            # Where it came from (provenance); loading reads the copy in assets/.
            "tokenizer": tokenizer if "://" in tokenizer else os.path.abspath(tokenizer),
            "datasets": exp.dataset_names,
            "model_preset": exp.cfg.model.preset,
        },
        # The tokenizer file itself, in the same atomic save: the run directory is relocatable.
        assets={TOKENIZER_ASSET: tokenizer},
    )


def run(exp: Experiment, stop_after: int | None = None) -> list[dict[str, float]]:
    """Trains from `exp.start_step` to `config.train.num_steps` (or `stop_after` steps).

    Returns the metrics of every step (host floats). Saves a checkpoint every
    `checkpoint_every` steps, at the end, and when SIGTERM arrives (then returns early).
    Logged throughput (`steps_per_s`, `tokens_per_s`, `mfu`) counts the steps run since the
    previous log and leaves out the time spent in validation and checkpointing.
    """
    cfg = exp.cfg
    end = cfg.train.num_steps if stop_after is None else min(cfg.train.num_steps, stop_after)
    peak = cfg.train.peak_flops
    if not peak and jax.default_backend() == "cpu":
        peak = metrics_lib.measure_matmul_peak_flops() / max(1, len(jax.devices()))
    flops = metrics_lib.model_flops_per_step(
        exp.state.params, exp.labels, exp.model_cfg, exp.tokens_per_example, cfg.data.batch_size
    )
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
    timer = metrics_lib.ThroughputTimer()
    with (
        PreemptionHandler(install=True) as preemption,
        sharding_lib.sharding_context(exp.mesh, exp.rules),
    ):
        while step < end:
            batch = sharding_lib.shard_batch(next(exp.data_iter), exp.mesh, exp.rules)
            exp.state, metrics = exp.train_step(exp.state, batch)
            step += 1
            timer.step()
            pending.append(metrics)
            validate = exp.val_dataset is not None and (
                step % cfg.train.eval_every == 0 or step == end
            )
            log = step % cfg.train.log_every == 0 or step == end
            stop = preemption.should_stop(step)
            save = step % cfg.train.checkpoint_every == 0 or step == end or stop
            if not (validate or log or save):
                continue
            fetch_pending()  # waits for the step: the window ends when the device is done
            host = history[-1]
            if validate:
                with timer.paused():
                    host.update(validation_metrics(exp))
            if log:
                window = timer.lap()
                if window.seconds_per_step is not None:
                    host["steps_per_s"] = window.steps_per_s
                    host["tokens_per_s"] = (
                        exp.tokens_per_example * cfg.data.batch_size * window.steps_per_s
                    )
                    if peak:
                        host["mfu"] = metrics_lib.mfu(
                            flops, window.seconds_per_step, peak * len(jax.devices())
                        )
                writer.write_scalars(step, host)
            if save:
                with timer.paused():
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
