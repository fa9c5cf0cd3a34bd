"""Closed-loop evaluation of a trained PixelVLA checkpoint.

    python -m pixelvla_jax.evaluate --checkpoint=runs/pixelref --suite=pixelref --trials=200
    python -m pixelvla_jax.evaluate --checkpoint=runs/libero --suite=libero_spatial \
        --tasks=0,1 --trials=50 --pixel_input=oracle --out=runs/libero/eval

Suites:
  pixelref   the built-in PixelRef task (`envs/pixelref.py`): `--trials` seeded episodes per
             prompt kind (`--prompt_kinds`, default mask,points,box,line,none; with
             `--pixel_input=none` only "none"). Writes results.json, success.png (bar plot)
             and `--videos` rollout GIFs per prompt kind into `--out`.
  libero_*   LIBERO suites through `pixelvla_jax.envs.libero_eval.run` (needs LIBERO and
             MuJoCo installed).

The policy is `pixelvla_jax.policy.Policy.from_checkpoint`: the preprocessing, statistics
and tokenizer of the training run, nothing else.
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
SUITES = ("pixelref", *LIBERO_SUITES)


def _define_flags() -> None:
    """Flags exist only when this module is the program (so importing it never clashes)."""
    global \
        _CHECKPOINT, \
        _STEP, \
        _SUITE, \
        _TASKS, \
        _TRIALS, \
        _OUT, \
        _PIXEL_INPUT, \
        _PROMPT_KINDS, \
        _REPLAN, \
        _WORKERS, \
        _VIDEOS, \
        _SEED, \
        _BATCH, \
        _TEMPERATURE
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir or its checkpoints/.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    _SUITE = flags.DEFINE_enum("suite", "pixelref", SUITES, "What to evaluate on.")
    _TASKS = flags.DEFINE_string("tasks", "", "Comma-separated task ids (LIBERO; default: all).")
    _TRIALS = flags.DEFINE_integer("trials", 50, "Episodes per task (PixelRef: per prompt kind).")
    _OUT = flags.DEFINE_string("out", "", "Output directory (default: <checkpoint>/eval_<suite>).")
    _PIXEL_INPUT = flags.DEFINE_string(
        "pixel_input", "oracle", "none | oracle (simulator masks) | FILE of precomputed masks."
    )
    _PROMPT_KINDS = flags.DEFINE_string(
        "prompt_kinds", "mask,points,box,line,none", "PixelRef: prompt kinds to evaluate."
    )
    _REPLAN = flags.DEFINE_integer("replan", 0, "Actions executed per chunk (0: the whole chunk).")
    _WORKERS = flags.DEFINE_integer("workers", 1, "Parallel environment workers (LIBERO).")
    _VIDEOS = flags.DEFINE_integer("videos", 2, "Rollout GIFs written per prompt kind / task.")
    _SEED = flags.DEFINE_integer("seed", 7, "Seeds episodes and visual prompts.")
    _BATCH = flags.DEFINE_integer("batch_size", 50, "PixelRef: episodes stepped together.")
    _TEMPERATURE = flags.DEFINE_float(
        "decode_temperature",
        None,
        "PixelRef, discrete head: 0 = greedy, > 0 = sampled action tokens "
        "(default: the checkpoint's model.decode_temperature).",
    )


def evaluate(
    checkpoint: str,
    suite: str = "pixelref",
    *,
    tasks: list[int] | None = None,
    trials: int = 50,
    out_dir: str = "",
    pixel_input: str = "oracle",
    prompt_kinds: tuple[str, ...] = ("mask", "points", "box", "line", "none"),
    replan: int = 0,
    workers: int = 1,
    videos: int = 2,
    seed: int = 7,
    step: int | None = None,
    batch_size: int = 50,
    decode_temperature: float | None = None,
) -> dict:
    """Runs the evaluation; returns the results dict (also written as results.json)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; use one of {SUITES}.")
    out_dir = out_dir or os.path.join(checkpoint, f"eval_{suite}")
    if suite in LIBERO_SUITES:
        from pixelvla_jax.envs import libero_eval

        if decode_temperature is not None:
            raise ValueError(
                "decode_temperature is a PixelRef evaluation option; LIBERO evaluation uses "
                "the checkpoint's model.decode_temperature."
            )
        return libero_eval.run(
            checkpoint, suite, tasks, trials, out_dir, pixel_input, replan, workers, videos, seed
        )
    from pixelvla_jax.envs import rollout
    from pixelvla_jax.envs.pixelref import PixelRefEnv
    from pixelvla_jax.policy import Policy

    if pixel_input == "none":
        prompt_kinds = ("none",)
    elif pixel_input != "oracle":
        raise ValueError(
            f"--pixel_input={pixel_input!r}: PixelRef renders exact masks; use oracle or none."
        )
    policy = Policy.from_checkpoint(checkpoint, step=step, decode_temperature=decode_temperature)
    return rollout.evaluate_policy(
        policy,
        PixelRefEnv,
        num_episodes=trials,
        prompt_kinds=tuple(prompt_kinds),
        replan=replan,
        seed=seed,
        out_dir=out_dir,
        videos=videos,
        batch_size=batch_size,
        title=f"PixelRef, {os.path.basename(os.path.abspath(checkpoint))}",
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint=DIR is required (a training workdir).")
    tasks = [int(t) for t in _TASKS.value.split(",") if t.strip()] or None
    kinds = tuple(k.strip() for k in _PROMPT_KINDS.value.split(",") if k.strip())
    results = evaluate(
        _CHECKPOINT.value,
        _SUITE.value,
        tasks=tasks,
        trials=_TRIALS.value,
        out_dir=_OUT.value,
        pixel_input=_PIXEL_INPUT.value,
        prompt_kinds=kinds,
        replan=_REPLAN.value,
        workers=_WORKERS.value,
        videos=_VIDEOS.value,
        seed=_SEED.value,
        step=_STEP.value,
        batch_size=_BATCH.value,
        decode_temperature=_TEMPERATURE.value,
    )
    if _SUITE.value == "pixelref":
        from pixelvla_jax.envs.rollout import format_table

        print(format_table(results))
    else:
        print(json.dumps(results.get("summary", results), indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
