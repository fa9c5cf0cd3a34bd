"""LoRA: exact identity at init, merge == unmerged, regex selection by module path, scales."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models import llama as llama_lib
from pixelvla_jax.models.llama import Llama
from pixelvla_jax.models.lora import (
    Dense,
    LoRAConfig,
    is_lora_param,
    lora_config_for_path,
    lora_mask,
    lora_paths,
    merge_lora,
)

QV_RULES = ((r".*/attn/(q_proj|v_proj)", LoRAConfig(rank=4, alpha=8.0)),)


def _inputs(config, batch=2, length=6, seed=0):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    valid = jnp.ones((batch, length), bool)
    mask = llama_lib.make_attention_mask(valid, jnp.zeros_like(valid))
    return jnp.asarray(tokens, jnp.int32), positions, mask


def _init(config, inputs, seed=0):
    fn = lambda: Llama(config).init(jax.random.PRNGKey(seed), *inputs, method="forward")
    return nn.unbox(jax.jit(fn)())["params"]


@functools.lru_cache
def _forward(config):
    llama = Llama(config)
    return jax.jit(lambda p, t, pos, m: llama.apply({"params": p}, t, pos, m, method="forward")[0])


def _randomize_lora_b(params, seed=1):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [
        0.1 * jax.random.normal(k, x.shape, x.dtype) if str(p[-1].key) == "lora_b" else x
        for (p, x), k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def _copy_base_into(lora_params, base_params):
    """The LoRA model's params with every base leaf taken from `base_params`."""

    def walk(lora, base):
        if not isinstance(lora, dict):
            return base
        return {k: (v if k in ("lora_a", "lora_b") else walk(v, base[k])) for k, v in lora.items()}

    return walk(lora_params, base_params)


def test_scales():
    assert LoRAConfig(rank=32, alpha=16).scale == 0.5
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scale == pytest.approx(8 / math.sqrt(16))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0, alpha=1)


def test_dense_zero_init_is_base_and_scale_applies():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
    config = LoRAConfig(rank=4, alpha=2.0, rslora=True)
    base = Dense(8, use_bias=True, kernel_axes=("embed", "mlp"))
    lora = Dense(8, use_bias=True, kernel_axes=("embed", "mlp"), lora_rules=((".*", config),))
    p_base = nn.unbox(base.init(jax.random.PRNGKey(1), x))
    p_lora = nn.unbox(lora.init(jax.random.PRNGKey(1), x))
    chex.assert_shape(p_lora["params"]["lora_a"], (16, 4))
    chex.assert_shape(p_lora["params"]["lora_b"], (4, 8))
    np.testing.assert_array_equal(np.asarray(p_lora["params"]["lora_b"]), 0)
    p_lora["params"]["kernel"] = p_base["params"]["kernel"]
    p_lora["params"]["bias"] = p_base["params"]["bias"] + 0.5
    p_base["params"]["bias"] = p_lora["params"]["bias"]
    chex.assert_trees_all_equal(lora.apply(p_lora, x), base.apply(p_base, x))
    # With a non-zero B the output is x W + b + scale (x A) B.
    b = jax.random.normal(jax.random.PRNGKey(2), (4, 8))
    p_lora["params"]["lora_b"] = b
    want = (
        x @ p_base["params"]["kernel"]
        + p_base["params"]["bias"]
        + config.scale * (x @ p_lora["params"]["lora_a"]) @ b
    )
    chex.assert_trees_all_close(lora.apply(p_lora, x), want, atol=1e-5, rtol=1e-7)
    # Logical axes of the adapters follow the kernel's.
    boxed = lora.init(jax.random.PRNGKey(1), x)["params"]
    assert boxed["lora_a"].names == ("embed", None)
    assert boxed["lora_b"].names == (None, "mlp")


def test_path_matching_in_submodule_under_remat():
    """The rule sees the full module path, also through nn.remat; matching is a full match."""
    rules = ((r"block/llm/q_proj", LoRAConfig(2, 2)), (r"k_proj", LoRAConfig(2, 2)))

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Dense(4, name="k_proj", lora_rules=rules)(x)  # block/llm/k_proj: no full match
            return Dense(4, name="q_proj", lora_rules=rules)(x)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Dense(4, name="q_proj", lora_rules=rules)(x)  # block/q_proj: no match
            return nn.remat(Inner)(name="llm")(x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Block(name="block")(x)

    params = Outer().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
    assert lora_paths(params) == ["block/llm/q_proj/lora_a", "block/llm/q_proj/lora_b"]
    assert lora_config_for_path("k_proj", rules) is rules[1][1]
    assert lora_config_for_path("x/k_proj", rules) is None


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_llama_lora_selection_identity_and_merge(scan):
    base_cfg = llama_lib.tiny(scan_layers=scan, remat=scan)
    lora_cfg = base_cfg.replace(lora_rules=QV_RULES)
    inputs = _inputs(base_cfg)
    base = _init(base_cfg, inputs)
    lora = _copy_base_into(_init(lora_cfg, inputs, seed=3), base)

    # The regex selects only q_proj / v_proj of every layer.
    prefixes = ["layers"] if scan else [f"layers_{i}" for i in range(base_cfg.depth)]
    want = sorted(
        f"{p}/attn/{proj}/{name}"
        for p in prefixes
        for proj in ("q_proj", "v_proj")
        for name in ("lora_a", "lora_b")
    )
    assert lora_paths(lora) == want
    if scan:
        chex.assert_shape(lora["layers"]["attn"]["q_proj"]["lora_a"], (base_cfg.depth, 32, 4))
    mask = lora_mask(lora)
    assert sum(jax.tree.leaves(mask)) == len(want)
    assert is_lora_param(("layers", "attn", "q_proj", "lora_b"))
    assert not is_lora_param("layers/attn/q_proj/kernel")

    # Zero-initialised B: exactly the base model.
    base_logits = np.asarray(_forward(base_cfg)(base, *inputs))
    chex.assert_trees_all_equal(_forward(lora_cfg)(lora, *inputs), base_logits)

    # Random B: merged base model == unmerged LoRA model.
    lora = _randomize_lora_b(lora)
    unmerged = np.asarray(_forward(lora_cfg)(lora, *inputs))
    assert np.abs(unmerged - base_logits).max() > 1e-3
    merged = merge_lora(lora, QV_RULES)
    assert lora_paths(merged) == []
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    chex.assert_trees_all_close(_forward(base_cfg)(merged, *inputs), unmerged, atol=1e-5, rtol=0)
    # The same with explicit per-path scales, and a boxed ({"params": Partitioned}) tree.
    scales = {p.rsplit("/", 1)[0]: QV_RULES[0][1].scale for p in want}
    chex.assert_trees_all_equal(merge_lora({"params": lora}, scales)["params"], merged)


def test_merge_keeps_partitioning_and_reports_missing_rule():
    cfg = llama_lib.tiny(depth=1, lora_rules=((r".*/mlp/up_proj", LoRAConfig(2, 4)),))
    inputs = _inputs(cfg, length=3)
    boxed = jax.jit(lambda: Llama(cfg).init(jax.random.PRNGKey(0), *inputs, method="forward"))()
    merged = merge_lora(boxed, cfg.lora_rules)["params"]
    kernel = merged["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "mlp")
    assert set(merged["layers_0"]["mlp"]["up_proj"]) == {"kernel"}
    with pytest.raises(ValueError, match="layers_0/mlp/up_proj"):
        merge_lora(boxed, ((r".*/q_proj", LoRAConfig(2, 4)),))


class MergeLoRAJitTest(chex.TestCase):
    """merge_lora folds the adapter the same way eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_folds_adapter_into_kernel(self):
        config = LoRAConfig(rank=4, alpha=8.0)
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
        lora = Dense(8, use_bias=True, lora_rules=((".*", config),))
        params = nn.unbox(lora.init(jax.random.PRNGKey(1), x))["params"]
        params["lora_b"] = jax.random.normal(jax.random.PRNGKey(2), (4, 8))
        merged = self.variant(lambda p: merge_lora(p, config))(params)
        assert set(merged) == {"kernel", "bias"}
        want = params["kernel"] + config.scale * params["lora_a"] @ params["lora_b"]
        chex.assert_trees_all_close(merged["kernel"], want, atol=1e-6, rtol=1e-6)
        chex.assert_trees_all_equal(merged["bias"], params["bias"])
        # The merged plain layer computes what the unmerged LoRA layer computes.
        base = Dense(8, use_bias=True)
        chex.assert_trees_all_close(
            base.apply({"params": merged}, x), lora.apply({"params": params}, x), atol=1e-5, rtol=0
        )
