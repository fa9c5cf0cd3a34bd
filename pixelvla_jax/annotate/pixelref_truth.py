"""Ground truth of a PixelRef dataset (envs/pixelref.py) for the oracle backends.

PixelRef episodes are deterministic in their env seed, so the truth is recomputed rather
than read: `generate_dataset(num_episodes, seed, config)` writes episode i from the i-th
successful expert rollout of seeds `training_seed(seed, k)`; replaying those rollouts gives
the gripper's exact mask on every step, the target's mask and its name.
"""

from __future__ import annotations

import numpy as np

from pixelvla_jax.envs import pixelref as pr


class PixelRefTruth:
    """GroundTruth (oracle.py) of `pixelref.generate_dataset(_, num_episodes, seed, config)`."""

    def __init__(self, num_episodes: int, seed: int = 0, config: pr.PixelRefConfig | None = None):
        self.cfg = config or pr.PixelRefConfig()
        self.env_seeds: dict[str, int] = {}
        self.names: dict[str, str] = {}
        self._targets: dict[str, np.ndarray] = {}
        self._grippers: dict[str, list[np.ndarray]] = {}
        written, k = 0, 0
        while written < num_episodes:
            env_seed = pr.training_seed(seed, k)
            k += 1
            grippers, env = self._replay(env_seed)
            if not env.success:
                continue
            episode_id = f"pixelref/episode_{written}"
            self.env_seeds[episode_id] = env_seed
            self._grippers[episode_id] = grippers
            self._targets[episode_id] = env.target_mask().astype(bool)
            self.names[env.instruction] = env.target_object.name
            written += 1

    def _replay(self, env_seed: int):
        """The gripper mask of every recorded step, as `pixelref.expert_episode` records it."""
        env = pr.PixelRefEnv(env_seed, self.cfg)
        rng = np.random.default_rng([int(env_seed), 1])
        size, half = self.cfg.image_size, self.cfg.gripper_size
        masks = []
        while not env.done:
            masks.append(pr.gripper_mask(*env.gripper, env.closed, size, half))
            env.demonstrate(rng)
        if env.success:
            held = pr.gripper_mask(*env.gripper, env.closed, size, half)
            masks.extend([held] * env.cfg.hold_steps)
        return masks, env

    def gripper_mask(self, episode_id: str, step: int) -> np.ndarray | None:
        masks = self._grippers.get(episode_id)
        return None if masks is None or step >= len(masks) else masks[step]

    def target_mask(self, episode_id: str) -> np.ndarray | None:
        return self._targets.get(episode_id)

    def object_name(self, instruction: str) -> str | None:
        return self.names.get(instruction)

    def target_centre(self, episode_id: str) -> tuple[float, float]:
        """(x, y) pixel coordinates of the target mask's centroid."""
        ys, xs = np.nonzero(self._targets[episode_id])
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)
