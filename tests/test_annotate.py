"""Annotation pipeline: close events per gripper convention, proposals, filters, oracle runs
(exact masks, failure classes under injected noise), sharding and resume, output loading."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pixelvla_jax.annotate import config as C
from pixelvla_jax.annotate.backends import REFERENCE, FrameRef, RuleNounExtractor
from pixelvla_jax.annotate.gripper import (
    box_on_crop_border,
    expand_box,
    find_close_event,
    mask_iou,
    mask_to_box,
)
from pixelvla_jax.annotate.oracle import (
    EXPECTED_REASON,
    DictGroundTruth,
    OracleNoise,
    oracle_backends,
)
from pixelvla_jax.annotate.pipeline import compose_videos
from pixelvla_jax.annotate.runner import annotate_dataset, shard_of
from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data.generate import write_synthetic_dataset
from pixelvla_jax.data.step_index import StepDataset

# ------------------------------------------------------------------ close events


@pytest.mark.parametrize(
    "convention, raw, expected",
    [
        # LIBERO: -1 open / +1 close
        ("libero", [-1, -1, -1, 1, 1, -1], 3),
        ("libero", [-1, -1, -1], None),
        ("libero", [1, 1, -1, -1, 1], 4),  # closed at start: the first open->closed switch
        # Bridge: continuous, 1 = open (in-between values while closing)
        ("bridge", [1.0, 1.0, 0.97, 0.6, 0.3, 0.0, 0.0], 4),
        ("bridge", [1.0, 0.9, 0.8, 1.0], None),
        ("bridge", [0.0, 0.0, 1.0, 1.0, 0.1], 4),
        # Fractal: relative closedness command (+1 close, -1 open, 0 hold)
        ("fractal", [0, 0, 0, 1, 0, 0, -1, 0], 3),
        ("fractal", [0, 0, 0.05, 0, -1, 0], None),
        ("fractal", [0, 0.5, 0, 0, 0], 1),
        ("fractal", [-1, 0, 0, 1, 0], 3),
        # Already standardised: 1 = open / 0 = closed
        ("standard", [1, 1, 0, 0], 2),
    ],
)
def test_close_event_per_convention(convention, raw, expected):
    assert find_close_event(np.array(raw, np.float32), convention) == expected


def test_close_event_options_and_errors():
    closed_from_start = np.array([1.0, 1.0, 1.0])
    assert find_close_event(closed_from_start, "libero") is None
    cfg = C.CloseEventConfig(closed_at_start_counts=True)
    assert find_close_event(closed_from_start, "libero", cfg) == 0
    assert find_close_event(np.zeros(0), "bridge") is None
    # A stricter Bridge threshold moves the event to the fully closed step.
    strict = C.CloseEventConfig(bridge_threshold=0.05)
    assert find_close_event(np.array([1, 0.6, 0.3, 0.0]), "bridge", strict) == 3
    with pytest.raises(ValueError, match="unknown gripper convention"):
        find_close_event(np.zeros(3), "widowx")


def test_close_event_matches_synthetic_raw_layouts():
    """The generator's raw gripper columns (generate.raw_gripper) close at length // 2."""
    from pixelvla_jax.data.generate import raw_gripper

    for fmt in ("libero", "bridge", "fractal"):
        for length in (4, 7, 10):
            assert find_close_event(raw_gripper(fmt, length), fmt) == length // 2, (fmt, length)


# ------------------------------------------------------------------ geometry / composition


def test_boxes_expand_clip_and_border():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:14] = True
    assert mask_to_box(mask) == (10, 5, 14, 9)
    assert mask_to_box(np.zeros((3, 3))) is None
    assert expand_box((10, 5, 14, 9), (20, 30), 2.0) == (8, 3, 16, 11)
    assert expand_box((10, 5, 14, 9), (20, 30), 2.0, margin=10) == (0, 0, 26, 20)
    assert expand_box((0, 0, 1, 1), (20, 30), 1.0, min_size=6) == (0, 0, 4, 4)
    # Crop (5, 5, 15, 15) of a 20 x 30 frame: all four sides are inside the image.
    assert box_on_crop_border((0, 3, 4, 6), (5, 5, 15, 15), (20, 30), 0)
    assert box_on_crop_border((3, 3, 10, 6), (5, 5, 15, 15), (20, 30), 0)
    assert not box_on_crop_border((2, 2, 8, 8), (5, 5, 15, 15), (20, 30), 1)
    # A crop side on the image border does not count.
    assert not box_on_crop_border((0, 2, 4, 6), (0, 5, 15, 15), (20, 30), 0)


def test_compose_videos_fixed_order_bounded_chunks_and_reference():
    small = [(FrameRef(f"e{i}", i), np.full((4, 5, 3), i, np.uint8)) for i in range(5)]
    big = [(FrameRef("b", 0), np.zeros((6, 6, 3), np.uint8))]
    videos = compose_videos(small + big, max_frames=2, reference=None)
    assert [v.shape for v, _ in videos] == [(2, 4, 5, 3), (2, 4, 5, 3), (1, 4, 5, 3), (1, 6, 6, 3)]
    assert [r.episode_id for _, ids in videos for r in ids] == ["e0", "e1", "e2", "e3", "e4", "b"]
    assert videos[1][0][1, 0, 0, 0] == 3
    ref = np.full((8, 8, 3), 200, np.uint8)
    videos = compose_videos(small, max_frames=3, reference=ref)
    assert [len(ids) for _, ids in videos] == [3, 3, 2]
    assert all(ids[0] == REFERENCE and v[0].shape == (4, 5, 3) for v, ids in videos)
    with pytest.raises(ValueError, match="no room"):
        compose_videos(small, max_frames=1, reference=ref)


def test_rule_nouns():
    rules = RuleNounExtractor()
    assert rules.extract("pick up the red block number 3") == "red block"
    assert rules.extract("put the black bowl on the plate") == "black bowl"
    assert rules.extract("Move the banana near the pan.") == "banana"
    assert rules.extract("open the top drawer and put the bowl inside") == "top drawer"
    assert rules.extract("knock over the coke can") == "coke can"
    assert rules.extract("sponge") == "sponge"


def test_transformers_backends_name_the_annotate_extra(monkeypatch):
    """A missing torch asks for the `annotate` extra; the CLI never imports the test helpers."""
    from pixelvla_jax.annotate import hf_backends

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[annotate\]"'):
        hf_backends.import_torch()
    code = (
        "import sys, pixelvla_jax.annotate.__main__, pixelvla_jax.annotate.hf_backends; "
        "print(sorted(m for m in sys.modules if m.startswith('pixelvla_jax.testing')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_shards_are_deterministic_and_spread():
    ids = [f"ep{i}" for i in range(200)]
    shards = [shard_of(e, 8) for e in ids]
    assert shards == [shard_of(e, 8) for e in ids]
    assert set(shards) == set(range(8))


# ------------------------------------------------------------------ oracle runs


def _synthetic(tmp_path, fmt="bridge", lengths=(8, 6, 7, 8, 9, 5, 6, 1), name=None):
    path, truths = write_synthetic_dataset(
        tmp_path / "src",
        fmt,
        num_episodes=len(lengths),
        episode_lengths=list(lengths),
        image_size=64,
        with_annotations=False,
        return_truth=True,
        name=name,
        seed=3,
    )
    ids = [
        f"episode_{e}" if fmt == "fractal" else f"synthetic/{fmt}/episode_{e}.hdf5"  # no id key
        for e in range(len(lengths))
    ]
    return path, truths, ids


def _truth(truths, ids):
    """The gripper, when it closes, surrounds the object: its mask is the object's mask at
    that step grown by 2 px."""

    def gripper(episode_id, step):
        m = truths[ids.index(episode_id)]["masks"][step].astype(bool)
        grown = m.copy()
        for axis in (0, 1):
            for shift in (-2, -1, 1, 2):
                grown |= np.roll(m, shift, axis=axis)
        return grown

    return DictGroundTruth(
        gripper,
        {eid: t["masks"][0] for eid, t in zip(ids, truths)},
        {t["instruction"]: t["object_name"] for t in truths},
    )


def _quiet(*_):
    pass


def test_oracle_run_exact_masks_and_output_loads(tmp_path):
    path, truths, ids = _synthetic(tmp_path)
    cfg = C.AnnotateConfig(num_shards=3, max_video_frames=3)
    stats = annotate_dataset(
        path, tmp_path / "out", oracle_backends(_truth(truths, ids)), cfg, log=_quiet
    )
    assert stats.merged and sorted(stats.shards_done) == [0, 1, 2]
    summary = stats.summary
    # Episode 7 has one step: its gripper never switches from open to closed.
    assert summary["episodes"] == 8 and summary["kept"] == 7
    assert summary["reasons"][C.NO_CLOSE_EVENT] == 1
    report = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").open()]
    assert [r["episode_id"] for r in report] == ids
    assert report[7]["reason"] == C.NO_CLOSE_EVENT
    for r, t in zip(report[:7], truths[:7]):
        x0, y0, x1, y1 = t["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        px0, py0, px1, py1 = r["proposal"]
        assert px0 <= cx < px1 and py0 <= cy < py1
        assert r["object_name"] == t["object_name"]
        # Visual prompts from the data pipeline's sampler lie on the mask / are its box.
        h, w = t["masks"][0].shape
        for x, y, _ in r["visual_prompts"]["points"][:1] + r["visual_prompts"]["line"]:
            assert t["masks"][0][int(y * h), int(x * w)]
        (bx0, by0, _), (bx1, by1, _) = r["visual_prompts"]["box"]
        assert (bx0 * w, by0 * h, bx1 * w, by1 * h) == pytest.approx(t["box"], abs=1e-3)
        assert r["close_step"] == len(t["masks"]) // 2
    # The output dataset loads in the training pipeline with the exact first-frame masks.
    ds = StepDataset(tmp_path / "out" / "synthetic_bridge", action_chunk=2)
    assert ds.num_episodes == 8 and len(ds) == sum(len(t["masks"]) for t in truths)
    starts = np.cumsum([0] + [len(t["masks"]) for t in truths])
    for e, t in enumerate(truths):
        sample = ds[int(starts[e])]
        if e == 7:
            assert sample["pixel_mask"] == b"" and sample["object_name"] == ""
            continue
        assert mask_iou(ann.decode_mask_png(sample["pixel_mask"]), t["masks"][0]) == 1.0
        assert sample["object_name"] == t["object_name"]
    np.testing.assert_allclose(
        ds[0]["action_chunk"][:, :6], truths[0]["actions"][:2, :6], rtol=0, atol=0
    )


def test_oracle_noise_is_reported_per_failure_class(tmp_path):
    lengths = [6] * 30 + [1]
    path, truths, ids = _synthetic(tmp_path, "libero", lengths)
    probs = dict(
        drop_gripper=0.12, drop_detection=0.12, low_score=0.12, jitter_box=0.12, bad_mask=0.12
    )
    # The first seed whose draws on these 30 episodes inject every failure class.
    seed = next(
        s
        for s in range(100)
        if {OracleNoise(**probs, seed=s).kind(e) for e in ids[:-1]} >= set(EXPECTED_REASON)
    )
    noise = OracleNoise(**probs, seed=seed)
    cfg = C.AnnotateConfig(num_shards=2, proposal_expand=3.0)
    backends = oracle_backends(_truth(truths, ids), noise)
    stats = annotate_dataset(path, tmp_path / "out", backends, cfg, log=_quiet)
    report = {
        json.loads(line)["episode_id"]: json.loads(line)
        for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()
    }
    assert set(noise.injected.values()) == set(EXPECTED_REASON)  # every class was injected
    for eid in ids:
        if eid == ids[-1]:
            expected = C.NO_CLOSE_EVENT
        else:
            expected = EXPECTED_REASON.get(noise.injected.get(eid), C.KEPT)
        assert report[eid]["reason"] == expected, eid
    counts = stats.summary["reasons"]
    for kind, reason in EXPECTED_REASON.items():
        assert counts[reason] == sum(v == kind for v in noise.injected.values())
    assert counts[C.KEPT] == len(ids) - 1 - len(noise.injected)


class _Killed(RuntimeError):
    pass


def test_killed_run_resumes_without_redoing_and_sharded_processes_agree(tmp_path):
    path, truths, ids = _synthetic(tmp_path, "fractal", [6, 7, 5, 8, 6, 7, 9, 5])
    truth = _truth(truths, ids)
    cfg = C.AnnotateConfig(num_shards=4, max_video_frames=4)
    # Reference: one uninterrupted process.
    annotate_dataset(path, tmp_path / "ref", oracle_backends(truth), cfg, log=_quiet)

    # A run killed in its third shard's stage (b), after that shard's stage (a).
    backends = oracle_backends(truth)
    detect = backends.detector.detect
    per_shard = {}
    for i, eid in enumerate(ids):
        per_shard.setdefault(shard_of(eid, 4), []).append(i)
    todo = [s for s in range(4) if per_shard.get(s)]
    budget = len(per_shard[todo[0]]) + len(per_shard[todo[1]])  # dies on the third's first

    def dying_detect(*args):
        if backends.detector.calls >= budget:
            raise _Killed("killed")
        return detect(*args)

    backends.detector.detect = dying_detect
    with pytest.raises(_Killed):
        annotate_dataset(path, tmp_path / "run", backends, cfg, log=_quiet)
    finished = sorted(os.listdir(tmp_path / "run" / "work" / "stage_b"))
    assert len(finished) == 2 + sum(1 for s in range(4) if not per_shard.get(s) and s < todo[2])
    assert not (tmp_path / "run" / "summary.json").exists()

    # The restart skips finished shards and reuses the killed shard's stage (a) cache.
    fresh = oracle_backends(truth)
    stats = annotate_dataset(path, tmp_path / "run", fresh, cfg, log=_quiet)
    assert set(stats.shards_skipped) >= {todo[0], todo[1]}
    redone = [i for s in stats.shards_done for i in per_shard.get(s, [])]
    assert fresh.detector.calls == len(redone) == len(ids) - budget
    assert fresh.video_segmenter.calls == sum(
        -(-len(per_shard[s]) // 4) for s in todo[3:]
    )  # only the shards whose stage (a) never ran
    assert _same_output(tmp_path / "ref", tmp_path / "run")

    # Two processes splitting the shards give the same output as one.
    first = annotate_dataset(
        path,
        tmp_path / "two",
        oracle_backends(truth),
        cfg,
        process_index=1,
        process_count=2,
        log=_quiet,
    )
    assert not first.merged and all(s % 2 == 1 for s in first.shards_done)
    second = annotate_dataset(
        path,
        tmp_path / "two",
        oracle_backends(truth),
        cfg,
        process_index=0,
        process_count=2,
        log=_quiet,
    )
    assert second.merged
    assert _same_output(tmp_path / "ref", tmp_path / "two")
    with pytest.raises(ValueError, match="different settings"):
        annotate_dataset(
            path, tmp_path / "two", oracle_backends(truth), C.AnnotateConfig(num_shards=5)
        )


def _same_output(a, b) -> bool:
    if (a / "report.jsonl").read_text() != (b / "report.jsonl").read_text():
        return False
    da = StepDataset(a / "synthetic_fractal", action_chunk=1)
    db = StepDataset(b / "synthetic_fractal", action_chunk=1)
    return len(da) == len(db) and all(
        da[i]["pixel_mask"] == db[i]["pixel_mask"] and da[i]["image"] == db[i]["image"]
        for i in range(len(da))
    )
