"""Pixel-aware encoder: pooling against numpy, empty masks, resolution independence, absent tokens."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from pixelvla_jax.models.pixel_encoder import (
    MaskPooling,
    PixelEncoder,
    PixelEncoderConfig,
    area_resize,
    evenly_spaced_blocks,
)

B = 3
LEVEL_SHAPES = [(16, 8), (4, 12)]  # (N_i, D_i): 4x4 and 2x2 grids


def _levels(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, n, d)), jnp.float32) for n, d in LEVEL_SHAPES]


def _disc_mask(size, batch=B, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    masks = []
    for _ in range(batch):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 <= 0.2**2).astype(np.float32))
    return np.stack(masks)


def _block_mean(mask, side):
    b, h, w = mask.shape
    return mask.reshape(b, side, h // side, side, w // side).mean(axis=(2, 4))


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _mlp_np(p, x):
    i = 0
    while f"hidden_{i}" in p:
        x = _gelu(x @ p[f"hidden_{i}"]["kernel"] + p[f"hidden_{i}"]["bias"])
        i += 1
    return x @ p["out"]["kernel"] + p["out"]["bias"]


def _init(cfg, levels, mask, has):
    model = PixelEncoder(cfg)
    variables = model.init(jax.random.key(0), levels, jnp.asarray(mask), jnp.asarray(has))
    return model, variables


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(27, 4) == [5, 12, 19, 26]
    assert evenly_spaced_blocks(24, 4) == [5, 11, 17, 23]
    assert evenly_spaced_blocks(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_blocks(12, 1) == [11]
    with pytest.raises(ValueError, match="num_levels <= 3"):
        evenly_spaced_blocks(3, 4)


def test_area_resize_matches_block_mean_and_preserves_mass():
    mask = _disc_mask(32)
    chex.assert_trees_all_close(
        area_resize(jnp.asarray(mask), 4, 4), _block_mean(mask, 4), atol=1e-6, rtol=1e-7
    )
    # Non-divisible sizes: upsample by the other size (exact) then block-average.
    odd = np.random.default_rng(1).uniform(size=(2, 10, 7)).astype(np.float32)
    up = np.repeat(np.repeat(odd, 3, axis=1), 3, axis=2)  # [2, 30, 21]
    expected = up.reshape(2, 3, 10, 3, 7).mean(axis=(2, 4))
    chex.assert_trees_all_close(area_resize(jnp.asarray(odd), 3, 3), expected, atol=1e-6, rtol=1e-7)
    chex.assert_trees_all_close(
        area_resize(jnp.asarray(odd), 4, 5).mean(axis=(1, 2)),
        odd.mean(axis=(1, 2)),
        atol=1e-6,
        rtol=1e-7,
    )


def _pooling_case():
    """Features, masks (the second one empty) and numpy's mask-weighted mean."""
    feats = np.random.default_rng(0).normal(size=(B, 16, 5)).astype(np.float32)
    mask = _disc_mask(32)
    mask[1] = 0.0  # empty: pooled features must be exactly 0
    p = _block_mean(mask, 4).reshape(B, 16)
    expected = np.einsum("bn,bnd->bd", p, feats) / np.maximum(p.sum(-1, keepdims=True), 1e-6)
    return feats, mask, expected


def test_mask_pooling_matches_numpy():
    feats, mask, expected = _pooling_case()
    got = MaskPooling(eps=1e-6).apply({}, jnp.asarray(feats), jnp.asarray(mask))
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), 0.0)


@pytest.mark.parametrize("aggregation", ["sum", "concat"])
def test_encoder_matches_numpy_restatement(aggregation):
    cfg = PixelEncoderConfig(**{**PixelEncoderConfig.tiny().__dict__, "aggregation": aggregation})
    levels = _levels()
    mask = _disc_mask(32)
    has = np.array([True, True, False])
    model, variables = _init(cfg, levels, mask, has)
    out = model.apply(variables, levels, jnp.asarray(mask), jnp.asarray(has))
    assert (cfg.num_tokens, cfg.out_dim) == (2, 32)
    chex.assert_shape(out, (B, cfg.num_tokens, cfg.out_dim))

    p = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    projected = []
    for i, f in enumerate(levels):
        side = int(np.sqrt(f.shape[1]))
        w = _block_mean(mask, side).reshape(B, -1)
        pooled = np.einsum("bn,bnd->bd", w, np.asarray(f)) / np.maximum(
            w.sum(-1, keepdims=True), 1e-6
        )
        projected.append(pooled @ p[f"level_proj_{i}"]["kernel"] + p[f"level_proj_{i}"]["bias"])
    agg = sum(projected) if aggregation == "sum" else np.concatenate(projected, -1)
    semantic = _mlp_np(p["semantic_mlp"], agg)
    spatial = _mlp_np(p["spatial_mlp"], _block_mean(mask, cfg.spatial_grid).reshape(B, -1))
    expected = np.stack([semantic, spatial], axis=1)
    expected[2] = p["absent_tokens"]
    chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-5)
    in_width = cfg.proj_dim * (cfg.num_levels if aggregation == "concat" else 1)
    chex.assert_axis_dimension(p["semantic_mlp"]["hidden_0"]["kernel"], 0, in_width)


def test_empty_mask_is_finite_with_finite_gradients():
    cfg = PixelEncoderConfig.tiny()
    levels = _levels()
    mask = jnp.zeros((B, 32, 32))
    has = jnp.array([True, False, True])
    model, variables = _init(cfg, levels, mask, has)

    def loss(params, levels):
        out = model.apply({"params": params}, levels, mask, has)
        return jnp.sum(out**2), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], levels
    )
    chex.assert_tree_all_finite((out, value, grads))


def test_resolution_independence():
    cfg = PixelEncoderConfig.tiny()
    levels = _levels()
    mask224 = _disc_mask(224)
    mask448 = np.repeat(np.repeat(mask224, 2, axis=1), 2, axis=2)
    has = jnp.ones((B,), bool)
    model, variables = _init(cfg, levels, mask224, has)
    out224 = model.apply(variables, levels, jnp.asarray(mask224), has)
    out448 = model.apply(variables, levels, jnp.asarray(mask448), has)
    chex.assert_trees_all_close(out224, out448, rtol=1e-5, atol=1e-5)
    # The same disc drawn independently at the two resolutions: equal up to rasterisation.
    drawn448 = _disc_mask(448)
    out_drawn = model.apply(variables, levels, jnp.asarray(drawn448), has)
    chex.assert_trees_all_close(
        out224, out_drawn, atol=0.05 * float(jnp.abs(out224).max()), rtol=1e-7
    )


def test_absent_path_uses_absent_embedding():
    cfg = PixelEncoderConfig.tiny()
    levels = _levels()
    mask = _disc_mask(32)
    has = jnp.array([False, True, False])
    model, variables = _init(cfg, levels, mask, has)
    out = model.apply(variables, levels, jnp.asarray(mask), has)
    absent = np.asarray(nn.unbox(variables["params"])["absent_tokens"])
    chex.assert_trees_all_equal(out[0], absent)
    chex.assert_trees_all_equal(out[2], absent)
    assert not np.allclose(np.asarray(out[1]), absent)
    # The absent tokens do not depend on the (ignored) mask content.
    out_other = model.apply(variables, levels, jnp.asarray(_disc_mask(32, seed=5)), has)
    chex.assert_trees_all_equal(out_other[0], absent)


def test_single_token_without_spatial_and_bfloat16():
    cfg = PixelEncoderConfig(**{**PixelEncoderConfig.tiny().__dict__, "spatial_token": False})
    levels = _levels()
    mask, has = jnp.asarray(_disc_mask(32)), jnp.ones((B,), bool)
    model = PixelEncoder(cfg, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), levels, mask, has)
    out = model.apply(variables, levels, mask, has)
    chex.assert_shape(out, (B, 1, cfg.out_dim))
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_type(jax.tree.leaves(nn.unbox(variables["params"])), jnp.float32)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["absent_tokens"]) == (None, "embed")
    assert tuple(specs["semantic_mlp"]["out"]["kernel"]) == ("mlp", "embed")


def test_validation_errors_name_shapes():
    cfg = PixelEncoderConfig.tiny()
    levels = _levels()
    model, variables = _init(cfg, levels, _disc_mask(32), np.ones(B, bool))
    has = jnp.ones((B,), bool)
    with pytest.raises(ValueError, match=r"\(2, 32, 32\)"):
        model.apply(variables, levels, jnp.zeros((2, 32, 32)), has)
    with pytest.raises(ValueError, match=r"\(3, 1, 32, 32\)"):
        model.apply(variables, levels, jnp.zeros((B, 1, 32, 32)), has)
    with pytest.raises(ValueError, match="has_mask"):
        model.apply(variables, levels, jnp.zeros((B, 32, 32)), jnp.ones((2,), bool))
    with pytest.raises(ValueError, match="not a square"):
        model.apply(variables, [levels[0][:, :15], levels[1]], jnp.zeros((B, 32, 32)), has)
    with pytest.raises(ValueError, match="expects 2 feature levels"):
        model.apply(variables, levels[:1], jnp.zeros((B, 32, 32)), has)
    with pytest.raises(ValueError, match="aggregation"):
        PixelEncoderConfig(aggregation="mean")


def test_jit_with_and_without_masks_traces_once():
    cfg = PixelEncoderConfig.tiny()
    levels = _levels()
    model, variables = _init(cfg, levels, _disc_mask(32), np.ones(B, bool))
    traces = []

    @jax.jit
    def encode(variables, levels, mask, has):
        traces.append(1)
        return model.apply(variables, levels, mask, has)

    with_mask = encode(variables, levels, jnp.asarray(_disc_mask(32)), jnp.ones((B,), bool))
    without = encode(variables, levels, jnp.zeros((B, 32, 32)), jnp.zeros((B,), bool))
    mixed = encode(variables, levels, jnp.asarray(_disc_mask(32)), jnp.array([True, False, True]))
    assert len(traces) == 1
    chex.assert_trees_all_equal(mixed[0], with_mask[0])
    chex.assert_trees_all_equal(mixed[1], without[1])


def test_sharded_init_and_apply_on_a_mesh():
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    cfg = PixelEncoderConfig.tiny()
    model = PixelEncoder(cfg)
    levels = _levels(batch=8)
    mask, has = jnp.asarray(_disc_mask(32, batch=8)), jnp.ones((8,), bool)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), levels, mask, has)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        variables = jax.jit(model.init, out_shardings=shardings)(
            jax.random.key(0), levels, mask, has
        )
        out = jax.jit(model.apply)(variables, levels, mask, has)
    kernel = nn.unbox(variables["params"])["semantic_mlp"]["out"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert out.sharding.spec[0] == ("data", "fsdp")
    unsharded = model.apply(jax.device_get(variables), levels, mask, has)
    chex.assert_trees_all_close(out, unsharded, rtol=1e-5, atol=1e-6)


class JitVariantsTest(chex.TestCase):
    """Mask pooling and area resizing give the same results eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_pooling_matches_numpy(self):
        feats, mask, expected = _pooling_case()
        pool = self.variant(lambda f, m: MaskPooling(eps=1e-6).apply({}, f, m))
        got = pool(jnp.asarray(feats), jnp.asarray(mask))
        chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(got[1]), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_area_resize_matches_block_mean(self):
        mask = _disc_mask(32)
        resize = self.variant(area_resize, static_argnums=(1, 2))
        chex.assert_trees_all_close(
            resize(jnp.asarray(mask), 4, 4), _block_mean(mask, 4), atol=1e-6, rtol=1e-7
        )
