"""Optimizer from config: AdamW + schedule + clipping + accumulation + freeze policy.

Config (`config.optim`, an `ml_collections.ConfigDict` or a dict), all fields optional:

    lr: 1e-4                 peak learning rate
    schedule: "cosine"       "cosine" (warmup, then cosine decay), "constant" (warmup, then
                             flat) or "wsd" (warmup, flat, then linear decay over the last
                             `decay_fraction` of `total_steps`)
    warmup_steps: 0          linear warmup from 0 to `lr`
    total_steps: 10_000      cosine / wsd: optimizer steps until the end value (warmup included)
    end_lr_factor: 0.0       cosine / wsd: final lr = lr * end_lr_factor
    decay_fraction: 0.2      wsd: share of `total_steps` spent decaying
    b1: 0.9, b2: 0.999, eps: 1e-8
    weight_decay: 0.0        decoupled (AdamW); not applied to paths matched by `no_decay`
    no_decay: policy.DEFAULT_NO_DECAY
    clip_grad_norm: 1.0      global-norm clipping of the trained gradients (0 / None: off)
    grad_accum_steps: 1      k micro-steps per optimizer step (`optax.MultiSteps`)
    freeze: []               [(regex, "trained" | "frozen"), ...], first full match wins
    freeze_default: "trained"

Steps: the schedule counts *optimizer* steps; with `grad_accum_steps = k` the train loop
calls the step function k times per optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pixelvla_jax.training.param_rules import (
    DEFAULT_NO_DECAY,
    FROZEN,
    TRAINED,
    param_labels,
    weight_decay_mask,
)

DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "schedule": "cosine",
    "warmup_steps": 0,
    "total_steps": 10_000,
    "end_lr_factor": 0.0,
    "decay_fraction": 0.2,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "no_decay": DEFAULT_NO_DECAY,
    "clip_grad_norm": 1.0,
    "grad_accum_steps": 1,
    "freeze": (),
    "freeze_default": TRAINED,
}


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return DEFAULTS[key]
    if isinstance(cfg, ml_collections.ConfigDict | Mapping):
        value = cfg.get(key, None)
    else:
        value = getattr(cfg, key, None)
    return DEFAULTS[key] if value is None else value


def learning_rate_fn(cfg: Any) -> optax.Schedule:
    """The learning-rate schedule of `cfg` as a function of the optimizer step."""
    lr = float(_get(cfg, "lr"))
    warmup = int(_get(cfg, "warmup_steps"))
    kind = _get(cfg, "schedule")
    if kind in ("cosine", "wsd"):
        total = int(_get(cfg, "total_steps"))
        if total <= warmup:
            raise ValueError(
                f"optim.total_steps ({total}) must exceed optim.warmup_steps ({warmup}) for the "
                f"{kind} schedule; raise total_steps or lower warmup_steps."
            )
    if kind == "wsd":
        fraction = float(_get(cfg, "decay_fraction"))
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction={fraction} must be in (0, 1].")
        decay = max(1, min(total - warmup, round(total * fraction)))
        stable = total - warmup - decay
        end = lr * float(_get(cfg, "end_lr_factor"))
        parts = [optax.linear_schedule(0.0, lr, warmup)] if warmup > 0 else []
        parts += [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)]
        bounds = [warmup] if warmup > 0 else []
        bounds += [warmup + stable]
        return optax.join_schedules(parts, bounds)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=lr * float(_get(cfg, "end_lr_factor")),
        )
    if kind == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(f"optim.schedule {kind!r} is unknown; use 'cosine', 'constant' or 'wsd'.")


def freeze_labels(cfg: Any, params: Any) -> Any:
    """Per-parameter labels ("trained" / "frozen") from `cfg.freeze` (see `policy`)."""
    rules = [tuple(r) for r in _get(cfg, "freeze")]
    return param_labels(nn.unbox(params), rules, default=_get(cfg, "freeze_default"))


def make_optimizer(cfg: Any, params: Any) -> optax.GradientTransformation:
    """Builds the optimizer for `params` (arrays, ShapeDtypeStructs, or flax-boxed).

    Trained parameters: [accumulate k micro-steps] -> clip by global norm -> AdamW with the
    schedule and the no-decay mask. Frozen parameters: zero updates and no optimizer state
    (nothing is allocated for them, not even accumulators).
    """
    params = nn.unbox(params)
    labels = freeze_labels(cfg, params)
    no_decay = tuple(_get(cfg, "no_decay"))

    parts = []
    clip = _get(cfg, "clip_grad_norm")
    if clip and float(clip) > 0:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_fn(cfg),
            b1=float(_get(cfg, "b1")),
            b2=float(_get(cfg, "b2")),
            eps=float(_get(cfg, "eps")),
            weight_decay=float(_get(cfg, "weight_decay")),
            mask=lambda p: weight_decay_mask(p, no_decay),
        )
    )
    trained_tx = optax.chain(*parts)
    k = int(_get(cfg, "grad_accum_steps"))
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
