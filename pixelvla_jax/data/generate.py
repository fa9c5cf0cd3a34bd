"""Write RLDS datasets in TFDS ArrayRecord format, without TensorFlow.

`write_rlds_dataset` is the reusable writer (tests, the PixelRef environment dataset, LIBERO
replays, the annotation pipeline's output). Images may be given as uint8 arrays (encoded here
with PIL in the feature's format) or as already encoded bytes.

`write_synthetic_dataset` makes tiny datasets in the LIBERO, Bridge or Fractal raw layouts
whose frames show one coloured rectangle on a textured background; the rectangle's mask is
known exactly, so annotation tests can check alignment.

Example:
    path = write_synthetic_dataset(tmp_dir, "libero", num_episodes=3, episode_lengths=[5, 9, 2])
    # -> tmp_dir/synthetic_libero/1.0.0, readable by tfds.builder_from_directory(path)

Datasets generated on first use (`data/generators.py`) go through `write_generated`: written
into a temporary folder `data_dir/.tmp-<name>.<host>.<pid>.<hex>`, completed by the marker
`generator.json` (what they were made from), then renamed to `data_dir/<name>`. So
`data_dir/<name>` exists whole or not at all; one without its marker is reported as
incomplete by `existing_generated`, which also removes the temporary folders of
generations that were killed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import types
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from pixelvla_jax.data import annotations as ann
from pixelvla_jax.errors import PixelVLAError

log = logging.getLogger(__name__)

# The completion marker of a generated dataset, written last: what it was made from.
GENERATOR_FILE = "generator.json"
_TMP_PREFIX = ".tmp-"


class IncompleteDatasetError(PixelVLAError, ValueError):
    """A generated dataset's folder without its completion marker (an interrupted run)."""


def _tmp_prefix(name: str) -> str:
    return f"{_TMP_PREFIX}{name}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_interrupted(data_dir: str | os.PathLike, name: str) -> list[str]:
    """Removes the temporary folders of `name`'s generations killed on this host (their
    process is gone); returns those left alone (live, or another host's), logged."""
    root = epath.Path(data_dir)
    if not root.is_dir():
        return []
    host, kept = socket.gethostname(), []
    for tmp in root.glob(_tmp_prefix(name) + "*"):
        owner_host, _, rest = tmp.name[len(_tmp_prefix(name)) :].rpartition(".")
        owner_host, _, pid = owner_host.rpartition(".")
        if owner_host == host and pid.isdigit() and not _process_alive(int(pid)):
            log.warning("Removing %s, left by an interrupted generation of %r.", tmp, name)
            tmp.rmtree(missing_ok=True)
        else:
            log.warning(
                "%s: a generation of %r by %s (process %s) is running or was interrupted there;"
                " delete it if no process is writing it.",
                tmp,
                name,
                owner_host or "?",
                pid or "?",
            )
            kept.append(os.fspath(tmp))
    return kept


def existing_generated(data_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The marker (`generator.json`) of generated dataset `name` in `data_dir`, or None when
    there is no such dataset. Removes leftovers of killed generations first. Raises
    IncompleteDatasetError when the folder exists without its marker."""
    clean_interrupted(data_dir, name)
    dataset_dir = epath.Path(data_dir) / name
    if not dataset_dir.exists():
        return None
    marker = dataset_dir / GENERATOR_FILE
    problem = None
    if not marker.exists():
        problem = f"has no {GENERATOR_FILE}"
    else:
        try:
            return json.loads(marker.read_text())
        except ValueError as e:
            problem = f"has a damaged {GENERATOR_FILE} ({e})"
    raise IncompleteDatasetError(
        f"Generated dataset {name!r} in {dataset_dir} is incomplete: it {problem}, the marker "
        "written when a generation completes (the run that generated it was interrupted, or "
        "it was made before generated datasets had one). Delete it to regenerate: "
        f"rm -r {dataset_dir} (it is made from seeds: nothing is lost)."
    )


def write_generated(
    data_dir: str | os.PathLike,
    name: str,
    write: Callable[[str], str],
    spec: Mapping[str, Any],
) -> str:
    """Generates dataset `name` into `data_dir` atomically; returns its version directory.

    `write(tmp_data_dir)` writes the dataset as `tmp_data_dir/name/<version>` and returns
    that version directory (e.g. `write_rlds_dataset`). `spec` (JSON) is saved as the
    completion marker `data_dir/name/generator.json`. An exception (or a kill) leaves no
    `data_dir/name`; see `existing_generated` for what the next run finds.
    """
    root = epath.Path(data_dir)
    final = root / name
    if final.exists():
        raise FileExistsError(f"dataset {name!r} already exists in {final}; delete it first")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_tmp_prefix(name)}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        version_dir = epath.Path(write(os.fspath(tmp)))
        (tmp / name / GENERATOR_FILE).write_text(json.dumps(dict(spec), indent=1, sort_keys=True))
        try:
            (tmp / name).rename(final)
        except OSError:
            if not (final / GENERATOR_FILE).exists():  # not another process finishing first
                raise
        return os.fspath(final / version_dir.relative_to(tmp / name))
    finally:
        tmp.rmtree(missing_ok=True)


FORMATS = ("libero", "bridge", "fractal")


def _encode_image(array: np.ndarray, fmt: str | None, jpeg_quality: int = 95) -> bytes:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buf = io.BytesIO()
    if (fmt or "png") == "jpeg":
        Image.fromarray(array).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _encode_images(feature: Any, value: Any, jpeg_quality: int = 95) -> Any:
    """Replaces uint8 arrays given to Image features by encoded bytes (tfds needs TF otherwise)."""
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Image):
        if isinstance(value, np.ndarray):
            return _encode_image(value, feature.encoding_format, jpeg_quality)
        return value
    if isinstance(feature, tfds.features.Dataset):
        return [_encode_images(feature.feature, v, jpeg_quality) for v in value]
    if isinstance(feature, tfds.features.FeaturesDict):
        return {k: _encode_images(feature[k], v, jpeg_quality) for k, v in value.items()}
    return value


def _as_features(features: Any):
    import tensorflow_datasets as tfds

    if isinstance(features, tfds.features.FeatureConnector):
        return features
    return tfds.features.FeaturesDict(features)


def write_rlds_dataset(
    out_dir: str | os.PathLike,
    name: str,
    episodes: Iterable[Mapping[str, Any]],
    features: Any,
    version: str = "1.0.0",
    split: str = "train",
    description: str | None = None,
    jpeg_quality: int = 95,
) -> str:
    """Writes episodes as a TFDS dataset in ArrayRecord format; returns its directory.

    Args:
      out_dir: data dir; the dataset lands in `out_dir/name/version`.
      name: TFDS name (snake_case), also the registry name the step index will look up.
      episodes: dicts {"steps": [step dicts], "episode_metadata": {...}} matching `features`.
      features: a `tfds.features.FeaturesDict` or a nested dict of feature connectors
        (see `rlds_features`).
      jpeg_quality: PIL's JPEG quality for the frames given as arrays to JPEG Image features.
    Returns:
      The version directory (pass it to `StepDataset` / `tfds.builder_from_directory`).
    """
    import tensorflow_datasets as tfds

    feats = _as_features(features)
    final_dir = os.path.join(os.fspath(out_dir), name, version)
    if os.path.exists(os.path.join(final_dir, "dataset_info.json")):
        raise FileExistsError(f"dataset {name!r} already exists in {final_dir}; delete it first")

    def generate():
        for i, episode in enumerate(episodes):
            yield i, _encode_images(feats, dict(episode), jpeg_quality)

    def body(ns):
        ns["code_path"] = None  # no source file lookup (needs importlib_resources otherwise)
        ns["name"] = name
        ns["VERSION"] = tfds.core.Version(version)
        ns["_info"] = lambda self: tfds.core.DatasetInfo(
            builder=self, description=description, features=feats, disable_shuffling=True
        )
        ns["_split_generators"] = lambda self, dl_manager: {split: self._generate_examples()}
        ns["_generate_examples"] = lambda self: generate()

    builder_cls = types.new_class(
        "GeneratedRlds", (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body
    )
    builder = builder_cls(data_dir=os.fspath(out_dir), file_format="array_record")
    builder.download_and_prepare()
    _remove_empty_download_dirs(os.fspath(out_dir))
    return os.fspath(builder.data_dir)


def _remove_empty_download_dirs(data_dir: str) -> None:
    """tfds creates data_dir/downloads/extracted even when nothing is downloaded."""
    for sub in ("downloads/extracted", "downloads"):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(data_dir, sub))


def rlds_features(
    fmt: str,
    image_size: tuple[int, int] = (64, 64),
    with_annotations: bool = False,
    per_step_mask: bool = False,
    wrist: bool = True,
    drop_features: Sequence[str] = (),
    referred_mask: bool = False,
) -> dict[str, Any]:
    """Nested dict of TFDS features of the raw `fmt` layout ("libero", "bridge", "fractal").

    `with_annotations` adds the pixel-annotation features (`annotations.annotation_features`,
    with the per-step mask and the referred-objects mask as asked).

    `drop_features` removes step features by path (e.g. "observation/state"), to make broken
    datasets for error tests.
    """
    import tensorflow_datasets as tfds

    if fmt not in FORMATS:
        raise ValueError(f"unknown RLDS format {fmt!r}; known: {FORMATS}")
    h, w = image_size
    image = lambda: tfds.features.Image(shape=(h, w, 3), encoding_format="jpeg")
    vec = lambda n: tfds.features.Tensor(shape=(n,), dtype=np.float32)
    scalar = lambda dt: tfds.features.Scalar(dtype=dt)
    common = {
        "reward": scalar(np.float32),
        "discount": scalar(np.float32),
        "is_first": scalar(np.bool_),
        "is_last": scalar(np.bool_),
        "is_terminal": scalar(np.bool_),
    }
    if fmt == "libero":
        obs = {"image": image(), "state": vec(8), "joint_state": vec(7)}
        if wrist:
            obs["wrist_image"] = image()
        step = {"observation": obs, "action": vec(7), "language_instruction": tfds.features.Text()}
    elif fmt == "bridge":
        obs = {"image_0": image(), "state": vec(7)}
        step = {"observation": obs, "action": vec(7), "language_instruction": tfds.features.Text()}
    else:
        obs = {
            "image": image(),
            "natural_language_instruction": tfds.features.Text(),
            "base_pose_tool_reached": vec(7),
            "gripper_closed": vec(1),
        }
        step = {
            "observation": obs,
            "action": {
                "world_vector": vec(3),
                "rotation_delta": vec(3),
                "gripper_closedness_action": vec(1),
                "terminate_episode": tfds.features.Tensor(shape=(3,), dtype=np.int32),
            },
        }
    step.update(common)
    metadata: dict[str, Any] = {"file_path": tfds.features.Text()}
    if with_annotations:
        extra = ann.annotation_features(per_step_mask=per_step_mask, referred_mask=referred_mask)
        metadata.update(extra["episode_metadata"])
        obs.update(extra["observation"])
    for path in drop_features:
        _drop(step, path)
    return {"steps": tfds.features.Dataset(step), "episode_metadata": metadata}


def _drop(tree: dict, path: str) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree[p]
    del tree[leaf]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 200 // max(w, 1), yy * 200 // max(h, 1), (xx + yy) * 100 // (h + w)], -1)
    return np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


# (grid cells across the frame, amplitude in grey levels) of `texture`'s octaves: table-
# and wall-sized patches down to per-pixel grain.
_TEXTURE_OCTAVES = ((4, 80.0), (16, 40.0), (64, 24.0), (256, 16.0))


def texture(rng: np.random.Generator, h: int, w: int, mean: np.ndarray) -> np.ndarray:
    """float32 [h, w, 3]: multi-octave value noise around the RGB colour `mean` (a rendered
    scene's materials: smooth patches with fine detail at every scale)."""
    out = np.broadcast_to(np.asarray(mean, np.float32), (h, w, 3)).copy()
    for cells, amplitude in _TEXTURE_OCTAVES:
        grid = rng.integers(0, 256, (min(cells, h), min(cells, w), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
        out += (smooth / 255.0 - 0.5) * amplitude
    return out


def sensor_noise(frame: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """float [h, w, 3] scene -> uint8 frame with independent Gaussian noise per pixel and
    channel (a camera's read noise: what keeps consecutive frames' JPEGs large)."""
    return np.clip(frame + rng.normal(0.0, std, frame.shape), 0, 255).astype(np.uint8)


def object_mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [h, w] mask of the rectangle box = (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def raw_gripper(fmt: str, length: int) -> np.ndarray:
    """float32 [length]: the gripper column of dataset layout `fmt`, closing at length // 2."""
    close_at = length // 2
    if fmt == "libero":  # -1 open, +1 close
        return np.where(np.arange(length) < close_at, -1.0, 1.0).astype(np.float32)
    if fmt == "bridge":  # continuous, 1 open; one in-between value at the transition
        g = np.where(np.arange(length) < close_at, 1.0, 0.0).astype(np.float32)
        if 0 < close_at < length:
            g[close_at - 1] = 0.5
        return g
    g = np.zeros(length, np.float32)  # fractal: relative, +1 = close command
    if 0 < close_at < length:
        g[close_at] = 1.0
    return g


def synthetic_episode(
    fmt: str,
    length: int,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    episode_index: int = 0,
    with_annotations: bool = False,
    per_step_mask: bool = False,
    wrist: bool = True,
    annotated: bool = True,
    mask_size: tuple[int, int] | None = None,
    nan_action_step: int | None = None,
    drop_features: Sequence[str] = (),
    bad_action_value: float = np.nan,
    noise_std: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One raw episode of layout `fmt` and its ground truth.

    The object (a rectangle) moves right by one pixel per step; the episode mask is the
    first frame's, per-step masks follow the object. By default the background is a
    gradient with uniform noise and the object one flat colour. With `noise_std` (the
    LIBERO-like frames of bench/data.py) background and object are `texture`s, and every
    frame of both cameras gets its own `sensor_noise` of that standard deviation: at JPEG
    quality 95 a 256 px frame then takes the bytes of a rendered scene (~30 KB), not the
    few KB of flat colours. Returns (episode, truth) with truth =
    {"masks": uint8 [T, H, W], "box": first-frame box, "actions": raw [T, 7],
    "proprio": [T, P], "instruction": str, "object_name": str, "color": uint8 [3]}.
    """
    h, w = image_size
    bh, bw = max(2, h // 4), max(2, w // 4)
    y0 = int(rng.integers(0, h - bh))
    x0 = int(rng.integers(0, max(1, w - bw - length)))
    color = rng.integers(0, 256, 3).astype(np.uint8)
    colors = ("red", "green", "blue", "yellow")
    object_name = f"{colors[episode_index % len(colors)]} block"
    instruction = f"pick up the {object_name} number {episode_index}"
    actions = rng.uniform(-1, 1, (length, 7)).astype(np.float32)
    actions[:, 6] = raw_gripper(fmt, length)
    if nan_action_step is not None:
        actions[nan_action_step, 0] = bad_action_value
    proprio_dim = {"libero": 8, "bridge": 7, "fractal": 8}[fmt]
    proprio = rng.normal(size=(length, proprio_dim)).astype(np.float32)
    textured = noise_std is not None
    if textured:
        background = texture(rng, h, w, rng.uniform(60, 190, 3))
        wrist_scene = texture(rng, h, w, rng.uniform(60, 190, 3))
        surface = texture(rng, bh, bw, color)
    else:
        background = _background(rng, h, w)
    steps, masks = [], []
    for t in range(length):
        xt = min(x0 + t, w - bw)
        box = (xt, y0, xt + bw, y0 + bh)
        mask = object_mask(h, w, box)
        frame = background.copy()
        if textured:
            frame[y0 : y0 + bh, xt : xt + bw] = surface
            frame = sensor_noise(frame, rng, noise_std)
            wrist_frame = sensor_noise(wrist_scene, rng, noise_std)
        else:
            frame[mask.astype(bool)] = color
            wrist_frame = frame[::-1].copy()
        masks.append(mask)
        flags = {
            "reward": np.float32(t == length - 1),
            "discount": np.float32(1.0),
            "is_first": t == 0,
            "is_last": t == length - 1,
            "is_terminal": t == length - 1,
        }
        if fmt == "libero":
            obs = {"image": frame, "state": proprio[t], "joint_state": np.zeros(7, np.float32)}
            if wrist:
                obs["wrist_image"] = wrist_frame
            step = {"observation": obs, "action": actions[t], "language_instruction": instruction}
        elif fmt == "bridge":
            obs = {"image_0": frame, "state": proprio[t]}
            step = {"observation": obs, "action": actions[t], "language_instruction": instruction}
        else:
            obs = {
                "image": frame,
                "natural_language_instruction": instruction,
                "base_pose_tool_reached": proprio[t, :7],
                "gripper_closed": proprio[t, 7:],
            }
            step = {
                "observation": obs,
                "action": {
                    "world_vector": actions[t, :3],
                    "rotation_delta": actions[t, 3:6],
                    "gripper_closedness_action": actions[t, 6:],
                    "terminate_episode": np.array([0, 1, 0], np.int32),
                },
            }
        if with_annotations and per_step_mask:
            step_mask = mask if annotated else np.zeros_like(mask)
            obs["target_mask"] = ann.encode_mask_png(_resized(step_mask, mask_size))
        step.update(flags)
        for path in drop_features:
            _drop(step, path)
        steps.append(step)
    metadata: dict[str, Any] = {"file_path": f"synthetic/{fmt}/episode_{episode_index}.hdf5"}
    first_box = (x0, y0, x0 + bw, y0 + bh)
    if with_annotations:
        first = masks[0] if annotated else np.zeros_like(masks[0])
        metadata.update(
            target_mask=ann.encode_mask_png(_resized(first, mask_size)),
            target_object=object_name if annotated else "",
            gripper_box=np.array(first_box, np.float32) if annotated else np.zeros(4, np.float32),
            has_annotation=annotated,
        )
    truth = {
        "masks": np.stack(masks),
        "box": first_box,
        "actions": actions,
        "proprio": proprio,
        "instruction": instruction,
        "object_name": object_name,
        "color": color,
    }
    return {"steps": steps, "episode_metadata": metadata}, truth


def _resized(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return mask
    out = np.zeros(size, np.uint8)
    h, w = min(size[0], mask.shape[0]), min(size[1], mask.shape[1])
    out[:h, :w] = mask[:h, :w]
    return out


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    fmt: str = "libero",
    num_episodes: int = 3,
    episode_lengths: int | Sequence[int] = 6,
    image_size: int | tuple[int, int] = 64,
    with_annotations: bool = True,
    per_step_mask: bool = False,
    annotated_episodes: Sequence[int] | None = None,
    name: str | None = None,
    seed: int = 0,
    wrist: bool = True,
    mask_size: tuple[int, int] | None = None,
    nan_action_at: tuple[int, int] | None = None,
    drop_features: Sequence[str] = (),
    bad_action_value: float = np.nan,
    return_truth: bool = False,
    noise_std: float | None = None,
    jpeg_quality: int = 95,
):
    """Writes a tiny synthetic RLDS dataset of layout `fmt`; returns its version directory.

    Args:
      fmt: "libero", "bridge" or "fractal" (raw layout and gripper convention of that dataset).
      episode_lengths: one length for all episodes or one per episode.
      image_size: side or (H, W).
      with_annotations: write the pixel-annotation features (annotations.py).
      per_step_mask: also write observation/target_mask on every step.
      annotated_episodes: indices of episodes that get a mask (default: all); the others are
        written with has_annotation=False and an all-zero mask.
      name: TFDS/registry name (default f"synthetic_{fmt}").
      mask_size: write masks of this (H, W) instead of the image's (error tests).
      nan_action_at: (episode, step) whose action gets `bad_action_value` (NaN; error tests).
      drop_features: step feature paths left out (error tests).
      return_truth: also return the list of per-episode ground truths (`synthetic_episode`).
      noise_std: textured scenes with per-frame sensor noise of this std (grey levels)
        instead of flat colours (`synthetic_episode`).
      jpeg_quality: of the camera frames (`write_rlds_dataset`).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if isinstance(episode_lengths, int):
        episode_lengths = [episode_lengths] * num_episodes
    if len(episode_lengths) != num_episodes:
        raise ValueError(f"{len(episode_lengths)} episode lengths for {num_episodes} episodes")
    rng = np.random.default_rng(seed)
    annotated = set(range(num_episodes) if annotated_episodes is None else annotated_episodes)
    wrist = wrist and fmt == "libero"
    episodes, truths = [], []
    for e, length in enumerate(episode_lengths):
        episode, truth = synthetic_episode(
            fmt,
            int(length),
            image_size,
            rng,
            episode_index=e,
            with_annotations=with_annotations,
            per_step_mask=per_step_mask,
            wrist=wrist,
            annotated=e in annotated,
            mask_size=mask_size,
            nan_action_step=nan_action_at[1] if nan_action_at and nan_action_at[0] == e else None,
            drop_features=drop_features,
            bad_action_value=bad_action_value,
            noise_std=noise_std,
        )
        episodes.append(episode)
        truths.append(truth)
    features = rlds_features(
        fmt,
        image_size,
        with_annotations=with_annotations,
        per_step_mask=per_step_mask,
        wrist=wrist,
        drop_features=drop_features,
    )
    path = write_rlds_dataset(
        out_dir, name or f"synthetic_{fmt}", episodes, features, jpeg_quality=jpeg_quality
    )
    return (path, truths) if return_truth else path
