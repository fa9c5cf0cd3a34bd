"""Imports of the optional PyTorch stack (torch, timm, transformers), naming the extra to install.

Two extras bring torch: `annotate` (the transformers backends of the annotation pipeline) and
`reference` (parity tests against timm / transformers). Each caller passes its extra, so a
missing package names the right `pip install -e ".[<extra>]"`.

A torchvision wheel built for CUDA cannot load its C extension next to the CPU build of
torch; its import then fails while registering meta kernels for the detection ops
(`torchvision::nms`). timm and transformers import torchvision when it is installed but need
only its pure-Python parts, so when that happens the meta registrations are skipped.
Nothing is downloaded: transformers runs with `HF_HUB_OFFLINE=1` unless set otherwise.
"""

from __future__ import annotations

import importlib
import os
import sys
import types


def _hint(package: str, extra: str) -> str:
    return f'{package} is not installed: pip install -e ".[{extra}]"'


def _import_torchvision() -> None:
    """Imports torchvision if installed, without the meta kernels a CUDA build fails on."""
    try:
        importlib.import_module("torchvision")
        return
    except ImportError:
        return  # not installed: timm and transformers work without it
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    importlib.import_module("torchvision")


def import_torch(extra: str):
    """Returns the `torch` module, or raises ImportError naming `extra`."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_hint("PyTorch", extra)) from err
    return torch


def import_timm(extra: str):
    """Returns the `timm` module, its torchvision import working next to a CPU torch."""
    import_torch(extra)
    _import_torchvision()
    try:
        import timm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_hint("timm", extra)) from err
    return timm


def import_transformers(extra: str):
    """Returns the `transformers` module, offline (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import_torch(extra)
    _import_torchvision()
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_hint("transformers", extra)) from err
    return transformers
