"""Torch-free, memory-mapped safetensors reading (BF16 included) and a small writer.

Format: 8-byte little-endian header length, a JSON header mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the
header), optional `"__metadata__"`, then the raw little-endian bytes. numpy has no bfloat16,
so tensors are viewed with `ml_dtypes` types. Nothing is read until `get(name)`; a
tensor comes back as a read-only view of the memory-mapped file (copy it to keep it
past the checkpoint's lifetime, or pass it to `jnp.asarray`, which copies).

A checkpoint is one `.safetensors` file, or a directory holding either
`model.safetensors.index.json` (`{"weight_map": {name: shard_file}}`, as Hugging Face
writes sharded checkpoints) or exactly one `.safetensors` file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """One memory-mapped `.safetensors` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"{self.path} is not a safetensors file (bad JSON header)"
                ) from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._header: dict[str, dict] = header
        self._data_start = 8 + n
        self._mmap: mmap.mmap | None = None

    def _buffer(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def _entry(self, name: str) -> dict:
        try:
            return self._header[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entry(name)["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"tensor {name!r} in {self.path} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise ValueError(
                f"tensor {name!r} in {self.path}: {end - begin} bytes for shape {shape} {dtype}"
            )
        arr = np.frombuffer(
            self._buffer(), dtype=dtype, count=count, offset=self._data_start + begin
        )
        return arr.reshape(shape)

    def close(self) -> None:
        # Views returned by get() keep the mapping alive; only drop our reference.
        self._mmap = None


class Checkpoint:
    """A (possibly sharded) safetensors checkpoint: name -> tensor, read lazily."""

    def __init__(self, files: Mapping[str, SafetensorsFile], location: str):
        self._files = dict(files)  # tensor name -> file
        self.location = location

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._files[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.location}") from None

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Opens a `.safetensors` file or a checkpoint directory (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        f = SafetensorsFile(path)
        return Checkpoint(dict.fromkeys(f, f), path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no safetensors file or checkpoint directory at {path}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as fh:
            weight_map: dict[str, str] = json.load(fh)["weight_map"]
        shards = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"{index} names shard {shard}, missing from {path}")
            shards[shard] = SafetensorsFile(shard_path)
        return Checkpoint({k: shards[s] for k, s in weight_map.items()}, path)
    found = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path} has no {INDEX_FILE} and {len(found)} .safetensors files (need exactly one)"
        )
    return open_checkpoint(os.path.join(path, found[0]))


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors (any dtype in the table above, bfloat16 included) to one file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, value in tensors.items():
        arr = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        arrays.append(arr)
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())


def save_sharded(
    tensors: Mapping[str, np.ndarray], directory: str | os.PathLike, max_shard_bytes: int
) -> list[str]:
    """Writes a Hugging Face style sharded checkpoint (shards + index json). Returns shard names."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        nbytes = np.asarray(value).nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = value
        size += nbytes
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, os.path.join(directory, shard))
        names.append(shard)
        weight_map.update({k: shard for k in group})
    total = sum(np.asarray(v).nbytes for v in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return names
