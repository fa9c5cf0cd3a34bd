"""Stage 1 of PixelVLA, Continuous Action Training (CAT), on Fractal (RT-1) + Bridge v2.

    python -m pixelvla_jax.train --config=configs/bridge_fractal.py --workdir=runs/stage1 \
        --data_dir=/path/to/rlds --config.init.openvla_checkpoint=/path/to/openvla-7b
    python -m pixelvla_jax.train --config=configs/bridge_fractal.py:tiny --workdir=/tmp/stage1

Starts from OpenVLA-7B; the pixel and prompt encoders are off; the whole VLM is frozen and
only the L1 action decoder (and its action-slot embeddings) is trained. Stage 2 is
configs/pixel160k.py, started from this run's checkpoint.
"""

from pixelvla_jax.training.experiment import base_config


def get_config(variant: str = "full"):
    c = base_config()
    c.stage = "cat"
    c.model.chunk_size = 5  # Bridge's N_c in the paper's setup
    c.data.action_chunk = 5
    if variant == "tiny":
        c.model.preset = "tiny"
        c.data.datasets = [("synthetic_libero", 1.0)]
        c.data.image_size = 56
        c.data.batch_size = 8
        c.data.num_threads = 2
        c.data_generator.kind = "synthetic_libero"
        c.train.num_steps = 40
        c.train.checkpoint_every = 20
        c.optim.total_steps = 40
        c.optim.lr = 1e-3
        return c
    if variant != "full":
        raise ValueError(
            f"configs/bridge_fractal.py: unknown variant {variant!r}; use full or tiny"
        )
    c.model.preset = "openvla_7b"
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.data.datasets = [("fractal20220817_data", 1.0), ("bridge_orig", 1.0)]
    c.data.balance_by_size = True
    c.data.batch_size = 256
    c.data.worker_count = 8
    c.data.num_threads = 16
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000
    c.optim.total_steps = 100_000
    c.train.num_steps = 100_000
    c.train.log_every = 50
    c.train.checkpoint_every = 5_000
    c.train.keep_period = 20_000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
