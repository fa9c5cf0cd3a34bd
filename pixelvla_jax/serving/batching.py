"""Batching across clients: checked requests -> one padded, precompiled `Policy.predict` call.

`PolicyRunner` is the model side: each request becomes one row of the model input by the
policy's own path (`Policy.example`, the training example builder, as `Policy.preprocess`
builds each row) on the event loop as it arrives (~0.05 ms for a small frame; handing each
request to a preprocessing thread cost more than it saved: 667 vs 797 requests/s at 16
clients in bench/serve.py); on one model thread a batch's rows are stacked once
(`Policy.collate`), padded to the smallest of a few batch sizes (`batch_buckets`: powers of
two up to `max_batch`, all compiled and timed by `warmup`, so nothing compiles once the
server is up) and run as one call. A request whose row cannot be built gets its own error
before it is queued; the others go on.

`Batcher` is the event-loop side: requests queue; while the model is busy they wait, and once
it is idle a batch closes when `max_batch` requests wait, when every connected client has one
waiting (a client of openpi's protocol has at most one request in flight, so nobody else can
join: one client never waits for the window), or `window_s` after its first request. An
optional rule (`EFFICIENT_TOLERANCE` >= 0; off by default) also closes it once the waiting
rows cost about as little per row as a full batch (`PolicyRunner.efficient_rows`, from the
bucket times measured at warm-up): on a CPU, where 16 rows cost ~7x one row, two batches of
8 then alternate instead of all clients waiting in step; measured on an idle 2-core CPU it
lowered throughput (see `EFFICIENT_TOLERANCE`), since the replies and new requests it
overlaps with the model share the same two cores. The model call runs in the executor, so
the event loop (health checks, new connections, metadata) never waits behind it.

Rows of one batch share one rng key (`seed` of its first request), used only by a discrete
head that samples its action tokens (decode_temperature > 0); every other head's row i
depends on its own request alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pixelvla_jax.serving.requests import Request

# A batch closes early (the model idle) once its rows cost at most this much more per row than
# the cheapest batch (`PolicyRunner.efficient_rows`); a negative value turns the rule off.
# Off by default: measured with bench/serve.py on an idle 2-core CPU at 16 clients, 0.25 gave
# 611 / 931 requests/s (PixelRef default / tiny model; batches of ~8) against 685 / 972 with
# it off (batches of 16): there the replies and new requests share the model's two cores.
EFFICIENT_TOLERANCE = -1.0


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
    """Model side of the server (module docstring). Thread-confined: call from one thread."""

    def __init__(self, policy: Any, max_batch: int):
        self.policy = policy
        self.buckets = batch_buckets(max_batch)
        self.calls = 0  # batched model calls made
        self.rows = 0  # real (unpadded) rows run
        self.bucket_ms: dict[int, float] = {}  # each bucket's model call, timed by `warmup`

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
        self.calls += 1
        self.rows += n
        return actions, size

    def prepare_timed(self, request: Request) -> tuple[Any, float]:
        """`prepare` and the milliseconds it took (called on the event loop)."""
        t = time.perf_counter()
        return self.prepare(request), (time.perf_counter() - t) * 1e3

    def run(self, rows: Sequence[Any], seed: int) -> list[RowResult]:
        """Prepared rows -> one RowResult each from one padded model call."""
        t = time.perf_counter()
        actions, size = self.predict(rows, seed=seed)
        infer_ms = (time.perf_counter() - t) * 1e3
        timing = {"infer_ms": infer_ms, "batch_size": len(rows), "padded_batch": size}
        return [RowResult(actions=a, timing=dict(timing)) for a in actions]

    def warmup(self, image_hw: tuple[int, int] = (64, 64), repeats: int = 10) -> None:
        """Compiles every bucket (a blank frame, kind "none"); with the early-close rule on
        (`EFFICIENT_TOLERANCE` >= 0) then times each: the fastest of `repeats` calls (taken
        in turn, so a busy moment spreads over all buckets), in `bucket_ms` (what
        `efficient_rows` reads). With the rule off nothing reads the times: none are taken."""
        from pixelvla_jax.serving.requests import Request

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
        if EFFICIENT_TOLERANCE < 0:
            return
        times = {size: [] for size in self.buckets}
        for _ in range(repeats):
            for size in self.buckets:
                t = time.perf_counter()
                self.predict([row] * size, seed=0)
                times[size].append(time.perf_counter() - t)
        self.bucket_ms = {size: min(t) * 1e3 for size, t in times.items()}
        self.calls = self.rows = 0

    def efficient_rows(self, tolerance: float | None = None) -> frozenset[int]:
        """The row counts n whose padded call costs at most (1 + tolerance) x the cheapest
        per-row time of any bucket (`bucket_ms`, measured by `warmup`; empty before it).

        Where the model's time grows with the batch (a CPU: 16 rows cost ~7x one row) half a
        batch is already as cheap per row as a full one, so waiting for more requests only
        leaves the model idle; where it hardly grows (an accelerator below its capacity) only
        the full batch qualifies.
        """
        if not self.bucket_ms:
            return frozenset()
        tolerance = EFFICIENT_TOLERANCE if tolerance is None else tolerance
        best = min(ms / size for size, ms in self.bucket_ms.items())
        return frozenset(
            n
            for n in range(1, self.buckets[-1] + 1)
            if self.bucket_ms[next(b for b in self.buckets if b >= n)] / n <= (1 + tolerance) * best
        )


@dataclasses.dataclass
class _Pending:
    row: Any
    seed: int
    future: asyncio.Future
    queued: float
    preprocess_ms: float


class Batcher:
    """Event-loop side (module docstring). `submit` from coroutines; `run` is the loop task.

    Args:
      runner: the model side.
      max_batch: the most requests per call.
      window_s: how long a batch waits for more requests after its first.
      waiting_possible: how many requests could be in flight at most right now (the number of
        connected clients); a batch that has them all closes at once.
      executor: one worker thread: the model is called from it only.
    """

    def __init__(
        self,
        runner: PolicyRunner,
        max_batch: int,
        window_s: float,
        waiting_possible: Callable[[], int],
        executor: concurrent.futures.Executor,
    ):
        self.runner = runner
        self.max_batch = max_batch
        self.window_s = window_s
        self.waiting_possible = waiting_possible
        self.executor = executor
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._efficient = runner.efficient_rows()
        # The batch being formed wakes the loop task once this many requests are queued (not
        # at every arrival: 16 clients would wake it 16 times per batch).
        self._wake_at = 1

    def submit(self, request: Request) -> asyncio.Future:
        """Preprocesses and queues one request -> a future of its RowResult, set once its
        batch has run; cancelling it (deadline, disconnect) drops the request from its batch.
        A request the policy's preprocessing refuses (ValueError) gets its own error at once."""
        future = asyncio.get_running_loop().create_future()
        try:
            row, prep_ms = self.runner.prepare_timed(request)
        except ValueError as err:  # the observation's fault: that client's error only
            future.set_result(RowResult(error=err))
            return future
        self._pending.append(_Pending(row, request.seed, future, time.perf_counter(), prep_ms))
        if len(self._pending) >= self._wake_at:
            self._arrived.set()
        return future

    def wake(self) -> None:
        """Re-checks the batch being formed (a client left: one fewer request to wait for)."""
        self._arrived.set()

    def _live(self) -> int:
        self._pending = [p for p in self._pending if not p.future.done()]
        return len(self._pending)

    async def _next_batch(self) -> list[_Pending]:
        self._wake_at = 1
        while not self._live():
            self._arrived.clear()
            await self._arrived.wait()
        deadline = asyncio.get_running_loop().time() + self.window_s
        while True:
            want = min(self.max_batch, max(1, self.waiting_possible()))
            live = self._live()
            if live >= want or live in self._efficient:
                break
            self._wake_at = next(
                n for n in range(live + 1, want + 1) if n == want or n in self._efficient
            )
            self._arrived.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
            except TimeoutError:
                break
        self._wake_at = 1
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        return [p for p in batch if not p.future.done()]

    async def run(self) -> None:
        """Forever: next batch -> the runner on the executor -> each request's future."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self.executor, self.runner.run, [p.row for p in batch], batch[0].seed
                )
            except Exception as err:  # noqa: BLE001 - a server fault: every request says so
                results = [RowResult(error=err) for _ in batch]
            for p, result in zip(batch, results, strict=True):
                result.timing["preprocess_ms"] = p.preprocess_ms
                result.timing["queue_ms"] = (started - p.queued) * 1e3
                if not p.future.done():
                    p.future.set_result(result)
