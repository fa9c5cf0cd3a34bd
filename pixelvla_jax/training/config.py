"""The training config schema: every key, presets, validation, and the typed views of it.

Light on purpose: `policy.py`, `export.py`, `configs/*.py` and the benchmarks import it
without Grain, Orbax or the mesh code. `base_config()` declares every key a config may set
(a misspelt key is an error before anything is built); `configs/*.py` start from it and
`load_config("pixelref:tiny")` loads one by name. Each section is the view of a dataclass
(`ModelSection`, `optimizer.OptimConfig`, `data.config.DataConfig`, `GeneratorSection`); a
knob two sections need is set once, the other's 0 meaning "inherit it", filled in by
`resolved` (which `model_config`, `optim_config` and `data_config` read through).

Stages are freeze policies (regexes over parameter paths, first full match wins):

    cat            stage 1, Continuous Action Training: action head (+ slots) trained,
                   pixel/prompt encoders off, everything else frozen
    pue            stage 2, Pixel-level Understanding Enhancement: LoRA on the LLM, pixel and
                   prompt encoders, action head trained; everything else frozen
    finetune       everything trained (either family; π0's full fine-tune)
    lora_discrete  OpenVLA-style LoRA fine-tuning with the discrete token head
    lora           π0 family: LoRA on both Gemma experts (openpi's ranks: 16 on gemma_2b, 32
                   on gemma_300m), pixel/prompt encoders and the action projections trained;
                   everything else (SigLIP, Gemma weights, embedder) frozen

A model family is a config choice (`config.model.family`, FAMILIES): "pixelvla" builds
`models/pixelvla.py`'s PixelVLA, "pi0" builds `models/pi0.py`'s Pi0. `model_config` and
`build_model` are the one place that dispatches on it; training, checkpoints, runs, the
policy and export call them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixelvla_jax.data.config import DataConfig
from pixelvla_jax.errors import PixelVLAError
from pixelvla_jax.models import lora as lora_lib
from pixelvla_jax.models import vit as vit_lib
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig
from pixelvla_jax.models.pixelvla import init_params_fn as pixelvla_init_params_fn
from pixelvla_jax.training import optimizer as optimizer_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training.param_rules import FROZEN, TRAINED

# Model family -> its presets (`config.model.preset`): classmethods of its config class.
FAMILIES = ("pixelvla", "pi0")
MODEL_PRESETS = {"pixelvla": ("tiny", "openvla_7b"), "pi0": ("pi0_tiny", "pi0")}
PI0_PRESET_METHODS = {"pi0_tiny": "tiny", "pi0": "pi0"}  # preset -> Pi0Config classmethod
# π0 with model.target_point_tokens: the target's centre, in [-1, 1], times this in the flow
# (the z-scored actions are ~unit scale: the point dominates the sample's signal).
PI0_TARGET_POINT_SCALE = 3.0
TRAINED_HEAD = (("action_head/.*", TRAINED), ("action_slots", TRAINED))
# π0's action projections (openpi's names): state and noisy actions in, time MLP, velocity out.
PI0_ACTION_PROJECTIONS = (
    r"(state_proj|action_in_proj|action_time_mlp_in|action_time_mlp_out|action_out_proj)/.*"
)
STAGE_POLICIES: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "cat": (TRAINED_HEAD, FROZEN),
    "pue": (
        (
            (".*/lora_[ab]", TRAINED),
            ("pixel_encoder/.*", TRAINED),
            ("prompt_encoder/.*", TRAINED),
            *TRAINED_HEAD,
        ),
        FROZEN,
    ),
    "finetune": ((), TRAINED),
    "lora_discrete": (((".*/lora_[ab]", TRAINED),), FROZEN),
    # openpi's own LoRA filter freezes only `.*llm.*` (its SigLIP keeps training); add
    # ("PaliGemma/img/.*", "trained") to config.optim.freeze for that.
    "lora": (
        (
            (".*/lora_[ab]", TRAINED),
            ("pixel_encoder/.*", TRAINED),
            ("prompt_encoder/.*", TRAINED),
            (PI0_ACTION_PROJECTIONS, TRAINED),
        ),
        FROZEN,
    ),
}
# The stages each family can train.
FAMILY_STAGES = {
    "pixelvla": ("cat", "pue", "finetune", "lora_discrete"),
    "pi0": ("finetune", "lora"),
}
# Rules naming an encoder are dropped when the model is built without it (e.g. π0 with both
# encoders off is exactly π0): a rule that matches no parameter would be an error.
ENCODER_RULES = {"pixel_encoder/.*": "use_pixel_encoder", "prompt_encoder/.*": "use_prompt_encoder"}


class ConfigError(PixelVLAError, ValueError):
    """A config that cannot run; raised before any data is read or anything compiles."""


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """`config.model.lora`: LoRA on the LLM's linear layers.

    π0 family: `rank`/`alpha` are the VLM's (gemma_2b; openpi 16/16) and
    `expert_rank`/`expert_alpha` the action expert's (gemma_300m; openpi 32/32), on every
    attention and MLP projection as openpi's `gemma_*_lora` variants (`targets` unused).
    """

    rank: int = 0  # 0: no LoRA
    alpha: float = 16.0
    rslora: bool = False
    targets: str = r".*_proj"  # regex over LLM module paths ("all linear layers")
    expert_rank: int = 0  # π0 only: the action expert's rank (0: no LoRA on it)
    expert_alpha: float = 32.0  # π0 only


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`config.model`: which PixelVLAConfig to build (`model_config` reads it)."""

    # Model family: "pixelvla" (the OpenVLA-based model, models/pixelvla.py) or "pi0"
    # (PaliGemma + flow-matching action expert, models/pi0.py).
    family: str = "pixelvla"
    preset: str = "tiny"  # one of MODEL_PRESETS[family]
    tiny_width: int = 0  # preset "tiny" only: LLM width (0: the preset's 64)
    tiny_depth: int = 0  # preset "tiny" only: LLM layers (0: the preset's 2)
    # π0 family: the width actions and state are zero-padded to inside the model (0: the
    # preset's 32, openpi's); a small expert trained from scratch wants it near action_dim.
    padded_action_dim: int = 0
    pos_embed_init: str = "normal"  # ViT towers: "normal" or "sincos2d" (from scratch)
    head: str = "l1"  # "l1" (continuous chunk) or "discrete" (OpenVLA tokens)
    # L1 head decoding: "pixelvla" (causal prompt, learned bidirectional action slots) or
    # "oft" (exactly OpenVLA-OFT: bidirectional sequence, zeroed action inputs, stop token).
    l1_mode: str = "pixelvla"
    use_proprio: bool = False  # OFT: the proprio projector's token (state -> LLM width)
    use_wrist_image: bool = False  # a second camera (OFT: through the fused backbone)
    # OpenVLA family: per-tower normalisation of [0, 1] pixels; () = the preset's (ImageNet /
    # SigLIP). Filled from an OpenVLA/OFT checkpoint's preprocessor_config.json when the run
    # starts from one (the released one holds bf16-rounded ImageNet values), so the run's
    # saved config normalises exactly as that checkpoint's processor.
    dino_mean: object = dataclasses.field(default_factory=list)
    dino_std: object = dataclasses.field(default_factory=list)
    siglip_mean: object = dataclasses.field(default_factory=list)
    siglip_std: object = dataclasses.field(default_factory=list)
    # Discrete head: 0 = greedy (OpenVLA); > 0 = action tokens sampled at this temperature.
    decode_temperature: float = 0.0
    # Grounding (PixelVLAConfig): the instruction before the image tokens; a per-patch BCE
    # at this weight against the referred-objects mask, else the target mask (needs
    # text_first); the discrete head decodes the target's centre as 2 tokens before the action.
    # The π0 family takes patch_grounding_weight alone (its prefix is bidirectional), and
    # target_point_tokens as the target's centre generated in 2 extra flow dims beside the
    # action (Pi0Config.target_point_scale = PI0_TARGET_POINT_SCALE).
    text_first: bool = False
    patch_grounding_weight: float = 0.0
    target_point_tokens: bool = False
    chunk_size: int = 8  # N_c; π0: the action horizon H (config.data.action_chunk inherits it)
    use_pixel_encoder: bool = True
    use_prompt_encoder: bool = True
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
    frozen_dtype: str = ""  # e.g. "bfloat16": frozen weights held in bf16
    remat: bool = False
    scan_layers: bool = False
    lora: LoRASection = LoRASection()


@dataclasses.dataclass(frozen=True)
class GeneratorSection:
    """`config.data_generator`: a dataset generated on first use when absent."""

    kind: str = ""  # a kind of pixelvla_jax.data.generators ("" = never generate)
    num_episodes: int = 16
    episode_length: int = 24
    image_size: int = 0  # 0: config.data.image_size (no resampling)


# The optimizer defaults of a training config (a tiny CPU run). Inherited:
# total_steps 0 = config.train.num_steps.
OPTIM_DEFAULTS = optimizer_lib.OptimConfig(lr=5e-4, warmup_steps=10, total_steps=0)

# The data defaults of a training config. Inherited: action_chunk 0 = config.model.chunk_size
# (with the L1 head any other value is an error); image_size 0 = the model preset's input
# size (any other value is an error: `validate_config`).
DATA_DEFAULTS = dataclasses.replace(
    DataConfig(),
    datasets=(("synthetic_libero", 1.0),),
    data_dir="data",
    action_chunk=0,
    image_size=0,
)


def family_config_class(family: str) -> type:
    """The model config class of a family (`config.model.family`): PixelVLAConfig or Pi0Config."""
    if family == "pi0":
        from pixelvla_jax.models.pi0 import Pi0Config

        return Pi0Config
    if family == "pixelvla":
        return PixelVLAConfig
    raise ConfigError(f"config.model.family={family!r}; use one of {FAMILIES}.")


def check_preset(family: str, preset: str) -> None:
    """Raises ConfigError unless `preset` is one of the family's presets."""
    if family not in FAMILIES:
        raise ConfigError(f"config.model.family={family!r}; use one of {FAMILIES}.")
    if preset not in MODEL_PRESETS[family]:
        other = [f for f, presets in MODEL_PRESETS.items() if preset in presets]
        hint = f" ({preset!r} is a preset of family {other[0]!r})" if other else ""
        raise ConfigError(
            f"config.model.preset={preset!r} is not a preset of config.model.family="
            f"{family!r}{hint}; use one of {MODEL_PRESETS[family]}, or set config.model.family."
        )


@functools.cache
def preset_image_size(family: str, preset: str) -> int:
    """The input image side of a model preset (`config.model.family`, `config.model.preset`)."""
    check_preset(family, preset)
    method = PI0_PRESET_METHODS[preset] if family == "pi0" else preset
    return getattr(family_config_class(family), method)().image_size


def _list_field(value: Any) -> ml_collections.FieldReference:
    """A list-valued key that `--config.KEY=...` can override.

    ml_collections' config_flags refuses to override a `list` field; a field declared with
    type `object` is parsed as a Python literal instead (`--config.optim.freeze='[(".*",
    "frozen")]'`), or kept as the string when it is not one (`--config.data.datasets=a:1,b`),
    which `resolved` parses. Configs still assign plain lists to it.
    """
    return ml_collections.FieldReference(list(value), field_type=object)


def _config_dict(section: Any) -> ml_collections.ConfigDict:
    """The ConfigDict view of a dataclass section (its tuple fields as overridable lists)."""
    raw = dataclasses.asdict(section)
    return ml_collections.ConfigDict(
        {k: _list_field(v) if isinstance(v, tuple) else v for k, v in raw.items()}
    )


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with defaults (a tiny CPU run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = "finetune"  # a key of STAGE_POLICIES

    c.model = _config_dict(ModelSection())
    c.data = _config_dict(DATA_DEFAULTS)
    c.data_generator = _config_dict(GeneratorSection())

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a sentencepiece .model; "" -> the OpenVLA checkpoint's or a tiny one
    c.tokenizer.tiny_vocab_size = 512  # trained on the spot when no path is given

    c.init = ml_collections.ConfigDict()
    c.init.openvla_checkpoint = ""  # an OpenVLA HF directory (safetensors + config.json)
    c.init.pi0_checkpoint = ""  # π0 family: an openpi checkpoint's params/ (Orbax PyTree)
    c.init.from_checkpoint = ""  # a run's workdir (or its checkpoints/): start from its params

    c.optim = _config_dict(OPTIM_DEFAULTS)

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = _list_field([list(r) for r in sharding_lib.DEFAULT_RULES])

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 200
    # EMA of the trained parameters (openpi: 0.99), updated every step, saved with the
    # checkpoint and acted with (runs.load_run); 0: off.
    c.train.ema_decay = 0.0
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep_last = 3
    c.train.keep_period = 0  # also keep every K-th step (0: off)
    c.train.async_checkpoint = True
    c.train.peak_flops = 0.0  # per device, for MFU; 0 -> measured on CPU, unknown elsewhere
    c.train.holdout_every = 0  # hold out every k-th episode for validation (0: no validation)
    c.train.eval_every = 500  # validation loss every this many steps (and at the end)
    c.train.eval_batches = 4  # the same batches of held-out episodes each time
    c.train.progress = True
    return c


def use_openvla_7b(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Full-size settings the 7B configs share: the OpenVLA-7B preset, bf16 compute and
    frozen weights, remat + scan over layers, parameters sharded (FSDP) over every chip."""
    c.model.preset = "openvla_7b"
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.data.worker_count = 8
    c.data.num_threads = 16
    c.train.log_every = 50
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def use_tiny(c: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
    """The tiny model on a generated LIBERO-format dataset: runs on a laptop CPU."""
    c.model.preset = "tiny"
    c.data.datasets = [("synthetic_libero", 1.0)]
    c.data.image_size = 56
    c.data.batch_size = 8
    c.data.num_threads = 2
    c.data_generator.kind = "synthetic_libero"
    c.data_generator.image_size = 64  # larger than the model's 56 px: the resize is exercised
    c.train.num_steps = num_steps
    c.train.checkpoint_every = max(1, num_steps // 2)
    c.optim.warmup_steps = min(5, num_steps - 1)
    c.optim.lr = 1e-3
    return c


def _unknown_key(key: str, known: Any, prefix: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
    return ConfigError(
        f"Unknown config key 'config.{prefix}{key}'.{hint} Known keys here: {sorted(known)}."
    )


def _check_keys(cfg: Any, reference: Any, prefix: str) -> None:
    if not isinstance(reference, ml_collections.ConfigDict):
        return
    if not isinstance(cfg, ml_collections.ConfigDict | Mapping):
        raise ConfigError(f"config.{prefix} must be a section of keys, got {cfg!r}")
    for key in cfg:
        if key not in reference:
            raise _unknown_key(key, reference.keys(), prefix)
        _check_keys(cfg[key], reference[key], f"{prefix}{key}.")


def validate_config(
    cfg: ml_collections.ConfigDict, model_cfg: PixelVLAConfig | None = None
) -> None:
    """Raises ConfigError for an unknown key or an impossible value (nothing is built).

    `model_cfg` overrides the model `cfg` describes (as `builder.build_step` takes it).
    """
    _check_keys(cfg, base_config(), "")
    m = model_section(cfg)
    check_preset(m.family, m.preset)
    if cfg.stage not in FAMILY_STAGES[m.family]:
        raise ConfigError(
            f"config.stage={cfg.stage!r} is not a stage of config.model.family={m.family!r}; "
            f"use one of {FAMILY_STAGES[m.family]}."
        )
    if m.family == "pi0":
        _validate_pi0(cfg, m)
    elif cfg.init.get("pi0_checkpoint"):
        raise ConfigError(
            "config.init.pi0_checkpoint is an openpi π0 checkpoint: set "
            "config.model.family='pi0' (and a π0 preset) to start from it."
        )
    if m.family == "pixelvla":
        _validate_l1_mode(cfg, m)
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype={cfg.model.dtype!r}; use float32 or bfloat16.")
    if cfg.model.pos_embed_init not in vit_lib.POS_EMBED_INITS:
        raise ConfigError(
            f"config.model.pos_embed_init={cfg.model.pos_embed_init!r}; use one of "
            f"{vit_lib.POS_EMBED_INITS}."
        )
    if cfg.stage == "pue" and cfg.model.lora.rank <= 0:
        raise ConfigError("config.stage='pue' trains LoRA: set config.model.lora.rank > 0 (32).")
    if cfg.stage == "lora_discrete" and (cfg.model.lora.rank <= 0 or cfg.model.head != "discrete"):
        raise ConfigError(
            "stage 'lora_discrete' needs model.lora.rank > 0 and model.head='discrete'."
        )
    resolved(cfg)  # an inherited knob that contradicts its source
    ema_decay = float(cfg.train.get("ema_decay", 0.0))
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(
            f"config.train.ema_decay={ema_decay} must be in [0, 1) (openpi: 0.99; 0: no EMA)."
        )
    if cfg.train.num_steps < 1 or cfg.train.log_every < 1 or cfg.train.checkpoint_every < 1:
        raise ConfigError("config.train.num_steps, log_every and checkpoint_every must be >= 1.")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"config.data.batch_size={cfg.data.batch_size} must be >= 1.")
    if not cfg.tokenizer.path and not cfg.init.openvla_checkpoint:  # a tiny one is trained
        check_tokenizer_fits(
            model_cfg or model_config(cfg),
            cfg.tokenizer.tiny_vocab_size,
            "config.tokenizer.tiny_vocab_size",
        )
    # Training and acting both resize frames to data.image_size: any other size than the
    # model's input would train on one resampling and evaluate on another.
    data_size = resolved(cfg).data.image_size
    model_size = (model_cfg or model_config(cfg)).image_size
    if data_size != model_size:
        raise ConfigError(
            f"config.data.image_size={data_size} differs from the model's input size "
            f"{model_size} (config.model.preset={cfg.model.preset!r}); set "
            f"config.data.image_size={model_size} or 0 (inherit it), or a config.model.preset "
            "of that size. To train on larger source frames, set "
            "config.data_generator.image_size (generated data) and let the pipeline resize."
        )


def _validate_l1_mode(cfg: ml_collections.ConfigDict, m: ModelSection) -> None:
    """The L1 head's mode and OpenVLA-OFT's inputs (wrist camera, proprio), which the data
    section must provide."""
    from pixelvla_jax.models.pixelvla import L1_MODES

    if m.l1_mode not in L1_MODES:
        raise ConfigError(f"config.model.l1_mode={m.l1_mode!r}; use one of {L1_MODES}.")
    oft = m.head == "l1" and m.l1_mode == "oft"
    if m.l1_mode == "oft" and (m.head != "l1" or m.text_first):
        raise ConfigError(
            "config.model.l1_mode='oft' (OpenVLA-OFT's parallel decoding) needs "
            "config.model.head='l1' and config.model.text_first=False."
        )
    if (m.use_proprio or m.use_wrist_image) and not oft:
        raise ConfigError(
            "config.model.use_proprio / use_wrist_image are OpenVLA-OFT's inputs in this "
            "family: set config.model.l1_mode='oft' as well."
        )
    _check_inputs_match_batch(cfg, m)


def _validate_pi0(cfg: ml_collections.ConfigDict, m: ModelSection) -> None:
    """What the π0 family cannot do, said before anything is built."""
    defaults = ModelSection()
    for key in (
        "head",
        "l1_mode",
        "decode_temperature",
        "text_first",
    ):
        if getattr(m, key) != getattr(defaults, key):
            raise ConfigError(
                f"config.model.{key}={getattr(m, key)!r} is an option of the OpenVLA-based "
                "family; the π0 family (its flow-matching action expert) has no such choice: "
                f"leave it at {getattr(defaults, key)!r}."
            )
    if m.tiny_width % 32 or m.tiny_depth < 0:
        raise ConfigError(
            f"config.model.tiny_width={m.tiny_width} must be a multiple of 32 (0: the "
            f"preset's) and tiny_depth={m.tiny_depth} >= 0."
        )
    widest = max(cfg.data.action_dim + (2 if m.target_point_tokens else 0), cfg.data.proprio_dim)
    if m.padded_action_dim and m.padded_action_dim < widest:
        raise ConfigError(
            f"config.model.padded_action_dim={m.padded_action_dim} is narrower than the "
            f"data's actions / proprio (data.action_dim={cfg.data.action_dim}, "
            f"data.proprio_dim={cfg.data.proprio_dim}; model.target_point_tokens adds 2 "
            f"dims to the actions): use >= {widest}, or 0 for the preset's 32."
        )
    if cfg.stage == "lora" and m.lora.rank <= 0 and m.lora.expert_rank <= 0:
        raise ConfigError(
            "config.stage='lora' trains LoRA adapters: set config.model.lora.rank (gemma_2b; "
            "openpi 16) and/or config.model.lora.expert_rank (gemma_300m; openpi 32) > 0."
        )
    if cfg.init.openvla_checkpoint:
        raise ConfigError(
            "config.init.openvla_checkpoint is an OpenVLA checkpoint, which the π0 family "
            "cannot load; use config.init.pi0_checkpoint (an openpi checkpoint's params/)."
        )
    if cfg.init.get("pi0_checkpoint") and not cfg.tokenizer.path:
        raise ConfigError(
            f"config.init.pi0_checkpoint={cfg.init.pi0_checkpoint} holds no tokenizer: set "
            "config.tokenizer.path to PaliGemma's paligemma_tokenizer.model (openpi reads it "
            "from gs://big_vision/paligemma_tokenizer.model)."
        )
    _check_inputs_match_batch(cfg, m)


def _check_inputs_match_batch(cfg: ml_collections.ConfigDict, m: ModelSection) -> None:
    """The model's optional inputs and the batch's keys are one choice (either family):
    never a camera or a state the model would read as zeros, nor one it would ignore."""
    data = resolved(cfg).data
    for model_key, data_key in (
        ("use_wrist_image", "use_wrist_image"),
        ("use_proprio", "use_state"),
    ):
        if bool(getattr(m, model_key)) != bool(data[data_key]):
            raise ConfigError(
                f"config.model.{model_key}={getattr(m, model_key)} but config.data.{data_key}="
                f"{data[data_key]}: the model reads what the batches carry; set both alike."
            )


def check_tokenizer_fits(
    model_cfg: Any, vocab_size: int | None = None, tokenizer: str = ""
) -> None:
    """Raises ConfigError if a tokenizer's ids exceed the text vocabulary the model embeds.

    Ids past `model_cfg.tokenizer_vocab_size` index padding rows of the embedding table, or
    past it (a NaN loss), and collide with the discrete head's action tokens.

    Args:
      model_cfg: the model.
      vocab_size: the tokenizer's number of pieces (None: read from the file `tokenizer`).
      tokenizer: the tokenizer's .model path, or where its size is set (for the message).
    """
    if vocab_size is None:
        from pixelvla_jax.data.tokenizer import Tokenizer

        vocab_size = Tokenizer(tokenizer).vocab_size
    if not isinstance(model_cfg, PixelVLAConfig):  # π0: the VLM's embedding table
        limit = model_cfg.vlm.vocab_size
        if vocab_size > limit:
            raise ConfigError(
                f"The tokenizer ({tokenizer}) has {vocab_size} pieces but the π0 model embeds "
                f"{limit} (the vlm.vocab_size of its config.model.preset): "
                f"larger ids would read past the table. Use a tokenizer of at most {limit} "
                "pieces (the PaliGemma tokenizer for the full model, "
                "config.tokenizer.tiny_vocab_size for pi0_tiny)."
            )
        return
    limit = model_cfg.tokenizer_vocab_size
    if vocab_size > limit:
        raise ConfigError(
            f"The tokenizer ({tokenizer}) has {vocab_size} pieces but the model embeds a text "
            f"vocabulary of {limit} (embedding table: {model_cfg.llama.vocab_size} rows, "
            f"llama.vocab_size; text vocabulary: tokenizer_vocab_size of "
            "config.model.preset): larger ids would read padding rows or past the table "
            f"(a NaN loss). Use a tokenizer of at most {limit} pieces "
            "(config.tokenizer.tiny_vocab_size, or another config.tokenizer.path) or a "
            "config.model.preset built for this tokenizer."
        )


def _merged(defaults: Any, section: Any, prefix: str) -> dict[str, Any]:
    """`defaults` (a dataclass, or a dict) as a dict, updated with the keys `section` sets,
    nested dataclass sections key by key: a config saved before a key existed reads its
    default. A key the defaults lack is a ConfigError."""
    if dataclasses.is_dataclass(defaults):
        fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
        out = dataclasses.asdict(defaults)
    else:
        fields, out = dict(defaults), dict(defaults)
    given = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    for key, value in given.items():
        if key not in out:
            raise _unknown_key(key, out, prefix)
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, Mapping):
            value = _merged(fields[key], value, f"{prefix}{key}.")
        out[key] = value
    return out


DATASETS_SYNTAX = (
    "a list of (name, weight) pairs in a config file; on the command line "
    "--config.data.datasets=libero_spatial_no_noops:1,libero_object_no_noops:0.5 "
    "(name:weight pairs separated by commas, the weight optional: 1)"
)


def parse_datasets(value: Any) -> list[tuple[str, float]]:
    """`config.data.datasets` as [(name, weight), ...]. Accepts a list whose items are
    (name, weight) pairs or bare names (weight 1), a {name: weight} mapping, or the
    command line's string "name:weight,name,..." (weight optional, 1). Weights must be
    finite and > 0. Raises ConfigError naming the malformed part."""

    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"config.data.datasets={value!r}: {what}. Write it as {DATASETS_SYNTAX}."
        )

    def weight_of(name: str, weight: Any) -> float:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise bad(f"the weight of {name!r} is {weight!r}, not a number") from None
        if not math.isfinite(w) or w <= 0:
            raise bad(f"the weight of {name!r} is {weight!r}; weights must be > 0")
        return w

    def checked_name(name: Any) -> str:
        if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
            raise bad(f"{name!r} is not a dataset name")
        return name

    if isinstance(value, str):
        entries = [e.strip() for e in value.split(",")]
        if any(not e for e in entries):
            raise bad("an empty entry (two commas, or a leading or trailing comma)")
        pairs = []
        for entry in entries:
            name, sep, weight = entry.partition(":")
            if sep and not weight.strip():
                raise bad(f"{entry!r} has a ':' but no weight")
            pairs.append((name.strip(), weight.strip() if sep else 1.0))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        pairs = []
        for item in value:
            if isinstance(item, str):
                pairs.append((item, 1.0))
            elif isinstance(item, list | tuple) and len(item) == 2:
                pairs.append(tuple(item))
            else:
                raise bad(f"the entry {item!r} is neither a name nor a (name, weight) pair")
    else:
        raise bad(f"a {type(value).__name__} is not a list of datasets")
    if not pairs:
        raise bad("no dataset")
    out = [(checked_name(name), weight_of(name, weight)) for name, weight in pairs]
    names = [name for name, _ in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise bad(f"{repeated} listed more than once; give each dataset once with its weight")
    return out


def _literal_hint(key: str, example: str) -> str:
    return f"On the command line write it as a Python literal: --config.{key}='{example}'."


def _parse_freeze(value: Any) -> list[list[str]]:
    """`config.optim.freeze` as [[regex, "trained" | "frozen"], ...]."""
    example = '[(".*vision.*", "frozen")]'
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"config.optim.freeze={value!r} is not a list of (regex, label) pairs. "
            + _literal_hint("optim.freeze", example)
        )
    rules = []
    for rule in value:
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(
                f"config.optim.freeze: the rule {rule!r} is not a (regex, label) pair. "
                + _literal_hint("optim.freeze", example)
            )
        regex, label = rule
        if label not in (TRAINED, FROZEN):
            raise ConfigError(
                f"config.optim.freeze: the rule {rule!r} has label {label!r}; use "
                f"{TRAINED!r} or {FROZEN!r}."
            )
        try:
            re.compile(regex)
        except re.error as e:
            raise ConfigError(
                f"config.optim.freeze: {regex!r} is not a valid regex ({e})."
            ) from None
        rules.append([regex, label])
    return rules


def _parse_regexes(value: Any, key: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(r, str) for r in value):
        raise ConfigError(
            f"config.{key}={value!r} is not a list of regexes. "
            + _literal_hint(key, '["(.*/)?bias", ".*norm.*"]')
        )
    for regex in value:
        try:
            re.compile(regex)
        except re.error as e:
            raise ConfigError(f"config.{key}: {regex!r} is not a valid regex ({e}).") from None
    return list(value)


def _parse_sharding_rules(value: Any) -> list[list[Any]]:
    example = '[("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor")]'
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"config.sharding_rules={value!r} is not a list of (logical_name, mesh_axes) "
            "pairs. " + _literal_hint("sharding_rules", example)
        )
    try:
        rules = sharding_lib.normalize_rules(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.sharding_rules: {e}") from None
    return [list(rule) for rule in rules]


def resolved(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose `model`, `optim`, `data` and `data_generator` sections hold every
    key (defaults for those a saved config lacks) and every inherited knob resolved; the one
    place inheritance happens:

        optim.total_steps          0 -> train.num_steps
        data.action_chunk          0 -> model.chunk_size (L1 head: any other value is an error)
        data.image_size            0 -> the model preset's input size
        data_generator.image_size  0 -> data.image_size

    and list-valued keys parsed: `data.datasets` (`parse_datasets`: also the command line's
    "name:weight,..." string) to (name, weight) pairs; `optim.freeze`, `optim.no_decay` and
    `sharding_rules` checked (a command-line override is a Python literal).

    Raises ConfigError for an unknown key in those sections, a malformed value or a
    contradiction.
    """
    out = ml_collections.ConfigDict(cfg.to_dict())
    model = _merged(ModelSection(), cfg.model, "model.")
    optim = _merged(OPTIM_DEFAULTS, cfg.optim, "optim.")
    data = _merged(DATA_DEFAULTS, cfg.data, "data.")
    data["datasets"] = parse_datasets(data["datasets"])
    optim["freeze"] = _parse_freeze(optim["freeze"])
    optim["no_decay"] = _parse_regexes(optim["no_decay"], "optim.no_decay")
    if "sharding_rules" in cfg:
        out.sharding_rules = _parse_sharding_rules(cfg.sharding_rules)
    if optim["total_steps"] == 0:
        optim["total_steps"] = cfg.train.num_steps
    if data["action_chunk"] == 0:
        data["action_chunk"] = model["chunk_size"]
    if data["image_size"] == 0:
        data["image_size"] = preset_image_size(model["family"], model["preset"])
    if model["head"] == "l1" and data["action_chunk"] != model["chunk_size"]:
        raise ConfigError(
            f"config.data.action_chunk={data['action_chunk']} must equal "
            f"config.model.chunk_size={model['chunk_size']} for the L1 head; leave "
            "data.action_chunk at 0 to inherit it."
        )
    if data["action_chunk"] < 1:
        raise ConfigError(
            f"config.data.action_chunk={data['action_chunk']} must be >= 1 (0: inherit "
            "config.model.chunk_size)."
        )
    out.model, out.optim, out.data = model, optim, data
    if "data_generator" in cfg:
        generator = _merged(GeneratorSection(), cfg.data_generator, "data_generator.")
        if generator["image_size"] == 0:
            generator["image_size"] = data["image_size"]
        out.data_generator = generator
    return out


def generator_image_size(cfg: ml_collections.ConfigDict) -> int:
    """The side of the images a dataset generator renders (`config.data_generator.image_size`,
    0: `config.data.image_size`)."""
    return resolved(cfg).data_generator.image_size


def model_section(cfg: ml_collections.ConfigDict) -> ModelSection:
    """`config.model` as a ModelSection (defaults for keys a saved config lacks)."""
    raw = _merged(ModelSection(), cfg.model, "model.")
    return ModelSection(**{**raw, "lora": LoRASection(**raw["lora"])})


NORMALISATION_KEYS = ("dino_mean", "dino_std", "siglip_mean", "siglip_std")


def with_checkpoint_preprocessing(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` with `model.{dino,siglip}_{mean,std}` read from `config.init.openvla_checkpoint`'s
    `preprocessor_config.json` where they are unset (the same `cfg` when nothing applies)."""
    directory = cfg.init.get("openvla_checkpoint", "")
    if not directory or all(len(cfg.model.get(k, ())) for k in NORMALISATION_KEYS):
        return cfg
    from pixelvla_jax.weights.openvla import read_preprocessing

    pre = read_preprocessing(directory)
    if pre is None:
        return cfg
    out = ml_collections.ConfigDict(cfg.to_dict())
    for key in NORMALISATION_KEYS:
        if not len(out.model.get(key, ())):
            out.model[key] = list(getattr(pre, key))
    return out


def model_config(cfg: ml_collections.ConfigDict) -> Any:
    """The model config a training config describes: a PixelVLAConfig, or a Pi0Config for
    `config.model.family="pi0"`."""
    m = model_section(cfg)
    if m.family == "pi0":
        return _pi0_model_config(cfg, m)
    data = data_config(cfg, "")
    sizes = {}
    if m.preset == "tiny":
        if m.tiny_width:
            sizes["width"] = m.tiny_width
        if m.tiny_depth:
            sizes["depth"] = m.tiny_depth
    preset = getattr(PixelVLAConfig, m.preset)(**sizes)
    llama = preset.llama
    if m.lora.rank > 0:
        rule = (m.lora.targets, lora_lib.LoRAConfig(m.lora.rank, m.lora.alpha, m.lora.rslora))
        llama = llama.replace(lora_rules=(rule,))
    llama = llama.replace(remat=m.remat, scan_layers=m.scan_layers)
    head = dataclasses.replace(
        preset.action_head, chunk_size=m.chunk_size, action_dim=data.action_dim
    )
    vision = preset.vision
    if m.pos_embed_init != "normal":
        vision = dataclasses.replace(
            vision,
            dino=dataclasses.replace(vision.dino, pos_embed_init=m.pos_embed_init),
            siglip=dataclasses.replace(vision.siglip, pos_embed_init=m.pos_embed_init),
        )
    norms = {
        key: tuple(float(v) for v in getattr(m, key))
        for key in NORMALISATION_KEYS
        if len(getattr(m, key))
    }
    for key, value in norms.items():
        if len(value) != 3:
            raise ConfigError(f"config.model.{key}={value}: give 3 values (R, G, B), or ().")
    if norms:
        vision = dataclasses.replace(vision, **norms)
    return preset.replace(
        vision=vision,
        llama=llama,
        action_head=head,
        head=m.head,
        l1_mode=m.l1_mode,
        use_proprio=bool(m.use_proprio),
        proprio_dim=data.proprio_dim,
        use_wrist_image=bool(m.use_wrist_image),
        decode_temperature=float(m.decode_temperature),
        text_first=bool(m.text_first),
        patch_grounding_weight=float(m.patch_grounding_weight),
        target_point_tokens=bool(m.target_point_tokens),
        use_pixel_encoder=m.use_pixel_encoder and cfg.stage != "cat",
        use_prompt_encoder=m.use_prompt_encoder and cfg.stage != "cat",
        vision_remat=m.remat,
        vision_scan_layers=m.scan_layers,
        max_text_tokens=data.max_tokens,
        max_prompt_points=data.prompt_cfg.max_points,
    )


def _pi0_model_config(cfg: ml_collections.ConfigDict, m: ModelSection) -> Any:
    """The Pi0Config of a π0-family config: the preset, the action horizon H
    (`model.chunk_size`), the cameras (`model.use_wrist_image`: base + wrist), LoRA per
    expert (`model.lora.rank` / `expert_rank`), the encoders, compute dtype, remat and scan."""
    data = data_config(cfg, "")
    preset = getattr(family_config_class("pi0"), PI0_PRESET_METHODS[m.preset])()
    if m.preset == "pi0_tiny" and (m.tiny_width or m.tiny_depth):
        # The VLM `tiny_width` wide (MLP 2x), the expert half as wide, both `tiny_depth`
        # deep; heads and head_dim as the preset (the experts attend jointly).
        from pixelvla_jax.models.pixel_encoder import PixelEncoderConfig
        from pixelvla_jax.models.prompt_encoder import PromptEncoderConfig

        width = m.tiny_width or preset.vlm.width
        depth = m.tiny_depth or preset.vlm.depth
        preset = preset.replace(
            vlm=preset.vlm.replace(width=width, mlp_dim=2 * width, depth=depth),
            action_expert=preset.action_expert.replace(
                width=width // 2, mlp_dim=width, depth=depth
            ),
            pixel_encoder=PixelEncoderConfig.tiny(out_dim=width),
            prompt_encoder=PromptEncoderConfig.tiny(out_dim=width),
        )
    if m.pos_embed_init != "normal":
        preset = preset.replace(
            vision=dataclasses.replace(preset.vision, pos_embed_init=m.pos_embed_init)
        )
    if m.lora.rank > 0 or m.lora.expert_rank > 0:
        preset = preset.replace(
            vlm=preset.vlm.replace(lora_rules=_pi0_lora(0, m.lora.rank, m.lora.alpha)),
            action_expert=preset.action_expert.replace(
                lora_rules=_pi0_lora(1, m.lora.expert_rank, m.lora.expert_alpha)
            ),
        )
    return preset.replace(
        action_horizon=m.chunk_size,
        **(
            {"model_action_dim": m.padded_action_dim, "model_state_dim": m.padded_action_dim}
            if m.padded_action_dim
            else {}
        ),
        action_dim=data.action_dim,
        num_cameras=2 if m.use_wrist_image else 1,
        use_pixel_encoder=m.use_pixel_encoder,
        use_prompt_encoder=m.use_prompt_encoder,
        dtype=m.dtype,
        remat=m.remat,
        scan_layers=m.scan_layers,
        max_text_tokens=data.max_tokens,
        max_prompt_points=data.prompt_cfg.max_points,
        patch_grounding_weight=float(m.patch_grounding_weight),
        target_point_scale=PI0_TARGET_POINT_SCALE if m.target_point_tokens else 0.0,
    )


def _pi0_lora(expert: int, rank: int, alpha: float) -> tuple:
    """LoRA rules on every linear layer of Gemma expert `expert` (none for rank 0)."""
    from pixelvla_jax.models import gemma

    return gemma.expert_lora_rules(expert, rank, alpha) if rank > 0 else ()


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def build_model(cfg: ml_collections.ConfigDict, model_cfg: Any = None) -> Any:
    """The Flax module `cfg` describes (`config.model.family`): PixelVLA or Pi0, computing in
    `config.model.dtype`. `model_cfg` overrides `model_config(cfg)` (a custom size)."""
    model_cfg = model_cfg or model_config(cfg)
    if model_section(cfg).family == "pi0":
        from pixelvla_jax.models.pi0 import Pi0

        return Pi0(model_cfg, dtype=compute_dtype(cfg))
    return PixelVLA(model_cfg, dtype=compute_dtype(cfg))


def init_params_fn(model: Any) -> Any:
    """`rng -> params` (boxed with logical axes) of a module `build_model` made: its family's
    own init from a batch-1 zero observation."""
    if isinstance(model, PixelVLA):
        return pixelvla_init_params_fn(model)
    from pixelvla_jax.models import pi0

    return pi0.init_params_fn(model)


# The L1 head never reads the LM head (it is kept so that exports stay OpenVLA checkpoints):
# frozen, it costs no optimizer state (2 x 32064 x 4096 fp32 = 1 GiB at 7B) and no update.
UNUSED_BY_L1 = (("llm/lm_head/.*", FROZEN),)


def freeze_rules(cfg: ml_collections.ConfigDict) -> tuple[list, str]:
    """(rules, default) of the stage, after any rules given in `config.optim.freeze`
    (first match wins); with PixelVLA's L1 head, the unused LM head is frozen after those;
    the stage's rules for an encoder the model is built without are dropped."""
    rules, default = STAGE_POLICIES[cfg.stage]
    given = _parse_freeze(_merged(OPTIM_DEFAULTS, cfg.optim, "optim.")["freeze"])
    m = model_section(cfg)
    unused = list(UNUSED_BY_L1) if m.family == "pixelvla" and m.head == "l1" else []
    built = [r for r in rules if r[0] not in ENCODER_RULES or getattr(m, ENCODER_RULES[r[0]])]
    return [tuple(r) for r in given] + unused + built, default


def optim_config(cfg: ml_collections.ConfigDict) -> optimizer_lib.OptimConfig:
    """The optimizer settings: `config.optim` resolved, with the stage's freeze rules."""
    rules, default = freeze_rules(cfg)
    optim = optimizer_lib.OptimConfig.from_mapping(resolved(cfg).optim)
    return dataclasses.replace(optim, freeze=tuple(rules), freeze_default=default)


def data_config(cfg: ml_collections.ConfigDict, tokenizer_path: str) -> DataConfig:
    """The pipeline's DataConfig: `config.data` resolved, with this host's batch size."""
    raw = resolved(cfg).data.to_dict()
    raw["tokenizer_path"] = tokenizer_path
    raw["batch_size"] = raw["batch_size"] // jax.process_count()
    raw["seed"] = cfg.seed if raw["seed"] == 0 else raw["seed"]
    return DataConfig.from_mapping(raw)


# ---------------------------------------------------------------------------- loading

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def load_config(name: str, configs_dir: str | None = None) -> ml_collections.ConfigDict:
    """`"pixelref:tiny"` -> `configs/pixelref.py`'s `get_config("tiny")` (no variant: its
    default). Configs live in the source checkout's top-level `configs/`; a path to a
    `.py` file works too (`"configs/libero.py:tiny"`)."""
    file, _, variant = name.partition(":")
    configs_dir = configs_dir or CONFIGS_DIR
    if not file.endswith(".py"):
        file = os.path.join(configs_dir, f"{file}.py")
    if not os.path.exists(file):
        known = sorted(
            f.removesuffix(".py")
            for f in (os.listdir(configs_dir) if os.path.isdir(configs_dir) else [])
            if f.endswith(".py") and not f.startswith("_")
        )
        raise FileNotFoundError(
            f"Config {name!r}: no file {os.path.abspath(file)}. Known configs: {known} (or a "
            "path to a .py file); they are the files in the source checkout's configs/ "
            "directory, so run from a checkout (pip install -e .)."
        )
    module = load_config_module(file)
    return module.get_config(variant) if variant else module.get_config()


def load_config_module(file: str) -> Any:
    """A config file (`configs/<name>.py`, or a path) as a module: what a config built on
    another one imports (`configs/libero_pi0.py` takes `configs/libero.py`'s suites)."""
    if not file.endswith(".py"):
        file = os.path.join(CONFIGS_DIR, f"{file}.py")
    module_name = "pixelvla_config_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
