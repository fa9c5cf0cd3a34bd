"""Visual prompt-aware encoder (SAM-style): points/lines/boxes and a prompt mask -> `N_s` tokens.

docs/design.md §1.2. Sparse prompts are `P` points padded to a fixed count; each point gets
SAM's random-Fourier position embedding (`PositionEmbeddingRandom`) plus a learned
embedding of its type (positive / negative / line / box corner, `observation.PROMPT_*`).
Lines arrive as points sampled along them, boxes as their two corners.

  token 1 (sparse): per-point MLP, mean over the non-pad points, MLP -> `out_dim`. Padding
    entries are excluded exactly, and a mean is order-free, so padding never changes the
    token and the token does not depend on point order.
  token 2 (dense): the prompt mask, area-resized to `mask_input_size`, through SAM's mask
    downscaler (conv 2x2/2 -> LN -> GELU -> conv 2x2/2 -> LN -> GELU -> conv 1x1),
    mean-pooled over space, MLP -> `out_dim`.

A sample with no valid point, or without a prompt mask, gets the learned "absent" token in
that slot. The random Fourier matrix is a fixed constant drawn from `fourier_seed` (as in
SAM it is not trained); it is not a parameter, so no optimiser can move it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixelvla_jax.models.observation import NUM_PROMPT_TYPES, PROMPT_PAD
from pixelvla_jax.models.pixel_encoder import MLP, area_resize, logical_dense


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig:
    """Configuration of `PromptEncoder`.

    Attributes:
      num_fourier_features: width F of the random-Fourier position embedding (Gaussian
        matrix [2, F/2], features [sin, cos]); must be even.
      fourier_scale: std of the Gaussian matrix (SAM: 1.0).
      fourier_seed: seed of the fixed Gaussian matrix.
      embed_dim: width of the per-point features and of the mask features (SAM: 256).
        When it differs from F, a Dense maps the position embedding to it.
      point_mlp_dims: hidden widths of the per-point MLP applied before pooling (so type
        and position interact); empty -> pool the raw point features.
      mask_input_size: side the prompt mask is area-resized to before the downscaler;
        must be divisible by 4 (SAM: 256 for a 64x64 embedding).
      mask_channels: channels of the downscaler (SAM: mask_in_chans 16; the first conv
        has mask_channels // 4).
      sparse_mlp_dims / dense_mlp_dims: hidden widths of the output MLPs.
      out_dim: token width = LLM hidden size.
      num_prompt_types: size of the type vocabulary (observation.NUM_PROMPT_TYPES).
      layer_norm_eps: eps of the downscaler's channel LayerNorms (SAM: 1e-6).
    """

    num_fourier_features: int = 256
    fourier_scale: float = 1.0
    fourier_seed: int = 0
    embed_dim: int = 256
    point_mlp_dims: tuple[int, ...] = (256,)
    mask_input_size: int = 64
    mask_channels: int = 16
    sparse_mlp_dims: tuple[int, ...] = (1024,)
    dense_mlp_dims: tuple[int, ...] = (1024,)
    out_dim: int = 4096
    num_prompt_types: int = NUM_PROMPT_TYPES
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.num_fourier_features % 2:
            raise ValueError(
                f"num_fourier_features={self.num_fourier_features} must be even ([sin, cos])."
            )
        if self.mask_input_size % 4:
            raise ValueError(
                f"mask_input_size={self.mask_input_size} must be divisible by 4 (two stride-2 convs)."
            )
        if self.mask_channels % 4:
            raise ValueError(f"mask_channels={self.mask_channels} must be divisible by 4.")

    @property
    def num_tokens(self) -> int:
        """N_s: prompt tokens per sample (sparse + dense)."""
        return 2

    @classmethod
    def openvla_7b(cls) -> PromptEncoderConfig:
        """Full size: SAM-like widths into Llama-2-7B (4096 wide)."""
        return cls()

    @classmethod
    def tiny(cls, out_dim: int = 32) -> PromptEncoderConfig:
        """Test size."""
        return cls(
            num_fourier_features=16,
            embed_dim=16,
            point_mlp_dims=(16,),
            mask_input_size=16,
            mask_channels=8,
            sparse_mlp_dims=(32,),
            dense_mlp_dims=(32,),
            out_dim=out_dim,
        )


def fourier_matrix(config: PromptEncoderConfig) -> np.ndarray:
    """The fixed Gaussian matrix [2, F/2] of SAM's `PositionEmbeddingRandom`."""
    rng = np.random.default_rng(config.fourier_seed)
    shape = (2, config.num_fourier_features // 2)
    return (config.fourier_scale * rng.standard_normal(shape)).astype(np.float32)


def fourier_position_embedding(points: jax.Array, gaussian: jax.Array) -> jax.Array:
    """SAM's random-Fourier embedding of (x, y) in [0, 1]: [..., 2] -> [..., F] ([sin, cos])."""
    coords = 2.0 * points.astype(jnp.float32) - 1.0
    proj = 2.0 * np.pi * jnp.matmul(coords, gaussian, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel (last) axis of an NHWC map (SAM's `LayerNorm2d`)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        # Two-pass variance: the first map has only channels // 4 channels, where
        # E[x^2] - E[x]^2 loses the digits that matter.
        return nn.LayerNorm(
            epsilon=self.eps,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            name="norm",
        )(x)


class MaskDownscaler(nn.Module):
    """SAM's mask downscaler: [B, S, S] -> [B, S/4, S/4, embed_dim]."""

    channels: int
    embed_dim: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, mask: jax.Array) -> jax.Array:
        x = mask[..., None].astype(self.dtype)

        def conv(features, size, name):
            return nn.Conv(
                features,
                kernel_size=(size, size),
                strides=(size, size),
                padding="VALID",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, None, None)
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                name=name,
            )

        x = conv(self.channels // 4, 2, "conv_0")(x)
        x = nn.gelu(
            _ChannelLayerNorm(self.eps, self.dtype, self.param_dtype, name="norm_0")(x), False
        )
        x = conv(self.channels, 2, "conv_1")(x)
        x = nn.gelu(
            _ChannelLayerNorm(self.eps, self.dtype, self.param_dtype, name="norm_1")(x), False
        )
        return conv(self.embed_dim, 1, "conv_out")(x)


class PromptEncoder(nn.Module):
    """Visual prompts (points, lines, boxes, a mask) -> prompt tokens `E_s`."""

    config: PromptEncoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        points: jax.Array,
        types: jax.Array,
        prompt_mask: jax.Array,
        has_prompt_mask: jax.Array,
    ) -> jax.Array:
        """Encodes the visual prompts of a batch.

        Args:
          points: [B, P, 2] float (x, y) in [0, 1] of the image width / height.
          types: [B, P] int32 `PROMPT_*` ids; `PROMPT_PAD` entries are ignored.
          prompt_mask: [B, H, W] float in [0, 1] (any resolution).
          has_prompt_mask: [B] bool; False -> the "absent" dense token.

        Returns:
          [B, 2, out_dim] in `dtype`: [sparse token, dense token].
        """
        cfg = self.config
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"prompt_points must be [B, P, 2] (x, y); got shape {points.shape}.")
        batch, num_points = points.shape[:2]
        if types.shape != (batch, num_points):
            raise ValueError(
                f"prompt_types must be [B, P]={(batch, num_points)} to match prompt_points "
                f"{points.shape}; got {types.shape}."
            )
        if prompt_mask.ndim != 3 or prompt_mask.shape[0] != batch:
            raise ValueError(
                f"prompt_mask must be [B, H, W] with B={batch} (from prompt_points "
                f"{points.shape}); got {prompt_mask.shape}."
            )
        if has_prompt_mask.shape != (batch,):
            raise ValueError(
                f"has_prompt_mask must be [B]=({batch},) to match prompt_points; got "
                f"{has_prompt_mask.shape}."
            )

        # Sparse token.
        valid = types != PROMPT_PAD
        # Pad entries may hold anything (even NaN); zero them before they reach any op.
        points = jnp.where(valid[..., None], points, 0.0)
        pos = fourier_position_embedding(points, jnp.asarray(fourier_matrix(cfg)))
        if cfg.num_fourier_features != cfg.embed_dim:
            pos = logical_dense(
                cfg.embed_dim, (None, None), self.dtype, self.param_dtype, "pos_proj"
            )(pos)
        type_embed = nn.Embed(
            cfg.num_prompt_types,
            cfg.embed_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)),
            name="type_embed",
        )(types)
        feats = pos.astype(self.dtype) + type_embed
        for i, width in enumerate(cfg.point_mlp_dims):
            feats = logical_dense(
                width, (None, None), self.dtype, self.param_dtype, f"point_mlp_{i}"
            )(feats)
            feats = nn.gelu(feats, approximate=False)
        weights = valid.astype(jnp.float32)
        count = jnp.sum(weights, axis=1)
        pooled = (
            jnp.einsum(
                "bp,bpd->bd",
                weights,
                feats.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            / jnp.maximum(count, 1.0)[:, None]
        )
        sparse = MLP(
            cfg.sparse_mlp_dims,
            cfg.out_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="sparse_mlp",
        )(pooled.astype(self.dtype))

        # Dense token.
        mask = area_resize(prompt_mask, cfg.mask_input_size, cfg.mask_input_size)
        dense_map = MaskDownscaler(
            cfg.mask_channels,
            cfg.embed_dim,
            cfg.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mask_downscaler",
        )(mask)
        dense = MLP(
            cfg.dense_mlp_dims,
            cfg.out_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dense_mlp",
        )(jnp.mean(dense_map.astype(jnp.float32), axis=(1, 2)).astype(self.dtype))

        absent = self.param(
            "absent_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (2, cfg.out_dim),
            self.param_dtype,
        ).astype(self.dtype)
        present = jnp.stack([count > 0, has_prompt_mask], axis=1)  # [B, 2]
        tokens = jnp.stack([sparse, dense], axis=1).astype(self.dtype)
        out = jnp.where(present[..., None], tokens, absent[None])
        return nn.with_logical_constraint(out, ("batch", None, "embed"))
