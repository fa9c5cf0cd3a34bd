"""Import π0 weights into `models/pi0.Pi0` params: openpi's Orbax params and the PyTorch
safetensors of transformers' `PI0ForConditionalGeneration` / lerobot / openpi-PyTorch.

openpi (`gs://openpi-assets/checkpoints/<name>/params`, a local copy): an Orbax PyTree
checkpoint whose item `params` holds (leading [L] axis on every per-layer leaf)

    PaliGemma/img/embedding/{kernel [14,14,3,W], bias}, img/pos_embedding [1,N,W],
    PaliGemma/img/Transformer/encoderblock/{LayerNorm_0,LayerNorm_1}/{scale,bias},
      .../MlpBlock_0/Dense_{0,1}/{kernel,bias},
      .../MultiHeadDotProductAttention_0/{query,key,value,out}/{kernel,bias},
    PaliGemma/img/Transformer/encoder_norm/{scale,bias}, PaliGemma/img/head/{kernel,bias},
    PaliGemma/llm/embedder/input_embedding,
    PaliGemma/llm/layers/{pre_attention_norm,pre_ffw_norm}{,_1}/scale,
    PaliGemma/llm/layers/attn/{q_einsum,kv_einsum,attn_vec_einsum}{,_1}/w (or qkv_einsum
      when K == N), PaliGemma/llm/layers/mlp{,_1}/{gating_einsum,linear},
    PaliGemma/llm/final_norm{,_1}/scale,
    {state_proj,action_in_proj,action_time_mlp_in,action_time_mlp_out,action_out_proj}/{kernel,bias}

(every key may end in an extra `value` level when saved from an NNX `State`; it is
stripped). Ours differ only in names (`w` -> `kernel`, the SigLIP tower under
`img/tower` in `models/vit.py`'s names) and in the unrolled layout when
`scan_layers=False`.

PyTorch: transformers' own `PI0ForConditionalGeneration` names (`model.vlm.*`,
`model.dit.*`, `embed_action_time.*`, `action_out_proj.*`) or the lerobot / openpi-PyTorch
names (`paligemma_with_expert.paligemma.model.*`, `paligemma_with_expert.gemma_expert.
model.*`, top-level `state_proj` etc., optionally under `model.`), which transformers'
`conversion_mapping.py` renames the same way. Torch Linear weights [out, in] are
transposed; q/k/v/o projections are reshaped into the einsum layouts; gate/up are stacked
into `gating_einsum`. The expert's token embedding (`model.dit.embed_tokens`, which π0
never uses) is skipped.

Both importers return only the parts a π0 checkpoint has (`PaliGemma` and the five
projections), cast to `dtype` and, if shardings are given, placed leaf by leaf on them.
`merge_imported` puts them into freshly initialised params (keeping the pixel / prompt
encoders, the patch-grounding head and any LoRA adapters). Errors name every missing key
and every shape mismatch.

    imported = import_openpi("/ckpt/pi0_base/params", Pi0Config.pi0(), dtype=jnp.bfloat16)
    params = merge_imported(init_params, imported)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pixelvla_jax.models.gemma import expert_suffix
from pixelvla_jax.models.lora import LORA_A, LORA_B
from pixelvla_jax.models.pi0 import Pi0Config, abstract_variables
from pixelvla_jax.weights.placement import ShardingSpec, placer
from pixelvla_jax.weights.safetensors_io import open_checkpoint

PROJECTIONS = (
    "state_proj",
    "action_in_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
    "action_out_proj",
)
IMPORTED_PARTS = ("PaliGemma", *PROJECTIONS)
OPENPI_ITEM = "params"

# One source of an imported leaf: (per_layer, fn). per_layer: fn(i) gives layer i of a
# stacked leaf; else fn() gives the whole leaf.
Source = tuple[bool, Callable[..., np.ndarray]]


# ----------------------------------------------------------------------------- targets


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def target_shapes(config: Pi0Config) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every param a π0 checkpoint provides, in `config`'s layout (scanned
    or unrolled), from `jax.eval_shape` (nothing is allocated). LoRA adapters and the
    PixelVLA encoders are not part of it."""
    params = nn.meta.unbox(abstract_variables(config)["params"])
    flat = _flatten(params)
    return {
        path: tuple(leaf.shape)
        for path, leaf in flat.items()
        if path.split("/", 1)[0] in IMPORTED_PARTS
        and path.rsplit("/", 1)[-1] not in (LORA_A, LORA_B)
    }


_UNROLLED = re.compile(r"^(.*/)(layers|block)_(\d+)(/.*)$")


def _source_for(path: str, sources: Mapping[str, Source]) -> tuple[Source, int | None] | None:
    """Our (possibly unrolled) target path -> its source and layer index."""
    match = _UNROLLED.match(path)
    if match:
        head, kind, index, tail = match.groups()
        stacked = head + ("layers" if kind == "layers" else "blocks") + tail
        source = sources.get(stacked)
        return None if source is None else (source, int(index))
    source = sources.get(path)
    return None if source is None else (source, None)


def _convert(
    sources: Mapping[str, Source],
    config: Pi0Config,
    dtype: Any,
    shardings: ShardingSpec,
    what: str,
) -> dict:
    """Builds every target leaf from `sources`, checks shapes, casts and places it."""
    targets = target_shapes(config)
    missing = [p for p in targets if _source_for(p, sources) is None]
    if missing:
        raise KeyError(
            f"{what} lacks {len(missing)} params the model needs (our names): "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}. Is it a π0 checkpoint of "
            "this config's layout?"
        )
    place = placer(shardings, dtype)
    out, mismatched = {}, []
    for path, shape in targets.items():
        (per_layer, fn), index = _source_for(path, sources)
        try:
            if index is not None:
                value = fn(index) if per_layer else np.asarray(fn())[index]
            elif per_layer:
                value = np.stack([fn(i) for i in range(shape[0])])
            else:
                value = fn()
        except KeyError as err:
            raise KeyError(f"{what}: building {path!r}: {err.args[0]}") from None
        if tuple(value.shape) != shape:
            mismatched.append(f"{path}: checkpoint {tuple(value.shape)} vs model {shape}")
            continue
        out[path] = place(tuple(path.split("/")), value)
        del value
    if mismatched:
        raise ValueError(
            f"{what}: {len(mismatched)} params have the wrong shape (does the config match "
            f"the checkpoint?): {mismatched[:8]}"
        )
    return _unflatten(out)


class _Tracked:
    """name -> array of a flat source mapping, remembering what was read."""

    def __init__(self, get: Callable[[str], np.ndarray], names: Iterable[str], location: str):
        self._get = get
        self.names = set(names)
        self.location = location
        self.read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"tensor {name!r} is missing from {self.location}")
        self.read.add(name)
        return np.asarray(self._get(name))

    def check_all_read(self, strict: bool, ignored: Iterable[str] = ()) -> None:
        unused = sorted(self.names - self.read - set(ignored))
        if strict and unused:
            raise ValueError(
                f"{len(unused)} entries of {self.location} were not used by the model (e.g. "
                f"{unused[:5]}): the config is smaller than the checkpoint, or the checkpoint "
                "holds LoRA adapters (merge them first). Fix the config, or pass strict=False"
            )


# ----------------------------------------------------------------------------- openpi


def load_openpi_params(path: str | os.PathLike, dtype: Any = None) -> dict:
    """Reads openpi's Orbax params (the `params` item) as a nested dict of numpy arrays
    (cast to `dtype` while restoring, as openpi's `restore_params`; None keeps the stored
    dtype), without a trailing NNX `value` level. Works with orbax < 0.12 (metadata is a
    dict) and >= 0.12 (a `StepMetadata`: `.item_metadata.tree`)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no openpi params directory at {path} (e.g. a local copy of "
            "gs://openpi-assets/checkpoints/pi0_base/params)"
        )
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(path)
        tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
        if OPENPI_ITEM not in tree:
            raise KeyError(
                f"{path} has no {OPENPI_ITEM!r} item (top-level keys: {sorted(tree)}); openpi "
                "saves its params as {'params': ...}"
            )
        item = {OPENPI_ITEM: tree[OPENPI_ITEM]}
        restore_args = jax.tree.map(
            lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray, dtype=dtype), item
        )
        params = ckptr.restore(path, ocp.args.PyTreeRestore(item=item, restore_args=restore_args))[
            OPENPI_ITEM
        ]
    flat = _flatten(params)
    if flat and all(p.rsplit("/", 1)[-1] == "value" for p in flat):
        flat = {p.rsplit("/", 1)[0]: v for p, v in flat.items()}
    return _unflatten(flat)


def _openpi_sources(get: _Tracked) -> dict[str, Source]:
    """Our stacked-layout paths -> sources in openpi's flat names."""
    llm, img = "PaliGemma/llm/", "PaliGemma/img/"
    sources: dict[str, Source] = {
        f"{llm}embedder/input_embedding": (False, lambda: get(f"{llm}embedder/input_embedding")),
    }
    for i in range(2):
        s = expert_suffix(i)
        layer = f"{llm}layers/"
        for ours, theirs in (
            (f"pre_attention_norm{s}/scale", f"pre_attention_norm{s}/scale"),
            (f"pre_ffw_norm{s}/scale", f"pre_ffw_norm{s}/scale"),
            (f"attn/attn_vec_einsum{s}/kernel", f"attn/attn_vec_einsum{s}/w"),
            (f"mlp{s}/gating_einsum/kernel", f"mlp{s}/gating_einsum"),
            (f"mlp{s}/linear/kernel", f"mlp{s}/linear"),
        ):
            sources[layer + ours] = (False, lambda n=layer + theirs: get(n))
        qkv = f"{layer}attn/qkv_einsum{s}/w"
        if qkv in get:  # multi-head (K == N) Gemma: one [3, N, D, H] einsum
            sources[f"{layer}attn/q_einsum{s}/kernel"] = (False, lambda n=qkv: get(n)[:, 0])
            sources[f"{layer}attn/kv_einsum{s}/kernel"] = (False, lambda n=qkv: get(n)[:, 1:])
        else:
            for name in ("q_einsum", "kv_einsum"):
                n = f"{layer}attn/{name}{s}/w"
                sources[f"{layer}attn/{name}{s}/kernel"] = (False, lambda n=n: get(n))
        sources[f"{llm}final_norm{s}/scale"] = (False, lambda n=f"{llm}final_norm{s}/scale": get(n))
    block = f"{img}Transformer/encoderblock/"
    renames = {
        "tower/patch_kernel": f"{img}embedding/kernel",
        "tower/patch_bias": f"{img}embedding/bias",
        "tower/pos_embed": f"{img}pos_embedding",
        "tower/norm/scale": f"{img}Transformer/encoder_norm/scale",
        "tower/norm/bias": f"{img}Transformer/encoder_norm/bias",
        "head/kernel": f"{img}head/kernel",
        "head/bias": f"{img}head/bias",
    }
    for ln, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
        for leaf in ("scale", "bias"):
            renames[f"tower/blocks/{ln}/{leaf}"] = f"{block}{theirs}/{leaf}"
    for j in range(2):
        for leaf in ("kernel", "bias"):
            renames[f"tower/blocks/mlp/fc{j + 1}_{leaf}"] = f"{block}MlpBlock_0/Dense_{j}/{leaf}"
    for name in ("query", "key", "value", "out"):
        for leaf in ("kernel", "bias"):
            renames[f"tower/blocks/attn/{name}_{leaf}"] = (
                f"{block}MultiHeadDotProductAttention_0/{name}/{leaf}"
            )
    for ours, theirs in renames.items():
        sources[img + ours] = (False, lambda n=theirs: get(n))
    for proj in PROJECTIONS:
        for leaf in ("kernel", "bias"):
            sources[f"{proj}/{leaf}"] = (False, lambda n=f"{proj}/{leaf}": get(n))
    return sources


def convert_openpi(
    tree: Mapping[str, Any],
    config: Pi0Config,
    *,
    dtype: Any = jnp.float32,
    shardings: ShardingSpec = None,
    strict: bool = True,
    location: str = "the openpi params",
) -> dict:
    """openpi params (nested or "/"-flat mapping of arrays, `params` level removed) -> our
    params of the imported parts (see the module docstring)."""
    flat = _flatten(tree)
    if flat and all(p.rsplit("/", 1)[-1] == "value" for p in flat):
        flat = {p.rsplit("/", 1)[0]: v for p, v in flat.items()}
    get = _Tracked(flat.__getitem__, flat, location)
    out = _convert(_openpi_sources(get), config, dtype, shardings, location)
    get.check_all_read(strict)
    return out


def import_openpi(
    path: str | os.PathLike,
    config: Pi0Config,
    *,
    dtype: Any = jnp.bfloat16,
    shardings: ShardingSpec = None,
    strict: bool = True,
) -> dict:
    """Imports openpi's Orbax `params` directory (see `load_openpi_params`, `convert_openpi`).

    Args:
      path: the params directory (e.g. `<checkpoint>/params`).
      config: the target model; its sizes and layout (scan_layers) decide the shapes.
      dtype: dtype of every imported param.
      shardings: None (default device), a callable `(path tuple, shape) -> Sharding`, or a
        pytree of Shardings shaped like the model's params.
      strict: raise when the checkpoint holds params the model did not use.

    Raises:
      FileNotFoundError, KeyError (missing keys, named), ValueError (shape mismatches, named).
    """
    tree = load_openpi_params(path, dtype=dtype)
    return convert_openpi(
        tree, config, dtype=dtype, shardings=shardings, strict=strict, location=os.fspath(path)
    )


# ----------------------------------------------------------------------------- PyTorch

_TOP_LEVEL = ("paligemma_with_expert.", *(p + "." for p in PROJECTIONS))
_RENAMES = (  # lerobot / openpi-PyTorch -> transformers' PI0ForConditionalGeneration
    ("paligemma_with_expert.paligemma.model.", "model.vlm."),
    ("paligemma_with_expert.paligemma.lm_head.", "model.vlm.language_model.lm_head."),
    ("paligemma_with_expert.gemma_expert.model.", "model.dit."),
    ("paligemma_with_expert.gemma_expert.lm_head.", "model.dit.lm_head."),
    *((p + ".", f"embed_action_time.{p}.") for p in PROJECTIONS if p != "action_out_proj"),
)


def canonical_torch_name(name: str) -> str:
    """A lerobot / openpi-PyTorch / transformers π0 tensor name -> transformers' name."""
    if name.startswith("model.") and name[len("model.") :].startswith(_TOP_LEVEL):
        name = name[len("model.") :]
    for old, new in _RENAMES:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    name = name.replace("vision_tower.vision_model.", "vision_tower.")
    return name.replace("language_model.model.", "language_model.")


def _torch_sources(get: _Tracked, config: Pi0Config) -> dict[str, Source]:
    """Our stacked-layout paths -> sources in transformers' PI0 names."""
    vis, llm = config.vision, "PaliGemma/llm/"
    w, h, hd = vis.width, vis.num_heads, vis.head_dim
    vt = "model.vlm.vision_tower."
    img = "PaliGemma/img/"

    def heads_in(weight: np.ndarray, n: int, d: int) -> np.ndarray:
        return weight.T.reshape(weight.shape[1], n, d)

    sources: dict[str, Source] = {
        f"{img}tower/patch_kernel": (
            False,
            lambda: get(f"{vt}embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
        ),
        f"{img}tower/patch_bias": (False, lambda: get(f"{vt}embeddings.patch_embedding.bias")),
        f"{img}tower/pos_embed": (
            False,
            lambda: get(f"{vt}embeddings.position_embedding.weight")[None],
        ),
        f"{img}tower/norm/scale": (False, lambda: get(f"{vt}post_layernorm.weight")),
        f"{img}tower/norm/bias": (False, lambda: get(f"{vt}post_layernorm.bias")),
        f"{img}head/kernel": (
            False,
            lambda: get("model.vlm.multi_modal_projector.linear.weight").T,
        ),
        f"{img}head/bias": (False, lambda: get("model.vlm.multi_modal_projector.linear.bias")),
    }
    blk = lambda i: f"{vt}encoder.layers.{i}."
    for ln, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
        sources[f"{img}tower/blocks/{ln}/scale"] = (
            True,
            lambda i, t=theirs: get(f"{blk(i)}{t}.weight"),
        )
        sources[f"{img}tower/blocks/{ln}/bias"] = (
            True,
            lambda i, t=theirs: get(f"{blk(i)}{t}.bias"),
        )
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        sources[f"{img}tower/blocks/attn/{ours}_kernel"] = (
            True,
            lambda i, t=theirs: heads_in(get(f"{blk(i)}self_attn.{t}.weight"), h, hd),
        )
        sources[f"{img}tower/blocks/attn/{ours}_bias"] = (
            True,
            lambda i, t=theirs: get(f"{blk(i)}self_attn.{t}.bias").reshape(h, hd),
        )
    sources[f"{img}tower/blocks/attn/out_kernel"] = (
        True,
        lambda i: get(f"{blk(i)}self_attn.out_proj.weight").T.reshape(h, hd, w),
    )
    sources[f"{img}tower/blocks/attn/out_bias"] = (
        True,
        lambda i: get(f"{blk(i)}self_attn.out_proj.bias"),
    )
    for j in (1, 2):
        sources[f"{img}tower/blocks/mlp/fc{j}_kernel"] = (
            True,
            lambda i, j=j: get(f"{blk(i)}mlp.fc{j}.weight").T,
        )
        sources[f"{img}tower/blocks/mlp/fc{j}_bias"] = (
            True,
            lambda i, j=j: get(f"{blk(i)}mlp.fc{j}.bias"),
        )

    lm = "model.vlm.language_model."
    sources[f"{llm}embedder/input_embedding"] = (
        False,
        lambda: (
            get(f"{lm}embed_tokens.weight")
            if f"{lm}embed_tokens.weight" in get
            else get(f"{lm}lm_head.weight")
        ),  # lerobot stores only the tied lm_head
    )
    for e, (prefix, cfg) in enumerate(
        (("model.vlm.language_model.", config.vlm), ("model.dit.", config.action_expert))
    ):
        s = expert_suffix(e)
        n, k, hdim, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
        lay = lambda i, p=prefix: f"{p}layers.{i}."
        base = f"{llm}layers/"

        def q_kernel(i, lay=lay, n=n, hdim=hdim, d=d):
            return get(f"{lay(i)}self_attn.q_proj.weight").reshape(n, hdim, d).transpose(0, 2, 1)

        def kv_kernel(i, lay=lay, k=k, hdim=hdim, d=d):
            kk = get(f"{lay(i)}self_attn.k_proj.weight").reshape(k, hdim, d).transpose(0, 2, 1)
            vv = get(f"{lay(i)}self_attn.v_proj.weight").reshape(k, hdim, d).transpose(0, 2, 1)
            return np.stack([kk, vv])

        def o_kernel(i, lay=lay, n=n, hdim=hdim, d=d):
            return get(f"{lay(i)}self_attn.o_proj.weight").T.reshape(n, hdim, d)

        def gating(i, lay=lay):
            gate = get(f"{lay(i)}mlp.gate_proj.weight").T
            up = get(f"{lay(i)}mlp.up_proj.weight").T
            return np.stack([gate, up])

        sources.update(
            {
                f"{base}attn/q_einsum{s}/kernel": (True, q_kernel),
                f"{base}attn/kv_einsum{s}/kernel": (True, kv_kernel),
                f"{base}attn/attn_vec_einsum{s}/kernel": (True, o_kernel),
                f"{base}mlp{s}/gating_einsum/kernel": (True, gating),
                f"{base}mlp{s}/linear/kernel": (
                    True,
                    lambda i, lay=lay: get(f"{lay(i)}mlp.down_proj.weight").T,
                ),
                f"{base}pre_attention_norm{s}/scale": (
                    True,
                    lambda i, lay=lay: get(f"{lay(i)}input_layernorm.weight"),
                ),
                f"{base}pre_ffw_norm{s}/scale": (
                    True,
                    lambda i, lay=lay: get(f"{lay(i)}post_attention_layernorm.weight"),
                ),
                f"{llm}final_norm{s}/scale": (False, lambda p=prefix: get(f"{p}norm.weight")),
            }
        )
    for proj in PROJECTIONS:
        theirs = proj if proj == "action_out_proj" else f"embed_action_time.{proj}"
        sources[f"{proj}/kernel"] = (False, lambda t=theirs: get(f"{t}.weight").T)
        sources[f"{proj}/bias"] = (False, lambda t=theirs: get(f"{t}.bias"))
    return sources


# Tensors of a PyTorch π0 checkpoint that π0 does not use: the expert's token embedding
# and lm_head (it never embeds tokens), the VLM's tied lm_head when embed_tokens is there.
_UNUSED_TORCH = ("model.dit.embed_tokens.weight", "model.dit.lm_head.weight")


def convert_torch_state_dict(
    tensors: Mapping[str, Any],
    config: Pi0Config,
    *,
    dtype: Any = jnp.float32,
    shardings: ShardingSpec = None,
    strict: bool = True,
    location: str = "the PyTorch state_dict",
) -> dict:
    """A π0 state_dict (name -> numpy-convertible array; transformers, lerobot or
    openpi-PyTorch names) -> our params of the imported parts."""
    names = {}
    for name in tensors:
        canonical = canonical_torch_name(name)
        if canonical in names:
            raise ValueError(
                f"{location}: {name!r} and {names[canonical]!r} both map to {canonical!r}"
            )
        names[canonical] = name
    get = _Tracked(lambda n: _to_numpy(tensors[names[n]]), names, location)
    out = _convert(_torch_sources(get, config), config, dtype, shardings, location)
    ignored = list(_UNUSED_TORCH) + ["model.vlm.language_model.lm_head.weight"]
    get.check_all_read(strict, ignored=[n for n in ignored if n in names])
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def import_pi0_safetensors(
    path: str | os.PathLike,
    config: Pi0Config,
    *,
    dtype: Any = jnp.bfloat16,
    shardings: ShardingSpec = None,
    strict: bool = True,
) -> dict:
    """Imports a PyTorch π0 checkpoint: a `.safetensors` file or a directory (one file, or
    shards + `model.safetensors.index.json`) in transformers' or lerobot's names. Tensors
    are read lazily (memory-mapped), one leaf at a time. Arguments as `import_openpi`."""
    checkpoint = open_checkpoint(path)
    return convert_torch_state_dict(
        checkpoint,
        config,
        dtype=dtype,
        shardings=shardings,
        strict=strict,
        location=checkpoint.location,
    )


# ----------------------------------------------------------------------------- merging


def merge_imported(params: Mapping[str, Any], imported: Mapping[str, Any]) -> dict:
    """Replaces the imported parts of full model `params` (PaliGemma, the projections) by
    `imported`, leaf by leaf with shape checks; LoRA adapters and the pixel / prompt
    encoders keep their values. Accepts and returns trees with or without a top-level
    "params" key (boxed leaves are unboxed)."""
    wrapped = "params" in params and len(params) == 1
    base = dict(nn.meta.unbox(params["params"] if wrapped else params))
    for part, theirs in imported.items():
        if part not in base:
            raise KeyError(f"model params have no {part!r} subtree (keys: {sorted(base)})")
        base[part] = _merge(base[part], theirs, part)
    return {"params": base} if wrapped else base


def _merge(ours: Any, theirs: Any, path: str) -> Any:
    if not isinstance(ours, Mapping):
        if tuple(ours.shape) != tuple(theirs.shape):
            raise ValueError(
                f"imported param {path} has shape {tuple(theirs.shape)}, the model's is "
                f"{tuple(ours.shape)}"
            )
        return theirs
    out = {}
    for key, value in ours.items():
        if key in theirs:
            out[key] = _merge(value, theirs[key], f"{path}/{key}")
        elif key in (LORA_A, LORA_B):
            out[key] = value
        else:
            raise KeyError(f"the import has no param {path}/{key}")
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise KeyError(f"imported params {[f'{path}/{k}' for k in extra]} are not in the model")
    return out
