"""PixelVLA on LIBERO (L1 chunk head, N_c = 8), fine-tuned from OpenVLA-7B.

    python -m pixelvla_jax.train --config=configs/libero.py:spatial --workdir=runs/libero \
        --data_dir=/path/to/modified_libero_rlds \
        --config.init.openvla_checkpoint=/path/to/openvla-7b
    python -m pixelvla_jax.train --config=configs/libero.py:tiny --workdir=/tmp/libero_tiny

Variants: spatial, object, goal, 10, all (the four suites mixed, balanced by size), tiny
(a tiny model on a generated LIBERO-format dataset; runs on a laptop CPU in a minute).
"""

from pixelvla_jax.training.config import base_config, use_openvla_7b, use_tiny

SUITES = {
    "spatial": ["libero_spatial_no_noops"],
    "object": ["libero_object_no_noops"],
    "goal": ["libero_goal_no_noops"],
    "10": ["libero_10_no_noops"],
    "all": [
        "libero_spatial_no_noops",
        "libero_object_no_noops",
        "libero_goal_no_noops",
        "libero_10_no_noops",
    ],
}


def get_config(variant: str = "spatial"):
    c = base_config()
    if variant == "tiny":
        use_tiny(c, num_steps=60)
        c.train.log_every = 10
        return c
    if variant not in SUITES:
        raise ValueError(
            f"configs/libero.py: unknown variant {variant!r}; use {sorted(SUITES)} or tiny"
        )
    c.stage = "pue"
    use_openvla_7b(c)
    c.model.lora.rank = 32
    c.model.lora.alpha = 16.0
    c.data.datasets = [(name, 1.0) for name in SUITES[variant]]
    c.data.balance_by_size = variant == "all"
    c.data.batch_size = 64
    c.optim.lr = 5e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 500
    c.train.num_steps = 50_000
    c.train.checkpoint_every = 5_000
    c.train.keep_period = 10_000
    return c
