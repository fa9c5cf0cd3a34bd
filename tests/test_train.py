"""End-to-end training on generated data: loss falls, exact resume, stage 1 -> stage 2, errors."""

import os
import signal

import jax
import numpy as np
import pytest

from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import experiment
from pixelvla_jax.training.param_rules import FROZEN, path_str


def _tiny_config(data_dir, config_file="libero", **train):
    cfg = config_lib.load_config(f"{config_file}:tiny")
    cfg.data.data_dir = str(data_dir)
    cfg.data.batch_size = 8
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 6
    cfg.data_generator.episode_length = 12
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.train.peak_flops = 1e12
    for key, value in train.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rlds")


def _flat(params):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_tiny_config_trains_and_loss_falls(data_dir, tmp_path):
    cfg = _tiny_config(data_dir, train__num_steps=40, optim__total_steps=40, optim__lr=2e-3)
    cfg.train.holdout_every = 3  # episodes 2 and 5 of 6 are validation episodes
    cfg.train.eval_every = 20
    cfg.train.eval_batches = 1
    history = experiment.train(cfg, str(tmp_path / "run"))
    losses = np.array([h["loss"] for h in history])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-8:].mean() < 0.8 * losses[:8].mean(), losses
    # Metrics a user reads: per-dimension L1, grad norm, learning rate.
    assert {"l1_per_dim/0", "l1_per_dim/6", "grad_norm", "learning_rate"} <= set(history[-1])
    # Validation loss on held-out episodes, at steps 20 and 40.
    val = [h["val/loss"] for h in history if "val/loss" in h]
    assert len(val) == 2 and np.isfinite(val).all()
    # The checkpoint carries everything needed to act.
    ckpt_dir = tmp_path / "run" / "checkpoints" / "40"
    for item in ("state", "config", "dataset_statistics", "metadata", "data_state"):
        assert (ckpt_dir / item).is_dir(), item


def test_sigterm_then_resume_equals_uninterrupted_run(data_dir, tmp_path):
    steps = 6
    cfg = _tiny_config(
        data_dir,
        train__num_steps=steps,
        train__checkpoint_every=100,
        optim__total_steps=steps,
    )
    straight = experiment.setup(cfg, str(tmp_path / "straight"))
    expected = experiment.run(straight)
    straight.checkpointer.close()

    # Interrupted run: SIGTERM arrives while the 3rd batch is read.
    exp = experiment.setup(cfg, str(tmp_path / "interrupted"))
    inner, calls = exp.data_iter, [0]

    class SignallingIterator:
        def __next__(self):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(inner)

        def get_state(self):
            return inner.get_state()

    exp.data_iter = SignallingIterator()
    first = experiment.run(exp)
    exp.checkpointer.close()
    assert len(first) == 3, "SIGTERM must stop the loop after the step in flight"
    assert exp.checkpointer.latest_complete_step() == 3

    resumed = experiment.setup(cfg, str(tmp_path / "interrupted"))
    assert resumed.start_step == 3
    rest = experiment.run(resumed)
    resumed.checkpointer.close()
    losses = [h["loss"] for h in first + rest]
    np.testing.assert_allclose(losses, [h["loss"] for h in expected], rtol=0, atol=1e-6)
    a, b = _flat(straight.state.params), _flat(resumed.state.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)


def test_stage1_then_stage2_changes_only_trained_params(data_dir, tmp_path):
    stage1 = _tiny_config(
        data_dir, "bridge_fractal", train__num_steps=3, optim__total_steps=3, optim__warmup_steps=1
    )
    exp1 = experiment.setup(stage1, str(tmp_path / "stage1"))
    experiment.run(exp1)
    exp1.checkpointer.close()
    p1 = _flat(exp1.state.params)
    assert not any("pixel_encoder" in k or "prompt_encoder" in k for k in p1)
    labels1 = _flat(exp1.labels)
    assert {k for k, v in labels1.items() if v != FROZEN} == {
        k for k in p1 if k.startswith("action_head/") or k == "action_slots"
    }

    stage2 = _tiny_config(
        data_dir, "pixel160k", train__num_steps=3, optim__total_steps=3, optim__warmup_steps=1
    )
    stage2.init.from_checkpoint = str(tmp_path / "stage1" / "checkpoints")
    exp2 = experiment.setup(stage2, str(tmp_path / "stage2"))
    before = _flat(exp2.state.params)
    # Everything stage 1 had is copied from it (stage 2's chunk, vocab, widths are the same).
    for key, value in p1.items():
        np.testing.assert_array_equal(before[key], value, err_msg=key)
    # The workdir itself is accepted too (as evaluation accepts it); a wrong path says so.
    from_workdir = stage2.copy_and_resolve_references()
    from_workdir.init.from_checkpoint = str(tmp_path / "stage1")
    exp2b = experiment.setup(from_workdir, str(tmp_path / "stage2b"))
    same = _flat(exp2b.state.params)
    exp2b.checkpointer.close()
    for key, value in p1.items():
        np.testing.assert_array_equal(same[key], value, err_msg=key)
    from_workdir.init.from_checkpoint = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="init.from_checkpoint.*no_such_run"):
        experiment.setup(from_workdir, str(tmp_path / "stage2c"))
    experiment.run(exp2)
    exp2.checkpointer.close()
    after = _flat(exp2.state.params)
    labels = _flat(exp2.labels)
    changed = {k for k in after if not np.array_equal(before[k], after[k])}
    for key, label in labels.items():
        if label == FROZEN:
            assert key not in changed, f"frozen param {key} changed"
    trained_groups = {"lora", "pixel_encoder", "prompt_encoder", "action_head"}
    for group in trained_groups:
        assert any(group in k for k in changed), f"nothing in {group} was trained"
    assert all(
        "lora_" in k or k.split("/")[0] in trained_groups | {"action_slots"} for k in changed
    )

    # Inference export: LoRA merged into the kernels gives the same actions.
    from pixelvla_jax import export, runs
    from pixelvla_jax.models.observation import Observation
    from pixelvla_jax.models.pixelvla import PixelVLA

    obs = Observation.fake(2, image_size=56, max_tokens=48, vocab_size=512)
    run = runs.load_run(str(tmp_path / "stage2"))
    assert run.step == 3 and "synthetic_libero" in run.statistics
    expected = PixelVLA(run.model_config).apply(
        {"params": run.params}, obs, method=PixelVLA.predict_actions
    )
    for dtype, atol in (("float32", 1e-5), ("bfloat16", 0.1)):
        out = tmp_path / f"export_{dtype}"
        export.export_inference(str(tmp_path / "stage2"), str(out), dtype=dtype)
        loaded = runs.load_run(str(out))
        assert not loaded.model_config.llama.lora_rules
        assert not any("lora_" in k for k in _flat(loaded.params))
        got = PixelVLA(loaded.model_config).apply(
            {"params": jax.tree.map(lambda x: x.astype("float32"), loaded.params)},
            obs,
            method=PixelVLA.predict_actions,
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=atol, rtol=0)


def test_misspelt_config_key_fails_before_anything_is_built(data_dir, tmp_path):
    cfg = _tiny_config(data_dir)
    with cfg.unlocked():
        cfg.optim.lrr = 1e-3
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.optim\.lrr.*Did you mean 'optim\.lr'"
    ):
        experiment.setup(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_missing_dataset_names_directory_and_command(tmp_path):
    cfg = _tiny_config(tmp_path / "nowhere")
    cfg.data_generator.kind = ""
    with pytest.raises(FileNotFoundError, match="synthetic_libero.*pixelvla_jax.data.convert"):
        experiment.setup(cfg, str(tmp_path / "run"))


def test_episode_holdout_is_disjoint_and_complete():
    from pixelvla_jax.data.splits import EpisodeSubset

    class Source:
        dataset_name = "toy"

        class index:  # noqa: N801
            step_episode = np.repeat(np.arange(7), 3)

        def __getitem__(self, i):
            return int(i)

    train = EpisodeSubset(Source(), 3, held_out=False)
    val = EpisodeSubset(Source(), 3, held_out=True)
    assert sorted(
        [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    ) == list(range(21))
    assert {Source.index.step_episode[val[i]] for i in range(len(val))} == {2, 5}
    with pytest.raises(ValueError, match="holdout_every"):
        EpisodeSubset(Source(), 50, held_out=True)


def test_stage_needs_lora(data_dir):
    cfg = _tiny_config(data_dir, "pixel160k")
    cfg.model.lora.rank = 0
    with pytest.raises(config_lib.ConfigError, match="lora.rank"):
        config_lib.validate_config(cfg)


@pytest.mark.parametrize("head", ["l1", "discrete"])
def test_lm_head_is_trained_only_by_the_discrete_head(head):
    from pixelvla_jax.models.pixelvla import abstract_variables
    from pixelvla_jax.training import optimizer as optimizer_lib

    cfg = config_lib.base_config()
    cfg.model.head = head
    params = abstract_variables(config_lib.model_config(cfg))["params"]
    labels = optimizer_lib.freeze_labels(config_lib.optim_config(cfg), params)
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    lm = {k: v for k, v in flat.items() if k.startswith("llm/lm_head/")}
    assert lm and set(lm.values()) == ({FROZEN} if head == "l1" else {"trained"})
    # Everything else stays trained in the "finetune" stage.
    assert {v for k, v in flat.items() if k not in lm} == {"trained"}
