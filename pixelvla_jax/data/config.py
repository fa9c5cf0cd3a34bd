"""The data pipeline's settings and batch layout, importable without Grain.

`DataConfig` is what `pipeline.make_dataset` reads and what the training config's `data`
section is a view of; `batch_spec` is the shape of one batch. The policy, the memory plan
and the config schema need these without building a pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import prompts

__all__ = ["BATCH_KEYS", "DataConfig", "batch_spec"]

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
    proprio_dim: int = 8  # Pd: proprio is zero-padded to this length
    max_tokens: int = 48  # L
    on_long_prompt: str = "error"  # "error" or "truncate" (counted, warned once)
    prompt_template: str = "pixelvla"  # a name in prompts.TEMPLATES or a format string
    augment: bool = True
    augment_cfg: image_lib.AugmentConfig = image_lib.AugmentConfig()
    visual_prompts: bool = True
    prompt_cfg: prompts.PromptConfig = prompts.PromptConfig()
    pixel_mask_dropout: float = 0.0  # probability to hide an existing mask (train "absent")
    tokenizer_path: str = ""
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    num_threads: int = 4  # reader threads, each builds whole batches (PIL releases the GIL)
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


def batch_spec(cfg: DataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of one per-host batch."""
    b, s, p = cfg.batch_size, cfg.image_size, cfg.prompt_cfg.max_points
    return {
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
