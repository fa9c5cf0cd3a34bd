"""The two annotation stages on in-memory episodes (no files: `runner.py` does I/O).

Stage (a), `region_proposals`: close event per episode -> the close frames of many episodes
(one dataset, one camera) composed in a fixed order into videos of at most
`max_video_frames` frames -> the gripper segmented through each video by a video segmenter
prompted once per video -> the gripper mask's box, expanded and clipped = the proposal on
the episode's first frame (full-frame pixels, so the crop offset is the proposal's corner).

Stage (b), `segment_target`: first frame cropped to the proposal -> detection of the noun
inside the crop -> the best box segmented -> most confident mask, pasted back into the full
frame -> filters (each failure recorded with its reason).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from pixelvla_jax.annotate import config as C
from pixelvla_jax.annotate.backends import REFERENCE, Backends, FrameRef
from pixelvla_jax.annotate.gripper import (
    box_on_crop_border,
    expand_box,
    find_close_event,
    mask_to_box,
)


@dataclasses.dataclass
class EpisodeInput:
    """What the stages need of one episode. `frame(t)` decodes step t's camera image
    (uint8 [H, W, 3]) lazily; `gripper` holds the raw gripper commands [T]."""

    index: int
    episode_id: str
    instruction: str
    gripper: np.ndarray
    frame: Callable[[int], np.ndarray]


@dataclasses.dataclass
class StageAResult:
    """Region proposal of one episode. Boxes are full-frame pixels (x0, y0, x1, y1)."""

    episode_id: str
    close_step: int | None
    gripper_box: tuple[int, int, int, int] | None = None
    gripper_score: float = 0.0
    proposal: tuple[int, int, int, int] | None = None
    reason: str | None = None  # NO_CLOSE_EVENT / NO_GRIPPER, None when a proposal exists
    video: int = -1  # index of the composed video the close frame went into

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StageAResult:
        d = dict(d)
        for k in ("gripper_box", "proposal"):
            if d.get(k) is not None:
                d[k] = tuple(int(v) for v in d[k])
        return cls(**d)


@dataclasses.dataclass
class EpisodeResult:
    """Stage (b) outcome of one episode; `mask` is uint8 [H, W] (None unless kept)."""

    index: int
    episode_id: str
    reason: str
    instruction: str = ""
    object_name: str = ""
    close_step: int | None = None
    proposal: tuple[int, int, int, int] | None = None
    gripper_box: tuple[int, int, int, int] | None = None
    gripper_score: float = 0.0
    detection_box: tuple[float, float, float, float] | None = None  # full-frame pixels
    detection_score: float = 0.0
    mask_score: float = 0.0
    mask_area: float = 0.0  # fraction of the frame
    mask: np.ndarray | None = None

    @property
    def kept(self) -> bool:
        return self.reason == C.KEPT


# ------------------------------------------------------------------ stage (a)


def compose_videos(
    items: Sequence[tuple[FrameRef, np.ndarray]], max_frames: int, reference: np.ndarray | None
) -> list[tuple[np.ndarray, list[FrameRef]]]:
    """Close frames -> videos [T, H, W, 3] (with their frame ids), in the given order.

    Frames of one size go into one run of videos (a video has a single frame size); each
    video has at most `max_frames` frames including the optional reference frame, which is
    resized to the video's size and put first.
    """
    by_size: dict[tuple[int, int], list[tuple[FrameRef, np.ndarray]]] = {}
    for fid, frame in items:
        by_size.setdefault(tuple(frame.shape[:2]), []).append((fid, frame))
    per_video = max_frames - (1 if reference is not None else 0)
    if per_video < 1:
        raise ValueError(f"max_video_frames={max_frames} leaves no room beside the reference frame")
    videos = []
    for (h, w), group in by_size.items():
        ref = None
        if reference is not None:
            ref = np.asarray(Image.fromarray(reference).convert("RGB").resize((w, h)))
        for start in range(0, len(group), per_video):
            chunk = group[start : start + per_video]
            ids = [fid for fid, _ in chunk]
            frames = [f for _, f in chunk]
            if ref is not None:
                ids, frames = [REFERENCE, *ids], [ref, *frames]
            videos.append((np.stack(frames).astype(np.uint8), ids))
    return videos


def region_proposals(
    episodes: Sequence[EpisodeInput],
    backends: Backends,
    cfg: C.AnnotateConfig,
    convention: str,
    prompt: C.GripperPrompt,
    reference: np.ndarray | None = None,
) -> dict[str, StageAResult]:
    """Stage (a) for a group of episodes of one dataset and camera (order = given order)."""
    results: dict[str, StageAResult] = {}
    items, first_hw = [], {}
    for ep in episodes:
        t = find_close_event(ep.gripper, convention, cfg.close_event)
        results[ep.episode_id] = StageAResult(ep.episode_id, t)
        if t is None:
            results[ep.episode_id].reason = C.NO_CLOSE_EVENT
            continue
        frame = ep.frame(t)
        items.append((FrameRef(ep.episode_id, t), frame))
        first_hw[ep.episode_id] = frame.shape[:2]
    for v, (frames, ids) in enumerate(compose_videos(items, cfg.max_video_frames, reference)):
        masks, scores = backends.video_segmenter.segment_video(frames, prompt, ids)
        masks, scores = np.asarray(masks), np.asarray(scores, np.float64).reshape(-1)
        if masks.shape[0] != len(ids) or scores.shape[0] != len(ids):
            raise ValueError(
                f"video segmenter {backends.video_segmenter.name!r} returned masks "
                f"{masks.shape} / scores {scores.shape} for a video of {len(ids)} frames"
            )
        for fref, mask, score in zip(ids, masks, scores):
            if fref == REFERENCE:
                continue
            episode_id = fref.episode_id
            res = results[episode_id]
            res.video, res.gripper_score = v, float(score)
            box = mask_to_box(mask) if score >= cfg.gripper_mask_threshold else None
            if box is None:
                res.reason = C.NO_GRIPPER
                continue
            res.gripper_box = box
            res.proposal = expand_box(
                box,
                first_hw[episode_id],
                cfg.proposal_expand,
                cfg.proposal_margin,
                cfg.proposal_min_size,
            )
    return results


# ------------------------------------------------------------------ stage (b)


def segment_target(
    ep: EpisodeInput,
    stage_a: StageAResult,
    object_name: str,
    backends: Backends,
    cfg: C.AnnotateConfig,
) -> EpisodeResult:
    """Stage (b) for one episode with its proposal; never raises for a model failure, it
    records the reason instead."""
    res = EpisodeResult(
        index=ep.index,
        episode_id=ep.episode_id,
        reason=C.KEPT,
        instruction=ep.instruction,
        object_name=object_name,
        close_step=stage_a.close_step,
        proposal=stage_a.proposal,
        gripper_box=stage_a.gripper_box,
        gripper_score=stage_a.gripper_score,
    )
    if stage_a.reason is not None:
        res.reason = stage_a.reason
        return res
    if not object_name:
        res.reason = C.NO_DETECTION
        return res
    first = ep.frame(0)
    h, w = first.shape[:2]
    x0, y0, x1, y1 = stage_a.proposal
    crop = np.ascontiguousarray(first[y0:y1, x0:x1])
    crop_ref = FrameRef(ep.episode_id, 0, stage_a.proposal, (h, w))
    detections = backends.detector.detect(crop, object_name, crop_ref)
    if not detections:
        res.reason = C.NO_DETECTION
        return res
    best = max(detections, key=lambda d: d.score)
    bx0, by0, bx1, by1 = (float(v) for v in best.box)
    res.detection_box = (bx0 + x0, by0 + y0, bx1 + x0, by1 + y0)
    res.detection_score = float(best.score)
    if best.score < cfg.detection_threshold:
        res.reason = C.LOW_SCORE
        return res
    if cfg.check_border and box_on_crop_border(
        (bx0, by0, bx1, by1), stage_a.proposal, (h, w), cfg.border_margin
    ):
        res.reason = C.BOX_ON_BORDER
        return res
    full = np.zeros((h, w), np.uint8)
    if cfg.segment_on_crop:
        masks, scores = backends.segmenter.segment(crop, (bx0, by0, bx1, by1), crop_ref)
    else:
        masks, scores = backends.segmenter.segment(
            first, res.detection_box, FrameRef(ep.episode_id, 0, None, (h, w))
        )
    masks, scores = np.asarray(masks), np.asarray(scores, np.float64).reshape(-1)
    if masks.shape[0] == 0:
        res.reason = C.MASK_AREA
        return res
    k = int(np.argmax(scores))
    if cfg.segment_on_crop:
        full[y0:y1, x0:x1] = masks[k] > 0
    else:
        full[:] = masks[k] > 0
    res.mask_score = float(scores[k])
    res.mask_area = float(full.mean())
    if not cfg.min_mask_area <= res.mask_area <= cfg.max_mask_area or not full.any():
        res.reason = C.MASK_AREA
        return res
    res.mask = full
    return res
