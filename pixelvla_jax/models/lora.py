"""Low-rank adapters (LoRA) for dense layers, selected by regex over module paths.

A `Dense` layer with `lora_rules` checks its own module path (e.g. `layers/attn/q_proj`, or
`llm/layers_3/mlp/up_proj` when the decoder is a submodule named `llm`) against each rule's
regex; the first rule that *fully* matches gives the layer two extra params, `lora_a` [in, r]
(random) and `lora_b` [r, out] (zeros), and the output becomes `x @ W + scale * (x @ A) @ B`.
With `lora_b` at zero the layer reproduces the base layer exactly, so a pretrained model
starts from its own outputs.

Paths use the module names only (no `params/` prefix and no parameter name); inside
`nn.scan` the scanned module's name appears once (`layers/...`), with one stacked adapter
per layer on a leading axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_A = "lora_a"
LORA_B = "lora_b"

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """One adapter setting.

    Attributes:
      rank: r, the inner dimension of the adapter.
      alpha: the output is scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA).
      rslora: rank-stabilised scaling (Kalajdzievski 2023).
    """

    rank: int
    alpha: float
    rslora: bool = False

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


LoRARules = tuple[tuple[str, LoRAConfig], ...]


def lora_config_for_path(path: str, rules: Sequence[tuple[str, LoRAConfig]]) -> LoRAConfig | None:
    """The config of the first rule whose regex fully matches `path`, or None."""
    for pattern, config in rules:
        if re.fullmatch(pattern, path):
            return config
    return None


class Dense(nn.Module):
    """`y = x @ kernel (+ bias)` over the last axis, with an optional LoRA adapter.

    Attributes:
      features: output width `out`.
      use_bias: add a bias [out].
      kernel_axes: logical axis names of the kernel [in, out], e.g. ("embed", "mlp").
      lora_rules: (regex, LoRAConfig) pairs matched against this module's path.
      dtype: compute dtype (inputs and params are cast to it).
      param_dtype: storage dtype of the params.
    """

    features: int
    use_bias: bool = False
    kernel_axes: tuple[str | None, str | None] = (None, None)
    lora_rules: LoRARules = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    lora_a_init: Initializer = nn.initializers.he_uniform()

    @property
    def module_path(self) -> str:
        return "/".join(str(p) for p in self.path)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out]."""
        in_axis, out_axis = self.kernel_axes
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (in_axis, out_axis)),
            (in_features, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        config = lora_config_for_path(self.module_path, self.lora_rules)
        if config is not None:
            lora_a = self.param(
                LORA_A,
                nn.with_logical_partitioning(self.lora_a_init, (in_axis, None)),
                (in_features, config.rank),
                self.param_dtype,
            )
            lora_b = self.param(
                LORA_B,
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, out_axis)),
                (config.rank, self.features),
                self.param_dtype,
            )
            delta = jnp.dot(jnp.dot(x, lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
            y = y + jnp.asarray(config.scale, self.dtype) * delta
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, (out_axis,)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------- helpers


def _unbox(x: Any) -> Any:
    return x.unbox() if isinstance(x, nn.Partitioned) else x


def _path_str(keys: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def is_lora_param(path: str | Sequence[Any]) -> bool:
    """True for a LoRA adapter param, given a "a/b/lora_a" string or a key path."""
    if not isinstance(path, str):
        path = _path_str(path)
    return path.rsplit("/", 1)[-1] in (LORA_A, LORA_B)


def lora_paths(params: Mapping[str, Any]) -> list[str]:
    """Paths ("layers/attn/q_proj/lora_a", ...) of every LoRA param, sorted."""
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return sorted(_path_str(p) for p, _ in leaves if is_lora_param(p))


def lora_mask(params: Mapping[str, Any]) -> Any:
    """A pytree of bools like `params`: True on LoRA params (for `optax.masked` and friends)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: is_lora_param(p), params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def merge_lora(
    params: Mapping[str, Any],
    scales: LoRAConfig | Sequence[tuple[str, LoRAConfig]] | Mapping[str, float],
) -> dict[str, Any]:
    """Folds every (lora_a, lora_b) pair into its sibling kernel and drops the adapters.

    `kernel + scale * lora_a @ lora_b`, computed in float32 and stored in the kernel's dtype.
    A leading stacked "layers" axis (from `nn.scan`) is handled: `[..., in, r] @ [..., r, out]`.

    Args:
      params: the params tree (with or without a top-level "params" key). Module paths are
        read relative to the top of the tree, exactly as the `Dense` layers saw them when the
        same module was the top-level one applied (pass the subtree of the module the rules
        were written for).
      scales: one LoRAConfig for all adapters, the same (regex, LoRAConfig) rules the model
        was built with, or a mapping module path -> scale.

    Returns:
      A new tree of the same structure without any lora_a / lora_b.
    """
    if "params" in params and len(params) == 1:
        return {"params": merge_lora(params["params"], scales)}

    def scale_for(module_path: str) -> float:
        if isinstance(scales, LoRAConfig):
            return scales.scale
        if isinstance(scales, Mapping):
            if module_path not in scales:
                raise KeyError(
                    f"merge_lora: no scale given for the LoRA adapter at {module_path!r}; "
                    f"known paths: {sorted(scales)}"
                )
            return float(scales[module_path])
        config = lora_config_for_path(module_path, scales)
        if config is None:
            raise ValueError(
                f"merge_lora: LoRA params found at {module_path!r} but no rule matches it; "
                "pass the lora_rules the model was built with"
            )
        return config.scale

    def walk(node: Any, prefix: tuple[str, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, (*prefix, str(k))) for k, v in node.items() if k not in (LORA_A, LORA_B)}
        has_a, has_b = LORA_A in node, LORA_B in node
        if not (has_a or has_b):
            return out
        module_path = "/".join(prefix)
        if not (has_a and has_b and "kernel" in node):
            raise ValueError(
                f"merge_lora: {module_path!r} needs kernel, lora_a and lora_b together; "
                f"found {sorted(node)}"
            )
        boxed = node["kernel"]
        kernel = _unbox(boxed)
        a = _unbox(node[LORA_A]).astype(jnp.float32)
        b = _unbox(node[LORA_B]).astype(jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
        merged = (kernel.astype(jnp.float32) + scale_for(module_path) * delta).astype(kernel.dtype)
        out["kernel"] = boxed.replace_boxed(merged) if isinstance(boxed, nn.Partitioned) else merged
        return out

    return walk(params, ())
