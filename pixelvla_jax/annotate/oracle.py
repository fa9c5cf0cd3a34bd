"""Oracle backends: ground truth for every role, for simulators (PixelRef, LIBERO's
segmentation render) and synthetic data, so the pipeline itself can be measured.

A `GroundTruth` answers by `FrameRef` (episode id, step): the gripper's mask on any frame,
the target's mask on the first frame, the object's name per instruction. `OracleNoise`
injects failures (dropped gripper masks, dropped detections, low scores, jittered boxes
pushed onto the crop border, masks of the wrong size), one kind at most per episode, chosen
deterministically from the episode id; `injected` records which, so tests can check that
the filter report names each failure class correctly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from pixelvla_jax.annotate.backends import (
    REFERENCE,
    Backends,
    Detection,
    FrameRef,
    RuleNounExtractor,
)
from pixelvla_jax.annotate.config import (
    BOX_ON_BORDER,
    LOW_SCORE,
    MASK_AREA,
    NO_DETECTION,
    NO_GRIPPER,
    GripperPrompt,
)
from pixelvla_jax.annotate.gripper import mask_to_box


class GroundTruth(Protocol):
    def gripper_mask(self, episode_id: str, step: int) -> np.ndarray | None:
        """bool [H, W] of the gripper on that step's frame (None / empty: not visible)."""
        ...

    def target_mask(self, episode_id: str) -> np.ndarray | None:
        """bool [H, W] of the first-grasped object on the episode's first frame."""
        ...

    def object_name(self, instruction: str) -> str | None: ...


@dataclasses.dataclass
class DictGroundTruth:
    """GroundTruth from tables: `gripper_masks[(episode_id, step)]` (or a callable
    (episode_id, step) -> mask), `target_masks[episode_id]`, `names[instruction]`."""

    gripper_masks: Mapping[tuple[str, int], np.ndarray] | Callable[[str, int], np.ndarray | None]
    target_masks: Mapping[str, np.ndarray]
    names: Mapping[str, str]

    def gripper_mask(self, episode_id: str, step: int) -> np.ndarray | None:
        if callable(self.gripper_masks):
            return self.gripper_masks(episode_id, step)
        return self.gripper_masks.get((episode_id, step))

    def target_mask(self, episode_id: str) -> np.ndarray | None:
        return self.target_masks.get(episode_id)

    def object_name(self, instruction: str) -> str | None:
        return self.names.get(instruction)


NOISE_KINDS = ("drop_gripper", "drop_detection", "low_score", "jitter_box", "bad_mask")
# The filter reason each injected failure must produce.
EXPECTED_REASON = {
    "drop_gripper": NO_GRIPPER,
    "drop_detection": NO_DETECTION,
    "low_score": LOW_SCORE,
    "jitter_box": BOX_ON_BORDER,
    "bad_mask": MASK_AREA,
}


@dataclasses.dataclass
class OracleNoise:
    """Per-episode failure injection; probabilities of each kind (sum <= 1)."""

    drop_gripper: float = 0.0
    drop_detection: float = 0.0
    low_score: float = 0.0
    jitter_box: float = 0.0
    bad_mask: float = 0.0
    score_threshold: float = 0.3  # low_score draws a score below this
    seed: int = 0
    injected: dict[str, str] = dataclasses.field(default_factory=dict)

    def _uniform(self, episode_id: str, salt: str = "") -> float:
        digest = hashlib.sha256(f"{self.seed}:{salt}:{episode_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2.0**64

    def kind(self, episode_id: str) -> str | None:
        u, acc = self._uniform(episode_id), 0.0
        for kind in NOISE_KINDS:
            acc += getattr(self, kind)
            if u < acc:
                return kind
        return None

    def record(self, episode_id: str, kind: str) -> None:
        self.injected[episode_id] = kind


class OracleVideoSegmenter:
    def __init__(self, truth: GroundTruth, noise: OracleNoise | None = None):
        self.truth, self.noise = truth, noise
        self.name = "oracle-video"
        self.calls = 0

    def segment_video(self, frames, prompt: GripperPrompt, refs: Sequence[FrameRef]):
        self.calls += 1
        t, h, w = frames.shape[:3]
        masks, scores = np.zeros((t, h, w), bool), np.zeros(t, np.float32)
        for i, ref in enumerate(refs):
            if ref == REFERENCE:
                continue
            if self.noise is not None and self.noise.kind(ref.episode_id) == "drop_gripper":
                self.noise.record(ref.episode_id, "drop_gripper")
                continue
            mask = self.truth.gripper_mask(ref.episode_id, ref.step)
            if mask is not None and np.asarray(mask).any():
                masks[i] = np.asarray(mask) > 0
                scores[i] = 1.0
        return masks, scores


def _crop_of(mask: np.ndarray | None, ref: FrameRef, hw: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(hw, bool)
    mask = np.asarray(mask) > 0
    if ref.crop is None:
        return mask
    x0, y0, x1, y1 = ref.crop
    return mask[y0:y1, x0:x1]


class OracleDetector:
    """The target's ground-truth box inside the crop (score 1), or nothing if it is outside."""

    def __init__(self, truth: GroundTruth, noise: OracleNoise | None = None):
        self.truth, self.noise = truth, noise
        self.name = "oracle-detector"
        self.calls = 0

    def detect(self, image, text: str, ref: FrameRef) -> list[Detection]:
        self.calls += 1
        h, w = image.shape[:2]
        local = _crop_of(self.truth.target_mask(ref.episode_id), ref, (h, w))
        box = mask_to_box(local)
        if box is None:
            return []
        kind = self.noise.kind(ref.episode_id) if self.noise is not None else None
        score = 1.0
        if kind == "drop_detection":
            self.noise.record(ref.episode_id, kind)
            return []
        if kind == "low_score":
            self.noise.record(ref.episode_id, kind)
            score = self.noise.score_threshold * (
                0.1 + 0.8 * self.noise._uniform(ref.episode_id, "s")
            )
        if kind == "jitter_box":
            jittered = self._jitter_to_border(box, ref, (h, w))
            if jittered is not None:
                self.noise.record(ref.episode_id, kind)
                box = jittered
        return [Detection(tuple(float(v) for v in box), score, text)]

    def _jitter_to_border(self, box, ref: FrameRef, hw):
        """Shifts the box until it touches a crop side that is inside the image (a box the
        border filter must catch); None when the crop has no such side."""
        h, w = hw
        x0, y0, x1, y1 = box
        if ref.crop is None or ref.frame_hw is None:
            return None
        cx0, cy0, cx1, cy1 = ref.crop
        full_h, full_w = ref.frame_hw
        sides = [
            name
            for name, inside in (
                ("left", cx0 > 0),
                ("top", cy0 > 0),
                ("right", cx1 < full_w),
                ("bottom", cy1 < full_h),
            )
            if inside
        ]
        if not sides:
            return None
        side = sides[int(self.noise._uniform(ref.episode_id, "side") * len(sides))]
        bw, bh = x1 - x0, y1 - y0
        if side == "left":
            return 0, y0, bw, y1
        if side == "top":
            return x0, 0, x1, bh
        if side == "right":
            return w - bw, y0, w, y1
        return x0, h - bh, x1, h


class OracleSegmenter:
    """The target's ground-truth mask inside the image it is given (score 1)."""

    def __init__(self, truth: GroundTruth, noise: OracleNoise | None = None):
        self.truth, self.noise = truth, noise
        self.name = "oracle-segmenter"
        self.calls = 0

    def segment(self, image, box, ref: FrameRef):
        self.calls += 1
        h, w = image.shape[:2]
        local = _crop_of(self.truth.target_mask(ref.episode_id), ref, (h, w))
        if self.noise is not None and self.noise.kind(ref.episode_id) == "bad_mask":
            self.noise.record(ref.episode_id, "bad_mask")
            local = np.zeros((h, w), bool)
            local[h // 2, w // 2] = True  # one pixel: far below any sane minimum area
        return local[None], np.ones(1, np.float32)


class OracleNounExtractor:
    """The ground-truth name per instruction; the rule-based extractor where none is known."""

    def __init__(self, truth: GroundTruth):
        self.truth = truth
        self.name = "oracle-nouns"
        self._rules = RuleNounExtractor()
        self.calls = 0

    def extract(self, instruction: str) -> str:
        self.calls += 1
        name = self.truth.object_name(instruction)
        return name if name else self._rules.extract(instruction)


def oracle_backends(truth: GroundTruth, noise: OracleNoise | None = None) -> Backends:
    return Backends(
        video_segmenter=OracleVideoSegmenter(truth, noise),
        detector=OracleDetector(truth, noise),
        segmenter=OracleSegmenter(truth, noise),
        nouns=OracleNounExtractor(truth),
    )
