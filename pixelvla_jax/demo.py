"""The README's main job: PixelVLA end to end on the built-in PixelRef task, on a laptop CPU.

    python -m pixelvla_jax.demo [--workdir=runs/pixelref] [--data_dir=data] [--episodes=200]

1. generates the PixelRef expert dataset into `--data_dir/pixelref` if it is absent,
2. trains `configs/pixelref.py` (a tiny PixelVLA from scratch; progress bar; resumes if
   `--workdir` already holds checkpoints),
3. evaluates the checkpoint closed loop on `--episodes` seeded episodes per prompt kind
   (the mask, points, a box, a line, nothing) on each scene split (in distribution;
   target kinds never named in training; more objects than any training scene) and prints
   the success table (results.json, success.png and GIFs with the prompt drawn in
   `<workdir>/eval_pixelref`).

Every instruction names an object that has a look-alike in the scene: without a pixel
input the policy can only guess (the "chance" row); with any kind of it, it picks the
right object.
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags

from pixelvla_jax.evaluate import PIXELREF_SPLITS


def _define_flags() -> None:
    """Flags exist only when this module is the program (so importing it never clashes)."""
    global _WORKDIR, _DATA_DIR, _EPISODES, _STEPS, _VARIANT, _KINDS, _REPLAN, _SPLITS
    _WORKDIR = flags.DEFINE_string("workdir", "runs/pixelref", "Checkpoints, logs, evaluation.")
    _DATA_DIR = flags.DEFINE_string("data_dir", "data", "Where the PixelRef dataset is (made).")
    _EPISODES = flags.DEFINE_integer("episodes", 200, "Evaluation episodes per prompt kind.")
    _STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: the config's).")
    _VARIANT = flags.DEFINE_string("variant", "default", "configs/pixelref.py variant.")
    _KINDS = flags.DEFINE_string(
        "prompt_kinds", ",".join(PROMPT_KINDS), "Prompt kinds to evaluate (comma-separated)."
    )
    _SPLITS = flags.DEFINE_string(
        "splits", ",".join(SPLITS), "Scene splits to evaluate (comma-separated)."
    )
    _REPLAN = flags.DEFINE_integer(
        "replan", REPLAN, "Actions executed per predicted chunk (0: the whole chunk)."
    )


# Closed loop: re-predict after every action (the default config predicts one action at a
# time; with 4-action chunks, re-planning every action measured 73% vs 45% open loop).
REPLAN = 1
PROMPT_KINDS = ("mask", "points", "box", "line", "none")
SPLITS = PIXELREF_SPLITS


def load_config(variant: str = "default"):
    """`configs/pixelref.py:variant` from the source checkout."""
    from pixelvla_jax.training import config as config_lib

    return config_lib.load_config(f"pixelref:{variant}")


def run_demo(
    workdir: str,
    data_dir: str = "data",
    episodes: int = 200,
    steps: int = 0,
    variant: str = "default",
    prompt_kinds: tuple[str, ...] = PROMPT_KINDS,
    progress: bool = True,
    replan: int = REPLAN,
    splits: tuple[str, ...] = SPLITS,
    videos: int = 1,
) -> dict:
    """Generate (if absent) -> train -> evaluate; returns the evaluation results."""
    from pixelvla_jax import evaluate
    from pixelvla_jax.training import experiment

    cfg = load_config(variant)
    cfg.data.data_dir = data_dir
    cfg.train.progress = progress
    if steps:
        cfg.train.num_steps = steps
        cfg.optim.total_steps = steps
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, steps // 10)
        cfg.train.checkpoint_every = min(cfg.train.checkpoint_every, steps)
    start = time.perf_counter()
    experiment.train(cfg, workdir)
    trained = time.perf_counter() - start
    results = evaluate.evaluate(
        workdir,
        "pixelref",
        trials=episodes,
        prompt_kinds=prompt_kinds,
        videos=videos,
        replan=replan,
        splits=splits,
    )
    results["train_seconds"] = trained
    results["total_seconds"] = time.perf_counter() - start
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pixelvla_jax").setLevel(logging.INFO)
    from pixelvla_jax.envs.rollout import format_table

    kinds = tuple(k.strip() for k in _KINDS.value.split(",") if k.strip())
    splits = tuple(k.strip() for k in _SPLITS.value.split(",") if k.strip())
    results = run_demo(
        _WORKDIR.value,
        _DATA_DIR.value,
        _EPISODES.value,
        _STEPS.value,
        _VARIANT.value,
        kinds,
        replan=_REPLAN.value,
        splits=splits,
    )
    print()
    print(format_table(results))
    out = os.path.join(_WORKDIR.value, "eval_pixelref")
    print(
        f"\ntrained in {results['train_seconds'] / 60:.1f} min, total "
        f"{results['total_seconds'] / 60:.1f} min; results, plot and GIFs in {out}"
    )


if __name__ == "__main__":
    from pixelvla_jax import cli

    _define_flags()
    cli.run(main)
