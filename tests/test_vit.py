"""ViT towers vs timm: patch features per block, pooled output, position-embedding resampling,
scan/unrolled layouts, bf16, parameter counts of the full-size towers, input errors."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models.vit import ViT, ViTConfig, stack_block_params, unstack_block_params
from pixelvla_jax.testing.torch_reference import import_timm, import_torch
from pixelvla_jax.weights.timm_vision import state_dict_getter, vit_params_from_torch

TIMM_NAMES = {
    "dinov2": "vit_large_patch14_reg4_dinov2",
    "siglip": "vit_so400m_patch14_siglip_224",
    "siglip_tanh": "vit_so400m_patch14_siglip_224",
}


def tiny_config(kind: str) -> ViTConfig:
    if kind == "dinov2":
        return ViTConfig.dinov2_tiny(56)
    return ViTConfig.siglip_tiny(56, mlp_act="gelu_tanh" if kind == "siglip_tanh" else "gelu")


def make_timm_tower(kind: str, cfg: ViTConfig, seed: int = 0):
    """A tiny random timm tower built with the real model name (same code paths)."""
    timm, torch = import_timm(), import_torch()
    torch.manual_seed(seed)
    extra = {"act_layer": "gelu_tanh"} if cfg.mlp_act == "gelu_tanh" else {}
    model = timm.create_model(
        TIMM_NAMES[kind],
        pretrained=False,
        img_size=cfg.image_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=0,
        dynamic_img_size=True,
        **extra,
    ).eval()
    with torch.no_grad():  # non-trivial values everywhere (LayerScale gammas included)
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def tower(kind: str):
    cfg = tiny_config(kind)
    model = make_timm_tower(kind, cfg)
    return cfg, model, vit_params_from_torch(state_dict_getter(model.state_dict()), cfg)


def timm_levels(model, x: np.ndarray, indices):
    torch = import_torch()
    with torch.no_grad():
        out = model.get_intermediate_layers(torch.from_numpy(x).permute(0, 3, 1, 2), n=indices)
    return [o.numpy() for o in out]


def run_vit(cfg, params, x, indices, **kw):
    model = ViT(cfg, **kw)
    fn = jax.jit(lambda p, im: model.apply({"params": p}, im, indices))
    return [np.asarray(o) for o in fn(params, jnp.asarray(x))]


def images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["dinov2", "siglip", "siglip_tanh"])
def test_patch_features_match_timm_at_several_blocks(kind):
    cfg, model, params = tower(kind)
    x = images((2, 56, 56, 3))
    indices = [0, cfg.depth - 2, 1]
    ref = timm_levels(model, x, sorted(indices))
    ref = dict(zip(sorted(indices), ref))
    out = run_vit(cfg, params, x, indices)
    assert len(out) == len(indices)
    chex.assert_shape(out, (2, cfg.num_patches, cfg.width))
    chex.assert_trees_all_close(out, [ref[i] for i in indices], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_pooled_output_matches_timm_forward(kind):
    torch = import_torch()
    cfg, model, params = tower(kind)
    x = images((2, 56, 56, 3), seed=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    levels, pooled = jax.jit(
        lambda p, im: ViT(cfg).apply({"params": p}, im, [1], return_pooled=True)
    )(params, x)
    chex.assert_shape(pooled, (2, cfg.width))
    chex.assert_trees_all_close(pooled, ref, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(levels[0], timm_levels(model, x, [1])[0], atol=1e-5, rtol=1e-7)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_position_embedding_resampling_matches_timm(kind):
    cfg, model, params = tower(kind)
    for shape in [(1, 70, 42, 3), (1, 28, 28, 3)]:  # up- and down-sampled grids
        x = images(shape, seed=2)
        indices = [cfg.depth - 2]
        out = run_vit(cfg, params, x, indices)
        chex.assert_shape(out[0], (1, (shape[1] // 14) * (shape[2] // 14), cfg.width))
        chex.assert_trees_all_close(out, timm_levels(model, x, indices), atol=1e-5, rtol=0)


def test_scan_and_unrolled_layouts_agree_with_remat_and_grads():
    cfg, _, params = tower("dinov2")
    x = jnp.asarray(images((2, 56, 56, 3), seed=3))
    indices = [2, 0]
    stacked = stack_block_params(params, cfg.depth)
    chex.assert_shape(stacked["blocks"]["attn"]["query_kernel"], (cfg.depth, cfg.width, 2, 16))
    ref = run_vit(cfg, params, x, indices)
    out = run_vit(cfg, stacked, x, indices, scan_layers=True)
    chex.assert_trees_all_close(out, ref, atol=1e-6, rtol=0)

    def loss(p, scan):
        outs = ViT(cfg, scan_layers=scan, remat=scan).apply({"params": p}, x, indices)
        return sum(jnp.sum(o**2) for o in outs)

    g_unrolled = jax.jit(jax.grad(functools.partial(loss, scan=False)))(params)
    g_scan = jax.jit(jax.grad(functools.partial(loss, scan=True)))(stacked)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_scan))
    chex.assert_trees_all_close(
        stack_block_params(g_unrolled, cfg.depth), g_scan, rtol=1e-4, atol=1e-5 * scale
    )
    # Unused later blocks get zero gradient (they do not run).
    assert float(jnp.abs(g_scan["blocks"]["mlp"]["fc1_kernel"][3]).max()) == 0.0
    chex.assert_trees_all_equal(unstack_block_params(stacked), params)


def test_init_layouts_and_logical_axes():
    cfg = tiny_config("siglip")
    x = jnp.zeros((1, 56, 56, 3))
    # eval_shape: the boxes (logical names) and shapes without compiling the initialisers.
    unrolled = jax.eval_shape(lambda k: ViT(cfg).init(k, x, [1]), jax.random.key(0))["params"]
    scanned = jax.eval_shape(
        lambda k: ViT(cfg, scan_layers=True).init(k, x, [1]), jax.random.key(0)
    )["params"]
    assert isinstance(scanned["blocks"]["mlp"]["fc1_kernel"], nn.Partitioned)
    assert scanned["blocks"]["mlp"]["fc1_kernel"].names == ("layers", "embed", "mlp")
    assert unrolled["block_0"]["attn"]["query_kernel"].names == ("embed", "heads", "head_dim")
    un, sc = dict(nn.meta.unbox(unrolled)), dict(nn.meta.unbox(scanned))
    blocks = [un.pop(f"block_{i}") for i in range(cfg.depth)]
    chex.assert_trees_all_equal_shapes(*blocks)
    # The scanned layout is the same block stacked on a leading "layers" axis.
    stacked_block = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((cfg.depth, *a.shape), a.dtype), blocks[0]
    )
    chex.assert_trees_all_equal_shapes(sc.pop("blocks"), stacked_block)
    chex.assert_trees_all_equal_shapes(sc, un)
    assert set(un) == {"patch_kernel", "patch_bias", "pos_embed", "norm", "attn_pool"}


def test_bf16_compute_stays_close():
    cfg, _, params = tower("dinov2")
    x = images((2, 56, 56, 3), seed=4)
    ref = run_vit(cfg, params, x, [cfg.depth - 2])[0]
    out = run_vit(cfg, params, x, [cfg.depth - 2], dtype=jnp.bfloat16)[0]
    chex.assert_type(out, jnp.bfloat16)
    rel = np.abs(out.astype(np.float32) - ref).max() / np.abs(ref).max()
    assert rel < 3e-2, rel


def test_input_errors_name_the_shapes():
    cfg, _, params = tower("siglip")
    model = ViT(cfg)
    with pytest.raises(ValueError, match=r"57x56.*\(1, 57, 56, 3\).*patch size 14"):
        model.apply({"params": params}, jnp.zeros((1, 57, 56, 3)), [0])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(1, 56, 56, 4\)"):
        model.apply({"params": params}, jnp.zeros((1, 56, 56, 4)), [0])
    with pytest.raises(ValueError, match="block index 5 is out of range.*depth 5"):
        model.apply({"params": params}, jnp.zeros((1, 56, 56, 3)), [5])


def _timm_param_count(name: str) -> int:
    timm, torch = import_timm(), import_torch()
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=224, num_classes=0)
    return sum(p.numel() for p in model.parameters())


def _flax_param_count(cfg: ViTConfig, scan: bool) -> int:
    model = ViT(cfg, scan_layers=scan)
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 224, 224, 3)), [cfg.depth - 2]), jax.random.key(0)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("vit_large_patch14_reg4_dinov2", ViTConfig.dinov2_vitl14_reg4()),
        ("vit_so400m_patch14_siglip_224", ViTConfig.siglip_so400m14()),
    ],
)
def test_full_size_parameter_counts_match_timm(name, cfg):
    expected = _timm_param_count(name)
    assert _flax_param_count(cfg, scan=True) == expected
    assert _flax_param_count(cfg, scan=False) == expected


def test_sharded_forward_under_logical_rules_matches_unsharded():
    cfg, _, params = tower("siglip")
    stacked = stack_block_params(params, cfg.depth)
    x = jnp.asarray(images((8, 56, 56, 3), seed=5))
    indices = [1, 3]
    ref = run_vit(cfg, stacked, x, indices, scan_layers=True)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "data"), ("embed", "fsdp"), ("mlp", None), ("heads", None)]
    model = ViT(cfg, scan_layers=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, im: model.apply({"params": p}, im, indices))(stacked, x)
    assert out[0].sharding.spec[0] == "data"
    chex.assert_trees_all_close(list(out), ref, atol=1e-5, rtol=0)


def test_sincos2d_position_init_encodes_rows_and_columns():
    from pixelvla_jax.models.vit import sincos_2d

    cfg = dataclasses.replace(ViTConfig.dinov2_tiny(56), pos_embed_init="sincos2d")
    variables = ViT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 56, 56, 3)))
    pos = np.asarray(nn.unbox(variables["params"]["pos_embed"]))[0]
    table = sincos_2d(cfg.grid_size, cfg.width)
    np.testing.assert_array_equal(pos[-cfg.num_patches :], table)
    # Row features (first half) depend only on the row, column features only on the column.
    grid = table.reshape(4, 4, cfg.width)
    half = cfg.width // 2
    np.testing.assert_array_equal(grid[:, :1, :half].repeat(4, 1), grid[:, :, :half])
    np.testing.assert_array_equal(grid[:1, :, half:].repeat(4, 0), grid[:, :, half:])
    assert len({tuple(r) for r in table.round(6)}) == cfg.num_patches  # all positions differ
    with pytest.raises(ValueError, match="pos_embed_init"):
        dataclasses.replace(cfg, pos_embed_init="learned")
