"""The paper's claim in miniature: pixel-level inputs make PixelVLA act on the right object.

    python bench/pixelref.py [--episodes=200] [--workdir=/tmp/pixelref_bench] [--steps=0]
                             [--replan=1]

On the built-in PixelRef task (every instruction has a look-alike of its target):
  1. trains `configs/pixelref.py` (masks only) from scratch and evaluates it closed loop on
     `--episodes` seeded episodes given the mask, and (never trained on them) points, a box,
     or nothing;
  2. trains the same recipe without pixel inputs (`:no_pixel`) and evaluates it on the same
     episodes; it should stay near the chance rate the look-alikes imply.
The dataset is generated into `--data_dir` if absent. Prints one table and ends with one
`BENCH {...}` JSON line with the issue's targets: the whole run (generate the data, train
the default config, evaluate it on every prompt kind) <= 15 minutes, success with mask >=
90%, the no-pixel baseline within 10 points of chance; the bench's own total (both models)
is reported as `bench_min`. Also printed: the rate of a policy that ignores the
instruction and picks any object, which is where a baseline that never learnt the
language lands, and per row the share of episodes closed on an object of the named kind
(the target or a look-alike).
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
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/pixelref_bench_data", "Dataset directory.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps per model (0: the config's).")
_REPLAN = flags.DEFINE_integer(
    "replan", 1, "Actions executed per predicted chunk (1: closed loop; 0: the whole chunk)."
)


def main(argv):
    del argv
    import logging
    import shutil

    logging.getLogger().setLevel(logging.WARNING)
    from pixelvla_jax import evaluate
    from pixelvla_jax.demo import load_config
    from pixelvla_jax.envs.pixelref import PixelRefEnv
    from pixelvla_jax.training import experiment

    start = time.perf_counter()
    shutil.rmtree(_WORKDIR.value, ignore_errors=True)
    rows, figures = [], {}
    for variant, kinds in (
        ("default", ("mask", "points", "box", "line", "none")),
        ("no_pixel", ("none",)),
    ):
        cfg = load_config(variant)
        cfg.data.data_dir = _DATA_DIR.value
        cfg.train.progress = False
        if _STEPS.value:
            cfg.train.num_steps = cfg.optim.total_steps = _STEPS.value
            cfg.train.checkpoint_every = _STEPS.value
            cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, _STEPS.value // 10)
        workdir = os.path.join(_WORKDIR.value, variant)
        t0 = time.perf_counter()
        history = experiment.train(cfg, workdir)
        t1 = time.perf_counter()
        results = evaluate.evaluate(
            workdir,
            "pixelref",
            trials=_EPISODES.value,
            prompt_kinds=kinds,
            videos=2,
            replan=_REPLAN.value,
        )
        t2 = time.perf_counter()
        figures[f"{variant}/train_s"] = round(t1 - t0, 1)
        figures[f"{variant}/eval_s"] = round(t2 - t1, 1)
        figures[f"{variant}/final_loss"] = round(history[-1]["loss"], 4)
        figures["chance"] = round(results["chance_rate"], 4)
        for kind, rate in results["success"].items():
            figures[f"{variant}/{kind}"] = round(rate, 4)
            # Closed on an object of the named kind (the target or a look-alike): the
            # instruction was read, whichever of the matching objects was taken.
            outcomes = results["outcomes"][kind]
            named = (outcomes.get("target", 0) + outcomes.get("look-alike", 0)) / max(
                sum(outcomes.values()), 1
            )
            figures[f"{variant}/{kind}/named_kind"] = round(named, 4)
            rows.append((variant, kind, rate, named))
        print(
            f"{variant}: trained {len(history)} steps in {t1 - t0:.0f} s, evaluated in "
            f"{t2 - t1:.0f} s",
            flush=True,
        )
        if variant == "default":  # data generation included
            figures["whole_run_min"] = round((t2 - start) / 60, 2)
    # A policy blind to the instruction picks any object: 1 / (objects in the scene), on the
    # episodes just evaluated (every variant runs the same seeds).
    blind = [1 / len(PixelRefEnv(e["seed"]).objects) for e in results["episodes"]["none"]]
    figures["chance_any_object"] = round(float(np.mean(blind)), 4)
    total = time.perf_counter() - start
    figures["bench_min"] = round(total / 60, 2)
    chance = figures["chance"]

    print(f"\nPixelRef, {_EPISODES.value} seeded episodes per row (chance {chance:.1%})")
    print(f"{'trained on':<12}{'given':<8}{'success':>9}{'named kind':>12}")
    for variant, kind, rate, named in rows:
        trained = "masks" if variant == "default" else "no pixels"
        print(f"{trained:<12}{kind:<8}{rate:>9.1%}{named:>12.1%}")
    print(
        f"chance: {chance:.1%} picking among the target and its look-alikes (the named kind), "
        f"{figures['chance_any_object']:.1%} picking any object (the instruction unread)"
    )
    print(
        f"the whole run (data, default config trained and evaluated): "
        f"{figures['whole_run_min']:.1f} min; the bench with the no-pixel model: "
        f"{total / 60:.1f} min"
    )

    baseline_gap = abs(figures["no_pixel/none"] - chance)
    figures["no_pixel_gap_to_chance"] = round(baseline_gap, 4)
    targets = {
        "whole_run_min": [figures["whole_run_min"], "<=", 15],
        "mask_success": [figures["default/mask"], ">=", 0.90],
        "no_pixel_gap_to_chance": [figures["no_pixel_gap_to_chance"], "<=", 0.10],
    }
    print("BENCH " + json.dumps({"name": "pixelref", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    app.run(main)
