"""Action heads: L1 MLP-ResNet (torch parity, tiny fit, masked loss) and OpenVLA's bin tokenizer."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixelvla_jax.models.action_heads import (
    DiscreteActionTokenizer,
    L1ActionHead,
    L1ActionHeadConfig,
    l1_loss,
    l1_per_dimension,
)
from pixelvla_jax.testing.torch_reference import import_torch

CFG = L1ActionHeadConfig.tiny()
B, D = 3, 16


def _hidden(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(batch, CFG.num_action_slots, D)), jnp.float32)


def _perturbed_head_params(x):
    """The tiny head's params with non-trivial values everywhere (and the boxed variables)."""
    variables = L1ActionHead(CFG).init(jax.random.key(0), x)
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape),
        nn.unbox(variables["params"]),
    )
    return variables, params


def _torch_mlp_resnet(params, x):
    """OpenVLA-OFT's MLPResNet, restated: LN -> fc -> ReLU, blocks x + ReLU(fc(LN(x))), LN -> fc."""
    torch = import_torch()
    t = lambda a: torch.tensor(np.asarray(a))
    F = torch.nn.functional

    def ln(h, p):
        return F.layer_norm(h, (h.shape[-1],), t(p["scale"]), t(p["bias"]), eps=1e-5)

    def fc(h, p):
        return F.linear(h, t(p["kernel"]).T, t(p["bias"]))

    with torch.no_grad():
        h = t(x).reshape(B, CFG.chunk_size, -1)
        h = F.relu(fc(ln(h, params["norm_in"]), params["fc_in"]))
        for i in range(CFG.num_blocks):
            h = h + F.relu(fc(ln(h, params[f"block_{i}_norm"]), params[f"block_{i}_fc"]))
        return fc(ln(h, params["norm_out"]), params["fc_out"]).numpy()


def test_head_shape_and_torch_mlp_resnet_parity():
    head = L1ActionHead(CFG)
    x = _hidden()
    variables, params = _perturbed_head_params(x)
    out = np.asarray(head.apply({"params": params}, x))
    assert (CFG.chunk_size, CFG.action_dim) == (4, 7)
    chex.assert_shape(out, (B, CFG.chunk_size, CFG.action_dim))
    chex.assert_trees_all_close(out, _torch_mlp_resnet(params, x), rtol=1e-4, atol=1e-5)

    # Slot order: action k of the chunk reads slots k*A .. k*A+A-1 only.
    x2 = x.at[:, : CFG.action_dim].multiply(-2.0)  # (a constant shift would vanish in LN)
    out2 = np.asarray(head.apply({"params": params}, x2))
    assert not np.allclose(out2[:, 0], out[:, 0])
    chex.assert_trees_all_equal(out2[:, 1:], out[:, 1:])

    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["fc_in"]["kernel"]) == ("embed", "mlp")


def test_head_rejects_wrong_slot_count():
    head = L1ActionHead(CFG)
    with pytest.raises(ValueError, match=r"4\*7 = 28.*\(3, 27, 16\)"):
        head.init(jax.random.key(0), jnp.zeros((B, 27, D)))


def test_tiny_fit_lowers_l1_loss():
    head = L1ActionHead(CFG)
    x = _hidden(batch=8)
    target = jnp.tanh(
        jnp.asarray(np.random.default_rng(1).normal(size=(8, CFG.chunk_size, CFG.action_dim)))
    )
    pad_mask = jnp.ones((8, CFG.chunk_size), bool).at[:, -1].set(False)
    params = head.init(jax.random.key(0), x)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: l1_loss(head.apply({"params": p}, x), target, pad_mask)
        )(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_l1_loss_masks_padding_and_matches_numpy():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(B, 4, 7)).astype(np.float32)
    target = rng.normal(size=(B, 4, 7)).astype(np.float32)
    pad_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    err = np.abs(pred - target)
    expected = err[pad_mask].mean()
    got = l1_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(pad_mask))
    chex.assert_trees_all_close(float(got), expected, rtol=1e-6, atol=0)
    per_dim = l1_per_dimension(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(pad_mask))
    chex.assert_trees_all_close(per_dim, err[pad_mask].mean(axis=0), rtol=1e-6, atol=0)
    chex.assert_shape(per_dim, (7,))

    garbage = target.copy()
    garbage[~pad_mask] = 1e6
    chex.assert_trees_all_close(
        float(l1_loss(jnp.asarray(pred), jnp.asarray(garbage), jnp.asarray(pad_mask))),
        expected,
        rtol=1e-6,
        atol=0,
    )
    none = jnp.zeros((B, 4), bool)
    assert float(l1_loss(jnp.asarray(pred), jnp.asarray(target), none)) == 0.0
    with pytest.raises(ValueError, match=r"pad_mask must be \[B, N_c\]=\(3, 4\)"):
        l1_loss(jnp.asarray(pred), jnp.asarray(target), jnp.ones((B, 7), bool))
    with pytest.raises(ValueError, match="pred and target"):
        l1_loss(jnp.asarray(pred), jnp.asarray(target[:, :3]), jnp.asarray(pad_mask))


def _openvla_tokenize(actions, vocab_size=32000, n_bins=256):
    """OpenVLA's ActionTokenizer.__call__, restated (float64 bins, np.digitize)."""
    bins = np.linspace(-1, 1, n_bins)
    return vocab_size - np.digitize(np.clip(actions, -1.0, 1.0), bins)


def _openvla_detokenize(tokens, vocab_size=32000, n_bins=256):
    """OpenVLA's ActionTokenizer.decode_token_ids_to_actions, restated."""
    bins = np.linspace(-1, 1, n_bins)
    centers = (bins[:-1] + bins[1:]) / 2.0
    index = np.clip(vocab_size - tokens - 1, a_min=0, a_max=centers.shape[0] - 1)
    return centers[index]


def _test_actions():
    rng = np.random.default_rng(0)
    bins = np.linspace(-1, 1, 256)
    edges32 = bins.astype(np.float32)
    # Values on and next to every bin edge, where float32/float64 rounding could disagree.
    near = np.concatenate(
        [
            edges32,
            np.nextafter(edges32, np.float32(-2)),
            np.nextafter(edges32, np.float32(2)),
        ]
    )
    return np.concatenate(
        [rng.uniform(-1.3, 1.3, 4000).astype(np.float32), near, np.float32([-1, 1, 0])]
    )


def test_tokenizer_matches_openvla_formula_exactly():
    tok = DiscreteActionTokenizer()
    actions = _test_actions()
    expected = _openvla_tokenize(actions)
    np_tokens = tok.tokenize(actions)
    assert isinstance(np_tokens, np.ndarray)
    chex.assert_type(np_tokens, np.int32)
    np.testing.assert_array_equal(np_tokens, expected)
    jax_tokens = jax.jit(tok.tokenize)(jnp.asarray(actions))
    assert isinstance(jax_tokens, jax.Array)
    chex.assert_type(jax_tokens, jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax_tokens), expected)
    np.testing.assert_array_equal(tok.tokenize(actions.astype(np.float64)), expected)
    assert expected.min() == tok.first_token == 31744 and expected.max() == 31999

    all_tokens = np.arange(31700, 32010)  # includes ids outside the action range
    decoded = _openvla_detokenize(all_tokens).astype(np.float32)
    np.testing.assert_array_equal(tok.detokenize(all_tokens), decoded)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(tok.detokenize)(jnp.asarray(all_tokens))), decoded
    )
    chex.assert_type(tok.detokenize(all_tokens), np.float32)


def test_tokenizer_round_trip_within_half_a_bin():
    tok = DiscreteActionTokenizer()
    actions = np.clip(_test_actions(), -1, 1)[: 7 * 600].reshape(600, 7)
    for back in (
        tok.detokenize(tok.tokenize(actions)),
        np.asarray(jax.jit(lambda a: tok.detokenize(tok.tokenize(a)))(jnp.asarray(actions))),
    ):
        chex.assert_equal_shape([back, actions])
        assert np.abs(back - actions).max() <= tok.bin_width / 2 + 1e-6


class JitVariantsTest(chex.TestCase):
    """The jnp code paths give the same results eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_head_decoding_matches_torch_reference(self):
        x = _hidden(seed=2)
        _, params = _perturbed_head_params(x)
        decode = self.variant(lambda p, h: L1ActionHead(CFG).apply({"params": p}, h))
        out = decode(params, x)
        chex.assert_shape(out, (B, CFG.chunk_size, CFG.action_dim))
        chex.assert_trees_all_close(out, _torch_mlp_resnet(params, x), rtol=1e-4, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tokenizer_jax_path_matches_openvla_formula(self):
        tok = DiscreteActionTokenizer()
        actions = _test_actions()
        tokens = self.variant(tok.tokenize)(jnp.asarray(actions))
        chex.assert_type(tokens, jnp.int32)
        chex.assert_trees_all_equal(tokens, _openvla_tokenize(actions).astype(np.int32))
        all_tokens = np.arange(31700, 32010)
        decoded = self.variant(tok.detokenize)(jnp.asarray(all_tokens))
        chex.assert_type(decoded, jnp.float32)
        chex.assert_trees_all_equal(decoded, _openvla_detokenize(all_tokens).astype(np.float32))

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_l1_matches_numpy(self):
        rng = np.random.default_rng(3)
        pred = rng.normal(size=(B, 4, 7)).astype(np.float32)
        target = rng.normal(size=(B, 4, 7)).astype(np.float32)
        pad_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
        err = np.abs(pred - target)
        args = (jnp.asarray(pred), jnp.asarray(target), jnp.asarray(pad_mask))
        loss = self.variant(l1_loss)(*args)
        per_dim = self.variant(l1_per_dimension)(*args)
        chex.assert_trees_all_close(loss, err[pad_mask].mean(), rtol=1e-6, atol=0)
        chex.assert_trees_all_close(per_dim, err[pad_mask].mean(axis=0), rtol=1e-6, atol=0)
