"""Import Hugging Face `LlamaForCausalLM` weights into `pixelvla_jax.models.llama.Llama` params.

Tensors are read one at a time through a name -> array getter, so a 7B import can stream
them from safetensors shards; an optional per-leaf callback casts or places (device_put
with a sharding) each converted array as soon as it is built. HF Linear weights are
[out, in]; our kernels are [in, out], so they are transposed. No q/k permutation is needed:
our RoPE uses HF's rotate-half convention.

    params = convert_hf_llama(lambda name: state_dict[name].numpy(), config,
                              prefix="language_model.")
    logits, _ = Llama(config).apply({"params": params}, tokens, pos, mask, method="forward")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pixelvla_jax.models.llama import Llama3RopeScaling, LlamaConfig

Getter = Callable[[str], Any]
LeafFn = Callable[[tuple[str, ...], np.ndarray], Any]


# transformers.LlamaConfig's defaults (= Llama-2-7B).
HF_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_from_hf(
    raw: Mapping[str, Any], cfg: Mapping[str, Any]
) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, rope_scaling) from either config.json layout.

    transformers 4 writes top-level `rope_theta` and `rope_scaling` (None, or a dict with
    `rope_type`/`type` and its parameters); transformers 5 writes both only inside
    `rope_parameters` ({"rope_type": "default", "rope_theta": 500000.0, ...}). `raw` is the
    config before HF's defaults were merged in, so that a default θ never hides one in
    `rope_parameters`.
    """
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(
                f"config_from_hf: {key} must be a dict (one RoPE for all layers), got {value!r}"
            )
        params.update(value)
    top_theta, nested_theta = raw.get("rope_theta"), params.get("rope_theta")
    if (
        top_theta is not None
        and nested_theta is not None
        and not math.isclose(float(top_theta), float(nested_theta), rel_tol=1e-9)
    ):
        raise ValueError(
            f"config_from_hf: rope_theta is {top_theta} at the top level but {nested_theta} "
            "in rope_parameters"
        )
    theta = nested_theta if nested_theta is not None else top_theta
    theta = float(theta if theta is not None else HF_LLAMA_DEFAULTS["rope_theta"])
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            "config_from_hf: RoPE scaling with partial_rotary_factor "
            f"{params['partial_rotary_factor']} (rope_parameters) is not supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"config_from_hf: RoPE scaling rope_type {rope_type!r} (rope_scaling / "
            "rope_parameters) is not supported, only 'default' and 'llama3'"
        )
    values = dict(params)
    if "original_max_position_embeddings" not in values and "max_position_embeddings" in cfg:
        values["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    missing = [k for k in _LLAMA3_KEYS if values.get(k) is None]
    if missing:
        raise ValueError(
            f"config_from_hf: RoPE scaling rope_type 'llama3' (rope_scaling / rope_parameters) "
            f"lacks {missing}; got {params}"
        )
    if float(values["high_freq_factor"]) == float(values["low_freq_factor"]):
        raise ValueError(
            "config_from_hf: RoPE scaling 'llama3' needs high_freq_factor != low_freq_factor "
            f"(rope_scaling / rope_parameters: {params})"
        )
    return theta, Llama3RopeScaling(
        factor=float(values["factor"]),
        low_freq_factor=float(values["low_freq_factor"]),
        high_freq_factor=float(values["high_freq_factor"]),
        original_max_position_embeddings=int(values["original_max_position_embeddings"]),
    )


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    """LlamaConfig from an HF config.json dict (a Llama one, or one with a `text_config`).

    Fields missing from a dict with model_type "llama" take HF LlamaConfig's defaults.

    `overrides` set fields HF does not describe (lora_rules, remat, scan_layers).
    """
    cfg = dict(hf_config)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = dict(cfg["text_config"])
    raw = dict(cfg)  # before the defaults: RoPE fields may live in rope_parameters only
    if cfg.get("model_type") == "llama":
        # Saved nested configs (e.g. OpenVLA's text_config) keep only the fields that differ
        # from HF LlamaConfig's defaults, which are Llama-2-7B's.
        cfg = {**HF_LLAMA_DEFAULTS, **cfg}
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if k not in cfg
    ]
    if missing:
        raise KeyError(f"config_from_hf: the HF config has no {missing}; keys: {sorted(cfg)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config_from_hf: only SiLU (SwiGLU) MLPs are supported, got {cfg['hidden_act']!r}"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(
            "config_from_hf: attention_bias / mlp_bias are not supported (Llama-2 has none)"
        )
    if cfg.get("tie_word_embeddings"):
        raise ValueError(
            "config_from_hf: tie_word_embeddings=True is not supported (Llama-2 has its own lm_head)"
        )
    rope_theta, rope_scaling = _rope_from_hf(raw, cfg)
    heads = cfg["num_attention_heads"]
    fields = dict(
        vocab_size=cfg["vocab_size"],
        width=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        mlp_dim=cfg["intermediate_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


# (our LlamaConfig field, its name in HF's config.json) compared by `check_config`.
CHECKED_FIELDS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("width", "hidden_size"),
    ("depth", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("head_dim", "head_dim"),
    ("mlp_dim", "intermediate_size"),
    ("norm_eps", "rms_norm_eps"),
    ("rope_theta", "rope_theta"),
    ("rope_scaling", "rope_scaling"),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    return a == b


def config_mismatches(config: LlamaConfig, expected: LlamaConfig) -> list[str]:
    """One line per field in which `config` differs from `expected` (the checkpoint's)."""
    return [
        f"{ours}: checkpoint {getattr(expected, ours)!r} vs config {getattr(config, ours)!r}"
        + (f" (config.json {hf})" if hf != ours else "")
        for ours, hf in CHECKED_FIELDS
        if not _same(getattr(config, ours), getattr(expected, ours))
    ]


def check_config(
    config: LlamaConfig, hf_config: Mapping[str, Any] | LlamaConfig, *, what: str = "LlamaConfig"
) -> None:
    """Raises ValueError when `config` disagrees with the checkpoint's config.json.

    Compares the shapes and the numerics the weights were trained with: RMSNorm eps
    (rms_norm_eps), RoPE θ (rope_theta) and RoPE scaling (rope_scaling / rope_parameters),
    each named in the message. `hf_config` is config.json's dict (a Llama one, or one with a
    `text_config`) or a LlamaConfig already read from it.
    """
    expected = hf_config if isinstance(hf_config, LlamaConfig) else config_from_hf(hf_config)
    diffs = config_mismatches(config, expected)
    if diffs:
        raise ValueError(
            f"{what} does not match the checkpoint's config ("
            + "; ".join(diffs)
            + "); build it with pixelvla_jax.weights.hf_llama.config_from_hf(config.json)"
        )


def _layer_tensors(config: LlamaConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...], bool]]:
    """(our path inside a block, HF name inside `model.layers.{i}.`, HF shape, transpose)."""
    d, f = config.width, config.mlp_dim
    q_out = config.num_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    return [
        (("input_layernorm", "scale"), "input_layernorm.weight", (d,), False),
        (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", (q_out, d), True),
        (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", (kv_out, d), True),
        (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", (kv_out, d), True),
        (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", (d, q_out), True),
        (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (d,), False),
        (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (f, d), True),
        (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (f, d), True),
        (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (d, f), True),
    ]


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_hf_llama(
    source: Getter | Mapping[str, Any],
    config: LlamaConfig,
    *,
    prefix: str = "",
    scan_layers: bool | None = None,
    dtype: Any = None,
    on_leaf: LeafFn | None = None,
) -> dict[str, Any]:
    """Builds the `params` tree of `Llama(config)` from HF LlamaForCausalLM tensors.

    Args:
      source: a function name -> array (numpy, or anything `np.asarray` takes), or a mapping
        such as a state dict of numpy arrays. A missing name must raise KeyError.
      config: the target LlamaConfig (see `config_from_hf`).
      prefix: prepended to every HF name, e.g. "language_model." inside OpenVLA.
      scan_layers: stacked (`layers/...` with a leading depth axis) or per-layer
        (`layers_{i}/...`) layout; defaults to `config.scan_layers`.
      dtype: cast every array to this numpy dtype (e.g. np.float32) before `on_leaf`;
        None keeps the source dtype.
      on_leaf: called as on_leaf(path, array) for each finished leaf (path like
        ("layers", "attn", "q_proj", "kernel")); its return value is stored (e.g. a
        device_put sharded jax.Array). Default: store the numpy array.

    Returns:
      A nested dict of params (no "params" wrapper, no LoRA params).

    Raises:
      KeyError: naming the missing HF tensor.
      ValueError: naming the tensor, its shape and the expected shape.
    """
    if isinstance(source, Mapping):
        mapping = source

        def get(name: str) -> Any:
            if name not in mapping:
                raise KeyError(name)
            return mapping[name]

    else:
        get = source
    scan = config.scan_layers if scan_layers is None else scan_layers
    finish = on_leaf or (lambda path, x: x)

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = prefix + name
        try:
            value = get(full)
        except KeyError as err:
            raise KeyError(
                f"HF Llama tensor {full!r} is missing from the checkpoint"
                + (
                    f" (prefix {prefix!r}: check it matches the checkpoint's names)"
                    if prefix
                    else ""
                )
            ) from err
        array = np.asarray(value)
        if array.shape != shape:
            raise ValueError(
                f"HF Llama tensor {full!r} has shape {array.shape}, expected {shape}; check that "
                "the LlamaConfig matches the checkpoint (config_from_hf reads its config.json)"
            )
        return array if dtype is None else array.astype(dtype)

    params: dict[str, Any] = {}
    d, v = config.width, config.vocab_size
    _set(
        params,
        ("embed_tokens", "embedding"),
        finish(("embed_tokens", "embedding"), fetch("model.embed_tokens.weight", (v, d))),
    )
    for path, name, shape, transpose in _layer_tensors(config):
        per_layer = []
        for i in range(config.depth):
            array = fetch(f"model.layers.{i}.{name}", shape)
            array = np.ascontiguousarray(array.T) if transpose else array
            if scan:
                per_layer.append(array)
            else:
                full_path = (f"layers_{i}", *path)
                _set(params, full_path, finish(full_path, array))
        if scan:
            full_path = ("layers", *path)
            _set(params, full_path, finish(full_path, np.stack(per_layer)))
    _set(params, ("norm", "scale"), finish(("norm", "scale"), fetch("model.norm.weight", (d,))))
    lm_head = np.ascontiguousarray(fetch("lm_head.weight", (v, d)).T)
    _set(params, ("lm_head", "kernel"), finish(("lm_head", "kernel"), lm_head))
    return params
