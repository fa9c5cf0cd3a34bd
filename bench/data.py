"""Data pipeline benchmark: training-batch throughput and per-sample read cost.

    python bench/data.py [--batches=20] [--threads=-1] [--workers=0]
        [--libero_episodes=50] [--libero_steps=60] [--libero_batches=40]

`--threads=-1` is the pipeline's default reader count, min(4, the usable CPUs): 2 here.

1. Throughput: samples/s of the full pipeline (decode, the OpenVLA augmentation resampled
   from the 256 px frame to 224 with the mask, visual prompt, tokens, normalisation,
   batching) at batch 32, on a generated LIBERO-format dataset with pixel masks
   (data-sources' generator: flat-coloured frames).
2. Read cost: time of `StepDataset[i]` (random i; fastest of 7 alternating rounds) on a dataset of 50-step episodes vs
   one of 500-step episodes; the step-level layout should make the two equal.
3. LIBERO-like data (issue 22's conditions): 50 episodes of 256 x 256 textured frames with
   per-frame sensor noise, JPEG quality 95 (the bytes per frame of rendered scenes, ~30 KB),
   both cameras stored (the wrist camera unused, as in OpenVLA's LIBERO config), batch 32,
   224 px, augmentation and visual prompts on, q01/q99 normalisation; at action chunk 1 and
   8. Each configuration runs in a fresh process (so that its peak memory is its own):
   samples/s, CPU ms per sample and cores used (CPU time of the process and its Grain
   worker processes over wall time), time to the first batch (opening the dataset,
   building the pipeline, first batch), peak resident memory (the process tree's summed
   RSS, sampled every 20 ms).

Prints a table and ends with one `BENCH {...}` JSON line with issue 22's targets (on
an idle 2-core machine: >= 770 samples/s at chunk 1, <= 2.7 ms CPU per sample, peak RSS <=
600 MB, read-time ratio <= 1.5). On a shared machine the CPU per sample is the figure to
read (other jobs' load lowers samples/s far more than this process's CPU time, though that
too rises, by up to ~1.5x at a load average of 5-6 on 2 cores). Runs in about 3
minutes on 2 CPU cores, most of it writing the synthetic datasets once; a smoke run:
`--batches=3 --reads=20 --libero_episodes=4 --libero_steps=20 --libero_batches=4`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pixelvla_jax.data import generate, pipeline, step_index  # noqa: E402
from pixelvla_jax.data.tokenizer import Tokenizer, train_tiny_tokenizer  # noqa: E402

BATCH = 32
IMAGE = 256  # LIBERO's frame size; the pipeline resizes to 224
LIBERO_NOISE_STD = 3.0  # grey levels of sensor noise: ~30 KB per 256 px JPEG at quality 95


def write_dataset(root: str, name: str, num_episodes: int, length: int, **frames) -> str:
    """A synthetic LIBERO-layout dataset with pixel annotations under `root/name`; `frames`:
    generate.write_synthetic_dataset's frame options. Returns its version directory."""
    data_dir = os.path.join(root, name)
    generate.write_synthetic_dataset(
        data_dir,
        fmt="libero",
        num_episodes=num_episodes,
        episode_lengths=length,
        image_size=IMAGE,
        with_annotations=True,
        name="synthetic_libero",
        seed=0,
        **frames,
    )
    return os.path.join(data_dir, "synthetic_libero")


def write_libero_like(root: str, num_episodes: int, length: int) -> str:
    """Issue 22's LIBERO-like dataset: textured, sensor-noisy 256 px frames at JPEG quality
    95, both cameras; returns its version directory."""
    return write_dataset(
        root,
        "libero_like",
        num_episodes,
        length,
        wrist=True,
        noise_std=LIBERO_NOISE_STD,
        jpeg_quality=95,
    )


class TreeUsage:
    """CPU seconds and peak summed RSS of this process and its children (Grain's worker
    processes), the RSS sampled every `interval` s by a thread."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree(self):
        import psutil

        procs = [self._me]
        with contextlib.suppress(psutil.Error):
            procs += self._me.children(recursive=True)
        return procs

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(self._interval):
            rss = 0
            for p in self._tree():
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _own_peak_rss() -> int:
    """This process's peak resident set in bytes (/proc's VmHWM, reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_pipeline(args: dict) -> dict:
    """One pipeline configuration, in this (fresh) process: see the module docstring."""
    usage = TreeUsage()
    start = time.perf_counter()
    source = step_index.StepDataset(
        args["dataset_dir"], action_chunk=args["chunk"], cache_dir=args["cache_dir"]
    )
    cfg = pipeline.DataConfig(
        batch_size=BATCH,
        image_size=224,
        action_chunk=args["chunk"],
        proprio_dim=8,
        max_tokens=64,
        augment=True,
        visual_prompts=True,
        num_threads=args["threads"],
        prefetch_batches=4,
        worker_count=args["workers"],
        seed=0,
    )
    ds = pipeline.make_dataset(
        cfg,
        [source],
        [source.statistics()],
        Tokenizer(args["tokenizer"]),
        process_index=0,
        process_count=1,
    )
    it = iter(ds)
    next(it)
    first_batch_s = time.perf_counter() - start
    for _ in range(2):  # warm-up: threads start, caches fill
        next(it)
    start, cpu_start = time.perf_counter(), usage.cpu_seconds()
    for _ in range(args["batches"]):
        batch = next(it)
    elapsed = time.perf_counter() - start
    cpu = usage.cpu_seconds() - cpu_start
    usage.stop()
    assert batch["image"].shape == (BATCH, 224, 224, 3)
    samples = args["batches"] * BATCH
    return {
        "samples_per_s": samples / elapsed,
        "cpu_ms_per_sample": cpu / samples * 1e3,
        "cores_used": cpu / elapsed,
        "first_batch_s": first_batch_s,
        # The sampled tree sum, or this process's own peak if a spike fell between samples
        # (VmHWM: ru_maxrss would carry the parent's peak across fork + exec on Linux).
        "peak_rss_mb": max(usage.peak_rss, _own_peak_rss()) / 2**20,
    }


def run_measurement(args: dict) -> dict:
    """`measure_pipeline(args)` in a fresh Python process (its own peak memory)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(args)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_times(sources, reads_per_round: int, rounds: int) -> list[float]:
    """Seconds per random `source[i]`, one figure per source.

    The sources are timed in alternation, several rounds each, and the fastest round is
    kept: on a shared machine that is the figure least disturbed by other processes.
    """
    rng = np.random.default_rng(0)
    for source in sources:  # warm the files
        for i in rng.integers(0, len(source), 20):
            source[int(i)]
    best = [float("inf")] * len(sources)
    for _ in range(rounds):
        for k, source in enumerate(sources):
            idx = rng.integers(0, len(source), reads_per_round)
            start = time.perf_counter()
            for i in idx:
                source[int(i)]
            best[k] = min(best[k], (time.perf_counter() - start) / reads_per_round)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=-1, help="reader threads; -1: the pipeline's default"
    )
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--reads", type=int, default=150, help="reads per timing round")
    parser.add_argument("--libero_episodes", type=int, default=50)
    parser.add_argument("--libero_steps", type=int, default=60, help="steps per episode")
    parser.add_argument("--libero_batches", type=int, default=40, help="timed batches")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.threads == -1:  # resolved here, so that the table and BENCH line name the count
        args.threads = pipeline.reader_threads(pipeline.DataConfig())
    if args.workers > 0 or args.measure:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    if args.measure:
        print(json.dumps(measure_pipeline(json.loads(args.measure))))
        return

    root = tempfile.mkdtemp(prefix="pixelvla_bench_data_")
    try:
        report(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # ~0.4 GB at the default sizes


def report(args: argparse.Namespace, root: str) -> None:
    """Writes the datasets under `root`, measures, prints the table and the BENCH line."""
    t0 = time.perf_counter()
    short_dir = write_dataset(root, "short", num_episodes=10, length=50)
    long_dir = write_dataset(root, "long", num_episodes=1, length=500)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    libero_dir = write_libero_like(root, args.libero_episodes, args.libero_steps)
    libero_write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = os.path.join(root, "cache")
    short = step_index.StepDataset(short_dir, action_chunk=8, cache_dir=cache)
    long = step_index.StepDataset(long_dir, action_chunk=8, cache_dir=cache)
    index_s = time.perf_counter() - t0
    libero = step_index.StepDataset(libero_dir, action_chunk=8, cache_dir=cache)  # builds it
    libero_sample = libero[0]
    jpeg_kb = (len(libero_sample["image"]) + len(libero_sample["wrist_image"])) / 2 / 1024

    read_50, read_500 = read_times([short, long], args.reads, rounds=7)

    tokenizer = train_tiny_tokenizer(os.path.join(root, "tok.model"))
    cfg = pipeline.DataConfig(
        batch_size=BATCH,
        image_size=224,
        action_chunk=8,
        proprio_dim=8,
        max_tokens=64,
        augment=True,
        visual_prompts=True,
        num_threads=args.threads,
        prefetch_batches=4,
        worker_count=args.workers,
        seed=0,
    )
    ds = pipeline.make_dataset(
        cfg, [short], [short.statistics()], tokenizer, process_index=0, process_count=1
    )
    it = iter(ds)
    for _ in range(2):  # warm-up: threads start, caches fill
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # all threads of this process
    samples_per_s = args.batches * BATCH / elapsed
    # CPU seconds per sample: on a shared machine wall-clock throughput understates what the
    # pipeline does with the cores it is given; this is the load-independent cost.
    # (Worker processes' CPU time is not visible here: reported only without workers.)
    cpu_ms_per_sample = cpu / (args.batches * BATCH) * 1e3 if args.workers == 0 else None
    load = os.getloadavg()[0]
    assert batch["image"].shape == (BATCH, 224, 224, 3)

    tok_path = os.path.join(root, "tok.model")
    libero_runs = {
        chunk: run_measurement(
            {
                "dataset_dir": libero_dir,
                "cache_dir": cache,
                "tokenizer": tok_path,
                "chunk": chunk,
                "threads": args.threads,
                "workers": args.workers,
                "batches": args.libero_batches,
            }
        )
        for chunk in (1, 8)
    }

    ratio = read_500 / read_50
    libero_rows = []
    for chunk, r in libero_runs.items():
        libero_rows += [
            (
                f"LIBERO-like, chunk {chunk}: pipeline throughput",
                f"{r['samples_per_s']:.0f} samples/s",
            ),
            (f"LIBERO-like, chunk {chunk}: CPU per sample", f"{r['cpu_ms_per_sample']:.2f} ms"),
            (f"LIBERO-like, chunk {chunk}: cores used", f"{r['cores_used']:.2f}"),
            (f"LIBERO-like, chunk {chunk}: first batch", f"{r['first_batch_s']:.2f} s"),
            (f"LIBERO-like, chunk {chunk}: peak RSS", f"{r['peak_rss_mb']:.0f} MB"),
        ]
    rows = [
        ("datasets written (10x50 + 1x500 steps, 256 px)", f"{write_s:.1f} s"),
        ("step index built (both)", f"{index_s:.1f} s"),
        ("read StepDataset[i], 50-step episodes", f"{read_50 * 1e3:.3f} ms"),
        ("read StepDataset[i], 500-step episodes", f"{read_500 * 1e3:.3f} ms"),
        ("read time ratio 500 vs 50", f"{ratio:.2f}"),
        (
            f"pipeline batch {BATCH} @224, aug + prompts "
            f"({args.threads} threads, {args.workers} workers, {os.cpu_count()} cpus)",
            f"{samples_per_s:.0f} samples/s",
        ),
        (
            "pipeline CPU time per sample (all threads)",
            "n/a (workers)" if cpu_ms_per_sample is None else f"{cpu_ms_per_sample:.2f} ms",
        ),
        (
            f"LIBERO-like dataset written ({args.libero_episodes}x{args.libero_steps} steps, "
            f"2 cameras, {jpeg_kb:.1f} KB/frame)",
            f"{libero_write_s:.1f} s",
        ),
        *libero_rows,
        ("machine load average (1 min) during the run", f"{load:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    figures = {
        "samples_per_s": round(samples_per_s, 1),
        "read_ms_50": round(read_50 * 1e3, 4),
        "read_ms_500": round(read_500 * 1e3, 4),
        "read_time_ratio_500_vs_50": round(ratio, 3),
        "cpu_ms_per_sample": None if cpu_ms_per_sample is None else round(cpu_ms_per_sample, 3),
        "load_average": round(load, 2),
        "batch_size": BATCH,
        "threads": args.threads,
        "workers": args.workers,
        "libero_jpeg_kb_per_frame": round(jpeg_kb, 1),
        "libero_episodes": args.libero_episodes,
        "libero_steps": args.libero_steps,
    }
    for chunk, r in libero_runs.items():
        for key, value in r.items():
            figures[f"libero_chunk{chunk}_{key}"] = round(value, 3)
    peak_rss = max(r["peak_rss_mb"] for r in libero_runs.values())
    cpu_ms = max(r["cpu_ms_per_sample"] for r in libero_runs.values())
    result = {
        "name": "data",
        "figures": figures,
        "targets": {
            "samples_per_s": [figures["samples_per_s"], ">=", 250],
            "read_time_ratio_500_vs_50": [figures["read_time_ratio_500_vs_50"], "<=", 1.5],
            # Issue 22: twice OpenVLA's tf.data (385 samples/s) on the same data and cores.
            "libero_chunk1_samples_per_s": [
                figures["libero_chunk1_samples_per_s"],
                ">=",
                770,
            ],
            "libero_cpu_ms_per_sample": [round(cpu_ms, 3), "<=", 2.7],
            "libero_peak_rss_mb": [round(peak_rss, 1), "<=", 600],
        },
    }
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    main()
