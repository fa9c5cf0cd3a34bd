"""Stage 1 of PixelVLA, Continuous Action Training (CAT), on Fractal (RT-1) + Bridge v2.

    python -m pixelvla_jax.train --config=configs/bridge_fractal.py --workdir=runs/stage1 \
        --data_dir=/path/to/rlds --config.init.openvla_checkpoint=/path/to/openvla-7b
    python -m pixelvla_jax.train --config=configs/bridge_fractal.py:tiny --workdir=/tmp/stage1

Starts from OpenVLA-7B; the pixel and prompt encoders are off; the whole VLM is frozen and
only the L1 action decoder (and its action-slot embeddings) is trained. Stage 2 is
configs/pixel160k.py, started from this run's checkpoint.
"""

from pixelvla_jax.training.config import base_config, use_openvla_7b, use_tiny


def get_config(variant: str = "full"):
    c = base_config()
    c.stage = "cat"
    c.model.chunk_size = 5  # Bridge's N_c in the paper's setup (the data's chunk inherits it)
    if variant == "tiny":
        return use_tiny(c, num_steps=40)
    if variant != "full":
        raise ValueError(
            f"configs/bridge_fractal.py: unknown variant {variant!r}; use full or tiny"
        )
    use_openvla_7b(c)
    c.data.datasets = [("fractal20220817_data", 1.0), ("bridge_orig", 1.0)]
    c.data.balance_by_size = True
    c.data.batch_size = 256
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000
    c.train.num_steps = 100_000
    c.train.checkpoint_every = 5_000
    c.train.keep_period = 20_000
    return c
