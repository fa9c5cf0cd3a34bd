"""Frame transforms: decoding, the resize shared by training and evaluation, augmentation.

Decoding, the augmentation's crop and its colour jitter run in OpenCV (`cv2`), faster than
PIL for each (CPU time per 256 px LIBERO-like frame of bench/data.py, this 2-core machine:
JPEG decode 0.46 vs 0.85 ms, crop + resample 0.17 vs 0.54 ms, colour jitter ~0.2 vs 0.35
ms; issue 22): `cv2.imdecode` (libjpeg-turbo, as PIL's: the decoded frames are identical),
one `cv2.warpAffine` from the stored frame straight to the augmented crop, `cv2.LUT` and
`cv2.transform`.

`resize_image` is THE resize: evaluation calls it unchanged on the simulator's frames.
OpenVLA resizes with TensorFlow's `lanczos3` filter with antialiasing; we use PIL's
`LANCZOS` (also a 3-lobe Lanczos filter whose support widens when downscaling, i.e.
antialiased), so a 256 -> 224 resize matches TF to within a few grey levels. It stays in
PIL: OpenCV's Lanczos is not antialiased.

`augment` is OpenVLA's train-time image augmentation (from its RLDS config):
random resized crop (area scale 0.9, aspect ratio 1.0) resized to the output size, then
brightness +-0.2, contrast [0.8, 1.2], saturation [0.8, 1.2], hue +-0.05, each clipped to
[0, 1]. The crop box is drawn relative to the stored frame (the same distribution of boxes
as drawing it in the 224 px resized frame) and resampled once, bilinearly, to the output
size; the same box is applied to the pixel masks (nearest neighbour at the same sample
positions) so masks and image stay aligned pixel for pixel. `center_crop` (what a policy
trained with the crop is evaluated on, as OpenVLA does) resamples its box the same way.

What this resampling changes numerically: bilinear interpolation between the 4 nearest
source pixels (OpenCV's 1/32-pixel fixed-point weights), without widening the filter when
downscaling (as TF's `crop_and_resize` in OpenVLA's augmentation), where PIL's bilinear
widened it (antialiasing). At LIBERO's 256 px frames the 0.9-area crop is downscaled by
0.92 only: on bench/data.py's noisy LIBERO-like frames the output differs from PIL's
bilinear of the same box by 0.43 grey levels on average, and by 1.45 from the older
two-step path (Lanczos 256 -> 224, then PIL's bilinear crop back to 224), same draws. A
frame more than twice the output size is first reduced by an integer factor with
`cv2.INTER_AREA` (an exact box filter), so large frames are not aliased. Samples beyond
the frame's edge (a crop touching it) repeat the edge pixel, as PIL does. The masks'
nearest neighbour takes the source pixel that the image's sample position rounds to.

Colour jitter runs on uint8: brightness and contrast (each clipped to [0, 1]) are one
per-channel lookup table (the contrast mean, per channel after brightness, comes from the
histogram), `cv2.LUT`; saturation and hue are one 3x3 colour matrix in YIQ space (scale
the chroma plane, rotate it by the hue angle; a fast linear approximation of TF's
HSV-space ops), `cv2.transform`, which rounds and clips to [0, 255].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """OpenVLA's train-time augmentation; ranges are those of `image_augment_kwargs`."""

    crop_scale: tuple[float, float] = (0.9, 0.9)  # fraction of the frame's area kept
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio range of the crop
    brightness: float = 0.2  # additive delta in [-b, b] on [0, 1] pixels
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05  # fraction of the hue circle, in [-h, h]
    enabled: bool = True


# ------------------------------------------------------------------ decoding / resizing


def _decode(data: bytes, flags: int) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError(
            f"decode: expected non-empty encoded image bytes (JPEG/PNG), got {type(data).__name__}"
            f" of length {len(data) if hasattr(data, '__len__') else '?'}."
        )
    try:
        out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:
        raise ValueError(f"decode: could not decode {len(data)} bytes as an image: {err}") from err
    if out is None:
        raise ValueError(
            f"decode: could not decode {len(data)} bytes as an image (not a JPEG/PNG, or cut)."
        )
    return out


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 [H, W, 3] RGB (a grey or RGBA image is converted).

    An EXIF orientation tag is ignored, as PIL and TensorFlow's decoders do.
    """
    return _decode(data, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)


def decode_mask(data: bytes) -> np.ndarray:
    """Encoded PNG of a uint8 mask -> float32 [H, W] in {0, 1} (any non-zero pixel is 1)."""
    return decode_binary_mask(data).astype(np.float32)


def decode_binary_mask(data: bytes) -> np.ndarray:
    """Encoded PNG of a mask -> bool [H, W] (any non-zero pixel is True; in a colour PNG,
    any non-zero channel): the pipeline's form, which the crops take without a conversion."""
    mask = _decode(data, cv2.IMREAD_UNCHANGED)
    return (mask[..., :3] != 0).any(axis=-1) if mask.ndim == 3 else mask != 0


def _as_rgb_array(image) -> np.ndarray:
    """uint8 [H, W, 3] array or PIL image -> C-contiguous uint8 [H, W, 3] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got dtype {arr.dtype}.")
    return np.ascontiguousarray(arr)


def resize_image(image, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] (or a PIL image) -> uint8 [size, size, 3], Lanczos, antialiased.

    The same function is used in training and evaluation. A frame that already has the
    target size is returned unchanged.
    """
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.shape[:2] == (size, size) and arr.dtype == np.uint8 and arr.ndim == 3:
            return arr
    pil = image if isinstance(image, Image.Image) else Image.fromarray(_as_rgb_array(image))
    pil = pil if pil.mode == "RGB" else pil.convert("RGB")
    if pil.size == (size, size):
        return np.asarray(pil)
    return np.asarray(pil.resize((size, size), Image.LANCZOS))


def resize_mask(mask, size: int = DEFAULT_IMAGE_SIZE, binary: bool = False) -> np.ndarray:
    """[H, W] mask (bool / uint8 / float) -> float32 [size, size] in {0, 1}, nearest neighbour
    (`binary`: uint8 0 / 1 instead, the pipeline's form; the batch converts it once)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"resize_mask: expected a mask [H, W], got shape {arr.shape}.")
    out = _binary_u8(arr)
    if arr.shape != (size, size):
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.NEAREST))
    return out if binary else out.astype(np.float32)


def mask_centroid(mask: np.ndarray) -> np.ndarray:
    """Non-empty uint8 0 / 1 mask [H, W] -> its centroid (x, y) in [0, 1] of the image,
    float32 [2] (pixel (r, c) covers ((c + 0.5) / W, (r + 0.5) / H)).

    From the column and row sums (`cv2.reduce`: exact integer sums, so the same means as
    over `np.nonzero`'s pixels, at a tenth of the cost).
    """
    h, w = mask.shape
    cols = cv2.reduce(mask, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[0]  # [W]
    rows = cv2.reduce(mask, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[:, 0]  # [H]
    count = int(cols.sum())
    col = cols @ np.arange(w) / count
    row = rows @ np.arange(h) / count
    return np.array([(col + 0.5) / w, (row + 0.5) / h], np.float32)


# ------------------------------------------------------------------ crop + resample


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels of the frame


def _binary_u8(mask) -> np.ndarray:
    """[H, W] mask (bool / uint8 / float; > 0.5 is object) -> uint8 [H, W] of 0 / 1."""
    mask = np.asarray(mask)
    binary = (
        mask if mask.dtype == np.bool_ else (mask > 0.5 if mask.dtype.kind == "f" else mask > 0)
    )
    return np.ascontiguousarray(binary).view(np.uint8)


def _box_transform(box: Box, out_w: int, out_h: int) -> np.ndarray:
    """2x3 map from output pixel (j, i) to its sample position in the frame, in pixel-centre
    coordinates: output pixel centre j + 0.5 lands at x0 + (j + 0.5) * sx, i.e. at column
    x0 + (j + 0.5) * sx - 0.5 (bilinear interpolates there; nearest neighbour takes the
    pixel that position rounds to)."""
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / out_w, (y1 - y0) / out_h
    return np.array(
        [[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]],
        np.float64,
    )


def _resample_box(image: np.ndarray, box: Box, out_size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [out_h, out_w, 3]: the box, bilinear (module docstring)."""
    out_w, out_h = out_size
    x0, y0, x1, y1 = box
    factor = int(min((x1 - x0) / out_w, (y1 - y0) / out_h))
    if factor >= 2:  # integer pre-reduction: an exact box filter against aliasing
        h, w = image.shape[:2]
        reduced = cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        # Keep the box in place: the reduced frame's edges are at w // factor * factor.
        fx, fy = (w // factor) / w, (h // factor) / h
        image, box = reduced, (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
    return cv2.warpAffine(
        image,
        _box_transform(box, out_w, out_h),
        out_size,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _crop_mask(mask, box: Box, out_size: tuple[int, int], binary: bool) -> np.ndarray:
    """[H, W] mask -> float32 [out_h, out_w] in {0, 1} (`binary`: uint8 0 / 1): the source
    pixel nearest to each output pixel's sample position (where `_resample_box` samples)."""
    out = cv2.warpAffine(
        _binary_u8(mask),
        _box_transform(box, *out_size),
        out_size,
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return out if binary else out.astype(np.float32)


def center_crop(
    image, mask=None, scale: float = 0.9, size: int | None = None, binary: bool = False
):
    """Central crop keeping `scale` of the area, resized (evaluation counterpart of `augment`).

    Args:
      image: uint8 [H, W, 3]. mask: optional [H, W]. size: output side (default: keep H x W).
      binary: the mask as uint8 0 / 1 instead of float32 (the pipeline's form).
    Returns:
      uint8 [S, S, 3] (and float32 [S, S] mask when `mask` is given).
    """
    arr = _as_rgb_array(image)
    h, w = arr.shape[:2]
    side = np.sqrt(scale)
    cw, ch = w * side, h * side
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    out_size = (size or w, size or h)
    out = _resample_box(arr, box, out_size)
    if mask is None:
        return out
    return out, _crop_mask(mask, box, out_size, binary)


# ------------------------------------------------------------------ augmentation


def _random_crop_box(rng: np.random.Generator, width: int, height: int, cfg: AugmentConfig) -> Box:
    scale = rng.uniform(*cfg.crop_scale)
    log_lo, log_hi = np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1])
    ratio = float(np.exp(rng.uniform(log_lo, log_hi)))
    # Crop sizes relative to the frame (TF's convention: ratio = w / h in relative units).
    cw = min(1.0, np.sqrt(scale * ratio)) * width
    ch = min(1.0, np.sqrt(scale / ratio)) * height
    x0 = rng.uniform(0.0, width - cw)
    y0 = rng.uniform(0.0, height - ch)
    return (x0, y0, x0 + cw, y0 + ch)


# RGB <-> YIQ (NTSC) matrices, column-vector convention: yiq = _RGB2YIQ @ rgb.
_RGB2YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
_LEVELS = np.arange(256) / 255.0


def _colour_matrix(saturation: float, hue: float) -> np.ndarray:
    """3x3 RGB -> RGB matrix: scale chroma by `saturation`, rotate hue by `hue` turns."""
    theta = 2.0 * np.pi * hue
    c, s = np.cos(theta), np.sin(theta)
    # Hue in HSV increases R -> G -> B, which is a clockwise rotation of the (I, Q) plane.
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
    scale = np.diag([1.0, saturation, saturation])
    return _YIQ2RGB @ scale @ rot @ _RGB2YIQ


def _colour_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: brightness, contrast (each clipped to [0, 1]), then
    saturation + hue (module docstring); four draws, in that order."""
    brightness = rng.uniform(-cfg.brightness, cfg.brightness)
    contrast = rng.uniform(*cfg.contrast)
    saturation = rng.uniform(*cfg.saturation)
    hue = rng.uniform(-cfg.hue, cfg.hue)
    hist = np.concatenate([cv2.calcHist([image], [c], None, [256], [0, 256]) for c in range(3)])
    hist = hist.reshape(3, 256).astype(np.float64)
    bright = np.clip(_LEVELS + brightness, 0.0, 1.0)  # [256]
    mean = hist @ bright / np.maximum(hist.sum(axis=1), 1.0)  # [3]
    lut = np.clip((bright[:, None] - mean[None, :]) * contrast + mean[None, :], 0.0, 1.0)
    lut = np.round(lut * 255.0).astype(np.uint8).reshape(256, 1, 3)  # [level, 1, channel]
    out = cv2.LUT(image, lut)
    return cv2.transform(out, _colour_matrix(saturation, hue).astype(np.float32))


def jitter_colours(image, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()):
    """`augment`'s colour jitter alone (no crop): uint8 [H, W, 3] -> uint8 [H, W, 3].

    For cameras augmented without the crop (openpi's wrist cameras); draws exactly what
    `augment` draws after its crop box. Returns the image unchanged when `cfg` is disabled.
    """
    arr = _as_rgb_array(image)
    if not cfg.enabled:
        return arr
    return _colour_jitter(arr, rng, cfg)


def augment(
    image,
    mask: np.ndarray | Sequence[np.ndarray | None] | None,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    size: int | None = None,
    binary: bool = False,
) -> tuple[np.ndarray, Any]:
    """OpenVLA's train-time augmentation with the same random crop applied to the mask.

    The crop is taken from the given frame and resampled once to `size` (default: the
    frame's own size). Passing the decoded source frame with `size=224` draws the same
    crop boxes, relative to the frame, as `augment(resize_image(frame), ...)`, with one
    resampling instead of two.

    Args:
      image: uint8 [H, W, 3] (or a PIL RGB image). mask: [H, W] (bool / uint8 / float;
        > 0.5 is object), or None; or a list of such masks (each cropped the same way,
        None entries stay None).
      rng: numpy Generator (the pipeline seeds it from (seed, sample index)).
      size: output side S (default: keep H x W).
      binary: masks as uint8 0 / 1 instead of float32 (the pipeline's form: its batch
        converts them to float32 once).
    Returns:
      (uint8 [S, S, 3], float32 [S, S] in {0, 1}, or a list of them, or None).
    """
    arr = _as_rgb_array(image)
    h, w = arr.shape[:2]
    out_size = (size, size) if size else (w, h)
    several = isinstance(mask, (list, tuple))
    masks = list(mask) if several else [mask]
    for m in masks:
        if m is not None and np.shape(m) != (h, w):
            raise ValueError(
                f"augment: mask shape {np.shape(m)} does not match image shape {(h, w, 3)}."
            )
    if not cfg.enabled:
        box = (0.0, 0.0, float(w), float(h))
        out = resize_image(arr, size) if size else arr
    else:
        box = _random_crop_box(rng, w, h, cfg)
        out = _colour_jitter(_resample_box(arr, box, out_size), rng, cfg)
    out_masks = [None if m is None else _crop_mask(m, box, out_size, binary) for m in masks]
    return out, out_masks if several else out_masks[0]
