"""Trajectory transforms: act on whole episodes (numpy), not on single frames.

Gripper standardisation follows OpenVLA's dataset transforms, so statistics and checkpoints
are comparable with OpenVLA's: after standardisation the gripper action (last action dim) is
in [0, 1] with **1 = open, 0 = closed**.

Raw conventions (`DatasetSpec.gripper_convention`):
  "libero":   -1 open / +1 close             -> clip to [0, 1], invert.
  "bridge":   continuous, 1 = open            -> binarise (relabelling in-between values).
  "fractal":  relative closedness, +1 close / -1 open / 0 no change -> absolute.
  "standard": already 1 = open / 0 = closed   -> unchanged.
"""

from __future__ import annotations

import numpy as np

GRIPPER_CONVENTIONS = ("libero", "bridge", "fractal", "standard")


def chunk_actions(actions: np.ndarray, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` actions starting at step `t`, repeating the episode's last action past its end.

    Args:
      actions: [T, A] the episode's (standardised) actions.
      t: the step, 0 <= t < T.
      n: chunk length N_c.

    Returns:
      chunk [n, A] (same dtype as `actions`) = a_t .. a_{t+n-1}, and pad_mask [n] bool,
      True where the action is a real future action of the episode.
    """
    actions = np.asarray(actions)
    num_steps = actions.shape[0]
    if not 0 <= t < num_steps:
        raise IndexError(f"step {t} is outside the episode (length {num_steps})")
    if n < 1:
        raise ValueError(f"chunk length must be >= 1, got {n}")
    idx = np.arange(t, t + n)
    pad_mask = idx < num_steps
    chunk = actions[np.minimum(idx, num_steps - 1)]
    return chunk, pad_mask


def invert_gripper_actions(gripper: np.ndarray) -> np.ndarray:
    """[T] in [0, 1] -> 1 - x."""
    return 1.0 - np.asarray(gripper, np.float32)


def binarize_gripper_actions(gripper: np.ndarray) -> np.ndarray:
    """Continuous [T] gripper actions (1 = open) -> {0, 1}.

    Values > 0.95 are open, < 0.05 closed; an in-between value takes the state reached after
    it (scan from the end); trailing in-between values take the episode's last value.
    """
    gripper = np.asarray(gripper, np.float32)
    open_mask, closed_mask = gripper > 0.95, gripper < 0.05
    in_between = ~(open_mask | closed_mask)
    out = np.empty_like(gripper)
    carry = gripper[-1] if gripper.size else 0.0
    for i in range(gripper.shape[0] - 1, -1, -1):
        if not in_between[i]:
            carry = float(open_mask[i])
        out[i] = carry
    return out


def rel2abs_gripper_actions(gripper: np.ndarray) -> np.ndarray:
    """Relative gripper actions (+1 close, -1 open, ~0 no change) -> absolute (1 open, 0 closed).

    The state before the first non-zero command is the opposite of that command (a close
    command implies the gripper was open); with no command at all, the gripper stays open.
    """
    gripper = np.asarray(gripper, np.float32)
    thresholded = np.where(gripper < -0.1, 1, np.where(gripper > 0.1, -1, 0))  # +1 open, -1 closed
    nonzero = np.flatnonzero(thresholded)
    state = -thresholded[nonzero[0]] if nonzero.size else 1
    out = np.empty(gripper.shape, np.float32)
    for i, command in enumerate(thresholded):
        if command != 0:
            state = command
        out[i] = state
    return out / 2.0 + 0.5


def standardize_gripper(gripper: np.ndarray, convention: str) -> np.ndarray:
    """[T] raw gripper actions of one episode -> [T] float32, 1 = open, 0 = closed."""
    if convention == "libero":
        return invert_gripper_actions(np.clip(gripper, 0.0, 1.0))
    if convention == "bridge":
        return binarize_gripper_actions(gripper)
    if convention == "fractal":
        return rel2abs_gripper_actions(gripper)
    if convention == "standard":
        return np.asarray(gripper, np.float32)
    raise ValueError(f"unknown gripper convention {convention!r}; known: {GRIPPER_CONVENTIONS}")
