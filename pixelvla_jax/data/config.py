"""The data pipeline's settings and batch layout, importable without Grain.

`DataConfig` is what `pipeline.make_dataset` reads and what the training config's `data`
section is a view of; `batch_spec` is the shape of one batch. The policy, the memory plan
and the config schema need these without building a pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import normalization, prompts

__all__ = [
    "BATCH_KEYS",
    "NORMALIZATION_MODES",
    "STATE_KEYS",
    "WRIST_KEYS",
    "DataConfig",
    "batch_keys",
    "batch_spec",
    "reader_threads",
]

BATCH_KEYS = (
    "image",
    "pixel_mask",
    "has_pixel_mask",
    "prompt_points",
    "prompt_types",
    "prompt_mask",
    "has_prompt_mask",
    "tokens",
    "token_mask",
    "actions",
    "action_pad_mask",
    "proprio",
    "dataset_id",
    "grounding_mask",
    "has_grounding_mask",
    "target_point",
    "has_target_point",
)
# Keys a batch has only when the config asks for them (static shapes either way).
WRIST_KEYS = ("wrist_image", "has_wrist_image")  # DataConfig.use_wrist_image
STATE_KEYS = ("state",)  # DataConfig.use_state

# How actions and proprio are normalised (`DataConfig.normalization`): OpenVLA's quantile
# bounds, or π0's z-score (openpi's `Normalize(use_quantiles=False)`).
NORMALIZATION_MODES = normalization.MODES


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs besides the sources (per-host batch size)."""

    # (dataset name, weight) pairs; used by `build_sources` when no sources are given.
    datasets: tuple[tuple[str, float], ...] = ()
    data_dir: str = ""  # directory holding one sub-directory per dataset
    cache_dir: str | None = None  # step-index cache (default: next to the data)
    balance_by_size: bool = False  # weights *= dataset sizes (OpenVLA's balance_weights)
    batch_size: int = 32  # per host
    image_size: int = 224
    action_chunk: int = 8  # N_c
    action_dim: int = 7  # A
    proprio_dim: int = 8  # Pd: proprio (and `state`) is zero-padded to this length
    # Action and proprio normalisation, one of NORMALIZATION_MODES (data/normalization.py):
    # "bounds_q99" (OpenVLA, OFT: clipped to [-1, 1]) or "zscore" (π0: (x - mean) /
    # (std + 1e-6), not clipped). The policy unnormalises its actions the same way.
    normalization: str = "bounds_q99"
    # A second camera: the dataset's wrist frame as `wrist_image` [B, S, S, 3] (+
    # `has_wrist_image`: False for a step stored without one, or from a mixed-in dataset
    # without a wrist camera (warned), its image then zeros; no dataset with one: an error).
    use_wrist_image: bool = False
    # How the wrist frame is augmented (the documented choice, `ExampleBuilder`): True
    # (OpenVLA-OFT / Octo: every camera gets the same augmentation, with its own draws) = the
    # base camera's random crop + colour jitter, and the centre crop when acting; False
    # (openpi: wrist cameras get colour jitter only) = the resize + colour jitter, and the
    # resize when acting.
    wrist_crop: bool = True
    # The normalised proprio as the model input `state` [B, Pd] (OFT's proprio token, π0's
    # state token; π0 pads it to 32 inside the model).
    use_state: bool = False
    max_tokens: int = 48  # L
    on_long_prompt: str = "error"  # "error" or "truncate" (counted, warned once)
    prompt_template: str = "pixelvla"  # a name in prompts.TEMPLATES or a format string
    augment: bool = True
    augment_cfg: image_lib.AugmentConfig = image_lib.AugmentConfig()
    visual_prompts: bool = True
    prompt_cfg: prompts.PromptConfig = prompts.PromptConfig()
    pixel_mask_dropout: float = 0.0  # probability to hide an existing mask (train "absent")
    # One pixel-level input per training example, its kind drawn from prompt_cfg.kind_probs:
    # "mask" = the target mask as the pixel input (and as the dense mask prompt), "points" /
    # "line" / "box" = that prompt alone (no pixel mask), "none" = neither; each kind then
    # singles out the target alone, as acting gives it (`Policy.act`'s prompt_kinds). Needs
    # visual_prompts and no pixel_mask_dropout.
    one_pixel_input: bool = False
    tokenizer_path: str = ""
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    # Reader threads, each builds whole batches (the per-sample work is mostly OpenCV, which
    # releases the GIL); -1 = `reader_threads()`: min(4, the CPUs this process may use).
    num_threads: int = -1
    prefetch_batches: int = 8  # batches read ahead by the threads
    worker_count: int = 0  # > 0: mp_prefetch worker processes
    worker_buffer_size: int = 2  # batches per worker
    # Keep every transformed sample in memory after its first use (small datasets with a
    # deterministic transform only: augment, visual_prompts and pixel_mask_dropout off).
    # The batches are the same as without the cache; later epochs skip decoding.
    cache_samples: bool = False

    @classmethod
    def from_mapping(cls, cfg: Any) -> DataConfig:
        """Builds a DataConfig from a DataConfig, a dict or an ml_collections.ConfigDict."""
        if isinstance(cfg, cls):
            return cfg
        raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"DataConfig: unknown fields {unknown}; known fields: {sorted(known)}."
            )
        raw = dict(raw)
        if isinstance(raw.get("augment_cfg"), Mapping):
            raw["augment_cfg"] = image_lib.AugmentConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in raw["augment_cfg"].items()}
            )
        if isinstance(raw.get("prompt_cfg"), Mapping):
            # PromptConfig takes kind_probs as a mapping, or as the positional list that
            # configs saved before it became a mapping hold (converted, see kind_probs_mapping).
            raw["prompt_cfg"] = prompts.PromptConfig(**raw["prompt_cfg"])
        if "datasets" in raw:
            raw["datasets"] = tuple((str(n), float(w)) for n, w in raw["datasets"])
        return cls(**raw)

    def __post_init__(self):
        if self.one_pixel_input and (not self.visual_prompts or self.pixel_mask_dropout > 0):
            raise ValueError(
                "DataConfig.one_pixel_input draws each example's one pixel input from "
                "prompt_cfg.kind_probs: it needs visual_prompts=True and pixel_mask_dropout=0 "
                f"(got visual_prompts={self.visual_prompts}, "
                f"pixel_mask_dropout={self.pixel_mask_dropout})."
            )
        if self.num_threads == 0 or self.num_threads < -1:
            raise ValueError(
                f"DataConfig.num_threads={self.num_threads}; use a count >= 1, or -1 for "
                "min(4, the CPUs this process may use)."
            )
        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(
                f"DataConfig.normalization={self.normalization!r}; use one of "
                f"{NORMALIZATION_MODES} (bounds_q99: OpenVLA / OFT, zscore: π0)."
            )


def reader_threads(cfg: DataConfig) -> int:
    """`cfg.num_threads`, with -1 resolved to min(4, the CPUs this process may use): on
    the 2-core machine type 2 threads filled both cores best (bench/data.py); more threads
    than cores only add GIL hand-offs."""
    if cfg.num_threads != -1:
        return cfg.num_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cpus or 1))


def batch_keys(cfg: DataConfig) -> tuple[str, ...]:
    """The keys of one batch of `cfg`: BATCH_KEYS, then the wrist camera's and the state's
    when the config asks for them."""
    return (
        BATCH_KEYS
        + (WRIST_KEYS if cfg.use_wrist_image else ())
        + (STATE_KEYS if cfg.use_state else ())
    )


def batch_spec(cfg: DataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of one per-host batch, in the order of `batch_keys(cfg)`."""
    b, s, p = cfg.batch_size, cfg.image_size, cfg.prompt_cfg.max_points
    spec = {
        "image": ((b, s, s, 3), np.dtype(np.uint8)),
        "pixel_mask": ((b, s, s), np.dtype(np.float32)),
        "has_pixel_mask": ((b,), np.dtype(bool)),
        "prompt_points": ((b, p, 2), np.dtype(np.float32)),
        "prompt_types": ((b, p), np.dtype(np.int32)),
        "prompt_mask": ((b, s, s), np.dtype(np.float32)),
        "has_prompt_mask": ((b,), np.dtype(bool)),
        "tokens": ((b, cfg.max_tokens), np.dtype(np.int32)),
        "token_mask": ((b, cfg.max_tokens), np.dtype(bool)),
        "actions": ((b, cfg.action_chunk, cfg.action_dim), np.dtype(np.float32)),
        "action_pad_mask": ((b, cfg.action_chunk), np.dtype(bool)),
        "proprio": ((b, cfg.proprio_dim), np.dtype(np.float32)),
        "dataset_id": ((b,), np.dtype(np.int32)),
        "grounding_mask": ((b, s, s), np.dtype(np.float32)),
        "has_grounding_mask": ((b,), np.dtype(bool)),
        "target_point": ((b, 2), np.dtype(np.float32)),
        "has_target_point": ((b,), np.dtype(bool)),
    }
    if cfg.use_wrist_image:
        spec["wrist_image"] = ((b, s, s, 3), np.dtype(np.uint8))
        spec["has_wrist_image"] = ((b,), np.dtype(bool))
    if cfg.use_state:
        spec["state"] = ((b, cfg.proprio_dim), np.dtype(np.float32))
    return spec
