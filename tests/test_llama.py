"""Llama decoder: parity with HF transformers' LlamaForCausalLM, KV cache, masks, layouts, import."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models import llama as llama_lib
from pixelvla_jax.models.llama import KVCache, Llama
from pixelvla_jax.testing.torch_reference import import_timm, import_transformers
from pixelvla_jax.weights.hf_llama import config_from_hf, convert_hf_llama

TOL = 1e-4


def _transformers():
    import_timm()  # installs the torchvision shim that transformers' image utils need
    return import_transformers()


def _hf_model(config: llama_lib.LlamaConfig, seed: int = 0):
    transformers = _transformers()
    import torch

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len,
        initializer_range=0.2,  # larger than HF's default so that the test sees real signal
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    # Random (non-unit) norm scales so that a missed or swapped norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, hf_config, state


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@functools.lru_cache
def _forward(config, dtype=jnp.float32):
    """jit(Llama.forward) without a cache (eager Flax dispatch is slow on a loaded CPU)."""
    llama = Llama(config, dtype=dtype)
    return jax.jit(lambda p, t, pos, m: llama.apply(p, t, pos, m, method="forward")[0])


def _init(config, tokens, positions, mask, seed=0):
    fn = lambda: Llama(config).init(
        jax.random.PRNGKey(seed), tokens, positions, mask, method="forward"
    )
    return jax.jit(fn)()


def _full_inputs(batch: int, length: int):
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    valid = jnp.ones((batch, length), bool)
    mask = llama_lib.make_attention_mask(valid, jnp.zeros_like(valid))
    return positions, mask


@pytest.fixture(scope="module")
def ref():
    """A tiny HF Llama with grouped KV heads (4 query heads, 2 kv heads)."""
    config = llama_lib.tiny(num_heads=4, num_kv_heads=2, depth=2)
    model, hf_config, state = _hf_model(config)
    return config, model, hf_config, state


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_logits_match_hf(ref, kv_heads):
    if kv_heads == ref[0].num_kv_heads:
        config, model, _, state = ref
    else:
        config = ref[0].replace(num_kv_heads=kv_heads)
        model, _, state = _hf_model(config, seed=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    params = convert_hf_llama(state, config)
    positions, mask = _full_inputs(*tokens.shape)
    logits, cache = Llama(config).apply(
        {"params": params}, tokens[:1, :3], positions[:1, :3], mask[:1, :3, :3], method="forward"
    )
    assert cache is None
    logits = _forward(config)({"params": params}, tokens, positions, mask)
    chex.assert_shape(logits, (2, 12, config.vocab_size))
    chex.assert_trees_all_close(logits, _hf_logits(model, tokens), atol=TOL, rtol=0)


def test_kv_cache_decoding_matches_hf(ref):
    config, model, _, state = ref
    rng = np.random.default_rng(1)
    prompt_len, steps, max_len = 5, 6, 16
    tokens = rng.integers(0, config.vocab_size, (2, prompt_len + steps)).astype(np.int32)
    expected = _hf_logits(model, tokens)
    params = {"params": convert_hf_llama(state, config)}
    llama = Llama(config)
    apply = jax.jit(lambda p, t, pos, m, c: llama.apply(p, t, pos, m, c, method=Llama.forward))

    cache = KVCache.init(config, 2, max_len)
    key_valid = jnp.arange(max_len)[None, :] < jnp.array([[prompt_len], [prompt_len]])
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (2, prompt_len))
    mask = llama_lib.make_cache_attention_mask(key_valid, 0, prompt_len)
    logits, cache = apply(params, tokens[:, :prompt_len], positions, mask, cache)
    chex.assert_trees_all_close(logits, expected[:, :prompt_len], atol=TOL, rtol=0)
    assert int(cache.index) == prompt_len
    for t in range(prompt_len, prompt_len + steps):
        key_valid = jnp.arange(max_len)[None, :].repeat(2, 0) <= t
        mask = llama_lib.make_cache_attention_mask(key_valid, cache.index, 1)
        positions = jnp.full((2, 1), t, jnp.int32)
        logits, cache = apply(params, tokens[:, t : t + 1], positions, mask, cache)
        chex.assert_trees_all_close(logits[:, 0], expected[:, t], atol=TOL, rtol=0)
    assert int(cache.index) == prompt_len + steps


def test_right_padded_prompt_keeps_positions(ref):
    """A prompt with padding in the middle gives the same logits on real tokens as without."""
    config, model, _, state = ref
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, config.vocab_size, 4)
    tail = rng.integers(0, config.vocab_size, 3)
    padded = np.concatenate([prompt, [0, 0], tail])[None].astype(np.int32)
    valid = jnp.asarray(np.concatenate([np.ones(4), np.zeros(2), np.ones(3)])[None].astype(bool))
    positions = llama_lib.positions_from_mask(valid)
    np.testing.assert_array_equal(np.asarray(positions[0]), [0, 1, 2, 3, 3, 3, 4, 5, 6])
    mask = llama_lib.make_attention_mask(valid, jnp.zeros_like(valid))
    logits = _forward(config)({"params": convert_hf_llama(state, config)}, padded, positions, mask)
    expected = _hf_logits(model, np.concatenate([prompt, tail])[None])
    real = np.asarray(valid[0])
    chex.assert_trees_all_close(np.asarray(logits)[0, real], expected[0], atol=TOL, rtol=0)


def test_scan_and_remat_layouts_equal_loop(ref):
    config, _, _, state = ref
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 7)).astype(np.int32)
    positions, mask = _full_inputs(*tokens.shape)
    outputs, grads = {}, {}
    for scan, remat in [(False, False), (True, False), (True, True)]:
        cfg = config.replace(scan_layers=scan, remat=remat)
        params = convert_hf_llama(state, cfg)
        if scan:
            chex.assert_axis_dimension(params["layers"]["attn"]["q_proj"]["kernel"], 0, cfg.depth)
            assert "layers_0" not in params

        def loss(p, cfg=cfg):
            logits, _ = Llama(cfg).apply({"params": p}, tokens, positions, mask, method="forward")
            return jnp.mean(jnp.square(logits)), logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        outputs[scan, remat] = np.asarray(logits)
        grads[scan, remat] = g
    loop = outputs[False, False]
    chex.assert_trees_all_close(outputs, {key: loop for key in outputs}, atol=2e-5, rtol=0)
    chex.assert_trees_all_close(
        grads[True, True]["layers"]["mlp"]["up_proj"]["kernel"][1],
        grads[False, False]["layers_1"]["mlp"]["up_proj"]["kernel"],
        atol=2e-5,
        rtol=0,
    )


def test_scan_layout_with_cache(ref):
    config, model, _, state = ref
    config = config.replace(scan_layers=True)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (1, 6)).astype(np.int32)
    expected = _hf_logits(model, tokens)
    params = {"params": convert_hf_llama(state, config)}
    llama = Llama(config)
    apply = jax.jit(lambda p, t, pos, m, c: llama.apply(p, t, pos, m, c, method=Llama.forward))
    cache = KVCache.init(config, 1, 8)
    key_valid = jnp.arange(8)[None] < 5
    mask = llama_lib.make_cache_attention_mask(key_valid, 0, 5)
    _, cache = apply(params, tokens[:, :5], jnp.arange(5)[None], mask, cache)
    mask = llama_lib.make_cache_attention_mask(jnp.arange(8)[None] < 6, cache.index, 1)
    logits, cache = apply(params, tokens[:, 5:], jnp.array([[5]]), mask, cache)
    chex.assert_trees_all_close(logits[:, 0], expected[:, 5], atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "scan, remat", [(False, False), (False, True), (True, False)], ids=["loop", "remat", "scan"]
)
def test_keep_last_equals_the_full_call(ref, scan, remat):
    """keep_last=n: HF's logits at the last n positions (a padded prompt with a bidirectional
    tail, as the action slots), the full call's KV cache, and the same gradients as slicing
    the full call's hidden states (the unrolled last block computes those n rows alone)."""
    config, model, _, state = ref
    cfg = config.replace(scan_layers=scan, remat=remat)
    params = {"params": convert_hf_llama(state, cfg)}
    llama = Llama(cfg)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    positions, mask = _full_inputs(*tokens.shape)
    valid = jnp.asarray(np.arange(9)[None] != 4).repeat(2, 0)  # a gap, a bidirectional tail
    masked = llama_lib.make_attention_mask(valid, jnp.asarray(np.arange(9)[None] >= 6).repeat(2, 0))
    pos = llama_lib.positions_from_mask(valid)
    key_valid = jnp.concatenate([valid, jnp.zeros((2, 3), bool)], axis=1)
    cache_mask = llama_lib.make_cache_attention_mask(key_valid, 0, 9)

    @jax.jit  # one compilation (eager Flax dispatch is slow on a loaded CPU)
    def run(p):
        emb = llama.apply(p, tokens, method=Llama.embed)
        logits = {
            n: llama.apply(p, llama.apply(p, emb, positions, mask, keep_last=n)[0], method="logits")
            for n in (1, 4)
        }

        def loss(p, n):
            hidden = llama.apply(p, emb, pos, masked, keep_last=n)[0][:, -3:]
            return jnp.sum(jnp.square(hidden)), hidden

        grads = {
            k: jax.value_and_grad(loss, has_aux=True)(p, n)
            for k, n in (("part", 3), ("full", None))
        }
        cache = KVCache.init(cfg, 2, 12)
        cached = [llama.apply(p, emb, pos, cache_mask, cache, keep_last=n) for n in (1, None)]
        return logits, grads, cached

    logits, grads, cached = run(params)
    for n in (1, 4):
        chex.assert_shape(logits[n], (2, n, cfg.vocab_size))
        chex.assert_trees_all_close(logits[n], _hf_logits(model, tokens)[:, -n:], atol=TOL, rtol=0)
    (_, part), g_part = grads["part"]
    (_, full), g_full = grads["full"]
    chex.assert_trees_all_close(part, full, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(g_part, g_full, atol=1e-5, rtol=1e-5)
    (h_last, c_last), (h_full, c_full) = cached
    chex.assert_shape(h_last, (2, 1, cfg.width))
    chex.assert_trees_all_close(h_last, h_full[:, -1:], atol=1e-5, rtol=0)
    chex.assert_trees_all_close(c_last, c_full, atol=0, rtol=0)
    emb = llama.apply(params, tokens, method=Llama.embed)
    with pytest.raises(ValueError, match="keep_last=10"):
        llama.apply(params, emb, pos, masked, keep_last=10)


def test_bf16_compute_runs_and_is_close():
    config = llama_lib.tiny()
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, 6)).astype(np.int32)
    positions, mask = _full_inputs(*tokens.shape)
    params = _init(config, tokens, positions, mask)
    f32 = _forward(config)(params, tokens, positions, mask)
    bf16 = _forward(config, jnp.bfloat16)(params, tokens, positions, mask)
    chex.assert_type(bf16, jnp.bfloat16)
    chex.assert_type(jax.tree.leaves(params), jnp.float32)  # params stay f32
    chex.assert_trees_all_close(bf16.astype(jnp.float32), f32, atol=0.05, rtol=0.05)
    # Embed / call / logits as separate methods, and a bf16 KV cache.
    cache = KVCache.init(config, 2, 8, jnp.bfloat16)
    llama = Llama(config, dtype=jnp.bfloat16)
    cmask = llama_lib.make_cache_attention_mask(jnp.ones((2, 8), bool), 0, 6)

    @jax.jit
    def three_steps(params, cache):
        emb = llama.apply(params, tokens, method="embed")
        hidden, cache = llama.apply(params, emb, positions, cmask, cache)
        return emb, hidden, cache, llama.apply(params, hidden, method="logits")

    emb, hidden, cache, logits = three_steps(params, cache)
    chex.assert_shape(
        [emb, hidden, logits], [(2, 6, config.width)] * 2 + [(2, 6, config.vocab_size)]
    )
    chex.assert_type([emb, cache.k], jnp.bfloat16)
    assert int(cache.index) == 6


def test_attention_mask_semantics():
    valid = jnp.array([[True, True, True, True, True, False]])
    bidir = jnp.array([[False, False, False, True, True, False]])
    mask = np.asarray(llama_lib.make_attention_mask(valid, bidir))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_bidirectional_block_in_model():
    """An action-slot token sees a later action-slot token; no prompt token sees the future."""
    config = llama_lib.tiny()
    length = 7
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, (1, length)).astype(np.int32)
    valid = jnp.ones((1, length), bool)
    bidir = jnp.asarray(np.arange(length)[None] >= 4)  # prompt 0..3, action slots 4..6
    mask = llama_lib.make_attention_mask(valid, bidir)
    positions = llama_lib.positions_from_mask(valid)
    params = _init(config, tokens, positions, mask, seed=1)
    forward = _forward(config)
    run = lambda t: np.asarray(forward(params, t, positions, mask))
    changed = tokens.copy()
    changed[0, 6] = (changed[0, 6] + 1) % config.vocab_size  # the last action slot
    base, new = run(tokens), run(changed)
    np.testing.assert_array_equal(base[0, :4], new[0, :4])  # the prompt does not see it
    assert np.abs(base[0, 4] - new[0, 4]).max() > 1e-4  # an earlier action slot does
    changed = tokens.copy()
    changed[0, 2] = (changed[0, 2] + 1) % config.vocab_size  # a prompt token
    new = run(changed)
    np.testing.assert_array_equal(base[0, :2], new[0, :2])
    assert np.abs(base[0, 2:] - new[0, 2:]).max() > 1e-4


def test_params_have_logical_axes_and_7b_shapes():
    config = llama_lib.llama2_7b(scan_layers=True)
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions, mask = _full_inputs(1, 4)
    abstract = jax.eval_shape(
        lambda: Llama(config).init(jax.random.PRNGKey(0), tokens, positions, mask, method="forward")
    )
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    specs = nn.get_partition_spec(abstract)["params"]
    assert tuple(specs["layers"]["attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    n = sum(int(np.prod(x.value.shape)) for x in leaves)
    expected = 2 * 32064 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert n == expected  # ~6.74B


def test_config_from_hf(ref):
    config, _, hf_config, _ = ref
    got = config_from_hf(hf_config.to_dict())
    assert got == config
    nested = config_from_hf({"text_config": hf_config.to_dict()}, scan_layers=True)
    assert nested == config.replace(scan_layers=True)
    # OpenVLA's config.json: a text_config holding only what differs from HF's defaults.
    openvla = config_from_hf(
        {"pad_to_multiple_of": 64, "text_config": {"model_type": "llama", "vocab_size": 32064}}
    )
    assert openvla == llama_lib.llama2_7b()
    with pytest.raises(KeyError, match="hidden_size"):
        config_from_hf({"vocab_size": 10})
    with pytest.raises(ValueError, match="RoPE scaling"):
        config_from_hf({**hf_config.to_dict(), "rope_parameters": {"rope_type": "llama3"}})


def test_import_errors_and_leaf_callback(ref):
    config, _, _, state = ref
    prefixed = {"language_model." + k: v for k, v in state.items()}
    seen = []

    def on_leaf(path, array):
        seen.append(path)
        return jnp.asarray(array, jnp.bfloat16)

    params = convert_hf_llama(
        prefixed.__getitem__, config, prefix="language_model.", scan_layers=True, on_leaf=on_leaf
    )
    assert ("layers", "attn", "q_proj", "kernel") in seen and ("lm_head", "kernel") in seen
    assert len(seen) == len(jax.tree.leaves(params)) == 3 + 9
    chex.assert_type(params["lm_head"]["kernel"], jnp.bfloat16)

    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_llama(missing, config)
    with pytest.raises(KeyError, match=r"language_model\.model\.embed_tokens\.weight"):
        convert_hf_llama(state, config, prefix="language_model.")
    wrong = dict(state)
    wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, config.width), np.float32)
    expected = (config.num_kv_heads * config.head_dim, config.width)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(3, 32\).*" + re_shape(expected)):
        convert_hf_llama(wrong, config)


def re_shape(shape):
    return r"\(" + r", ".join(str(s) for s in shape) + r"\)"


def test_sharded_init_and_forward_on_mesh():
    """Logical names resolve on a (data, fsdp, tensor) mesh; sharded output == unsharded."""
    config = llama_lib.tiny(scan_layers=True)
    positions, mask = _full_inputs(4, 6)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, config.vocab_size, (4, 6)), jnp.int32)
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
        ("length", None),
        ("head_dim", None),
    )
    llama = Llama(config)
    init = lambda: llama.init(jax.random.PRNGKey(0), tokens, positions, mask, method="forward")
    with mesh, nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        params = jax.jit(init, out_shardings=shardings)()
        sharded = jax.jit(lambda p: llama.apply(p, tokens, positions, mask, method="forward")[0])(
            params
        )
    q = params["params"]["layers"]["attn"]["q_proj"]["kernel"].value
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    plain = _forward(config)(nn.unbox(params), tokens, positions, mask)
    chex.assert_trees_all_close(sharded, plain, atol=1e-5, rtol=0)
