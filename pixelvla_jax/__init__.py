"""PixelVLA in JAX/Flax: a vision-language-action policy with pixel-level inputs."""

__version__ = "0.1.0"
