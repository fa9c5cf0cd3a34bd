"""Step-level cache of an RLDS dataset, and `StepDataset`, the random-access sample source.

In a TFDS ArrayRecord RLDS dataset one record is a whole episode, so reading one step parses
every frame of its episode. This module flattens a dataset ONCE into a layout where reading
a sample costs the same whatever the episode length:

  <cache>/<name>-<key>/
    frames.array_record          one record per step: its encoded image, wrist image and
                                 per-step mask (group_size 1: a read decompresses one record)
    episode_masks.array_record   one record per episode: PNG of the first-frame mask or b""
    actions.npy      float32 [N, A]  standardised actions of all steps (episodes concatenated)
    proprio.npy      float32 [N, P]  raw proprio (P may be 0)
    episode_starts.npy int64 [E], episode_lengths.npy int64 [E], instruction_ids.npy int32 [E],
    step_episode.npy int32 [N], gripper_boxes.npy float32 [E, 4] (NaN = none)
    metadata.json    dataset name, spec, source dir and hash, instructions, object names,
                     episode ids (file paths), source episode indices

`key` hashes the source (metadata files, data file names and sizes), the split and the
DatasetSpec, so a changed dataset or standardisation gets a new cache. The default cache root
is `<dataset_dir>/../pixelvla_cache`. The cache is written to a temporary folder and renamed
into place, so readers never see a half-written cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import threading
import uuid
from typing import Any

import numpy as np

from pixelvla_jax import paths
from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data import rlds
from pixelvla_jax.data.registry import DatasetSpec, get_spec
from pixelvla_jax.data.trajectory import chunk_actions, standardize_gripper

INDEX_FORMAT_VERSION = 2  # 2: referred_masks.array_record
_RECORD_MAGIC = b"PVS1"
_NUM_BLOBS = 3  # image, wrist image, per-step mask


def pack_step_record(image: bytes, wrist_image: bytes, mask: bytes) -> bytes:
    blobs = (image, wrist_image, mask)
    return _RECORD_MAGIC + struct.pack("<3I", *map(len, blobs)) + b"".join(blobs)


def unpack_step_record(record: bytes) -> tuple[bytes, bytes, bytes]:
    """The blobs of a `pack_step_record` record; ValueError for bytes that are not one."""
    header = 4 + 4 * _NUM_BLOBS
    if record[:4] != _RECORD_MAGIC or len(record) < header:
        raise ValueError("not a pixelvla step record (bad magic)")
    sizes = struct.unpack_from("<3I", record, 4)
    if header + sum(sizes) != len(record):
        raise ValueError(f"a step record of {len(record)} bytes announcing {header + sum(sizes)}")
    out, offset = [], 4 + 4 * _NUM_BLOBS
    for size in sizes:
        out.append(bytes(record[offset : offset + size]))
        offset += size
    return out[0], out[1], out[2]


def damaged_cache_error(path: str, dataset: str, problem: str) -> rlds.CorruptDataError:
    """The error for a damaged file of a step-index cache: say which, and that deleting the
    cache folder rebuilds it from the dataset."""
    return rlds.CorruptDataError(
        f"dataset {dataset!r}: the step-index cache file {path} {problem}. The cache is "
        f"truncated or corrupted (a full disk, an interrupted copy); delete "
        f"{os.path.dirname(path)} and the next run rebuilds it from the dataset "
        "(or pass rebuild=True)."
    )


class RecordFile:
    """Lazily opened ArrayRecord file for random access; counts records read (`num_reads`).

    Picklable (the reader is reopened in the new process), thread-safe. A read that fails
    raises CorruptDataError naming the file and `dataset`.
    """

    def __init__(self, path: str, dataset: str = "?"):
        self.path = path
        self.dataset = dataset
        self.num_reads = 0
        self._reader = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"path": self.path, "dataset": self.dataset, "num_reads": 0}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("dataset", "?"))

    def _open(self):
        from array_record.python.array_record_module import ArrayRecordReader

        if self._reader is None:
            try:
                self._reader = ArrayRecordReader(self.path, "readahead_buffer_size:0")
            except Exception as e:  # riegeli's RuntimeError / ValueError
                raise self.damaged(f"cannot be opened ({rlds.describe_exception(e)})") from e
        return self._reader

    def damaged(self, problem: str) -> rlds.CorruptDataError:
        return damaged_cache_error(self.path, self.dataset, problem)

    def __len__(self) -> int:
        with self._lock:
            return self._open().num_records()

    def read(self, i: int) -> bytes:
        with self._lock:
            self.num_reads += 1
            reader = self._open()
            try:
                return reader.read([int(i)])[0]
            except Exception as e:
                problem = f"record {i} cannot be read ({rlds.describe_exception(e)})"
                raise self.damaged(problem) from e


def _write_records(path: str, records) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()


def index_key(version_dir: str, spec: DatasetSpec, split: str) -> str:
    blob = (
        f"{INDEX_FORMAT_VERSION}:{rlds.source_fingerprint(version_dir, split)}:{spec.fingerprint()}"
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root(dataset_dir: str | os.PathLike) -> str:
    """`<dataset_dir>/../pixelvla_cache`; for a dataset at a URL (gs://...), a local folder
    (`~/.cache/pixelvla_cache/<host>/<path>`): the cache is read at random, record by record."""
    directory = paths.absolute(dataset_dir)
    if paths.is_url(directory):
        scheme, _, rest = paths.parent(directory).partition("://")
        return os.path.join(os.path.expanduser("~/.cache/pixelvla_cache"), scheme, rest)
    return os.path.join(paths.parent(directory), "pixelvla_cache")


def _concat_features(step: dict, keys, *, dataset: str, episode: Any, t: int) -> np.ndarray:
    parts = [
        np.asarray(
            rlds.get_feature(step, k, dataset=dataset, episode=episode, step=t), np.float32
        ).ravel()
        for k in keys
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _optional_bytes(step: dict, key: str | None) -> bytes:
    if not key:
        return b""
    try:
        value = ann.lookup(step, key)
    except KeyError:
        return b""
    return rlds.as_bytes(value)


class _Builder:
    """Reads every episode once and writes the step-level cache into `out_dir`."""

    def __init__(self, source: rlds.RldsSource, spec: DatasetSpec):
        self.source, self.spec = source, spec
        self.dataset = spec.name
        self.actions: list[np.ndarray] = []
        self.proprio: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.instructions: list[str] = []
        self.instruction_ids: list[int] = []
        self.object_names: list[str] = []
        self.episode_ids: list[str] = []
        self.source_indices: list[int] = []
        self.gripper_boxes: list[np.ndarray] = []
        self.episode_masks: list[bytes] = []
        self.referred_masks: list[bytes] = []
        self.num_empty_episodes = 0

    def _episode_id(self, episode: dict, e: int) -> str:
        if self.spec.episode_id_key:
            try:
                return rlds.as_text(ann.lookup(episode, self.spec.episode_id_key))
            except KeyError:
                pass
        return f"episode_{e}"

    def _check_mask(self, mask: bytes, image: bytes, feature: str, where: str) -> None:
        mask_hw, image_hw = ann.encoded_image_size(mask), ann.encoded_image_size(image)
        if mask_hw != image_hw:
            raise rlds.InvalidDataError(
                f"dataset {self.dataset!r}, {where}: mask feature {feature!r} has shape "
                f"{mask_hw} (H, W) but the image {self.spec.image_key!r} is {image_hw}; "
                "masks must have the image's height and width."
            )

    def step_records(self):
        """Yields the packed step records while collecting the low-dim arrays."""
        spec, dataset = self.spec, self.dataset
        instruction_table: dict[str, int] = {}
        for e in range(len(self.source)):
            try:  # parsing happens here: a damaged file fails with riegeli's or tfds' error
                episode = self.source.episodes[e]
            except Exception as error:
                raise rlds.episode_read_error(self.source, dataset, e, error) from error
            episode_id = self._episode_id(episode, e)
            label = f"episode {e} ({episode_id})"
            steps = rlds.get_feature(episode, "steps", dataset=dataset, episode=label)
            steps = list(steps)
            if not steps:
                self.num_empty_episodes += 1
                continue
            annotation = ann.read_episode_annotation(episode, spec)
            actions, proprio = [], []
            for t, step in enumerate(steps):
                get = lambda key, step=step, t=t, label=label: rlds.get_feature(
                    step, key, dataset=dataset, episode=label, step=t
                )
                image = rlds.as_bytes(get(spec.image_key))
                wrist = rlds.as_bytes(get(spec.wrist_image_key)) if spec.wrist_image_key else b""
                mask = _optional_bytes(step, spec.step_mask_key)
                if mask:
                    self._check_mask(mask, image, spec.step_mask_key, f"{label}, step {t}")
                    if ann.mask_is_empty(mask):
                        mask = b""
                if t == 0:
                    instruction = rlds.as_text(get(spec.instruction_key))
                    if annotation.mask_png:
                        self._check_mask(annotation.mask_png, image, spec.episode_mask_key, label)
                    if annotation.referred_png:
                        self._check_mask(
                            annotation.referred_png, image, spec.referred_mask_key, label
                        )
                actions.append(
                    _concat_features(step, spec.action_keys, dataset=dataset, episode=label, t=t)
                )
                proprio.append(
                    _concat_features(step, spec.proprio_keys, dataset=dataset, episode=label, t=t)
                )
                yield pack_step_record(image, wrist, mask)
            actions = self._check_actions(np.stack(actions), label)
            actions[:, -1] = standardize_gripper(actions[:, -1], spec.gripper_convention)
            proprio = np.stack(proprio)
            if self.proprio and proprio.shape[1] != self.proprio[0].shape[1]:
                raise rlds.InvalidDataError(
                    f"dataset {dataset!r}, {label}: proprio {spec.proprio_keys} has "
                    f"{proprio.shape[1]} dims, earlier episodes have {self.proprio[0].shape[1]}"
                )
            self.actions.append(actions)
            self.proprio.append(proprio)
            self.lengths.append(len(steps))
            self.instruction_ids.append(
                instruction_table.setdefault(instruction, len(instruction_table))
            )
            self.object_names.append(annotation.object_name)
            self.episode_ids.append(episode_id)
            self.source_indices.append(e)
            box = annotation.gripper_box
            self.gripper_boxes.append(np.full(4, np.nan, np.float32) if box is None else box)
            self.episode_masks.append(annotation.mask_png)
            self.referred_masks.append(annotation.referred_png)
        self.instructions = list(instruction_table)

    def _check_actions(self, actions: np.ndarray, label: str) -> np.ndarray:
        spec = self.spec
        if actions.shape[1] != spec.action_dim:
            raise rlds.InvalidDataError(
                f"dataset {self.dataset!r}, {label}: action features {spec.action_keys} give "
                f"{actions.shape[1]} dims, the spec expects {spec.action_dim}"
            )
        bad = ~np.isfinite(actions)
        if bad.any():
            t, d = map(int, np.argwhere(bad)[0])
            raise rlds.InvalidDataError(
                f"dataset {self.dataset!r}, {label}, step {t}: action feature "
                f"{spec.action_keys} has a non-finite value ({actions[t, d]}) in dim {d}; "
                "fix or drop this episode before training."
            )
        return actions.astype(np.float32)

    def write(self, out_dir: str, key: str) -> None:
        _write_records(os.path.join(out_dir, "frames.array_record"), self.step_records())
        if not self.lengths:
            raise rlds.InvalidDataError(
                f"dataset {self.dataset!r} in {self.source.version_dir} has no non-empty episodes"
            )
        _write_records(os.path.join(out_dir, "episode_masks.array_record"), self.episode_masks)
        _write_records(os.path.join(out_dir, "referred_masks.array_record"), self.referred_masks)
        lengths = np.asarray(self.lengths, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        arrays = {
            "actions": np.concatenate(self.actions).astype(np.float32),
            "proprio": np.concatenate(self.proprio).astype(np.float32),
            "episode_starts": starts,
            "episode_lengths": lengths,
            "instruction_ids": np.asarray(self.instruction_ids, np.int32),
            "step_episode": np.repeat(np.arange(len(lengths), dtype=np.int32), lengths),
            "gripper_boxes": np.stack(self.gripper_boxes).astype(np.float32),
        }
        for name, array in arrays.items():
            np.save(os.path.join(out_dir, f"{name}.npy"), array)
        metadata = {
            "format_version": INDEX_FORMAT_VERSION,
            "key": key,
            "dataset_name": self.dataset,
            "spec": dataclasses.asdict(self.spec),
            "source_dir": self.source.version_dir,
            "source_fingerprint": rlds.source_fingerprint(
                self.source.version_dir, self.source.split
            ),
            "split": self.source.split,
            "num_steps": int(lengths.sum()),
            "num_episodes": len(lengths),
            "num_empty_episodes_skipped": self.num_empty_episodes,
            "instructions": self.instructions,
            "object_names": self.object_names,
            "episode_ids": self.episode_ids,
            "source_episode_index": self.source_indices,
            "has_episode_mask": [bool(m) for m in self.episode_masks],
            "has_referred_mask": [bool(m) for m in self.referred_masks],
        }
        with open(os.path.join(out_dir, "metadata.json"), "w") as f:
            json.dump(metadata, f)


def build_step_index(
    dataset_dir: str | os.PathLike,
    name: str | None = None,
    spec: DatasetSpec | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> tuple[str, bool]:
    """Builds (once) the step-level cache of a dataset; returns (cache path, built_now).

    Args:
      dataset_dir: the TFDS dataset folder (version folder or its parent).
      name: registry name (default: the TFDS dataset's own name). spec: overrides the registry.
      cache_dir: cache root (default `<dataset_dir>/../pixelvla_cache`).
      rebuild: rebuild even if a cache with the same key exists.
    """
    version_dir = rlds.resolve_version_dir(dataset_dir)
    rlds.check_random_access(version_dir)
    if spec is None:
        spec = get_spec(name or rlds.read_dataset_info(version_dir).get("name", ""))
    key = index_key(version_dir, spec, split)
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_root(dataset_dir)
    final = os.path.join(root, f"{spec.name}-{key}")
    if os.path.isfile(os.path.join(final, "metadata.json")) and not rebuild:
        return final, False
    source = rlds.open_rlds(version_dir, split)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{spec.name}-{key}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        _Builder(source, spec).write(tmp, key)
        if os.path.exists(final):  # rebuild, or another process finished first
            old = final + f".old-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "metadata.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, True


class StepIndex:
    """A built step-level cache, loaded: low-dim arrays in memory, frames read on demand."""

    def __init__(self, path: str, built_now: bool = False):
        self.path = path
        self.built_now = built_now
        meta_path = os.path.join(path, "metadata.json")
        if not os.path.isfile(meta_path):
            raise rlds.DatasetNotFoundError(
                f"no step index in {path} (metadata.json missing); build it with "
                "pixelvla_jax.data.step_index.build_step_index(dataset_dir)"
            )
        try:
            with open(meta_path) as f:
                self.metadata: dict[str, Any] = json.load(f)
        except ValueError as e:
            raise damaged_cache_error(meta_path, "?", f"is not valid JSON ({e})") from e
        dataset = str(self.metadata.get("dataset_name", "?"))

        def load(name: str) -> np.ndarray:
            file = os.path.join(path, f"{name}.npy")
            try:
                return np.load(file)
            except (OSError, ValueError, EOFError) as e:
                raise damaged_cache_error(file, dataset, f"cannot be loaded ({e})") from e

        self.actions = load("actions")
        self.proprio = load("proprio")
        self.episode_starts = load("episode_starts")
        self.episode_lengths = load("episode_lengths")
        self.instruction_ids = load("instruction_ids")
        self.step_episode = load("step_episode")
        self.gripper_boxes = load("gripper_boxes")
        self.has_episode_mask = np.asarray(self.metadata["has_episode_mask"], bool)
        self.has_referred_mask = np.asarray(self.metadata["has_referred_mask"], bool)
        self.frames = RecordFile(os.path.join(path, "frames.array_record"), dataset)
        self.episode_masks = RecordFile(os.path.join(path, "episode_masks.array_record"), dataset)
        self.referred_masks = RecordFile(os.path.join(path, "referred_masks.array_record"), dataset)
        self._check_files()

    def _check_files(self) -> None:
        """Every cache file opens and holds its count of records (footers only: cheap), so a
        damaged cache is reported now, not by a data worker in the middle of training."""
        counts = (
            (self.frames, self.num_steps),
            (self.episode_masks, self.num_episodes),
            (self.referred_masks, self.num_episodes),
        )
        for records, expected in counts:
            problem = rlds.check_array_record(records.path, expected)
            if problem:
                raise records.damaged(problem)

    @property
    def key(self) -> str:
        return self.metadata["key"]

    @property
    def dataset_name(self) -> str:
        return self.metadata["dataset_name"]

    @property
    def spec(self) -> DatasetSpec:
        return DatasetSpec(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.metadata["spec"].items()}
        )

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(self.episode_lengths.shape[0])

    def episode_actions(self, e: int) -> np.ndarray:
        """[T_e, A] standardised actions of episode e."""
        start = self.episode_starts[e]
        return self.actions[start : start + self.episode_lengths[e]]

    def read_frames(self, i: int) -> tuple[bytes, bytes, bytes]:
        """(image, wrist image or b"", per-step mask or b"") of step i: reads one record."""
        record = self.frames.read(i)
        try:
            return unpack_step_record(record)
        except ValueError as e:
            raise self.frames.damaged(f"holds a bad record at step {i} ({e})") from e

    def read_episode_mask(self, e: int) -> bytes:
        """PNG of episode e's first-frame mask, or b"" (no read when the episode has none)."""
        return self.episode_masks.read(e) if self.has_episode_mask[e] else b""

    def read_referred_mask(self, e: int) -> bytes:
        """PNG of episode e's referred-objects mask, or b"" (none)."""
        return self.referred_masks.read(e) if self.has_referred_mask[e] else b""


def open_step_index(
    dataset_dir: str | os.PathLike,
    name: str | None = None,
    spec: DatasetSpec | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> StepIndex:
    """Opens a dataset's step-level cache, building it first if needed (`build_step_index`)."""
    path, built = build_step_index(dataset_dir, name, spec, split, cache_dir, rebuild)
    return StepIndex(path, built_now=built)


class StepDataset:
    """Random-access source of standardised samples (grain-compatible: `len`, `[i]`).

    `ds[i]` for step i (over all episodes) returns a dict of numpy values:
      image bytes (encoded frame), wrist_image bytes or b"",
      proprio float32 [P] (raw), action_chunk float32 [N_c, A] (standardised, unnormalised;
      the episode's last action repeated past its end), action_pad_mask bool [N_c],
      instruction str, object_name str, pixel_mask bytes (PNG, image's H x W) or b"",
      referred_mask bytes (PNG: every object the instruction fits) or b"",
      dataset_name str, episode_index int, step_index int.
    Reading a sample reads its own step record (and its episode's mask record when it has
    one), never the episode: the cost does not depend on episode length.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        action_chunk: int = 8,
        name: str | None = None,
        spec: DatasetSpec | None = None,
        split: str = "train",
        cache_dir: str | os.PathLike | None = None,
        rebuild: bool = False,
    ):
        if action_chunk < 1:
            raise ValueError(f"action_chunk must be >= 1, got {action_chunk}")
        self.action_chunk = action_chunk
        self.index = open_step_index(dataset_dir, name, spec, split, cache_dir, rebuild)
        self._instructions = self.index.metadata["instructions"]
        self._object_names = self.index.metadata["object_names"]

    @property
    def dataset_name(self) -> str:
        return self.index.dataset_name

    @property
    def spec(self) -> DatasetSpec:
        return self.index.spec

    @property
    def num_episodes(self) -> int:
        return self.index.num_episodes

    @property
    def action_dim(self) -> int:
        return int(self.index.actions.shape[1])

    @property
    def proprio_dim(self) -> int:
        return int(self.index.proprio.shape[1])

    def statistics(self) -> dict:
        """Action/proprio statistics (OpenVLA norm_stats layout), cached next to the index."""
        from pixelvla_jax.data.statistics import get_dataset_statistics

        return get_dataset_statistics(self.index)

    def __len__(self) -> int:
        return self.index.num_steps

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"step {i} out of range for dataset {self.dataset_name!r} ({n} steps)")
        index = self.index
        e = int(index.step_episode[i])
        t = i - int(index.episode_starts[e])
        chunk, pad_mask = chunk_actions(index.episode_actions(e), t, self.action_chunk)
        image, wrist, step_mask = index.read_frames(i)
        return {
            "image": image,
            "wrist_image": wrist,
            "proprio": index.proprio[i].copy(),
            "action_chunk": chunk.astype(np.float32),
            "action_pad_mask": pad_mask,
            "instruction": self._instructions[index.instruction_ids[e]],
            "object_name": self._object_names[e],
            "pixel_mask": step_mask or index.read_episode_mask(e),
            "referred_mask": index.read_referred_mask(e),
            "dataset_name": index.dataset_name,
            "episode_index": e,
            "step_index": t,
        }
