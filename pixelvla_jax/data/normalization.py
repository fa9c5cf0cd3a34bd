"""BOUNDS_Q99 normalisation of actions / proprio and gripper conventions.

Statistics come as the OpenVLA `norm_stats` layout produced by `data/statistics.py`:
`{"action": {"q01": [...], "q99": [...], "mask": [...], ...}, "proprio": {...}, ...}`.
Normalisation (on dims where `mask` is True; the others pass through unchanged):

    a' = clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    a  = (a' + 1) / 2 * (q99 - q01 + 1e-8) + q01            (unnormalise)

For end-effector actions the mask is False on the gripper (last) dim. Functions accept
numpy or jax arrays of shape [..., D] and return the same kind.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

EPS = 1e-8


def _xp(x):
    """numpy for numpy inputs, jax.numpy for jax arrays (so jitted policies can reuse this)."""
    if type(x).__module__.startswith("jax"):
        import jax.numpy as jnp

        return jnp
    return np


def _bounds(stats: Mapping, dim: int, what: str):
    for key in ("q01", "q99"):
        if key not in stats:
            raise KeyError(
                f"{what}: statistics have no '{key}' (keys: {sorted(stats)}); compute them with "
                "pixelvla_jax.data.statistics."
            )
    q01 = np.asarray(stats["q01"], np.float32)
    q99 = np.asarray(stats["q99"], np.float32)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, bool)), bool)
    if not (q01.shape == q99.shape == mask.shape == (dim,)):
        raise ValueError(
            f"{what}: values have last dim {dim} but statistics q01 {q01.shape}, q99 {q99.shape},"
            f" mask {mask.shape}; are these the statistics of the right dataset?"
        )
    return q01, q99, mask


def normalize_bounds_q99(values, stats: Mapping):
    """[..., D] raw values -> [..., D] in [-1, 1] on masked dims (others unchanged).

    Args:
      values: [..., D] float.
      stats: one entry of the statistics dict (e.g. `stats["action"]`) with q01, q99, mask [D].
    """
    xp = _xp(values)
    values = xp.asarray(values, dtype=xp.float32)
    dim = values.shape[-1]
    if dim == 0:
        return values
    q01, q99, mask = _bounds(stats, dim, "normalize_bounds_q99")
    normed = xp.clip(2.0 * (values - q01) / (q99 - q01 + EPS) - 1.0, -1.0, 1.0)
    return xp.where(mask, normed, values).astype(xp.float32)


def unnormalize_bounds_q99(values, stats: Mapping):
    """Inverse of `normalize_bounds_q99` (exact for raw values inside [q01, q99])."""
    xp = _xp(values)
    values = xp.asarray(values, dtype=xp.float32)
    dim = values.shape[-1]
    if dim == 0:
        return values
    q01, q99, mask = _bounds(stats, dim, "unnormalize_bounds_q99")
    raw = 0.5 * (values + 1.0) * (q99 - q01 + EPS) + q01
    return xp.where(mask, raw, values).astype(xp.float32)


# ------------------------------------------------------------------ gripper conventions


def libero_gripper_to_open01(gripper):
    """LIBERO gripper action (-1 open, +1 close) -> [0, 1] with 1 = open (OpenVLA's LIBERO
    transform). Works elementwise on numpy or jax arrays."""
    xp = _xp(gripper)
    return xp.clip((1.0 - xp.asarray(gripper, xp.float32)) / 2.0, 0.0, 1.0)


def open01_to_libero_gripper(gripper, binarize: bool = True):
    """[0, 1] with 1 = open -> LIBERO's -1 open / +1 close; binarised (sign) by default, as
    all public LIBERO evaluations do."""
    xp = _xp(gripper)
    g = 1.0 - 2.0 * xp.asarray(gripper, xp.float32)
    if binarize:
        g = xp.where(g >= 0.0, 1.0, -1.0)
    return g.astype(xp.float32)


def binarize_gripper(gripper, threshold: float = 0.5):
    """Continuous gripper value -> {0, 1} (1 where value > threshold)."""
    xp = _xp(gripper)
    return (xp.asarray(gripper) > threshold).astype(xp.float32)


def normalize_sample(
    action_chunk: np.ndarray, proprio: np.ndarray, statistics: Mapping
) -> tuple[np.ndarray, np.ndarray]:
    """Normalises an action chunk [N_c, A] and proprio [P] with one dataset's statistics.

    A proprio vector of length 0 or statistics without "proprio" are passed through.
    """
    if "action" not in statistics:
        raise KeyError(
            f"statistics have no 'action' entry (keys: {sorted(statistics)}); expected the "
            "OpenVLA norm_stats layout from pixelvla_jax.data.statistics."
        )
    actions = normalize_bounds_q99(action_chunk, statistics["action"])
    proprio = np.asarray(proprio, np.float32)
    if proprio.shape[-1] > 0 and statistics.get("proprio"):
        proprio = normalize_bounds_q99(proprio, statistics["proprio"])
    return actions, proprio
