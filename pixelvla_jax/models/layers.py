"""Small layers shared by the model's modules."""

from __future__ import annotations

import flax.linen as nn


def logical_dense(
    features: int, axes: tuple[str | None, str | None], dtype, param_dtype, name: str
) -> nn.Dense:
    """`nn.Dense` whose kernel [in, out] and bias [out] carry the logical axis names `axes`."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )
