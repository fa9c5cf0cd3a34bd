"""Orbax checkpoints (round trip, exact resume, cross-mesh restore, incomplete steps,
retention), SIGTERM preemption and the metrics writer, on a toy model."""

import logging
import os
import shutil
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixelvla_jax.training import checkpoint as ckpt_lib
from pixelvla_jax.training import metrics as metrics_lib
from pixelvla_jax.training import optimizer as opt_lib
from pixelvla_jax.training.mesh import make_mesh
from pixelvla_jax.training.preemption import PreemptionHandler
from pixelvla_jax.training.sharding import DEFAULT_RULES
from pixelvla_jax.training.train_state import abstract_train_state, make_train_step


class ToyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 4] -> [B, 2]
        init = nn.initializers.lecun_normal()
        x = nn.Dense(
            16, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), name="backbone"
        )(x)
        return nn.Dense(
            2, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")), name="head"
        )(jnp.tanh(x))


def init_params(rng):
    return ToyMLP().init(rng, jnp.zeros((1, 4)))["params"]


def toy_batch(step: int):
    """Data given by the step number, so a resumed run sees the same batches."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": np.stack([x[:, 0] * x[:, 1], x[:, 2]], -1).astype(np.float32)}


def loss_fn(params, batch, rng):
    pred = ToyMLP().apply({"params": params}, batch["x"])
    noise = 1e-3 * jax.random.normal(rng, pred.shape)  # uses the per-step rng
    loss = jnp.mean((pred + noise - batch["y"]) ** 2)
    return loss, {}


CFG = ml_collections.ConfigDict(
    {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 2, "total_steps": 20, "weight_decay": 0.01}
)


def build(mesh):
    """(init_fn, abstract_state, shardings, step_fn) for the toy model on `mesh`."""
    rng = jax.random.PRNGKey(0)
    tx = opt_lib.make_optimizer(CFG, jax.eval_shape(init_params, rng))
    init_fn, abstract, shardings = abstract_train_state(init_params, tx, mesh, DEFAULT_RULES, rng)
    step = make_train_step(loss_fn, tx, shardings, learning_rate_fn=opt_lib.learning_rate_fn(CFG))
    return init_fn, abstract, shardings, step


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def built8(mesh8):
    return build(mesh8)


def fresh_state(built):
    init_fn, _, shardings, _ = built
    return jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_and_exact_resume(tmp_path, built8):
    _, abstract, shardings, step_fn = built8
    state = fresh_state(built8)
    losses = []
    saved_copy = None
    with ckpt_lib.Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        for i in range(6):
            state, m = step_fn(state, toy_batch(i))
            losses.append(float(m["loss"]))
            if i == 2:
                saved_copy = jax.tree.map(np.asarray, state)
                ckpt.save(
                    int(state.step),
                    state,
                    data_state=b'{"next_index": 3}',
                    config=CFG,
                    dataset_statistics={"libero": {"q01": np.array([-1.0, 0.5]), "n": 7}},
                    metadata={"tokenizer": "/models/llama2/tokenizer.model"},
                )
    # A new process would do exactly this: build abstractly, restore, continue.
    with ckpt_lib.Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore_latest(abstract, shardings)
    assert restored.step == 3
    assert_trees_equal(restored.state, saved_copy)
    assert (
        restored.state.params["backbone"]["kernel"].sharding
        == (shardings.params["backbone"]["kernel"])
    )
    assert restored.data_state == b'{"next_index": 3}'
    assert restored.config["total_steps"] == 20
    assert ml_collections.ConfigDict(restored.config).lr == CFG.lr
    assert restored.dataset_statistics == {"libero": {"q01": [-1.0, 0.5], "n": 7}}
    assert restored.metadata["tokenizer"] == "/models/llama2/tokenizer.model"

    # Evaluation reads the parameters alone, onto one device.
    step, params = ckpt_lib.Checkpointer(tmp_path / "ckpt").restore_params(
        None, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.params)
    )
    assert step == 3
    assert_trees_equal(params, saved_copy.params)

    state = restored.state
    resumed = []
    for i in range(int(state.step), 6):
        state, m = step_fn(state, toy_batch(i))
        resumed.append(float(m["loss"]))
    assert resumed == losses[3:]


@pytest.mark.parametrize("n_devices, shape", [(4, {"fsdp": 2, "tensor": 2}), (1, {})])
def test_cross_mesh_restore(tmp_path, built8, n_devices, shape):
    state = fresh_state(built8)
    state, _ = built8[3](state, toy_batch(0))
    expected = jax.tree.map(np.asarray, state)
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)

    small_mesh = make_mesh(shape, devices=jax.devices()[:n_devices])
    _, abstract, shardings, step_fn = build(small_mesh)
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore_latest(abstract, shardings).state
    assert_trees_equal(restored, expected)
    kernel = restored.params["backbone"]["kernel"]
    assert kernel.sharding.mesh.devices.size == n_devices
    assert kernel.sharding.spec == shardings.params["backbone"]["kernel"].spec
    assert len(kernel.sharding.device_set) == n_devices
    # Training continues on the new mesh.
    state, m = step_fn(restored, toy_batch(1))
    assert np.isfinite(float(m["loss"]))


def test_incomplete_checkpoints_are_skipped(tmp_path, built8, caplog):
    _, abstract, shardings, _ = built8
    state = fresh_state(built8)
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)))
    os.remove(tmp_path / "4" / "commit_success.txt")  # the save of 4 never finished
    shutil.rmtree(tmp_path / "3" / "metadata")  # an item of 3 is missing
    shutil.copytree(tmp_path / "2", tmp_path / "5.orbax-checkpoint-tmp-17")  # Orbax tmp dir

    with caplog.at_level(logging.WARNING), ckpt_lib.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3, 4]
        restored = ckpt.restore_latest(abstract, shardings)
        assert restored.step == 2
        assert int(restored.state.step) == 2
        assert ckpt.all_steps() == [1, 2]  # the incomplete ones were moved aside
        assert ckpt.latest_complete_step() == 2
        # Their step numbers can be saved again.
        ckpt.save(3, restored.state)
        ckpt.wait_until_finished()
        assert ckpt.latest_complete_step() == 3
    text = caplog.text
    assert "Skipping checkpoint step 4" in text and "commit_success.txt" in text
    assert "Skipping checkpoint step 3" in text and "lacks the item 'metadata'" in text
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt_lib.Checkpointer(tmp_path).restore(7, abstract, shardings)


def test_no_checkpoint_gives_none_and_json_only_restore(tmp_path, built8):
    _, abstract, shardings, _ = built8
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract, shardings) is None
        ckpt.save(5, fresh_state(built8), data_state={"i": 5}, metadata={"tokenizer": "t"})
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(5, fresh_state(built8))
        only_json = ckpt.restore(5)
    assert only_json.state is None
    assert only_json.data_state == {"i": 5} and only_json.metadata == {"tokenizer": "t"}


def test_relative_directory_saves_and_restores(tmp_path, built8, monkeypatch):
    _, abstract, shardings, _ = built8
    monkeypatch.chdir(tmp_path)
    with ckpt_lib.Checkpointer(os.path.join("runs", "x", "checkpoints")) as ckpt:
        ckpt.save(3, fresh_state(built8), data_state={"i": 3})
        ckpt.wait_until_finished()
    monkeypatch.chdir("/")  # restoring resolves against where the run was made
    with ckpt_lib.Checkpointer(tmp_path / "runs" / "x" / "checkpoints") as ckpt:
        restored = ckpt.restore_latest(abstract, shardings)
    assert restored.step == 3 and restored.data_state == {"i": 3}


def test_keep_last_n_and_every_k(tmp_path, built8):
    state = fresh_state(built8)
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, keep_period=4) as ckpt:
        for step in range(10):
            ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [0, 4, 8, 9]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["0", "4", "8", "9"]


def test_sigterm_saves_checkpoint_and_stops(tmp_path, built8):
    _, abstract, shardings, step_fn = built8
    state = fresh_state(built8)
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as preemption, ckpt_lib.Checkpointer(tmp_path) as ckpt:
        assert not preemption.requested
        last = None
        for i in range(100):
            state, _ = step_fn(state, toy_batch(i))
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the process survives: handler installed
            if preemption.should_stop(i):
                ckpt.save(int(state.step), state)
                ckpt.wait_until_finished()
                last = i
                break
    assert preemption.requested and preemption.received_signal == signal.SIGTERM
    assert last == 2
    assert signal.getsignal(signal.SIGTERM) == previous  # handler uninstalled
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract, shardings).step == 3


def test_metrics_writer_and_mfu(tmp_path):
    with metrics_lib.MetricsWriter(tmp_path, total_steps=10, progress=True) as writer:
        writer.write_scalars(1, {"loss": jnp.asarray(0.5), "learning_rate": 1e-3})
        values = writer.write_scalars(3, {"loss": np.float32(0.25)})
        writer.write_text(3, "config", "lr: 0.001")
    assert values["loss"] == 0.25 and values["steps_per_sec"] > 0
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)

    assert metrics_lib.count_params(init_params(jax.random.PRNGKey(0))) == 4 * 16 + 16 + 16 * 2 + 2
    assert metrics_lib.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert metrics_lib.train_flops_per_step(10, 5, 2) == 2 * (60 + 20)
    peak = metrics_lib.measure_matmul_peak_flops(size=256, repeats=2)
    assert 1e6 < peak < 1e15
    with pytest.raises(ValueError, match="step_time > 0"):
        metrics_lib.mfu(1.0, 0.0, 1.0)


def test_assets_are_files_inside_the_atomic_async_save(tmp_path, built8):
    """A tokenizer copied in as an assets item: written by the (asynchronous) commit, read
    when the save starts, optional (checkpoints without it stay complete), relocatable."""
    state = fresh_state(built8)
    source = tmp_path / "tokenizer.model"
    source.write_bytes(b"spm-v1")
    with ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:  # async_save=True
        ckpt.save(1, state, metadata={"tokenizer": str(source)}, assets={"tokenizer.model": source})
        source.write_bytes(b"spm-v2")  # after the save started: not what the checkpoint holds
        ckpt.save(2, state)  # no assets, as checkpoints written before they existed
        with pytest.raises(FileNotFoundError, match="no file at"):
            ckpt.save(3, state, assets={"tokenizer.model": tmp_path / "missing.model"})
    assert (tmp_path / "run" / "checkpoints" / "1" / "assets" / "tokenizer.model").read_bytes() == (
        b"spm-v1"
    )
    shutil.move(tmp_path / "run", tmp_path / "moved")  # relative to the step: still found
    with ckpt_lib.Checkpointer(tmp_path / "moved" / "checkpoints") as ckpt:
        assert ckpt.complete_steps() == [1, 2]
        one = ckpt.restore(1)
        assert one.assets == {
            "tokenizer.model": str(
                tmp_path / "moved" / "checkpoints" / "1" / "assets" / "tokenizer.model"
            )
        }
        assert ckpt.restore(2).assets == {}
