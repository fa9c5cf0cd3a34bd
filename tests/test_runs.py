"""The one loader of a trained run (`runs.load_run`): checkpoints and exports, relocatable
run directories (the tokenizer is an asset of the checkpoint), old checkpoints without
assets, subset restores onto shardings, clear errors, and light imports."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax import runs
from pixelvla_jax.envs.pixelref import PixelRefEnv
from pixelvla_jax.envs.rollout import episode_seeds
from pixelvla_jax.policy import Policy
from pixelvla_jax.training import config as config_lib


def _config(data_dir, tokenizer_path):
    cfg = config_lib.load_config("pixelref:tiny")
    cfg.data.data_dir = str(data_dir)
    cfg.data.num_threads = 1
    cfg.data.shuffle = False
    cfg.data_generator.num_episodes = 3
    cfg.train.progress = False
    cfg.train.async_checkpoint = True  # the asset is written by the asynchronous commit
    cfg.tokenizer.path = tokenizer_path
    cfg.model.frozen_dtype = "bfloat16"  # the unused LM head (L1 head) is frozen: stored bf16
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, tokenizer path, params): a freshly initialised run's checkpoint at step 0, its
    tokenizer outside the workdir (as a real run's Llama tokenizer would be)."""
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer
    from pixelvla_jax.training import experiment

    root = tmp_path_factory.mktemp("runs")
    tokenizer = str(root / "tokenizers" / "tiny.model")
    os.makedirs(os.path.dirname(tokenizer))
    train_tiny_tokenizer(tokenizer, vocab_size=512)
    exp = experiment.setup(_config(root / "data", tokenizer), str(root / "run"))
    experiment.save_checkpoint(exp, 0)
    exp.checkpointer.wait_until_finished()
    exp.checkpointer.close()
    return str(root / "run"), tokenizer, jax.tree.map(np.asarray, exp.state.params)


def _act(policy):
    envs = [PixelRefEnv(s) for s in episode_seeds(3, 2)]
    images = np.stack([e.image() for e in envs])
    masks = np.stack([e.target_mask() for e in envs])
    return policy.act(images, [e.instruction for e in envs], masks, ["mask", "none"], seed=1)


def test_load_run_reads_everything_a_policy_needs(trained):
    workdir, tokenizer, params = trained
    run = runs.load_run(workdir)
    assert (run.kind, run.step, run.dataset_names) == ("checkpoint", 0, ["pixelref"])
    assert run.path == os.path.join(workdir, "checkpoints")
    assert "action" in run.statistics["pixelref"]
    # The tokenizer is read from the checkpoint's own copy, byte for byte the run's.
    assert run.tokenizer_path == os.path.join(
        workdir, "checkpoints", "0", "assets", "tokenizer.model"
    )
    with open(run.tokenizer_path, "rb") as a, open(tokenizer, "rb") as b:
        assert a.read() == b.read()
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, run.params), params)
    # Frozen leaves come back in the dtype they were trained and saved in.
    assert run.params["llm"]["lm_head"]["kernel"].dtype == jnp.bfloat16
    abstract = runs.abstract_params(run.config)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, run.params)
    # Without params: the same run, nothing restored.
    light = runs.load_run(os.path.join(workdir, "checkpoints"), 0, load_params=False)
    assert light.params is None and light.tokenizer_path == run.tokenizer_path


def test_moved_run_acts_the_same_without_the_original_tokenizer(trained, tmp_path):
    workdir, tokenizer, _ = trained
    here = tmp_path / "here"
    shutil.copytree(workdir, here)
    before = _act(Policy.from_checkpoint(here))
    # Another machine: the run directory somewhere else, the training tokenizer gone.
    hidden = tokenizer + ".gone"
    there = tmp_path / "elsewhere" / "run"
    shutil.move(str(here), str(there))
    os.rename(tokenizer, hidden)
    try:
        assert not os.path.exists(tokenizer) and not here.exists()
        policy = Policy.from_checkpoint(there)
        after = _act(policy)
    finally:
        os.rename(hidden, tokenizer)
    assert policy.tokenizer_path.startswith(str(there))
    np.testing.assert_array_equal(after, before)


def test_export_acts_like_the_checkpoint(trained, tmp_path):
    from pixelvla_jax import export

    workdir, _, _ = trained
    expected = _act(Policy.from_checkpoint(workdir))
    out = tmp_path / "export"
    exported = export.export_inference(workdir, str(out), dtype="float32")
    assert exported.kind == "export" and os.path.isfile(out / "assets" / "tokenizer.model")
    # Relocatable as well: moved, it loads and acts exactly as the training checkpoint.
    moved = tmp_path / "moved_export"
    shutil.move(str(out), str(moved))
    run = runs.load_run(moved)
    assert (run.kind, run.step, run.dataset_names) == ("export", 0, ["pixelref"])
    assert run.tokenizer_path == os.path.join(str(moved), "assets", "tokenizer.model")
    assert {x.dtype for x in jax.tree.leaves(run.params)} == {jnp.dtype("float32")}
    policy = Policy.from_checkpoint(moved)
    assert policy.step == 0
    np.testing.assert_array_equal(_act(policy), expected)
    with pytest.raises(FileNotFoundError, match="holds step 0 only"):
        runs.load_run(moved, step=3)
    with pytest.raises(KeyError, match=r"no statistics for dataset 'libero'.*\['pixelref'\]"):
        Policy.from_checkpoint(moved, dataset_name="libero")


def _write_json_item(item_dir, update):
    path = os.path.join(item_dir, "metadata")  # Orbax's JsonSave file name
    with open(path) as f:
        value = json.load(f)
    value.update(update)
    with open(path, "w") as f:
        json.dump(value, f)


def test_old_checkpoint_without_assets_loads_from_the_recorded_path(trained, tmp_path):
    workdir, tokenizer, _ = trained
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    shutil.rmtree(old / "checkpoints" / "0" / "assets")  # as written before assets existed
    run = runs.load_run(old)
    assert run.tokenizer_path == tokenizer
    np.testing.assert_array_equal(
        _act(Policy.from_checkpoint(old)), _act(Policy.from_checkpoint(workdir))
    )
    # Neither the copy nor the recorded path: the error says which path and what to do.
    _write_json_item(old / "checkpoints" / "0" / "metadata", {"tokenizer": "/gone/tiny.model"})
    with pytest.raises(FileNotFoundError, match=r"no tokenizer asset.*'/gone/tiny.model'.*copy"):
        runs.load_run(old)


def test_params_target_restores_a_subset_onto_shardings(trained, tmp_path):
    from pixelvla_jax import export
    from pixelvla_jax.training.param_rules import path_str

    workdir, _, params = trained
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    seen = {}

    def target(abstract):
        seen["lm_head"] = abstract["llm"]["lm_head"]["kernel"].dtype
        return jax.tree_util.tree_map_with_path(
            lambda p, x: (
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
                if path_str(p).startswith("action_head/")
                else None
            ),
            abstract,
        )

    export_dir = str(tmp_path / "export")
    export.export_inference(workdir, export_dir, dtype="float32")
    for path in (workdir, export_dir):
        run = runs.load_run(path, params_target=target)
        flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(run.params)[0]}
        want = {
            path_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if path_str(p).startswith("action_head/")
        }
        assert want and set(flat) == set(want), path  # skipped leaves are None (not leaves)
        for key, value in want.items():
            assert flat[key].sharding == replicated, key
            np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)
        assert run.params["llm"]["lm_head"]["kernel"] is None
    assert seen["lm_head"] == jnp.float32  # the export's own abstract params (all float32)
    # The training checkpoint's abstract params carry the frozen dtype.
    runs.load_run(workdir, params_target=target)
    assert seen["lm_head"] == jnp.bfloat16
    with pytest.raises(ValueError, match="params_target must return a tree"):
        runs.load_run(workdir, params_target=lambda a: {"action_head": a["action_head"]})


def test_errors_name_the_directory_and_what_to_do(trained, tmp_path):
    workdir, _, _ = trained
    with pytest.raises(FileNotFoundError, match="No checkpoints found.*Nor is it an export"):
        runs.load_run(tmp_path / "nothing_here")
    with pytest.raises(
        FileNotFoundError, match=r"Checkpoint step 7 is not .*complete steps: \[0\]"
    ):
        runs.load_run(workdir, step=7)
    unfinished = tmp_path / "unfinished" / "checkpoints"
    os.makedirs(unfinished / "5")  # a step directory whose save never finished
    with pytest.raises(
        FileNotFoundError, match=rf"No complete checkpoint in {unfinished} .*present: \[5\]"
    ):
        runs.load_run(unfinished.parent)


def test_policy_and_export_import_no_grain_orbax_or_mesh():
    code = (
        "import sys\n"
        "import pixelvla_jax.export, pixelvla_jax.policy, pixelvla_jax.runs\n"
        "heavy = ('grain', 'orbax.checkpoint', 'pixelvla_jax.training.mesh')\n"
        "print([m for m in sys.modules if m.split('.')[0] == 'grain' or m in heavy])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
