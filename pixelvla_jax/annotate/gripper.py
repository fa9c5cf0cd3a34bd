"""Stage (a) geometry: the gripper close event, and boxes from masks.

`find_close_event` works on an episode's RAW gripper commands in its dataset's own
convention (the registry's `DatasetSpec.gripper_convention`), not on the standardised
1 = open / 0 = closed actions of the training pipeline, so it can run before any
standardisation and is testable on hand-made sequences per convention.
"""

from __future__ import annotations

import numpy as np

from pixelvla_jax.annotate.config import CloseEventConfig


def gripper_closed_states(raw: np.ndarray, convention: str, cfg: CloseEventConfig) -> np.ndarray:
    """[T] raw gripper commands -> [T] bool, True where the commanded gripper state is closed."""
    raw = np.asarray(raw, np.float64).reshape(-1)
    if convention == "libero":
        return raw > cfg.libero_threshold
    if convention == "bridge":
        return raw < cfg.bridge_threshold
    if convention == "standard":
        return raw < cfg.standard_threshold
    if convention == "fractal":
        closed = np.zeros(raw.shape, bool)
        state = False  # starts open: a relative command needs a reference state
        for t, command in enumerate(raw):
            if command > cfg.fractal_threshold:
                state = True
            elif command < -cfg.fractal_threshold:
                state = False
            closed[t] = state
        return closed
    raise ValueError(
        f"unknown gripper convention {convention!r}; known: libero, bridge, fractal, standard"
    )


def find_close_event(
    raw: np.ndarray, convention: str, cfg: CloseEventConfig | None = None
) -> int | None:
    """The first step where the gripper command switches from open to closed, or None.

    Args:
      raw: [T] the episode's raw gripper commands (last action dim), in `convention`.
      convention: "libero" | "bridge" | "fractal" | "standard" (see CloseEventConfig).
    Returns:
      t such that the command at t is closed and the one at t-1 open; None when the episode
      never closes (or is closed from its start, unless `cfg.closed_at_start_counts`).
    """
    cfg = cfg or CloseEventConfig()
    closed = gripper_closed_states(raw, convention, cfg)
    if closed.size == 0:
        return None
    if closed[0] and cfg.closed_at_start_counts:
        return 0
    switches = np.flatnonzero(closed[1:] & ~closed[:-1])
    return int(switches[0]) + 1 if switches.size else None


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """[H, W] mask -> tight box (x0, y0, x1, y1), x1/y1 exclusive; None if empty."""
    mask = np.asarray(mask) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def expand_box(
    box: tuple[float, float, float, float],
    image_hw: tuple[int, int],
    scale: float,
    margin: int = 0,
    min_size: int = 0,
) -> tuple[int, int, int, int]:
    """Scales a box about its centre, adds a margin, enforces a minimum side, clips to the
    image; returns integer pixel bounds (x0, y0, x1, y1), x1/y1 exclusive, non-empty."""
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w = max((x1 - x0) * scale / 2 + margin, min_size / 2)
    half_h = max((y1 - y0) * scale / 2 + margin, min_size / 2)
    nx0 = int(np.clip(np.floor(cx - half_w), 0, w - 1))
    ny0 = int(np.clip(np.floor(cy - half_h), 0, h - 1))
    nx1 = int(np.clip(np.ceil(cx + half_w), nx0 + 1, w))
    ny1 = int(np.clip(np.ceil(cy + half_h), ny0 + 1, h))
    return nx0, ny0, nx1, ny1


def box_on_crop_border(
    box: tuple[float, float, float, float],
    crop: tuple[int, int, int, int],
    image_hw: tuple[int, int],
    margin: int,
) -> bool:
    """True if a box (crop-local pixels) touches a side of the crop that is not also a side of
    the image: the object is likely cut by the proposal."""
    h, w = image_hw
    cx0, cy0, cx1, cy1 = crop
    bx0, by0, bx1, by1 = box
    cw, ch = cx1 - cx0, cy1 - cy0
    return bool(
        (cx0 > 0 and bx0 <= margin)
        or (cy0 > 0 and by0 <= margin)
        or (cx1 < w and bx1 >= cw - margin)
        or (cy1 < h and by1 >= ch - margin)
    )


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
