"""PixelVLA-π0 model (tiny config, pixel and prompt encoders on): KV-cached sampling equals
recomputing the prefix, loss / predict_actions contracts, parameter names and logical axes,
config checks. Parity with transformers' π0 is in test_pi0_weights.py."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models.gemma import gemma_2b, gemma_300m
from pixelvla_jax.models.lora import is_lora_param
from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pi0 import Pi0, Pi0Config, abstract_variables, init_params_fn

CONFIG = Pi0Config.tiny()
B, H = 2, CONFIG.action_horizon


@pytest.fixture(scope="module")
def params():
    """Random params of the right structure, built from the abstract tree (no init compile)."""
    abstract = nn.meta.unbox(abstract_variables(CONFIG)["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(scale=0.2, size=s.shape).astype(np.float32)), abstract
    )


@pytest.fixture(scope="module")
def obs():
    rng = np.random.default_rng(1)
    size = CONFIG.image_size
    return Observation.fake(B, size, vocab_size=500, seed=2).replace(
        wrist_image=jnp.asarray(rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8)),
        has_wrist_image=jnp.asarray([True, False]),
        state=jnp.asarray(rng.normal(size=(B, 8)).astype(np.float32)),
    )


@pytest.fixture(scope="module")
def sample_fn():
    model = Pi0(CONFIG)
    return jax.jit(
        lambda p, o, n, cache: model.apply(
            {"params": p}, o, n, use_cache=cache, method=Pi0.sample_actions
        ),
        static_argnums=3,
    )


def test_kv_cached_sampling_equals_recomputed_prefix(params, obs, sample_fn):
    noise = jax.random.normal(jax.random.key(0), (B, H, CONFIG.model_action_dim))
    cached = sample_fn(params, obs, noise, True)
    recomputed = sample_fn(params, obs, noise, False)
    chex.assert_shape(cached, (B, H, CONFIG.model_action_dim))
    assert float(jnp.abs(cached - noise).max()) > 0.1  # the flow moved the noise
    chex.assert_trees_all_close(cached, recomputed, atol=1e-5, rtol=0)


def test_predict_actions_and_loss(params, obs, sample_fn):
    model = Pi0(CONFIG)
    rng = jax.random.key(3)
    actions = jax.jit(lambda p, o, r: model.apply({"params": p}, o, r, method=Pi0.predict_actions))(
        params, obs, rng
    )
    chex.assert_shape(actions, (B, H, CONFIG.action_dim))
    # predict_actions = sample_actions from N(0, I) drawn from rng, sliced to action_dim.
    noise = jax.random.normal(rng, (B, H, CONFIG.model_action_dim), jnp.float32)
    expected = sample_fn(params, obs, noise, True)[..., : CONFIG.action_dim]
    chex.assert_trees_all_close(actions, expected, atol=1e-5, rtol=0)

    loss_fn = jax.jit(lambda p, a, m: model.apply({"params": p}, obs, a, m, rng, method=Pi0.loss))
    target = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (B, H, CONFIG.action_dim)))
    loss, metrics = loss_fn(params, target, jnp.ones((B, H), bool))
    chex.assert_shape(loss, ())
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert set(metrics) == {"loss", "flow_mse", "flow_mse_per_dim"}
    chex.assert_shape(metrics["flow_mse_per_dim"], (CONFIG.action_dim,))
    # The pad mask weights chunk steps: padding every step but the first of sample 0
    # changes the loss; padding everything gives 0.
    pad = jnp.zeros((B, H), bool).at[0, 0].set(True)
    assert abs(float(loss_fn(params, target, pad)[0]) - float(loss)) > 1e-4
    assert float(loss_fn(params, target, jnp.zeros((B, H), bool))[0]) == 0.0

    with pytest.raises(ValueError, match=r"actions must be \[B, H, action_dim\]"):
        model.apply({"params": params}, obs, target[:, :3], pad[:, :3], rng, method=Pi0.loss)


def test_params_have_openpi_names_and_logical_axes():
    variables = abstract_variables(CONFIG)["params"]
    assert set(variables) == {
        "PaliGemma",
        "state_proj",
        "action_in_proj",
        "action_time_mlp_in",
        "action_time_mlp_out",
        "action_out_proj",
        "pixel_encoder",
        "prompt_encoder",
    }
    llm = variables["PaliGemma"]["llm"]
    assert set(llm) == {"embedder", "layers", "final_norm", "final_norm_1"}
    layers = llm["layers"]
    assert set(layers) == {
        "attn",
        "mlp",
        "mlp_1",
        "pre_attention_norm",
        "pre_attention_norm_1",
        "pre_ffw_norm",
        "pre_ffw_norm_1",
    }
    q1 = layers["attn"]["q_einsum_1"]["kernel"]
    assert q1.names == ("layers", "heads", "embed", "head_dim")
    assert q1.value.shape == (2, 4, 32, 16)  # [L, N, D_expert, H]
    kv = layers["attn"]["kv_einsum"]["kernel"]
    assert kv.names == ("layers", None, "kv_heads", "embed", "head_dim")
    assert kv.value.shape == (2, 2, 1, 64, 16)
    assert layers["mlp"]["gating_einsum"]["kernel"].value.shape == (2, 2, 64, 128)
    # Every param names each of its axes (training/sharding.py shards by these names).
    boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in boxed)
    assert all(len(x.names) == x.value.ndim for x in boxed)
    # init_params_fn builds the same tree (traced abstractly here).
    from_fn = jax.eval_shape(init_params_fn(Pi0(CONFIG)), jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(from_fn, variables)


def test_with_lora_adds_adapters_to_each_expert_only():
    config = CONFIG.replace(use_pixel_encoder=False, use_prompt_encoder=False).with_lora(4, 2)
    params = nn.meta.unbox(abstract_variables(config)["params"])
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    lora = {p: leaf.shape for p, leaf in flat.items() if is_lora_param(p)}
    assert lora["PaliGemma/llm/layers/attn/q_einsum/lora_a"] == (2, 4, 64, 4)
    assert lora["PaliGemma/llm/layers/attn/q_einsum_1/lora_a"] == (2, 4, 32, 2)
    assert lora["PaliGemma/llm/layers/attn/attn_vec_einsum_1/lora_b"] == (2, 1, 2, 32)
    assert lora["PaliGemma/llm/layers/mlp_1/gating_einsum/lora_b"] == (2, 2, 2, 64)
    assert all(p.startswith("PaliGemma/llm/layers/") for p in lora)
    assert len(lora) == 2 * 2 * 5  # (a, b) x 2 experts x 5 einsums
    assert len(config.lora_rules) == 2


def test_prefix_length_and_config_checks(obs):
    model = Pi0(CONFIG)
    prefix = jax.eval_shape(
        lambda p, o: model.apply({"params": p}, o, method=Pi0.embed_prefix),
        abstract_variables(CONFIG)["params"],
        obs,
    )
    tokens, mask, ar = prefix
    length = CONFIG.prefix_length(obs.tokens.shape[1])
    assert length == 2 * 16 + 2 + 2 + 48
    chex.assert_shape([tokens, mask, ar], [(B, length, CONFIG.vlm.width), (B, length), (length,)])
    assert Pi0Config.pi0().prefix_length() == 2 * 256 + 2 + 2 + 48
    assert Pi0Config.pi0().chunk_size == 50 and Pi0Config.pi0().image_size == 224

    with pytest.raises(ValueError, match="must share depth"):
        Pi0Config.pi0(action_expert=gemma_300m(depth=12))
    with pytest.raises(ValueError, match="pixel_encoder.out_dim=64 must equal vlm.width=2048"):
        Pi0Config.pi0(pixel_encoder=CONFIG.pixel_encoder)
    with pytest.raises(ValueError, match="num_cameras"):
        CONFIG.replace(num_cameras=3)
    with pytest.raises(ValueError, match="action_dim"):
        CONFIG.replace(action_dim=33)
    assert gemma_2b().width == 2048 and gemma_300m().mlp_dim == 4096


def test_patch_grounding_loss_adds_a_per_patch_bce_on_the_base_camera(params, obs):
    """With `patch_grounding_weight`, the loss is the flow loss (unchanged, same rng) plus the
    weight times a BCE of the base camera's image tokens against the grounding mask pooled
    onto the patch grid; samples without a mask do not count; the train step's loss
    function passes the batch's grounding targets."""
    from pixelvla_jax.training import builder

    weight = 0.5
    config = CONFIG.replace(patch_grounding_weight=weight)
    model, plain = Pi0(config), Pi0(CONFIG)
    rng = np.random.default_rng(5)
    width = config.vlm.width
    grounded_params = {
        **params,
        "patch_grounding": {
            "kernel": jnp.asarray(rng.normal(scale=0.3, size=(width, 1)).astype(np.float32)),
            "bias": jnp.asarray([0.1], jnp.float32),
        },
    }
    abstract = nn.meta.unbox(abstract_variables(config)["params"])
    chex.assert_trees_all_equal_shapes(abstract, grounded_params)
    size = config.image_size
    grounding = np.zeros((B, size, size), np.float32)
    grounding[0, 3:20, 30:50] = 1.0  # sample 0: one object
    grounding[1, :10, :10] = 1.0  # sample 1: flagged absent, so not counted
    has = jnp.asarray([True, False])
    target = jnp.asarray(rng.uniform(-1, 1, (B, H, config.action_dim)).astype(np.float32))
    pad = jnp.ones((B, H), bool)
    key = jax.random.key(7)
    batch = {
        **{k: v for k, v in vars(obs).items() if v is not None},
        "actions": target,
        "action_pad_mask": pad,
        "grounding_mask": jnp.asarray(grounding),
        "has_grounding_mask": has,
    }
    x_t = jnp.zeros((B, H, config.model_action_dim), jnp.float32)

    @jax.jit
    def run(grounded, plain_params, batch):
        # The train step's loss function (the batch's grounding targets passed through), the
        # plain π0 loss at the same rng, and expert 0's outputs (the reference's input).
        step = builder.make_loss_fn(model)(grounded, batch, key)
        flow, _ = plain.apply({"params": plain_params}, obs, target, pad, key, method=Pi0.loss)
        _, prefix_out = model.apply(
            {"params": grounded}, obs, x_t, jnp.full((B,), 0.5), method=Pi0._forward
        )
        return step, flow, prefix_out

    (loss, metrics), flow, prefix_out = run(grounded_params, params, batch)
    assert {"loss", "flow_mse", "patch_grounding"} <= set(metrics)
    chex.assert_trees_all_close(metrics["flow_mse"], flow, atol=1e-6, rtol=0)

    # The reference: the first N_v prefix outputs (base camera) through the head.
    n = config.num_image_tokens
    grid, cell = int(n**0.5), size // int(n**0.5)
    kernel = np.asarray(grounded_params["patch_grounding"]["kernel"])
    logits = (np.asarray(prefix_out[0, :n]) @ kernel)[:, 0] + 0.1
    pooled = grounding[0].reshape(grid, cell, grid, cell).mean(axis=(1, 3)).reshape(n)
    bce = np.maximum(logits, 0) - logits * pooled + np.log1p(np.exp(-np.abs(logits)))
    np.testing.assert_allclose(float(metrics["patch_grounding"]), bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(flow) + weight * bce.mean(), rtol=1e-5)


def test_target_point_is_generated_as_two_more_action_dims(params, obs):
    """With `target_point_scale`, the flow loss is exactly π0's over actions extended by the
    target's centre mapped to [-1, 1] and scaled (zeros where a sample has no point), and
    `predict_actions` still returns action_dim dims."""
    scale = 3.0
    config = CONFIG.replace(target_point_scale=scale)
    wide = CONFIG.replace(action_dim=CONFIG.action_dim + 2)  # the same params
    model, reference = Pi0(config), Pi0(wide)
    rng = np.random.default_rng(6)
    actions = jnp.asarray(rng.uniform(-1, 1, (B, H, config.action_dim)).astype(np.float32))
    point = jnp.asarray([[0.25, 0.75], [0.5, 0.1]], jnp.float32)
    has = jnp.asarray([True, False])
    extended = np.concatenate(
        [
            np.asarray(actions),
            np.broadcast_to(np.asarray([[[-1.5, 1.5]], [[0.0, 0.0]]]), (B, H, 2)),
        ],
        axis=-1,
    ).astype(np.float32)
    pad = jnp.ones((B, H), bool)
    key = jax.random.key(8)

    @jax.jit
    def run(p):
        loss, _ = model.apply(
            {"params": p}, obs, actions, pad, key, target_point=point, has_target_point=has,
            method=Pi0.loss,
        )  # fmt: skip
        ref, _ = reference.apply(
            {"params": p}, obs, jnp.asarray(extended), pad, key, method=Pi0.loss
        )
        acted = model.apply({"params": p}, obs, key, method=Pi0.predict_actions)
        return loss, ref, acted

    loss, ref, acted = run(params)
    chex.assert_trees_all_close(loss, ref, atol=1e-6, rtol=0)
    chex.assert_shape(acted, (B, H, config.action_dim))
    with pytest.raises(ValueError, match="pass target_point"):
        model.apply({"params": params}, obs, actions, pad, key, method=Pi0.loss)
    with pytest.raises(ValueError, match="model_action_dim"):
        CONFIG.replace(target_point_scale=1.0, model_action_dim=8, model_state_dim=8)
