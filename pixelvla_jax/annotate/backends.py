"""Backend interfaces, one per role, and the rule-based noun extractor.

Roles:
  VideoSegmenter  segments one object (the gripper) through a composed video, prompted once.
  Detector        open-vocabulary boxes of a text query in an image.
  Segmenter       promptable segmentation of a box in an image.
  NounExtractor   the first-grasped object's name from an instruction.

Every call gets `FrameRef`s: which episode, step and crop of the full frame each image is.
Real models ignore them; the oracle backends (`oracle.py`) look ground truth up with them. Each backend has a `name`
(part of cache keys: a different model gives different cached answers).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from pixelvla_jax.annotate.config import GripperPrompt


@dataclasses.dataclass(frozen=True)
class FrameRef:
    """Which image a backend sees: step `step` of episode `episode_id`, cropped to `crop`
    = (x0, y0, x1, y1) full-frame pixels (None = the whole frame) of a frame of size
    `frame_hw` = (H, W)."""

    episode_id: str
    step: int
    crop: tuple[int, int, int, int] | None = None
    frame_hw: tuple[int, int] | None = None


REFERENCE = FrameRef("__reference__", 0)  # the optional reference frame of a composed video


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected box: (x0, y0, x1, y1) in pixels of the image given to the detector."""

    box: tuple[float, float, float, float]
    score: float
    label: str = ""


@runtime_checkable
class VideoSegmenter(Protocol):
    name: str

    def segment_video(
        self, frames: np.ndarray, prompt: GripperPrompt, refs: Sequence[FrameRef]
    ) -> tuple[np.ndarray, np.ndarray]:
        """frames uint8 [T, H, W, 3]; prompt on frame 0 -> (masks bool [T, H, W], scores [T])."""
        ...


@runtime_checkable
class Detector(Protocol):
    name: str

    def detect(self, image: np.ndarray, text: str, ref: FrameRef) -> list[Detection]:
        """image uint8 [H, W, 3], a noun phrase -> detections (any order, possibly none)."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    name: str

    def segment(
        self, image: np.ndarray, box: tuple[float, float, float, float], ref: FrameRef
    ) -> tuple[np.ndarray, np.ndarray]:
        """image uint8 [H, W, 3], box in its pixels -> (masks bool [K, H, W], scores [K])."""
        ...


@runtime_checkable
class NounExtractor(Protocol):
    name: str

    def extract(self, instruction: str) -> str:
        """A task instruction -> the name of the first object the robot grasps ("" if none)."""
        ...


@dataclasses.dataclass(frozen=True)
class Backends:
    video_segmenter: VideoSegmenter
    detector: Detector
    segmenter: Segmenter
    nouns: NounExtractor

    def names(self) -> dict[str, str]:
        return {
            "video_segmenter": self.video_segmenter.name,
            "detector": self.detector.name,
            "segmenter": self.segmenter.name,
            "nouns": self.nouns.name,
        }


# ------------------------------------------------------------------ rule-based nouns

_VERBS = (
    "pick up",
    "pick",
    "grab",
    "grasp",
    "take",
    "lift",
    "move",
    "put",
    "place",
    "push",
    "pull",
    "open",
    "close",
    "turn on",
    "turn off",
    "turn",
    "knock over",
    "knock",
    "stack",
    "slide",
    "flip",
    "wipe",
    "fold",
    "unfold",
    "sweep",
    "insert",
    "drop",
    "hold",
    "bring",
    "set",
    "pour",
    "rotate",
    "press",
)
# Words that end the first object's phrase (prepositions, conjunctions, clause starts).
_STOP_WORDS = {
    "on",
    "onto",
    "in",
    "into",
    "to",
    "from",
    "off",
    "near",
    "next",
    "under",
    "over",
    "inside",
    "out",
    "and",
    "then",
    "with",
    "at",
    "of",
    "towards",
    "toward",
    "up",
    "down",
    "upright",
    "away",
    "behind",
    "beside",
    "between",
    "left",
    "right",
    "so",
    "that",
    "which",
    "number",
}
_DETERMINERS = {"the", "a", "an", "this", "that", "some", "one"}


class RuleNounExtractor:
    """Heuristic noun phrase: the words after the first manipulation verb, after the
    determiner, up to the first preposition/conjunction. The fallback when no LLM is given."""

    name = "rules-v1"

    def extract(self, instruction: str) -> str:
        text = re.sub(r"[^a-z0-9\s'-]", " ", str(instruction).lower())
        words = text.split()
        joined = " ".join(words)
        start, best = 0, None
        for verb in _VERBS:  # the earliest verb occurrence wins; the longer form on ties
            m = re.search(rf"(^| ){re.escape(verb)}( |$)", joined)
            if m and (best is None or (m.start(), -len(verb)) < best):
                best = (m.start(), -len(verb))
                start = len(joined[: m.end()].split())
        phrase: list[str] = []
        for word in words[start:]:
            if not phrase and word in _DETERMINERS:
                continue
            if word in _STOP_WORDS and phrase:
                break
            if word in _STOP_WORDS:
                continue
            phrase.append(word)
        return " ".join(phrase)
