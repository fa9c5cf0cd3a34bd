"""The training config schema: every key, presets, validation, and the typed views of it.

Light on purpose: `policy.py`, `export.py`, `configs/*.py` and the benchmarks import it
without Grain, Orbax or the mesh code. `base_config()` declares every key a config may set
(a misspelt key is an error before anything is built); `configs/*.py` start from it and
`load_config("pixelref:tiny")` loads one by name.

Stages are freeze policies (regexes over parameter paths, first full match wins):

    cat            stage 1, Continuous Action Training: action head (+ slots) trained,
                   pixel/prompt encoders off, everything else frozen
    pue            stage 2, Pixel-level Understanding Enhancement: LoRA on the LLM, pixel and
                   prompt encoders, action head trained; everything else frozen
    finetune       everything trained
    lora_discrete  OpenVLA-style LoRA fine-tuning with the discrete token head
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixelvla_jax.data.config import DataConfig
from pixelvla_jax.models import lora as lora_lib
from pixelvla_jax.models import vit as vit_lib
from pixelvla_jax.models.pixelvla import PixelVLAConfig
from pixelvla_jax.training import optimizer as optimizer_lib
from pixelvla_jax.training import sharding as sharding_lib
from pixelvla_jax.training.param_rules import FROZEN, TRAINED

MODEL_PRESETS = ("tiny", "openvla_7b")
TRAINED_HEAD = (("action_head/.*", TRAINED), ("action_slots", TRAINED))
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
}


class ConfigError(ValueError):
    """A config that cannot run; raised before any data is read or anything compiles."""


# ---------------------------------------------------------------------------- config


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with defaults (a tiny CPU run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = "finetune"  # a key of STAGE_POLICIES

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # one of MODEL_PRESETS
    c.model.tiny_width = 0  # preset "tiny" only: LLM width (0: the preset's 64)
    c.model.tiny_depth = 0  # preset "tiny" only: LLM layers (0: the preset's 2)
    c.model.pos_embed_init = "normal"  # ViT towers: "normal" or "sincos2d" (from scratch)
    c.model.head = "l1"  # "l1" (continuous chunk) or "discrete" (OpenVLA tokens)
    # Discrete head: 0 = greedy (OpenVLA); > 0 = action tokens sampled at this temperature.
    c.model.decode_temperature = 0.0
    # Grounding (PixelVLAConfig): the instruction before the image tokens; a per-patch BCE
    # at this weight against the referred-objects mask, else the target mask (needs
    # text_first); the discrete head decodes the target's centre as 2 tokens before the action.
    c.model.text_first = False
    c.model.patch_grounding_weight = 0.0
    c.model.target_point_tokens = False
    c.model.chunk_size = 8  # N_c
    c.model.use_pixel_encoder = True
    c.model.use_prompt_encoder = True
    c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"
    c.model.frozen_dtype = ""  # e.g. "bfloat16": frozen weights held in bf16
    c.model.remat = False
    c.model.scan_layers = False
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # 0: no LoRA
    c.model.lora.alpha = 16.0
    c.model.lora.rslora = False
    c.model.lora.targets = r".*_proj"  # regex over LLM module paths ("all linear layers")

    data = dataclasses.asdict(DataConfig())
    data["datasets"] = [("synthetic_libero", 1.0)]
    data["data_dir"] = "data"
    c.data = ml_collections.ConfigDict(data)
    # A dataset generated on first use when absent ("" = never generate).
    c.data_generator = ml_collections.ConfigDict()
    c.data_generator.kind = ""  # "synthetic_libero" (more in later versions)
    c.data_generator.num_episodes = 16
    c.data_generator.episode_length = 24
    c.data_generator.image_size = 64

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a sentencepiece .model; "" -> the OpenVLA checkpoint's or a tiny one
    c.tokenizer.tiny_vocab_size = 512  # trained on the spot when no path is given

    c.init = ml_collections.ConfigDict()
    c.init.openvla_checkpoint = ""  # an OpenVLA HF directory (safetensors + config.json)
    c.init.from_checkpoint = ""  # a run's workdir (or its checkpoints/): start from its params

    c.optim = ml_collections.ConfigDict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in optimizer_lib.DEFAULTS.items()}
    )
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 10
    c.optim.total_steps = 200

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = [list(r) for r in sharding_lib.DEFAULT_RULES]

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 200
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
    c.train.num_steps = num_steps
    c.train.checkpoint_every = max(1, num_steps // 2)
    c.optim.total_steps = num_steps
    c.optim.warmup_steps = min(5, num_steps - 1)
    c.optim.lr = 1e-3
    return c


def _check_keys(cfg: Any, reference: Any, prefix: str) -> None:
    if not isinstance(reference, ml_collections.ConfigDict):
        return
    if not isinstance(cfg, ml_collections.ConfigDict | Mapping):
        raise ConfigError(f"config.{prefix} must be a section of keys, got {cfg!r}")
    for key in cfg:
        if key not in reference:
            near = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
            raise ConfigError(
                f"Unknown config key 'config.{prefix}{key}'.{hint} "
                f"Known keys here: {sorted(reference.keys())}."
            )
        _check_keys(cfg[key], reference[key], f"{prefix}{key}.")


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for an unknown key or an impossible value (nothing is built)."""
    _check_keys(cfg, base_config(), "")
    if cfg.stage not in STAGE_POLICIES:
        raise ConfigError(f"config.stage={cfg.stage!r}; use one of {sorted(STAGE_POLICIES)}.")
    if cfg.model.preset not in MODEL_PRESETS:
        raise ConfigError(f"config.model.preset={cfg.model.preset!r}; use one of {MODEL_PRESETS}.")
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
    if cfg.model.head == "discrete" and cfg.data.action_chunk < 1:
        raise ConfigError("config.data.action_chunk must be >= 1.")
    if cfg.model.head == "l1" and cfg.data.action_chunk != cfg.model.chunk_size:
        raise ConfigError(
            f"config.data.action_chunk={cfg.data.action_chunk} must equal "
            f"config.model.chunk_size={cfg.model.chunk_size} for the L1 head."
        )
    if cfg.train.num_steps < 1 or cfg.train.log_every < 1 or cfg.train.checkpoint_every < 1:
        raise ConfigError("config.train.num_steps, log_every and checkpoint_every must be >= 1.")


def model_config(cfg: ml_collections.ConfigDict) -> PixelVLAConfig:
    """The PixelVLAConfig a training config describes."""
    m = cfg.model
    sizes = {}
    if m.preset == "tiny":
        if m.get("tiny_width", 0):
            sizes["width"] = m.tiny_width
        if m.get("tiny_depth", 0):
            sizes["depth"] = m.tiny_depth
    preset = getattr(PixelVLAConfig, m.preset)(**sizes)
    llama = preset.llama
    if m.lora.rank > 0:
        rule = (m.lora.targets, lora_lib.LoRAConfig(m.lora.rank, m.lora.alpha, m.lora.rslora))
        llama = llama.replace(lora_rules=(rule,))
    llama = llama.replace(remat=m.remat, scan_layers=m.scan_layers)
    head = dataclasses.replace(preset.action_head, chunk_size=m.chunk_size)
    vision = preset.vision
    if m.pos_embed_init != "normal":
        vision = dataclasses.replace(
            vision,
            dino=dataclasses.replace(vision.dino, pos_embed_init=m.pos_embed_init),
            siglip=dataclasses.replace(vision.siglip, pos_embed_init=m.pos_embed_init),
        )
    return preset.replace(
        vision=vision,
        llama=llama,
        action_head=head,
        head=m.head,
        decode_temperature=float(m.get("decode_temperature", 0.0)),
        text_first=bool(m.get("text_first", False)),
        patch_grounding_weight=float(m.get("patch_grounding_weight", 0.0)),
        target_point_tokens=bool(m.get("target_point_tokens", False)),
        use_pixel_encoder=m.use_pixel_encoder and cfg.stage != "cat",
        use_prompt_encoder=m.use_prompt_encoder and cfg.stage != "cat",
        vision_remat=m.remat,
        vision_scan_layers=m.scan_layers,
        max_text_tokens=cfg.data.max_tokens,
        max_prompt_points=cfg.data.prompt_cfg.max_points,
    )


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


# The L1 head never reads the LM head (it is kept so that exports stay OpenVLA checkpoints):
# frozen, it costs no optimizer state (2 x 32064 x 4096 fp32 = 1 GiB at 7B) and no update.
UNUSED_BY_L1 = (("llm/lm_head/.*", FROZEN),)


def freeze_rules(cfg: ml_collections.ConfigDict) -> tuple[list, str]:
    """(rules, default) of the stage, after any rules given in `config.optim.freeze`
    (first match wins); with the L1 head, the unused LM head is frozen after those."""
    rules, default = STAGE_POLICIES[cfg.stage]
    unused = list(UNUSED_BY_L1) if cfg.model.head == "l1" else []
    return [tuple(r) for r in cfg.optim.freeze] + unused + list(rules), default


def optim_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict(cfg.optim.to_dict())
    rules, default = freeze_rules(cfg)
    optim.freeze = rules
    optim.freeze_default = default
    return optim


def data_config(cfg: ml_collections.ConfigDict, tokenizer_path: str) -> DataConfig:
    raw = cfg.data.to_dict()
    raw["tokenizer_path"] = tokenizer_path
    raw["batch_size"] = cfg.data.batch_size // jax.process_count()
    raw["seed"] = cfg.seed if cfg.data.seed == 0 else cfg.data.seed
    return DataConfig.from_mapping(raw)


# ---------------------------------------------------------------------------- loading

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def load_config(name: str, configs_dir: str | None = None) -> ml_collections.ConfigDict:
    """`"pixelref:tiny"` -> `configs/pixelref.py`'s `get_config("tiny")` (no variant: its
    default). Configs live in the source checkout's top-level `configs/`; a path to a
    `.py` file works too (`"configs/libero.py:tiny"`)."""
    file, _, variant = name.partition(":")
    if not file.endswith(".py"):
        file = os.path.join(configs_dir or CONFIGS_DIR, f"{file}.py")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"Config {name!r}: no file {os.path.abspath(file)}. Configs are the files in the "
            "source checkout's configs/ directory; run from a checkout (pip install -e .)."
        )
    module_name = "pixelvla_config_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
