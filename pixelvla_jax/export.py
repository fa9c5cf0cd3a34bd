"""Export a training run's parameters for inference: LoRA merged, cast (bf16 by default).

    python -m pixelvla_jax.export --checkpoint=runs/libero --out=exports/libero [--step=N]

The export directory holds the params (Orbax) and, as JSON metadata, the model config,
the dataset statistics and the tokenizer path: `load_inference(out)` (and the evaluation
policy) need nothing else. `load_run(path)` reads a training checkpoint the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixelvla_jax.models import lora as lora_lib
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig, init_params_fn


@dataclasses.dataclass
class LoadedModel:
    """What acting needs: the model config, its params, normalisation statistics, tokenizer."""

    config: ml_collections.ConfigDict  # the training config (model.lora.rank = 0 once merged)
    model_config: PixelVLAConfig
    params: Any
    statistics: dict  # dataset name -> OpenVLA-layout statistics
    tokenizer_path: str
    step: int


def abstract_params(model_config: PixelVLAConfig, dtype: Any = None) -> Any:
    init = init_params_fn(PixelVLA(model_config))
    params = jax.eval_shape(lambda r: nn.unbox(init(r)), jax.random.key(0))
    if dtype is not None:
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
    return params


def load_run(path: str, step: int | None = None) -> LoadedModel:
    """Reads params (no optimizer state), config, statistics and tokenizer of a training run."""
    from pixelvla_jax.training import checkpoint as checkpoint_lib
    from pixelvla_jax.training import config as experiment

    directory = checkpoint_lib.checkpoint_dir(path)
    ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
    try:
        step = ckpt.latest_complete_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {directory}.")
        items = ckpt.restore(step)  # JSON items only
        cfg = ml_collections.ConfigDict(items.config)
        model_config = experiment.model_config(cfg)
        abstract = abstract_params(model_config)
        if cfg.model.frozen_dtype:
            # Frozen leaves were saved in their training dtype; restore them as such.
            optim = experiment.optim_config(cfg)
            from pixelvla_jax.training.optimizer import freeze_labels
            from pixelvla_jax.training.param_rules import FROZEN

            labels = freeze_labels(optim, abstract)
            frozen = jnp.dtype(cfg.model.frozen_dtype)
            abstract = jax.tree.map(
                lambda x, lab: jax.ShapeDtypeStruct(x.shape, frozen) if lab == FROZEN else x,
                abstract,
                labels,
            )
        _, params = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    return LoadedModel(
        config=cfg,
        model_config=model_config,
        params=params,
        statistics=dict(items.dataset_statistics or {}),
        tokenizer_path=str((items.metadata or {}).get("tokenizer", "")),
        step=int(step),
    )


def merge_for_inference(loaded: LoadedModel, dtype: Any = jnp.bfloat16) -> LoadedModel:
    """LoRA folded into the base kernels (config without LoRA), every float leaf cast."""
    params = loaded.params
    rules = loaded.model_config.llama.lora_rules
    cfg = ml_collections.ConfigDict(loaded.config.to_dict())
    if rules:
        params = lora_lib.merge_lora(jax.tree.map(lambda x: x.astype(jnp.float32), params), rules)
        cfg.model.lora.rank = 0
    params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )
    from pixelvla_jax.training.config import model_config

    return dataclasses.replace(loaded, config=cfg, model_config=model_config(cfg), params=params)


def export_inference(path: str, out_dir: str, step: int | None = None, dtype: Any = jnp.bfloat16):
    """Writes `load_run(path, step)` merged and cast to `out_dir`; returns the LoadedModel."""
    from pixelvla_jax.weights import orbax_io

    merged = merge_for_inference(load_run(path, step), dtype)
    metadata = {
        "config": merged.config.to_dict(),
        "statistics": merged.statistics,
        "tokenizer": merged.tokenizer_path,
        "step": merged.step,
        "dtype": jnp.dtype(dtype).name,
    }
    orbax_io.save_params(out_dir, merged.params, metadata)
    return merged


def load_inference(out_dir: str) -> LoadedModel:
    """Loads an `export_inference` directory."""
    from pixelvla_jax.training.config import model_config
    from pixelvla_jax.weights import orbax_io

    meta = orbax_io.load_metadata(out_dir)
    cfg = ml_collections.ConfigDict(meta["config"])
    mcfg = model_config(cfg)
    params = orbax_io.load_params(out_dir, abstract_params(mcfg, jnp.dtype(meta["dtype"])))
    return LoadedModel(
        config=cfg,
        model_config=mcfg,
        params=params,
        statistics=meta["statistics"],
        tokenizer_path=meta["tokenizer"],
        step=int(meta["step"]),
    )


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    merged = export_inference(f.checkpoint, f.out, f.step, jnp.dtype(f.dtype))
    print(f"exported step {merged.step} of {f.checkpoint} to {f.out} ({f.dtype}, LoRA merged)")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint", None, "A run's workdir or checkpoints/ directory.")
    flags.DEFINE_string("out", None, "Export directory (must not exist).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest complete one).")
    flags.DEFINE_string("dtype", "bfloat16", "Parameter dtype of the export.")
    flags.mark_flags_as_required(["checkpoint", "out"])
    app.run(main)
