"""Oracle backends on PixelRef episodes: the pipeline keeps >= 99% of episodes with mask IoU
>= 0.99, its proposals contain the target's centre in >= 95%; with injected noise the report
names every failure class correctly."""

import json

import numpy as np
import pytest

from pixelvla_jax.annotate import config as C
from pixelvla_jax.annotate.gripper import mask_iou
from pixelvla_jax.annotate.oracle import EXPECTED_REASON, OracleNoise, oracle_backends
from pixelvla_jax.annotate.pixelref_truth import PixelRefTruth
from pixelvla_jax.annotate.runner import annotate_dataset
from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data.step_index import StepDataset
from pixelvla_jax.envs import pixelref as pr

N = 120


@pytest.fixture(scope="module")
def pixelref_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixelref")
    path = pr.generate_dataset(root / "src", N, seed=5)
    return root, path, PixelRefTruth(N, seed=5)


def _report(out):
    return [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]


def test_oracle_on_pixelref_meets_the_bars(pixelref_data):
    root, path, truth = pixelref_data
    out = root / "clean"
    stats = annotate_dataset(
        path, out, oracle_backends(truth), C.AnnotateConfig(num_shards=4), log=lambda *_: None
    )
    assert stats.summary["kept_fraction"] >= 0.99
    report = _report(out)
    ds = StepDataset(out / "pixelref", action_chunk=1)
    starts = np.concatenate([[0], np.cumsum(np.bincount(ds.index.step_episode))])
    ious, inside = [], 0
    for e, r in enumerate(report):
        cx, cy = truth.target_centre(r["episode_id"])
        if r["proposal"] is not None:
            x0, y0, x1, y1 = r["proposal"]
            inside += x0 <= cx < x1 and y0 <= cy < y1
        if r["kept"]:
            sample = ds[int(starts[e])]
            assert (
                sample["object_name"]
                == pr.PixelRefEnv(truth.env_seeds[r["episode_id"]]).target_object.name
            )
            mask = ann.decode_mask_png(sample["pixel_mask"])
            ious.append(mask_iou(mask, truth.target_mask(r["episode_id"])))
    assert len(ious) >= 0.99 * N and min(ious) >= 0.99
    assert inside / N >= 0.95


def test_noisy_oracle_on_pixelref_reports_each_failure_class(pixelref_data):
    root, path, truth = pixelref_data
    noise = OracleNoise(
        drop_gripper=0.08,
        drop_detection=0.08,
        low_score=0.08,
        jitter_box=0.08,
        bad_mask=0.08,
        seed=2,
    )
    stats = annotate_dataset(
        path,
        root / "noisy",
        oracle_backends(truth, noise),
        C.AnnotateConfig(num_shards=3),
        log=lambda *_: None,
    )
    assert set(noise.injected.values()) == set(EXPECTED_REASON)
    for r in _report(root / "noisy"):
        assert r["reason"] == EXPECTED_REASON.get(noise.injected.get(r["episode_id"]), C.KEPT)
    counts = stats.summary["reasons"]
    for kind, reason in EXPECTED_REASON.items():
        assert counts[reason] == sum(v == kind for v in noise.injected.values()) > 0
