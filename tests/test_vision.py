"""Fused DINOv2+SigLIP backbone and projector vs the OpenVLA PyTorch composition."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models.vision import (
    FusedVisionBackbone,
    Projector,
    VisionConfig,
    image_to_unit_float,
)
from pixelvla_jax.testing.torch_reference import import_timm, import_torch
from pixelvla_jax.weights.timm_vision import (
    projector_params_from_torch,
    state_dict_getter,
    vit_params_from_torch,
)


def _timm_tower(name, cfg, seed):
    timm, torch = import_timm(), import_torch()
    torch.manual_seed(seed)
    model = timm.create_model(
        name,
        pretrained=False,
        img_size=cfg.image_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=0,
    ).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".gamma"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def reference():
    """Tiny torch towers + projector (OpenVLA composition) and the converted Flax params."""
    torch = import_torch()
    cfg = VisionConfig.tiny()
    dino = _timm_tower("vit_large_patch14_reg4_dinov2", cfg.dino, 0)
    siglip = _timm_tower("vit_so400m_patch14_siglip_224", cfg.siglip, 1)
    dims = cfg.projector_dims
    torch.manual_seed(2)
    fcs = {f"fc{i}": torch.nn.Linear(dims[i - 1], dims[i]) for i in (1, 2, 3)}
    proj_sd = {f"{k}.{n}": v for k, fc in fcs.items() for n, v in fc.state_dict().items()}
    params = {
        "dino": vit_params_from_torch(state_dict_getter(dino.state_dict()), cfg.dino),
        "siglip": vit_params_from_torch(state_dict_getter(siglip.state_dict()), cfg.siglip),
    }
    proj_params = projector_params_from_torch(state_dict_getter(proj_sd), cfg, prefix="")
    return cfg, dino, siglip, fcs, params, proj_params


def torch_openvla_features(image_uint8: np.ndarray, siglip_levels=()):
    """OpenVLA: per-tower normalisation, second-to-last block patches, concat, fc1-GELU-fc2-GELU-fc3."""
    torch = import_torch()
    cfg, dino, siglip, fcs, _, _ = reference()
    x = torch.from_numpy(image_uint8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        (d,) = dino.get_intermediate_layers((x - mean) / std, n={len(dino.blocks) - 2})
        s_in = (x - 0.5) / 0.5
        (s,) = siglip.get_intermediate_layers(s_in, n={len(siglip.blocks) - 2})
        levels = [siglip.get_intermediate_layers(s_in, n=[i])[0].numpy() for i in siglip_levels]
        fused = torch.cat([d, s], dim=2)
        gelu = torch.nn.GELU()
        out = fcs["fc3"](gelu(fcs["fc2"](gelu(fcs["fc1"](fused)))))
    return fused.numpy(), out.numpy(), levels


def test_fused_backbone_and_projector_match_openvla_composition():
    cfg, *_, params, proj_params = reference()
    image = np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    levels = (0, 2, 4)
    ref_fused, ref_out, ref_levels = torch_openvla_features(image, levels)

    def forward(p, pp, im):
        fused, extra = FusedVisionBackbone(cfg).apply({"params": p}, im, siglip_levels=levels)
        return fused, Projector(cfg).apply({"params": pp}, fused), extra

    fused, out, extra = jax.jit(forward)(params, proj_params, jnp.asarray(image))
    chex.assert_shape(fused, (2, cfg.num_patches, cfg.dino.width + cfg.siglip.width))
    chex.assert_shape(out, (2, cfg.num_patches, cfg.llm_dim))
    chex.assert_trees_all_close(fused, ref_fused, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=0)
    assert len(extra) == len(levels)
    chex.assert_shape(list(extra), (2, cfg.num_patches, cfg.siglip.width))
    chex.assert_trees_all_close(list(extra), ref_levels, atol=1e-5, rtol=0)

    # A float image in [0, 1] is the same input as uint8 / 255.
    fused_f, _, _ = jax.jit(forward)(params, proj_params, jnp.asarray(image / 255.0, jnp.float32))
    chex.assert_trees_all_close(fused_f, fused, atol=1e-5, rtol=0)


def test_scan_layout_and_bf16_compute():
    cfg, *_, params, _ = reference()
    from pixelvla_jax.models.vit import stack_block_params

    image = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 56, 56, 3), dtype=np.uint8))
    ref, _ = jax.jit(lambda p, im: FusedVisionBackbone(cfg).apply({"params": p}, im))(params, image)
    stacked = {
        "dino": stack_block_params(params["dino"], cfg.dino.depth),
        "siglip": stack_block_params(params["siglip"], cfg.siglip.depth),
    }
    bf16 = FusedVisionBackbone(cfg, dtype=jnp.bfloat16, scan_layers=True, remat=True)
    out, _ = jax.jit(lambda p, im: bf16.apply({"params": p}, im))(stacked, image)
    chex.assert_type(out, jnp.bfloat16)
    ref = np.asarray(ref)
    rel = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert rel < 3e-2, rel


def test_full_size_shapes_and_parameter_counts():
    timm, torch = import_timm(), import_torch()
    cfg = VisionConfig.openvla()
    assert cfg.projector_dims == (2176, 8704, 4096, 4096)
    image = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    backbone = FusedVisionBackbone(cfg, scan_layers=True)
    variables = jax.eval_shape(backbone.init, jax.random.key(0), image)
    fused, extra = jax.eval_shape(
        lambda v, im: backbone.apply(v, im, siglip_levels=(6, 12)), variables, image
    )
    chex.assert_shape(fused, (2, 256, 2176))
    assert len(extra) == 2
    chex.assert_shape(list(extra), (2, 256, 1152))

    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
    with torch.device("meta"):
        expected = sum(
            p.numel()
            for name in ("vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_224")
            for p in timm.create_model(name, img_size=224, num_classes=0).parameters()
        )
    assert count(variables) == expected

    projector = Projector(cfg)
    pvars = jax.eval_shape(projector.init, jax.random.key(0), fused)
    assert count(pvars) == 2176 * 8704 + 8704 + 8704 * 4096 + 4096 + 4096 * 4096 + 4096
    chex.assert_shape(jax.eval_shape(projector.apply, pvars, fused), (2, 256, 4096))


def test_input_errors():
    cfg, *_, params, proj_params = reference()
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(1, 56, 56\)"):
        FusedVisionBackbone(cfg).apply({"params": params}, jnp.zeros((1, 56, 56)))
    with pytest.raises(ValueError, match=r"multiple of the patch size 14"):
        FusedVisionBackbone(cfg).apply({"params": params}, jnp.zeros((1, 50, 56, 3)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 80\].*\(1, 4, 79\)"):
        Projector(cfg).apply({"params": proj_params}, jnp.zeros((1, 4, 79)))


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_image_to_unit_float(self):
        """uint8 images are scaled to [0, 1] in float32; float images pass through."""
        image = np.random.default_rng(2).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
        to_unit = self.variant(image_to_unit_float)
        unit = to_unit(jnp.asarray(image))
        chex.assert_type(unit, jnp.float32)
        chex.assert_trees_all_close(unit, image.astype(np.float32) / 255.0, rtol=1e-6, atol=0)
        floats = jnp.asarray(image / 255.0, jnp.float32)
        chex.assert_trees_all_equal(to_unit(floats), floats)
