"""LIBERO evaluation cost on this CPU: simulator steps/s, policy steps/s, a 500-episode suite.

    python bench/libero.py [--suite=libero_spatial] [--steps=40] [--batch=1] [--checkpoint=DIR]

Simulator: one `LiberoEnv` of the suite's task 0 (256x256, MUJOCO_GL=egl by default), stepped
with small random actions: (a) as the evaluation runs it (agent-view camera only), (b) with
both cameras as OffScreenRenderEnv renders by default (what the replay writes), and (c) the
oracle mask's extra segmentation render. Policy: `Policy.act` on 256x256 frames with oracle
masks, batch `--batch`: the tiny preset with random weights (or `--checkpoint`), jit compile
excluded; policy steps/s = executed actions per second (the whole chunk per call).

Suite estimate: 500 episodes x (10 warm-up + the suite's step limit) simulator steps (the
worst case: every episode runs to its limit; successful episodes end earlier), plus one policy
call (and mask render) per chunk, for 1 environment process and for one per CPU core
(`workers`; processes share the cores). On a shared machine the numbers are indicative only.

Ends with one `BENCH {...}` JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MUJOCO_GL", "egl")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This file is named libero.py: keep `import libero` from finding it instead of the simulator.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.modules.pop("libero", None)

from pixelvla_jax.envs import libero as libero_lib  # noqa: E402


def time_sim(suite: str, steps: int, cameras: tuple[str, ...], mask: bool) -> tuple[float, float]:
    """(seconds per step, seconds per mask render) over `steps` steps after a 10-step warm-up."""
    env = libero_lib.LiberoEnv(libero_lib.load_task(suite, 0), cameras=cameras)
    try:
        env.reset(trial=0, warmup=libero_lib.NUM_WARMUP_STEPS)
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for _ in range(steps):
            action = rng.uniform(-0.2, 0.2, 7)
            action[-1] = -1.0
            env.step(action)
        per_step = (time.perf_counter() - t) / steps
        per_mask = float("nan")
        if mask:
            t = time.perf_counter()
            for _ in range(5):
                env.target_mask()
            per_mask = (time.perf_counter() - t) / 5
        return per_step, per_mask
    finally:
        env.close()


def make_policy(checkpoint: str):
    from pixelvla_jax.policy import Policy

    if checkpoint:
        return Policy.from_checkpoint(checkpoint)
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer
    from pixelvla_jax.runs import abstract_params
    from pixelvla_jax.testing.tiny_openvla import fast_random_params
    from pixelvla_jax.training import config as config_lib

    cfg = config_lib.load_config("libero:tiny")
    cfg.data.max_tokens = 96
    tok = os.path.join(tempfile.mkdtemp(), "tiny.model")
    train_tiny_tokenizer(tok, vocab_size=cfg.tokenizer.tiny_vocab_size)
    stats = {"action": {"q01": -np.ones(7), "q99": np.ones(7), "mask": np.arange(7) < 6}}
    return Policy(cfg, fast_random_params(abstract_params(cfg)), stats, tok, "bench")


def time_policy(policy, batch: int, calls: int) -> float:
    images = np.random.default_rng(0).integers(0, 255, (batch, 256, 256, 3), dtype=np.uint8)
    masks = np.zeros((batch, 256, 256), np.float32)
    masks[:, 100:140, 90:150] = 1
    text = ["pick up the black bowl between the plate and the ramekin and place it on the plate"]
    policy.act(images, text * batch, masks, ["mask"] * batch)  # compile
    t = time.perf_counter()
    for i in range(calls):
        policy.act(images, text * batch, masks, ["mask"] * batch, seed=i)
    return (time.perf_counter() - t) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="libero_spatial", choices=libero_lib.SUITES)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--checkpoint", default="")
    args = parser.parse_args()

    eval_step, mask_s = time_sim(args.suite, args.steps, (libero_lib.CAMERA,), mask=True)
    both_step, _ = time_sim(
        args.suite, args.steps, (libero_lib.CAMERA, libero_lib.WRIST_CAMERA), mask=False
    )
    policy = make_policy(args.checkpoint)
    act_s = time_policy(policy, args.batch, args.calls)
    chunk = policy.chunk_size

    limit = libero_lib.MAX_STEPS[args.suite]
    sim_steps = libero_lib.NUM_WARMUP_STEPS + limit
    queries = -(-limit // chunk)
    episode_1 = sim_steps * eval_step + queries * (mask_s + act_s / args.batch)
    cores = os.cpu_count() or 1
    suite_1 = 500 * episode_1
    # With one env process per core the simulator parallelises; the policy is batched.
    suite_w = 500 * (sim_steps * eval_step + queries * mask_s) / cores + 500 * queries * (
        act_s / max(args.batch, cores)
    )
    rows = [
        ("simulator steps/s (agent view, as evaluated)", 1 / eval_step),
        ("simulator steps/s (agent view + wrist, replay)", 1 / both_step),
        ("oracle mask render ms", 1e3 * mask_s),
        (f"policy call ms (batch {args.batch})", 1e3 * act_s),
        (f"policy steps/s (chunk {chunk} executed per call)", args.batch * chunk / act_s),
        (f"episode s (worst case {sim_steps} steps)", episode_1),
        ("500-episode suite h, 1 env process", suite_1 / 3600),
        (f"500-episode suite h, {cores} env processes", suite_w / 3600),
    ]
    print(f"LIBERO {args.suite} on {cores} CPU cores (MUJOCO_GL={os.environ['MUJOCO_GL']})")
    for name, value in rows:
        print(f"  {name:<52}{value:>10.2f}")
    result = {
        "suite": args.suite,
        "sim_steps_per_s": 1 / eval_step,
        "sim_steps_per_s_two_cameras": 1 / both_step,
        "mask_render_ms": 1e3 * mask_s,
        "policy_call_ms": 1e3 * act_s,
        "policy_steps_per_s": args.batch * chunk / act_s,
        "batch": args.batch,
        "chunk": chunk,
        "suite_hours_1_worker": suite_1 / 3600,
        "suite_hours_all_cores": suite_w / 3600,
        "cores": cores,
        "checkpoint": args.checkpoint or "tiny random",
    }
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    main()
