"""Train-step throughput and MFU of a mid-size PixelVLA on this CPU (fp32).

    python bench/train.py [--batch_size=2] [--image_size=112] [--steps=3]

The model is the tiny preset scaled to ~150M parameters: DINOv2-style tower 384 wide x 6,
SigLIP-style tower 512 wide x 6, projector into a Llama of width 768 x 8 layers (12 heads,
MLP 2048, the full 32064-token vocabulary), full-size pixel and prompt encoders at width
768, L1 chunk head (N_c = 8). Two stages: 'finetune' (everything trained) and 'pue' (LoRA
rank 32 on the LLM + pixel/prompt encoders + head trained, the rest frozen).

The step is `builder.build_step`'s train step (the one a training run uses) on one CPU
device, on a fixed random batch (no data pipeline). Compilation is excluded: the step is
compiled ahead of time, run once to warm up, then timed per step (median of `--steps`).
MFU = XLA's FLOP count of the compiled step (`cost_analysis`; layers are unrolled so every
layer is counted) / step time / the CPU's fp32 matmul peak (`metrics.measure_matmul_peak_flops`,
2048^2), measured right before each timed step so both see the same share of a busy machine
(median over steps). "MFU cpu-t" divides FLOPs per CPU-second of the step by FLOPs per
CPU-second of the matmul: a figure that other processes on the machine do not distort.
The 6N/4N rule of thumb (`metrics.train_flops_per_step`, what `experiment.run` logs) is
printed beside it: it charges every parameter once per LLM token, so it overcounts here
(the unused lm_head, the embedding lookup, vision weights that see N_v patches, not the
LLM sequence). On a shared machine the numbers are indicative only.

Ends with one `BENCH {...}` JSON line. About 2.5 CPU-minutes (~2 min on 2 idle cores; 6-7
min wall when the cores are shared with several other jobs).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pixelvla_jax.models import llama as llama_lib  # noqa: E402
from pixelvla_jax.models.observation import Observation  # noqa: E402
from pixelvla_jax.models.pixel_encoder import PixelEncoderConfig  # noqa: E402
from pixelvla_jax.models.pixelvla import PixelVLAConfig  # noqa: E402
from pixelvla_jax.models.prompt_encoder import PromptEncoderConfig  # noqa: E402
from pixelvla_jax.models.vision import VisionConfig  # noqa: E402
from pixelvla_jax.models.vit import ViTConfig  # noqa: E402
from pixelvla_jax.training import builder, memory_plan, metrics  # noqa: E402
from pixelvla_jax.training import config as config_lib  # noqa: E402
from pixelvla_jax.training import sharding as sharding_lib  # noqa: E402

LLM_WIDTH = 768


def mid_model_config(base: PixelVLAConfig, image_size: int) -> PixelVLAConfig:
    """`base` (from `experiment.model_config`, which sets LoRA, remat, scan, chunk, encoders
    on/off) with mid-size towers, LLM and encoders."""
    dino = dataclasses.replace(
        ViTConfig.dinov2_vitl14_reg4(image_size), width=384, depth=6, num_heads=6, mlp_dim=1536
    )
    siglip = dataclasses.replace(
        ViTConfig.siglip_so400m14(image_size), width=512, depth=6, num_heads=8, mlp_dim=1912
    )
    vision = VisionConfig(dino=dino, siglip=siglip, llm_dim=LLM_WIDTH)
    llama = llama_lib.llama2_7b(
        width=LLM_WIDTH, depth=8, num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=2048
    ).replace(
        lora_rules=base.llama.lora_rules,
        remat=base.llama.remat,
        scan_layers=base.llama.scan_layers,
    )
    return base.replace(
        vision=vision,
        llama=llama,
        pixel_encoder=dataclasses.replace(
            PixelEncoderConfig.openvla_7b(),
            proj_dim=512,
            semantic_mlp_dims=(LLM_WIDTH,),
            spatial_mlp_dims=(512,),
            out_dim=LLM_WIDTH,
        ),
        prompt_encoder=dataclasses.replace(PromptEncoderConfig.openvla_7b(), out_dim=LLM_WIDTH),
        tokenizer_vocab_size=32000,
        pixel_levels=(),
    )


def bench_config(stage: str, batch_size: int, image_size: int):
    cfg = config_lib.base_config()
    cfg.stage = stage
    cfg.model.dtype = "float32"
    cfg.model.lora.rank = 32 if stage == "pue" else 0
    cfg.data.batch_size = batch_size
    cfg.data.image_size = image_size
    cfg.mesh.data = -1
    return cfg


def random_batch(step: memory_plan.AbstractStep, seed: int = 0) -> dict[str, jax.Array]:
    """A fixed well-formed batch with the abstract batch's shapes, placed on its shardings."""
    spec = step.batch
    b, n_c, a = spec["actions"].shape
    obs = Observation.fake(
        b,
        image_size=spec["image"].shape[1],
        max_prompt_points=spec["prompt_points"].shape[1],
        max_tokens=spec["tokens"].shape[1],
        vocab_size=step.model_cfg.tokenizer_vocab_size,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    host = {k: np.asarray(getattr(obs, k)) for k in builder.OBS_KEYS}
    host["actions"] = rng.uniform(-1, 1, (b, n_c, a)).astype(np.float32)
    host["action_pad_mask"] = np.ones((b, n_c), bool)
    host["proprio"] = np.zeros(spec["proprio"].shape, np.float32)
    host["dataset_id"] = np.zeros((b,), np.int32)
    for key, value in host.items():
        if value.shape != spec[key].shape or value.dtype != spec[key].dtype:
            raise ValueError(
                f"bench batch '{key}': made {value.shape} {value.dtype}, the step expects "
                f"{spec[key].shape} {spec[key].dtype}."
            )
    return {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}


def matmul_peak_per_cpu_second(size: int = 2048, repeats: int = 3) -> float:
    """fp32 matmul FLOPs per CPU-second of this process (all its threads): a rate that
    does not depend on how much of a shared machine the process gets."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = a + 1.0
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    start = time.process_time()
    for _ in range(repeats):
        matmul(a, b).block_until_ready()
    return 2.0 * size**3 * repeats / (time.process_time() - start)


def bench_stage(stage: str, args) -> dict[str, float]:
    """Compiles one stage's step, then times `args.steps` steps, each next to a fresh
    measurement of the matmul peak (on a shared CPU both see the same contention)."""
    cfg = bench_config(stage, args.batch_size, args.image_size)
    model_cfg = mid_model_config(config_lib.model_config(cfg), args.image_size)
    step = memory_plan.abstract_step(cfg, model_cfg=model_cfg)
    summary = memory_plan.summarize_state(step)
    with sharding_lib.sharding_context(step.mesh, step.rules):
        state = jax.jit(step.init_fn, out_shardings=step.shardings)(jax.random.PRNGKey(0))
        batch = random_batch(step)
        start = time.perf_counter()
        compiled = step.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost["flops"]) * len(jax.devices())  # per-device program
        state, m = compiled(state, batch)  # warm-up
        first_loss = float(m["loss"])
        times, cpu_times, mfus = [], [], []
        for _ in range(args.steps):
            peak = metrics.measure_matmul_peak_flops(repeats=1) * len(jax.devices())
            wall, cpu = time.perf_counter(), time.process_time()
            state, m = compiled(state, batch)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - wall)
            cpu_times.append(time.process_time() - cpu)
            mfus.append(metrics.mfu(flops, times[-1], peak))
        last_loss = float(m["loss"])
    if not np.isfinite(last_loss):
        raise RuntimeError(f"stage {stage}: loss is {last_loss} after {args.steps + 1} steps.")
    tokens = step.tokens_per_example * args.batch_size
    rule_flops = metrics.train_flops_per_step(summary.trained_params, summary.frozen_params, tokens)
    step_s = statistics.median(times)
    cpu_s = statistics.median(cpu_times)
    return {
        "params_m": (summary.trained_params + summary.frozen_params) / 1e6,
        "trained_m": summary.trained_params / 1e6,
        "tokens_per_example": step.tokens_per_example,
        "compile_s": compile_s,
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "cpu_s_per_step": cpu_s,
        "mfu": statistics.median(mfus),
        "xla_gflop_per_step": flops / 1e9,
        "rule_gflop_per_step": rule_flops / 1e9,
        "loss_first": first_loss,
        "loss_last": last_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=112, help="multiple of 14")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    parser.add_argument("--stages", default="finetune,pue")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 matmuls

    peak = metrics.measure_matmul_peak_flops()
    print(
        f"backend {jax.default_backend()}, {len(jax.devices())} device(s), {os.cpu_count()} "
        f"CPU cores; fp32 matmul peak now {peak / 1e9:.1f} GFLOP/s per device (2048^2)"
    )
    rows = {}
    for stage in [s for s in args.stages.split(",") if s]:
        rows[stage] = bench_stage(stage, args)
        r = rows[stage]
        print(
            f"  {stage}: {r['params_m']:.1f} M params ({r['trained_m']:.1f} M trained), "
            f"compile {r['compile_s']:.1f} s, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
            flush=True,
        )

    # Contention-free view: FLOPs per CPU-second of the step vs of a big matmul.
    peak_cpu = matmul_peak_per_cpu_second()
    for r in rows.values():
        r["mfu_cpu_time"] = r["xla_gflop_per_step"] * 1e9 / r["cpu_s_per_step"] / peak_cpu

    print(
        f"\nbatch {args.batch_size}, image {args.image_size} px, fp32, median of {args.steps} "
        f"steps; matmul peak {peak_cpu / 1e9:.1f} GFLOP per CPU-second"
    )
    print(
        f"{'stage':<10}{'params M':>9}{'trained M':>10}{'tok/ex':>7}{'step s':>8}{'steps/s':>8}"
        f"{'CPU s':>7}{'GFLOP XLA':>10}{'MFU':>7}{'MFU cpu-t':>10}{'GFLOP 6N/4N':>12}"
    )
    for stage, r in rows.items():
        print(
            f"{stage:<10}{r['params_m']:>9.1f}{r['trained_m']:>10.1f}"
            f"{r['tokens_per_example']:>7d}{r['step_s']:>8.2f}{r['steps_per_s']:>8.3f}"
            f"{r['cpu_s_per_step']:>7.2f}{r['xla_gflop_per_step']:>10.1f}{r['mfu']:>7.1%}"
            f"{r['mfu_cpu_time']:>10.1%}{r['rule_gflop_per_step']:>12.1f}"
        )
    print(
        "MFU: XLA FLOPs / step time / matmul peak measured next to each step (median). "
        "MFU cpu-t: FLOPs per CPU-second of the step / of a 2048^2 matmul (not distorted by "
        "other processes). 6N/4N: the rule experiment.run logs (overcounts here)."
    )
    figures: dict[str, float] = {
        "peak_gflops": round(peak / 1e9, 2),
        "peak_gflop_per_cpu_s": round(peak_cpu / 1e9, 2),
    }
    for stage, r in rows.items():
        figures[f"{stage}_steps_per_s"] = round(r["steps_per_s"], 4)
        figures[f"{stage}_mfu"] = round(r["mfu"], 4)
        figures[f"{stage}_mfu_cpu_time"] = round(r["mfu_cpu_time"], 4)
        figures[f"{stage}_step_s"] = round(r["step_s"], 3)
        figures[f"{stage}_cpu_s_per_step"] = round(r["cpu_s_per_step"], 3)
        figures[f"{stage}_xla_gflop_per_step"] = round(r["xla_gflop_per_step"], 1)
        figures[f"{stage}_params_m"] = round(r["params_m"], 1)
        figures[f"{stage}_trained_params_m"] = round(r["trained_m"], 2)
        figures[f"{stage}_compile_s"] = round(r["compile_s"], 1)
    figures["batch_size"] = args.batch_size
    figures["image_size"] = args.image_size
    print("BENCH " + json.dumps({"name": "train", "figures": figures, "targets": {}}))


if __name__ == "__main__":
    main()
