"""Ground truth of a LIBERO dataset written by `envs/libero_replay.py`, for the oracle backends.

    truth = LiberoTruth("/data/rlds_pixel/libero_spatial_no_noops")
    annotate_dataset(dataset_dir, out_dir, oracle_backends(truth))
    truth.close()

Every episode of such a dataset names its source in `episode_metadata/file_path` as
`<file>.hdf5#demo_<i>`, which is also its episode id in the annotation pipeline. The truth is
rendered, not read: the simulator of the demo's task (BDDL file, as `libero_replay` finds it)
is set to the demo's recorded MuJoCo state and its segmentation render is cut to the gripper's
geoms (the robot's gripper body subtree: hand and fingers) or to the BDDL target's geoms
(`envs/libero.py`), with the camera, the 180-degree rotation and the resolution of the
dataset's frames.

Dataset step t is the observation before the t-th kept action of the demo (no-op actions
are dropped as `libero_replay.replay_demo` drops them). Step 0 is the demo's first state
(the replay resets to it) and is therefore exact; step t > 0 uses the HDF5's recorded state
before that action, which matches the replayed frame up to the replay's drift (the replay
reproduces recorded states to ~1e-4). The object name of an instruction is the BDDL target's
name (`akita_black_bowl_1`), the same string `libero_replay` writes as `target_object`.

Importing this module does not import the simulator; constructing `LiberoTruth` reads the
HDF5 files and BDDL problems, and the first render creates one `LiberoEnv` per task.
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence

import numpy as np

from pixelvla_jax.data import rlds
from pixelvla_jax.data.registry import DatasetSpec, get_spec
from pixelvla_jax.envs import libero as libero_lib
from pixelvla_jax.envs import libero_replay

# Dataset image key -> simulator camera (libero_replay's layout).
CAMERA_OF_KEY = {
    "observation/image": libero_lib.CAMERA,
    "observation/wrist_image": libero_lib.WRIST_CAMERA,
}


def split_file_path(file_path: str) -> tuple[str, str]:
    """`<file>.hdf5#demo_<i>` (libero_replay's `file_path`) -> (file, demo name)."""
    path, sep, demo = file_path.rpartition("#")
    if not sep or not path or not demo.startswith("demo_"):
        raise ValueError(
            f"episode file_path {file_path!r} is not '<file>.hdf5#demo_<i>'; LiberoTruth needs "
            "a dataset written by `python -m pixelvla_jax.envs.libero_replay`"
        )
    return path, demo


def kept_indices(actions: np.ndarray, drop_noops: bool = True) -> np.ndarray:
    """int [T'] indices of the demo actions `libero_replay.replay_demo` keeps (one per step)."""
    actions = np.asarray(actions, np.float32)
    if not drop_noops:
        return np.arange(len(actions))
    kept: list[int] = []
    for j, action in enumerate(actions):
        prev = actions[kept[-1]] if kept else None
        if not libero_replay.is_noop(action, prev):
            kept.append(j)
    return np.asarray(kept, np.int64)


def gripper_geoms(domain_env) -> np.ndarray:
    """int [K] geom ids of the robot's gripper (the body subtree of its root: hand, fingers)."""
    model = domain_env.sim.model
    root = domain_env.robots[0].gripper.root_body
    shim = types.SimpleNamespace(obj_body_id={root: model.body_name2id(root)}, sim=domain_env.sim)
    return libero_lib.object_geoms(shim, root)


class LiberoTruth:
    """GroundTruth (oracle.py) of a dataset written by `libero_replay` from LIBERO HDF5 demos.

    Args:
      dataset_dir: the RLDS dataset (version folder or its parent).
      camera_key: the dataset image key the pipeline annotates (default: the spec's image key,
        `observation/image` = agentview); masks are rendered from that key's camera.
      name / spec: registry name (default: the dataset's TFDS name) or an explicit spec.
      drop_noops: must match how the dataset was written (libero_replay's default: True).
      bddl: the task's BDDL file for every HDF5 file (default: found as libero_replay does).
      hdf5_dir: where to look for an HDF5 file whose recorded path no longer exists (by name).
    Masks are bool [R, R] in the dataset's orientation (rotated 180 deg), R = its frame size.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        *,
        camera_key: str | None = None,
        name: str | None = None,
        spec: DatasetSpec | None = None,
        split: str = "train",
        drop_noops: bool = True,
        bddl: str = "",
        hdf5_dir: str | os.PathLike | None = None,
    ):
        from pixelvla_jax.annotate.runner import EpisodeReader

        source = rlds.open_rlds(dataset_dir, split)
        spec = spec or get_spec(name or source.name)
        if not spec.episode_id_key:
            raise ValueError(f"dataset spec {spec.name!r} has no episode_id_key (file_path)")
        reader = EpisodeReader(source, spec, camera_key)
        if reader.camera not in CAMERA_OF_KEY:
            raise ValueError(
                f"camera key {reader.camera!r} is not a LIBERO camera of libero_replay's layout; "
                f"use one of {sorted(CAMERA_OF_KEY)}"
            )
        self.camera = CAMERA_OF_KEY[reader.camera]
        self.drop_noops = drop_noops
        self._hdf5_dir = os.fspath(hdf5_dir) if hdf5_dir is not None else None
        # Episode ids exactly as the runner computes them (runner.episode_ids).
        raw = [reader.episode_id(i) for i in range(len(source))]
        ids = raw if len(set(raw)) == len(raw) else [f"{i}:{e}" for i, e in enumerate(raw)]
        self.resolution: int | None = None
        self.names: dict[str, str] = {}
        self._episodes: dict[str, tuple[str, str]] = {}  # id -> (hdf5 file, demo)
        self._files: dict[str, dict] = {}  # hdf5 file -> {bddl, target, demos}
        for i, eid in enumerate(ids):
            path, demo = split_file_path(raw[i])  # the id is episode_metadata/file_path
            path = self._find_file(path)
            self._episodes[eid] = (path, demo)
            info = self._file(path, bddl)
            if demo not in info["demos"]:
                raise KeyError(f"{path} has no {demo} (episode {eid}); demos: {info['demos']}")
            ep = reader.read(i, eid)
            if len(ep.gripper) == 0:
                continue
            self.names[ep.instruction] = info["target"]
            if self.resolution is None:
                h, w = ep.frame(0).shape[:2]
                if h != w:
                    raise ValueError(f"LIBERO frames are square; {reader.camera} is {h}x{w}")
                self.resolution = int(h)
        self.resolution = self.resolution or libero_lib.RESOLUTION
        self._kept: dict[str, np.ndarray] = {}
        self._envs: dict[str, libero_lib.LiberoEnv] = {}
        self._geoms: dict[tuple[str, str], np.ndarray] = {}
        self._cache: dict[tuple[str, str, int], np.ndarray | None] = {}

    # ------------------------------------------------------------------ sources

    def _find_file(self, path: str) -> str:
        if os.path.isfile(path):
            return path
        if self._hdf5_dir is not None:
            moved = os.path.join(self._hdf5_dir, os.path.basename(path))
            if os.path.isfile(moved):
                return moved
        raise FileNotFoundError(
            f"source HDF5 {path} of the dataset is missing; pass hdf5_dir= the folder it is in now"
        )

    def _file(self, path: str, bddl: str) -> dict:
        if path not in self._files:
            meta, demos = libero_replay.read_demos(path)
            bddl_file = libero_replay.task_bddl(meta, path, bddl)
            self._files[path] = {
                "bddl": bddl_file,
                "target": libero_lib.target_object(bddl_file),
                "demos": {d: (actions, states) for d, actions, states in demos},
            }
        return self._files[path]

    def _env(self, bddl_file: str) -> libero_lib.LiberoEnv:
        if bddl_file not in self._envs:
            task = libero_lib.LiberoTask(
                suite="", task_id=-1, name=os.path.basename(bddl_file)[:-5], language="",
                bddl_file=bddl_file, init_states=np.zeros((0, 0)),
            )  # fmt: skip
            env = libero_lib.LiberoEnv(task, resolution=self.resolution, cameras=(self.camera,))
            env.env.reset()  # once; later renders only set the MuJoCo state
            self._envs[bddl_file] = env
        return self._envs[bddl_file]

    def _state(self, episode_id: str, step: int) -> tuple[str, np.ndarray] | None:
        if episode_id not in self._episodes or step < 0:
            return None
        path, demo = self._episodes[episode_id]
        info = self._files[path]
        actions, states = info["demos"][demo]
        if episode_id not in self._kept:
            self._kept[episode_id] = kept_indices(actions, self.drop_noops)
        kept = self._kept[episode_id]
        if step >= len(kept):
            return None
        # The replay starts from the demo's first state, whatever no-ops it skips.
        return info["bddl"], states[0 if step == 0 else kept[step]]

    # ------------------------------------------------------------------ rendering

    def _render(self, episode_id: str, step: int, what: str) -> np.ndarray | None:
        key = (episode_id, what, step)
        if key in self._cache:
            return self._cache[key]
        found = self._state(episode_id, step)
        mask = None
        if found is not None:
            bddl_file, state = found
            env = self._env(bddl_file)
            if (bddl_file, what) not in self._geoms:
                domain = env.env.env
                self._geoms[bddl_file, what] = (
                    gripper_geoms(domain)
                    if what == "gripper"
                    else libero_lib.object_geoms(domain, libero_lib.target_object(bddl_file))
                )
            env.sim.set_state_from_flattened(np.asarray(state, np.float64))
            env.sim.forward()
            mask = env.geom_mask(self._geoms[bddl_file, what], self.camera)
        self._cache[key] = mask
        return mask

    # ------------------------------------------------------------------ GroundTruth

    def gripper_mask(self, episode_id: str, step: int) -> np.ndarray | None:
        """bool [R, R]: the gripper's pixels on dataset step `step` (None: unknown step)."""
        return self._render(episode_id, step, "gripper")

    def target_mask(self, episode_id: str) -> np.ndarray | None:
        """bool [R, R]: the BDDL target's pixels on the episode's first frame."""
        return self._render(episode_id, 0, "target")

    def object_name(self, instruction: str) -> str | None:
        return self.names.get(instruction)

    def target_object(self, episode_id: str) -> str:
        return self._files[self._episodes[episode_id][0]]["target"]

    def target_centre(self, episode_id: str) -> tuple[float, float]:
        """(x, y) pixel coordinates of the first-frame target mask's centroid."""
        ys, xs = np.nonzero(self.target_mask(episode_id))
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)

    @property
    def episode_ids(self) -> Sequence[str]:
        return list(self._episodes)

    def close(self) -> None:
        envs, self._envs = self._envs, {}
        for env in envs.values():
            env.close()

    def __enter__(self) -> LiberoTruth:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
