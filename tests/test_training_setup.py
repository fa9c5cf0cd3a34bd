"""Training setup: one builder for training and memory plans, weight loaders, throughput logs."""

import dataclasses

import chex
import jax
import pytest

from pixelvla_jax.training import builder, experiment, memory_plan, weight_loaders
from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training.param_rules import path_str


def _tiny_config(data_dir):
    cfg = config_lib.use_tiny(config_lib.base_config(), num_steps=3)
    cfg.data.data_dir = str(data_dir)
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 3
    cfg.data_generator.episode_length = 12
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.train.peak_flops = 1e12
    return cfg


def _flat(tree):
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`memory_plan.abstract_step` and `experiment.setup` of one config, with every
    `make_train_step` call the builder makes recorded; then a checkpoint of the run."""
    root = tmp_path_factory.mktemp("setup")
    cfg = _tiny_config(root / "data")
    calls = []
    real = builder.make_train_step

    def spy(*args, **kwargs):
        step = real(*args, **kwargs)
        calls.append((kwargs, step))
        return step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "make_train_step", spy)
        planned = memory_plan.abstract_step(cfg)
        exp = experiment.setup(cfg, str(root / "run"))
    experiment.save_checkpoint(exp, 0)
    exp.checkpointer.wait_until_finished()
    yield cfg, planned, exp, calls, str(root / "run")
    exp.checkpointer.close()


def test_training_and_memory_plan_use_the_one_builder(built):
    _, planned, exp, calls, _ = built
    assert memory_plan.abstract_step is builder.build_step
    assert [step for _, step in calls] == [planned.train_step, exp.train_step]
    expected = sharding_lib.batch_sharding(exp.mesh, exp.rules)
    for kwargs, _ in calls:
        assert kwargs["batch_sharding"] == expected
    # What is planned is what trains: the same abstract state, shardings and labels.
    assert jax.tree.structure(planned.state) == jax.tree.structure(exp.state)
    for want, got in zip(jax.tree.leaves(planned.state), jax.tree.leaves(exp.state), strict=True):
        assert (want.shape, want.dtype, want.sharding) == (got.shape, got.dtype, got.sharding)
    assert planned.labels == exp.labels


def test_run_logs_throughput_of_the_steps_run(built):
    cfg, _, exp, _, _ = built
    cfg.train.log_every = 2  # logs at step 2 and at the end (a window of 1 step)
    history = experiment.run(exp)
    assert len(history) == 3
    logged = [h for h in history if "steps_per_s" in h]
    assert len(logged) == 2
    tokens = exp.tokens_per_example * cfg.data.batch_size
    for h in logged:
        assert h["steps_per_s"] > 0 and h["mfu"] > 0
        assert h["tokens_per_s"] == pytest.approx(tokens * h["steps_per_s"], rel=1e-9)


def test_loaders_from_config_in_order():
    cfg = config_lib.base_config()
    assert weight_loaders.loaders_from_config(cfg) == []
    cfg.init.from_checkpoint = "runs/stage1"
    cfg.init.openvla_checkpoint = "hf/openvla-7b"
    loaders = weight_loaders.loaders_from_config(cfg)
    assert [type(x) for x in loaders] == [
        weight_loaders.OpenVLAWeightLoader,
        weight_loaders.PreviousRunWeightLoader,
    ]
    assert all(isinstance(x, weight_loaders.WeightLoader) for x in loaders)
    assert loaders[1].path == "runs/stage1"


def test_previous_run_loader_copies_the_params_that_match(built):
    from pixelvla_jax import runs

    cfg, _, _, _, workdir = built
    saved = _flat(jax.device_get(runs.load_run(workdir).params))  # the newest, as the loader
    # Another model: LoRA adds leaves the run lacks, a shorter chunk changes the slots' shape.
    other = cfg.copy_and_resolve_references()
    other.stage = "pue"
    other.model.lora.rank = 4
    other.model.chunk_size = 4
    other.data.action_chunk = 4
    other.seed = 1
    step = builder.build_step(other)
    fresh = jax.jit(step.init_fn, out_shardings=step.shardings)(step.rng).params
    loaded = weight_loaders.PreviousRunWeightLoader(workdir).load(fresh)

    new, out = _flat(jax.device_get(fresh)), _flat(jax.device_get(loaded))
    copied = {k for k in new if k in saved and saved[k].shape == new[k].shape}
    kept = set(new) - copied
    assert any("lora_" in k for k in kept) and "action_slots" in kept
    assert len(copied) > len(kept)
    chex.assert_trees_all_close({k: out[k] for k in copied}, {k: saved[k] for k in copied})
    chex.assert_trees_all_close({k: out[k] for k in kept}, {k: new[k] for k in kept})
    chex.assert_trees_all_equal_shapes_and_dtypes(loaded, fresh)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh), strict=True):
        assert a.sharding == b.sharding


def test_previous_run_loader_names_the_config_key(tmp_path):
    cfg = config_lib.base_config()
    cfg.init.from_checkpoint = str(tmp_path / "missing")
    (loader,) = weight_loaders.loaders_from_config(cfg)
    with pytest.raises(FileNotFoundError, match=r"config\.init\.from_checkpoint=.*missing"):
        loader.load({})


def test_a_missing_init_source_fails_before_the_state_is_initialised(built, tmp_path, monkeypatch):
    cfg = built[0].copy_and_resolve_references()
    cfg.init.from_checkpoint = str(tmp_path / "no_such_run")
    real = builder.build_step

    def build_step(*args, **kwargs):  # the state's init must not run (nor compile)
        def init_fn(rng):
            raise AssertionError("the state was initialised before the init sources were checked")

        step = real(*args, **kwargs)
        return dataclasses.replace(step, init_fn=init_fn)

    monkeypatch.setattr(builder, "build_step", build_step)
    with pytest.raises(FileNotFoundError, match=r"config\.init\.from_checkpoint=.*no_such_run"):
        experiment.setup(cfg, str(tmp_path / "run"))
    # Each loader's own check names its setting; an existing source passes.
    for key in ("openvla_checkpoint", "pi0_checkpoint", "from_checkpoint"):
        one = config_lib.base_config()
        setattr(one.init, key, str(tmp_path / "missing"))
        (loader,) = weight_loaders.loaders_from_config(one)
        with pytest.raises(FileNotFoundError, match=rf"config\.init\.{key}=.*missing"):
            loader.check()
        setattr(one.init, key, str(tmp_path))
        weight_loaders.loaders_from_config(one)[0].check()
