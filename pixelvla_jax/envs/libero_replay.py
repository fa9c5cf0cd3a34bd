"""LIBERO demonstrations -> RLDS ArrayRecord dataset with per-step target-object masks.

    python -m pixelvla_jax.envs.libero_replay \
        --hdf5=/data/libero/libero_spatial --out=/data/rlds_pixel --name=libero_spatial_no_noops

Replays every demo of the original LIBERO HDF5 files (`data/demo_<i>/{actions, states}` with
`data.attrs["problem_info"]` / `["bddl_file_name"]`) in the simulator at 256x256, as OpenVLA's
`regenerate_libero_dataset.py` does: the env is reset to the demo's first state; a no-op action
(|dpos, drot| < 1e-4 and the gripper command unchanged; the first action counts if it is still)
is dropped; the observation before each kept action is recorded; a demo whose replay does not
reach the goal is dropped. Each kept step also gets the target object's mask (segmentation
render; the target from the BDDL goal, `envs/libero.py`).

The dataset has the feature layout of `modified_libero_rlds` (`observation/image`,
`wrist_image` 256x256 JPEG rotated 180 deg, `state` [8] = eef pos + axis-angle + gripper qpos,
`joint_state` [7], `action` [7] in LIBERO's convention, language, flags) plus the pixel
annotations of `data/annotations.py` (`episode_metadata/target_mask` = first frame,
`observation/target_mask` per step). Named like OpenVLA's datasets (libero_<suite>_no_noops)
it is picked up by the registry as is (point `data.data_dir` at `--out`); another name needs
`registry.register_spec(registry.spec_for_format("libero", name))`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pixelvla_jax.envs import libero as libero_lib

log = logging.getLogger(__name__)

NOOP_THRESHOLD = 1e-4


def is_noop(action: np.ndarray, prev_action: np.ndarray | None = None) -> bool:
    """OpenVLA's no-op test: no motion and (if there is a previous action) the same gripper."""
    action = np.asarray(action)
    still = float(np.linalg.norm(action[:-1])) < NOOP_THRESHOLD
    if prev_action is None:
        return still
    return still and action[-1] == np.asarray(prev_action)[-1]


def hdf5_files(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated paths, globs or directories (all *.hdf5 inside) -> sorted files."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if os.path.isdir(item):
            files += sorted(glob.glob(os.path.join(item, "*.hdf5")))
        elif any(c in item for c in "*?["):
            files += sorted(glob.glob(item))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"--hdf5: {item} is not a file, directory or glob match")
    if not files:
        raise FileNotFoundError(f"--hdf5={spec!r} matched no .hdf5 files")
    return files


def _attr_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_demos(path: str) -> tuple[dict[str, str], list[tuple[str, np.ndarray, np.ndarray]]]:
    """A LIBERO HDF5 file -> ({"language", "bddl"}, [(demo name, actions [T, 7], states [T, D])])."""
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: no 'data' group; is this a LIBERO demonstration file?")
        data = f["data"]
        attrs = {k: _attr_text(v) for k, v in data.attrs.items()}
        names = sorted((k for k in data if k.startswith("demo_")), key=lambda k: int(k[5:]))
        demos = []
        for name in names:
            for key in ("actions", "states"):
                if key not in data[name]:
                    raise KeyError(f"{path}: {name} has no {key!r} (it needs simulator states)")
            demos.append(
                (name, np.asarray(data[name]["actions"]), np.asarray(data[name]["states"]))
            )
    problem = json.loads(attrs.get("problem_info", "{}") or "{}")
    meta = {
        "language": problem.get("language_instruction", ""),
        "bddl": attrs.get("bddl_file_name", ""),
    }
    return meta, demos


def task_bddl(meta: dict, path: str, bddl: str) -> str:
    """The BDDL file of a demo file: `bddl` if given, else the one its metadata names (found in
    the installed LIBERO when the recorded path is gone), else the one named like the file."""
    if bddl:
        return bddl
    if meta["bddl"] and os.path.isfile(meta["bddl"]):
        return meta["bddl"]
    if meta["bddl"]:
        return libero_lib.find_bddl(meta["bddl"])
    stem = os.path.basename(path).removesuffix(".hdf5").removesuffix("_demo")
    return libero_lib.find_bddl(stem)


def replay_demo(
    env: libero_lib.LiberoEnv, actions: np.ndarray, states: np.ndarray, drop_noops: bool = True
) -> dict[str, Any]:
    """Replays one demo; returns {"steps": [...], "success", "noops"}.

    Each step: image, wrist_image (rotated, uint8 [R, R, 3]), mask (bool [R, R]), state [8],
    joint_state [7], action [7], sim_state (flattened MuJoCo state before the action).
    """
    env.reset(state=states[0])
    steps, kept_actions, noops, done = [], [], 0, False
    for action in np.asarray(actions, np.float32):
        prev = kept_actions[-1] if kept_actions else None
        if drop_noops and is_noop(action, prev):
            noops += 1
            continue
        steps.append(
            {
                "image": env.image(),
                "wrist_image": env.wrist_image(),
                "mask": env.target_mask(),
                **env.proprio(),
                "action": action,
                "sim_state": env.get_state(),
            }
        )
        kept_actions.append(action)
        _, _, done, _ = env.step(action)
    return {"steps": steps, "success": bool(done or env.success()), "noops": noops}


def to_rlds_episode(replay: dict, instruction: str, file_path: str, target: str) -> dict:
    """A replay -> an episode dict for `data.generate.write_rlds_dataset` (LIBERO + masks)."""
    from pixelvla_jax.data import annotations as ann

    steps = replay["steps"]
    out = []
    for t, s in enumerate(steps):
        last = t == len(steps) - 1
        out.append(
            {
                "observation": {
                    "image": s["image"],
                    "wrist_image": s["wrist_image"],
                    "state": s["state"],
                    "joint_state": s["joint_state"],
                    "target_mask": ann.encode_mask_png(s["mask"]),
                },
                "action": np.asarray(s["action"], np.float32),
                "language_instruction": instruction,
                "reward": np.float32(last),
                "discount": np.float32(1.0),
                "is_first": t == 0,
                "is_last": last,
                "is_terminal": last,
            }
        )
    first = steps[0]["mask"]
    return {
        "steps": out,
        "episode_metadata": {
            "file_path": file_path,
            "target_mask": ann.encode_mask_png(first),
            "target_object": target,
            "gripper_box": np.zeros(4, np.float32),
            "has_annotation": bool(first.any()),
        },
    }


def replay_files(
    hdf5: str | Sequence[str],
    out_dir: str,
    name: str,
    *,
    bddl: str = "",
    drop_failed: bool = True,
    drop_noops: bool = True,
    max_demos: int | None = None,
    resolution: int = libero_lib.RESOLUTION,
    progress: bool = True,
) -> tuple[str, dict[str, int]]:
    """Replays the demos of `hdf5` files and writes the dataset `out_dir/name/1.0.0`.

    Args:
      hdf5: files / directories / globs (see `hdf5_files`); one LIBERO task per file.
      bddl: the task's BDDL file (default: from the file's attributes or name).
      drop_failed / drop_noops: OpenVLA's regeneration filters (keep both for training data).
      max_demos: per file (for quick looks).
    Returns:
      (dataset version dir, {"files", "demos", "kept", "failed", "noops", "steps"}).
    """
    from tqdm import tqdm

    from pixelvla_jax.data import generate

    files = hdf5_files(hdf5)
    stats = {"files": len(files), "demos": 0, "kept": 0, "failed": 0, "noops": 0, "steps": 0}

    def episodes() -> Iterator[dict]:
        for path in files:
            meta, demos = read_demos(path)
            demos = demos[:max_demos] if max_demos else demos
            bddl_file = task_bddl(meta, path, bddl)
            problem = libero_lib.parse_problem(bddl_file)
            instruction = meta["language"] or problem["language_instruction"]
            if isinstance(instruction, list):
                instruction = " ".join(instruction)
            task = libero_lib.LiberoTask(
                suite="", task_id=-1, name=os.path.basename(bddl_file)[:-5],
                language=instruction, bddl_file=bddl_file, init_states=np.zeros((0, 0)),
            )  # fmt: skip
            env = libero_lib.LiberoEnv(task, resolution=resolution)
            try:
                for demo, actions, states in tqdm(
                    demos, desc=os.path.basename(path), disable=not progress
                ):
                    replay = replay_demo(env, actions, states, drop_noops)
                    stats["demos"] += 1
                    stats["noops"] += replay["noops"]
                    if not replay["success"]:
                        stats["failed"] += 1
                        if drop_failed:
                            log.info("%s %s: replay does not succeed; dropped", path, demo)
                            continue
                    if not replay["steps"]:
                        continue
                    stats["kept"] += 1
                    stats["steps"] += len(replay["steps"])
                    yield to_rlds_episode(replay, instruction, f"{path}#{demo}", env.target)
            finally:
                env.close()

    features = generate.rlds_features(
        "libero", (resolution, resolution), with_annotations=True, per_step_mask=True
    )
    path = generate.write_rlds_dataset(
        out_dir,
        name,
        episodes(),
        features,
        description="LIBERO demos replayed at 256 px (no-ops and failed demos dropped) with "
        "per-step target-object masks from the simulator's segmentation.",
    )
    return path, stats


def main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    path, stats = replay_files(
        f.hdf5,
        f.out,
        f.name,
        bddl=f.bddl,
        drop_failed=not f.keep_failed,
        drop_noops=not f.keep_noops,
        max_demos=f.max_demos or None,
    )
    print(f"wrote {path}: {json.dumps(stats)}")


if __name__ == "__main__":
    from absl import flags

    from pixelvla_jax import cli

    flags.DEFINE_string(
        "hdf5", None, "LIBERO demo files: paths, globs or directories (comma list)."
    )
    flags.DEFINE_string("out", None, "TFDS data dir the dataset is written into.")
    flags.DEFINE_string("name", None, "Dataset name, e.g. libero_spatial_no_noops.")
    flags.DEFINE_string("bddl", "", "BDDL file of the task (default: from the HDF5 attributes).")
    flags.DEFINE_bool("keep_failed", False, "Keep demos whose replay does not succeed.")
    flags.DEFINE_bool("keep_noops", False, "Keep no-op actions.")
    flags.DEFINE_integer("max_demos", 0, "Replay at most this many demos per file (0: all).")
    flags.mark_flags_as_required(["hdf5", "out", "name"])
    cli.run(main)
