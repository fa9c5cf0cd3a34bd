"""Mesh construction and logical-axis shardings on the 8 simulated CPU devices."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pixelvla_jax.training import mesh as mesh_lib
from pixelvla_jax.training import sharding
from pixelvla_jax.training.train_state import create_train_state


class Toy(nn.Module):
    """Params: w_in [E, M] (embed, mlp), w_out [M, E] (mlp, embed), odd [3, M] (heads, mlp)
    whose first dim divides no mesh axis, emb [V, E] (vocab, embed), bias [M] (unnamed)."""

    embed: int = 8
    mlp: int = 16
    vocab: int = 12

    @nn.compact
    def __call__(self, x):  # x: [B, L, E]
        init = nn.initializers.normal(0.02)
        w_in = self.param("w_in", nn.with_logical_partitioning(init, ("embed", "mlp")), (8, 16))
        w_out = self.param("w_out", nn.with_logical_partitioning(init, ("mlp", "embed")), (16, 8))
        odd = self.param("odd", nn.with_logical_partitioning(init, ("heads", "mlp")), (3, 16))
        emb = self.param("emb", nn.with_logical_partitioning(init, ("vocab", "embed")), (12, 8))
        bias = self.param("bias", nn.initializers.zeros, (16,))
        h = nn.with_logical_constraint(x @ w_in + bias, ("batch", "length", "mlp"))
        h = h + odd.sum(0)
        y = nn.with_logical_constraint(h @ w_out, ("batch", "length", "embed"))
        return y @ emb.T


def init_params(rng):
    return Toy().init(rng, jnp.zeros((2, 3, 8)))["params"]


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8  # conftest's chex.set_n_cpu_devices(8)
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert m.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert dict(mesh_lib.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    sub = mesh_lib.make_mesh({"fsdp": -1}, devices=jax.devices()[:4])
    assert dict(sub.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert sub.devices.size == 4
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        mesh_lib.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="covers 4 devices but 8"):
        mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_lib.make_mesh({"model": -1})
    with pytest.raises(ValueError, match="more than one -1"):
        mesh_lib.make_mesh({"data": -1, "fsdp": -1})


def test_distributed_detection(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "JAX_NUM_PROCESSES",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not mesh_lib.is_multi_host_environment()
    assert mesh_lib.maybe_initialize_distributed() is False
    assert mesh_lib.maybe_initialize_distributed(force=False) is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0")
    assert not mesh_lib.is_multi_host_environment()  # one host
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not mesh_lib.is_multi_host_environment()  # one task
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert mesh_lib.is_multi_host_environment()
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert mesh_lib.is_multi_host_environment()


def test_rules_normalisation():
    rules = sharding.normalize_rules(
        [["batch", ["data", "fsdp"]], ["embed", ["fsdp"]], ["x", None]]
    )
    assert rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("x", None))
    assert sharding.normalize_rules(None) == sharding.DEFAULT_RULES
    with pytest.raises(ValueError, match="not a \\(logical_name, mesh_axes\\) pair"):
        sharding.normalize_rules([("embed",)])


def test_param_shardings_follow_rules_and_fall_back():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    shards = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    specs = jax.tree.map(lambda s: s.spec, shards)
    assert specs["w_in"] == P("fsdp", "tensor")
    assert specs["w_out"] == P("tensor", "fsdp")
    # heads -> tensor, but 3 is not divisible by 2: replicated on that dim, no crash.
    assert specs["odd"] == P(None, "tensor")
    assert specs["emb"] == P("tensor", "fsdp")
    assert specs["bias"] == P()
    assert all(s.mesh is mesh for s in jax.tree.leaves(shards))

    # A tuple rule keeps the longest prefix of axes that divides the dim.
    rules = (("embed", ("fsdp", "tensor")), ("mlp", None))
    mesh4 = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    assert sharding.mesh_spec_for(("embed", "mlp"), (8, 16), mesh4, rules) == P(
        ("fsdp", "tensor"), None
    )
    assert sharding.mesh_spec_for(("embed", "mlp"), (6, 16), mesh4, rules) == P("fsdp", None)
    assert sharding.mesh_spec_for(("embed", "mlp"), (5, 16), mesh4, rules) == P(None, None)


def test_train_state_is_born_sharded_and_opt_state_mirrors_params():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tx = optax.adamw(1e-3)
    state, shards = create_train_state(
        init_params, tx, mesh, sharding.DEFAULT_RULES, jax.random.PRNGKey(0)
    )
    assert state.params["w_in"].sharding.spec == P("fsdp", "tensor")
    assert state.params["w_in"].sharding.mesh.shape == mesh.shape
    # Each device holds a quarter of w_in (split over fsdp x tensor).
    chex.assert_shape(state.params["w_in"].addressable_shards[0].data, (4, 8))
    adam = state.opt_state[0]
    chex.assert_trees_all_equal_shapes(adam.mu, adam.nu, state.params)
    assert adam.mu["w_in"].sharding.spec == P("fsdp", "tensor")
    assert adam.nu["emb"].sharding.spec == P("tensor", "fsdp")
    assert adam.count.sharding.spec == P()
    assert shards.opt_state[0].mu["odd"].spec == P(None, "tensor")
    assert state.step.sharding.spec == P()


def test_batch_sharding_and_logical_constraints_in_jit():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    batch = sharding.shard_batch({"x": np.ones((8, 3, 8), np.float32)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    chex.assert_shape(batch["x"].addressable_shards[0].data, (2, 3, 8))
    with pytest.raises(ValueError, match="Batch entry 'x' has shape \\(6, 3, 8\\)"):
        sharding.shard_batch({"x": np.ones((6, 3, 8), np.float32)}, mesh)

    params = nn.unbox(init_params(jax.random.PRNGKey(0)))
    expected = Toy().apply({"params": params}, np.ones((8, 3, 8), np.float32))
    apply = jax.jit(lambda p, x: Toy().apply({"params": p}, x))
    with sharding.sharding_context(mesh, sharding.DEFAULT_RULES):
        out = apply(params, batch["x"])
        hlo = apply.lower(params, batch["x"]).as_text()
    # The activation constraints reached the compiler: [B, L, mlp] split over data*fsdp, tensor.
    assert '[{"data", "fsdp"}, {}, {"tensor"}]' in hlo, hlo[:2000]
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=0)
    # Without a mesh the constraints are no-ops.
    out = jax.jit(lambda p, x: Toy().apply({"params": p}, x))(params, np.ones((8, 3, 8)))
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=0)


def test_describe_shardings():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    text = sharding.describe_shardings(sharding.param_shardings(abstract, mesh))
    assert f"w_in: {P('fsdp', 'tensor')}" in text
