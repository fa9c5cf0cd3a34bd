"""Import the optional PyTorch reference stack (torch, timm, transformers) for parity checks.

The `reference` extra pins the CPU build of torch. The torchvision wheel that timm pulls in
is a CUDA build whose C extension cannot load next to a CPU torch; its import then fails
while registering meta kernels for the detection ops (`torchvision::nms`). timm needs only
torchvision's pure-Python transforms, so when that happens we skip the meta registrations.
"""

from __future__ import annotations

import importlib
import sys
import types


def _import_torchvision() -> None:
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    importlib.import_module("torchvision")


def import_torch():
    """Returns the `torch` module, or raises ImportError naming the extra to install."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PyTorch is needed for reference checks: pip install -e '.[reference]'"
        ) from err
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return torch


def import_timm():
    """Returns the `timm` module, making its torchvision import work with CPU torch."""
    import_torch()
    _import_torchvision()
    import timm

    return timm


def import_transformers():
    """Returns the `transformers` module (offline: nothing is downloaded)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import_torch()
    _import_torchvision()  # transformers imports torchvision when it is installed
    import transformers

    return transformers
