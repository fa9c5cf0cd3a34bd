"""Training metrics: TensorBoard event files, a console progress bar, MFU and parameter counts.

    writer = MetricsWriter(workdir, total_steps=cfg.total_steps, initial_step=start)
    writer.write_scalars(step, {"loss": ..., "learning_rate": ...})
    writer.close()

Only process 0 writes (every host calls the same code).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree (arrays, ShapeDtypeStructs or boxes)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def mfu(flops_per_step: float, step_time: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware peak (0..1).

    Args:
      flops_per_step: model FLOPs of one train step over all devices (e.g. from
        `train_flops_per_step` or `jax.jit(...).lower(...).cost_analysis()`).
      step_time: seconds per step.
      peak_flops: peak FLOP/s of all devices together.
    """
    if step_time <= 0 or peak_flops <= 0:
        raise ValueError(
            f"mfu needs step_time > 0 and peak_flops > 0, got {step_time}, {peak_flops}."
        )
    return flops_per_step / step_time / peak_flops


def train_flops_per_step(num_trained_params: int, num_frozen_params: int, tokens: int) -> float:
    """Rule of thumb for a transformer step: 6 N T for trained, 4 N T for frozen weights.

    (Frozen weights still need the forward pass and the activation gradients, not the
    weight gradients.)
    """
    return float(tokens) * (6.0 * num_trained_params + 4.0 * num_frozen_params)


def measure_matmul_peak_flops(
    size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5, device: Any = None
) -> float:
    """Measured FLOP/s of one device on a big square matmul (a practical "peak").

    Args:
      size: matrix side n; one matmul is 2 n^3 FLOPs.
      dtype: operand dtype.
      repeats: timed runs after one warm-up; the fastest counts.
      device: the device (default the first).
    """
    device = device or jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value)))


class MetricsWriter:
    """Writes scalars to TensorBoard (`<logdir>/tensorboard`) and a tqdm progress bar.

    Args:
      logdir: the run's directory.
      total_steps: length of the progress bar.
      initial_step: where the bar starts (the restored step on resume).
      tensorboard: write event files.
      progress: show the console bar.
      is_primary: writes happen only if True (default: process 0).
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None,
        *,
        total_steps: int | None = None,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        is_primary: bool | None = None,
    ):
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._tb = None
        self._bar = None
        self._last_step = initial_step
        self._last_time = time.perf_counter()
        if not self.is_primary:
            return
        if tensorboard and logdir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(os.fspath(logdir), "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
        """Logs `scalars` at `step`; adds `steps_per_sec` since the previous call.

        Returns the floats written (also on non-primary hosts, for tests / callers).
        """
        now = time.perf_counter()
        values = {k: _to_float(v) for k, v in scalars.items()}
        if step > self._last_step and now > self._last_time:
            values["steps_per_sec"] = (step - self._last_step) / (now - self._last_time)
        if self.is_primary:
            if self._tb is not None:
                for name, value in values.items():
                    self._tb.add_scalar(name, value, step)
            if self._bar is not None:
                self._bar.update(max(0, step - self._last_step))
                postfix = {}
                for short, key in (("loss", "loss"), ("lr", "learning_rate")):
                    if key in values:
                        postfix[short] = f"{values[key]:.4g}"
                if "steps_per_sec" in values:
                    postfix["steps/s"] = f"{values['steps_per_sec']:.2f}"
                self._bar.set_postfix(postfix, refresh=False)
        self._last_step, self._last_time = step, now
        return values

    def write_text(self, step: int, name: str, text: str) -> None:
        """Logs a text (e.g. the config) to TensorBoard."""
        if self.is_primary and self._tb is not None:
            self._tb.add_text(name, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
