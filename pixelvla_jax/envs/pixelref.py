"""PixelRef: a procedural referring-manipulation task where language alone is ambiguous.

A top-down tabletop (numpy, rendered to RGB at `image_size` px) holds 3-6 objects drawn
from a few colours and shapes, and a gripper. The instruction names the target by colour
and shape ("pick up the red square"), but the scene always holds at least one look-alike
(another red square): only a pixel mask or a visual prompt says which one is meant. A
policy that cannot see the pixel input succeeds at best with probability
1 / (number of look-alikes + 1) (`env.chance`). Where there is room, another kind also
appears twice (`decoy_pair`), so only the instruction says which kind is meant.

Coordinates: the workspace is [0, 1]^2, x to the right, y down the image; a pixel
(row r, col c) covers the point ((c + 0.5) / S, (r + 0.5) / S).

Actions follow the LIBERO convention, float [7]: (dx, dy, dz, drx, dry, drz, gripper) with
translation deltas in workspace units (clipped to `max_step` per axis; dz and the rotation
deltas are unused), gripper -1 = open, +1 = close. Closing grasps the object whose centre is
nearest to the gripper if it lies within `grasp_radius`, and ends the episode; success =
the grasped object is the target.

The scripted expert (`expert_action`) moves straight to the target and closes when within
`close_distance`. Demonstrations are collected DART-style: the executed action carries
Gaussian noise (`expert_noise`), the recorded label is the expert's clean correction from
wherever the noise led, so the data covers the off-centre states a learned policy reaches.
`generate_dataset` writes expert episodes as an RLDS ArrayRecord dataset in the LIBERO
layout with the pixel-annotation features (episode-level target mask, object name, and the
referred-objects mask: the target and its look-alikes), registered in the dataset registry
as "pixelref".

    env = PixelRefEnv(seed=3)
    while not env.done:
        env.step(env.expert_action(rng))
    env.success  # True
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DATASET_NAME = "pixelref"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 195, 35),
}
SHAPES = ("square", "circle", "triangle")
# Colour-shape kinds never named as the target in training (they do appear as other
# objects, and their colours and shapes are targets in other kinds): the held-out split
# (`EVAL_SPLITS`) names only these, so it measures whether a policy follows the pixel input
# to an object kind it was never asked for.
HELD_OUT_TARGETS = ("blue triangle", "yellow circle")
TARGET_SPLITS = ("seen", "held_out")
BACKGROUND = (196, 184, 160)
GRIPPER_COLOUR = (25, 25, 25)


@dataclasses.dataclass(frozen=True)
class PixelRefConfig:
    """Scene, dynamics and expert parameters (workspace units unless stated)."""

    image_size: int = 56  # rendered frame side, px (the tiny model's input size)
    grid: int = 4  # objects and the gripper start on cells of a grid x grid layout
    min_objects: int = 3
    max_objects: int = 6
    max_lookalikes: int = 2  # look-alikes of the target besides it (>= 1 always)
    # Where two or more objects remain to place, two of them share another kind (a decoy
    # pair), so that the scene alone does not tell which kind is meant: only the
    # instruction does. Without it the named kind is, in most scenes, the only kind seen
    # twice, a visual shortcut that spares a policy reading the instruction.
    decoy_pair: bool = True
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    object_radius: float = 0.075
    gripper_size: float = 0.06  # half side of the drawn gripper
    max_step: float = 0.25  # per axis and step (one grid cell)
    grasp_radius: float = 0.12  # < half a cell: at most one object in reach
    close_distance: float = 0.07  # the expert closes within this distance (< grasp_radius)
    expert_noise: float = 0.03  # std of the translation noise executed while demonstrating
    max_steps: int = 32
    hold_steps: int = 1  # dataset: closed-gripper steps recorded after the grasp
    # Which kinds the target is drawn from: "seen" = every colour-shape kind but
    # `held_out_targets` (training data and the in-distribution evaluation), "held_out" =
    # only those.
    target_split: str = "seen"
    held_out_targets: tuple[str, ...] = HELD_OUT_TARGETS

    def __post_init__(self):
        if not 1 <= self.max_lookalikes <= self.max_objects - 1:
            raise ValueError(
                f"PixelRefConfig: max_lookalikes={self.max_lookalikes} must be in "
                f"[1, max_objects - 1 = {self.max_objects - 1}]."
            )
        if self.max_objects + 1 > self.grid * self.grid:
            raise ValueError(
                f"PixelRefConfig: {self.max_objects} objects + the gripper do not fit a "
                f"{self.grid} x {self.grid} grid."
            )
        if self.min_objects < 2 or self.min_objects > self.max_objects:
            raise ValueError(
                f"PixelRefConfig: need 2 <= min_objects <= max_objects, got "
                f"{self.min_objects}, {self.max_objects}."
            )
        if self.target_split not in TARGET_SPLITS:
            raise ValueError(
                f"PixelRefConfig: target_split={self.target_split!r}; use one of {TARGET_SPLITS}."
            )
        known = {f"{c} {s}" for c in COLOURS for s in SHAPES}
        if set(self.held_out_targets) - known:
            raise ValueError(
                f"PixelRefConfig: held_out_targets {sorted(set(self.held_out_targets) - known)} "
                f"are not colour-shape kinds ('<colour> <shape>' of {list(COLOURS)}, {SHAPES})."
            )
        if not self.target_kinds():
            raise ValueError(
                f"PixelRefConfig: no {self.target_split!r} target kinds with colours "
                f"{self.colours}, shapes {self.shapes} and held_out_targets "
                f"{self.held_out_targets}."
            )
        unknown = sorted(set(self.colours) - set(COLOURS)) + sorted(set(self.shapes) - set(SHAPES))
        if unknown:
            raise ValueError(
                f"PixelRefConfig: unknown colours/shapes {unknown}; known {list(COLOURS)}, {SHAPES}."
            )

    def target_kinds(self) -> list[tuple[str, str]]:
        """(colour, shape) kinds the target is drawn from (`target_split`)."""
        held_out = self.target_split == "held_out"
        return [
            (c, s)
            for c in self.colours
            for s in self.shapes
            if (f"{c} {s}" in self.held_out_targets) == held_out
        ]


@dataclasses.dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: float
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


# ------------------------------------------------------------------ rendering


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size
    return c[None, :], c[:, None]  # x [1, S], y [S, 1]


def shape_mask(obj: SceneObject, size: int, radius: float) -> np.ndarray:
    """bool [S, S]: the pixels whose centres lie inside the object's shape."""
    x, y = _pixel_centres(size)
    dx, dy = x - obj.x, y - obj.y
    if obj.shape == "square":
        r = radius * 0.85
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    # Upward triangle inscribed in the circle of `radius`: apex on top (y down the image).
    top, base = -radius, radius * 0.6
    half_width = (dy - top) / (base - top) * radius * 0.95
    return (dy >= top) & (dy <= base) & (np.abs(dx) <= half_width)


def gripper_mask(x: float, y: float, closed: bool, size: int, half: float) -> np.ndarray:
    """bool [S, S]: the gripper seen from above, a hollow square (open) or a solid one (closed)."""
    px, py = _pixel_centres(size)
    dx, dy = np.abs(px - x), np.abs(py - y)
    if closed:
        return (dx <= half * 0.6) & (dy <= half * 0.6)
    thickness = max(1.2 / size, half * 0.3)
    outer = (dx <= half) & (dy <= half)
    return outer & ~((dx <= half - thickness) & (dy <= half - thickness))


# ------------------------------------------------------------------ scenes


def sample_scene(
    rng: np.random.Generator, cfg: PixelRefConfig
) -> tuple[list[SceneObject], int, tuple[float, float]]:
    """(objects, target index, gripper start) with >= 1 look-alike of the target.

    Objects and the gripper start on distinct cells of a `grid` x `grid` layout (cell
    centres), so that with the default sizes every object and the gripper fall inside one
    ViT patch of the tiny model.
    """
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_look = int(rng.integers(1, min(cfg.max_lookalikes, n - 1) + 1))
    target_kinds = cfg.target_kinds()
    colour, shape = target_kinds[int(rng.integers(len(target_kinds)))]
    kinds = [(colour, shape)] * (1 + n_look)
    others = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) != (colour, shape)]
    if cfg.decoy_pair and n - len(kinds) >= 2:
        kinds += [others[int(rng.integers(len(others)))]] * 2
    for _ in range(n - len(kinds)):
        kinds.append(others[int(rng.integers(len(others)))])
    cells = rng.permutation(cfg.grid * cfg.grid)[: n + 1]
    centre = lambda cell: ((cell % cfg.grid + 0.5) / cfg.grid, (cell // cfg.grid + 0.5) / cfg.grid)  # noqa: E731
    order = rng.permutation(n)
    objects = [SceneObject(*kinds[k], *centre(cells[i])) for i, k in enumerate(order)]
    target = int(np.flatnonzero(order == 0)[0])
    return objects, target, centre(cells[n])


class PixelRefEnv:
    """One seeded PixelRef episode (see module docstring). Deterministic for a seed."""

    def __init__(self, seed: int, config: PixelRefConfig | None = None):
        self.cfg = config or PixelRefConfig()
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 0x9E3779B9])
        self.objects, self.target, start = sample_scene(rng, self.cfg)
        self.gripper = np.asarray(start, np.float64)
        self.closed = False
        self.grasped: int | None = None
        self.steps = 0
        self.done = False
        self.success = False
        size, radius = self.cfg.image_size, self.cfg.object_radius
        self._masks = [shape_mask(o, size, radius) for o in self.objects]
        self._scene = np.empty((size, size, 3), np.uint8)
        self._scene[:] = BACKGROUND
        for obj, mask in zip(self.objects, self._masks):
            self._scene[mask] = COLOURS[obj.colour]

    # --- what a policy sees --------------------------------------------------------------

    @property
    def target_object(self) -> SceneObject:
        return self.objects[self.target]

    @property
    def instruction(self) -> str:
        return f"pick up the {self.target_object.name}"

    @property
    def max_steps(self) -> int:
        return self.cfg.max_steps

    @property
    def lookalikes(self) -> list[int]:
        """Indices of the other objects with the target's colour and shape."""
        t = self.target_object
        return [
            i
            for i, o in enumerate(self.objects)
            if i != self.target and (o.colour, o.shape) == (t.colour, t.shape)
        ]

    @property
    def chance(self) -> float:
        return 1.0 / (1 + len(self.lookalikes))

    @property
    def outcome(self) -> str:
        """How the episode ended: "target", "look-alike", "other object" (grasped),
        "nothing" (closed on no object), "timeout", or "running"."""
        if not self.done:
            return "running"
        if not self.closed:
            return "timeout"
        if self.grasped is None:
            return "nothing"
        if self.grasped == self.target:
            return "target"
        return "look-alike" if self.grasped in self.lookalikes else "other object"

    def object_mask(self, index: int) -> np.ndarray:
        """uint8 [S, S]: the full (unoccluded) mask of object `index`."""
        return self._masks[index].astype(np.uint8)

    def target_mask(self) -> np.ndarray:
        """uint8 [S, S]: exactly the target object's pixels (the oracle pixel input)."""
        return self.object_mask(self.target)

    def referred_mask(self) -> np.ndarray:
        """uint8 [S, S]: every object the instruction fits (the target and its look-alikes),
        what language alone singles out: the patch-grounding target."""
        mask = self.target_mask()
        for i in self.lookalikes:
            mask = mask | self.object_mask(i)
        return mask

    def image(self) -> np.ndarray:
        """uint8 [S, S, 3]: the scene with the gripper drawn on top."""
        frame = self._scene.copy()
        if self.grasped is not None:  # the grasped object is held in the closed gripper
            frame[self._masks[self.grasped]] = BACKGROUND
        g = gripper_mask(*self.gripper, self.closed, self.cfg.image_size, self.cfg.gripper_size)
        frame[g] = GRIPPER_COLOUR
        return frame

    # --- dynamics ------------------------------------------------------------------------

    def step(self, action: np.ndarray) -> bool:
        """Applies one LIBERO-convention action [7]; returns `done`."""
        action = np.asarray(action, np.float64)
        if action.shape != (7,):
            raise ValueError(f"PixelRefEnv.step: action must have shape (7,), got {action.shape}.")
        if self.done:
            return True
        delta = np.clip(np.nan_to_num(action[:2]), -self.cfg.max_step, self.cfg.max_step)
        self.gripper = np.clip(self.gripper + delta, 0.0, 1.0)
        self.steps += 1
        if action[6] > 0:
            self.closed = True
            centres = np.array([(o.x, o.y) for o in self.objects])
            dist = np.hypot(*(centres - self.gripper).T)
            nearest = int(np.argmin(dist))
            if dist[nearest] <= self.cfg.grasp_radius:
                self.grasped = nearest
            self.success = self.grasped == self.target
            self.done = True
        elif self.steps >= self.cfg.max_steps:
            self.done = True
        return self.done

    def expert_action(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """The scripted expert's next action (LIBERO convention); with `rng`, translation
        noise of std `expert_noise` is added (what `demonstrate` executes)."""
        t = self.target_object
        to_target = np.array([t.x, t.y]) - self.gripper
        action = np.zeros(7, np.float32)
        if np.hypot(*to_target) <= self.cfg.close_distance:
            action[6] = 1.0
            return action
        step = np.clip(to_target, -self.cfg.max_step, self.cfg.max_step)
        if rng is not None and self.cfg.expert_noise > 0:
            step = step + rng.normal(0.0, self.cfg.expert_noise, 2)
        action[:2] = np.clip(step, -self.cfg.max_step, self.cfg.max_step)
        action[6] = -1.0
        return action

    def demonstrate(self, rng: np.random.Generator) -> np.ndarray:
        """One demonstration step (DART): executes the expert's action with translation
        noise of std `expert_noise` and returns the clean action, the label to record."""
        label = self.expert_action()
        self.step(self.expert_action(rng))
        return label


# ------------------------------------------------------------------ evaluation splits

# Scenes a policy is evaluated on. "in_distribution" draws scenes as the training data does;
# "held_out_kinds" names only target kinds training never named (`HELD_OUT_TARGETS`);
# "more_objects" holds more objects than any training scene (3-6 there).
EVAL_SPLITS: dict[str, PixelRefConfig] = {
    "in_distribution": PixelRefConfig(),
    "held_out_kinds": PixelRefConfig(target_split="held_out"),
    "more_objects": PixelRefConfig(min_objects=7, max_objects=8),
}


def split_env(split: str) -> Any:
    """`env_cls(seed)` building PixelRef episodes of evaluation split `split`."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown PixelRef split {split!r}; use one of {tuple(EVAL_SPLITS)}.")
    cfg = EVAL_SPLITS[split]
    return lambda seed: PixelRefEnv(seed, cfg)


# ------------------------------------------------------------------ dataset


def expert_episode(seed: int, cfg: PixelRefConfig | None = None) -> dict[str, Any]:
    """One expert rollout: frames [T, S, S, 3], actions [T, 7], states [T, 8], masks, text.

    After the grasp, `hold_steps` steps with the gripper closed and no motion are appended
    (so action chunks near the end carry the closed gripper).
    """
    env = PixelRefEnv(seed, cfg)
    rng = np.random.default_rng([int(seed), 1])
    frames, actions, states = [], [], []

    def state():
        s = np.zeros(8, np.float32)
        s[:2] = env.gripper
        s[6:] = -1.0 if env.closed else 1.0
        return s

    while not env.done:
        frames.append(env.image())
        states.append(state())
        actions.append(env.demonstrate(rng))
    if env.success:
        hold = np.zeros(7, np.float32)
        hold[6] = 1.0
        for _ in range(env.cfg.hold_steps):
            frames.append(env.image())
            states.append(state())
            actions.append(hold)
    return {
        "frames": np.stack(frames),
        "actions": np.stack(actions).astype(np.float32),
        "states": np.stack(states),
        "target_mask": env.target_mask(),
        "referred_mask": env.referred_mask(),
        "instruction": env.instruction,
        "object_name": env.target_object.name,
        "success": env.success,
        "chance": env.chance,
    }


def _rlds_episode(index: int, ep: dict[str, Any]) -> dict[str, Any]:
    from pixelvla_jax.data import annotations as ann

    t_len = len(ep["actions"])
    size = ep["frames"].shape[1]
    blank = np.zeros((size, size, 3), np.uint8)
    steps = []
    for t in range(t_len):
        steps.append(
            {
                "observation": {
                    "image": ep["frames"][t],
                    "wrist_image": blank,
                    "state": ep["states"][t],
                    "joint_state": np.zeros(7, np.float32),
                },
                "action": ep["actions"][t],
                "language_instruction": ep["instruction"],
                "reward": np.float32(t == t_len - 1),
                "discount": np.float32(1.0),
                "is_first": t == 0,
                "is_last": t == t_len - 1,
                "is_terminal": t == t_len - 1,
            }
        )
    ys, xs = np.nonzero(ep["target_mask"])
    # In pixels, as data/annotations.py documents gripper_box.
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    return {
        "steps": steps,
        "episode_metadata": {
            "file_path": f"pixelref/episode_{index}",
            "target_mask": ann.encode_mask_png(ep["target_mask"]),
            "referred_mask": ann.encode_mask_png(ep["referred_mask"]),
            "target_object": ep["object_name"],
            "gripper_box": box,
            "has_annotation": True,
        },
    }


def generate_dataset(
    data_dir: str | os.PathLike,
    num_episodes: int = 1000,
    seed: int = 0,
    config: PixelRefConfig | None = None,
    name: str = DATASET_NAME,
) -> str:
    """Writes `num_episodes` successful expert episodes as an RLDS ArrayRecord dataset.

    Episode k uses env seed (seed, k) (failed expert rollouts, rare, are skipped). Returns
    the version directory `data_dir/name/1.0.0`.
    """
    from pixelvla_jax.data import generate

    cfg = config or PixelRefConfig()
    register_dataset(name)

    def episodes():
        written, k = 0, 0
        while written < num_episodes:
            ep = expert_episode(training_seed(seed, k), cfg)
            k += 1
            if not ep["success"]:
                continue
            yield _rlds_episode(written, ep)
            written += 1

    # JPEG, as in the public RLDS datasets. Measured on the same episodes (width 64, sincos
    # positions, 2500 steps, 100 episodes): 81% success trained on JPEG frames, 32% on
    # lossless PNG ones (JPEG's noise acts as an augmentation; evaluation renders are exact).
    features = generate.rlds_features(
        "libero",
        (cfg.image_size, cfg.image_size),
        with_annotations=True,
        wrist=True,
        referred_mask=True,
    )

    # Written into a temporary folder and renamed when complete, generator.json last: an
    # interrupted generation leaves no data_dir/name (`generate.write_generated`).
    return generate.write_generated(
        data_dir,
        name,
        lambda tmp_dir: generate.write_rlds_dataset(
            tmp_dir,
            name,
            episodes(),
            features,
            description="PixelRef expert episodes (pixelvla_jax.envs.pixelref).",
        ),
        generator_spec(num_episodes, seed, cfg),
    )


# Bumped whenever the expert or the episode layout changes, so stale data is noticed.
# 2: DART demonstrations (noisy execution, clean labels); 3: decoy pairs; 4: referred masks;
# 5: held-out target kinds.
DATA_VERSION = 5
GENERATOR_FILE = "generator.json"  # = data.generate.GENERATOR_FILE, the completion marker


def generator_spec(num_episodes: int, seed: int, cfg: PixelRefConfig) -> dict[str, Any]:
    """What a generated dataset was made from (saved next to it as `generator.json`)."""
    return {
        "generator": "pixelvla_jax.envs.pixelref",
        "data_version": DATA_VERSION,
        "num_episodes": int(num_episodes),
        "seed": int(seed),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }


def check_generated(dataset_dir: str, num_episodes: int, seed: int, cfg: PixelRefConfig) -> None:
    """Raises ValueError when `dataset_dir` was generated differently than asked
    (`generate.IncompleteDatasetError` when its generation never completed)."""
    from pixelvla_jax.data import generate

    expected = generator_spec(num_episodes, seed, cfg)
    dataset_dir = os.fspath(dataset_dir)
    found = generate.existing_generated(*os.path.split(dataset_dir.rstrip("/")))
    if found is None:
        raise FileNotFoundError(f"{dataset_dir} does not exist: no PixelRef data to check.")
    if found != expected:
        raise ValueError(
            f"{dataset_dir} holds PixelRef data generated with {found}, but this run asks for "
            f"{expected}. Delete {dataset_dir} to regenerate it (it is made from seeds: "
            "nothing is lost), or point --config.data.data_dir elsewhere."
        )


TRAINING_SEED_OFFSET = 2**40


def training_seed(seed: int, k: int) -> int:
    """Env seed of training episode k: >= 2**40, disjoint from evaluation seeds (rollout)."""
    return TRAINING_SEED_OFFSET + int(seed) * 1_000_003 + k


def register_dataset(name: str = DATASET_NAME) -> None:
    """Registers `name` with the LIBERO-layout standardisation (gripper -1 open / +1 close)."""
    from pixelvla_jax.data import registry

    spec = registry.spec_for_format("libero", name)
    registry.register_spec(spec, overwrite=True)
