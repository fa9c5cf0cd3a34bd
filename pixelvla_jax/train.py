"""Train PixelVLA.

    python -m pixelvla_jax.train --config=configs/libero.py --workdir=runs/libero
    python -m pixelvla_jax.train --config=configs/libero.py:tiny --workdir=/tmp/tiny \
        --config.train.num_steps=50

A run in an existing workdir resumes from its newest complete checkpoint (parameters,
optimizer, data iterator). SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and TensorBoard events go here.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Overrides config.data.data_dir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Orbax and Grain log every file operation at INFO; keep the console to our own lines.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pixelvla_jax").setLevel(logging.INFO)
    from pixelvla_jax.training import experiment

    cfg = _CONFIG.value
    if _DATA_DIR.value:
        cfg.data.data_dir = _DATA_DIR.value
    history = experiment.train(cfg, _WORKDIR.value)
    if history:
        print(f"ran {len(history)} steps in this run, last loss {history[-1]['loss']:.4f}")


if __name__ == "__main__":
    from pixelvla_jax import cli

    cli.run(main)
