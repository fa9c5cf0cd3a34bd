"""One client observation (a decoded msgpack dict) -> a checked `Request` for the policy.

The keys (the README's serving section lists them with a client example):

    observation/image         uint8 [H, W, 3], any size: the camera frame (required)
    prompt                    str: the task instruction (required)
    observation/wrist_image   uint8 [H', W', 3], any size: the wrist camera (openpi's LIBERO
                              client sends it); passed to the policy, which uses it when its
                              run trained with a wrist camera and ignores it otherwise
    observation/state         numbers [D]: the raw proprio (LIBERO: eef pos 3, axis-angle 3,
                              gripper qpos 2), checked finite; passed to the policy, which
                              normalises it when its run trained with the state
    observation/target_mask   uint8 / bool [H, W] of the image's size: the target's pixels
                              (nonzero = target) for the pixel-aware encoder
    prompt_kind               one of the metadata's prompt kinds: how the target is given;
                              "points" / "line" / "box" are then sampled from the target mask as
                              in training; default "mask" with a non-empty mask, else "none"
    visual_prompt/points      float [K, 2] (x, y) pixel coordinates of the image, with
    visual_prompt/point_labels  int [K]: 1 = on the target, 0 = not (SAM's convention; default 1)
    visual_prompt/box         float [4] (x0, y0, x1, y1) pixel coordinates
    visual_prompt/line        float [K, 2] (x, y): a stroke's vertices
    visual_prompt/mask        uint8 / bool [H, W]: the "mask" kind (the same as a target mask)
    seed                      int >= 0, or [seed, index]: seeds prompts sampled from the mask
                              as row `index` of `Policy.act(..., seed=seed)` (default 0)

Pixel coordinates follow `data.prompts`: the centre of pixel (row r, col c) is (c + 0.5, r + 0.5)
and the image spans [0, W] x [0, H]. At most one visual prompt key (with its labels). Unknown
keys are ignored (openpi clients of other robots send more). Every check raises RequestError
naming the key, what was received and what is expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pixelvla_jax.data import prompts as prompts_lib

IMAGE = "observation/image"
WRIST_IMAGE = "observation/wrist_image"
STATE = "observation/state"
TARGET_MASK = "observation/target_mask"
INSTRUCTION = "prompt"
PROMPT_KIND = "prompt_kind"
SEED = "seed"
VP_POINTS = "visual_prompt/points"
VP_LABELS = "visual_prompt/point_labels"
VP_BOX = "visual_prompt/box"
VP_LINE = "visual_prompt/line"
VP_MASK = "visual_prompt/mask"
VISUAL_PROMPT_KEYS = (VP_POINTS, VP_BOX, VP_LINE, VP_MASK)
KEYS = (IMAGE, INSTRUCTION, WRIST_IMAGE, STATE, TARGET_MASK, PROMPT_KIND, SEED, VP_POINTS,
        VP_LABELS, VP_BOX, VP_LINE, VP_MASK)  # fmt: skip

MAX_SIDE = 4096  # pixels per image side
MAX_INSTRUCTION_CHARS = 2000


class RequestError(ValueError):
    """An observation the server refuses; the message goes back to the client as is."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked observation: `Policy.example`'s arguments (one row)."""

    image: np.ndarray  # uint8 [H, W, 3]
    instruction: str
    target_mask: np.ndarray | None  # uint8 {0, 1} [H, W]
    prompt_kind: str
    visual_prompt: prompts_lib.VisualPrompt | None
    seed: int
    index: int  # the row index of the prompt rng (seed, index)
    wrist_image: np.ndarray | None = None  # uint8 [H', W', 3]
    state: np.ndarray | None = None  # float32 [D] raw proprio


def _array(obs: Mapping, key: str) -> np.ndarray:
    value = obs[key]
    if isinstance(value, list | tuple | int | float) and not isinstance(value, bool):
        try:
            value = np.asarray(value, np.float64)
        except (TypeError, ValueError) as err:
            raise RequestError(f"{key}: not a numeric array ({err}).") from None
    if not isinstance(value, np.ndarray):
        raise RequestError(
            f"{key}: expected a numpy array (msgpack_numpy), got {type(value).__name__}."
        )
    return value


def _image(obs: Mapping, key: str) -> np.ndarray:
    image = _array(obs, key)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise RequestError(
            f"{key}: expected uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}; send RGB "
            "frames as uint8 (openpi_client.image_tools.convert_to_uint8)."
        )
    h, w = image.shape[:2]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise RequestError(f"{key}: {h}x{w} pixels; each side must be 1..{MAX_SIDE}.")
    return image


def _mask(obs: Mapping, key: str, hw: tuple[int, int]) -> np.ndarray:
    mask = _array(obs, key)
    if mask.dtype not in (np.uint8, np.bool_) or mask.ndim != 2:
        raise RequestError(
            f"{key}: expected uint8 or bool [H, W] (nonzero = target), got {mask.dtype} "
            f"{tuple(mask.shape)}."
        )
    if mask.shape != hw:
        raise RequestError(
            f"{key}: shape {tuple(mask.shape)} does not match {IMAGE}'s {hw}; send the mask "
            "at the image's size."
        )
    return (mask != 0).astype(np.uint8)


def _points(obs: Mapping, key: str, hw: tuple[int, int], shape: str) -> np.ndarray:
    pts = _array(obs, key)
    if pts.dtype.kind not in "iuf":
        raise RequestError(f"{key}: expected numbers, got {pts.dtype}.")
    pts = pts.astype(np.float64)
    if shape == "box":
        if pts.shape != (4,):
            raise RequestError(f"{key}: expected [4] (x0, y0, x1, y1), got {tuple(pts.shape)}.")
        pts = pts.reshape(2, 2)
    elif pts.ndim != 2 or pts.shape[1] != 2 or not 1 <= len(pts) <= 64:
        raise RequestError(f"{key}: expected [K, 2] (x, y) with 1 <= K <= 64, got {pts.shape}.")
    h, w = hw
    if not np.isfinite(pts).all():
        raise RequestError(f"{key}: contains NaN or inf.")
    if (pts < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] > h).any():
        raise RequestError(
            f"{key}: coordinates outside the {w}x{h} image (x in [0, {w}], y in [0, {h}])."
        )
    return (pts / np.array([w, h])).astype(np.float32)


def _seed(obs: Mapping) -> tuple[int, int]:
    value = obs.get(SEED, 0)
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, 0]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(0 <= v < 2**63 for v in value)
    ):
        raise RequestError(f"{SEED}: expected an int >= 0 or [seed, index], got {value!r}.")
    return int(value[0]), int(value[1])


def parse_request(obs: Any, accepted_kinds: Sequence[str]) -> Request:
    """Checks one decoded observation (module docstring) -> Request, else RequestError."""
    if not isinstance(obs, Mapping):
        raise RequestError(
            f"a request must be a msgpack map of observation keys, got {type(obs).__name__}."
        )
    obs = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in obs.items()}
    for key in (IMAGE, INSTRUCTION):
        if key not in obs:
            raise RequestError(
                f"missing key {key!r}: a request needs {IMAGE!r} (uint8 [H, W, 3]) and "
                f"{INSTRUCTION!r} (the task, a str); it has {sorted(map(str, obs))[:12]}."
            )
    image = _image(obs, IMAGE)
    hw = image.shape[:2]
    wrist = _image(obs, WRIST_IMAGE) if WRIST_IMAGE in obs else None
    state = None
    if STATE in obs:
        state = _array(obs, STATE)
        if state.dtype.kind not in "iuf" or state.ndim != 1:
            raise RequestError(f"{STATE}: expected numbers [D], got {state.dtype} {state.shape}.")
        if not np.isfinite(state).all():
            raise RequestError(f"{STATE}: contains NaN or inf: {state.tolist()}.")
        state = state.astype(np.float32)
    text = obs[INSTRUCTION]
    if isinstance(text, bytes | np.bytes_):
        text = bytes(text).decode("utf-8", "replace")
    elif isinstance(text, np.ndarray) and text.dtype.kind in "US" and text.size == 1:
        text = str(text.reshape(()).item())
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{INSTRUCTION}: expected the task as a non-empty str, got {text!r}.")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise RequestError(f"{INSTRUCTION}: {len(text)} characters > {MAX_INSTRUCTION_CHARS}.")
    target = _mask(obs, TARGET_MASK, hw) if TARGET_MASK in obs else None

    given = [k for k in VISUAL_PROMPT_KEYS if k in obs]
    if len(given) > 1:
        raise RequestError(f"give at most one visual prompt, got {given}.")
    if VP_LABELS in obs and VP_POINTS not in obs:
        raise RequestError(f"{VP_LABELS} given without {VP_POINTS}.")
    visual = None
    if given == [VP_MASK]:
        vp_mask = _mask(obs, VP_MASK, hw)
        if target is not None and not np.array_equal(target, vp_mask):
            raise RequestError(
                f"{VP_MASK} and {TARGET_MASK} differ; a mask prompt is the target mask: give one."
            )
        target, given_kind = vp_mask, "mask"
    elif given:
        key = given[0]
        given_kind = {VP_POINTS: "points", VP_BOX: "box", VP_LINE: "line"}[key]
        points = _points(obs, key, hw, given_kind)
        labels = None
        if given_kind == "points":
            labels = np.ones(len(points), bool)
            if VP_LABELS in obs:
                raw = _array(obs, VP_LABELS)
                if raw.shape != (len(points),) or not np.isin(raw, (0, 1)).all():
                    raise RequestError(
                        f"{VP_LABELS}: expected [{len(points)}] of 1 (target) / 0 (not), got "
                        f"{raw.dtype} {tuple(raw.shape)}."
                    )
                labels = raw.astype(bool)
        try:
            visual = prompts_lib.VisualPrompt(given_kind, points, labels)
        except ValueError as err:
            raise RequestError(f"{key}: {err}") from None
    else:
        given_kind = None

    kind = obs.get(PROMPT_KIND)
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    if kind is not None and given_kind is not None and kind != given_kind:
        raise RequestError(
            f"{PROMPT_KIND}={kind!r} contradicts the {given_kind!r} visual prompt given; drop one."
        )
    if kind is None:
        kind = given_kind or ("mask" if target is not None and target.any() else "none")
    if kind not in accepted_kinds:
        raise RequestError(
            f"{PROMPT_KIND}: {kind!r} is not a prompt kind this policy accepts; use one of "
            f"{list(accepted_kinds)}."
        )
    if kind != "none" and visual is None and (target is None or not target.any()):
        raise RequestError(
            f"{PROMPT_KIND}={kind!r} needs a non-empty {TARGET_MASK} (the prompt is derived "
            f"from it), or give the prompt explicitly ({', '.join(VISUAL_PROMPT_KEYS)})."
        )
    seed, index = _seed(obs)
    return Request(image, text, target, kind, visual, seed, index, wrist, state)
