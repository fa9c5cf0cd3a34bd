"""Optimizer, freeze policy, schedules and the train step, on a toy MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pixelvla_jax.training import optimizer as opt_lib
from pixelvla_jax.training import param_rules as policy
from pixelvla_jax.training.mesh import make_mesh
from pixelvla_jax.training.sharding import DEFAULT_RULES
from pixelvla_jax.training.train_state import create_train_state, make_train_step


class ToyMLP(nn.Module):
    """[B, 4] -> [B, 2]; an embedding-free stand-in for the model, with logical axis names."""

    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(
            self.hidden,
            kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="backbone",
        )(x)
        x = nn.LayerNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="norm",
        )(jnp.tanh(x))
        return nn.Dense(
            2,
            kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
            name="head",
        )(x)


MODEL = ToyMLP()


def init_params(rng):
    return MODEL.init(rng, jnp.zeros((1, 4)))["params"]


def toy_batch(step: int, batch_size: int = 8):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(batch_size, 4)).astype(np.float32)
    y = np.stack([x[:, 0] - x[:, 1], 0.5 * x[:, 2] * x[:, 3]], -1).astype(np.float32)
    return {"x": x, "y": y}


def loss_fn(params, batch, rng):
    del rng
    pred = MODEL.apply({"params": params}, batch["x"])
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss}


def make_cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        {
            "lr": 1e-2,
            "schedule": "constant",
            "warmup_steps": 0,
            "total_steps": 100,
            "weight_decay": 0.01,
            "clip_grad_norm": 1.0,
            "grad_accum_steps": 1,
            "freeze": [],
        }
    )
    cfg.update(overrides)
    return cfg


def setup(cfg, mesh_shape=None, frozen_dtype=None):
    mesh = make_mesh(mesh_shape or {"data": -1})
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(init_params, rng)
    tx = opt_lib.make_optimizer(cfg, abstract)
    labels = opt_lib.freeze_labels(cfg, abstract)
    state, shardings = create_train_state(
        init_params, tx, mesh, DEFAULT_RULES, rng, labels=labels, frozen_dtype=frozen_dtype
    )
    step = make_train_step(
        loss_fn,
        tx,
        shardings,
        labels=labels,
        learning_rate_fn=opt_lib.learning_rate_fn(cfg),
        grad_accum_steps=cfg.grad_accum_steps,
    )
    return state, step, labels


def test_path_str_and_labels():
    params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    paths = policy.param_paths(nn.unbox(params))
    assert paths == [
        "backbone/bias",
        "backbone/kernel",
        "head/bias",
        "head/kernel",
        "norm/bias",
        "norm/scale",
    ]
    # Boxed trees give the same names (the flax box's `value` field is skipped).
    assert policy.param_paths(params) == paths
    labels = policy.param_labels(nn.unbox(params), [(r"backbone/.*", "frozen")])
    assert labels["backbone"] == {"bias": "frozen", "kernel": "frozen"}
    assert labels["head"]["kernel"] == "trained"
    decay = policy.weight_decay_mask(nn.unbox(params))
    assert decay == {
        "backbone": {"bias": False, "kernel": True},
        "head": {"bias": False, "kernel": True},
        "norm": {"bias": False, "scale": False},
    }


def test_typo_regex_raises():
    params = nn.unbox(jax.eval_shape(init_params, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"rule 'backbnoe/\.\*' matched no parameter"):
        policy.param_labels(params, [(r"backbnoe/.*", "frozen")])
    with pytest.raises(ValueError, match="not one of"):
        policy.param_labels(params, [(r"backbone/.*", "freeze")])


def test_schedules():
    cos = opt_lib.learning_rate_fn(
        {"lr": 1.0, "schedule": "cosine", "warmup_steps": 10, "total_steps": 110}
    )
    np.testing.assert_allclose(cos(0), 0.0)
    np.testing.assert_allclose(cos(5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(cos(10), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cos(60), 0.5, rtol=1e-5)  # half-way through the decay
    np.testing.assert_allclose(cos(110), 0.0, atol=1e-7)
    const = opt_lib.learning_rate_fn({"lr": 2.0, "schedule": "constant", "warmup_steps": 4})
    np.testing.assert_allclose([const(s) for s in (0, 2, 4, 1000)], [0.0, 1.0, 2.0, 2.0])
    assert float(opt_lib.learning_rate_fn({"lr": 3.0, "schedule": "constant"})(0)) == 3.0
    # Warmup 10, flat to step 80, linear decay over the last 20% (20 steps) to 0.1 * lr.
    wsd = opt_lib.learning_rate_fn(
        {"lr": 1.0, "schedule": "wsd", "warmup_steps": 10, "total_steps": 100, "end_lr_factor": 0.1}
    )
    np.testing.assert_allclose(
        [wsd(s) for s in (0, 5, 10, 50, 80, 90, 100, 200)],
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="decay_fraction"):
        opt_lib.learning_rate_fn({"schedule": "wsd", "decay_fraction": 0.0})
    with pytest.raises(ValueError, match="schedule"):
        opt_lib.learning_rate_fn({"schedule": "linear"})


def test_loss_falls_and_frozen_params_bitwise_unchanged():
    cfg = make_cfg(freeze=[(r"backbone/.*", "frozen")])
    state, step, labels = setup(cfg, {"data": 4, "fsdp": 2})
    before = jax.tree.map(np.asarray, state.params)
    losses = []
    for i in range(30):
        state, metrics = step(state, toy_batch(i))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    after = jax.tree.map(np.asarray, state.params)
    for name in ("bias", "kernel"):
        np.testing.assert_array_equal(after["backbone"][name], before["backbone"][name])
    assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
    assert float(metrics["grad_norm"]) > 0
    assert int(state.step) == 30
    # No optimizer state is allocated for frozen parameters.
    opt_paths = policy.param_paths(state.opt_state)
    assert not any("backbone" in p for p in opt_paths), opt_paths


def test_frozen_params_in_bf16():
    cfg = make_cfg(freeze=[(r"backbone/.*", "frozen")])
    state, step, _ = setup(cfg, frozen_dtype=jnp.bfloat16)
    assert state.params["backbone"]["kernel"].dtype == jnp.bfloat16
    assert state.params["head"]["kernel"].dtype == jnp.float32
    frozen = np.asarray(state.params["backbone"]["kernel"])
    for i in range(3):
        state, _ = step(state, toy_batch(i))
    assert state.params["backbone"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state.params["backbone"]["kernel"]), frozen)


def test_gradient_accumulation_matches_big_batch():
    k = 4
    cfg_acc = make_cfg(grad_accum_steps=k, lr=5e-2, weight_decay=0.1)
    cfg_big = make_cfg(grad_accum_steps=1, lr=5e-2, weight_decay=0.1)
    state_acc, step_acc, _ = setup(cfg_acc)
    state_big, step_big, _ = setup(cfg_big)
    for opt_step in range(2):
        micro = [toy_batch(100 * opt_step + j, batch_size=8) for j in range(k)]
        for j, b in enumerate(micro):
            prev = jax.tree.map(np.asarray, state_acc.params)
            state_acc, _ = step_acc(state_acc, b)
            if j < k - 1:  # no update until the k-th micro-step
                jax.tree.map(
                    np.testing.assert_array_equal,
                    prev,
                    jax.tree.map(np.asarray, state_acc.params),
                )
        big = jax.tree.map(lambda *xs: np.concatenate(xs), *micro)
        state_big, _ = step_big(state_big, big)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
            jax.tree.map(np.asarray, state_acc.params),
            jax.tree.map(np.asarray, state_big.params),
        )


def test_multi_transform_equals_plain_adamw_without_freezing():
    """With nothing frozen and no clipping, the config builds exactly masked AdamW."""
    cfg = make_cfg(clip_grad_norm=0.0, weight_decay=0.1)
    params = nn.unbox(init_params(jax.random.PRNGKey(1)))
    tx = opt_lib.make_optimizer(cfg, params)
    ref = optax.adamw(1e-2, weight_decay=0.1, mask=policy.weight_decay_mask(params))
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    u1, _ = tx.update(grads, tx.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def test_optim_config_from_mapping():
    """Missing or None fields take the dataclass defaults; an unknown key is an error."""
    assert opt_lib.OptimConfig.from_mapping(None) == opt_lib.OptimConfig()
    cfg = opt_lib.OptimConfig.from_mapping(
        ml_collections.ConfigDict({"lr": 2e-3, "clip_grad_norm": None, "freeze": [["a", "frozen"]]})
    )
    assert cfg == opt_lib.OptimConfig(lr=2e-3, freeze=(("a", "frozen"),))
    assert opt_lib.OptimConfig.from_mapping(cfg) is cfg
    with pytest.raises(ValueError, match="Did you mean 'warmup_steps'"):
        opt_lib.OptimConfig.from_mapping({"warmup_step": 3})
