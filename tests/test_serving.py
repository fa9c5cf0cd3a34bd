"""The policy server (`pixelvla_jax.serving`): openpi's wire format, metadata then actions
equal to `Policy.act`, batching across concurrent clients, health check, API key, a battery of
bad requests that never disturbs another client, recording, and `evaluate --server`.

Every server binds to 127.0.0.1 on a free port; every loop is bounded in count and time.
"""

import concurrent.futures
import dataclasses
import glob
import http.client
import os
import re
import sys
import threading
import time

import ml_dtypes
import msgpack
import numpy as np
import pytest
import websockets
from websockets.sync.client import connect

from pixelvla_jax.data import prompts as prompts_lib
from pixelvla_jax.envs.pixelref import PixelRefEnv
from pixelvla_jax.envs.rollout import episode_seeds
from pixelvla_jax.policy import Policy
from pixelvla_jax.serving import msgpack_numpy
from pixelvla_jax.serving.client import (
    ActionChunkBroker,
    RemotePolicy,
    ServerError,
    WebsocketClientPolicy,
    observation,
)
from pixelvla_jax.serving.server import PolicyServer, ServerThread
from pixelvla_jax.training import config as config_lib

MAX_MESSAGE = 2**20  # 1 MiB: the oversized-message case sends more
TIMEOUT_S = 60  # every receive in these tests is bounded


# ---------------------------------------------------------------------- wire format


WIRE_ARRAYS = {
    "bool": np.array([[True, False], [False, True]]),
    "int8": np.arange(-4, 4, dtype=np.int8),
    "int16": np.arange(6, dtype=np.int16).reshape(2, 3),
    "int32": np.array([-(2**31), 2**31 - 1], np.int32),
    "int64": np.array([-(2**63), 2**63 - 1], np.int64),
    "uint8": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
    "uint16": np.array([0, 65535], np.uint16),
    "uint32": np.array([7], np.uint32),
    "uint64": np.array([2**64 - 1], np.uint64),
    "float16": np.array([0.5, -1.25, np.inf], np.float16),
    "float32": np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32),
    "float64": np.array([np.pi, np.nan, -0.0]),
    "big_endian": np.arange(3, dtype=">f4"),
    "unicode": np.array(["pick", "up the cube"]),
    "bytes": np.array([b"ab", b"c"]),
    "scalar_0d": np.array(3.5, np.float32),
    "empty": np.zeros((0, 3), np.uint8),
    "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T,
    "image": np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8),
}
WIRE_SCALARS = {
    "f32": np.float32(1.5),
    "f64": np.float64(-2.25),
    "i64": np.int64(-(2**40)),
    "u8": np.uint8(255),
    "bool": np.bool_(True),
    "f16": np.float16(0.125),
}


def test_wire_format_round_trips_every_dtype_and_shape():
    message = {
        "arrays": WIRE_ARRAYS,
        "scalars": WIRE_SCALARS,
        "nested": [{"x": np.ones((2, 2), np.float32)}, "text", 3, None, 1.5, b"raw"],
    }
    back = msgpack_numpy.unpackb(msgpack_numpy.packb(message))
    for name, a in WIRE_ARRAYS.items():
        b = back["arrays"][name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(b, a, err_msg=name)
    for name, a in WIRE_SCALARS.items():
        b = back["scalars"][name]
        if name == "f64":  # a subclass of float: msgpack packs it as a float (openpi too)
            assert type(b) is float and b == a
            continue
        assert isinstance(b, np.generic) and b.dtype == a.dtype and b == a, name
    np.testing.assert_array_equal(back["nested"][0]["x"], np.ones((2, 2)))
    assert back["nested"][1:] == ["text", 3, None, 1.5, b"raw"]
    # The same bytes as openpi's encoder (openpi_client/msgpack_numpy.py): tagged maps with
    # bytes keys, dtype.str, the C-order buffer and the shape.
    a = WIRE_ARRAYS["int16"]
    raw = msgpack.unpackb(msgpack_numpy.packb(a))
    assert raw == {
        b"__ndarray__": True,
        b"data": a.tobytes(),
        b"dtype": "<i2",
        b"shape": [2, 3],
    }
    raw = msgpack.unpackb(msgpack_numpy.packb(np.float32(1.5)))
    assert raw == {b"__npgeneric__": True, b"data": 1.5, b"dtype": "<f4"}
    # The Packer (openpi's client API) packs the same.
    assert msgpack_numpy.Packer().pack(message) == msgpack_numpy.packb(message)


@pytest.mark.parametrize(
    "value",
    [
        np.array([1, None], dtype=object),
        np.array([1 + 2j]),
        np.zeros(2, dtype=[("a", "<i4")]),
        np.zeros(2, dtype="V4"),
        np.zeros(2, dtype=ml_dtypes.bfloat16),
        np.complex64(1j),
    ],
    ids=["object", "complex", "structured", "void", "bfloat16", "complex_scalar"],
)
def test_wire_format_refuses_object_void_and_complex(value):
    with pytest.raises(msgpack_numpy.WireFormatError, match="refused"):
        msgpack_numpy.packb({"x": value})


@pytest.mark.parametrize(
    "tagged, match",
    [
        ({b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": "|O", b"shape": [2]}, "refused"),
        ({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<c8", b"shape": [1]}, "refused"),
        ({b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "|V4", b"shape": [1]}, "refused"),
        ({b"__ndarray__": True, b"data": b"\0" * 3, b"dtype": "<f4", b"shape": [1]}, "bytes"),
        ({b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}, "shape"),
        ({b"__ndarray__": True, b"data": b"", b"dtype": "nonsense", b"shape": [0]}, "dtype"),
        ({b"__npgeneric__": True, b"data": 1, b"dtype": "|O"}, "refused"),
    ],
)
def test_wire_format_decoding_checks_what_a_peer_sends(tagged, match):
    with pytest.raises(msgpack_numpy.WireFormatError, match=match):
        msgpack_numpy.unpackb(msgpack.packb({"x": tagged}))


def test_wire_format_refuses_bytes_that_are_not_msgpack():
    with pytest.raises(msgpack_numpy.WireFormatError, match="not a msgpack message"):
        msgpack_numpy.unpackb(b"\xc1 this is not msgpack")


def test_explicit_visual_prompts_make_the_sampled_layout():
    cfg = prompts_lib.PromptConfig()
    pts = prompts_lib.explicit_visual_prompt(
        prompts_lib.VisualPrompt("points", [[0.1, 0.2], [0.9, 0.9], [0.3, 0.4]], [1, 0, 1]),
        cfg,
        (8, 8),
    )
    assert pts["prompt_types"].tolist()[:4] == [1, 1, 2, 0]  # positives first, then negative
    np.testing.assert_allclose(pts["prompt_points"][:3], [[0.1, 0.2], [0.3, 0.4], [0.9, 0.9]])
    box = prompts_lib.explicit_visual_prompt(
        prompts_lib.VisualPrompt("box", [[0.8, 0.1], [0.2, 0.7]]), cfg, (8, 8)
    )
    np.testing.assert_allclose(box["prompt_points"][:2], [[0.2, 0.1], [0.8, 0.7]])
    assert prompts_lib.prompt_kind(box) == "box"
    line = prompts_lib.explicit_visual_prompt(
        prompts_lib.VisualPrompt("line", [[0.0, 0.5], [0.4, 0.5], [0.4, 0.9]]), cfg, (8, 8)
    )
    n = cfg.line_points
    assert (line["prompt_types"][:n] == 3).all() and (line["prompt_types"][n:] == 0).all()
    np.testing.assert_allclose(line["prompt_points"][[0, n - 1]], [[0.0, 0.5], [0.4, 0.9]])
    np.testing.assert_allclose(line["prompt_points"][(n - 1) // 2], [0.4, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        prompts_lib.VisualPrompt("points", [[0.1, 0.1]], [0])


# ---------------------------------------------------------------------- a served policy


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny PixelRef run trained for 16 steps on data it generates: the checkpoint every
    test here serves (and the one place the suite checks that few steps lower the loss)."""
    from pixelvla_jax.training import experiment

    root = tmp_path_factory.mktemp("serving")
    cfg = config_lib.load_config("pixelref:tiny")
    cfg.data.data_dir = str(root / "data")
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 6
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.train.peak_flops = 1e12
    cfg.train.num_steps = cfg.optim.total_steps = 16
    cfg.train.checkpoint_every = 16
    cfg.optim.lr = 2e-3
    history = experiment.train(cfg, str(root / "run"))  # generates the dataset first
    return str(root / "run"), str(root / "data"), history


@pytest.fixture(scope="module")
def workdir(trained_run):
    return trained_run[0]


def test_few_training_steps_on_generated_data_lower_the_loss(trained_run):
    run_dir, data_dir, history = trained_run
    assert os.path.isdir(os.path.join(data_dir, "pixelref", "1.0.0"))
    losses = np.array([h["loss"] for h in history])
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < 0.7 * losses[:4].mean(), losses
    assert Policy.from_checkpoint(run_dir).step == 16


@pytest.fixture(scope="module")
def policy(workdir):
    return Policy.from_checkpoint(workdir)


@pytest.fixture(scope="module")
def served(policy, tmp_path_factory):
    server = PolicyServer(
        policy,
        port=0,
        max_batch=8,
        batch_window_ms=20,
        max_message_bytes=MAX_MESSAGE,
        record_dir=str(tmp_path_factory.mktemp("record")),
    )
    server.warmup()
    with ServerThread(server) as thread:
        yield thread


def _scene(seed):
    env = PixelRefEnv(seed)
    return env.image(), env.instruction, env.target_mask()


def _client(url, **kwargs):
    return WebsocketClientPolicy(url, connect_timeout_s=TIMEOUT_S, **kwargs)


def test_metadata_then_actions_equal_policy_act(served, policy):
    with _client(served.url) as client:
        meta = client.get_server_metadata()
        assert meta["protocol"] == "openpi-websocket-msgpack"
        assert (meta["action_horizon"], meta["action_dim"]) == (4, 7)
        assert meta["image_size"] == [56, 56] and meta["cameras"] == ["observation/image"]
        assert meta["dataset_statistics_key"] == "pixelref"
        assert meta["prompt_kinds"] == ["points", "line", "box", "mask", "none"]
        assert meta["model_family"] == "pixelvla" and meta["action_head"] == "l1"
        image, text, mask = _scene(11)
        for kind in ("mask", "points", "line", "box", "none"):
            reply = client.infer(observation(image, text, mask, kind, seed=5))
            want = policy.act(image[None], [text], mask[None], [kind], seed=5)[0]
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (4, 7)
            np.testing.assert_allclose(reply["actions"], want, atol=1e-5, err_msg=kind)
            assert set(reply["server_timing"]) <= {"infer_ms", "prev_total_ms"}
            assert reply["policy_timing"]["batch_size"] == 1
        assert "prev_total_ms" in reply["server_timing"]
        # openpi's LIBERO client's keys (wrist image and state are accepted, unused), a frame
        # of another size (preprocessed by the policy's own path) and [seed, index] seeds.
        big = np.kron(image, np.ones((2, 3, 1), np.uint8))  # 112 x 168
        big_mask = np.kron(mask, np.ones((2, 3), np.uint8))
        obs = observation(big, text, big_mask, "points", seed=(9, 3))
        obs["observation/wrist_image"] = np.zeros((32, 32, 3), np.uint8)
        obs["observation/state"] = np.zeros(8, np.float32)
        got = client.infer(obs)["actions"]
        rows = np.stack([big] * 4)
        want = policy.act(rows, [text] * 4, np.stack([big_mask] * 4), "points", seed=9)[3]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_explicit_visual_prompts_equal_policy_act(served, policy):
    image, text, mask = _scene(12)
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    centre = [cols.mean() + 0.5, rows.mean() + 0.5]
    cases = {
        "points": (
            {"visual_prompt/points": np.array([centre, [1.0, 1.0]], np.float32),
             "visual_prompt/point_labels": np.array([1, 0], np.int32)},
            prompts_lib.VisualPrompt("points", [[centre[0] / w, centre[1] / h], [1 / w, 1 / h]],
                                     [True, False]),
        ),
        "box": (
            {"visual_prompt/box": np.array([cols.min(), rows.min(), cols.max() + 1,
                                            rows.max() + 1], np.float64)},
            prompts_lib.VisualPrompt("box", [[cols.min() / w, rows.min() / h],
                                             [(cols.max() + 1) / w, (rows.max() + 1) / h]]),
        ),
        "line": (
            {"visual_prompt/line": np.array([[cols.min() + 0.5, centre[1]],
                                             [cols.max() + 0.5, centre[1]]], np.float32)},
            prompts_lib.VisualPrompt("line", [[(cols.min() + 0.5) / w, centre[1] / h],
                                              [(cols.max() + 0.5) / w, centre[1] / h]]),
        ),
    }  # fmt: skip
    with _client(served.url) as client:
        for kind, (keys, prompt) in cases.items():
            got = client.infer({"observation/image": image, "prompt": text, **keys})["actions"]
            want = policy.act(image[None], [text], visual_prompts=[prompt])[0]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=kind)
            unprompted = policy.act(image[None], [text], prompt_kinds=["none"])[0]
            assert np.abs(got - unprompted).max() > 1e-4, kind  # the prompt reached the model
        # A mask prompt is the "mask" kind.
        got = client.infer(
            {"observation/image": image, "prompt": text, "visual_prompt/mask": mask}
        )["actions"]
        want = policy.act(image[None], [text], mask[None], ["mask"])[0]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_server_rows_are_policy_preprocess_arrays(policy):
    """The server builds each request's row as it arrives (`PolicyRunner.prepare`:
    `Policy.example`) and stacks a batch once (`Policy.collate`, padded to a bucket): the
    same arrays as `Policy.preprocess` on the whole batch, every prompt kind, row for row."""
    from pixelvla_jax.serving.batching import PolicyRunner
    from pixelvla_jax.serving.requests import parse_request

    scenes = [_scene(300 + k) for k in range(5)]
    kinds = ["mask", "points", "line", "box", "none"]
    images, texts, masks = (np.stack([s[0] for s in scenes]), [s[1] for s in scenes],
                            np.stack([s[2] for s in scenes]))  # fmt: skip
    want = policy.preprocess(images, texts, masks, kinds, seed=7)
    runner = PolicyRunner(policy, max_batch=8)
    rows = [
        runner.prepare(parse_request(observation(i, t, m, k, seed=[7, n]), kinds))
        for n, (i, t, m, k) in enumerate(zip(images, texts, masks, kinds, strict=True))
    ]
    got = policy.collate(rows, pad_to=8)
    for name, leaf in vars(want).items():
        if leaf is None:
            assert getattr(got, name) is None, name
            continue
        got_leaf = getattr(got, name)
        assert got_leaf.shape == (8, *leaf.shape[1:]) and got_leaf.dtype == leaf.dtype, name
        np.testing.assert_array_equal(got_leaf[:5], leaf, err_msg=name)
        np.testing.assert_array_equal(got_leaf[5:], np.repeat(leaf[:1], 3, axis=0), err_msg=name)


@dataclasses.dataclass
class _FakeRequest:
    index: int
    seed: int = 0


class _FakeRunner:
    """The model side as the Batcher sees it: each call takes `call_s` and records its size
    and how many calls ran at once; a request's actions are its index."""

    def __init__(self, call_s: float = 0.0):
        self.call_s = call_s
        self.batches = []
        self.running = self.most_at_once = 0
        self._lock = threading.Lock()

    def run(self, rows, seed):
        from pixelvla_jax.serving.batching import RowResult

        with self._lock:
            self.batches.append(len(rows))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.call_s)
        with self._lock:
            self.running -= 1
        return [RowResult(actions=np.full((1, 7), r.index, np.float32)) for r in rows]


async def _closed_loop_clients(runner, n_clients, requests_each, slots, window_s=60.0):
    """`n_clients` clients of openpi's protocol (one request in flight each, the next sent as
    the reply arrives) against a Batcher -> each client's replies, checked to be its own."""
    import asyncio

    from pixelvla_jax.serving.batching import Batcher

    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        batcher = Batcher(runner, 16, window_s, lambda: n_clients, pool, slots)
        task = asyncio.create_task(batcher.run())

        async def client(k):
            for i in range(requests_each):
                result = await batcher.submit(_FakeRequest(1000 * k + i))
                assert int(result.actions[0, 0]) == 1000 * k + i

        try:
            await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(n_clients))), 30)
        finally:
            task.cancel()


async def _bursts(runner, arrivals, window_s):
    """16 clients connected, one slot: `arrivals` requests come in bursts 50 ms apart (the
    rest of the clients stay silent) -> checked that each request gets its own result."""
    import asyncio

    from pixelvla_jax.serving.batching import Batcher

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batcher = Batcher(runner, 16, window_s, lambda: 16, pool, 1)
        task = asyncio.create_task(batcher.run())
        futures = []
        for n in arrivals:
            futures += [batcher.submit(_FakeRequest(len(futures) + k)) for k in range(n)]
            await asyncio.sleep(0.05)
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)
        task.cancel()
    assert [int(r.actions[0, 0]) for r in results] == list(range(len(futures)))


def test_one_model_slot_waits_for_every_connected_client():
    """16 clients connected, a 60 s window, one slot: the requests arriving in three bursts
    are one batch of 16 (every client has one waiting); one client never waits."""
    import asyncio

    runner = _FakeRunner()
    asyncio.run(_bursts(runner, [5, 3, 8], window_s=60.0))
    assert runner.batches == [16]
    runner = _FakeRunner()
    t = time.perf_counter()
    asyncio.run(_closed_loop_clients(runner, 1, 5, slots=1))
    assert runner.batches == [1] * 5 and time.perf_counter() - t < 10  # not the 60 s window


def test_two_model_slots_split_the_clients_into_two_overlapping_groups():
    """Two slots, 16 closed-loop clients: batches of 8 (each its share of the clients not in
    a running batch), two on the model at once; each client gets its own replies."""
    import asyncio

    runner = _FakeRunner(call_s=0.2)
    asyncio.run(_closed_loop_clients(runner, 16, 3, slots=2))
    assert runner.batches == [8] * 6, runner.batches
    assert runner.most_at_once == 2
    runner = _FakeRunner(call_s=0.05)  # 4 clients: groups of 2; 1 client: batches of 1
    asyncio.run(_closed_loop_clients(runner, 4, 3, slots=2))
    assert runner.batches == [2] * 6, runner.batches
    runner = _FakeRunner()
    asyncio.run(_closed_loop_clients(runner, 1, 3, slots=2))
    assert runner.batches == [1] * 3


def test_a_batch_closes_after_the_window_when_clients_stay_silent():
    """16 clients connected but 3 sending: the batch runs `window_s` after its first request
    with the 3 that came."""
    import asyncio

    runner = _FakeRunner()
    t = time.perf_counter()
    asyncio.run(_bursts(runner, [3], window_s=0.3))
    elapsed = time.perf_counter() - t
    assert runner.batches == [3] and 0.3 <= elapsed < 10, (runner.batches, elapsed)


def test_model_threads_run_nicer_than_the_event_loop(policy):
    """The server's model threads are `model_thread_nice` steps nicer than the thread that
    made the server (Linux, where niceness is per thread)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread niceness is Linux's")

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice()
    for step, want in ((7, min(19, base + 7)), (0, base)):
        server = PolicyServer(policy, port=0, max_batch=1, model_thread_nice=step)
        try:
            got = {server._executor.submit(nice).result() for _ in range(4)}
        finally:
            server.close()
        assert got == {want}, (step, got)
    assert nice() == base  # the caller's own priority is unchanged


def test_eight_concurrent_clients_get_their_own_actions_from_batched_calls(served, policy):
    n, rounds = 8, 4
    scenes = [_scene(100 + k) for k in range(n)]
    wants = [
        policy.act(img[None], [text], mask[None], ["mask"], seed=k)[0]
        for k, (img, text, mask) in enumerate(scenes)
    ]
    clients = [_client(served.url) for _ in range(n)]

    def run(k):
        img, text, mask = scenes[k]
        return [
            clients[k].infer(observation(img, text, mask, "mask", seed=k)) for _ in range(rounds)
        ]

    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(run, range(n), timeout=TIMEOUT_S * 2))
    finally:
        for c in clients:
            c.close()
    batch_sizes = []
    for k in range(n):
        for reply in replies[k]:
            np.testing.assert_allclose(reply["actions"], wants[k], atol=1e-5, err_msg=str(k))
            batch_sizes.append(reply["policy_timing"]["batch_size"])
    assert max(batch_sizes) > 1, batch_sizes  # requests of several clients shared a call
    assert all(r["policy_timing"]["padded_batch"] in (1, 2, 4, 8) for rs in replies for r in rs)


def test_health_check(served):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT_S)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"OK\n")
    conn.close()


def test_api_key_accepted_and_refused(policy):
    server = PolicyServer(policy, port=0, max_batch=1, api_key="s3cret-key")
    server.warmup()
    image, text, mask = _scene(21)
    with ServerThread(server) as thread:
        with _client(thread.url, api_key="s3cret-key") as client:
            got = client.infer(observation(image, text, mask))["actions"]
            want = policy.act(image[None], [text], mask[None])[0]
            np.testing.assert_allclose(got, want, atol=1e-5)
        for key in ("wrong-key", None):
            with pytest.raises(websockets.InvalidStatus) as err:
                _client(thread.url, api_key=key)
            assert err.value.response.status_code == 401
        conn = http.client.HTTPConnection("127.0.0.1", thread.port, timeout=TIMEOUT_S)
        conn.request("GET", "/healthz")  # health checks need no key
        assert conn.getresponse().status == 200
        conn.close()


def _raw(url):
    ws = connect(url, compression=None, max_size=None, open_timeout=TIMEOUT_S)
    msgpack_numpy.unpackb(ws.recv(timeout=TIMEOUT_S))  # the metadata
    return ws


def _good(image, text, mask):
    return msgpack_numpy.packb(observation(image, text, mask))


def _lost_mask_obs(text):
    """A 300 px frame whose target mask is one pixel: gone once resized to the model's 56 px,
    so a "points" prompt cannot be drawn from it."""
    image = np.zeros((300, 300, 3), np.uint8)
    mask = np.zeros((300, 300), np.uint8)
    mask[3, 3] = 1
    return msgpack_numpy.packb(observation(image, text, mask, "points"))


def test_a_row_the_policy_refuses_fails_alone_in_its_batch(policy):
    """A batch whose middle request the policy's preprocessing refuses: that request gets the
    ValueError, the others their own `Policy.act` actions from one call without it."""
    from pixelvla_jax.serving.batching import PolicyRunner
    from pixelvla_jax.serving.requests import parse_request

    kinds = ("none", "mask", "points", "line", "box")
    (i0, t0, m0), (i1, t1, m1) = _scene(41), _scene(42)
    requests = [
        parse_request(msgpack_numpy.unpackb(m), kinds)
        for m in (
            msgpack_numpy.packb(observation(i0, t0, m0, "mask")),
            _lost_mask_obs(t0),
            msgpack_numpy.packb(observation(i1, t1, m1, "mask")),
        )
    ]
    runner = PolicyRunner(policy, max_batch=4)
    results = runner.run(requests, seed=0)
    assert isinstance(results[1].error, ValueError) and results[1].actions is None
    assert "empty after the resize" in str(results[1].error)
    for r, (image, text, mask) in ((results[0], (i0, t0, m0)), (results[2], (i1, t1, m1))):
        assert r.error is None and r.timing["batch_size"] == 2 and r.timing["padded_batch"] == 2
        want = policy.act(image[None], [text], mask[None], ["mask"])[0]
        np.testing.assert_allclose(r.actions, want, atol=1e-5)
    assert (runner.calls, runner.rows) == (1, 2)


def _bad_cases(image, text, mask):
    def obs(**changes):
        o = observation(image, text, mask)
        o.update(changes)
        return msgpack_numpy.packb({k: v for k, v in o.items() if v is not None})

    object_array = msgpack.packb(
        {
            "observation/image": {
                b"__ndarray__": True,
                b"data": b"\0" * 8,
                b"dtype": "|O",
                b"shape": [1],
            },
            "prompt": text,
        }
    )
    return {
        "not msgpack": (b"\xc1\xc1 not msgpack", "not msgpack"),
        "text frame": ("hello", "binary msgpack"),
        "not a dict": (msgpack_numpy.packb([image, text]), "msgpack map"),
        "missing image": (obs(**{"observation/image": None}), "missing key 'observation/image'"),
        "missing prompt": (obs(prompt=None), "missing key 'prompt'"),
        "image shape": (
            obs(**{"observation/image": image[..., :2].copy()}),
            r"observation/image: expected uint8 \[H, W, 3\]",
        ),
        "image dtype": (
            obs(**{"observation/image": image.astype(np.float32)}),
            "observation/image: expected uint8",
        ),
        "object array": (object_array, "refused"),
        "mask size": (
            obs(**{"observation/target_mask": mask[:-3]}),
            "observation/target_mask: shape",
        ),
        "NaN state": (
            obs(**{"observation/state": np.array([0.0, np.nan], np.float32)}),
            "observation/state: contains NaN",
        ),
        "unknown prompt kind": (obs(prompt_kind="scribble"), "'scribble' is not a prompt kind"),
        "kind without mask": (
            obs(prompt_kind="box", **{"observation/target_mask": None}),
            "needs a non-empty observation/target_mask",
        ),
        "empty prompt": (obs(prompt="   "), "non-empty str"),
        # Refused by the policy's preprocessing on the model thread, not by the parser.
        "mask lost in the resize": (_lost_mask_obs(text), "empty after the resize"),
        "points outside": (
            obs(**{"visual_prompt/points": np.array([[500.0, 2.0]])}),
            "outside",
        ),
        "two visual prompts": (
            obs(**{"visual_prompt/box": np.array([0, 0, 5, 5]), "visual_prompt/line": [[1, 1]]}),
            "at most one visual prompt",
        ),
        "bad seed": (obs(seed=-3), "seed"),
    }


def test_bad_requests_are_answered_while_another_client_keeps_acting(served, policy):
    image, text, mask = _scene(31)
    want = policy.act(image[None], [text], mask[None])[0]
    bystander = _client(served.url)

    def bystander_is_fine():
        got = bystander.infer(observation(image, text, mask))["actions"]
        np.testing.assert_allclose(got, want, atol=1e-5)

    bystander_is_fine()
    for name, (message, match) in _bad_cases(image, text, mask).items():
        ws = _raw(served.url)
        ws.send(message)
        answer = ws.recv(timeout=TIMEOUT_S)
        assert isinstance(answer, str), name  # openpi's clients raise on a text frame
        assert re.search(match, answer), (name, answer)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT_S)
        assert closed.value.rcvd.code == 1008, name
        bystander_is_fine()

    # Our client raises ServerError with the server's words.
    with _client(served.url) as client, pytest.raises(ServerError, match="NaN"):
        client.infer({**observation(image, text, mask), "observation/state": [np.nan]})
    bystander_is_fine()

    # An oversized message: refused by the websocket layer (1009), the server goes on.
    ws = _raw(served.url)
    huge = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB > MAX_MESSAGE
    with pytest.raises(websockets.ConnectionClosed) as closed:
        ws.send(msgpack_numpy.packb(observation(huge, text)))
        ws.recv(timeout=TIMEOUT_S)
    assert closed.value.rcvd.code == 1009
    bystander_is_fine()

    # A client that disconnects mid-request: its reply has nowhere to go; nothing else fails.
    for _ in range(3):
        ws = _raw(served.url)
        ws.send(_good(image, text, mask))
        ws.close()
    bystander_is_fine()
    # A client that vanishes without a close handshake.
    ws = _raw(served.url)
    ws.send(_good(image, text, mask))
    ws.socket.close()
    bystander_is_fine()
    bystander.close()


def test_deadline_and_recording(policy, tmp_path):
    image, text, mask = _scene(41)
    server = PolicyServer(policy, port=0, max_batch=1, request_timeout_s=1e-6)
    with (
        ServerThread(server) as thread,
        _client(thread.url) as client,
        pytest.raises(ServerError, match="deadline"),
    ):
        client.infer(observation(image, text, mask))
    record = str(tmp_path / "record")
    server = PolicyServer(policy, port=0, max_batch=2, record_dir=record)
    with ServerThread(server) as thread:
        with _client(thread.url) as client:
            reply = client.infer(observation(image, text, mask))
        ws = _raw(thread.url)
        ws.send(b"\xc1 junk")
        assert isinstance(ws.recv(timeout=TIMEOUT_S), str)
        ws.close()
    files = sorted(glob.glob(os.path.join(record, "*.msgpack")))
    assert len(files) == 2
    with open(files[0], "rb") as f:
        first = msgpack_numpy.unpackb(f.read())
    np.testing.assert_array_equal(first["request"]["observation/image"], image)
    np.testing.assert_array_equal(first["reply"]["actions"], reply["actions"])
    with open(files[1], "rb") as f:
        second = msgpack_numpy.unpackb(f.read())
    assert "not msgpack" in second["error"] and second["request"] is None


def test_action_chunk_broker_hands_out_one_action_per_call(served, policy):
    image, text, mask = _scene(51)
    want = policy.act(image[None], [text], mask[None])[0]
    with _client(served.url) as client:
        broker = ActionChunkBroker(client, action_horizon=3)
        got = [broker.infer(observation(image, text, mask)) for _ in range(4)]
    for t, reply in enumerate(got):
        assert reply["actions"].shape == (7,)
        np.testing.assert_allclose(reply["actions"], want[t % 3], atol=1e-5)


def test_evaluate_through_the_server_gives_the_local_table(served, workdir, tmp_path):
    from pixelvla_jax import evaluate
    from pixelvla_jax.envs.rollout import format_table

    kinds = ("mask", "points", "line", "none")
    common = dict(trials=4, prompt_kinds=kinds, seed=3, videos=0, batch_size=4)
    local = evaluate.evaluate(workdir, "pixelref", out_dir=str(tmp_path / "local"), **common)
    remote = evaluate.evaluate_on_server(
        served.url, "pixelref", out_dir=str(tmp_path / "remote"), connections=4, **common
    )
    assert format_table(remote) == format_table(local)
    for kind in kinds:
        strip = lambda eps: [(e["seed"], e["success"], e["steps"], e["outcome"]) for e in eps]  # noqa: E731
        assert strip(remote["episodes"][kind]) == strip(local["episodes"][kind]), kind
    assert os.path.exists(tmp_path / "remote" / "results.json")
    assert episode_seeds(3, 4) == [e["seed"] for e in remote["episodes"]["mask"]]


def test_remote_policy_matches_policy_act_row_for_row(served, policy):
    scenes = [_scene(60 + k) for k in range(5)]
    images = np.stack([s[0] for s in scenes])
    texts = [s[1] for s in scenes]
    masks = np.stack([s[2] for s in scenes])
    remote = RemotePolicy(served.url, connections=3, connect_timeout_s=TIMEOUT_S)
    try:
        assert remote.chunk_size == policy.chunk_size
        got = remote.act(images, texts, masks, ["points", "mask", "line", "box", "none"], seed=4)
    finally:
        remote.close()
    want = policy.act(images, texts, masks, ["points", "mask", "line", "box", "none"], seed=4)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------- openpi's own client

OPENPI_CLIENT = "openpi-client==0.1.2"


@pytest.fixture(scope="module")
def openpi_client(tmp_path_factory):
    """openpi's published client package, unchanged. Its metadata pins numpy<2, which the
    project's environment cannot take, so it is installed here without dependencies into a
    directory of its own (its imports, msgpack, websockets, dm-tree and numpy, are here)."""
    import importlib
    import subprocess
    import sys

    target = tmp_path_factory.mktemp("openpi_client")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        + ["--disable-pip-version-check", OPENPI_CLIENT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.skip(f"could not install {OPENPI_CLIENT} from the package index: {done.stderr}")
    sys.path.insert(0, str(target))
    try:
        return (
            importlib.import_module("openpi_client.websocket_client_policy"),
            importlib.import_module("openpi_client.action_chunk_broker"),
            importlib.import_module("openpi_client.msgpack_numpy"),
        )
    finally:
        sys.path.remove(str(target))


def test_openpi_wire_format_is_ours(openpi_client):
    """Bytes packed by openpi's msgpack_numpy decode with ours and back, arrays and scalars."""
    theirs = openpi_client[2]
    payload = {"arrays": dict(WIRE_ARRAYS), "scalars": dict(WIRE_SCALARS), "text": "pick"}
    del payload["arrays"]["big_endian"]  # openpi packs `dtype.str`: both sides keep it
    for packed in (theirs.packb(payload), msgpack_numpy.packb(payload)):
        for unpack in (theirs.unpackb, msgpack_numpy.unpackb):
            back = unpack(packed)
            for key, value in payload["arrays"].items():
                np.testing.assert_array_equal(back["arrays"][key], value, err_msg=key)
                assert back["arrays"][key].dtype == value.dtype, key
            for key, value in payload["scalars"].items():
                # np.float64 is a Python float, which msgpack packs natively on both sides.
                assert back["scalars"][key] == value
                assert np.asarray(back["scalars"][key]).dtype == value.dtype, key
            assert back["text"] == "pick"


def test_openpi_client_unchanged_gets_metadata_and_policy_actions(served, policy, openpi_client):
    """openpi's WebsocketClientPolicy and ActionChunkBroker, as its LIBERO example uses them."""
    client_lib, broker_lib, _ = openpi_client
    client = client_lib.WebsocketClientPolicy(host=served.url)
    try:
        meta = client.get_server_metadata()
        assert (meta["action_horizon"], meta["action_dim"]) == (4, 7)
        image, text, mask = _scene(71)
        obs = {
            "observation/image": image,
            "observation/wrist_image": np.zeros_like(image),
            "observation/state": np.zeros(8, np.float32),
            "observation/target_mask": mask.astype(np.uint8),
            "prompt": text,
        }
        want = policy.act(image[None], [text], mask[None], ["mask"])[0]  # the default kind
        got = client.infer(obs)["actions"]
        np.testing.assert_allclose(got, want, atol=1e-5)
        broker = broker_lib.ActionChunkBroker(client, action_horizon=3)
        for t in range(4):
            step = broker.infer(obs)["actions"]
            np.testing.assert_allclose(step, want[t % 3], atol=1e-5, err_msg=str(t))
        with pytest.raises(RuntimeError, match="observation/image"):
            client.infer({"prompt": text})  # an error frame: openpi's client raises on it
    finally:
        client._ws.close()  # noqa: SLF001 - openpi's client has no close()


def test_wrist_image_and_state_reach_the_policy_preprocessing():
    """The server's runner hands `observation/wrist_image` and `observation/state` to
    `Policy.example` (a run trained with them uses them; others ignore them)."""
    from pixelvla_jax.serving.batching import PolicyRunner
    from pixelvla_jax.serving.requests import parse_request

    seen = {}

    class Recorder:
        def example(self, *args, **kwargs):
            seen.update(kwargs)
            return "row"

    image = np.zeros((20, 30, 3), np.uint8)
    wrist = np.full((16, 16, 3), 7, np.uint8)
    state = np.arange(8, dtype=np.float32)
    obs = {
        "observation/image": image,
        "observation/wrist_image": wrist,
        "observation/state": state,
        "prompt": "pick the cube",
    }
    assert PolicyRunner(Recorder(), 1).prepare(parse_request(obs, ("none",))) == "row"
    np.testing.assert_array_equal(seen["wrist_image"], wrist)
    np.testing.assert_array_equal(seen["state"], state)
    del obs["observation/wrist_image"], obs["observation/state"]
    PolicyRunner(Recorder(), 1).prepare(parse_request(obs, ("none",)))
    assert seen["wrist_image"] is None and seen["state"] is None
