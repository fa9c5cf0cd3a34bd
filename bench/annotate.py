"""Annotation pipeline benchmark: episodes/s per stage (tiny models) and the projected cost of
annotating Pixel-160K-sized data (default-size models with random weights).

    python bench/annotate.py [--episodes=24] [--image=224] [--default_sizes] [--llm_size=0.5b]

1. Tiny `transformers` models for every role on a generated Bridge-layout dataset:
   stage (a) (episode read + close event + video composition + SAM 2 video) and stage (b)
   (nouns + Grounding DINO in the proposal + SAM on the best box) in episodes/s.
2. With --default_sizes: per-call times of the default-size architectures (random weights:
   SAM 2 video at 1024 px per frame, Grounding DINO Swin-T at shortest edge 800 per crop,
   SAM ViT-B at 1024 px per box, a causal LM of --llm_size per instruction, 8 new tokens),
   and from them the projected cost of 160K episodes on this CPU; accelerator hours are
   given for stated speed-up assumptions (this machine has no accelerator to measure).

Prints a table and ends with one `BENCH {...}` JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pixelvla_jax.annotate import config as C  # noqa: E402
from pixelvla_jax.annotate import hf_backends, tiny_models  # noqa: E402
from pixelvla_jax.annotate.backends import FrameRef  # noqa: E402
from pixelvla_jax.annotate.pipeline import region_proposals, segment_target  # noqa: E402
from pixelvla_jax.annotate.runner import EpisodeReader  # noqa: E402
from pixelvla_jax.data import generate, rlds  # noqa: E402
from pixelvla_jax.data.registry import get_spec  # noqa: E402

PIXEL_160K_EPISODES = 160_000


def bench_tiny(root: str, episodes: int, image: int) -> dict:
    path = generate.write_synthetic_dataset(
        os.path.join(root, "data"),
        "bridge",
        num_episodes=episodes,
        episode_lengths=8,
        image_size=image,
        with_annotations=False,
    )
    paths = tiny_models.save_all(os.path.join(root, "tiny"))
    backends = hf_backends.build_backends(paths, video_mask_threshold=-1e4)
    cfg = C.AnnotateConfig(detection_threshold=0.0, min_mask_area=0.0, max_mask_area=1.0)
    source = rlds.open_rlds(path)
    spec = get_spec(source.name)
    reader = EpisodeReader(source, spec, None)
    # Warm-up (first calls build torch kernels).
    eps = [reader.read(i, f"e{i}") for i in range(2)]
    a = region_proposals(eps, backends, cfg, spec.gripper_convention, C.GripperPrompt())
    segment_target(eps[0], a["e0"], "red block", backends, cfg)

    t0 = time.perf_counter()
    eps = [reader.read(i, f"e{i}") for i in range(episodes)]
    stage_a = region_proposals(eps, backends, cfg, spec.gripper_convention, C.GripperPrompt())
    t1 = time.perf_counter()
    nouns = {}
    for ep in eps:
        if ep.instruction not in nouns:
            nouns[ep.instruction] = backends.nouns.extract(ep.instruction)
    t2 = time.perf_counter()
    results = [
        segment_target(ep, stage_a[ep.episode_id], nouns[ep.instruction], backends, cfg)
        for ep in eps
    ]
    t3 = time.perf_counter()
    return {
        "episodes": episodes,
        "image": image,
        "stage_a_eps_per_s": episodes / (t1 - t0),
        "nouns_per_s": len(nouns) / (t2 - t1),
        "stage_b_eps_per_s": episodes / (t3 - t2),
        "total_eps_per_s": episodes / (t3 - t0),
        "kept": sum(r.kept for r in results),
    }


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_default(root: str, llm_size: str, repeats: int) -> dict:
    from pixelvla_jax.annotate.hf_backends import (
        HFDetector,
        HFNounExtractor,
        HFSegmenter,
        HFVideoSegmenter,
        import_torch,
        import_transformers,
    )

    tr, torch = import_transformers(), import_torch()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (4, 256, 256, 3)).astype(np.uint8)  # Bridge-sized frames
    crop = frames[0, 60:180, 50:190]
    tok_dir = os.path.join(root, "tok")
    tiny_models.save_word_tokenizer(tok_dir, bert=True)
    out = {}

    video = HFVideoSegmenter(
        os.path.join(root, "none"), model=tr.Sam2VideoModel(tr.Sam2VideoConfig())
    )
    refs = [FrameRef("e", i) for i in range(len(frames))]
    video.segment_video(frames[:2], C.GripperPrompt(), refs[:2])  # warm-up
    t = _best_of(lambda: video.segment_video(frames, C.GripperPrompt(), refs), repeats)
    out["video_s_per_frame"] = t / len(frames)
    out["video_params_m"] = sum(p.numel() for p in video.model.parameters()) / 1e6
    video = None  # free it before the next model

    det = HFDetector(tok_dir, model=tr.GroundingDinoForObjectDetection(tr.GroundingDinoConfig()))
    det.detect(crop, "red block", refs[0])
    out["detector_s_per_call"] = _best_of(lambda: det.detect(crop, "red block", refs[0]), repeats)
    out["detector_params_m"] = sum(p.numel() for p in det.model.parameters()) / 1e6
    det = None

    sam = HFSegmenter(os.path.join(root, "none"), model=tr.SamModel(tr.SamConfig()))
    sam.segment(crop, (20, 20, 90, 80), refs[0])
    out["segmenter_s_per_call"] = _best_of(
        lambda: sam.segment(crop, (20, 20, 90, 80), refs[0]), repeats
    )
    out["segmenter_params_m"] = sum(p.numel() for p in sam.model.parameters()) / 1e6
    sam = None

    if llm_size != "none":
        llm_dir = os.path.join(root, "llm_tok")
        tiny_models.save_word_tokenizer(llm_dir, bert=False)
        shapes = {  # Llama-style decoders of common small instruction-model shapes
            "0.5b": dict(
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
            ),
            "1b": dict(
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=22,
                num_attention_heads=32,
                num_key_value_heads=4,
            ),
        }
        cfg = tr.LlamaConfig(vocab_size=32000, **shapes[llm_size])
        llm = HFNounExtractor(llm_dir, model=tr.LlamaForCausalLM(cfg))
        llm.generate("pick up the red block")
        out["llm_s_per_instruction"] = _best_of(
            lambda: llm.generate("put the red cup in the sink"), repeats
        )
        out["llm_params_m"] = sum(p.numel() for p in llm.model.parameters()) / 1e6
        out["llm_size"] = llm_size
    return out


def project(per_call: dict, episodes: int, distinct_instructions: int, speedups) -> dict:
    per_episode = (
        per_call["video_s_per_frame"]
        + per_call["detector_s_per_call"]
        + per_call["segmenter_s_per_call"]
    )
    llm_total = per_call.get("llm_s_per_instruction", 0.0) * distinct_instructions
    cpu_hours = (per_episode * episodes + llm_total) / 3600
    return {
        "episodes": episodes,
        "distinct_instructions": distinct_instructions,
        "cpu_s_per_episode": per_episode,
        "cpu_hours": cpu_hours,
        "accelerator_hours": {f"speedup_{s}x": cpu_hours / s for s in speedups},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--default_sizes", action="store_true")
    parser.add_argument("--llm_size", default="0.5b", choices=["none", "0.5b", "1b"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--distinct_instructions",
        type=int,
        default=50_000,
        help="assumed distinct instructions among the 160K episodes",
    )
    parser.add_argument(
        "--speedups",
        default="20,50,100",
        help="assumed accelerator speed-ups over this CPU, per call",
    )
    args = parser.parse_args()
    result: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as root:
        tiny = bench_tiny(root, args.episodes, args.image)
        result["tiny"] = tiny
        print(f"tiny models, {tiny['episodes']} Bridge-layout episodes at {tiny['image']} px:")
        print(
            f"  stage (a) {tiny['stage_a_eps_per_s']:8.2f} episodes/s   (read + close event + SAM 2 video)"
        )
        print(f"  nouns     {tiny['nouns_per_s']:8.2f} instructions/s (causal LM, 8 tokens)")
        print(f"  stage (b) {tiny['stage_b_eps_per_s']:8.2f} episodes/s   (Grounding DINO + SAM)")
        print(f"  total     {tiny['total_eps_per_s']:8.2f} episodes/s")
        if args.default_sizes:
            per_call = bench_default(root, args.llm_size, args.repeats)
            speedups = [float(s) for s in args.speedups.split(",")]
            proj = project(per_call, PIXEL_160K_EPISODES, args.distinct_instructions, speedups)
            result["default_per_call"], result["projection"] = per_call, proj
            print("default-size models (random weights), per call on this CPU:")
            print(
                f"  SAM 2 video ({per_call['video_params_m']:.0f}M) {per_call['video_s_per_frame']:8.3f} s/frame"
            )
            print(
                f"  Grounding DINO ({per_call['detector_params_m']:.0f}M) {per_call['detector_s_per_call']:8.3f} s/crop"
            )
            print(
                f"  SAM ({per_call['segmenter_params_m']:.0f}M) {per_call['segmenter_s_per_call']:8.3f} s/box"
            )
            if "llm_s_per_instruction" in per_call:
                print(
                    f"  LLM ({per_call['llm_params_m']:.0f}M) {per_call['llm_s_per_instruction']:8.3f} s/instruction"
                )
            print(
                f"projection for {proj['episodes']} episodes (one close frame, one crop, one box each; "
                f"{proj['distinct_instructions']} distinct instructions assumed):"
            )
            print(
                f"  this CPU: {proj['cpu_hours']:.0f} h ({proj['cpu_s_per_episode']:.2f} s/episode)"
            )
            for k, v in proj["accelerator_hours"].items():
                print(
                    f"  accelerator, assuming {k.split('_')[1]} faster per call: {v:.1f} accelerator-hours"
                )
    print("BENCH " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
