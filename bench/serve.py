"""The policy server against a direct `Policy.act`, and batched against one-at-a-time serving.

    python bench/serve.py [--checkpoint=DIR] [--requests=200] [--clients=1,4,16]
                          [--max_batch=16] [--batch_window_ms=5] [--seconds=3] [--rounds=3]

With no `--checkpoint`, freshly initialised PixelRef runs (`--variants`: `pixelref:tiny`, the
tiny PixelRef model the issue names (the test suite's L1-head model, the one `evaluate
--server` is tested with), which carries the targets, and `pixelref:default`, the README
main job's discrete-token model, printed beside it; the same compute as trained ones) are
written to `--workdir` and served, each in turn.
For each, in one process, on 127.0.0.1:
  1. latency of one client: `--requests` sequential requests through the server (batched
     mode), p50 / p99, against `--requests` direct `Policy.act` calls on the same
     observation (batch of 1); the difference of the p50s is the server's overhead per
     request (wire format, websocket, queue, preprocessing hand-off);
  2. requests/s with each of `--clients` concurrent clients (each its own connection and
     observation, one request in flight, running `--seconds` each), served three ways:
     batched (`--max_batch`, the server's defaults otherwise: on a CPU two batches on the
     model at once, the clients splitting into two groups); one at a time as openpi's
     `WebsocketPolicyServer` serves (its handler calls `policy.infer` on the event loop:
     recv -> unpack -> infer -> pack -> send, one request at a time across all clients;
     reproduced here with the same wire format, request parsing and `Policy` preprocessing,
     so only the serving loop differs); and this project's server with `max_batch=1` (one
     request per model call, but preprocessing and network I/O still overlap the model call,
     and on a CPU two calls run at once). The three servers run side by side and are
     measured in turn, `--rounds` times at each client count: a shared machine's slower or
     faster minute then falls on all three (runs minutes apart differed by 15% and more). The
     table gives each server's median requests/s and, as the speedup, the median of the
     rounds' ratios (each ratio of two runs seconds apart);
  3. the model alone: `Policy.predict` on a collated batch of 1, `--max_batch` / 2 and
     `--max_batch` rows (the clients' frames, kind "mask"), ms per call and per row, wall
     and process CPU: the model's share of a served request.
The throughput clients run on one asyncio loop in a separate process (robots are other
machines): they share this machine's cores with the server, not its interpreter lock. At the
largest client count the CPU each request cost is split by thread (the model's XLA threads,
the thread calling the model, the server's event loop; the clients' process), so the table
shows what bounds the batched rate. Prints a table and ends with one `BENCH {...}` JSON
line; targets: batched >= 3x one-at-a-time (openpi's loop) requests/s at 16 clients, p50
overhead <= 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _tiny_checkpoint(workdir: str, variant: str = "default") -> str:
    from pixelvla_jax import runs
    from pixelvla_jax.training import config as config_lib
    from pixelvla_jax.training import experiment

    run_dir = os.path.join(workdir, f"run_{variant}")
    try:
        runs.load_run(run_dir, load_params=False)
        return run_dir
    except Exception:  # noqa: BLE001 - not there yet: write it
        pass
    cfg = config_lib.load_config(f"pixelref:{variant}")
    cfg.data.data_dir = os.path.join(workdir, "data")
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 3
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    exp = experiment.setup(cfg, run_dir)
    experiment.save_checkpoint(exp, 0)
    exp.checkpointer.wait_until_finished()
    exp.checkpointer.close()
    return run_dir


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _model_alone(policy, scenes: list, sizes: list[int], reps: int) -> dict[int, dict]:
    """The jitted model call alone (`Policy.predict` on a collated batch of `size` rows, as
    the server runs it) -> {size: {"ms": wall per call, "ms_per_row": wall per row,
    "cpu_ms_per_row": process CPU per row}}, the median of `reps` calls (after 3 warm-up
    calls; the CPU time is the whole run's, all XLA threads included)."""
    rows = [
        policy.example(image, text, mask, "mask", seed=0, index=k)
        for k, (image, text, mask) in enumerate(scenes)
    ]
    out = {}
    for size in sizes:
        obs = policy.collate([rows[k % len(rows)] for k in range(size)])
        for _ in range(3):
            policy.predict(obs)
        wall, cpu = [], time.process_time()
        for _ in range(reps):
            t = time.perf_counter()
            policy.predict(obs)
            wall.append(time.perf_counter() - t)
        ms = float(np.median(wall)) * 1e3
        cpu_ms = (time.process_time() - cpu) * 1e3 / reps
        out[size] = {
            "ms": round(ms, 3),
            "ms_per_row": round(ms / size, 3),
            "cpu_ms_per_row": round(cpu_ms / size, 3),
        }
    return out


def _client_process(url: str, scenes: list, clients: int, seconds: float, out) -> None:
    """Runs in its own process: `clients` connections on one asyncio loop (the load
    generator: each connection one robot of openpi's protocol, one request in flight, the
    same msgpack-numpy messages as `pixelvla_jax.serving.client` sends), sending for
    `seconds`; puts (requests, summed batch sizes, elapsed seconds, process CPU seconds) on
    `out`. One event loop costs this machine's shared cores half the CPU per request of one
    thread per blocking client (0.11 vs 0.22 ms, measured at 16 clients): robots are other
    machines, so the less the generator takes from the server, the closer the figure."""
    import asyncio

    from websockets.asyncio.client import connect

    from pixelvla_jax.serving import msgpack_numpy
    from pixelvla_jax.serving.client import observation

    async def main() -> tuple[int, float, float, float]:
        conns = [
            await connect(url, compression=None, max_size=None, open_timeout=30)
            for _ in range(clients)
        ]
        messages = [
            msgpack_numpy.packb(observation(*scenes[k % len(scenes)])) for k in range(clients)
        ]
        for c, m in zip(conns, messages, strict=True):  # metadata, then one answered request
            msgpack_numpy.unpackb(await c.recv())
            await c.send(m)
            msgpack_numpy.unpackb(await c.recv())
        stop_at = time.perf_counter() + seconds

        async def run(k: int) -> tuple[int, float]:
            n, batch = 0, 0.0
            packer = msgpack_numpy.Packer()
            obs = observation(*scenes[k % len(scenes)])
            while time.perf_counter() < stop_at:
                await conns[k].send(packer.pack(obs))
                reply = await conns[k].recv()
                if isinstance(reply, str):
                    raise RuntimeError(f"the server answered with an error: {reply}")
                batch += msgpack_numpy.unpackb(reply)["policy_timing"]["batch_size"]
                n += 1
            return n, batch

        cpu, t = time.process_time(), time.perf_counter()
        counts = await asyncio.gather(*(run(k) for k in range(clients)))
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
        for c in conns:
            await c.close()
        return sum(n for n, _ in counts), sum(b for _, b in counts), elapsed, cpu

    out.put(asyncio.run(main()))


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's threads, by group: "XLA" (its compute threads),
    "event loop" (the policy server's thread), "model thread" (the executor calling
    `Policy.predict`: collate, dispatch), "other"."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # the thread ended
            continue
        name = names.get(int(tid), comm)
        group = (
            "XLA"
            if comm.startswith("tf_")
            else "event loop"
            if name == "policy-server"
            else "model thread"
            if name.startswith("policy_")
            else "other"
        )
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / hz
    return out


def _throughput(url: str, scenes: list, clients: int, seconds: float) -> dict:
    """`clients` concurrent clients for `seconds` -> {"rps", "mean_batch", "cpu_ms": CPU ms
    per request by thread group of this (the server's) process and "clients" (the load
    generator's process)}. The clients run in a process of their own, as robots are other
    machines: they share this machine's cores with the server but not its interpreter lock.
    (Linux: the server's thread CPU is read from /proc; elsewhere only the clients'.)"""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(url, scenes, clients, seconds, out))
    has_proc = os.path.isdir("/proc/self/task")
    before = _thread_cpu_s() if has_proc else {}
    proc.start()
    try:
        total, batch, elapsed, client_cpu = out.get(timeout=seconds + 120)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    after = _thread_cpu_s() if has_proc else {}
    # The server's window also holds the clients' connecting: a few ms of its threads' CPU.
    cpu_ms = {g: (after[g] - before.get(g, 0.0)) * 1e3 / max(total, 1) for g in after}
    cpu_ms["clients"] = client_cpu * 1e3 / max(total, 1)
    return {"rps": total / elapsed, "mean_batch": batch / max(total, 1), "cpu_ms": cpu_ms}


class OpenpiLoopServer:
    """openpi's serving loop (`openpi.serving.websocket_policy_server.WebsocketPolicyServer`,
    read from its source): per connection, send the metadata, then forever recv -> unpack ->
    `policy.infer(obs)` called on the event loop -> pack -> send. The model call blocks the
    loop, so requests of all clients run one at a time. `infer` here is this project's request
    parsing + `Policy` preprocessing + one batch-of-1 model call (the batched server's own
    pieces), so the comparison measures the serving loop alone."""

    def __init__(self, policy):
        from pixelvla_jax.serving.batching import PolicyRunner, accepted_prompt_kinds

        self.runner = PolicyRunner(policy, max_batch=1)
        self.kinds = accepted_prompt_kinds(policy)
        self.host, self.port = "127.0.0.1", 0
        self._started = None
        self._stop = None
        self._loop = None
        self._thread = None

    def infer(self, obs: dict) -> dict:
        from pixelvla_jax.serving.requests import parse_request

        t = time.perf_counter()
        actions, _ = self.runner.predict([self.runner.prepare(parse_request(obs, self.kinds))], 0)
        infer_ms = (time.perf_counter() - t) * 1e3
        return {"actions": actions[0], "policy_timing": {"batch_size": 1, "infer_ms": infer_ms}}

    async def _handler(self, ws) -> None:
        import websockets

        from pixelvla_jax.serving import msgpack_numpy

        await ws.send(msgpack_numpy.packb({"action_horizon": self.runner.policy.chunk_size}))
        while True:
            try:
                obs = msgpack_numpy.unpackb(await ws.recv())
                t = time.perf_counter()
                action = self.infer(obs)
                action["server_timing"] = {"infer_ms": (time.perf_counter() - t) * 1e3}
                await ws.send(msgpack_numpy.packb(action))
            except websockets.ConnectionClosed:
                break

    def __enter__(self) -> OpenpiLoopServer:
        import asyncio
        import threading

        from websockets.asyncio.server import serve

        self._started = threading.Event()

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve(
                self._handler, self.host, 0, compression=None, max_size=None
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                self._started.set()
                await self._stop.wait()

        self.runner.warmup()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(main()), name="policy-server", daemon=True
        )
        self._thread.start()
        if not self._started.wait(60):
            raise RuntimeError("the openpi-loop baseline server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"


def measure(policy, scenes: list, args, clients: list[int]) -> dict:
    """Latency and throughput of `policy` served (see the module docstring) -> figures."""
    from pixelvla_jax.serving.client import WebsocketClientPolicy, observation
    from pixelvla_jax.serving.server import PolicyServer, ServerThread

    image, text, mask = scenes[0]
    # 1. Direct calls.
    for _ in range(3):
        policy.act(image[None], [text], mask[None])
    direct = []
    for _ in range(args.requests):
        t = time.perf_counter()
        policy.act(image[None], [text], mask[None])
        direct.append(time.perf_counter() - t)
    direct_p50, direct_p99 = _percentiles(direct)
    sizes = sorted({1, max(1, args.max_batch // 2), args.max_batch})
    model = _model_alone(policy, scenes, sizes, reps=max(20, args.requests // 2))

    modes = ("batched", "one_at_a_time", "openpi_loop")
    rps: dict[str, dict[int, list[float]]] = {m: {n: [] for n in clients} for m in modes}
    batch_sizes: dict[int, list[float]] = {n: [] for n in clients}
    cpu_rounds: dict[str, list[dict]] = {m: [] for m in modes}
    top = max(clients)
    with contextlib.ExitStack() as stack:
        urls = {}
        for mode, max_batch in (("batched", args.max_batch), ("one_at_a_time", 1)):
            server = PolicyServer(
                policy, port=0, max_batch=max_batch, batch_window_ms=args.batch_window_ms
            )
            server.warmup()
            if mode == "batched":
                concurrent_batches = server.concurrent_batches
            urls[mode] = stack.enter_context(ServerThread(server)).url
        urls["openpi_loop"] = stack.enter_context(OpenpiLoopServer(policy)).url
        # 2. One client's latency through the server.
        with WebsocketClientPolicy(urls["batched"], connect_timeout_s=30) as client:
            obs = observation(image, text, mask)
            for _ in range(3):
                client.infer(obs)
            served = []
            for _ in range(args.requests):
                t = time.perf_counter()
                client.infer(obs)
                served.append(time.perf_counter() - t)
        served_p50, served_p99 = _percentiles(served)
        # 3. Throughput: the three servers (idle but for the one measured) in turn, `rounds`
        # times, so that a slower or faster minute of a shared machine falls on all of them.
        for _ in range(args.rounds):
            for n in clients:
                for mode in modes:
                    got = _throughput(urls[mode], scenes, n, args.seconds)
                    rps[mode][n].append(got["rps"])
                    if mode == "batched":
                        batch_sizes[n].append(got["mean_batch"])
                    if n == top:
                        cpu_rounds[mode].append(got["cpu_ms"])
    med = lambda xs: float(np.median(xs))
    results = {m: {n: med(v) for n, v in rps[m].items()} for m in modes}
    # Each round's ratio is of two runs seconds apart; the speedup is their median.
    ratios = {
        other: {
            n: [b / o for b, o in zip(rps["batched"][n], rps[other][n], strict=True)]
            for n in clients
        }
        for other in ("openpi_loop", "one_at_a_time")
    }
    speedup = {other: {n: med(r) for n, r in by_n.items()} for other, by_n in ratios.items()}
    cpu = {
        m: {g: float(np.mean([r.get(g, 0.0) for r in rows])) for g in rows[0]}
        for m, rows in cpu_rounds.items()
    }

    overhead = served_p50 - direct_p50
    print(f"(this server: up to {concurrent_batches} batches on the model at once)")
    print(f"{'one client, latency':<36}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'  direct Policy.act':<36}{direct_p50:>10.2f}{direct_p99:>10.2f}")
    print(f"{'  through the server':<36}{served_p50:>10.2f}{served_p99:>10.2f}")
    print(f"{'  server overhead per request (p50)':<36}{overhead:>10.2f}")
    print()
    print(f"{'model alone (Policy.predict), batch':<36}{'ms':>10}{'ms/row':>10}{'CPU ms/row':>12}")
    for size, m in model.items():
        print(
            f"{'  ' + str(size):<36}{m['ms']:>10.2f}{m['ms_per_row']:>10.3f}{m['cpu_ms_per_row']:>12.3f}"
        )
    print()
    print(
        f"{'clients':<9}{'batched req/s':>14}{'(mean batch)':>13}{'openpi loop':>13}{'speedup':>9}"
        f"{'ours, batch 1':>15}{'speedup':>9}   (medians of {args.rounds} rounds)"
    )
    for n in clients:
        b, o, one = (results[m][n] for m in ("batched", "openpi_loop", "one_at_a_time"))
        print(
            f"{n:<9}{b:>14.1f}{med(batch_sizes[n]):>13.1f}{o:>13.1f}"
            f"{speedup['openpi_loop'][n]:>8.2f}x{one:>15.1f}{speedup['one_at_a_time'][n]:>8.2f}x"
        )
    print(
        f"  each round at {top} clients, batched / openpi loop: "
        + ", ".join(f"{r:.2f}x" for r in ratios["openpi_loop"][top])
    )
    groups = ("XLA", "model thread", "event loop", "other", "clients")
    print(
        f"\nCPU ms per request at {top} clients, by thread (server process; the clients' process)"
    )
    print(f"{'':<15}" + "".join(f"{g:>14}" for g in groups) + f"{'total':>10}{'wall ms':>9}")
    for mode in ("batched", "openpi_loop"):
        row = cpu[mode]
        total = sum(row.get(g, 0.0) for g in groups)
        print(
            f"{mode:<15}"
            + "".join(f"{row.get(g, 0.0):>14.3f}" for g in groups)
            + f"{total:>10.3f}{1e3 / results[mode][top]:>9.3f}"
        )
    return {
        "direct_p50_ms": round(direct_p50, 3),
        "direct_p99_ms": round(direct_p99, 3),
        "served_p50_ms": round(served_p50, 3),
        "served_p99_ms": round(served_p99, 3),
        "p50_overhead_ms": round(overhead, 3),
        "model_alone": {str(size): m for size, m in model.items()},
        "requests_per_s": {
            mode: {str(n): round(v, 1) for n, v in r.items()} for mode, r in results.items()
        },
        "requests_per_s_rounds": {
            mode: {str(n): [round(x, 1) for x in v] for n, v in r.items()}
            for mode, r in rps.items()
        },
        "mean_batch": {str(n): round(med(v), 2) for n, v in batch_sizes.items()},
        f"cpu_ms_per_request_{top}": {
            mode: {g: round(v, 3) for g, v in cpu[mode].items()}
            for mode in ("batched", "openpi_loop")
        },
        f"batched_speedup_{top}": round(speedup["openpi_loop"][top], 2),
        f"batched_vs_ours_batch1_{top}": round(speedup["one_at_a_time"][top], 2),
        "concurrent_batches": concurrent_batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="", help="Served run (default: tiny ones).")
    parser.add_argument(
        "--variants",
        default="tiny,default",
        help="configs/pixelref.py variants served when no --checkpoint is given, each a "
        "freshly initialised run; the first carries the targets (tiny: the issue's tiny "
        "PixelRef model, L1 head; default: the README main job's model, discrete token head).",
    )
    parser.add_argument("--workdir", default="/tmp/serve_bench", help="Where the tiny runs go.")
    parser.add_argument("--requests", type=int, default=200, help="Latency samples.")
    parser.add_argument("--clients", default="1,4,16", help="Concurrent clients to measure.")
    parser.add_argument("--max_batch", type=int, default=16, help="Batched mode's max batch.")
    parser.add_argument("--batch_window_ms", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="Per throughput point.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Throughput rounds (each server in turn)."
    )
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]

    from pixelvla_jax.envs.pixelref import PixelRefEnv
    from pixelvla_jax.policy import Policy

    t0 = time.perf_counter()
    envs = [PixelRefEnv(1000 + k) for k in range(16)]
    scenes = [(e.image(), e.instruction, e.target_mask()) for e in envs]
    if args.checkpoint:
        served = {"checkpoint": args.checkpoint}
    else:
        served = {v: _tiny_checkpoint(args.workdir, v) for v in args.variants.split(",") if v}
    figures: dict = {}
    for name, checkpoint in served.items():
        policy = Policy.from_checkpoint(checkpoint)
        head = policy.model_cfg.head
        print(f"\n== {name}: {head} head, chunk {policy.chunk_size} ({checkpoint})")
        figures[name] = {"head": head, **measure(policy, scenes, args, clients)}
    load = os.getloadavg()[0]
    print(f"\nmachine load average (1 min): {load:.1f}; total {time.perf_counter() - t0:.0f} s")
    figures.update(
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, load_average=round(load, 2)
    )
    first = figures[next(iter(served))]
    targets = {"p50_overhead_ms": [first["p50_overhead_ms"], "<=", 5.0]}
    if max(clients) == 16:
        targets = {"batched_speedup_16": [first["batched_speedup_16"], ">=", 3.0], **targets}
    print("BENCH " + json.dumps({"name": "serve", "figures": figures, "targets": targets}))


if __name__ == "__main__":
    main()
