"""Convert timm ViT / OpenVLA vision weights (PyTorch names and layouts) to this package's params.

All converters take a getter `get(name) -> np.ndarray` (raising KeyError when a tensor is
missing), so a caller can stream tensors one at a time from a memory-mapped checkpoint.
Returned trees hold float numpy arrays (`dtype`, default float32) in the layout of
`pixelvla_jax.models.vit.ViT` (unrolled `block_i`, or stacked `blocks` with scan_layers)
and `pixelvla_jax.models.vision.Projector`.

OpenVLA HF checkpoint prefixes: `vision_backbone.featurizer.` (DINOv2, LayerScale stored as
`.scale_factor`; timm itself uses `.gamma`; both are accepted), `vision_backbone.fused_featurizer.`
(SigLIP) and `projector.fc{1,2,3}.{weight,bias}`. Tensors the modules do not have (a final
norm or attention-pool head when the config has none, classifier heads) are never read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pixelvla_jax.models.vision import VisionConfig
from pixelvla_jax.models.vit import ViTConfig, stack_block_params

Getter = Callable[[str], np.ndarray]

DINO_PREFIX = "vision_backbone.featurizer."
SIGLIP_PREFIX = "vision_backbone.fused_featurizer."
PROJECTOR_PREFIX = "projector."


class _Reader:
    def __init__(self, get: Getter, dtype):
        self._get, self.dtype = get, dtype

    def __call__(self, name: str | tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        names = (name,) if isinstance(name, str) else name
        for i, n in enumerate(names):
            try:
                value = self._get(n)
            except KeyError:
                if i + 1 < len(names):
                    continue
                raise KeyError(
                    f"missing tensor {' or '.join(repr(m) for m in names)} in the checkpoint"
                ) from None
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"tensor {n!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                    "(does the config match the checkpoint?)"
                )
            return np.asarray(value).astype(self.dtype)
        raise AssertionError("unreachable")


def _layer_norm(read: _Reader, p: str, d: int) -> dict:
    return {"scale": read(p + "weight", (d,)), "bias": read(p + "bias", (d,))}


def _mlp(read: _Reader, p: str, d: int, m: int) -> dict:
    return {
        "fc1_kernel": read(p + "fc1.weight", (m, d)).T,
        "fc1_bias": read(p + "fc1.bias", (m,)),
        "fc2_kernel": read(p + "fc2.weight", (d, m)).T,
        "fc2_bias": read(p + "fc2.bias", (d,)),
    }


def _heads_in(w: np.ndarray, h: int, hd: int) -> np.ndarray:
    """torch Linear weight [H*Dh, D] -> kernel [D, H, Dh]."""
    return w.T.reshape(w.shape[1], h, hd)


def _out_proj(read: _Reader, p: str, cfg: ViTConfig) -> dict:
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    return {
        "out_kernel": read(p + "weight", (d, d)).T.reshape(h, hd, d),
        "out_bias": read(p + "bias", (d,)),
    }


def _block(read: _Reader, p: str, cfg: ViTConfig) -> dict:
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    qkv_w = read(p + "attn.qkv.weight", (3 * d, d))
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
        attn[f"{name}_kernel"] = _heads_in(qkv_w[j * d : (j + 1) * d], h, hd)
    if cfg.qkv_bias:
        qkv_b = read(p + "attn.qkv.bias", (3 * d,))
        for j, name in enumerate(("query", "key", "value")):
            attn[f"{name}_bias"] = qkv_b[j * d : (j + 1) * d].reshape(h, hd)
    attn.update(_out_proj(read, p + "attn.proj.", cfg))
    out = {
        "norm1": _layer_norm(read, p + "norm1.", d),
        "attn": attn,
        "norm2": _layer_norm(read, p + "norm2.", d),
        "mlp": _mlp(read, p + "mlp.", d, cfg.mlp_dim),
    }
    if cfg.layerscale:
        for ls in ("ls1", "ls2"):
            out[ls] = read((f"{p}{ls}.scale_factor", f"{p}{ls}.gamma"), (d,))
    return out


def _map_head(read: _Reader, p: str, cfg: ViTConfig) -> dict:
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    kv_w, kv_b = read(p + "kv.weight", (2 * d, d)), read(p + "kv.bias", (2 * d,))
    return {
        "latent": read(p + "latent", (1, 1, d)),
        "query_kernel": _heads_in(read(p + "q.weight", (d, d)), h, hd),
        "query_bias": read(p + "q.bias", (d,)).reshape(h, hd),
        "key_kernel": _heads_in(kv_w[:d], h, hd),
        "key_bias": kv_b[:d].reshape(h, hd),
        "value_kernel": _heads_in(kv_w[d:], h, hd),
        "value_bias": kv_b[d:].reshape(h, hd),
        **_out_proj(read, p + "proj.", cfg),
        "norm": _layer_norm(read, p + "norm.", d),
        "mlp": _mlp(read, p + "mlp.", d, cfg.mlp_dim),
    }


def vit_params_from_torch(
    get: Getter, cfg: ViTConfig, prefix: str = "", *, scan_layers: bool = False, dtype=np.float32
) -> dict:
    """timm `VisionTransformer` state dict (names under `prefix`) -> `ViT` params.

    Raises KeyError naming a missing tensor, ValueError naming a tensor of the wrong shape.
    """
    read = _Reader(get, dtype)
    d, p, c = cfg.width, cfg.patch_size, cfg.in_channels
    w = read(prefix + "patch_embed.proj.weight", (d, c, p, p))
    params: dict = {
        "patch_kernel": w.transpose(2, 3, 1, 0),
        "patch_bias": read(prefix + "patch_embed.proj.bias", (d,)),
        "pos_embed": read(prefix + "pos_embed", (1, cfg.num_pos_embed, d)),
    }
    if cfg.class_token:
        params["cls_token"] = read(prefix + "cls_token", (1, 1, d))
    if cfg.num_registers:
        params["reg_token"] = read(prefix + "reg_token", (1, cfg.num_registers, d))
    for i in range(cfg.depth):
        params[f"block_{i}"] = _block(read, f"{prefix}blocks.{i}.", cfg)
    if cfg.final_norm:
        params["norm"] = _layer_norm(read, prefix + "norm.", d)
    if cfg.attn_pool_head:
        params["attn_pool"] = _map_head(read, prefix + "attn_pool.", cfg)
    return stack_block_params(params, cfg.depth) if scan_layers else params


def projector_params_from_torch(
    get: Getter, cfg: VisionConfig, prefix: str = PROJECTOR_PREFIX, *, dtype=np.float32
) -> dict:
    """OpenVLA fused-GELU-MLP projector (`fc1/fc2/fc3`) -> `Projector` params."""
    read = _Reader(get, dtype)
    dims = cfg.projector_dims
    params = {}
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        params[f"fc{i}"] = {
            "kernel": read(f"{prefix}fc{i}.weight", (dout, din)).T,
            "bias": read(f"{prefix}fc{i}.bias", (dout,)),
        }
    return params


def vision_params_from_checkpoint(
    ckpt, cfg: VisionConfig, *, scan_layers: bool = False, dtype=np.float32
) -> dict:
    """OpenVLA checkpoint (a `Checkpoint` or any name -> array mapping) -> {"dino", "siglip", "projector"} params.

    `{"dino": ..., "siglip": ...}` are the params of `FusedVisionBackbone`; "projector" those of
    `Projector`.
    """

    def get(name: str) -> np.ndarray:
        return ckpt[name]  # Checkpoint and plain mappings both raise KeyError when missing

    return {
        "dino": vit_params_from_torch(
            get, cfg.dino, DINO_PREFIX, scan_layers=scan_layers, dtype=dtype
        ),
        "siglip": vit_params_from_torch(
            get, cfg.siglip, SIGLIP_PREFIX, scan_layers=scan_layers, dtype=dtype
        ),
        "projector": projector_params_from_torch(get, cfg, PROJECTOR_PREFIX, dtype=dtype),
    }


def state_dict_getter(state_dict) -> Getter:
    """Getter over a torch state dict (float32 numpy copies); for tests and benchmarks."""

    def get(name: str) -> np.ndarray:
        return state_dict[name].detach().float().cpu().numpy()

    return get
