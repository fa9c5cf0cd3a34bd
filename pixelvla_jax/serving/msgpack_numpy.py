"""openpi's wire format: msgpack with numpy arrays and scalars as tagged maps, no pickle.

Written from the format's facts (openpi `packages/openpi-client/src/openpi_client/
msgpack_numpy.py`; /work/shared/REFERENCE-serving.md §1), so any openpi client decodes what
this module encodes and the other way round:

    np.ndarray  -> {b"__ndarray__": True, b"data": raw bytes (C order), b"dtype": dtype.str,
                    b"shape": shape}
    np.generic  -> {b"__npgeneric__": True, b"data": item(), b"dtype": dtype.str}

Object, void (structured, bfloat16) and complex dtypes are refused on both sides, so nothing
here can run code on decode. Decoding also checks what a peer cannot be trusted with: the
dtype string is a plain numeric / bool / string dtype, the shape is a list of non-negative
ints, and the data is exactly shape x itemsize bytes. Decoded arrays are read-only views of
the message's bytes (no copy), as openpi's are.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import msgpack
import numpy as np

__all__ = ["Packer", "WireFormatError", "packb", "unpackb"]

# Kinds a peer may send: bool, signed / unsigned int, float, bytes, unicode. openpi refuses
# "V", "O" and "c"; datetime kinds ("m", "M") are refused too (nothing in the protocol has one).
_ALLOWED_KINDS = frozenset("biufSU")
_MAX_NDIM = 32  # numpy's own limit is 64; no observation has more than a few


class WireFormatError(ValueError):
    """A message that is not openpi's msgpack-numpy format (or carries a refused dtype)."""


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireFormatError(
            f"{where}: dtype {dtype!s} ({dtype.str!r}) is not carried: object, void and complex "
            "dtypes are refused (no pickle); send bool, int, uint, float or string arrays."
        )


def pack_array(obj: Any) -> Any:
    """msgpack's `default` hook: numpy arrays and scalars -> tagged maps."""
    if isinstance(obj, np.ndarray | np.generic):
        _check_dtype(obj.dtype, "pack")
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialise {type(obj).__name__} (not msgpack, not numpy): {obj!r}")


def _decode_dtype(value: Any) -> np.dtype:
    if not isinstance(value, str | bytes) or len(value) > 16:
        raise WireFormatError(f"array dtype must be a numpy dtype string like '<f4', got {value!r}")
    return _dtype_from_string(value)


@functools.lru_cache(maxsize=256)
def _dtype_from_string(value: str | bytes) -> np.dtype:
    """A checked dtype string -> its dtype, parsed once per distinct string (every request
    carries the same few; a refused one raises each time: exceptions are not cached)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as err:
        raise WireFormatError(f"array dtype {value!r} is not a numpy dtype: {err}") from None
    _check_dtype(dtype, "unpack")
    return dtype


def unpack_array(obj: dict) -> Any:
    """msgpack's `object_hook`: tagged maps -> numpy arrays and scalars (checked)."""
    if b"__ndarray__" in obj:
        dtype = _decode_dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise WireFormatError(f"array shape must be a list of ints >= 0, got {shape!r}")
        if not isinstance(data, bytes):
            raise WireFormatError(f"array data must be bytes, got {type(data).__name__}")
        need = math.prod(shape) * dtype.itemsize
        if len(data) != need:
            raise WireFormatError(
                f"array of shape {tuple(shape)} and dtype {dtype.str} needs {need} bytes of data, "
                f"got {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _decode_dtype(obj.get(b"dtype"))
        data = obj.get(b"data")
        if isinstance(data, dict | list | tuple) or data is None:
            raise WireFormatError(f"numpy scalar data must be a number or string, got {data!r}")
        try:
            return dtype.type(data)
        except (TypeError, ValueError, OverflowError) as err:
            raise WireFormatError(f"numpy scalar {data!r} is not a {dtype}: {err}") from None
    return obj


Packer = functools.partial(msgpack.Packer, default=pack_array)
packb = functools.partial(msgpack.packb, default=pack_array)


def unpackb(data: bytes, **kwargs: Any) -> Any:
    """Decodes one message; any malformed input raises WireFormatError (a ValueError)."""
    try:
        return msgpack.unpackb(data, object_hook=unpack_array, **kwargs)
    except WireFormatError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as err:
        raise WireFormatError(f"not a msgpack message: {type(err).__name__}: {err}") from None
