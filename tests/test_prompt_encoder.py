"""Prompt encoder: SAM position embedding and downscaler parity, padding/order invariance, absent tokens."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models.observation import (
    PROMPT_BOX_BOTTOM_RIGHT,
    PROMPT_BOX_TOP_LEFT,
    PROMPT_LINE,
    PROMPT_NEGATIVE,
    PROMPT_PAD,
    PROMPT_POSITIVE,
)
from pixelvla_jax.models.prompt_encoder import (
    MaskDownscaler,
    PromptEncoder,
    PromptEncoderConfig,
    fourier_matrix,
    fourier_position_embedding,
)
from pixelvla_jax.testing.torch_reference import import_torch

CFG = PromptEncoderConfig.tiny()
B, P, S = 3, 6, 32


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    points = rng.uniform(size=(B, P, 2)).astype(np.float32)
    types = np.array(
        [
            [PROMPT_POSITIVE, PROMPT_NEGATIVE, PROMPT_POSITIVE, PROMPT_PAD, PROMPT_PAD, PROMPT_PAD],
            [PROMPT_BOX_TOP_LEFT, PROMPT_BOX_BOTTOM_RIGHT] + [PROMPT_PAD] * 4,
            [PROMPT_LINE] * 5 + [PROMPT_PAD],
        ],
        np.int32,
    )
    yy, xx = np.mgrid[:S, :S]
    mask = np.stack(
        [((yy - 10 - 4 * i) ** 2 + (xx - 14) ** 2 <= 36).astype(np.float32) for i in range(B)]
    )
    has_mask = np.array([True, False, True])
    return points, types, mask, has_mask


@functools.cache
def _model_and_vars(cfg=CFG):
    model = PromptEncoder(cfg)
    points, types, mask, has = _inputs()
    variables = model.init(jax.random.key(0), points, types, mask, has)
    return model, variables


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


def _apply(model, variables, points, types, mask, has):
    # One compiled program per shape, shared by the tests: cheaper than eager dispatch.
    args = map(jnp.asarray, (points, types, mask, has))
    return np.asarray(_jitted_apply(model)(variables, *args))


def _sam_position_embedding(coords, gaussian):
    """SAM's PositionEmbeddingRandom._pe_encoding on [0, 1] coordinates, in float64."""
    proj = 2 * np.pi * ((2 * coords.astype(np.float64) - 1) @ gaussian.astype(np.float64))
    return np.concatenate([np.sin(proj), np.cos(proj)], axis=-1)


def test_position_embedding_matches_sam_formula():
    gaussian = fourier_matrix(CFG)
    chex.assert_shape(gaussian, (2, CFG.num_fourier_features // 2))
    chex.assert_trees_all_equal(gaussian, fourier_matrix(CFG))  # fixed by the seed
    coords = np.random.default_rng(0).uniform(size=(4, 5, 2)).astype(np.float32)
    expected = _sam_position_embedding(coords, gaussian)
    got = fourier_position_embedding(jnp.asarray(coords), jnp.asarray(gaussian))
    chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=1e-7)


def test_output_shape_dtype_and_no_fourier_param():
    model, variables = _model_and_vars()
    out = _apply(model, variables, *_inputs())
    assert (CFG.num_tokens, CFG.out_dim) == (2, 32)
    chex.assert_shape(out, (B, CFG.num_tokens, CFG.out_dim))
    names = " ".join(
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(variables["params"]))
    )
    assert "gaussian" not in names and "fourier" not in names
    bf16 = PromptEncoder(CFG, dtype=jnp.bfloat16)
    chex.assert_type(jax.jit(bf16.apply)(variables, *map(jnp.asarray, _inputs())), jnp.bfloat16)


def test_padding_never_changes_the_output():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    base = _apply(model, variables, points, types, mask, has)
    rng = np.random.default_rng(3)
    extra = 5
    padded_points = np.concatenate([points, rng.uniform(-5, 5, (B, extra, 2))], axis=1)
    padded_points[0, -1] = np.nan  # garbage in pad slots must not leak
    padded_types = np.concatenate([types, np.full((B, extra), PROMPT_PAD, np.int32)], axis=1)
    padded = _apply(model, variables, padded_points, padded_types, mask, has)
    chex.assert_trees_all_close(padded, base, rtol=1e-6, atol=1e-6)
    # Changing coordinates already in pad slots changes nothing either.
    moved = points.copy()
    moved[types == PROMPT_PAD] = rng.uniform(size=(int((types == PROMPT_PAD).sum()), 2))
    chex.assert_trees_all_close(
        _apply(model, variables, moved, types, mask, has), base, rtol=1e-6, atol=1e-6
    )


def test_permutation_invariance():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    base = _apply(model, variables, points, types, mask, has)
    rng = np.random.default_rng(4)
    for _ in range(2):
        perm = np.stack([rng.permutation(P) for _ in range(B)])
        shuffled = _apply(
            model,
            variables,
            np.take_along_axis(points, perm[..., None], axis=1),
            np.take_along_axis(types, perm, axis=1),
            mask,
            has,
        )
        chex.assert_trees_all_close(shuffled, base, rtol=1e-5, atol=1e-6)


def test_point_types_matter():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    flipped = types.copy()
    flipped[0, 1] = PROMPT_POSITIVE  # the negative click becomes positive
    a = _apply(model, variables, points, types, mask, has)
    b = _apply(model, variables, points, flipped, mask, has)
    assert not np.allclose(a[0, 0], b[0, 0])
    chex.assert_trees_all_equal(a[1:], b[1:])


def test_absent_prompt_path_and_finite_gradients():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    types[1] = PROMPT_PAD  # sample 1: no valid point, no mask
    out = _apply(model, variables, points, types, mask, has)
    absent = np.asarray(nn.unbox(variables["params"])["absent_tokens"])
    chex.assert_trees_all_equal(out[1], absent)
    assert not np.allclose(out[0, 0], absent[0]) and not np.allclose(out[0, 1], absent[1])
    assert not np.allclose(out[2, 1], absent[1])  # sample 2 has a mask: computed token

    all_absent = (
        jnp.asarray(points),
        jnp.zeros((B, P), jnp.int32),
        jnp.zeros((B, S, S)),
        jnp.zeros((B,), bool),
    )

    def loss(params):
        return jnp.sum(model.apply({"params": params}, *all_absent) ** 2)

    chex.assert_tree_all_finite(jax.grad(loss)(variables["params"]))


def test_dense_token_resolution_independence():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    up = np.repeat(np.repeat(mask, 4, axis=1), 4, axis=2)
    chex.assert_trees_all_close(
        _apply(model, variables, points, types, up, has),
        _apply(model, variables, points, types, mask, has),
        rtol=1e-5,
        atol=1e-5,
    )


def test_mask_downscaler_matches_torch_sam_restatement():
    torch = import_torch()
    channels, embed, size = 8, 12, 16
    module = MaskDownscaler(channels, embed, eps=1e-6)
    mask = np.random.default_rng(0).uniform(size=(2, size, size)).astype(np.float32)
    variables = module.init(jax.random.key(1), jnp.asarray(mask))
    # Perturb LayerNorm affine params away from (1, 0) so they are exercised.
    params = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
        nn.unbox(variables["params"]),
    )
    got = np.asarray(module.apply({"params": params}, jnp.asarray(mask)))
    chex.assert_shape(got, (2, size // 4, size // 4, embed))

    def layer_norm_2d(x, p):  # SAM's LayerNorm2d over channels of NCHW
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return (
            torch.tensor(np.asarray(p["scale"]))[:, None, None] * x
            + torch.tensor(np.asarray(p["bias"]))[:, None, None]
        )

    def conv(x, p, stride):
        w = torch.tensor(np.asarray(p["kernel"])).permute(3, 2, 0, 1)  # HWIO -> OIHW
        return torch.nn.functional.conv2d(x, w, torch.tensor(np.asarray(p["bias"])), stride=stride)

    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        x = torch.tensor(mask)[:, None]
        x = gelu(layer_norm_2d(conv(x, params["conv_0"], 2), params["norm_0"]["norm"]))
        x = gelu(layer_norm_2d(conv(x, params["conv_1"], 2), params["norm_1"]["norm"]))
        x = conv(x, params["conv_out"], 1)
    chex.assert_trees_all_close(got, x.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)


def test_validation_errors_name_shapes():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    with pytest.raises(ValueError, match=r"prompt_points must be \[B, P, 2\]"):
        _apply(model, variables, points[..., :1], types, mask, has)
    with pytest.raises(ValueError, match=r"prompt_types .* got \(3, 5\)"):
        _apply(model, variables, points, types[:, :5], mask, has)
    with pytest.raises(ValueError, match=r"prompt_mask .* got \(2, 32, 32\)"):
        _apply(model, variables, points, types, mask[:2], has)
    with pytest.raises(ValueError, match="has_prompt_mask"):
        _apply(model, variables, points, types, mask, has[:2])
    with pytest.raises(ValueError, match="even"):
        PromptEncoderConfig(num_fourier_features=15)


def test_jit_with_and_without_prompts_traces_once():
    model, variables = _model_and_vars()
    points, types, mask, has = _inputs()
    traces = []

    @jax.jit
    def encode(variables, *inputs):
        traces.append(1)
        return model.apply(variables, *inputs)

    encode(variables, *map(jnp.asarray, (points, types, mask, has)))
    encode(
        variables,
        jnp.zeros_like(points),
        jnp.zeros_like(types),
        jnp.zeros_like(mask),
        jnp.zeros((B,), bool),
    )
    encode(variables, *map(jnp.asarray, (points, types, mask, ~has)))
    assert len(traces) == 1


def test_projection_when_fourier_width_differs():
    cfg = PromptEncoderConfig(**{**CFG.__dict__, "num_fourier_features": 10})
    model, variables = _model_and_vars(cfg)
    assert "pos_proj" in nn.unbox(variables["params"])
    chex.assert_shape(_apply(model, variables, *_inputs()), (B, 2, cfg.out_dim))


class JitVariantsTest(chex.TestCase):
    """The positional embedding is the same eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_position_embedding_matches_sam_formula(self):
        gaussian = fourier_matrix(CFG)
        coords = np.random.default_rng(1).uniform(size=(4, 5, 2)).astype(np.float32)
        got = self.variant(fourier_position_embedding)(jnp.asarray(coords), jnp.asarray(gaussian))
        chex.assert_shape(got, (4, 5, CFG.num_fourier_features))
        chex.assert_trees_all_close(
            got, _sam_position_embedding(coords, gaussian), atol=2e-5, rtol=1e-7
        )
