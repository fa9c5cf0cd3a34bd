"""Pixel-160K annotation pipeline: target masks for any RLDS dataset (docs/design.md §1.6).

    python -m pixelvla_jax.annotate --dataset=DIR --out=DIR --video_segmenter=PATH \
        --detector=PATH --segmenter=PATH [--llm=PATH]

Modules: `config` (every threshold), `gripper` (close events, boxes), `backends` (role
interfaces, rule-based nouns), `pipeline` (the two stages), `runner` (sharding, caches,
output dataset, report), `oracle` / `pixelref_truth` / `libero_truth` (ground-truth
backends for the PixelRef and LIBERO simulators),
`hf_backends` (the transformers backends and `build_backends`, torch imported only when
used), `tiny_models` (random tiny transformers checkpoints for tests and benchmarks).
"""

from pixelvla_jax.annotate.backends import (
    Backends,
    Detection,
    Detector,
    FrameRef,
    NounExtractor,
    RuleNounExtractor,
    Segmenter,
    VideoSegmenter,
)
from pixelvla_jax.annotate.config import AnnotateConfig, CloseEventConfig, GripperPrompt
from pixelvla_jax.annotate.gripper import find_close_event
from pixelvla_jax.annotate.oracle import DictGroundTruth, OracleNoise, oracle_backends
from pixelvla_jax.annotate.runner import annotate_dataset

__all__ = [
    "AnnotateConfig",
    "Backends",
    "CloseEventConfig",
    "Detection",
    "Detector",
    "DictGroundTruth",
    "FrameRef",
    "GripperPrompt",
    "NounExtractor",
    "OracleNoise",
    "RuleNounExtractor",
    "Segmenter",
    "VideoSegmenter",
    "annotate_dataset",
    "find_close_event",
    "oracle_backends",
]
