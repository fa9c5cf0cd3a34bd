"""The assembled PixelVLA model: sequence layout, heads, one compilation, training, param count."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixelvla_jax.models.action_heads import L1ActionHead
from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pixel_encoder import PixelEncoder
from pixelvla_jax.models.pixelvla import (
    PixelVLA,
    PixelVLAConfig,
    abstract_variables,
    count_params,
    mask_centroid,
)
from pixelvla_jax.models.prompt_encoder import PromptEncoder
from pixelvla_jax.testing.tiny_openvla import fast_random_params

B = 2


def _obs(config: PixelVLAConfig, seed: int = 0) -> Observation:
    return Observation.fake(
        B,
        image_size=config.image_size,
        max_prompt_points=config.max_prompt_points,
        max_tokens=config.max_text_tokens,
        vocab_size=config.tokenizer_vocab_size,
        seed=seed,
    )


def _random_variables(config: PixelVLAConfig, seed: int = 0) -> dict:
    """Host-filled random params (jit-compiling `model.init` costs ~20 CPU-s on its own)."""
    return {"params": fast_random_params(abstract_variables(config)["params"], seed)}


def _fit(model, variables, obs, actions, pad_mask, trainable, lr: float, steps: int):
    """`steps` Adam steps on the `trainable` top-level param groups (the rest frozen):
    -> (final params, [metrics of each step])."""
    tx, step = _train_step(model, obs, actions, pad_mask, trainable, lr)
    params = variables["params"]
    opt_state = tx.init({k: params[k] for k in trainable})
    history = []
    for _ in range(steps):
        params, opt_state, _, metrics = step(params, opt_state)
        history.append(metrics)
    return params, history


def _train_step(model, obs, actions, pad_mask, trainable: tuple[str, ...], lr: float):
    """A jitted Adam step on the `trainable` top-level param groups (the rest frozen)."""
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(train):
            full = {**params, **train}
            return model.apply({"params": full}, obs, actions, pad_mask, method=PixelVLA.loss)

        train = {k: params[k] for k in trainable}
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        updates, opt_state = tx.update(grads, opt_state, train)
        return {**params, **optax.apply_updates(train, updates)}, opt_state, loss, metrics

    return tx, step


@pytest.fixture(scope="module")
def l1_model():
    config = PixelVLAConfig.tiny()
    return config, PixelVLA(config), _random_variables(config)


def test_init_creates_the_same_tree_as_abstract_variables():
    config = PixelVLAConfig.tiny(use_prompt_encoder=False)
    abstract = nn.meta.unbox(abstract_variables(config))
    shapes = jax.eval_shape(PixelVLA(config).init, jax.random.key(0), _obs(config))
    chex.assert_trees_all_equal_shapes(abstract, nn.meta.unbox(shapes))
    assert set(abstract["params"]) == {
        "vision",
        "projector",
        "llm",
        "pixel_encoder",
        "action_slots",
        "action_head",
    }
    assert "lm_head" in abstract["params"]["llm"]  # kept for the OpenVLA import


def test_config_checks_widths():
    config = PixelVLAConfig.tiny()
    with pytest.raises(ValueError, match="pixel_encoder.out_dim"):
        config.replace(pixel_encoder=config.pixel_encoder.__class__.tiny(out_dim=32))
    with pytest.raises(ValueError, match="head"):
        config.replace(head="diffusion")
    assert config.prefix_length(48) == 48 + 16 + 2 + 2
    stage1 = config.replace(use_pixel_encoder=False, use_prompt_encoder=False)
    assert stage1.prefix_length(48) == 48 + 16


def test_prefix_layout(l1_model):
    config, model, variables = l1_model
    obs = _obs(config)
    emb, valid, text = jax.jit(
        lambda v, o: (
            *model.apply(v, o, method=PixelVLA.embed_prefix),
            model.apply(v, o.tokens, method=lambda m, t: m.llm.embed(t)),
        )
    )(variables, obs)
    s = config.prefix_length(config.max_text_tokens)
    chex.assert_shape([emb, valid], [(B, s, config.llama.width), (B, s)])
    n_fixed = 1 + config.vision.num_patches + 4
    assert np.asarray(valid[:, :n_fixed]).all()
    chex.assert_trees_all_equal(valid[:, n_fixed:], obs.token_mask[:, 1:])
    # BOS first, then text after the vision/pixel/prompt tokens: embeddings of the tokens.
    chex.assert_trees_all_close(emb[:, 0], text[:, 0], rtol=1e-7, atol=0)
    chex.assert_trees_all_close(emb[:, n_fixed:], text[:, 1:], rtol=1e-7, atol=0)


def test_l1_predict_shape_and_padding_invariance(l1_model):
    config, model, variables = l1_model
    obs = _obs(config)
    predict = jax.jit(lambda v, o: model.apply(v, o, method=PixelVLA.predict_actions))
    actions = predict(variables, obs)
    chex.assert_shape(actions, (B, config.action_head.chunk_size, 7))
    chex.assert_tree_all_finite(actions)
    # Extra right padding changes neither positions nor attention: same actions.
    pad = 8
    padded = obs.replace(
        tokens=jnp.pad(obs.tokens, ((0, 0), (0, pad))),
        token_mask=jnp.pad(obs.token_mask, ((0, 0), (0, pad))),
    )
    chex.assert_trees_all_close(predict(variables, padded), actions, atol=2e-5, rtol=1e-7)


def test_acting_computes_only_the_read_rows_of_the_last_layer(l1_model):
    """predict_actions runs the last LLM layer on the action slots alone (keep_last); the
    actions equal the training forward's, which runs every position."""
    config, model, variables = l1_model
    obs = _obs(config, seed=3)
    acting, (trained, hidden) = jax.jit(
        lambda v, o: (
            model.apply(v, o, method=PixelVLA.predict_actions),
            model.apply(v, o, method=lambda m, o: m._l1_forward(o)),
        )
    )(variables, obs)
    assert hidden.shape[1] > config.num_action_slots  # the training forward: every position
    chex.assert_trees_all_close(acting, trained, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(acting)).max() > 1e-3


def test_absent_and_present_share_one_compilation(l1_model):
    config, model, variables = l1_model
    traces = []

    @jax.jit
    def predict(v, o):
        traces.append(1)
        return model.apply(v, o, method=PixelVLA.predict_actions)

    mixed = _obs(config)  # sample 0 with mask + prompts, sample 1 without
    absent = mixed.replace(
        has_pixel_mask=jnp.zeros(B, bool),
        has_prompt_mask=jnp.zeros(B, bool),
        prompt_types=jnp.zeros_like(mixed.prompt_types),
    )
    present = mixed.replace(has_pixel_mask=jnp.ones(B, bool), has_prompt_mask=jnp.ones(B, bool))
    out_mixed = predict(variables, mixed)
    out_absent = predict(variables, absent)
    out_present = predict(variables, present)
    assert len(traces) == 1
    # Sample 0 really uses its mask and prompts; sample 1 had none in `mixed`.
    assert np.abs(np.asarray(out_mixed[0] - out_absent[0])).max() > 1e-4
    chex.assert_trees_all_close(out_mixed[1], out_absent[1], atol=1e-5, rtol=1e-7)
    assert np.abs(np.asarray(out_present[1] - out_absent[1])).max() > 1e-4


def test_l1_loss_goes_down_with_adam(l1_model):
    config, model, variables = l1_model
    obs = _obs(config, seed=1)
    rng = np.random.default_rng(0)
    actions = jnp.asarray(rng.uniform(-1, 1, (B, config.chunk_size, 7)), jnp.float32)
    pad_mask = jnp.asarray(np.arange(config.chunk_size)[None] < np.array([[4], [3]]))
    # Stage 2 (PUE) trains the new modules; the backbone stays frozen.
    trainable = ("pixel_encoder", "prompt_encoder", "action_slots", "action_head")
    params, history = _fit(model, variables, obs, actions, pad_mask, trainable, 1e-3, 6)
    losses = [float(m["loss"]) for m in history]
    chex.assert_shape(history[-1]["l1_per_dim"], (7,))
    assert losses[-1] < 0.7 * losses[0], losses
    np.testing.assert_array_equal(params["llm"]["norm"]["scale"], 1.0)  # frozen


def test_discrete_head_cache_decoding_and_loss():
    # Text first (the PixelRef runs' layout): the prefill runs the last LLM layer at the
    # prefix's last position alone (keep_last=1). The vision-first path (OpenVLA's) is checked
    # token for token against OpenVLA's generate in tests/test_openvla_tokens.py.
    config = PixelVLAConfig.tiny(head="discrete", use_prompt_encoder=False, text_first=True)
    model = PixelVLA(config)
    obs = _obs(config, seed=2)
    variables = _random_variables(config, seed=1)
    assert "action_head" not in variables["params"]

    @jax.jit
    def decode(v, o):
        tokens = model.apply(v, o, method=PixelVLA.generate_action_tokens)
        logits = model.apply(v, o, tokens, method=PixelVLA.discrete_logits)
        return tokens, logits, model.apply(v, o, method=PixelVLA.predict_actions)

    tokens, logits, actions = decode(variables, obs)
    chex.assert_shape(
        [tokens, logits, actions], [(B, 7), (B, 8, config.llama.vocab_size), (B, 1, 7)]
    )
    # Greedy KV-cache decoding == argmax of the teacher-forced full-sequence logits.
    chex.assert_trees_all_equal(np.argmax(logits[:, :7], -1), tokens)
    chex.assert_trees_all_close(
        actions[:, 0], config.action_tokenizer.detokenize(tokens), rtol=1e-7, atol=0
    )

    # OpenVLA's loss (7 action tokens + EOS) goes down; accuracy reported.
    target = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (B, 1, 7)), jnp.float32)
    pad_mask = jnp.ones((B, 1), bool)
    trainable = ("llm", "pixel_encoder")
    _, history = _fit(model, variables, obs, target, pad_mask, trainable, 3e-3, 6)
    losses = [float(m["loss"]) for m in history]
    assert set(history[-1]) >= {"loss", "action_accuracy", "l1"}
    assert losses[-1] < 0.8 * losses[0], losses


def test_discrete_head_sampled_decoding():
    base = PixelVLAConfig.tiny(head="discrete", use_prompt_encoder=False)
    obs = _obs(base, seed=2)
    variables = _random_variables(base, seed=1)
    first = base.action_tokenizer.first_token

    def decoder(temperature):
        model = PixelVLA(base.replace(decode_temperature=temperature))

        @jax.jit
        def decode(v, o, rng):
            tokens = model.apply(v, o, rng, method=PixelVLA.generate_action_tokens)
            return tokens, model.apply(v, o, tokens, method=PixelVLA.discrete_logits)

        return model, decode

    # Near T = 0, sampling returns the most likely *action* token at every step (decoded
    # with the KV cache, checked against the teacher-forced logits of the same tokens).
    _, decode = decoder(1e-4)
    tokens, logits = decode(variables, obs, jax.random.key(0))
    restricted = np.asarray(logits[:, :7, first : base.tokenizer_vocab_size])
    chex.assert_trees_all_equal(first + np.argmax(restricted, -1), tokens)

    model, decode = decoder(1.0)
    with pytest.raises(ValueError, match="rng"):
        model.apply(variables, obs, method=PixelVLA.generate_action_tokens)
    a, _ = decode(variables, obs, jax.random.key(3))
    b, _ = decode(variables, obs, jax.random.key(3))
    c, _ = decode(variables, obs, jax.random.key(4))
    chex.assert_trees_all_equal(a, b)  # seeded: reproducible
    assert np.any(np.asarray(a) != np.asarray(c))
    for t in (a, c):
        assert np.all((np.asarray(t) >= first) & (np.asarray(t) < base.tokenizer_vocab_size))
    actions = model.apply(variables, obs, jax.random.key(3), method=PixelVLA.predict_actions)
    chex.assert_trees_all_close(
        actions[:, 0], base.action_tokenizer.detokenize(a), rtol=1e-7, atol=0
    )
    with pytest.raises(ValueError, match="decode_temperature"):
        base.replace(decode_temperature=-1.0)


def _centroid_masks():
    mask = np.zeros((3, 56, 56), np.float32)
    mask[0, 2:6, 10:14] = 1.0  # rows 2-5, cols 10-13
    mask[1, 40, 7] = 1.0
    return mask


def test_mask_centroid_in_image_coordinates():
    mask = _centroid_masks()
    point, valid = mask_centroid(jnp.asarray(mask), jnp.asarray([True, True, True]))
    np.testing.assert_allclose(point[0], [12.0 / 56, 4.0 / 56], atol=1e-6)
    np.testing.assert_allclose(point[1], [7.5 / 56, 40.5 / 56], atol=1e-6)
    np.testing.assert_array_equal(valid, [1.0, 1.0, 0.0])  # an empty mask has no point
    _, valid = mask_centroid(jnp.asarray(mask), jnp.asarray([False, True, True]))
    np.testing.assert_array_equal(valid, [0.0, 1.0, 0.0])


def test_grounding_text_first_point_tokens_and_patch_loss():
    config = PixelVLAConfig.tiny(
        head="discrete",
        use_prompt_encoder=False,
        text_first=True,
        target_point_tokens=True,
        patch_grounding_weight=0.5,
    )
    model = PixelVLA(config)
    obs = _obs(config, seed=2)
    first_mask = obs.pixel_mask[0]  # both samples carry a target mask, at different places
    obs = obs.replace(
        pixel_mask=jnp.stack([first_mask, first_mask[::-1, ::-1]]),
        has_pixel_mask=jnp.ones(B, bool),
    )
    variables = _random_variables(config, seed=1)
    chex.assert_shape(variables["params"]["patch_grounding"]["kernel"], (config.llama.width, 1))

    # Prefix: BOS and the padded text first, then the vision and pixel tokens (all valid).
    emb, valid = model.apply(variables, obs, method=PixelVLA.embed_prefix)
    text = model.apply(variables, obs.tokens, method=lambda m, t: m.llm.embed(t))
    n_text = config.max_text_tokens
    chex.assert_trees_all_close(emb[:, :n_text], text, rtol=1e-7, atol=0)
    chex.assert_trees_all_equal(valid[:, :n_text], obs.token_mask)
    assert np.asarray(valid[:, n_text:]).all()

    @jax.jit
    def decode(v, o):
        tokens = model.apply(v, o, method=PixelVLA.generate_tokens)
        logits = model.apply(v, o, tokens, method=PixelVLA.discrete_logits)
        actions = model.apply(v, o, method=PixelVLA.predict_actions)
        return tokens, logits, actions

    tokens, logits, actions = decode(variables, obs)
    assert config.num_decoded_tokens == 9
    chex.assert_shape(tokens, (B, 9))
    # The cache decodes from the last prefix token (not the last text token) with RoPE
    # positions that skip the text padding: the same tokens as teacher forcing.
    chex.assert_trees_all_equal(np.argmax(logits[:, :9], -1), tokens)
    chex.assert_trees_all_close(
        actions[:, 0], config.action_tokenizer.detokenize(tokens[:, 2:]), rtol=1e-7, atol=0
    )
    padded = obs.replace(
        tokens=jnp.pad(obs.tokens, ((0, 0), (0, 8))),
        token_mask=jnp.pad(obs.token_mask, ((0, 0), (0, 8))),
    )
    chex.assert_trees_all_equal(decode(variables, padded)[0], tokens)

    target = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (B, 1, 7)), jnp.float32)
    pad_mask = jnp.ones((B, 1), bool)
    loss, metrics = model.apply(variables, obs, target, pad_mask, method=PixelVLA.loss)
    assert set(metrics) >= {"action_loss", "patch_grounding", "target_point_error"}
    chex.assert_trees_all_close(
        loss, metrics["action_loss"] + 0.5 * metrics["patch_grounding"], rtol=1e-6, atol=0
    )
    # Without a mask there is nothing to ground: no patch loss, the point tokens unweighted.
    no_mask = obs.replace(has_pixel_mask=jnp.zeros(B, bool))
    _, m0 = model.apply(variables, no_mask, target, pad_mask, method=PixelVLA.loss)
    assert float(m0["patch_grounding"]) == 0.0 and float(m0["target_point_error"]) == 0.0

    trainable = ("llm", "vision", "projector", "patch_grounding")
    _, steps = _fit(model, variables, obs, target, pad_mask, trainable, 3e-3, 8)
    history = [{k: float(m[k]) for k in ("action_loss", "patch_grounding")} for m in steps]
    assert history[-1]["action_loss"] < 0.8 * history[0]["action_loss"], history
    assert history[-1]["patch_grounding"] < history[0]["patch_grounding"], history


def test_grounding_options_are_checked():
    with pytest.raises(ValueError, match="head='discrete'"):
        PixelVLAConfig.tiny(head="l1", target_point_tokens=True)
    with pytest.raises(ValueError, match="text_first=True"):
        PixelVLAConfig.tiny(patch_grounding_weight=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        PixelVLAConfig.tiny(text_first=True, patch_grounding_weight=-1.0)


def _torch_counts():
    from pixelvla_jax.testing.torch_reference import import_timm, import_transformers

    timm = import_timm()
    transformers = import_transformers()
    import torch

    def n(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        dino = timm.create_model(
            "vit_large_patch14_reg4_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=224
        )
        siglip = timm.create_model(
            "vit_so400m_patch14_siglip_224", pretrained=False, num_classes=0, img_size=224
        )
        llm_config = transformers.LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            tie_word_embeddings=False,
        )
        llm = transformers.LlamaForCausalLM(llm_config)
    return n(dino), n(siglip), n(llm)


def test_openvla_7b_param_count_matches_references():
    config = PixelVLAConfig.openvla_7b()
    params = nn.meta.unbox(abstract_variables(config))["params"]
    dino, siglip, llm = _torch_counts()
    d_v, hidden, d_llm, _ = config.vision.projector_dims
    projector = d_v * hidden + hidden + hidden * d_llm + d_llm + d_llm * d_llm + d_llm
    assert (d_v, hidden, d_llm) == (2176, 8704, 4096)

    def sub_count(module, *args):
        return count_params(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])

    sds = jax.ShapeDtypeStruct
    spec = config.spec(1)
    siglip_levels = [sds((1, 256, 1152), jnp.float32)] * config.pixel_encoder.num_levels
    pixel = sub_count(
        PixelEncoder(config.pixel_encoder), siglip_levels, spec.pixel_mask, spec.has_pixel_mask
    )
    prompt = sub_count(
        PromptEncoder(config.prompt_encoder),
        spec.prompt_points,
        spec.prompt_types,
        spec.prompt_mask,
        spec.has_prompt_mask,
    )
    head = sub_count(
        L1ActionHead(config.action_head), sds((1, config.num_action_slots, 4096), jnp.float32)
    )
    slots = config.num_action_slots * 4096

    assert count_params(params["vision"]) == dino + siglip
    assert count_params(params["projector"]) == projector
    assert count_params(params["llm"]) == llm
    assert count_params(params["pixel_encoder"]) == pixel
    assert count_params(params["prompt_encoder"]) == prompt
    assert count_params(params["action_head"]) == head
    assert count_params(params) == dino + siglip + projector + llm + pixel + prompt + head + slots
    # OpenVLA-7B itself: ~7.54B parameters.
    assert 7.5e9 < dino + siglip + projector + llm < 7.6e9


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_centroid(self):
        """The centroid of each mask in [0, 1] (x, y) image coordinates, eagerly and under jit."""
        centroid = self.variant(mask_centroid)
        point, valid = centroid(jnp.asarray(_centroid_masks()), jnp.asarray([True, True, False]))
        chex.assert_shape([point, valid], [(3, 2), (3,)])
        chex.assert_trees_all_close(
            point[:2], np.array([[12.0 / 56, 4.0 / 56], [7.5 / 56, 40.5 / 56]]), atol=1e-6, rtol=0
        )
        chex.assert_trees_all_equal(valid, np.array([1.0, 1.0, 0.0]))
