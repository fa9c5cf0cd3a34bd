"""Batching across clients: checked requests -> one padded, precompiled `Policy.predict` call.

`PolicyRunner` is the model side: on a model thread each request of a batch becomes one row
of the model input by the policy's own path (`Policy.example`, the training example
builder, as `Policy.preprocess` builds each row; a request it refuses gets its own error and
the others go on), the rows are stacked once (`Policy.collate`), padded to the smallest of a
few batch sizes (`batch_buckets`: powers of two up to `max_batch`, all compiled by `warmup`,
so nothing compiles once the server is up) and run as one call. Building the rows there
rather than on the event loop as each request arrives took ~0.1 ms per request off the
event loop, whose replies and new requests are the serial part of a batch's cycle (handing
each request to a preprocessing thread of its own had cost more than it saved: 667 vs 797
requests/s at 16 clients).

`Batcher` is the event-loop side: requests queue; a batch forms while a model slot is free
(`concurrent` batches may run at once, each on its own executor thread) and closes when
`max_batch` requests wait, when it holds its share of the requests that can still come, or
`window_s` after its first request. The requests that can still come are one per connected
client not already in a running batch (a client of openpi's protocol has at most one request
in flight); its share is that number over the free slots, rounded up. With one slot a batch
waits for every client (one client never waits for the window); with two and 16 clients two
groups of 8 settle in, each sent its replies and received its next requests while the other
runs. On a CPU two concurrent calls use the cores that one call's small ops leave idle: on
this project's 2-core CPU two threads running batches of 8 did 1.6-1.8x the rows/s of one
thread running batches of 16 (PixelRef tiny and default models), and the event loop's
replies and new requests overlap the model instead of leaving it idle (`default_concurrent`:
2 on a CPU, 1 on an accelerator, where calls queue on one device). The model calls run in
the executor, so the event loop (health checks, new connections, metadata) never waits
behind them; its threads run nicer than the event loop (`MODEL_THREAD_NICE`), so on a busy
CPU the replies and new requests go first.

Rows of one batch share one rng key (`seed` of its first request), used only by a discrete
head that samples its action tokens (decode_temperature > 0); every other head's row i
depends on its own request alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pixelvla_jax.serving.requests import Request

# The model threads run this much nicer than the event loop (Linux: per thread; elsewhere not
# changed). On a CPU the event loop's replies and new requests then take a core from the
# other batch's model call at once instead of sharing it: at 16 clients on an idle 2-core CPU
# (bench/serve.py's tiny model, ten interleaved 2 s rounds) 1054 vs 944 requests/s median,
# ahead in 9 of 10 rounds. Only latency-critical I/O waits less; the model still gets every
# cycle the event loop leaves.
MODEL_THREAD_NICE = 10


def lower_thread_priority(nice: int = MODEL_THREAD_NICE) -> None:
    """Makes the calling thread `nice` steps nicer (Linux, where niceness is per thread; a
    no-op elsewhere, or where the system refuses). Used as the model executor's initializer."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def default_concurrent() -> int:
    """How many batches run on the model at once by default: 2 on a CPU (module docstring),
    1 on an accelerator."""
    import jax

    return 2 if jax.default_backend() == "cpu" else 1


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes: 1, 2, 4, ... below `max_batch`, and `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: must be >= 1.")
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def accepted_prompt_kinds(policy: Any) -> tuple[str, ...]:
    """The prompt kinds the policy's model can read: "mask" needs the pixel encoder (or the
    prompt encoder's dense input), "points" / "line" / "box" the prompt encoder; "none" always.
    (Whether the run trained with visual prompts is the metadata's `trained_visual_prompts`.)"""
    from pixelvla_jax.policy import PROMPT_KINDS

    cfg = policy.model_cfg
    ok = {"none"}
    if cfg.use_pixel_encoder or cfg.use_prompt_encoder:
        ok.add("mask")
    if cfg.use_prompt_encoder:
        ok.update(("points", "line", "box"))
    return tuple(k for k in PROMPT_KINDS if k in ok)


@dataclasses.dataclass
class RowResult:
    """One request's outcome: actions [N_c, A] or the error it raised, and timings."""

    actions: np.ndarray | None = None
    error: BaseException | None = None
    timing: dict = dataclasses.field(default_factory=dict)


class PolicyRunner:
    """Model side of the server (module docstring). `predict` / `run` may be called from
    several threads at once (the jitted call and the numpy around it share no state)."""

    def __init__(self, policy: Any, max_batch: int):
        self.policy = policy
        self.buckets = batch_buckets(max_batch)
        self.calls = 0  # batched model calls made
        self.rows = 0  # real (unpadded) rows run
        self._count_lock = threading.Lock()

    def prepare(self, request: Request) -> Any:
        """One checked request -> one row of the model input (`Policy.example`: the
        training example builder's acting example, as `Policy.preprocess` builds each row)."""
        return self.policy.example(
            request.image,
            request.instruction,
            request.target_mask,
            request.prompt_kind,
            seed=request.seed,
            index=request.index,
            visual_prompt=request.visual_prompt,
            wrist_image=request.wrist_image,
            state=request.state,
        )

    def predict(self, rows: Sequence[Any], seed: int) -> tuple[np.ndarray, int]:
        """Rows stacked and padded to a bucket -> ([n, N_c, A] actions, padded batch size)."""
        n = len(rows)
        size = next((b for b in self.buckets if b >= n), None)
        if size is None:
            raise ValueError(f"{n} rows > the largest batch {self.buckets[-1]}.")
        actions = self.policy.predict(self.policy.collate(rows, pad_to=size), seed=seed)[:n]
        with self._count_lock:
            self.calls += 1
            self.rows += n
        return actions, size

    def run(self, requests: Sequence[Request], seed: int) -> list[RowResult]:
        """Checked requests -> one RowResult each: each row built (`prepare`; a request the
        policy's preprocessing refuses gets its own ValueError, the others go on), then one
        padded model call for the rows built."""
        results, rows = [], []
        for request in requests:
            t = time.perf_counter()
            try:
                rows.append(self.prepare(request))
            except ValueError as err:  # the observation's fault: that client's error only
                results.append(RowResult(error=err))
                continue
            results.append(RowResult(timing={"preprocess_ms": (time.perf_counter() - t) * 1e3}))
        if not rows:
            return results
        t = time.perf_counter()
        actions, size = self.predict(rows, seed=seed)
        timing = {
            "infer_ms": (time.perf_counter() - t) * 1e3,
            "batch_size": len(rows),
            "padded_batch": size,
        }
        built = iter(actions)
        for result in results:
            if result.error is None:
                result.actions = next(built)
                result.timing.update(timing)
        return results

    def warmup(self, image_hw: tuple[int, int] = (64, 64)) -> None:
        """Compiles every bucket (a blank frame, kind "none"), so nothing compiles once the
        server is up."""
        blank = Request(np.zeros((*image_hw, 3), np.uint8), "warm up", None, "none", None, 0, 0)
        if getattr(self.policy, "uses_wrist_image", False):
            blank = dataclasses.replace(blank, wrist_image=blank.image)
        if getattr(self.policy, "uses_state", False):
            dim = len(self.policy.statistics["proprio"]["mean"])
            blank = dataclasses.replace(blank, state=np.zeros(dim, np.float32))
        row = self.prepare(blank)
        for size in self.buckets:
            self.predict([row] * size, seed=0)
        self.calls = self.rows = 0


@dataclasses.dataclass
class _Pending:
    request: Request
    future: asyncio.Future
    queued: float


class Batcher:
    """Event-loop side (module docstring). `submit` from coroutines; `run` is the loop task.

    Args:
      runner: the model side.
      max_batch: the most requests per call.
      window_s: how long a batch waits for more requests after its first.
      clients: how many clients are connected now (each has at most one request in flight).
      executor: `concurrent` worker threads: the model is called from them only.
      concurrent: the most batches on the model at once.
    """

    def __init__(
        self,
        runner: PolicyRunner,
        max_batch: int,
        window_s: float,
        clients: Callable[[], int],
        executor: concurrent.futures.Executor,
        concurrent: int = 1,
    ):
        if concurrent < 1:
            raise ValueError(f"concurrent={concurrent}: must be >= 1.")
        self.runner = runner
        self.max_batch = max_batch
        self.window_s = window_s
        self.clients = clients
        self.executor = executor
        self.concurrent = concurrent
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()  # a request queued (or a client left)
        self._slot_freed = asyncio.Event()
        self._running_batches = 0
        self._running_rows = 0
        # The batch being formed wakes the loop task once this many requests are queued (not
        # at every arrival: 16 clients would wake it 16 times per batch).
        self._wake_at = 1

    def submit(self, request: Request) -> asyncio.Future:
        """Queues one checked request -> a future of its RowResult, set once its batch has run
        (with the error of a request the policy's preprocessing refused); cancelling it
        (deadline, disconnect) drops the request from its batch."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future, time.perf_counter()))
        if len(self._pending) >= self._wake_at:
            self._arrived.set()
        return future

    def wake(self) -> None:
        """Re-checks the batch being formed (a client left: one fewer request to wait for)."""
        self._arrived.set()

    def _live(self) -> int:
        self._pending = [p for p in self._pending if not p.future.done()]
        return len(self._pending)

    def _share(self) -> int:
        """The requests the batch being formed waits for: those that can still come (one per
        connected client not in a running batch) over the free model slots, rounded up."""
        can_come = max(1, self.clients() - self._running_rows)
        free = max(1, self.concurrent - self._running_batches)
        return min(self.max_batch, -(-can_come // free))

    async def _next_batch(self) -> list[_Pending]:
        self._wake_at = 1
        while not self._live():
            self._arrived.clear()
            await self._arrived.wait()
        deadline = asyncio.get_running_loop().time() + self.window_s
        while True:
            want = self._share()
            if self._live() >= want:
                break
            self._wake_at = want
            self._arrived.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
            except TimeoutError:
                break
        self._wake_at = 1
        take = self._share()  # more may have come: the rest start the next batch
        batch, self._pending = self._pending[:take], self._pending[take:]
        return [p for p in batch if not p.future.done()]

    async def run(self) -> None:
        """Forever: a free model slot -> the next batch -> the runner on the executor (a task
        of its own, so the next batch forms meanwhile) -> each request's future."""
        running: set[asyncio.Task] = set()
        try:
            while True:
                while self._running_batches >= self.concurrent:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                batch = await self._next_batch()
                if not batch:
                    continue
                self._running_batches += 1
                self._running_rows += len(batch)
                task = asyncio.create_task(self._run_batch(batch))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self.executor, self.runner.run, [p.request for p in batch], batch[0].request.seed
            )
        except Exception as err:  # noqa: BLE001 - a server fault: every request says so
            results = [RowResult(error=err) for _ in batch]
        finally:
            self._running_batches -= 1
            self._running_rows -= len(batch)
            self._slot_freed.set()
        for p, result in zip(batch, results, strict=True):
            result.timing["queue_ms"] = (started - p.queued) * 1e3
            if not p.future.done():
                p.future.set_result(result)
