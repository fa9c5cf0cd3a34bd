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
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixelvla_jax import paths
from pixelvla_jax.data import generators as generators_lib
from pixelvla_jax.data import pipeline as pipeline_lib
from pixelvla_jax.training import builder as builder_lib
from pixelvla_jax.training import checkpoint as checkpoint_lib
from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import mesh as mesh_lib
from pixelvla_jax.training import metrics as metrics_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training import weight_loaders as weight_loaders_lib
from pixelvla_jax.training.metrics import TrainingDiverged
from pixelvla_jax.training.preemption import PreemptionHandler
from pixelvla_jax.training.train_state import trained_only

log = logging.getLogger(__name__)


def resolve_tokenizer(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Path of the sentencepiece model: configured, the OpenVLA checkpoint's, or a tiny one."""
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer

    if cfg.tokenizer.path:  # paths may be URLs (gs://...): checked through epath
        if not paths.as_path(cfg.tokenizer.path).exists():
            raise FileNotFoundError(f"config.tokenizer.path={cfg.tokenizer.path} does not exist.")
        return cfg.tokenizer.path
    if cfg.init.openvla_checkpoint:
        path = os.path.join(cfg.init.openvla_checkpoint, "tokenizer.model")
        if not paths.as_path(path).exists():
            raise FileNotFoundError(f"No tokenizer.model in {cfg.init.openvla_checkpoint}.")
        return path
    path = os.path.join(workdir, f"tokenizer_tiny_{cfg.tokenizer.tiny_vocab_size}.model")
    # Deterministic and written atomically: a host that does not see process 0's copy (no
    # shared workdir) makes the same file itself (`setup` lets process 0 go first).
    if not paths.as_path(path).exists():
        paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
        train_tiny_tokenizer(path, vocab_size=cfg.tokenizer.tiny_vocab_size)
    return path


# ---------------------------------------------------------------------------- run


@dataclasses.dataclass
class Experiment:
    """Everything a run is made of; built by `setup`, driven by `run`."""

    cfg: ml_collections.ConfigDict
    workdir: str
    model_cfg: Any  # PixelVLAConfig or Pi0Config (config.model.family)
    model: Any  # PixelVLA or Pi0
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
    flops_per_step: float = 0.0


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Experiment:
    """Builds data, model, sharded train state (restored when the workdir has a checkpoint,
    else initialised and then loaded by the `config.init` weight loaders in order)."""
    cfg = config_lib.with_checkpoint_preprocessing(cfg)  # an OpenVLA init's mean/std, saved
    step = builder_lib.build_step(cfg)  # validates the config before anything is written

    def prepare_inputs() -> str:
        generators_lib.ensure_data(config_lib.resolved(cfg))  # inherited sizes filled in
        return resolve_tokenizer(cfg, workdir)

    tokenizer_path = mesh_lib.process_zero_first(prepare_inputs, "pixelvla_prepare_inputs")
    config_lib.check_tokenizer_fits(step.model_cfg, tokenizer=tokenizer_path)
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
            loaders = weight_loaders_lib.loaders_from_config(cfg)
            for loader in loaders:  # a mistyped source fails now, not after the compilation
                loader.check()
            state = jax.jit(step.init_fn, out_shardings=step.shardings)(step.rng)
            start_step = 0
            params = state.params
            for loader in loaders:
                params = loader.load(params)
            params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, step.state.params)
            state = state.replace(params=jax.device_put(params, step.shardings.params))
            if state.ema_params is not None:  # the EMA starts from the loaded weights
                ema = jax.tree.map(jnp.copy, trained_only(state.params, step.labels))
                state = state.replace(ema_params=ema)

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
        dataset_names=[n for n, _ in dcfg.datasets],
        tokenizer_path=tokenizer_path,
        checkpointer=checkpointer,
        start_step=start_step,
        tokens_per_example=step.tokens_per_example,
        val_dataset=val_dataset,
        eval_step=step.eval_step,
        flops_per_step=step.flops_per_step(),
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
            "tokenizer": paths.absolute(tokenizer),
            "datasets": exp.dataset_names,
            "model_family": config_lib.model_section(exp.cfg).family,
            "model_preset": exp.cfg.model.preset,
        },
        # The tokenizer file itself, in the same atomic save: the run directory is relocatable.
        assets={TOKENIZER_ASSET: tokenizer},
    )


def _diverged(exp: Experiment, step: int, bad: list[str], checked_at: int) -> TrainingDiverged:
    exp.checkpointer.wait_until_finished()  # saves started before are of finite states
    last = exp.checkpointer.latest_complete_step()
    kept = (
        f"the newest checkpoint is step {last} in {exp.checkpointer.directory}; rerunning the "
        f"command resumes from it"
        if last is not None
        else "no checkpoint was saved before it; rerunning starts from the beginning"
    )
    return TrainingDiverged(
        f"Training diverged at step {step}: {', '.join(bad)} (found when the metrics of steps up "
        f"to {checked_at} were fetched). The state of that step was not saved: {kept}. Lower "
        "config.optim.lr, raise config.optim.warmup_steps or lower config.optim.clip_grad_norm "
        "before rerunning, or the same steps diverge again.",
        step=step,
        last_checkpoint=last,
    )


def run(
    exp: Experiment,
    stop_after: int | None = None,
    preemption: PreemptionHandler | None = None,
) -> list[dict[str, float]]:
    """Trains from `exp.start_step` to `config.train.num_steps` (or `stop_after` steps).

    Returns the metrics of every step (host floats). Saves a checkpoint every
    `checkpoint_every` steps and at the end. Logged throughput (`steps_per_s`,
    `tokens_per_s`, `mfu`) counts the steps run since the previous log and leaves out the
    time spent in validation and checkpointing.

    Metrics stay on the device until a log / eval / checkpoint / stop step fetches them;
    each fetch checks the loss and gradient norm of every step since the previous one. A
    NaN or Inf raises `TrainingDiverged` naming the first bad step (so within one
    `log_every` interval), and the checkpoint due at the fetching step is not written: the
    newest checkpoint stays the last one of a finite state.

    SIGTERM or SIGINT (`preemption`, by default a handler installed here for the duration):
    the loop stops after the step in flight and saves it (unless that step was just saved),
    then returns early; a signal that arrived before the first step (during setup) stops the
    run before it, with nothing new to save. On several hosts the stop step is agreed on
    (see `PreemptionHandler.should_stop`).
    """
    handler = preemption if preemption is not None else PreemptionHandler(install=True)
    try:
        return _run(exp, stop_after, handler)
    finally:
        if preemption is None:
            handler.uninstall()


def _run(
    exp: Experiment, stop_after: int | None, preemption: PreemptionHandler
) -> list[dict[str, float]]:
    cfg = exp.cfg
    end = cfg.train.num_steps if stop_after is None else min(cfg.train.num_steps, stop_after)
    peak = cfg.train.peak_flops
    if not peak and jax.default_backend() == "cpu":
        peak = metrics_lib.measure_matmul_peak_flops() / max(1, len(jax.devices()))
    flops = exp.flops_per_step
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

    def fetch_pending(step: int) -> None:
        """Moves the pending metrics to `history`; raises if a step among them diverged."""
        for metrics in jax.device_get(pending):
            history.append({k: float(v) for k, v in metrics.items()})
            bad = metrics_lib.non_finite(history[-1])
            if bad:
                pending.clear()
                writer.close()
                raise _diverged(exp, exp.start_step + len(history), bad, step)
        pending.clear()

    step = exp.start_step
    stopped = preemption.should_stop(step, sync=True)  # a signal during setup
    timer = metrics_lib.ThroughputTimer()
    with sharding_lib.sharding_context(exp.mesh, exp.rules):
        while step < end and not stopped:
            batch = sharding_lib.shard_batch(next(exp.data_iter), exp.mesh, exp.rules)
            exp.state, metrics = exp.train_step(exp.state, batch)
            step += 1
            timer.step()
            pending.append(metrics)
            validate = exp.val_dataset is not None and (
                step % cfg.train.eval_every == 0 or step == end
            )
            log_step = step % cfg.train.log_every == 0 or step == end
            save = step % cfg.train.checkpoint_every == 0 or step == end
            # Hosts exchange stop flags at steps that wait for the device anyway.
            stopped = preemption.should_stop(step, sync=validate or log_step or save)
            save = save or stopped
            if not (validate or log_step or save):
                continue
            fetch_pending(step)  # waits for the step: the window ends when the device is done
            host = history[-1]
            if validate:
                with timer.paused():
                    host.update(validation_metrics(exp))
            if log_step:
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
                if not cfg.train.progress:  # no bar (a pod's log, a test): one line per log step
                    log.info(
                        "step %d: loss %.5g, grad_norm %.4g",
                        step,
                        host["loss"],
                        host.get("grad_norm", float("nan")),
                    )
            if save:
                with timer.paused():
                    save_checkpoint(exp, step)
    fetch_pending(step)
    exp.checkpointer.wait_until_finished()
    writer.close()
    if stopped:
        how = (
            signal.Signals(preemption.received_signal).name
            if preemption.received_signal
            else "a stop request on another host"
        )
        if step > exp.start_step:
            log.warning(
                "Stopped by %s after step %d; checkpoint %d saved in %s. Rerun the same command "
                "to resume.",
                how,
                step,
                step,
                exp.checkpointer.directory,
            )
        else:
            log.warning(
                "Stopped by %s before the first step (step %d); nothing new to save. Rerun the "
                "same command to resume.",
                how,
                step,
            )
    exp.start_step = step
    return history


def train(cfg: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Sets up (resuming if `workdir` has checkpoints) and trains; returns per-step metrics.

    SIGTERM and SIGINT are handled from the start of setup on (after the multi-host runtime
    starts): they stop the run cleanly (see `run`) instead of killing it. A second SIGINT
    interrupts at once (KeyboardInterrupt).
    """
    mesh_lib.maybe_initialize_distributed()
    with PreemptionHandler() as preemption:
        exp = setup(cfg, workdir)
        try:
            return run(exp, preemption=preemption)
        finally:
            exp.checkpointer.close()
