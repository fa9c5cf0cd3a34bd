"""Clean stop on SIGTERM (preemption) and SIGINT (Ctrl-C): a flag; the train loop saves and exits.

    with PreemptionHandler() as preemption:
        for step in range(start, total):
            state, metrics = train_step(state, next(batches))
            if preemption.should_stop(step + 1):
                checkpointer.save(step + 1, state, ...)
                checkpointer.wait_until_finished()
                break

The handlers only set a flag (a signal arriving during compilation or a checkpoint write
waits for the loop's next check); a second SIGINT interrupts at once (KeyboardInterrupt), for
a run that no longer reaches its next step.

On one host the flag alone decides. On several hosts every process must stop at the same
step (a save is a collective), so `should_stop` gathers every host's flag every `sync_every`
steps (and when asked with `sync=True`, e.g. before the first step): a signal that reached
any host stops all of them at the same step. A failure of that collective raises: hosts that
can no longer agree must not train on as if no stop had been requested.

JAX's own preemption sync point (`multihost_utils.reached_preemption_sync_point`, fed by a
SIGTERM notifier that `jax.distributed.initialize` installs) is consulted too, but it is not
what the handlers rely on: a notice that arrives before the first call (during setup) is
never acted on when the step numbers do not start at 0 (a resumed run), and the Python
handler installed here replaces that notifier's SIGTERM handler anyway. It still counts when
JAX learns of a preemption otherwise (a handler installed with `signals=()`). When the
preemption service is disabled (`jax_enable_preemption_service=False`) that is logged once;
any other error of the sync point raises.
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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Installs handlers for `signals` (default SIGTERM and SIGINT) that set a stop flag.

    Args:
      signals: signals that request a stop.
      sync_every: on multi-host runs, agree on the flag across hosts every this many steps.
      install: install immediately (otherwise call `install()` or use `with`).
    """

    def __init__(
        self,
        signals: Sequence[int] = STOP_SIGNALS,
        *,
        sync_every: int = 10,
        install: bool = False,
    ):
        self.signals = tuple(signals)
        self.sync_every = max(1, int(sync_every))
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._sync_point_disabled_logged = False
        self.received_signal: int | None = None
        if install:
            self.install()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self._event.is_set():
            # Ctrl-C twice: the user does not want to wait for the step to end.
            raise KeyboardInterrupt
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

    def should_stop(self, step: int, *, sync: bool = False) -> bool:
        """Whether the loop should save and exit after `step`; identical on every host.

        Every host must call it at every step with the same arguments. `sync=True` gathers
        the hosts' flags now instead of at the next multiple of `sync_every`.
        """
        if jax.process_count() == 1:
            stop = self.requested
        else:
            stop = self._reached_jax_sync_point(step)
            if not stop and (sync or step % self.sync_every == 0):
                stop = _any_host_requested(self.requested, step)
        if stop:
            logger.warning(
                "Stop requested (%s): stopping after step %d.",
                signal.Signals(self.received_signal).name
                if self.received_signal
                else "on another host",
                step,
            )
        return stop

    def _reached_jax_sync_point(self, step: int) -> bool:
        if not jax.config.jax_enable_preemption_service:
            if not self._sync_point_disabled_logged:
                logger.info(
                    "JAX's preemption service is disabled (jax_enable_preemption_service): hosts "
                    "agree on a stop through their own signal flags only."
                )
                self._sync_point_disabled_logged = True
            return False
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except Exception as e:
            raise RuntimeError(
                f"JAX's preemption sync point failed at step {step} ({type(e).__name__}: {e}). "
                "The hosts can no longer agree on a stop step, so the run stops here; check "
                "that every host called jax.distributed.initialize and is still running, then "
                "rerun the same command (it resumes from the newest checkpoint)."
            ) from e


def _any_host_requested(requested: bool, step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        flags = multihost_utils.process_allgather(np.asarray(requested))
    except Exception as e:
        raise RuntimeError(
            f"Gathering the hosts' stop flags failed at step {step} ({type(e).__name__}: {e}). "
            "A host has probably died or lost its connection to the coordinator; rerun the same "
            "command on every host (it resumes from the newest checkpoint)."
        ) from e
    return bool(np.any(flags))
