"""Issue #18, the training loop: a NaN loss stops the run; SIGTERM / SIGINT at any time stop it
cleanly (saving when a step has run since the last save).

The signal tests run `experiment.train` in a subprocess (a signal that is not handled kills
the process, which pytest could not survive) with a hook that sends the signal at a
precise moment: while setup builds the model, or when the first train step is called (its
compilation). The subprocesses share a persistent compilation cache to stay fast.
"""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax import cli
from pixelvla_jax.data import generators as generators_lib
from pixelvla_jax.errors import PixelVLAError
from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import experiment
from pixelvla_jax.training.preemption import PreemptionHandler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _tiny_config(data_dir, **train):
    cfg = config_lib.load_config("libero:tiny")
    cfg.data.data_dir = str(data_dir)
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 4
    cfg.data_generator.episode_length = 8
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.train.peak_flops = 1e12
    cfg.optim.warmup_steps = 1
    for name, value in train.items():
        cfg.train[name] = value
    cfg.optim.total_steps = cfg.train.num_steps
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rlds")
    generators_lib.ensure_data(config_lib.resolved(_tiny_config(path, num_steps=2)))
    return path


# ---------------------------------------------------------------------------- NaN


def test_nan_loss_stops_within_one_log_interval_and_keeps_last_finite_checkpoint(
    data_dir, tmp_path
):
    cfg = _tiny_config(data_dir, num_steps=12, log_every=4, checkpoint_every=4)
    exp = experiment.setup(cfg, str(tmp_path / "run"))
    real_step, calls = exp.train_step, [0]

    def diverging_step(state, batch):
        state, metrics = real_step(state, batch)
        calls[0] += 1
        if calls[0] >= 6:  # step 6 on: the loss is NaN (a blown-up state)
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return state, metrics

    exp.train_step = diverging_step
    try:
        with pytest.raises(experiment.TrainingDiverged, match=r"at step 6\b") as err:
            experiment.run(exp)
    finally:
        exp.checkpointer.close()
    # Found at the fetch of step 8 (the next log step): no step beyond it was dispatched.
    assert calls[0] == 8
    assert err.value.step == 6 and err.value.last_checkpoint == 4
    assert "newest checkpoint is step 4" in str(err.value)
    # Step 8's checkpoint (a NaN state) was not written: the newest is the last finite one.
    assert exp.checkpointer.complete_steps() == [4]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]


def test_training_diverged_exits_non_zero_through_the_cli():
    err = experiment.TrainingDiverged("Training diverged at step 6: loss=nan.", 6, 4)
    assert isinstance(err, PixelVLAError) and isinstance(err, RuntimeError)

    def main(argv):
        raise err

    assert cli.call(main, []) == experiment.TrainingDiverged.exit_code != 0


# ---------------------------------------------------------------------------- signals

_DRIVER = textwrap.dedent(
    """
    import dataclasses, logging, os, signal, sys

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pixelvla_jax").setLevel(logging.INFO)

    from pixelvla_jax.training import builder as builder_lib
    from pixelvla_jax.training import config as config_lib
    from pixelvla_jax.training import experiment

    sig, when, workdir, data_dir = sys.argv[1:5]
    sig = getattr(signal, sig)
    cfg = config_lib.load_config("libero:tiny")
    cfg.data.data_dir = data_dir
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 4
    cfg.data_generator.episode_length = 8
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.train.peak_flops = 1e12
    cfg.train.num_steps = cfg.optim.total_steps = 3
    cfg.optim.warmup_steps = 1
    real_build_step = builder_lib.build_step

    def build_step(*args, **kwargs):
        if when == "setup":  # while setup builds the model
            os.kill(os.getpid(), sig)
        step = real_build_step(*args, **kwargs)
        if when == "first_step":  # when the first train step is called (compiled)
            real_train_step, calls = step.train_step, [0]

            def train_step(state, batch):
                calls[0] += 1
                if calls[0] == 1:
                    os.kill(os.getpid(), sig)
                return real_train_step(state, batch)

            step = dataclasses.replace(step, train_step=train_step)
        return step

    builder_lib.build_step = build_step
    history = experiment.train(cfg, workdir)
    print(f"STEPS_RUN={len(history)}")
    """
)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    path = root / "driver.py"
    path.write_text(_DRIVER)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COMPILATION_CACHE_DIR": str(root / "compilation_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }

    def run(sig: str, when: str, workdir, data_dir) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, str(path), sig, when, str(workdir), str(data_dir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        return proc

    return run


def _checkpoints(workdir):
    path = workdir / "checkpoints"
    return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if path.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_setup_stops_cleanly_before_the_first_step(driver, data_dir, tmp_path, sig):
    proc = driver(sig, "setup", tmp_path / "run", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS_RUN=0" in proc.stdout
    assert f"Stopped by {sig} before the first step" in proc.stderr
    assert _checkpoints(tmp_path / "run") == []  # nothing ran: nothing new to save


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_first_compilation_saves_that_step(driver, data_dir, tmp_path, sig):
    proc = driver(sig, "first_step", tmp_path / "run", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS_RUN=1" in proc.stdout
    assert f"Stopped by {sig} after step 1; checkpoint 1 saved" in proc.stderr
    assert _checkpoints(tmp_path / "run") == [1]


def test_second_sigint_interrupts_at_once():
    with PreemptionHandler() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.requested and preemption.received_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------- multi-host checks


def _fake_two_hosts(monkeypatch):
    """jax.process_count() -> 2 (the real collectives run in test_multihost.py)."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)


def test_broken_preemption_sync_point_fails_loudly(monkeypatch):
    from jax.experimental import multihost_utils

    _fake_two_hosts(monkeypatch)

    def broken(step):
        raise RuntimeError("coordination service unavailable")

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", broken)
    handler = PreemptionHandler()
    with pytest.raises(RuntimeError, match="preemption sync point failed at step 3"):
        handler.should_stop(3)


def test_disabled_preemption_service_is_logged_and_flags_still_agree(monkeypatch, caplog):
    from jax.experimental import multihost_utils

    _fake_two_hosts(monkeypatch)
    previous = jax.config.jax_enable_preemption_service
    jax.config.update("jax_enable_preemption_service", False)
    gathered = []

    def allgather(flag):
        gathered.append(bool(flag))
        return np.asarray([bool(flag), True])  # the other host got the signal

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    handler = PreemptionHandler(sync_every=10)
    try:
        with caplog.at_level("INFO", logger="pixelvla_jax.training.preemption"):
            assert not handler.should_stop(3)  # not a sync step: no collective
            assert handler.should_stop(3, sync=True)
            assert handler.should_stop(10)
    finally:
        jax.config.update("jax_enable_preemption_service", previous)
    assert gathered == [False, False]
    assert "preemption service is disabled" in caplog.text


def test_failing_flag_gather_fails_loudly(monkeypatch):
    from jax.experimental import multihost_utils

    _fake_two_hosts(monkeypatch)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: False)

    def broken(flag):
        raise RuntimeError("gloo: connection reset")

    monkeypatch.setattr(multihost_utils, "process_allgather", broken)
    with pytest.raises(RuntimeError, match="stop flags failed at step 10"):
        PreemptionHandler(sync_every=10).should_stop(10)


def test_distributed_arguments_from_env():
    from pixelvla_jax.training import mesh as mesh_lib

    env = {
        "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    assert mesh_lib.distributed_arguments_from_env(env) == {
        "coordinator_address": "127.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    assert mesh_lib.distributed_arguments_from_env({}) == {}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        mesh_lib.distributed_arguments_from_env({**env, "JAX_PROCESS_ID": ""})
    with pytest.raises(ValueError, match="outside"):
        mesh_lib.distributed_arguments_from_env({**env, "JAX_PROCESS_ID": "2"})
