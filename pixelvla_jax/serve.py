"""Serves a trained policy over openpi's websocket protocol, batching concurrent clients.

    python -m pixelvla_jax.serve --checkpoint=runs/pixelref --port=8000
    PIXELVLA_API_KEY=secret python -m pixelvla_jax.serve --checkpoint=runs/libero/export \
        --host=0.0.0.0 --api_key_env=PIXELVLA_API_KEY --max_batch=16 --record=/tmp/requests

`--checkpoint` is anything `Policy.from_checkpoint` loads (a workdir, its checkpoints/, an
export directory). The server compiles every batch size it will run before it listens, then
answers openpi clients (`openpi_client.WebsocketClientPolicy`) and ours
(`pixelvla_jax.serving.client`). Protocol, observation keys and limits:
`pixelvla_jax/serving/server.py`, `pixelvla_jax/serving/requests.py`, README "Serving".

Security defaults: it listens on 127.0.0.1 only; `--host=0.0.0.0` exposes it, and then an
API key (`--api_key_env=NAME`: the key is read from that environment variable, never from the
command line, where `ps` would show it) is strongly advised; messages over
`--max_message_mb` are refused; nothing is unpickled.
"""

from __future__ import annotations

import asyncio
import logging
import os

from absl import app, flags

from pixelvla_jax.errors import InvalidInputError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _define_flags() -> None:
    global _CHECKPOINT, _STEP, _HOST, _PORT, _MAX_BATCH, _WINDOW, _API_KEY_ENV, _RECORD
    global _MAX_MB, _TIMEOUT, _CONCURRENT
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A workdir, checkpoints/ or export dir.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    _HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0: all).")
    _PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free port).")
    _MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most requests per model call (1: none).")
    _WINDOW = flags.DEFINE_float("batch_window_ms", 5.0, "How long a batch waits for others.")
    _CONCURRENT = flags.DEFINE_integer(
        "concurrent_batches",
        0,
        "Most batches on the model at once (0: 2 on a CPU, where two calls use the cores one "
        "leaves idle, 1 on an accelerator).",
    )
    _API_KEY_ENV = flags.DEFINE_string(
        "api_key_env", "", "Environment variable holding the API key clients must send."
    )
    _RECORD = flags.DEFINE_string("record", "", "Directory to record every request and reply.")
    _MAX_MB = flags.DEFINE_float("max_message_mb", 16.0, "Largest request accepted (MiB).")
    _TIMEOUT = flags.DEFINE_float("request_timeout_s", 30.0, "Per-request deadline (seconds).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint=DIR is required (a workdir, checkpoints/ or export).")
    if (
        _MAX_BATCH.value < 1
        or _WINDOW.value < 0
        or _MAX_MB.value <= 0
        or _TIMEOUT.value <= 0
        or _CONCURRENT.value < 0
    ):
        raise InvalidInputError(
            "--max_batch must be >= 1, --batch_window_ms and --concurrent_batches >= 0, "
            "--max_message_mb and --request_timeout_s > 0."
        )
    api_key = None
    if _API_KEY_ENV.value:
        api_key = os.environ.get(_API_KEY_ENV.value, "")
        if not api_key:
            raise InvalidInputError(
                f"--api_key_env={_API_KEY_ENV.value}: that environment variable is unset or "
                "empty; export the key there (it is not taken from the command line)."
            )
    if _HOST.value not in _LOOPBACK and api_key is None:
        logging.warning(
            "listening on %s without an API key: anyone who can reach this port can drive the "
            "robot; pass --api_key_env=NAME.",
            _HOST.value,
        )
    from pixelvla_jax.policy import Policy
    from pixelvla_jax.serving.server import PolicyServer

    policy = Policy.from_checkpoint(_CHECKPOINT.value, step=_STEP.value)
    server = PolicyServer(
        policy,
        host=_HOST.value,
        port=_PORT.value,
        max_batch=_MAX_BATCH.value,
        batch_window_ms=_WINDOW.value,
        concurrent_batches=_CONCURRENT.value or None,
        api_key=api_key,
        max_message_bytes=int(_MAX_MB.value * 2**20),
        request_timeout_s=_TIMEOUT.value,
        record_dir=_RECORD.value or None,
    )
    server.warmup()
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    from pixelvla_jax import cli

    _define_flags()
    cli.run(main)
