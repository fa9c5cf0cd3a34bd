"""A policy served over openpi's websocket protocol, with requests batched across clients.

    server = PolicyServer(Policy.from_checkpoint("runs/pixelref"), port=8000)
    asyncio.run(server.serve())          # or: with ServerThread(server) as s: ... s.port

The protocol (openpi `src/openpi/serving/websocket_policy_server.py`; /work/shared/
REFERENCE-serving.md §1), so openpi's clients talk to it unchanged:

- on connect the server sends one msgpack message: the policy's metadata (`metadata()`);
- each request is one binary msgpack message (`msgpack_numpy`) holding the observation dict
  (`requests.py` lists the keys); the reply is one msgpack dict: `actions` float32 [H, 7]
  (gripper 1 = open, 0 = closed), `server_timing` {infer_ms, prev_total_ms (from the second
  request on, as openpi)} and `policy_timing` {preprocess_ms, infer_ms, queue_ms,
  batch_size, padded_batch};
- `GET /healthz` answers 200 "OK";
- an error goes to that client as a text frame saying what was wrong (openpi's clients raise
  on a text frame), then that connection closes (code 1008 for a bad request, 1011 for a
  server fault); the server and every other client go on.

Better than openpi's server: concurrent clients' requests are batched (`batching.py`) and the
model runs off the event loop; requests are checked key by key; a message over
`max_message_bytes` is refused by the websocket layer (close code 1009); a request that takes
longer than `request_timeout_s` is answered with an error; an optional API key (openpi's
`Authorization: Api-Key <key>` header, compared in constant time; `/healthz` stays open); it
binds to 127.0.0.1 unless told otherwise; `record_dir` keeps every request and reply as
msgpack files (`<connection>_<n>.msgpack`: {"request", "reply" or "error", "time"}).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import http
import itertools
import logging
import os
import threading
import time
import traceback
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode

from pixelvla_jax.serving import msgpack_numpy
from pixelvla_jax.serving.batching import (
    MODEL_THREAD_NICE,
    Batcher,
    PolicyRunner,
    accepted_prompt_kinds,
    default_concurrent,
    lower_thread_priority,
)
from pixelvla_jax.serving.requests import KEYS, RequestError, parse_request

log = logging.getLogger(__name__)

PROTOCOL = "openpi-websocket-msgpack"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # a 1024 x 1024 RGB frame + mask is ~4 MiB
# Close reasons are limited to 123 bytes by the websocket standard; the text frame says it all.
_CLOSE_REASON = {CloseCode.POLICY_VIOLATION: "bad request", CloseCode.INTERNAL_ERROR: "error"}


class PolicyServer:
    """Serves one policy (module docstring).

    Args:
      policy: a `pixelvla_jax.policy.Policy` (or anything with its `example`, `collate`,
        `predict`, `chunk_size`, `action_dim`, `image_size`, `model_cfg`, `data_cfg`).
      host, port: where to listen (port 0: any free port; `port` holds it once serving).
      max_batch: the most requests per model call (1: one at a time, as openpi's server).
      batch_window_ms: how long a batch waits for other clients' requests.
      concurrent_batches: the most batches on the model at once, each from its own thread
        (None: `batching.default_concurrent()`, 2 on a CPU, 1 on an accelerator).
      model_thread_nice: how much nicer than the event loop the model threads run (Linux;
        `batching.MODEL_THREAD_NICE`; 0: the same priority).
      api_key: when set, clients must send `Authorization: Api-Key <api_key>`.
      max_message_bytes: the largest request accepted.
      request_timeout_s: a request not answered by then gets an error.
      record_dir: when set, every request and reply is written there.
    """

    def __init__(
        self,
        policy: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 8,
        batch_window_ms: float = 5.0,
        concurrent_batches: int | None = None,
        model_thread_nice: int = MODEL_THREAD_NICE,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        request_timeout_s: float = 30.0,
        record_dir: str | None = None,
    ):
        if api_key is not None and not api_key:
            raise ValueError("api_key is empty; give a non-empty key or None for no key.")
        self.policy = policy
        self.host, self.port = host, port
        self.max_batch = int(max_batch)
        self.window_s = float(batch_window_ms) / 1e3
        self.concurrent_batches = (
            default_concurrent() if concurrent_batches is None else int(concurrent_batches)
        )
        if self.concurrent_batches < 1:
            raise ValueError(f"concurrent_batches={concurrent_batches}: must be >= 1.")
        self.max_message_bytes = int(max_message_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self.record_dir = record_dir
        self._api_header = None if api_key is None else f"Api-Key {api_key}".encode()
        self.runner = PolicyRunner(policy, self.max_batch)
        self.accepted_kinds = accepted_prompt_kinds(policy)
        self._connections = 0
        self._ids = itertools.count()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.concurrent_batches,
            thread_name_prefix="policy",
            initializer=lower_thread_priority,
            initargs=(int(model_thread_nice),),
        )
        self._recorder = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="record")
            if record_dir
            else None
        )
        if record_dir:
            os.makedirs(record_dir, exist_ok=True)
        self._metadata = self.metadata()
        self._packed_metadata = msgpack_numpy.packb(self._metadata)

    # ------------------------------------------------------------------ what clients see

    def metadata(self) -> dict:
        """The first message of every connection: what the policy expects and returns."""
        p = self.policy
        cfg = p.model_cfg
        pixel = cfg.use_pixel_encoder or cfg.use_prompt_encoder
        if p.cfg.model.get("family", "pixelvla") == "pi0":
            family = "pixelvla_pi0" if pixel else "pi0"
        else:
            family = "pixelvla" if pixel else "openvla"
        cameras = ["observation/image"]
        if getattr(p, "uses_wrist_image", False):
            cameras.append("observation/wrist_image")
        return {
            "server": "pixelvla_jax",
            "protocol": PROTOCOL,
            "model_family": family,
            "action_head": getattr(cfg, "head", "flow"),
            "action_horizon": int(p.chunk_size),
            "action_dim": int(p.action_dim),
            "action_convention": "unnormalised; gripper 1 = open, 0 = closed",
            "cameras": cameras,
            "uses_state": bool(getattr(p, "uses_state", False)),
            "image_size": [int(p.image_size), int(p.image_size)],
            "image_note": "uint8 [H, W, 3] of any size; resized (or centre-cropped) as in training",
            "prompt_kinds": list(self.accepted_kinds),
            "trained_visual_prompts": bool(p.data_cfg.visual_prompts),
            "observation_keys": list(KEYS),
            "dataset_statistics_key": str(getattr(p, "dataset_name", "")),
            "checkpoint_step": -1 if getattr(p, "step", None) is None else int(p.step),
            "max_batch": self.max_batch,
            "concurrent_batches": self.concurrent_batches,
            "max_message_bytes": self.max_message_bytes,
            "request_timeout_s": self.request_timeout_s,
        }

    # ------------------------------------------------------------------ serving

    def warmup(self) -> None:
        """Compiles every batch size the server will run (call before `serve`)."""
        t = time.perf_counter()
        self._executor.submit(self.runner.warmup).result()
        log.info("compiled batch sizes %s in %.1f s", self.runner.buckets, time.perf_counter() - t)

    async def serve(
        self, started: threading.Event | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Serves until `stop` is set (or forever); sets `started` once listening."""
        batcher = Batcher(
            self.runner,
            self.max_batch,
            self.window_s,
            lambda: self._connections,
            self._executor,
            self.concurrent_batches,
        )
        batch_task = asyncio.create_task(batcher.run())
        self._batcher = batcher
        try:
            async with serve(
                self._handler,
                self.host,
                self.port,
                compression=None,
                max_size=self.max_message_bytes,
                process_request=self._process_request,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info("serving on ws://%s:%d", self.host, self.port)
                if started is not None:
                    started.set()
                if stop is None:
                    await server.serve_forever()
                else:
                    await stop.wait()
        finally:
            batch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batch_task

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._recorder is not None:
            self._recorder.shutdown(wait=True)

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._api_header is not None:
            got = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(got, self._api_header):
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    "Unauthorized: send the header 'Authorization: Api-Key <key>'.\n",
                )
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        conn_id = next(self._ids)
        self._connections += 1
        try:
            await ws.send(self._packed_metadata)
            prev_total_ms = None
            for n in itertools.count():
                message = await ws.recv()
                t0 = time.perf_counter()
                obs = None
                try:
                    if isinstance(message, str):
                        raise RequestError(
                            "expected a binary msgpack message (openpi's msgpack_numpy), got a "
                            "text frame."
                        )
                    try:
                        obs = msgpack_numpy.unpackb(message)
                    except ValueError as err:
                        raise RequestError(f"the request is not msgpack-numpy: {err}") from None
                    future = self._batcher.submit(parse_request(obs, self.accepted_kinds))
                    try:
                        async with asyncio.timeout(self.request_timeout_s):
                            result = await future  # a timeout cancels it: its batch skips it
                    except TimeoutError:
                        raise RequestError(
                            f"no reply within the request deadline of {self.request_timeout_s} s "
                            "(server overloaded?); retry later."
                        ) from None
                    if result.error is not None:
                        raise result.error
                except ValueError as err:  # the request's fault (RequestError, bad observation)
                    await self._fail(ws, conn_id, n, obs, f"bad request: {err}", bad=True)
                    return
                except Exception as err:  # noqa: BLE001 - a server fault: say it, keep serving
                    log.error("connection %d: %s", conn_id, traceback.format_exc())
                    msg = f"server error: {type(err).__name__}: {err}"
                    await self._fail(ws, conn_id, n, obs, msg, bad=False)
                    return
                infer_ms = result.timing.get("infer_ms", 0.0)
                reply = {
                    "actions": np.asarray(result.actions, np.float32),
                    "server_timing": {"infer_ms": infer_ms},
                    "policy_timing": dict(result.timing),
                }
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(msgpack_numpy.packb(reply))
                self._record(conn_id, n, obs, reply=reply)
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except websockets.ConnectionClosed:
            pass  # the client left (between requests or mid-request): nothing to answer
        finally:
            self._connections -= 1
            self._batcher.wake()

    async def _fail(self, ws, conn_id: int, n: int, obs: Any, message: str, bad: bool) -> None:
        log.info("connection %d request %d: %s", conn_id, n, message)
        self._record(conn_id, n, obs, error=message)
        code = CloseCode.POLICY_VIOLATION if bad else CloseCode.INTERNAL_ERROR
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(message)
            await ws.close(code, _CLOSE_REASON[code])

    def _record(self, conn_id: int, n: int, obs: Any, reply=None, error=None) -> None:
        if self._recorder is None:
            return
        entry = {"request": obs, "time": time.time()}
        if error is not None:
            entry["error"] = error
        else:
            entry["reply"] = reply
        path = os.path.join(self.record_dir, f"{conn_id:05d}_{n:07d}.msgpack")

        def write():
            try:
                data = msgpack_numpy.packb(entry)
            except (TypeError, ValueError):  # an undecodable request: keep what can be kept
                data = msgpack_numpy.packb({**entry, "request": repr(obs)[:10_000]})
            with open(path, "wb") as f:
                f.write(data)

        self._recorder.submit(write)


class ServerThread:
    """Runs a PolicyServer on its own event loop in a background thread (tests, benchmarks,
    notebooks): `with ServerThread(server) as s: ... s.url`. Stops and joins on exit."""

    def __init__(self, server: PolicyServer, start_timeout_s: float = 60.0):
        self.server = server
        self.start_timeout_s = start_timeout_s
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="policy-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://{self.server.host}:{self.server.port}"

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.server.serve(self._started, self._stop)

        try:
            asyncio.run(main())
        except BaseException as err:  # noqa: BLE001 - reported by __enter__
            self._error = err
            self._started.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(self.start_timeout_s) or self._error is not None:
            raise RuntimeError(f"the policy server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self.server.close()
