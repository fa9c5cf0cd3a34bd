"""Benchmark: PixelVLA-π0 (the π0 family) on this CPU.

    python bench/pi0.py [--parts=latency,throughput,pixelref] [--batch=1] [--iters=10]
                        [--episodes=200] [--workdir=/tmp/pi0_bench] [--steps=0] [--replan=1]
    python bench/pi0.py --smoke          # tiny sizes: checks that every part runs

(a) latency: sampling an action chunk (10 Euler steps, H = 50) at a mid-size π0 config
    (SigLIP 384 wide x 6 at 112 px, two cameras of 64 tokens each; a 768-wide 8-layer
    Gemma VLM and a 384-wide expert), the prefix run once into a KV cache (what
    `predict_actions` does) vs recomputed at every step (`sample_actions(use_cache=False)`);
    the median of at least 10 alternating timed calls each. Target: cached >= 3x faster.
(b) throughput: actions per second of the flow head (10 steps, chunk 50) vs PixelVLA's L1
    head (one forward, chunk 8) and its discrete head (prefill + 7 decode steps, one
    action), the OpenVLA-based model at the same LLM width and depth (bench/model.py's
    mid-size config, 112 px towers); printed, no target.
(c) PixelRef (`configs/pixelref.py:pi0`, trained from scratch, then `:pi0_no_pixel`): success
    with the mask over `--episodes` seeded episodes, and the no-pixel model's success
    against the look-alike chance (a flow head samples one mode of the multimodal
    demonstrations, so it should commit to one look-alike); targets: mask >= 90%, the
    no-pixel gap to chance <= 10 points, the whole run (data, training and evaluating the
    mask model) <= 15 minutes. `--replan` actions of each chunk of 8 run before replanning
    (1: `evaluate.default_replan` for a π0 run on PixelRef).
    The recipe (configs/pixelref.py `use_pi0`: the mask-only data, the default's wsd
    schedule over 14000 steps, actions padded to 8 dims, not openpi's 32, which starved the
    32-wide expert: 23% with the mask; the per-patch grounding loss against the
    referred-objects mask). Measured on a shared 2-core machine before this recipe: 7000
    steps without grounding gave 98.5% with the mask and 8.5% without pixels (replan 4;
    replan 1: 17%) vs chance 40.7%, closing mostly where no object is; grounding lifted the
    no-pixel model to 23.5% at 7000 steps and 31% at 14000 (replan 1; 18.5% at replan 4).

Random weights for (a) and (b) are filled on the host (`testing.tiny_openvla.
fast_random_params`: `jax.jit(model.init)` would compile one random op per parameter).
Ends with one `BENCH {...}` JSON line. Numbers are indicative on a shared CPU; run the
full size on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pixelvla_jax.models import gemma as gemma_lib  # noqa: E402
from pixelvla_jax.models.observation import Observation  # noqa: E402
from pixelvla_jax.models.pi0 import Pi0, Pi0Config, abstract_variables  # noqa: E402
from pixelvla_jax.models.pixel_encoder import PixelEncoderConfig  # noqa: E402
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig  # noqa: E402
from pixelvla_jax.models.pixelvla import abstract_variables as pixelvla_variables  # noqa: E402
from pixelvla_jax.models.prompt_encoder import PromptEncoderConfig  # noqa: E402
from pixelvla_jax.models.vit import ViTConfig  # noqa: E402
from pixelvla_jax.testing.tiny_openvla import fast_random_params  # noqa: E402

WIDTH, DEPTH, IMAGE = 768, 8, 112  # bench/model.py's mid-size LLM and image


def mid_pi0_config(smoke: bool) -> Pi0Config:
    """The latency config: 64 tokens per camera, a 768 x 8 VLM, a 384-wide expert."""
    if smoke:
        return Pi0Config.tiny(action_horizon=50)
    vlm = gemma_lib.GemmaConfig(
        width=WIDTH, depth=DEPTH, mlp_dim=4 * WIDTH, num_heads=12, num_kv_heads=1,
        head_dim=64, vocab_size=576,
    )  # fmt: skip
    siglip = dataclasses.replace(
        ViTConfig.siglip_so400m14_paligemma(IMAGE), width=384, depth=6, num_heads=6, mlp_dim=1536
    )
    return Pi0Config(
        vlm=vlm,
        action_expert=vlm.replace(width=WIDTH // 2, mlp_dim=2 * WIDTH),
        vision=siglip,
        pixel_encoder=PixelEncoderConfig.tiny(out_dim=WIDTH),
        prompt_encoder=PromptEncoderConfig.tiny(out_dim=WIDTH),
        action_horizon=50,
        num_cameras=2,
        max_text_tokens=32,
        dtype="float32",
    )


def mid_pixelvla_config(smoke: bool) -> PixelVLAConfig:
    """bench/model.py's mid-size PixelVLA (the same LLM width and depth as the π0 VLM)."""
    if smoke:
        return PixelVLAConfig.tiny()
    spec = importlib.util.spec_from_file_location(
        "pixelvla_bench_model", os.path.join(ROOT, "bench", "model.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.WIDTH, module.IMAGE) == (WIDTH, IMAGE), "bench/model.py's sizes changed"
    return module.mid_config()


def observation(spec: Observation, vocab: int, seed: int = 0) -> Observation:
    """A random but well-formed batch shaped like `spec` (every optional field it has)."""
    rng = np.random.default_rng(seed)
    b, length = spec.tokens.shape
    tokens = rng.integers(3, vocab, (b, length)).astype(np.int32)
    tokens[:, 0] = 1
    fields = {}
    for f in dataclasses.fields(spec):
        s = getattr(spec, f.name)
        if s is None:
            continue
        if f.name == "tokens":
            fields[f.name] = jnp.asarray(tokens)
        elif s.dtype == jnp.uint8:
            fields[f.name] = jnp.asarray(rng.integers(0, 256, s.shape, dtype=np.uint8))
        elif s.dtype == jnp.bool_:
            fields[f.name] = jnp.ones(s.shape, bool)
        elif s.dtype == jnp.int32:
            fields[f.name] = jnp.zeros(s.shape, jnp.int32)
        else:
            fields[f.name] = jnp.asarray(rng.uniform(0, 1, s.shape), jnp.float32)
    return Observation(**fields)


def median_times(fns: dict, iters: int) -> dict[str, float]:
    """Seconds per call, the median of `iters` timed calls per function, alternating them so
    that load drifting over the run hits them alike (one untimed warm-up call each)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def pi0_sampling(batch: int, iters: int, smoke: bool) -> tuple[dict, dict]:
    """(a) and the flow head's part of (b): cached vs recomputed prefix."""
    config = mid_pi0_config(smoke)
    model = Pi0(config)
    params = fast_random_params(abstract_variables(config)["params"])
    obs = observation(config.spec(batch), config.vlm.vocab_size)
    noise = jax.random.normal(
        jax.random.key(0), (batch, config.action_horizon, config.model_action_dim)
    )

    def sampler(use_cache):
        fn = jax.jit(
            lambda p, o, n: model.apply(
                {"params": p}, o, n, use_cache=use_cache, method=Pi0.sample_actions
            )
        )
        return lambda: fn(params, obs, noise)

    cached, recomputed = sampler(True), sampler(False)
    diff = float(jnp.max(jnp.abs(cached() - recomputed())))
    times = median_times({"cached": cached, "recomputed": recomputed}, iters)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    figures = {
        "pi0_params_m": round(n_params / 1e6, 1),
        "prefix_tokens": config.prefix_length(),
        "cached_ms": round(1e3 * times["cached"], 1),
        "recomputed_ms": round(1e3 * times["recomputed"], 1),
        "cache_speedup": round(times["recomputed"] / times["cached"], 2),
        "cached_vs_recomputed_max_abs": diff,
        "flow_actions_per_s": round(batch * config.action_horizon / times["cached"], 1),
    }
    rows = {
        "params": f"{n_params / 1e6:.1f}M",
        "prefix / suffix tokens": f"{config.prefix_length()} / {config.suffix_length}",
        "sample, prefix cached (ms)": f"{1e3 * times['cached']:.1f}",
        "sample, prefix recomputed (ms)": f"{1e3 * times['recomputed']:.1f}",
    }
    return figures, rows


def pixelvla_heads(batch: int, iters: int, smoke: bool) -> dict:
    """(b): PixelVLA's L1 head (one forward, chunk 8) and discrete head (one action)."""
    config = mid_pixelvla_config(smoke)
    l1 = PixelVLA(config)
    params = fast_random_params(pixelvla_variables(config)["params"])
    discrete_config = config.replace(head="discrete")
    discrete = PixelVLA(discrete_config)
    d_params = {k: v for k, v in params.items() if k not in ("action_slots", "action_head")}
    obs = observation(config.spec(batch), config.tokenizer_vocab_size)
    l1_fn = jax.jit(lambda p, o: l1.apply({"params": p}, o, method=PixelVLA.predict_actions))
    d_fn = jax.jit(lambda p, o: discrete.apply({"params": p}, o, method=PixelVLA.predict_actions))
    times = median_times(
        {"l1": lambda: l1_fn(params, obs), "discrete": lambda: d_fn(d_params, obs)}, iters
    )
    return {
        "l1_actions_per_s": round(batch * config.chunk_size / times["l1"], 1),
        "discrete_actions_per_s": round(batch / times["discrete"], 1),
        "l1_chunk": config.chunk_size,
        "llm_width": config.llama.width,
        "llm_depth": config.llama.depth,
    }


def pixelref(episodes: int, workdir: str, data_dir: str, steps: int, replan: int, smoke: bool):
    """(c): train and evaluate `pixelref:pi0` and `pixelref:pi0_no_pixel`."""
    from pixelvla_jax import evaluate
    from pixelvla_jax.training import config as config_lib
    from pixelvla_jax.training import experiment

    start = time.perf_counter()
    shutil.rmtree(workdir, ignore_errors=True)
    figures, rows = {}, []
    for variant, kinds in (("pi0", ("mask", "none")), ("pi0_no_pixel", ("none",))):
        cfg = config_lib.load_config(f"pixelref:{variant}")
        cfg.data.data_dir = data_dir
        cfg.train.progress = False
        if smoke:
            cfg.data_generator.num_episodes = 8
            cfg.data.batch_size = 8
        if steps:
            cfg.train.num_steps = steps
            cfg.train.checkpoint_every = steps
            cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, steps // 10)
        run_dir = os.path.join(workdir, variant)
        t0 = time.perf_counter()
        history = experiment.train(cfg, run_dir)
        t1 = time.perf_counter()
        results = evaluate.evaluate(
            run_dir, "pixelref", trials=episodes, prompt_kinds=kinds, videos=2, replan=replan
        )
        t2 = time.perf_counter()
        figures[f"{variant}/train_s"] = round(t1 - t0, 1)
        figures[f"{variant}/eval_s"] = round(t2 - t1, 1)
        figures[f"{variant}/final_loss"] = round(history[-1]["loss"], 4)
        figures["chance"] = round(results["chance_rate"], 4)
        for kind, rate in results["success"].items():
            outcomes = results["outcomes"][kind]
            named = (outcomes.get("target", 0) + outcomes.get("look-alike", 0)) / max(
                sum(outcomes.values()), 1
            )
            figures[f"{variant}/{kind}"] = round(rate, 4)
            figures[f"{variant}/{kind}/named_kind"] = round(named, 4)
            rows.append((variant, kind, rate, named))
        print(
            f"{variant}: trained {len(history)} steps in {t1 - t0:.0f} s, evaluated in "
            f"{t2 - t1:.0f} s",
            flush=True,
        )
        if variant == "pi0":  # data generation included
            figures["whole_run_min"] = round((t2 - start) / 60, 2)
    figures["bench_min"] = round((time.perf_counter() - start) / 60, 2)
    figures["no_pixel_gap_to_chance"] = round(
        abs(figures["pi0_no_pixel/none"] - figures["chance"]), 4
    )
    print(
        f"\nPixelRef, π0 family, {episodes} seeded episodes per row (chance {figures['chance']:.1%})"
    )
    print(f"{'trained on':<12}{'given':<8}{'success':>9}{'named kind':>12}")
    for variant, kind, rate, named in rows:
        trained = "masks" if variant == "pi0" else "no pixels"
        print(f"{trained:<12}{kind:<8}{rate:>9.1%}{named:>12.1%}")
    targets = {
        "whole_run_min": [figures["whole_run_min"], "<=", 15],
        "mask_success": [figures["pi0/mask"], ">=", 0.90],
        "no_pixel_gap_to_chance": [figures["no_pixel_gap_to_chance"], "<=", 0.10],
    }
    return figures, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="latency,throughput,pixelref")
    parser.add_argument("--batch", type=int, default=1, help="(a), (b): observations per call")
    parser.add_argument("--iters", type=int, default=10, help="(a), (b): timed calls (>= 10)")
    parser.add_argument("--episodes", type=int, default=200, help="(c): episodes per row")
    parser.add_argument("--workdir", default="/tmp/pi0_bench", help="(c): runs (wiped)")
    parser.add_argument("--data_dir", default="/tmp/pixelref_bench_data", help="(c): dataset")
    parser.add_argument("--steps", type=int, default=0, help="(c): train steps (0: config's)")
    parser.add_argument(
        "--replan", type=int, default=1, help="(c): actions run per chunk (evaluate's default)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {"latency", "throughput", "pixelref"})
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; use latency, throughput, pixelref.")
    iters = 2 if args.smoke else max(args.iters, 10)
    figures, targets = {}, {}
    print(f"backend {jax.default_backend()}, {len(jax.devices())} devices, jax {jax.__version__}")
    if "latency" in parts or "throughput" in parts:
        sampled, rows = pi0_sampling(args.batch, iters, args.smoke)
        figures.update(sampled)
        print("(a) π0 sampling, 10 Euler steps, chunk 50, batch", args.batch)
        for name, value in rows.items():
            print(f"  {name:<34}{value:>10}")
        print(f"  {'speedup of the KV cache':<34}{sampled['cache_speedup']:>9.2f}x")
        targets["cache_speedup"] = [sampled["cache_speedup"], ">=", 3.0]
    if "throughput" in parts:
        figures.update(pixelvla_heads(args.batch, iters, args.smoke))
        print(
            f"(b) actions per second at LLM width {figures['llm_width']} x "
            f"{figures['llm_depth']} (batch {args.batch})"
        )
        print(f"  {'π0 flow head (10 steps, chunk 50)':<40}{figures['flow_actions_per_s']:>10.1f}")
        l1_name = f"PixelVLA L1 head (one pass, chunk {figures['l1_chunk']})"
        print(f"  {l1_name:<40}{figures['l1_actions_per_s']:>10.1f}")
        print(
            f"  {'PixelVLA discrete head (one action)':<40}{figures['discrete_actions_per_s']:>10.1f}"
        )
    if "pixelref" in parts:
        pr_figures, pr_targets = pixelref(
            4 if args.smoke else args.episodes,
            args.workdir,
            os.path.join(args.workdir, "data") if args.smoke else args.data_dir,
            4 if args.smoke else args.steps,
            args.replan,
            args.smoke,
        )
        figures.update({f"pixelref/{k}": v for k, v in pr_figures.items()})
        targets.update(pr_targets)
    print("BENCH " + json.dumps({"name": "pi0", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
