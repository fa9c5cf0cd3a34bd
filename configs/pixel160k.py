"""Stage 2 of PixelVLA, Pixel-level Understanding Enhancement (PUE), on Pixel-160K-style data.

    python -m pixelvla_jax.train --config=configs/pixel160k.py --workdir=runs/stage2 \
        --data_dir=/path/to/annotated_rlds --config.init.from_checkpoint=runs/stage1/checkpoints
    python -m pixelvla_jax.train --config=configs/pixel160k.py:tiny --workdir=/tmp/stage2 \
        --config.init.from_checkpoint=/tmp/stage1/checkpoints

LoRA (rank 32, alpha 16, every linear layer of the LLM), the pixel encoder, the prompt
encoder and the L1 action decoder are trained; everything else stays frozen. Parameters
present in the stage-1 checkpoint are copied from it; the rest start from their init.
The datasets are RLDS episodes carrying the pixel-annotation features (see README).
"""

from pixelvla_jax.training.experiment import base_config


def get_config(variant: str = "full"):
    c = base_config()
    c.stage = "pue"
    c.model.chunk_size = 5
    c.data.action_chunk = 5
    c.model.lora.rank = 32
    c.model.lora.alpha = 16.0
    if variant == "tiny":
        c.model.preset = "tiny"
        c.model.lora.rank = 4
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
        raise ValueError(f"configs/pixel160k.py: unknown variant {variant!r}; use full or tiny")
    c.model.preset = "openvla_7b"
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.data.datasets = [("fractal20220817_pixel", 1.0), ("bridge_orig_pixel", 1.0)]
    c.data.balance_by_size = True
    c.data.batch_size = 128
    c.data.worker_count = 8
    c.data.num_threads = 16
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 500
    c.optim.total_steps = 50_000
    c.train.num_steps = 50_000
    c.train.log_every = 50
    c.train.checkpoint_every = 5_000
    c.train.keep_period = 10_000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
