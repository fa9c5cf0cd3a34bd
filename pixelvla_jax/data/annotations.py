"""Pixel-level annotations stored as TFDS features of an RLDS dataset.

An annotated RLDS dataset carries, besides its usual step features:

  episode_metadata/target_mask     Image (PNG, uint8 [H, W, 1]): mask of the target object on
                                   the episode's first frame, same H, W as the camera image;
                                   nonzero = object. All-zero means "no mask".
  episode_metadata/target_object   Text: the object's name ("" if unknown).
  episode_metadata/gripper_box     Tensor float32 [4]: (x0, y0, x1, y1) in pixels of the image,
                                   the gripper-aware region proposal (optional; all-zero = none).
  episode_metadata/has_annotation  Scalar bool: False -> the episode has no usable mask.
  observation/target_mask          Image (PNG, uint8 [H, W, 1]) per step (optional). When present
                                   and nonzero it takes precedence over the episode mask.
  episode_metadata/referred_mask   Image (PNG, uint8 [H, W, 1]), optional: every object the
                                   instruction fits on the first frame (the target and its
                                   look-alikes), the target of the patch-grounding loss; where
                                   absent, the target mask stands in for it.

Episodes without annotations (or datasets without these features at all) stay usable: their
samples get `pixel_mask = b""`. The annotation pipeline and the environment datasets write
these features with `annotation_features()` / `encode_mask_png()` below; the step index reads
them with `read_episode_annotation()`.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

EPISODE_MASK_KEY = "episode_metadata/target_mask"
STEP_MASK_KEY = "observation/target_mask"
OBJECT_NAME_KEY = "episode_metadata/target_object"
GRIPPER_BOX_KEY = "episode_metadata/gripper_box"
HAS_ANNOTATION_KEY = "episode_metadata/has_annotation"
REFERRED_MASK_KEY = "episode_metadata/referred_mask"


def annotation_features(
    per_step_mask: bool = False, referred_mask: bool = False
) -> dict[str, dict[str, Any]]:
    """TFDS feature connectors of the annotation, as {"episode_metadata": {...}, "observation": {...}}.

    Merge them into a dataset's FeaturesDict (see `generate.rlds_features`). Mask images have
    free height/width so that a mask of the wrong size is caught when the index is built.
    """
    import tensorflow_datasets as tfds

    mask = lambda: tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    feats: dict[str, dict[str, Any]] = {
        "episode_metadata": {
            "target_mask": mask(),
            "target_object": tfds.features.Text(),
            "gripper_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "has_annotation": tfds.features.Scalar(dtype=np.bool_),
        },
        "observation": {},
    }
    if per_step_mask:
        feats["observation"]["target_mask"] = mask()
    if referred_mask:
        feats["episode_metadata"]["referred_mask"] = mask()
    return feats


def encode_mask_png(mask: np.ndarray) -> bytes:
    """[H, W] (or [H, W, 1]) mask, nonzero = object -> PNG bytes of a uint8 {0, 255} mask."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W] or [H, W, 1], got shape {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(((mask > 0) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W] mask in {0, 1}."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return (arr > 0).astype(np.uint8)


def encoded_image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of an encoded image, from its header only (no full decode)."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return height, width


@dataclasses.dataclass(frozen=True)
class EpisodeAnnotation:
    """An episode's annotation as read from its episode_metadata.

    mask_png: PNG bytes of the first-frame mask, or b"" when the episode has none.
    object_name: str, "" if none. gripper_box: float32 [4] or None.
    referred_png: PNG bytes of the referred-objects mask, or b"" (none, or not annotated).
    """

    mask_png: bytes
    object_name: str
    gripper_box: np.ndarray | None
    referred_png: bytes = b""


def lookup(tree: dict, path: str) -> Any:
    """tree["a"]["b"] for the feature path "a/b"; KeyError(path) when any part is missing."""
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray) and value.dtype == object:
        return bytes(value.item())
    if isinstance(value, np.ndarray):  # a decoded image; re-encode
        return encode_mask_png(value)
    return bytes(value)


def _as_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def mask_is_empty(mask_png: bytes) -> bool:
    return not mask_png or not decode_mask_png(mask_png).any()


def read_episode_annotation(episode: dict, spec: Any) -> EpisodeAnnotation:
    """The annotation of one raw RLDS episode (dict with "episode_metadata"), per `spec`'s keys.

    Missing annotation features mean "not annotated" (never an error): datasets without
    pixel annotations are read the same way.
    """

    def get(key: str | None) -> Any:
        if not key:
            return None
        try:
            return lookup(episode, key)
        except KeyError:
            return None

    has = get(spec.has_annotation_key)
    mask_value = get(spec.episode_mask_key)
    mask_png = b"" if mask_value is None else _as_bytes(mask_value)
    referred_value = get(spec.referred_mask_key)
    referred_png = b"" if referred_value is None else _as_bytes(referred_value)
    if has is not None and not bool(np.asarray(has)):
        mask_png = referred_png = b""
    if mask_png and mask_is_empty(mask_png):
        mask_png = b""
    if referred_png and mask_is_empty(referred_png):
        referred_png = b""
    name = get(spec.object_name_key)
    box = get(spec.gripper_box_key)
    if box is not None:
        box = np.asarray(box, np.float32).reshape(4)
        if not box.any():
            box = None
    return EpisodeAnnotation(
        mask_png=mask_png,
        object_name="" if name is None else _as_text(name),
        gripper_box=box,
        referred_png=referred_png,
    )
