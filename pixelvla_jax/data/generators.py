"""Datasets made on first use, looked up by name: `config.data_generator.kind` -> a generator.

    ensure_data(cfg)          # generates the configured dataset when absent, else checks it
    register("my_env", "my_package.my_env:generate")   # a new kind, imported only when used

A generator is `generate(request: GenerationRequest) -> None`: it makes the dataset
`request.name` under `request.data_dir` when it is absent, and may check an existing one
(PixelRef data is made from seeds, so data generated differently is an error, not a
surprise). Registry entries are functions or "module:function" strings; either way an
environment is imported only when its kind is asked for, never by importing training code.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

from pixelvla_jax import paths
from pixelvla_jax.data import generate
from pixelvla_jax.errors import MissingInputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What to generate: `config.data_generator`'s sizes for dataset `name` in `data_dir`."""

    data_dir: str
    name: str
    num_episodes: int
    episode_length: int
    image_size: int
    seed: int

    @property
    def path(self) -> str:
        return os.path.join(self.data_dir, self.name)


Generator = Callable[[GenerationRequest], None]


def pixelref(request: GenerationRequest) -> None:
    """Expert episodes of the PixelRef environment (`envs/pixelref.py`)."""
    from pixelvla_jax.envs import pixelref as pixelref_env

    env_cfg = pixelref_env.PixelRefConfig(image_size=request.image_size)
    if generate.existing_generated(request.data_dir, request.name) is not None:
        pixelref_env.check_generated(request.path, request.num_episodes, request.seed, env_cfg)
        return
    log.info("Generating %d PixelRef expert episodes in %s", request.num_episodes, request.path)
    pixelref_env.generate_dataset(
        request.data_dir,
        num_episodes=request.num_episodes,
        seed=request.seed,
        config=env_cfg,
        name=request.name,
    )


def synthetic(fmt: str) -> Generator:
    """Synthetic episodes in the raw layout of `fmt` (`data/generate.py`)."""

    def generate_synthetic(request: GenerationRequest) -> None:
        if generate.existing_generated(request.data_dir, request.name) is not None:
            return  # present (complete): left as it is
        log.info("Generating dataset %s in %s", request.name, request.path)
        generate.write_generated(
            request.data_dir,
            request.name,
            lambda tmp_dir: generate.write_synthetic_dataset(
                tmp_dir,
                fmt=fmt,
                num_episodes=request.num_episodes,
                episode_lengths=request.episode_length,
                image_size=request.image_size,
                name=request.name,
                seed=request.seed,
            ),
            {"generator": f"pixelvla_jax.data.generate:{fmt}", **dataclasses.asdict(request)},
        )

    return generate_synthetic


_REGISTRY: dict[str, Generator | str] = {
    "pixelref": pixelref,
    **{f"synthetic_{fmt}": synthetic(fmt) for fmt in generate.FORMATS},
}


def register(kind: str, generator: Generator | str) -> None:
    """Adds generator `kind`: a function or a "module:function" string (imported on use)."""
    if kind in _REGISTRY:
        raise ValueError(f"A dataset generator {kind!r} is already registered.")
    _REGISTRY[kind] = generator


def known_kinds() -> list[str]:
    return sorted(_REGISTRY)


def get_generator(kind: str) -> Generator:
    """The generator registered as `kind` (imported now if it was given by name)."""
    if kind not in _REGISTRY:
        raise ValueError(
            f"config.data_generator.kind={kind!r} is not a known dataset generator; use one "
            f"of {known_kinds()} (or '' to generate nothing), or register one with "
            "pixelvla_jax.data.generators.register(kind, 'module:function')."
        )
    entry = _REGISTRY[kind]
    if isinstance(entry, str):
        module, _, function = entry.partition(":")
        entry = getattr(importlib.import_module(module), function)
    return entry


def ensure_data(cfg: Any) -> None:
    """Generates the configured dataset when it is absent; otherwise checks it exists.

    `cfg` is a training config: `cfg.data.datasets` ((name, weight) pairs),
    `cfg.data.data_dir`, `cfg.data_generator` (kind and sizes) and `cfg.seed`. Only the
    dataset named like the generator kind is generated; every other one must exist.
    """
    gen = cfg.data_generator
    generator = get_generator(gen.kind) if gen.kind else None
    for name, _ in cfg.data.datasets:
        path = os.path.join(cfg.data.data_dir, name)
        if generator is not None and name == gen.kind:
            generator(
                GenerationRequest(
                    data_dir=cfg.data.data_dir,
                    name=name,
                    num_episodes=gen.num_episodes,
                    episode_length=gen.episode_length,
                    image_size=gen.image_size,
                    seed=cfg.seed,
                )
            )
            continue
        if paths.as_path(path).is_dir():
            continue
        raise MissingInputError(
            f"Dataset {name!r} not found: looked for {paths.absolute(path)}. Download the RLDS "
            f"dataset into {paths.absolute(cfg.data.data_dir)} (TFRecord datasets are converted "
            f"with `python -m pixelvla_jax.data.convert --dataset_dir={path}`), or pass "
            "--data_dir=DIR / --config.data.data_dir=DIR."
        )
