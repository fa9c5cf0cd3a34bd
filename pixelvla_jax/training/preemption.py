"""Clean stop on preemption: SIGTERM sets a flag; the train loop saves and exits.

    with PreemptionHandler() as preemption:
        for step in range(start, total):
            state, metrics = train_step(state, next(batches))
            if preemption.should_stop(step):
                checkpointer.save(step + 1, state, ...)
                checkpointer.wait_until_finished()
                break

On one host the flag alone decides. On several hosts every process must stop at the same
step (a save is a collective), so `should_stop` also asks JAX's preemption sync point
(the coordination service sees the TPU maintenance / SIGTERM notice) and, every
`sync_every` steps, whether any host has its flag set.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)


class PreemptionHandler:
    """Installs handlers for `signals` (default SIGTERM) that set a stop flag.

    Args:
      signals: signals that request a stop.
      sync_every: on multi-host runs, agree on the flag across hosts every this many steps.
      install: install immediately (otherwise call `install()` or use `with`).
    """

    def __init__(
        self,
        signals: Sequence[int] = (signal.SIGTERM,),
        *,
        sync_every: int = 10,
        install: bool = False,
    ):
        self.signals = tuple(signals)
        self.sync_every = max(1, int(sync_every))
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.received_signal: int | None = None
        if install:
            self.install()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.received_signal = signum
        self._event.set()
        # No logging here: handlers run between bytecodes, possibly inside logging itself.

    def install(self) -> PreemptionHandler:
        """Installs the handlers (main thread only); remembers the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionHandler.install() must run in the main thread (a Python rule for "
                "signal handlers); create it in the train script's main function."
            )
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived in this process."""
        return self._event.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and exit after `step`; identical on every host."""
        if jax.process_count() == 1:
            stop = self.requested
        else:
            stop = _reached_jax_sync_point(step)
            if not stop and step % self.sync_every == 0:
                from jax.experimental import multihost_utils

                flags = multihost_utils.process_allgather(np.asarray(self.requested))
                stop = bool(np.any(flags))
        if stop:
            logger.warning(
                "Preemption requested (signal %s): stopping after step %d.",
                self.received_signal,
                step,
            )
        return stop


def _reached_jax_sync_point(step: int) -> bool:
    try:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # the preemption service is not running (e.g. not on TPU)
        return False
