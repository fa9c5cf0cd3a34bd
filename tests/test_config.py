"""The config schema: typed sections, inherited knobs, contradictions, loading by name."""

import dataclasses
import os

import ml_collections
import pytest

from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import optimizer as optimizer_lib

# Computed from every config and variant before the inherited knobs replaced their restated
# values (commit ad62e90, where each config set optim.total_steps, data.action_chunk and
# data_generator.image_size by hand): (optim total_steps, warmup_steps, lr, schedule; model
# chunk_size, data action_chunk, data image_size, generator image size, None where the config
# generates nothing). The whole model, optim and data configs were also compared then: equal.
BEFORE = {
    "bridge_fractal:full": (100_000, 1000, 2e-4, "cosine", 5, 5, 224, None),
    "bridge_fractal:tiny": (40, 5, 1e-3, "cosine", 5, 5, 56, 64),
    "libero:spatial": (50_000, 500, 5e-4, "constant", 8, 8, 224, None),
    "libero:object": (50_000, 500, 5e-4, "constant", 8, 8, 224, None),
    "libero:goal": (50_000, 500, 5e-4, "constant", 8, 8, 224, None),
    "libero:10": (50_000, 500, 5e-4, "constant", 8, 8, 224, None),
    "libero:all": (50_000, 500, 5e-4, "constant", 8, 8, 224, None),
    "libero:tiny": (60, 5, 1e-3, "cosine", 8, 8, 56, 64),
    "pixel160k:full": (50_000, 500, 2e-4, "cosine", 5, 5, 224, None),
    "pixel160k:tiny": (40, 5, 1e-3, "cosine", 5, 5, 56, 64),
    "pixelref:default": (3500, 100, 1e-3, "wsd", 1, 1, 56, 56),
    "pixelref:prompts": (3500, 100, 1e-3, "wsd", 1, 1, 56, 56),
    "pixelref:mask_only": (3500, 100, 1e-3, "wsd", 1, 1, 56, 56),
    "pixelref:no_pixel": (3500, 100, 1e-3, "wsd", 1, 1, 56, 56),
    "pixelref:tiny": (20, 2, 1e-3, "wsd", 4, 4, 56, 56),
}


def _resolved_facts(cfg):
    optim = config_lib.optim_config(cfg)
    model = config_lib.model_config(cfg)
    data = config_lib.data_config(cfg, "")
    generator = config_lib.generator_image_size(cfg) if cfg.data_generator.kind else None
    return (
        optim.total_steps,
        optim.warmup_steps,
        optim.lr,
        optim.schedule,
        model.action_head.chunk_size,
        data.action_chunk,
        data.image_size,
        generator,
    )


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_config_resolves_to_its_previous_values(name):
    cfg = config_lib.load_config(name)
    config_lib.validate_config(cfg)
    assert _resolved_facts(cfg) == pytest.approx(BEFORE[name])
    # The inherited knobs are no longer stated in the configs.
    assert cfg.optim.total_steps == 0 and cfg.data.action_chunk == 0
    assert config_lib.optim_config(cfg).total_steps == cfg.train.num_steps


def test_sections_are_views_of_their_dataclasses():
    c = config_lib.base_config()
    assert c.model.to_dict() == dataclasses.asdict(config_lib.ModelSection())
    assert c.data_generator.to_dict() == dataclasses.asdict(config_lib.GeneratorSection())
    optim = optimizer_lib.OptimConfig.from_mapping(c.optim)
    assert optim == config_lib.OPTIM_DEFAULTS
    model = config_lib.model_section(c)
    assert isinstance(model.lora, config_lib.LoRASection) and model == config_lib.ModelSection()


def test_total_steps_inherits_train_num_steps():
    cfg = config_lib.load_config("libero:tiny")
    cfg.train.num_steps = 7  # as --config.train.num_steps=7 does
    assert config_lib.optim_config(cfg).total_steps == 7
    cfg.optim.total_steps = 50  # explicit: the schedule may outlast the run
    assert config_lib.optim_config(cfg).total_steps == 50


def test_action_chunk_inherits_chunk_size():
    cfg = config_lib.base_config()
    cfg.model.chunk_size = 5
    config_lib.validate_config(cfg)
    assert config_lib.data_config(cfg, "").action_chunk == 5
    assert config_lib.model_config(cfg).action_head.chunk_size == 5
    cfg.data.action_chunk = 5  # explicit and equal (a config saved by an older version)
    assert config_lib.data_config(cfg, "").action_chunk == 5


@pytest.mark.parametrize(
    "name, horizon, padded, steps",
    [
        ("pixelref:pi0", 8, 8, 14000),
        ("pixelref:pi0_no_pixel", 8, 8, 14000),
        ("pixelref:pi0_tiny", 8, 8, 20),
        ("libero_pi0:tiny", 8, 32, None),  # openpi's 32 padded dims unless set
    ],
)
def test_pi0_configs_resolve_horizon_and_padded_dims(name, horizon, padded, steps):
    cfg = config_lib.load_config(name)
    config_lib.validate_config(cfg)
    model = config_lib.model_config(cfg)
    assert (model.action_horizon, model.model_action_dim, model.model_state_dim) == (
        horizon,
        padded,
        padded,
    )
    assert config_lib.data_config(cfg, "").action_chunk == horizon
    if steps is not None:
        assert config_lib.optim_config(cfg).total_steps == steps
    cfg.model.padded_action_dim = 4  # narrower than the 7 actions / 8 proprio dims
    with pytest.raises(config_lib.ConfigError, match="padded_action_dim=4 is narrower"):
        config_lib.validate_config(cfg)


def test_generator_image_size_inherits_data_image_size():
    cfg = config_lib.load_config("pixelref:tiny")
    cfg.data.image_size = 96
    assert config_lib.generator_image_size(cfg) == 96
    assert config_lib.resolved(cfg).data_generator.image_size == 96
    cfg.data_generator.image_size = 128  # explicit: rendered larger, resized by the pipeline
    assert config_lib.generator_image_size(cfg) == 128


def test_contradicting_chunk_is_an_error_naming_both_keys():
    cfg = config_lib.base_config()
    cfg.data.action_chunk = 4
    both = r"data\.action_chunk=4.*model\.chunk_size=8"
    for read in (
        config_lib.validate_config,
        lambda c: config_lib.data_config(c, ""),
        config_lib.model_config,
    ):
        with pytest.raises(config_lib.ConfigError, match=both):
            read(cfg)
    cfg.model.head = "discrete"  # decoded tokens: the chunk need not match the head's slots
    config_lib.validate_config(cfg)
    assert config_lib.data_config(cfg, "").action_chunk == 4
    cfg.data.action_chunk = -1
    with pytest.raises(config_lib.ConfigError, match=r"action_chunk=-1 must be >= 1"):
        config_lib.validate_config(cfg)


def test_a_config_saved_by_an_older_version_still_loads():
    """Explicit values where the config now inherits, and keys added since then missing."""
    saved = config_lib.base_config().to_dict()
    saved["optim"]["total_steps"] = 300
    saved["data"]["action_chunk"] = 8
    saved["data_generator"]["image_size"] = 64
    for section, key in (
        ("model", "decode_temperature"),
        ("model", "tiny_width"),
        ("optim", "decay_fraction"),
        ("data", "cache_samples"),
    ):
        del saved[section][key]
    del saved["model"]["lora"]["rslora"]
    cfg = ml_collections.ConfigDict(saved)
    assert config_lib.optim_config(cfg).total_steps == 300
    assert config_lib.optim_config(cfg).decay_fraction == config_lib.OPTIM_DEFAULTS.decay_fraction
    assert config_lib.data_config(cfg, "").action_chunk == 8
    assert config_lib.generator_image_size(cfg) == 64
    fresh = config_lib.base_config()
    fresh.optim.total_steps = 300
    assert config_lib.model_config(cfg) == config_lib.model_config(fresh)


def test_unknown_keys_are_rejected_with_a_hint():
    cfg = config_lib.base_config()
    cfg.model.chunk_sise = 4
    with pytest.raises(config_lib.ConfigError, match=r"Did you mean 'model\.chunk_size'"):
        config_lib.validate_config(cfg)
    with pytest.raises(config_lib.ConfigError, match=r"Did you mean 'model\.chunk_size'"):
        config_lib.model_config(cfg)  # a stored config is read through the dataclass too
    cfg = config_lib.base_config()
    cfg.model.lora.rnak = 4
    with pytest.raises(config_lib.ConfigError, match=r"Did you mean 'model\.lora\.rank'"):
        config_lib.model_config(cfg)


def test_load_config_by_name_and_by_path():
    by_name = config_lib.load_config("pixelref:tiny")
    path = os.path.join(config_lib.CONFIGS_DIR, "pixelref.py")
    assert by_name.to_dict() == config_lib.load_config(f"{path}:tiny").to_dict()
    assert config_lib.load_config("libero").data.datasets == [("libero_spatial_no_noops", 1.0)]


def test_load_config_unknown_name_or_variant():
    with pytest.raises(FileNotFoundError, match=r"Known configs: \[.*'pixelref'"):
        config_lib.load_config("pixelreff:tiny")
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load_config("pixelref:huge")


def test_openvla_init_carries_the_checkpoint_image_normalisation(tmp_path):
    """A run started from an OpenVLA checkpoint saves its preprocessor_config.json mean/std in
    the config (the released file's bf16-rounded values), and the model normalises with them."""
    import json

    from pixelvla_jax.testing.tiny_openvla import openvla_preprocessor_config
    from pixelvla_jax.weights.openvla import read_preprocessing

    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump(openvla_preprocessor_config(224), f)
    pre = read_preprocessing(tmp_path)
    cfg = config_lib.load_config("libero:tiny")
    cfg.init.openvla_checkpoint = str(tmp_path)
    got = config_lib.with_checkpoint_preprocessing(cfg)
    vision = config_lib.model_config(got).vision
    assert vision.dino_mean == tuple(pre.dino_mean) == (0.484375, 0.455078125, 0.40625)
    assert (vision.dino_std, vision.siglip_mean, vision.siglip_std) == (
        tuple(pre.dino_std),
        tuple(pre.siglip_mean),
        tuple(pre.siglip_std),
    )
    assert list(got.model.dino_mean) == list(pre.dino_mean)  # saved with the run's config
    # Set by hand they win; without a checkpoint nothing changes.
    cfg.model.dino_mean = [0.5, 0.5, 0.5]
    assert config_lib.model_config(
        config_lib.with_checkpoint_preprocessing(cfg)
    ).vision.dino_mean == (
        0.5,
        0.5,
        0.5,
    )
    plain = config_lib.load_config("libero:tiny")
    assert config_lib.with_checkpoint_preprocessing(plain) is plain
    with pytest.raises(config_lib.ConfigError, match="3 values"):
        plain.model.siglip_std = [0.5]
        config_lib.model_config(plain)
