"""Stage 2 of PixelVLA, Pixel-level Understanding Enhancement (PUE), on Pixel-160K-style data.

    python -m pixelvla_jax.train --config=configs/pixel160k.py --workdir=runs/stage2 \
        --data_dir=/path/to/annotated_rlds --config.init.from_checkpoint=runs/stage1/checkpoints
    python -m pixelvla_jax.train --config=configs/pixel160k.py:tiny --workdir=/tmp/stage2 \
        --config.init.from_checkpoint=/tmp/stage1/checkpoints

LoRA (rank 32, alpha 16, every linear layer of the LLM), the pixel encoder, the prompt
encoder and the L1 action decoder are trained; everything else stays frozen. Parameters
present in the stage-1 checkpoint are copied from it; the rest start from their init.
The datasets are RLDS episodes carrying the pixel-annotation features (see README), e.g.
the output of `python -m pixelvla_jax.annotate` on Fractal and Bridge (it keeps their names).
"""

from pixelvla_jax.training.config import base_config, use_openvla_7b, use_tiny


def get_config(variant: str = "full"):
    c = base_config()
    c.stage = "pue"
    c.model.chunk_size = 5
    c.model.lora.rank = 32
    c.model.lora.alpha = 16.0
    if variant == "tiny":
        use_tiny(c, num_steps=40)
        c.model.lora.rank = 4
        return c
    if variant != "full":
        raise ValueError(f"configs/pixel160k.py: unknown variant {variant!r}; use full or tiny")
    use_openvla_7b(c)
    c.data.datasets = [("fractal20220817_data", 1.0), ("bridge_orig", 1.0)]
    c.data.balance_by_size = True
    c.data.batch_size = 128
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 500
    c.train.num_steps = 50_000
    c.train.checkpoint_every = 5_000
    c.train.keep_period = 10_000
    return c
