"""Per-dataset action and proprio statistics in OpenVLA's `norm_stats` layout.

    {"action":  {"q01": [A], "q99": [A], "mean": [A], "std": [A], "min": [A], "max": [A],
                 "mask": [A] (True = normalised; the gripper is not)},
     "proprio": {... same keys over P dims, mask all True ...},
     "num_transitions": N, "num_trajectories": E}

Computed once over all (standardised) steps of a dataset and cached as JSON next to its step
index, keyed by the index key (a hash of the source and its standardisation). Plain lists of
floats, so checkpoints can carry it as JSON.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence

import numpy as np


def _summary(x: np.ndarray, mask: Sequence[bool]) -> dict[str, list]:
    x = np.asarray(x, np.float64)
    dims = x.shape[1]
    if x.shape[0] == 0 or dims == 0:
        empty = [0.0] * dims
        return {k: list(empty) for k in ("q01", "q99", "mean", "std", "min", "max")} | {
            "mask": [bool(m) for m in mask]
        }
    return {
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "mask": [bool(m) for m in mask],
    }


def compute_statistics(
    actions: np.ndarray,
    proprio: np.ndarray,
    num_trajectories: int,
    action_mask: Sequence[bool] | None = None,
) -> dict:
    """Statistics of actions [N, A] and proprio [N, P] (P may be 0) over all N steps."""
    actions = np.asarray(actions)
    proprio = np.asarray(proprio).reshape(actions.shape[0], -1)
    if action_mask is None:
        action_mask = [True] * actions.shape[1]
    if len(action_mask) != actions.shape[1]:
        raise ValueError(
            f"action mask has {len(action_mask)} entries for {actions.shape[1]} action dims"
        )
    return {
        "action": _summary(actions, action_mask),
        "proprio": _summary(proprio, [True] * proprio.shape[1]),
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": int(num_trajectories),
    }


def statistics_path(index) -> str:
    return os.path.join(index.path, f"dataset_statistics_{index.key}.json")


def save_statistics(stats: dict, path: str) -> None:
    """Writes atomically (tmp file + rename)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, path)


def load_statistics(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def get_dataset_statistics(index, recompute: bool = False) -> dict:
    """Statistics of a `StepIndex` (or `StepDataset`), computed once and cached as JSON."""
    index = getattr(index, "index", index)
    path = statistics_path(index)
    if os.path.isfile(path) and not recompute:
        return load_statistics(path)
    stats = compute_statistics(
        index.actions,
        index.proprio,
        index.num_episodes,
        action_mask=index.spec.action_normalization_mask,
    )
    stats["dataset_name"] = index.dataset_name
    stats["key"] = index.key
    save_statistics(stats, path)
    return stats
