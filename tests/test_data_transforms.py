"""Frame transforms, normalisation and visual prompts (pure numpy; no datasets needed)."""

import io

import numpy as np
import pytest
from PIL import Image

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import normalization, prompts
from pixelvla_jax.models import observation as obs

SQUARE_COLOUR = np.array([230, 30, 30], np.uint8)


def _scene(size=224, box=(70, 90, 150, 160)):
    """Grey-green noisy background with a red square; returns image and its exact mask."""
    rng = np.random.default_rng(0)
    img = np.zeros((size, size, 3), np.uint8)
    img[...] = (60, 140, 90)
    img = np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    y0, x0, y1, x1 = box
    img[y0:y1, x0:x1] = SQUARE_COLOUR
    mask = np.zeros((size, size), np.float32)
    mask[y0:y1, x0:x1] = 1
    return img, mask


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_decode_and_resize():
    img, mask = _scene(256, box=(64, 64, 192, 128))
    dec = image_lib.decode_image(_encode(img, "PNG"))
    np.testing.assert_array_equal(dec, img)
    out = image_lib.resize_image(dec, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # Lanczos keeps the flat red interior exactly red.
    np.testing.assert_allclose(out[112, 84].astype(int), SQUARE_COLOUR.astype(int), atol=3)
    assert image_lib.resize_image(out, 224) is out  # already at size -> unchanged
    m = image_lib.resize_mask(image_lib.decode_mask(_encode((mask * 255).astype(np.uint8), "PNG")))
    assert m.shape == (224, 224) and m.dtype == np.float32
    assert set(np.unique(m)) == {0.0, 1.0}
    # 256 -> 224 nearest: the box [64, 192) x [64, 128) maps to [56, 168) x [56, 112).
    assert m[56:168, 56:112].all() and m.sum() == pytest.approx(112 * 56, rel=0.03)
    with pytest.raises(ValueError, match="decode"):
        image_lib.decode_image(b"not an image")


def test_augment_keeps_mask_aligned_with_image():
    img, mask = _scene()
    cfg = image_lib.AugmentConfig()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out, out_mask = image_lib.augment(img, mask, rng, cfg)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert out_mask.shape == mask.shape and out_mask.dtype == np.float32
        inside = out_mask > 0.5
        # Crop scale 0.9 keeps ~90% of the area: the square shrinks by <= ~6% per side, grows
        # by up to 1/0.949.
        assert 0.8 * mask.sum() < inside.sum() < 1.25 * mask.sum()
        # Inside the mask (away from its 1-pixel blurred border) the pixels are "the red square":
        # red dominates; outside the mask red never dominates.
        core = inside & np.roll(inside, 2, 0) & np.roll(inside, -2, 0)
        core &= np.roll(inside, 2, 1) & np.roll(inside, -2, 1)
        red = out[..., 0].astype(int) - np.maximum(out[..., 1], out[..., 2]).astype(int)
        assert (red[core] > 60).all(), seed
        # Within 2 pixels of the mask in any direction (diagonals too: a pixel diagonal to
        # the square's corner interpolates between it and the background).
        near = np.zeros_like(inside)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near |= np.roll(inside, (dy, dx), (0, 1))
        assert (red[~near] < 20).all(), seed
        # The blurred border stays within one pixel of the mask's edge.
        assert (red[~inside] < 60).sum() >= (~inside).sum() - 4 * np.sqrt(inside.sum()) * 2


def test_augment_is_deterministic_and_varies():
    img, mask = _scene()
    a = image_lib.augment(img, mask, np.random.default_rng(3))
    b = image_lib.augment(img, mask, np.random.default_rng(3))
    c = image_lib.augment(img, mask, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    out, none_mask = image_lib.augment(img, None, np.random.default_rng(0))
    assert none_mask is None and out.shape == img.shape
    with pytest.raises(ValueError, match="does not match"):
        image_lib.augment(img, mask[:100], np.random.default_rng(0))


def test_colour_jitter_matches_float_reference():
    """With a full-frame crop, augment = TF-style float ops: brightness, contrast, colour matrix."""
    img, _ = _scene()
    cfg = image_lib.AugmentConfig(crop_scale=(1.0, 1.0))
    out, _ = image_lib.augment(img, None, np.random.default_rng(5), cfg)
    rng = np.random.default_rng(5)
    for lo, hi in [(1.0, 1.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)]:  # crop draws
        rng.uniform(lo, hi)
    b = rng.uniform(-0.2, 0.2)
    c = rng.uniform(0.8, 1.2)
    sat = rng.uniform(0.8, 1.2)
    hue = rng.uniform(-0.05, 0.05)
    x = np.clip(img / 255.0 + b, 0, 1)
    m = x.mean((0, 1))
    x = np.clip((x - m) * c + m, 0, 1)
    x = np.clip(x @ image_lib._colour_matrix(sat, hue).T, 0, 1)
    ref = np.round(x * 255)
    assert np.abs(out.astype(float) - ref).max() <= 3


def test_augment_resamples_source_frame_to_size():
    img, mask = _scene(256, box=(64, 64, 192, 128))
    out, m = image_lib.augment(img, mask, np.random.default_rng(0), size=224)
    assert out.shape == (224, 224, 3) and m.shape == (224, 224)
    # Same geometry as resizing first: the object covers ~(56*112)/0.9 pixels.
    assert m.sum() == pytest.approx(112 * 56 / 0.9, rel=0.06)


def test_fused_crop_draws_the_same_relative_boxes_as_resize_then_crop():
    """The crop is drawn in the stored frame's coordinates and resampled once to 224 px; the
    two-step path (resize to 224, crop, resize back) drew it in the resized frame. With the
    same draws both give the same box relative to the frame, over the configured scale and
    aspect-ratio ranges; the pixels differ only by the one resampling saved."""
    cfg = image_lib.AugmentConfig(crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3))
    areas, ratios = [], []
    for seed in range(2000):
        big = np.array(image_lib._random_crop_box(np.random.default_rng(seed), 256, 256, cfg))
        small = np.array(image_lib._random_crop_box(np.random.default_rng(seed), 224, 224, cfg))
        np.testing.assert_allclose(big / 256, small / 224, rtol=1e-12, atol=1e-12)
        x0, y0, x1, y1 = big / 256
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        areas.append((x1 - x0) * (y1 - y0))
        ratios.append((x1 - x0) / (y1 - y0))
    areas, log_ratios = np.array(areas), np.log(ratios)
    # The whole configured range is covered: area fraction = scale in [0.5, 1] (a side wider
    # than the frame is clipped to it, so near scale 1 the area stays below 1) and the
    # aspect ratio spans [3/4, 4/3].
    assert 0.5 <= areas.min() < 0.505 and 0.98 < areas.max() <= 1.0
    assert log_ratios.min() < np.log(3 / 4) + 0.01 and log_ratios.max() > np.log(4 / 3) - 0.01
    assert abs(np.median(log_ratios)) < 0.03  # log-uniform ratio, symmetric about 1

    img, mask = _scene(256, box=(64, 64, 192, 128))
    for seed in range(5):
        fused, fused_mask = image_lib.augment(img, mask, np.random.default_rng(seed), size=224)
        two_step, two_step_mask = image_lib.augment(
            image_lib.resize_image(img, 224),
            image_lib.resize_mask(mask, 224),
            np.random.default_rng(seed),
        )
        diff = np.abs(fused.astype(int) - two_step.astype(int))
        assert diff.mean() < 3.0  # one resampling less: slightly sharper, not another image
        iou = (fused_mask * two_step_mask).sum() / np.maximum(fused_mask, two_step_mask).sum()
        assert iou > 0.97


# Colour jitter off: the output pixels are the resampled frame itself.
_NO_JITTER = dict(brightness=0.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=0.0)
_WIDE = dict(crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3))


def _coordinate_frame(size=256):
    """uint8 [size, size, 3] whose red channel is each pixel's column, green its row."""
    rows, cols = np.mgrid[:size, :size]
    return np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8)


def _sample_positions(box, out=224):
    """The frame positions (pixel-centre coordinates) that output columns / rows sample."""
    x0, y0, x1, y1 = box
    centres = np.arange(out) + 0.5
    return x0 + centres * (x1 - x0) / out - 0.5, y0 + centres * (y1 - y0) / out - 0.5


def _line(x, y):
    """Least-squares (slope, intercept) of y over x."""
    x, y = x.astype(float), y.astype(float)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return slope, y.mean() - slope * x.mean()


def test_crops_cover_the_configured_scale_and_aspect_ratio_ranges_as_before():
    """Statistical, measured on the output pixels: the crop each augmented image shows (read
    back from a frame that encodes its own coordinates) is the box drawn for it, and over
    many draws the crops' area fractions and aspect ratios have the distribution of the
    previous two-step path (boxes drawn in the 224 px resized frame)."""
    cfg = image_lib.AugmentConfig(**_WIDE, **_NO_JITTER)
    frame = _coordinate_frame()
    fit = np.arange(2, 222)  # the outermost columns may sit on the frame's replicated edge
    areas, log_ratios = [], []
    for seed in range(400):
        out, _ = image_lib.augment(frame, None, np.random.default_rng(seed), cfg, size=224)
        # Output column j samples x0 + (j + 0.5) * w / 224 - 0.5: a line in j.
        slope_x, icpt_x = _line(fit, out[0, fit, 0])
        slope_y, icpt_y = _line(fit, out[fit, 0, 1])
        w, h = slope_x * 224 / 256, slope_y * 224 / 256  # crop size, fraction of the frame
        x0, y0 = (icpt_x - 0.5 * slope_x + 0.5) / 256, (icpt_y - 0.5 * slope_y + 0.5) / 256
        drawn = image_lib._random_crop_box(np.random.default_rng(seed), 256, 256, cfg)
        np.testing.assert_allclose([x0, y0, x0 + w, y0 + h], np.array(drawn) / 256, atol=3e-3)
        areas.append(w * h)
        log_ratios.append(np.log(w / h))
    areas, log_ratios = np.array(areas), np.array(log_ratios)
    assert areas.min() < 0.51 and areas.max() > 0.97 and (areas > 0.49).all()
    assert log_ratios.min() < np.log(3 / 4) + 0.02 and log_ratios.max() > np.log(4 / 3) - 0.02

    # Before: the box drawn in the resized 224 px frame (other seeds: independent draws).
    before = [
        np.array(image_lib._random_crop_box(np.random.default_rng(10_000 + k), 224, 224, cfg))
        for k in range(400)
    ]
    before_areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) / 224**2 for b in before])
    before_ratios = np.array([np.log((b[2] - b[0]) / (b[3] - b[1])) for b in before])

    def ks(a, b):  # two-sample Kolmogorov-Smirnov statistic
        grid = np.sort(np.concatenate([a, b]))
        cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
        return np.abs(cdf(a) - cdf(b)).max()

    # 400 vs 400 draws: the 0.1% critical value is 1.95 * sqrt(2 / 400) = 0.138.
    assert ks(areas, before_areas) < 0.138
    assert ks(log_ratios, before_ratios) < 0.138


@pytest.mark.parametrize("jitter", [False, True])
def test_masks_stay_aligned_with_the_image_pixel_for_pixel(jitter):
    """Each output pixel of the image samples the frame at the crop box's position (read
    back from a frame that encodes its coordinates), and each mask pixel is the source
    pixel that position rounds to: a checkerboard mask of 4 px squares comes out exactly,
    so a half-pixel shift between mask and image would fail it. Colour jitter changes no
    mask pixel."""
    cfg = image_lib.AugmentConfig(**_WIDE, **({} if jitter else _NO_JITTER))
    frame = _coordinate_frame()
    rows, cols = np.mgrid[:256, :256]
    checker = ((rows // 4 + cols // 4) % 2).astype(np.float32)
    for seed in range(20):
        out, (mask, inverse, absent) = image_lib.augment(
            frame, [checker, 1.0 - checker, None], np.random.default_rng(seed), cfg, size=224
        )
        box = image_lib._random_crop_box(np.random.default_rng(seed), 256, 256, cfg)
        u, v = _sample_positions(box)
        if not jitter:
            np.testing.assert_allclose(
                out[..., 0], np.clip(u, 0, 255)[None].repeat(224, 0), atol=0.52
            )
            np.testing.assert_allclose(
                out[..., 1], np.clip(v, 0, 255)[:, None].repeat(224, 1), atol=0.52
            )
        expected = checker[np.rint(v).astype(int)[:, None], np.rint(u).astype(int)[None, :]]
        # Positions within 1/100 px of a tie between two pixels may round either way.
        tie = lambda p: np.abs(p - np.floor(p) - 0.5) < 0.01
        clear = ~tie(v)[:, None] & ~tie(u)[None, :]
        np.testing.assert_array_equal(mask[clear], expected[clear])
        np.testing.assert_array_equal(inverse, 1.0 - mask)
        assert absent is None and mask.dtype == np.float32
        assert clear.mean() > 0.5  # most pixels are checked

    # The evaluation crop resamples the same way.
    out, mask = image_lib.center_crop(frame, checker, 0.9, size=224)
    side = np.sqrt(0.9) * 256
    u, v = _sample_positions(
        ((256 - side) / 2, (256 - side) / 2, (256 + side) / 2, (256 + side) / 2)
    )
    np.testing.assert_allclose(out[..., 0], u[None].repeat(224, 0), atol=0.52)
    expected = checker[np.rint(v).astype(int)[:, None], np.rint(u).astype(int)[None, :]]
    np.testing.assert_array_equal(mask, expected)


def test_large_frames_are_reduced_before_the_crop_without_aliasing():
    """A frame over twice the output size is box-filtered first: a 1 px black-and-white
    checkerboard becomes flat grey, not the moire of sampling it bilinearly."""
    rows, cols = np.mgrid[:480, :640]
    frame = (((rows + cols) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    cfg = image_lib.AugmentConfig(**_NO_JITTER)
    out, _ = image_lib.augment(frame, None, np.random.default_rng(0), cfg, size=112)
    assert out.shape == (112, 112, 3)
    assert np.abs(out.astype(float) - 127.5).max() < 40


def test_decode_equals_pil_on_jpeg_and_png():
    """OpenCV decodes the same pixels as PIL (both libjpeg-turbo; PNG is lossless)."""
    img, _ = _scene(256)
    for fmt in ("JPEG", "PNG"):
        data = _encode(img, fmt)
        ours = image_lib.decode_image(data)
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert ours.dtype == np.uint8 and ours.shape == (256, 256, 3)
        assert np.abs(ours.astype(int) - pil).max() <= 1, fmt
    grey = _encode(img[..., 0], "PNG")  # a grey frame decodes to three equal channels
    np.testing.assert_array_equal(image_lib.decode_image(grey), img[..., :1].repeat(3, -1))


def test_center_crop_matches_crop_geometry():
    img, mask = _scene()
    out, m = image_lib.center_crop(img, mask, scale=0.9)
    assert out.shape == img.shape and m.shape == mask.shape
    side = np.sqrt(0.9)
    assert m.sum() == pytest.approx(mask.sum() / side**2, rel=0.05)


STATS = {
    "action": {
        "q01": [-1.0, -2.0, 0.0, -0.5, -0.5, -0.5, 0.0],
        "q99": [1.0, 2.0, 4.0, 0.5, 0.5, 0.5, 1.0],
        "mask": [True] * 6 + [False],
    },
    "proprio": {"q01": [0.0, -1.0], "q99": [2.0, 1.0]},
}


def test_normalize_round_trip_and_mask():
    rng = np.random.default_rng(0)
    q01 = np.array(STATS["action"]["q01"])
    q99 = np.array(STATS["action"]["q99"])
    raw = rng.uniform(q01, q99, (5, 8, 7)).astype(np.float32)
    raw[..., 6] = rng.uniform(-3, 3, (5, 8))  # gripper: arbitrary values, untouched
    normed = normalization.normalize_bounds_q99(raw, STATS["action"])
    assert normed.shape == raw.shape and normed.dtype == np.float32
    assert np.abs(normed[..., :6]).max() <= 1.0
    np.testing.assert_array_equal(normed[..., 6], raw[..., 6])
    np.testing.assert_allclose(normed[0, 0, 0], 2 * (raw[0, 0, 0] + 1) / 2 - 1, atol=1e-6)
    back = normalization.unnormalize_bounds_q99(normed, STATS["action"])
    np.testing.assert_allclose(back, raw, atol=1e-5)
    # Out-of-range values are clipped to [-1, 1].
    far = normalization.normalize_bounds_q99(np.full((7,), 100.0), STATS["action"])
    np.testing.assert_array_equal(far[:6], 1.0)
    assert far[6] == 100.0
    # jax arrays stay jax arrays.
    import jax.numpy as jnp

    j = normalization.unnormalize_bounds_q99(jnp.asarray(normed), STATS["action"])
    np.testing.assert_allclose(np.asarray(j), raw, atol=1e-5)
    with pytest.raises(ValueError, match="last dim 3"):
        normalization.normalize_bounds_q99(np.zeros((3,)), STATS["action"])
    a, p = normalization.normalize_sample(raw[0], np.array([1.0, 0.0]), STATS)
    np.testing.assert_allclose(p, [0.0, 0.0], atol=1e-6)
    _, empty = normalization.normalize_sample(raw[0], np.zeros((0,)), STATS)
    assert empty.shape == (0,)


def test_gripper_conventions():
    libero = np.array([-1.0, 1.0, 0.0])
    np.testing.assert_allclose(normalization.libero_gripper_to_open01(libero), [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(
        normalization.open01_to_libero_gripper(np.array([1.0, 0.9, 0.2, 0.0])), [-1, -1, 1, 1]
    )
    np.testing.assert_array_equal(normalization.binarize_gripper(np.array([0.2, 0.7])), [0, 1])


# ------------------------------------------------------------------ visual prompts


def _blob_mask(h=96, w=128):
    yy, xx = np.mgrid[:h, :w]
    m = ((yy - 40) ** 2 / 400 + (xx - 70) ** 2 / 900 <= 1).astype(np.float32)
    m[60:70, 10:30] = 1  # a second, disjoint component
    return m


def _kind_cfg(kind, **kw):
    return prompts.PromptConfig(kind_probs={kind: 1.0}, **kw)


def _pixels(points, h, w):
    cols = np.floor(points[:, 0] * w).astype(int)
    rows = np.floor(points[:, 1] * h).astype(int)
    return rows, cols


def test_prompt_points_inside_and_outside():
    mask = _blob_mask()
    h, w = mask.shape
    cfg = _kind_cfg("points", max_points=8, max_positive=3, max_negative=2)
    for seed in range(50):
        out = prompts.sample_visual_prompt(mask, np.random.default_rng(seed), cfg)
        pts, types = out["prompt_points"], out["prompt_types"]
        assert pts.shape == (8, 2) and pts.dtype == np.float32 and types.dtype == np.int32
        assert out["prompt_mask"].shape == (h, w) and not out["has_prompt_mask"]
        pos, neg = types == obs.PROMPT_POSITIVE, types == obs.PROMPT_NEGATIVE
        assert 1 <= pos.sum() <= 3 and neg.sum() <= 2
        rows, cols = _pixels(pts, h, w)
        assert mask[rows[pos], cols[pos]].all()
        assert not mask[rows[neg], cols[neg]].any()
        pad = types == obs.PROMPT_PAD
        assert pad.sum() == 8 - pos.sum() - neg.sum()
        np.testing.assert_array_equal(pts[pad], 0.0)
        # Padding comes after the real prompts.
        assert not pad[: (~pad).sum()].any()


def test_prompt_line_points_inside():
    mask = _blob_mask()
    h, w = mask.shape
    cfg = _kind_cfg("line", line_points=5)
    for seed in range(50):
        out = prompts.sample_visual_prompt(mask, np.random.default_rng(seed), cfg)
        types = out["prompt_types"]
        line = types == obs.PROMPT_LINE
        assert line.sum() == 5 and (types[~line] == obs.PROMPT_PAD).all()
        rows, cols = _pixels(out["prompt_points"][line], h, w)
        assert mask[rows, cols].all(), seed
        # Points are collinear and ordered along the stroke.
        p = out["prompt_points"][line] * [w, h]
        d = p[-1] - p[0]
        if np.linalg.norm(d) > 3:
            cross = np.abs(d[0] * (p[:, 1] - p[0, 1]) - d[1] * (p[:, 0] - p[0, 0]))
            assert (cross / np.linalg.norm(d) < 1.5).all()


def test_prompt_box_bounds_mask_and_mask_prompt():
    mask = _blob_mask()
    h, w = mask.shape
    out = prompts.sample_visual_prompt(mask, np.random.default_rng(0), _kind_cfg("box"))
    types, pts = out["prompt_types"], out["prompt_points"]
    assert types[0] == obs.PROMPT_BOX_TOP_LEFT and types[1] == obs.PROMPT_BOX_BOTTOM_RIGHT
    assert (types[2:] == obs.PROMPT_PAD).all()
    rows, cols = np.nonzero(mask)
    np.testing.assert_allclose(pts[0], [cols.min() / w, rows.min() / h], atol=1e-6)
    np.testing.assert_allclose(pts[1], [(cols.max() + 1) / w, (rows.max() + 1) / h], atol=1e-6)

    out = prompts.sample_visual_prompt(mask, np.random.default_rng(0), _kind_cfg("mask"))
    assert out["has_prompt_mask"] and (out["prompt_types"] == obs.PROMPT_PAD).all()
    np.testing.assert_array_equal(out["prompt_mask"], mask)


def test_prompt_absent_mask_and_probabilities():
    cfg = prompts.PromptConfig(
        kind_probs={"points": 0.4, "line": 0.1, "box": 0.2, "mask": 0.1, "none": 0.2}
    )
    for m in (None, np.zeros((32, 32), np.float32)):
        out = prompts.sample_visual_prompt(m, np.random.default_rng(0), cfg, image_size=(32, 32))
        assert prompts.prompt_kind(out) == "none" and out["prompt_mask"].shape == (32, 32)
        assert (out["prompt_types"] == obs.PROMPT_PAD).all() and not out["has_prompt_mask"]
    mask = _blob_mask()
    rng = np.random.default_rng(1)
    n = 2000
    kinds = [prompts.prompt_kind(prompts.sample_visual_prompt(mask, rng, cfg)) for _ in range(n)]
    for kind, p in cfg.kind_probs.items():
        assert abs(kinds.count(kind) / n - p) < 0.04, (kind, kinds.count(kind) / n)
    with pytest.raises(ValueError, match="max_points"):
        prompts.PromptConfig(max_points=4, line_points=5)


def test_draw_kind_is_generator_choice_without_its_set_up():
    """`draw_kind` makes exactly numpy's `Generator.choice(n, p=...)` draw (one random()
    searched in the same cumulative distribution): same kinds, same generator state after."""
    for probs in (
        prompts.DEFAULT_KIND_PROBS,
        {"points": 0.1, "line": 0.0, "box": 0.5, "mask": 0.0, "none": 0.4},
        {"line": 3.0},
    ):
        kind_probs = prompts.kind_probs_mapping(probs)
        p = np.asarray([kind_probs[k] for k in prompts.PROMPT_KINDS])
        for seed in range(300):
            ours, numpy = np.random.default_rng(seed), np.random.default_rng(seed)
            want = prompts.PROMPT_KINDS[numpy.choice(len(p), p=p / p.sum())]
            assert prompts.draw_kind(ours, kind_probs) == want
            assert ours.random() == numpy.random()


def test_mask_centroid_is_the_mean_of_the_mask_pixels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((48, 64)) < rng.uniform(0.01, 0.5)).astype(np.uint8)
        rows, cols = np.nonzero(mask)
        want = [(cols.mean() + 0.5) / 64, (rows.mean() + 0.5) / 48]
        got = image_lib.mask_centroid(mask)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_kind_probs_mapping_and_the_positional_form_of_older_configs():
    # Kinds left out get 0; the stored mapping lists every kind in PROMPT_KINDS' order.
    cfg = prompts.PromptConfig(kind_probs={"box": 2.0})
    assert list(cfg.kind_probs) == list(prompts.PROMPT_KINDS)
    assert cfg.kind_probs == {"points": 0.0, "line": 0.0, "box": 2.0, "mask": 0.0, "none": 0.0}
    # Configs saved before kind_probs became a mapping hold a list in PROMPT_KINDS' order.
    legacy = prompts.PromptConfig(kind_probs=[0.25, 0.2, 0.2, 0.15, 0.2])
    assert legacy == prompts.PromptConfig()
    assert legacy.kind_probs == prompts.DEFAULT_KIND_PROBS
    # Same probabilities, same draws: the list and the mapping sample the same prompts.
    mask = _blob_mask()
    for seed in range(20):
        a = prompts.sample_visual_prompt(mask, np.random.default_rng(seed), legacy)
        b = prompts.sample_visual_prompt(
            mask,
            np.random.default_rng(seed),
            prompts.PromptConfig(
                kind_probs=dict(reversed(list(prompts.DEFAULT_KIND_PROBS.items())))
            ),
        )
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="unknown prompt kinds"):
        prompts.PromptConfig(kind_probs={"scribble": 1.0})
    with pytest.raises(ValueError, match="5 entries"):
        prompts.PromptConfig(kind_probs=[1.0, 0.0])
    with pytest.raises(ValueError, match="not all 0"):
        prompts.PromptConfig(kind_probs={"none": 0.0})


def test_format_instruction():
    text = prompts.format_instruction(b"Put the Bowl on the plate ", "pixelvla")
    assert text == (
        "In: What should the robot do to put the bowl on the plate, refer to <pixel> <prompt>?\nOut:"
    )
    assert prompts.format_instruction("Open the drawer", "openvla") == (
        "In: What action should the robot take to open the drawer?\nOut:"
    )
    with pytest.raises(ValueError, match="instruction"):
        prompts.format_instruction("x", "no field here")
