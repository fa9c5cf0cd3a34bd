"""The paper's claim in miniature: any pixel-level input makes PixelVLA act on the right object.

    python bench/pixelref.py [--episodes=200] [--workdir=/tmp/pixelref_bench] [--steps=0]
                             [--replan=1]

On the built-in PixelRef task (every instruction has a look-alike of its target):
  1. the README's main job (`pixelvla_jax.demo.run_demo`), timed whole: the PixelRef data
     generated from nothing (`--data_dir` is deleted first), `configs/pixelref.py` (one
     model trained on a mixture of pixel inputs: the mask, points, a box, a line) trained
     from scratch, then evaluated closed loop on `--episodes` seeded episodes per input
     kind (and none) on each scene split: in distribution, target kinds never named in
     training (`held_out_kinds`), more objects than any training scene (`more_objects`);
  2. the same recipe without pixel inputs (`:no_pixel`) on the same in-distribution
     episodes; it should stay near the chance rate the look-alikes imply.
Prints the per-kind table and ends with one `BENCH {...}` JSON line with the issue's
targets: the whole main job <= 15 minutes; in distribution >= 90% success for each of
mask, points, box and line; on the held-out kinds >= 75% for each; the no-pixel baseline
within 10 points of chance. `bench_min` is the bench's own total (both models). Also
printed: the rate of a policy that ignores the instruction and picks any object, and the
no-pixel row's share of episodes closed on an object of the named kind (the target or a
look-alike: the instruction was read, whichever look-alike was taken).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

_EPISODES = flags.DEFINE_integer("episodes", 200, "Evaluation episodes per prompt kind.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/pixelref_bench", "Runs go here (wiped).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "/tmp/pixelref_bench_data", "Dataset directory (wiped: generation is timed)."
)
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps per model (0: the config's).")
_REPLAN = flags.DEFINE_integer(
    "replan", 1, "Actions executed per predicted chunk (1: closed loop; 0: the whole chunk)."
)

PIXEL_KINDS = ("mask", "points", "box", "line")


def main(argv):
    del argv
    import logging
    import shutil

    logging.getLogger().setLevel(logging.WARNING)
    from pixelvla_jax.demo import run_demo
    from pixelvla_jax.envs.pixelref import PixelRefEnv
    from pixelvla_jax.envs.rollout import format_table

    shutil.rmtree(_WORKDIR.value, ignore_errors=True)
    shutil.rmtree(_DATA_DIR.value, ignore_errors=True)
    start = time.perf_counter()
    common = dict(
        data_dir=_DATA_DIR.value,
        episodes=_EPISODES.value,
        steps=_STEPS.value,
        progress=False,
        replan=_REPLAN.value,
    )
    main_job = run_demo(os.path.join(_WORKDIR.value, "default"), **common)
    whole = time.perf_counter() - start
    baseline = run_demo(
        os.path.join(_WORKDIR.value, "no_pixel"),
        variant="no_pixel",
        prompt_kinds=("none",),
        splits=("in_distribution",),
        videos=0,
        **common,
    )
    total = time.perf_counter() - start

    figures = {
        "whole_run_min": round(whole / 60, 2),
        "default/train_s": round(main_job["train_seconds"], 1),
        "default/eval_s": round(main_job["total_seconds"] - main_job["train_seconds"], 1),
        "no_pixel/train_s": round(baseline["train_seconds"], 1),
    }
    for split, res in main_job["splits"].items():
        figures[f"{split}/chance"] = round(res["chance_rate"], 4)
        for kind, rate in res["success"].items():
            figures[f"{split}/{kind}"] = round(rate, 4)
    chance = main_job["chance_rate"]
    outcomes = baseline["outcomes"]["none"]
    named = (outcomes.get("target", 0) + outcomes.get("look-alike", 0)) / max(
        sum(outcomes.values()), 1
    )
    figures["no_pixel/none"] = round(baseline["success"]["none"], 4)
    figures["no_pixel/none/named_kind"] = round(named, 4)
    # A policy blind to the instruction picks any object: 1 / (objects in the scene).
    blind = [1 / len(PixelRefEnv(e["seed"]).objects) for e in baseline["episodes"]["none"]]
    figures["chance_any_object"] = round(float(np.mean(blind)), 4)
    figures["no_pixel_gap_to_chance"] = round(abs(baseline["success"]["none"] - chance), 4)
    figures["bench_min"] = round(total / 60, 2)

    print(f"\nPixelRef, {_EPISODES.value} seeded episodes per cell; the default model (one model, "
          "trained on masks, points, boxes and lines):")  # fmt: skip
    print(format_table(main_job))
    print(
        f"\nthe same recipe without pixel inputs, in distribution: {figures['no_pixel/none']:.1%} "
        f"(chance {chance:.1%} picking among the target and its look-alikes; "
        f"{figures['chance_any_object']:.1%} picking any object); closed on the named kind "
        f"{named:.1%}"
    )
    print(
        f"the README main job (data, default model trained and evaluated on every kind and "
        f"split): {whole / 60:.1f} min (trained in {main_job['train_seconds'] / 60:.1f} min); "
        f"the bench with the no-pixel model: {total / 60:.1f} min"
    )
    targets = {"whole_run_min": [figures["whole_run_min"], "<=", 15]}
    for kind in PIXEL_KINDS:
        targets[f"{kind}_success"] = [figures[f"in_distribution/{kind}"], ">=", 0.90]
    for kind in PIXEL_KINDS:
        targets[f"{kind}_held_out_kinds"] = [figures[f"held_out_kinds/{kind}"], ">=", 0.75]
    targets["no_pixel_gap_to_chance"] = [figures["no_pixel_gap_to_chance"], "<=", 0.10]
    print("BENCH " + json.dumps({"name": "pixelref", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    app.run(main)
