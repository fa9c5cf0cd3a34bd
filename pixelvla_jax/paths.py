"""Paths that may be local or remote (`gs://bucket/...`): run directories, data, tokenizers.

A path the user gives may be a URL, so where it is stored it is made absolute only when it
is local (`absolute`), and where it is read it goes through `etils.epath` (`as_path`), which
reaches every filesystem TFDS and Orbax reach. `os.path.join` and `os.path.basename` are
fine on URLs; `os.path.abspath`, `os.path.normpath`, `os.path.isdir`, `os.listdir` and
`open` are not (`normpath` turns `gs://b` into `gs:/b`).
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), which the OS cannot open."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` made absolute when it is local; a URL unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for a local path (absolute) or a URL."""
    return epath.Path(absolute(path))


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path` (absolute when local); `gs://b/x/y/` -> `gs://b/x`."""
    path = absolute(path).rstrip("/")
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)
