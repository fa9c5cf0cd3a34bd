"""Import the optional PyTorch reference stack (torch, timm, transformers) for parity checks.

The `reference` extra brings them (the CPU build of torch); a missing one names that extra.
`pixelvla_jax.torch_imports` makes timm's and transformers' torchvision import work next to
a CPU torch.
"""

from __future__ import annotations

from pixelvla_jax import torch_imports

EXTRA = "reference"


def import_torch():
    """Returns the `torch` module, or raises ImportError naming the `reference` extra."""
    return torch_imports.import_torch(EXTRA)


def import_timm():
    """Returns the `timm` module, making its torchvision import work with CPU torch."""
    return torch_imports.import_timm(EXTRA)


def import_transformers():
    """Returns the `transformers` module (offline: nothing is downloaded)."""
    return torch_imports.import_transformers(EXTRA)
