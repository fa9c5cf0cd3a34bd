"""OpenVLA's fused DINOv2 + SigLIP vision backbone and its MLP projector.

`FusedVisionBackbone` takes the raw camera image, applies each tower's own normalisation,
and concatenates on channels the patch tokens of each tower's second-to-last block
(Prismatic "dinosiglip-vit-so-224px": [B, 256, 1024 + 1152] at 224 px). In the same SigLIP
pass it can also return extra SigLIP levels for the multiscale pixel encoder.

`Projector` is Prismatic's "fused-gelu-mlp": Dense(D_v -> 4 D_v), GELU, Dense(-> D_llm), GELU,
Dense(-> D_llm), exact (erf) GELU as in PyTorch's `nn.GELU()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelvla_jax.models.vit import ViT, ViTConfig

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Fused vision backbone + projector.

    Attributes:
      dino, siglip: the two towers.
      feature_offset: each tower returns block `depth - feature_offset` (2 = second-to-last).
      llm_dim: projector output width (the LLM's embedding width).
      projector_hidden_dim: fc1 width; None -> 4 * (dino.width + siglip.width) as in Prismatic.
      dino_mean/std, siglip_mean/std: per-tower input normalisation of [0, 1] images.
    """

    dino: ViTConfig = dataclasses.field(default_factory=ViTConfig.dinov2_vitl14_reg4)
    siglip: ViTConfig = dataclasses.field(default_factory=ViTConfig.siglip_so400m14)
    feature_offset: int = 2
    llm_dim: int = 4096
    projector_hidden_dim: int | None = None
    dino_mean: tuple[float, ...] = IMAGENET_MEAN
    dino_std: tuple[float, ...] = IMAGENET_STD
    siglip_mean: tuple[float, ...] = SIGLIP_MEAN
    siglip_std: tuple[float, ...] = SIGLIP_STD

    def __post_init__(self):
        if self.dino.image_size != self.siglip.image_size:
            raise ValueError(
                f"towers disagree on image size: dino {self.dino.image_size}, siglip {self.siglip.image_size}"
            )
        if self.dino.grid_size != self.siglip.grid_size:
            raise ValueError(
                f"towers disagree on patch grid: dino {self.dino.grid_size}, siglip {self.siglip.grid_size}"
            )

    @property
    def image_size(self) -> int:
        return self.dino.image_size

    @property
    def num_patches(self) -> int:
        return self.dino.num_patches

    @property
    def vision_dim(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def dino_block(self) -> int:
        return self.dino.depth - self.feature_offset

    @property
    def siglip_block(self) -> int:
        return self.siglip.depth - self.feature_offset

    @property
    def projector_dims(self) -> tuple[int, int, int, int]:
        hidden = self.projector_hidden_dim or 4 * self.vision_dim
        return (self.vision_dim, hidden, self.llm_dim, self.llm_dim)

    @classmethod
    def openvla(cls, image_size: int = 224) -> VisionConfig:
        """OpenVLA-7B: DINOv2 ViT-L/14-reg4 + SigLIP So400m/14, projector 2176 -> 8704 -> 4096 -> 4096."""
        return cls(
            dino=ViTConfig.dinov2_vitl14_reg4(image_size),
            siglip=ViTConfig.siglip_so400m14(image_size),
            llm_dim=4096,
        )

    @classmethod
    def tiny(cls, image_size: int = 56, llm_dim: int = 64) -> VisionConfig:
        """Both towers tiny (same code paths), 4x4 patch grid at 56 px."""
        return cls(
            dino=ViTConfig.dinov2_tiny(image_size),
            siglip=ViTConfig.siglip_tiny(image_size),
            llm_dim=llm_dim,
        )


def _normalize(x: jax.Array, mean, std) -> jax.Array:
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def image_to_unit_float(image: jax.Array) -> jax.Array:
    """uint8 [.., 3] in 0..255 -> float32 in [0, 1]; float images are assumed already in [0, 1]."""
    if jnp.issubdtype(image.dtype, jnp.integer):
        return image.astype(jnp.float32) / 255.0
    return image.astype(jnp.float32)


class FusedVisionBackbone(nn.Module):
    """DINOv2 + SigLIP towers, patch features concatenated on channels.

    Attributes:
      cfg: VisionConfig. dtype / param_dtype: compute / parameter dtypes.
      remat, scan_layers: passed to both towers (see `ViT`).
    """

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self, image: jax.Array, siglip_levels: Sequence[int] = ()
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Encodes images.

        Args:
          image: [B, H, W, 3] uint8 (0..255) or float in [0, 1]; H = W = cfg.image_size
            (other multiples of the patch size work: position embeddings are resampled).
          siglip_levels: extra SigLIP block indices whose patch tokens to also return.
        Returns:
          fused [B, N, Dd + Ds] (dino then siglip channels) and a list of [B, N, Ds], one per
          requested SigLIP level, from the same SigLIP pass.
        """
        cfg = self.cfg
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be [B, H, W, 3], got shape {tuple(image.shape)}")
        x = image_to_unit_float(image)
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        (dino,) = ViT(cfg.dino, name="dino", **kw)(
            _normalize(x, cfg.dino_mean, cfg.dino_std), [cfg.dino_block]
        )
        siglip_all = ViT(cfg.siglip, name="siglip", **kw)(
            _normalize(x, cfg.siglip_mean, cfg.siglip_std), [cfg.siglip_block, *siglip_levels]
        )
        fused = jnp.concatenate([dino, siglip_all[0].astype(dino.dtype)], axis=-1)
        fused = nn.with_logical_constraint(fused, ("batch", "length", "embed"))
        return fused, list(siglip_all[1:])


class Projector(nn.Module):
    """Prismatic fused-GELU-MLP: [B, N, D_v] -> [B, N, D_llm]."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dims = self.cfg.projector_dims
        if x.shape[-1] != dims[0]:
            raise ValueError(
                f"projector expects [..., {dims[0]}] features, got shape {tuple(x.shape)}"
            )
        axes = [("embed", "mlp"), ("mlp", "embed"), ("embed", "mlp")]
        for i, (dout, ax) in enumerate(zip(dims[1:], axes), start=1):
            if i > 1:
                x = jax.nn.gelu(x, approximate=False)
            x = nn.Dense(
                dout,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ax),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (ax[1],)),
                name=f"fc{i}",
            )(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))
