"""Optimizer from config: AdamW + schedule + clipping + accumulation + freeze policy.

`OptimConfig` declares every setting with its default; the training config's `optim`
section is a view of it. The functions here take an `OptimConfig`, or a dict /
`ml_collections.ConfigDict` of some of its fields (`OptimConfig.from_mapping`).

Steps: the schedule counts *optimizer* steps; with `grad_accum_steps = k` the train loop
calls the step function k times per optimizer step.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pixelvla_jax.training.param_rules import (
    DEFAULT_NO_DECAY,
    FROZEN,
    TRAINED,
    param_labels,
    weight_decay_mask,
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer's settings (the training config's `optim` section)."""

    lr: float = 1e-4  # peak learning rate
    # "cosine" (warmup, then cosine decay), "constant" (warmup, then flat) or "wsd"
    # (warmup, flat, then linear decay over the last `decay_fraction` of `total_steps`)
    schedule: str = "cosine"
    warmup_steps: int = 0  # linear warmup from 0 to `lr`
    total_steps: int = 10_000  # cosine / wsd: optimizer steps until the end value (warmup included)
    end_lr_factor: float = 0.0  # cosine / wsd: final lr = lr * end_lr_factor
    decay_fraction: float = 0.2  # wsd: share of `total_steps` spent decaying
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); not applied to paths matched by `no_decay`
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY
    clip_grad_norm: float = 1.0  # global-norm clipping of the trained gradients (0: off)
    grad_accum_steps: int = 1  # k micro-steps per optimizer step (`optax.MultiSteps`)
    # [(regex, "trained" | "frozen"), ...], first full match wins (see `param_rules`)
    freeze: tuple[tuple[str, str], ...] = ()
    freeze_default: str = TRAINED

    @classmethod
    def from_mapping(cls, cfg: Any) -> OptimConfig:
        """An OptimConfig from an OptimConfig, None (every default), or a dict / ConfigDict
        of some fields (a missing or None field takes its default). Unknown keys are an error."""
        if isinstance(cfg, cls):
            return cfg
        raw = {} if cfg is None else cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        known = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean '{near[0]}'?" if near else ""
                raise ValueError(f"optim: unknown setting {key!r}.{hint} Known: {known}.")
        raw = {k: v for k, v in raw.items() if v is not None}
        if "no_decay" in raw:
            raw["no_decay"] = tuple(raw["no_decay"])
        if "freeze" in raw:
            raw["freeze"] = tuple(tuple(rule) for rule in raw["freeze"])
        return cls(**raw)


def learning_rate_fn(cfg: Any) -> optax.Schedule:
    """The learning-rate schedule of `cfg` as a function of the optimizer step."""
    c = OptimConfig.from_mapping(cfg)
    lr, warmup, total, kind = float(c.lr), int(c.warmup_steps), int(c.total_steps), c.schedule
    if kind in ("cosine", "wsd") and total <= warmup:
        raise ValueError(
            f"optim.total_steps ({total}) must exceed optim.warmup_steps ({warmup}) for the "
            f"{kind} schedule; raise total_steps or lower warmup_steps."
        )
    end = lr * float(c.end_lr_factor)
    if kind == "wsd":
        fraction = float(c.decay_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction={fraction} must be in (0, 1].")
        decay = max(1, min(total - warmup, round(total * fraction)))
        stable = total - warmup - decay
        parts = [optax.linear_schedule(0.0, lr, warmup)] if warmup > 0 else []
        parts += [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)]
        bounds = [warmup] if warmup > 0 else []
        bounds += [warmup + stable]
        return optax.join_schedules(parts, bounds)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total, end_value=end
        )
    if kind == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(f"optim.schedule {kind!r} is unknown; use 'cosine', 'constant' or 'wsd'.")


def freeze_labels(cfg: Any, params: Any) -> Any:
    """Per-parameter labels ("trained" / "frozen") from `cfg.freeze` (see `param_rules`)."""
    c = OptimConfig.from_mapping(cfg)
    return param_labels(nn.unbox(params), list(c.freeze), default=c.freeze_default)


def make_optimizer(cfg: Any, params: Any) -> optax.GradientTransformation:
    """Builds the optimizer for `params` (arrays, ShapeDtypeStructs, or flax-boxed).

    Trained parameters: [accumulate k micro-steps] -> clip by global norm -> AdamW with the
    schedule and the no-decay mask. Frozen parameters: zero updates and no optimizer state
    (nothing is allocated for them, not even accumulators).
    """
    c = OptimConfig.from_mapping(cfg)
    params = nn.unbox(params)
    labels = freeze_labels(c, params)
    no_decay = c.no_decay

    parts = []
    if c.clip_grad_norm and float(c.clip_grad_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(c.clip_grad_norm)))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_fn(c),
            b1=float(c.b1),
            b2=float(c.b2),
            eps=float(c.eps),
            weight_decay=float(c.weight_decay),
            mask=lambda p: weight_decay_mask(p, no_decay),
        )
    )
    trained_tx = optax.chain(*parts)
    k = int(c.grad_accum_steps)
    if k < 1:
        raise ValueError(f"optim.grad_accum_steps must be >= 1, got {k}.")
    if k > 1:
        trained_tx = optax.MultiSteps(trained_tx, every_k_schedule=k).gradient_transformation()
    return optax.multi_transform({TRAINED: trained_tx, FROZEN: optax.set_to_zero()}, labels)


def cast_frozen(params: Any, labels: Any, dtype: Any = jnp.bfloat16) -> Any:
    """Casts frozen floating-point leaves to `dtype` (e.g. bf16 to halve their memory).

    Trained leaves keep their dtype (fp32 master weights).
    """

    def one(p, label):
        if label == FROZEN and jnp.issubdtype(p.dtype, jnp.floating):
            if isinstance(p, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(p.shape, jnp.dtype(dtype), sharding=p.sharding)
            return p.astype(dtype)
        return p

    return jax.tree.map(one, params, labels)


def current_learning_rate(schedule: optax.Schedule, step: jax.Array, grad_accum_steps: int = 1):
    """Learning rate in effect at train (micro-)step `step`."""
    return schedule(step // grad_accum_steps)
