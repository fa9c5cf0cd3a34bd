"""Annotate an RLDS dataset with target masks (the Pixel-160K pipeline).

    python -m pixelvla_jax.annotate --dataset=DATA/bridge_orig/1.0.0 --out=OUT \\
        --video_segmenter=MODELS/sam2-hiera-large --detector=MODELS/grounding-dino-base \\
        --segmenter=MODELS/sam-vit-huge [--llm=MODELS/qwen2.5-1.5b-instruct] \\
        [--process_index=0 --process_count=1] [--num_shards=64]

Writes OUT/<name>/<version> (source episodes + annotation features; loads with
pixelvla_jax.data.step_index.StepDataset), OUT/report.jsonl and OUT/summary.json. Run the
same command on every process/host with its own --process_index; rerun to resume. Model
folders are local `transformers` checkpoints (nothing is downloaded); without --llm the
rule-based noun extractor is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from pixelvla_jax.annotate.config import AnnotateConfig, CloseEventConfig, GripperPrompt
from pixelvla_jax.errors import InvalidInputError, MissingInputError, PixelVLAError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pixelvla_jax.annotate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="source RLDS ArrayRecord dataset folder")
    p.add_argument("--out", required=True, help="output folder (work files, dataset, report)")
    p.add_argument("--name", default=None, help="registry name (default: the TFDS name)")
    p.add_argument(
        "--format",
        default=None,
        choices=["libero", "bridge", "fractal"],
        help="raw layout of an unregistered dataset (its spec is derived from it)",
    )
    p.add_argument("--split", default="train")
    p.add_argument("--video_segmenter", default=None, help="Sam2VideoModel folder")
    p.add_argument("--detector", default=None, help="GroundingDinoForObjectDetection folder")
    p.add_argument("--segmenter", default=None, help="SamModel folder")
    p.add_argument("--llm", default=None, help="causal LM folder (default: rule-based nouns)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--video_mask_threshold",
        type=float,
        default=0.0,
        help="SAM 2 mask logit threshold (0 = the model's own)",
    )
    p.add_argument("--process_index", type=int, default=int(os.environ.get("PROCESS_INDEX", 0)))
    p.add_argument("--process_count", type=int, default=int(os.environ.get("PROCESS_COUNT", 1)))
    p.add_argument("--no_merge", action="store_true", help="do not write the output dataset")
    d = AnnotateConfig()
    p.add_argument("--num_shards", type=int, default=d.num_shards)
    p.add_argument("--camera", default=None, help="camera feature (default: the spec's image)")
    p.add_argument("--max_video_frames", type=int, default=d.max_video_frames)
    p.add_argument(
        "--gripper_point",
        default="0.5,0.5",
        help="x,y in [0,1] of the gripper on the videos' first frame",
    )
    p.add_argument("--gripper_box", default=None, help="x0,y0,x1,y1 in [0,1] (optional)")
    p.add_argument(
        "--reference_image",
        default=None,
        help="image prepended to every video (the prompt points at its gripper)",
    )
    p.add_argument("--proposal_expand", type=float, default=d.proposal_expand)
    p.add_argument("--proposal_margin", type=int, default=d.proposal_margin)
    p.add_argument("--detection_threshold", type=float, default=d.detection_threshold)
    p.add_argument("--min_mask_area", type=float, default=d.min_mask_area)
    p.add_argument("--max_mask_area", type=float, default=d.max_mask_area)
    p.add_argument("--no_border_check", action="store_true")
    p.add_argument(
        "--drop_filtered",
        action="store_true",
        help="write only kept episodes (default: all, has_annotation=False)",
    )
    return p


def _floats(text: str | None):
    return None if text is None else tuple(float(v) for v in text.split(","))


def config_from_args(args) -> AnnotateConfig:
    prompt = GripperPrompt(
        points=(_floats(args.gripper_point),) if args.gripper_point else (),
        labels=(1,) if args.gripper_point else (),
        box=_floats(args.gripper_box),
        reference_image=args.reference_image,
    )
    return AnnotateConfig(
        close_event=CloseEventConfig(),
        camera_key=args.camera,
        max_video_frames=args.max_video_frames,
        gripper_prompts=(("*", prompt),),
        proposal_expand=args.proposal_expand,
        proposal_margin=args.proposal_margin,
        detection_threshold=args.detection_threshold,
        min_mask_area=args.min_mask_area,
        max_mask_area=args.max_mask_area,
        check_border=not args.no_border_check,
        num_shards=args.num_shards,
        keep_filtered=not args.drop_filtered,
    )


MODEL_FLAGS = ("video_segmenter", "detector", "segmenter", "llm")  # llm is optional


def check_args(args) -> None:
    """Raises a PixelVLAError naming the first bad argument; nothing heavy is imported, so a
    wrong path is reported as such before any model (or PyTorch) is loaded."""
    from pixelvla_jax.data import rlds

    missing = [r for r in MODEL_FLAGS[:3] if not getattr(args, r)]
    if missing:
        raise InvalidInputError(
            "give local model folders for "
            + ", ".join(f"--{r}=PATH" for r in missing)
            + " (transformers checkpoints; pixelvla_jax.annotate.tiny_models.save_all writes "
            "random tiny ones for a dry run)"
        )
    rlds.resolve_version_dir(args.dataset)  # DatasetNotFoundError naming the directory
    for flag in MODEL_FLAGS:
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            raise MissingInputError(
                f"--{flag}={path}: no such directory; give a local transformers checkpoint "
                "folder (config.json + weights; nothing is downloaded)."
            )
    if args.reference_image and not os.path.isfile(args.reference_image):
        raise MissingInputError(f"--reference_image={args.reference_image}: no such file.")
    for flag, n in (("gripper_point", 2), ("gripper_box", 4)):
        text = getattr(args, flag)
        try:
            values = _floats(text)
        except ValueError:
            values = None
        if text is not None and (
            values is None or len(values) != n or not all(0.0 <= v <= 1.0 for v in values)
        ):
            raise InvalidInputError(
                f"--{flag}={text!r}: give {n} comma-separated numbers in [0, 1]"
                + (" (x,y)" if n == 2 else " (x0,y0,x1,y1)")
                + "."
            )
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InvalidInputError(f"--out={args.out} is a file; give a folder (created if absent).")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--out={args.out}: {parent} is not writable.")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_args(args)
    except PixelVLAError as err:
        print(f"annotate: {err}", file=sys.stderr)
        return 2
    from pixelvla_jax.annotate.hf_backends import build_backends
    from pixelvla_jax.annotate.runner import annotate_dataset
    from pixelvla_jax.data import rlds
    from pixelvla_jax.data.registry import spec_for_format

    cfg = config_from_args(args)
    spec = None
    if args.format:
        name = args.name or rlds.read_dataset_info(rlds.resolve_version_dir(args.dataset))["name"]
        spec = spec_for_format(args.format, name)
    backends = build_backends(
        {
            "video_segmenter": args.video_segmenter,
            "detector": args.detector,
            "segmenter": args.segmenter,
            "llm": args.llm,
        },
        args.device,
        args.video_mask_threshold,
    )
    stats = annotate_dataset(
        args.dataset,
        args.out,
        backends,
        cfg,
        name=args.name,
        spec=spec,
        split=args.split,
        process_index=args.process_index,
        process_count=args.process_count,
        merge=not args.no_merge,
    )
    print(json.dumps(dataclasses.asdict(stats), indent=1))
    return 0


if __name__ == "__main__":
    from pixelvla_jax import cli

    cli.run(main, absl_flags=False)
