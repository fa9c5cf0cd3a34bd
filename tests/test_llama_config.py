"""Llama config.json import: RoPE θ / scaling and RMSNorm eps from transformers 4 and 5 layouts.

transformers 4 writes top-level `rope_theta` / `rope_scaling`; transformers 5 writes them only
inside `rope_parameters`. Both must import a θ = 500 000, eps 1e-5 model with logits parity
against HF's LlamaForCausalLM, and the config check must name a disagreeing field.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.models import llama as llama_lib
from pixelvla_jax.models.llama import Llama, Llama3RopeScaling
from pixelvla_jax.models.pixelvla import PixelVLAConfig
from pixelvla_jax.testing.torch_reference import import_timm, import_transformers
from pixelvla_jax.weights import openvla
from pixelvla_jax.weights.hf_llama import check_config, config_from_hf, convert_hf_llama

TOL = 1e-4
THETA = 500000.0
EPS = 1e-5
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the tiny head_dim's wavelengths fall in all three bands.
    "original_max_position_embeddings": 64,
}
LENGTH = 40


def _save_hf(directory, rope_parameters=None):
    """A tiny random LlamaForCausalLM (θ = 500 000, eps 1e-5) saved with save_pretrained."""
    import_timm()
    transformers = import_transformers()
    import torch

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=EPS,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, **(rope_parameters or {})},
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    tokens = np.random.RandomState(0).randint(0, 96, size=(2, LENGTH))
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    return tokens, logits


def _to_v4(config_json: dict) -> dict:
    """transformers 4's layout: top-level rope_theta / rope_scaling, no rope_parameters."""
    out = dict(config_json)
    params = dict(out.pop("rope_parameters"))
    out["rope_theta"] = params.pop("rope_theta")
    out["rope_scaling"] = None if params.get("rope_type") == "default" else params
    return out


def _import_logits(directory, config_json: dict, tokens: np.ndarray, **replace):
    from safetensors.numpy import load_file

    config = config_from_hf(config_json).replace(**replace)
    state = load_file(str(directory / "model.safetensors"))
    params = convert_hf_llama(state, config, dtype=np.float32)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    mask = llama_lib.make_attention_mask(np.ones(tokens.shape, bool), np.zeros(tokens.shape, bool))
    logits, _ = Llama(config).apply(
        {"params": params}, jnp.asarray(tokens), positions, mask, method="forward"
    )
    return config, np.asarray(logits)


@pytest.fixture(scope="module")
def default_rope(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_theta")
    tokens, logits = _save_hf(directory)
    with open(directory / "config.json") as f:
        config_json = json.load(f)
    return directory, config_json, tokens, logits


@pytest.fixture(scope="module")
def llama3_rope(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama3_rope")
    tokens, logits = _save_hf(directory, LLAMA3)
    with open(directory / "config.json") as f:
        config_json = json.load(f)
    return directory, config_json, tokens, logits


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_theta_and_eps_parity(default_rope, layout):
    directory, config_json, tokens, ref = default_rope
    assert "rope_theta" not in config_json  # the installed transformers writes the v5 layout
    assert config_json["rope_parameters"]["rope_theta"] == THETA
    if layout == "v4":
        config_json = _to_v4(config_json)
        assert "rope_parameters" not in config_json and config_json["rope_theta"] == THETA
    config, logits = _import_logits(directory, config_json, tokens)
    assert config.rope_theta == THETA and config.norm_eps == EPS
    assert config.rope_scaling is None
    np.testing.assert_allclose(logits, ref, atol=TOL, rtol=TOL)
    # The test can see θ: the old behaviour (θ = 10 000) is far off.
    _, wrong = _import_logits(directory, config_json, tokens, rope_theta=10000.0)
    assert np.abs(wrong - ref).max() > 1e-2


@pytest.mark.parametrize("layout", ["v5", "v4", "v4-type"])
def test_llama3_rope_scaling_parity(llama3_rope, layout):
    directory, config_json, tokens, ref = llama3_rope
    assert config_json["rope_parameters"]["rope_type"] == "llama3"
    if layout != "v5":
        config_json = _to_v4(config_json)
        if layout == "v4-type":  # older transformers 4 wrote "type" instead of "rope_type"
            scaling = dict(config_json["rope_scaling"])
            scaling["type"] = scaling.pop("rope_type")
            config_json["rope_scaling"] = scaling
    config, logits = _import_logits(directory, config_json, tokens)
    assert config.rope_theta == THETA
    assert config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(logits, ref, atol=TOL, rtol=TOL)
    _, unscaled = _import_logits(directory, config_json, tokens, rope_scaling=None)
    assert np.abs(unscaled - ref).max() > 1e-2


def test_unsupported_rope_configs_are_refused(default_rope):
    _, config_json, _, _ = default_rope
    for rope_type in ("linear", "dynamic", "yarn"):
        bad = {**config_json, "rope_parameters": {"rope_type": rope_type, "rope_theta": THETA}}
        with pytest.raises(ValueError, match=f"rope_type '{rope_type}'.*rope_scaling"):
            config_from_hf(bad)
    v4 = _to_v4(config_json)
    with pytest.raises(ValueError, match="rope_type 'linear'.*rope_scaling"):
        config_from_hf({**v4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="lacks.*low_freq_factor"):
        config_from_hf({**config_json, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="rope_theta is 10000.0 at the top level but 500000.0"):
        config_from_hf({**config_json, "rope_theta": 10000.0})


def test_nested_text_config_keeps_theta():
    # A saved nested config keeps only the fields differing from HF's defaults: rope_theta lives
    # in rope_parameters only, and must not be replaced by the default θ = 10 000.
    text = {
        "model_type": "llama",
        "vocab_size": 32064,
        "rms_norm_eps": EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": THETA},
    }
    got = config_from_hf({"text_config": text})
    assert got == llama_lib.llama2_7b(rope_theta=THETA, norm_eps=EPS)
    assert config_from_hf({"text_config": {**text, "rope_parameters": None}}).rope_theta == 1e4


def test_config_check_names_the_field(default_rope):
    _, config_json, _, _ = default_rope
    ckpt = config_from_hf(config_json)
    check_config(ckpt, config_json)
    check_config(ckpt, _to_v4(config_json))
    with pytest.raises(ValueError, match=r"rope_theta: checkpoint 500000\.0 vs config 10000\.0"):
        check_config(ckpt.replace(rope_theta=10000.0), config_json)
    with pytest.raises(
        ValueError, match=r"norm_eps: checkpoint 1e-05 vs config 1e-06.*rms_norm_eps"
    ):
        check_config(ckpt.replace(norm_eps=1e-6), _to_v4(config_json))
    with pytest.raises(ValueError, match="rope_scaling: checkpoint None vs config Llama3"):
        check_config(ckpt.replace(rope_scaling=Llama3RopeScaling()), config_json)


def test_openvla_config_check_compares_rope_and_eps():
    config = PixelVLAConfig.tiny()
    llm = config.llama
    text = {
        "model_type": "llama",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.width,
        "intermediate_size": llm.mlp_dim,
        "num_hidden_layers": llm.depth,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "head_dim": llm.head_dim,
        "max_position_embeddings": llm.max_seq_len,
        "rms_norm_eps": llm.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_theta},
    }
    openvla.check_config(config, {"text_config": text})
    theta = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": THETA}}
    with pytest.raises(ValueError, match="text_config.*rope_theta: checkpoint 500000"):
        openvla.check_config(config, {"text_config": theta})
    with pytest.raises(ValueError, match="rms_norm_eps"):
        openvla.check_config(config, {"text_config": {**text, "rms_norm_eps": 1e-3}})
