"""Configuration of the Pixel-160K annotation pipeline: every threshold and ratio lives here.

The pipeline (see `pipeline.py`) has two stages:
  (a) gripper-aware region proposal: close event -> close frames composed into videos ->
      gripper segmented by a video segmenter prompted once per video -> the gripper box,
      expanded and clipped, applied to the first frame;
  (b) multimodal object segmentation: noun from the instruction -> open-vocabulary detection
      inside the proposal -> promptable segmentation of the best box -> filters.

Coordinates: boxes are (x0, y0, x1, y1) in pixels of the full frame, x1/y1 exclusive.
Prompt points of the video segmenter are (x, y) in [0, 1] of the frame's width/height.
"""

from __future__ import annotations

import dataclasses

# Filter reasons recorded per episode (the report counts them).
KEPT = "kept"
NO_CLOSE_EVENT = "no_close_event"
NO_GRIPPER = "no_gripper_mask"
NO_DETECTION = "no_detection"
LOW_SCORE = "score_below_threshold"
MASK_AREA = "mask_area_out_of_range"
BOX_ON_BORDER = "box_on_crop_border"
REASONS = (KEPT, NO_CLOSE_EVENT, NO_GRIPPER, NO_DETECTION, LOW_SCORE, MASK_AREA, BOX_ON_BORDER)


@dataclasses.dataclass(frozen=True)
class CloseEventConfig:
    """When a raw gripper command counts as closed / open, per raw convention.

    "libero":   -1 open / +1 close; closed when a > libero_threshold.
    "bridge":   continuous, 1 = open; closed when a < bridge_threshold.
    "fractal":  relative closedness command (+1 close, -1 open, 0 hold); a close command when
                a > fractal_threshold, an open command when a < -fractal_threshold; the state
                holds between commands and starts open.
    "standard": 1 = open / 0 = closed (already standardised); closed when a < 0.5.
    """

    libero_threshold: float = 0.0
    bridge_threshold: float = 0.5
    fractal_threshold: float = 0.1
    standard_threshold: float = 0.5
    # An episode whose gripper is closed from its first step has no open->closed switch;
    # with `closed_at_start_counts` its step 0 counts as the close event instead.
    closed_at_start_counts: bool = False


@dataclasses.dataclass(frozen=True)
class GripperPrompt:
    """How the video segmenter is prompted, once per video, on the video's first frame.

    points: (x, y) in [0, 1]; labels: 1 positive / 0 negative per point; box: (x0, y0, x1,
    y1) in [0, 1] or None. `reference_image`: optional path of an image (any size, resized to
    the video's) prepended to every video, so the prompt can point at a known gripper pose.
    """

    points: tuple[tuple[float, float], ...] = ((0.5, 0.5),)
    labels: tuple[int, ...] = (1,)
    box: tuple[float, float, float, float] | None = None
    reference_image: str | None = None

    def __post_init__(self):
        if len(self.points) != len(self.labels):
            raise ValueError(
                f"GripperPrompt: {len(self.points)} points but {len(self.labels)} labels"
            )
        if not self.points and self.box is None:
            raise ValueError("GripperPrompt needs at least one point or a box")


@dataclasses.dataclass(frozen=True)
class AnnotateConfig:
    """All knobs of the pipeline. `gripper_prompts` maps "dataset/camera" (or "dataset", or
    "*") to the GripperPrompt used for that dataset's camera."""

    close_event: CloseEventConfig = CloseEventConfig()
    camera_key: str | None = None  # None: the dataset spec's image_key
    max_video_frames: int = 64  # close frames per composed video (bounded chunks)
    gripper_prompts: tuple[tuple[str, GripperPrompt], ...] = (("*", GripperPrompt()),)
    gripper_mask_threshold: float = 0.0  # video segmenter per-frame score below -> no mask
    proposal_expand: float = 2.0  # proposal side = gripper box side * expand (about its centre)
    proposal_margin: int = 8  # plus this many pixels on every side
    proposal_min_size: int = 16  # minimum proposal side in pixels (before clipping)
    # Stage (b)
    detection_threshold: float = 0.3  # best detection's score below -> LOW_SCORE
    min_mask_area: float = 0.0005  # mask area as a fraction of the full frame
    max_mask_area: float = 0.5
    border_margin: int = 1  # detected box within this many px of a crop side that is not
    #                         the image border -> BOX_ON_BORDER
    check_border: bool = True
    segment_on_crop: bool = True  # segment inside the crop (else on the full first frame)
    num_shards: int = 16  # deterministic shards by episode id (hash)
    keep_filtered: bool = True  # filtered episodes stay in the output, has_annotation=False

    def prompt_for(self, dataset: str, camera: str) -> GripperPrompt:
        table = dict(self.gripper_prompts)
        for key in (f"{dataset}/{camera}", dataset, "*"):
            if key in table:
                return table[key]
        raise KeyError(
            f"no gripper prompt for dataset {dataset!r} camera {camera!r}; add "
            f"('{dataset}/{camera}', GripperPrompt(...)) to AnnotateConfig.gripper_prompts"
        )

    def __post_init__(self):
        if self.max_video_frames < 1:
            raise ValueError(f"max_video_frames must be >= 1, got {self.max_video_frames}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.min_mask_area <= self.max_mask_area <= 1:
            raise ValueError(
                f"need 0 <= min_mask_area <= max_mask_area <= 1, got "
                f"{self.min_mask_area}, {self.max_mask_area}"
            )
        if self.proposal_expand < 1:
            raise ValueError(f"proposal_expand must be >= 1, got {self.proposal_expand}")


def config_to_dict(cfg: AnnotateConfig) -> dict:
    return dataclasses.asdict(cfg)
