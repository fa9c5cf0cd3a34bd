"""Random access to raw TFDS RLDS datasets stored as ArrayRecord (no TensorFlow needed).

One ArrayRecord record is one whole episode, so reading a step through this module parses
its whole episode. Training reads through the step-level cache (`step_index.py`), which is
built once from these episodes.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any

import numpy as np

_PROBE_BYTES = 1 << 16
CONVERT_COMMAND = "python -m pixelvla_jax.data.convert --dataset_dir={dir}"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset directory (or a TFDS dataset inside it) does not exist."""


class DatasetFormatError(ValueError):
    """The dataset is stored in a format without random access (TFRecord)."""


class MissingFeatureError(KeyError):
    """A feature the dataset's spec needs is not in an episode or step."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class InvalidDataError(ValueError):
    """Episode data that cannot be used (NaN/inf actions, mask/image shape mismatch)."""


def _prepare_hint(directory: str) -> str:
    return (
        "Prepare the data: download the RLDS dataset (TFDS format) into that directory; if it is "
        "in TFRecord format convert it with `"
        + CONVERT_COMMAND.format(dir=directory)
        + "`; or write a synthetic one with pixelvla_jax.data.generate.write_synthetic_dataset."
    )


def resolve_version_dir(dataset_dir: str | os.PathLike) -> str:
    """The folder holding dataset_info.json: `dataset_dir` itself or its newest version subdir."""
    directory = os.path.abspath(os.fspath(dataset_dir))
    if not os.path.isdir(directory):
        raise DatasetNotFoundError(
            f"dataset directory {directory} does not exist. " + _prepare_hint(directory)
        )
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return directory
    candidates = glob.glob(os.path.join(directory, "*", "dataset_info.json"))
    candidates += glob.glob(os.path.join(directory, "*", "*", "dataset_info.json"))
    if not candidates:
        raise DatasetNotFoundError(
            f"no TFDS dataset in {directory} (no dataset_info.json in it or in its version "
            "subfolders). " + _prepare_hint(directory)
        )

    def version_key(path: str):
        parts = os.path.basename(os.path.dirname(path)).split(".")
        return tuple(int(p) if p.isdigit() else -1 for p in parts)

    return os.path.dirname(max(candidates, key=version_key))


def read_dataset_info(version_dir: str) -> dict[str, Any]:
    with open(os.path.join(version_dir, "dataset_info.json")) as f:
        return json.load(f)


def check_random_access(version_dir: str) -> None:
    """Raises DatasetFormatError unless the dataset has ArrayRecord files."""
    info = read_dataset_info(version_dir)
    formats = [info.get("fileFormat") or "tfrecord"] + list(info.get("alternativeFileFormats", []))
    has_array_record = bool(glob.glob(os.path.join(version_dir, "*.array_record*")))
    if "array_record" in formats and has_array_record:
        return
    tfrecords = glob.glob(os.path.join(version_dir, "*.tfrecord*"))
    found = f"TFRecord files ({len(tfrecords)})" if tfrecords else f"file format {formats[0]!r}"
    raise DatasetFormatError(
        f"dataset {info.get('name', '?')!r} in {version_dir} is stored as {found}; random access "
        "needs ArrayRecord. Convert it once (needs TensorFlow, the `convert` extra): `"
        + CONVERT_COMMAND.format(dir=version_dir)
        + "`"
    )


def source_fingerprint(version_dir: str, split: str = "train") -> str:
    """Hash of a dataset's identity: its metadata files, its data files' names and sizes and
    their first and last 64 KiB (cheap, and independent of file copies' timestamps)."""
    h = hashlib.sha256(split.encode())
    for meta in ("dataset_info.json", "features.json"):
        path = os.path.join(version_dir, meta)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    for path in sorted(glob.glob(os.path.join(version_dir, f"*-{split}.array_record*"))):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        # Head and tail (ArrayRecord keeps its chunk index at the end): a rewritten shard
        # of the same size still changes the key, without reading whole shards.
        with open(path, "rb") as f:
            h.update(f.read(_PROBE_BYTES))
            f.seek(max(0, size - _PROBE_BYTES))
            h.update(f.read(_PROBE_BYTES))
    return h.hexdigest()[:16]


def _skip_image_decoding(feature: Any) -> Any:
    """Decoders dict keeping every Image feature as encoded bytes."""
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Image):
        return tfds.decode.SkipDecoding()
    if isinstance(feature, tfds.features.Dataset):
        return _skip_image_decoding(feature.feature)
    if isinstance(feature, tfds.features.FeaturesDict):
        out = {k: _skip_image_decoding(v) for k, v in feature.items()}
        out = {k: v for k, v in out.items() if v is not None}
        return out or None
    return None


@dataclasses.dataclass
class RldsSource:
    """An opened RLDS dataset: `episodes[i]` -> {"steps": sequence of step dicts, "episode_metadata"}.

    Images stay encoded bytes; text comes back as bytes.
    """

    name: str
    version_dir: str
    split: str
    episodes: Any

    def __len__(self) -> int:
        return len(self.episodes)


def open_rlds(dataset_dir: str | os.PathLike, split: str = "train") -> RldsSource:
    """Opens an ArrayRecord RLDS dataset for random access to its episodes."""
    import tensorflow_datasets as tfds

    version_dir = resolve_version_dir(dataset_dir)
    check_random_access(version_dir)
    builder = tfds.builder_from_directory(version_dir)
    if split not in builder.info.splits:
        raise DatasetNotFoundError(
            f"dataset {builder.info.name!r} in {version_dir} has no split {split!r}; "
            f"splits: {list(builder.info.splits)}"
        )
    decoders = _skip_image_decoding(builder.info.features)
    source = builder.as_data_source(split, decoders=decoders, file_format="array_record")
    return RldsSource(name=builder.info.name, version_dir=version_dir, split=split, episodes=source)


def get_feature(
    tree: dict, path: str, *, dataset: str, episode: int | str, step: int | None = None
):
    """tree["a"]["b"] for path "a/b"; a missing key names dataset, episode, step and feature."""
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            where = f"episode {episode}" + ("" if step is None else f", step {step}")
            available = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise MissingFeatureError(
                f"dataset {dataset!r}, {where}: missing feature {path!r} (no {part!r}; available "
                f"there: {available}). Check the dataset's DatasetSpec in pixelvla_jax/data/registry.py."
            )
        node = node[part]
    return node


def as_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_bytes(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        value = value.item()
    return bytes(value)
