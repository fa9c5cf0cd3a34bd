"""Visual prompts sampled from an object mask, and the text prompt templates.

`PROMPT_KINDS` are the ways a user can single out the target object, one vocabulary for the
data pipeline, the policy and the evaluations. `sample_visual_prompt` is shared by training,
evaluation and the annotation pipeline. One call picks one prompt kind with the configured
probabilities (`PromptConfig.kind_probs`, a mapping kind -> probability):

- "points": 1..max_positive points inside the mask (PROMPT_POSITIVE) and 0..max_negative
  points outside it (PROMPT_NEGATIVE);
- "line": `line_points` points (PROMPT_LINE) evenly spaced along a random straight stroke
  through the mask, every point on a mask pixel;
- "box": the mask's bounding box as two corners (PROMPT_BOX_TOP_LEFT / _BOTTOM_RIGHT),
  optionally jittered;
- "mask": the mask itself as a dense prompt (`has_prompt_mask`); a policy given "mask" also
  feeds it to the pixel-aware encoder (`data.example.ExampleBuilder`);
- "none": no prompt.

Coordinates are (x, y) in [0, 1] of the width / height; a pixel (row r, col c) has its
centre at ((c + 0.5) / W, (r + 0.5) / H). Unused slots are PROMPT_PAD with (0, 0).
An absent or empty mask always gives "none".

`VisualPrompt` is a prompt given explicitly (a user's clicks, stroke or box; a server's
client), turned into the same arrays by `explicit_visual_prompt`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np

from pixelvla_jax.models.observation import (
    PROMPT_BOX_BOTTOM_RIGHT,
    PROMPT_BOX_TOP_LEFT,
    PROMPT_LINE,
    PROMPT_NEGATIVE,
    PROMPT_PAD,
    PROMPT_POSITIVE,
)

# Also the order in which `sample_visual_prompt` draws a kind (reordering would change every
# sampled prompt) and the order of the positional `kind_probs` of configs saved before
# kind_probs became a mapping.
PROMPT_KINDS = ("points", "line", "box", "mask", "none")
DEFAULT_KIND_PROBS = {"points": 0.25, "line": 0.2, "box": 0.2, "mask": 0.15, "none": 0.2}

# docs/design.md §1.3: the paper's template with our placeholder words.
PIXELVLA_TEMPLATE = (
    "In: What should the robot do to {instruction}, refer to <pixel> <prompt>?\nOut:"
)
# The released OpenVLA-7B checkpoint's prompt, as its README passes it to `predict_action`.
OPENVLA_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
# openpi's π0 prompt (openpi src/openpi/models/tokenizer.py, PaligemmaTokenizer.tokenize): the
# task alone, cleaned (stripped; "_" and newlines become spaces; case kept), then BOS + its
# ids + the ids of "\n" tokenized on its own (`OPENPI_SUFFIXES`).
PI0_TEMPLATE = "{instruction}"
TEMPLATES = {"pixelvla": PIXELVLA_TEMPLATE, "openvla": OPENVLA_TEMPLATE, "pi0": PI0_TEMPLATE}
# Templates whose instruction is cleaned as openpi does (not lower-cased as OpenVLA does), and
# the text each appends as separately tokenized pieces.
OPENPI_SUFFIXES = {"pi0": "\n"}
# Text that training put between a template's prompt and the first action token. OpenVLA
# trains on `In: {msg}\nOut: ` + action tokens + `</s>` (PurePromptBuilder.wrap_human in
# openvla prismatic/models/backbones/llm/prompting/base_prompter.py), so its tokens end with
# the piece Llama's tokenizer makes of that space (`▁`, id 29871), which `predict_action`
# (prismatic/extern/hf/modeling_prismatic.py, OpenVLAForActionPrediction) appends when the
# prompt ids lack it. Keyed by template text; templates not listed have none.
ACTION_SEPARATORS = {OPENVLA_TEMPLATE: " "}


def separate_suffix(template: str) -> str:
    """Text tokenized on its own after the prompt ("\n" for openpi's π0 prompt, else "")."""
    return OPENPI_SUFFIXES.get(template, "")


def action_separator(template: str) -> str:
    """The text between `template`'s prompt and the first action token in training
    (" " for OpenVLA's template, "" otherwise); `template` as in `format_instruction`."""
    return ACTION_SEPARATORS.get(TEMPLATES.get(template, template), "")


def kind_probs_mapping(kind_probs: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    """`kind_probs` as {kind: probability} over all of PROMPT_KINDS (in that order).

    Accepts a mapping (kinds it leaves out get 0) or the positional list in PROMPT_KINDS'
    order that configs saved before kind_probs became a mapping hold.
    """
    if isinstance(kind_probs, Mapping) or hasattr(kind_probs, "items"):
        given = {str(k): float(v) for k, v in kind_probs.items()}
        unknown = sorted(set(given) - set(PROMPT_KINDS))
        if unknown:
            raise ValueError(
                f"PromptConfig.kind_probs: unknown prompt kinds {unknown}; use {PROMPT_KINDS}."
            )
    else:
        values = [float(v) for v in kind_probs]
        if len(values) != len(PROMPT_KINDS):
            raise ValueError(
                f"PromptConfig.kind_probs as a list needs {len(PROMPT_KINDS)} entries in the order "
                f"{PROMPT_KINDS}, got {list(kind_probs)}; better give a mapping kind -> probability."
            )
        given = dict(zip(PROMPT_KINDS, values))
    return {k: given.get(k, 0.0) for k in PROMPT_KINDS}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How visual prompts are sampled. `kind_probs`: {kind: probability} (need not sum to 1;
    kinds left out get 0)."""

    max_points: int = 8  # P: fixed number of prompt slots
    kind_probs: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_KIND_PROBS)
    )
    max_positive: int = 3
    max_negative: int = 2
    line_points: int = 5
    box_jitter: float = 0.0  # std of corner noise as a fraction of the box side

    def __post_init__(self):
        object.__setattr__(self, "kind_probs", kind_probs_mapping(self.kind_probs))
        probs = self.kind_probs.values()
        if min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(
                f"PromptConfig.kind_probs must be >= 0 and not all 0: {self.kind_probs}"
            )
        need = max(self.max_positive + self.max_negative, self.line_points, 2)
        if need > self.max_points:
            raise ValueError(
                f"PromptConfig.max_points={self.max_points} is too small: the configured prompts "
                f"need up to {need} slots (max_positive + max_negative, line_points, 2 box corners)."
            )
        if self.max_positive < 1 or self.line_points < 1:
            raise ValueError("PromptConfig: max_positive and line_points must be >= 1.")


def _pixel_to_xy(rows, cols, height: int, width: int) -> np.ndarray:
    return np.stack(
        [(np.asarray(cols) + 0.5) / width, (np.asarray(rows) + 0.5) / height], axis=-1
    ).astype(np.float32)


def empty_prompt(max_points: int, height: int, width: int) -> dict:
    """The "none" prompt: all slots PROMPT_PAD, zero prompt mask."""
    return dict(
        prompt_points=np.zeros((max_points, 2), np.float32),
        prompt_types=np.full((max_points,), PROMPT_PAD, np.int32),
        prompt_mask=np.zeros((height, width), np.float32),
        has_prompt_mask=np.bool_(False),
    )


def _line_through_mask(binary: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n (row, col) mask pixels evenly spaced along a random stroke through the mask."""
    flat = np.flatnonzero(binary)  # = np.nonzero's pixels in the same order, 5x faster
    k = rng.integers(len(flat))
    r0, c0 = np.divmod(flat[k], binary.shape[1])
    r0, c0 = r0 + 0.5, c0 + 0.5
    angle = rng.uniform(0.0, np.pi)
    dr, dc = np.sin(angle), np.cos(angle)
    h, w = binary.shape
    reach = int(np.hypot(h, w)) + 1
    # March in both directions in 1-pixel steps while on the mask: a contiguous run.
    steps = np.arange(-reach, reach + 1, dtype=np.float64)
    rr = np.floor(r0 + steps * dr).astype(np.int64)
    cc = np.floor(c0 + steps * dc).astype(np.int64)
    valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    inside = np.zeros_like(valid)
    inside[valid] = binary[rr[valid], cc[valid]]
    centre = reach  # step 0 is the anchor pixel, inside by construction
    lo = centre
    while lo - 1 >= 0 and inside[lo - 1]:
        lo -= 1
    hi = centre
    while hi + 1 < len(steps) and inside[hi + 1]:
        hi += 1
    picks = np.round(np.linspace(lo, hi, n)).astype(np.int64)
    return np.stack([rr[picks], cc[picks]], axis=-1)


@functools.lru_cache(maxsize=64)
def _kind_cdf(probs: tuple[float, ...]) -> tuple[float, ...]:
    """The cumulative distribution `Generator.choice(n, p=probs / sum)` searches, as floats."""
    p = np.asarray(probs, np.float64)
    cdf = np.cumsum(p / p.sum())
    cdf /= cdf[-1]
    return tuple(cdf.tolist())


def draw_kind(rng: np.random.Generator, kind_probs: Mapping[str, float]) -> str:
    """One of PROMPT_KINDS drawn with `kind_probs` (a PromptConfig's): one rng draw.

    The draw `rng.choice(len(PROMPT_KINDS), p=probs / probs.sum())` makes (one
    `rng.random()` searched in the cumulative distribution), without its per-call set-up.
    """
    cdf = _kind_cdf(tuple(float(kind_probs[k]) for k in PROMPT_KINDS))
    return PROMPT_KINDS[bisect.bisect_right(cdf, rng.random())]


def sample_visual_prompt(
    mask: np.ndarray | None,
    rng: np.random.Generator,
    cfg: PromptConfig = PromptConfig(),
    image_size: tuple[int, int] | None = None,
) -> dict:
    """Samples one visual prompt from an object mask.

    Args:
      mask: [H, W] (bool / uint8 / float; > 0.5 is object) or None when absent.
      rng: numpy Generator.
      cfg: PromptConfig.
      image_size: (H, W) of the zero prompt mask when `mask` is None (default 224 x 224).
    Returns:
      dict(prompt_points float32 [P, 2] (x, y) in [0, 1], prompt_types int32 [P],
           prompt_mask float32 [H, W], has_prompt_mask bool).
    """
    p = cfg.max_points
    if mask is None:
        h, w = image_size or (224, 224)
        return empty_prompt(p, h, w)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"sample_visual_prompt: expected a mask [H, W], got shape {mask.shape}.")
    h, w = mask.shape
    binary = mask > 0.5 if mask.dtype.kind == "f" else mask > 0
    if not binary.any():
        return empty_prompt(p, h, w)
    kind, points, types = sample_prompt_slots(binary, rng, cfg)
    dense = kind == "mask"
    return dict(
        prompt_points=points,
        prompt_types=types,
        prompt_mask=binary.astype(np.float32) if dense else np.zeros((h, w), np.float32),
        has_prompt_mask=np.bool_(dense),
    )


def sample_prompt_slots(
    binary: np.ndarray, rng: np.random.Generator, cfg: PromptConfig
) -> tuple[str, np.ndarray, np.ndarray]:
    """`sample_visual_prompt`'s draws from a non-empty bool mask [H, W], without its dense
    mask: (kind, prompt_points float32 [P, 2], prompt_types int32 [P]).

    For kind "mask" the dense prompt is `binary` itself (the caller holds it: no copy is
    made here); kinds "mask" and "none" leave every slot PROMPT_PAD.
    """
    h, w = binary.shape
    points = np.zeros((cfg.max_points, 2), np.float32)
    types = np.full((cfg.max_points,), PROMPT_PAD, np.int32)
    kind = draw_kind(rng, cfg.kind_probs)
    if kind == "points":
        # Flat indices: np.nonzero's pixels in the same order (the same draws), 5x faster.
        flat = np.flatnonzero(binary)
        n_pos = int(rng.integers(1, cfg.max_positive + 1))
        pick = rng.choice(len(flat), size=n_pos, replace=len(flat) < n_pos)
        points[:n_pos] = _pixel_to_xy(*np.divmod(flat[pick], w), h, w)
        types[:n_pos] = PROMPT_POSITIVE
        n_neg = int(rng.integers(0, cfg.max_negative + 1))
        if n_neg and not binary.all():
            flat = np.flatnonzero(~binary)
            pick = rng.choice(len(flat), size=n_neg, replace=len(flat) < n_neg)
            points[n_pos : n_pos + n_neg] = _pixel_to_xy(*np.divmod(flat[pick], w), h, w)
            types[n_pos : n_pos + n_neg] = PROMPT_NEGATIVE
    elif kind == "line":
        rc = _line_through_mask(binary, rng, cfg.line_points)
        points[: cfg.line_points] = _pixel_to_xy(rc[:, 0], rc[:, 1], h, w)
        types[: cfg.line_points] = PROMPT_LINE
    elif kind == "box":
        rows_any = np.nonzero(binary.any(axis=1))[0]
        cols_any = np.nonzero(binary.any(axis=0))[0]
        x0, x1 = cols_any[0] / w, (cols_any[-1] + 1) / w
        y0, y1 = rows_any[0] / h, (rows_any[-1] + 1) / h
        if cfg.box_jitter > 0:
            bw, bh = x1 - x0, y1 - y0
            nx0, nx1 = np.array([x0, x1]) + rng.normal(0.0, cfg.box_jitter * bw, 2)
            ny0, ny1 = np.array([y0, y1]) + rng.normal(0.0, cfg.box_jitter * bh, 2)
            x0, x1 = sorted((float(np.clip(nx0, 0, 1)), float(np.clip(nx1, 0, 1))))
            y0, y1 = sorted((float(np.clip(ny0, 0, 1)), float(np.clip(ny1, 0, 1))))
        points[0] = (x0, y0)
        points[1] = (x1, y1)
        types[0] = PROMPT_BOX_TOP_LEFT
        types[1] = PROMPT_BOX_BOTTOM_RIGHT
    return kind, points, types


def prompt_kind(prompt: dict) -> str:
    """Which of PROMPT_KINDS a sampled prompt is (for statistics and tests)."""
    types = np.asarray(prompt["prompt_types"])
    if bool(prompt["has_prompt_mask"]):
        return "mask"
    if (types == PROMPT_LINE).any():
        return "line"
    if (types == PROMPT_BOX_TOP_LEFT).any():
        return "box"
    if (types == PROMPT_POSITIVE).any():
        return "points"
    return "none"


def format_instruction(instruction, template: str = PIXELVLA_TEMPLATE) -> str:
    """Fills a prompt template with a task instruction (lower-cased and stripped, as OpenVLA;
    the "pi0" template cleans it as openpi does instead).

    Args:
      instruction: str or bytes (RLDS text comes back as bytes).
      template: a format string with `{instruction}`, or a name in TEMPLATES
        ("pixelvla" = docs/design.md §1.3, "openvla" = the released OpenVLA-7B prompt,
        "pi0" = openpi's π0 prompt).
    """
    if isinstance(instruction, (bytes, bytearray, np.bytes_)):
        instruction = bytes(instruction).decode("utf-8")
    if template in OPENPI_SUFFIXES:  # openpi: strip, "_" and newlines to spaces, case kept
        return TEMPLATES[template].format(
            instruction=str(instruction).strip().replace("_", " ").replace("\n", " ")
        )
    template = TEMPLATES.get(template, template)
    if "{instruction}" not in template:
        raise ValueError(
            f"format_instruction: template {template!r} has no '{{instruction}}' field; use one of"
            f" {sorted(TEMPLATES)} or a format string containing it."
        )
    return template.format(instruction=str(instruction).strip().lower())


# ------------------------------------------------------------------ explicit prompts

# The visual prompts a user can give explicitly (clicks, a stroke, a box) instead of having one
# sampled from a mask; a mask given as a prompt is the "mask" kind, i.e. the target mask itself.
EXPLICIT_PROMPT_KINDS = ("points", "line", "box")


@dataclasses.dataclass(frozen=True)
class VisualPrompt:
    """A visual prompt given explicitly, in this module's coordinates: (x, y) in [0, 1] of the
    frame's width / height (the centre of pixel (r, c) of an H x W frame is
    ((c + 0.5) / W, (r + 0.5) / H); a box corner on a pixel edge is (c / W, r / H)).

    Attributes:
      kind: one of EXPLICIT_PROMPT_KINDS.
      points: float [K, 2]: "points" the clicks; "line" the stroke's vertices (K >= 1, a
        polyline); "box" two opposite corners.
      labels: "points" only: bool [K], True = on the target (positive), False = negative.
    """

    kind: str
    points: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        points = np.asarray(self.points, np.float32)
        if self.kind not in EXPLICIT_PROMPT_KINDS:
            raise ValueError(
                f"VisualPrompt: kind {self.kind!r} is not an explicit prompt kind; use one of "
                f"{EXPLICIT_PROMPT_KINDS} (a mask prompt is given as the target mask)."
            )
        if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
            raise ValueError(f"VisualPrompt: points must be [K >= 1, 2], got {points.shape}.")
        if not np.isfinite(points).all():
            raise ValueError("VisualPrompt: points must be finite.")
        if self.kind == "box" and len(points) != 2:
            raise ValueError(f"VisualPrompt: a box is 2 corners, got {len(points)} points.")
        labels = None
        if self.kind == "points":
            labels = np.ones(len(points), bool) if self.labels is None else self.labels
            labels = np.asarray(labels).astype(bool)
            if labels.shape != (len(points),):
                raise ValueError(
                    f"VisualPrompt: {labels.shape} labels for {len(points)} points; give one each."
                )
            if not labels.any():
                raise ValueError("VisualPrompt: points need at least one positive (label 1).")
        elif self.labels is not None:
            raise ValueError(f"VisualPrompt: labels are for points, not a {self.kind}.")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)


def _resample_polyline(vertices: np.ndarray, n: int) -> np.ndarray:
    """n points evenly spaced by arc length along a polyline (a stroke), ends included."""
    if len(vertices) == 1:
        return np.repeat(vertices, n, axis=0)
    seg = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] == 0:
        return np.repeat(vertices[:1], n, axis=0)
    at = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(at, arc, vertices[:, d]) for d in range(2)], axis=-1)


def explicit_visual_prompt(
    prompt: VisualPrompt, cfg: PromptConfig, image_size: tuple[int, int]
) -> dict:
    """An explicit prompt as the arrays `sample_visual_prompt` returns (same layout, types and
    slot order): points -> positives then negatives; line -> `cfg.line_points` points evenly
    spaced along the stroke (as a sampled line has); box -> top-left, bottom-right corners.

    Coordinates are clipped to [0, 1]. Raises ValueError when the prompt needs more slots than
    `cfg.max_points`.
    """
    out = empty_prompt(cfg.max_points, *image_size)
    pts = np.clip(prompt.points, 0.0, 1.0)
    if prompt.kind == "points":
        order = np.concatenate([np.nonzero(prompt.labels)[0], np.nonzero(~prompt.labels)[0]])
        pts, types = pts[order], np.where(prompt.labels[order], PROMPT_POSITIVE, PROMPT_NEGATIVE)
    elif prompt.kind == "line":
        pts = _resample_polyline(pts, cfg.line_points)
        types = np.full(len(pts), PROMPT_LINE)
    else:
        pts = np.stack([pts.min(axis=0), pts.max(axis=0)])
        types = np.array([PROMPT_BOX_TOP_LEFT, PROMPT_BOX_BOTTOM_RIGHT])
    if len(pts) > cfg.max_points:
        raise ValueError(
            f"a {prompt.kind} prompt of {len(pts)} points does not fit the model's "
            f"max_points={cfg.max_points} prompt slots; give at most {cfg.max_points}."
        )
    out["prompt_points"][: len(pts)] = pts
    out["prompt_types"][: len(pts)] = types
    return out
