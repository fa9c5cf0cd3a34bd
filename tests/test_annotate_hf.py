"""End to end with tiny random `transformers` models for every role (offline), through the
CLI: the output dataset loads in the training pipeline, and a rerun redoes nothing."""

import json

import numpy as np
import pytest

from pixelvla_jax.annotate import __main__ as cli
from pixelvla_jax.annotate.backends import FrameRef
from pixelvla_jax.annotate.config import GripperPrompt
from pixelvla_jax.annotate.hf_backends import build_backends
from pixelvla_jax.annotate.tiny_models import save_all
from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data.generate import write_synthetic_dataset
from pixelvla_jax.data.step_index import StepDataset


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return save_all(str(tmp_path_factory.mktemp("models")))


def test_backends_shapes_and_llm_fallback(tiny_models):
    b = build_backends(tiny_models)
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 40, 3)).astype(np.uint8)
    masks, scores = b.video_segmenter.segment_video(
        frames, GripperPrompt(box=(0.1, 0.1, 0.6, 0.6)), [FrameRef("e", i) for i in range(3)]
    )
    assert masks.shape == (3, 48, 40) and masks.dtype == bool and scores.shape == (3,)
    assert np.all((scores > 0) & (scores < 1))
    dets = b.detector.detect(frames[0, :30, :20], "red block", FrameRef("e", 0))
    assert dets and all(
        0 <= d.box[0] < d.box[2] <= 20 and 0 <= d.box[1] < d.box[3] <= 30 for d in dets
    )
    assert all(0 <= d.score <= 1 for d in dets)
    masks, scores = b.segmenter.segment(frames[0], (3, 4, 20, 30), FrameRef("e", 0))
    assert masks.shape == (3, 48, 40) and scores.shape == (3,)
    # A random LM answers words that are not in the instruction: the rules take over.
    answer = b.nouns.generate("pick up the red block")
    assert isinstance(answer, str)
    assert b.nouns.extract("pick up the red block") in ("red block", answer)


def test_cli_end_to_end_tiny_models_and_rerun(tmp_path, tiny_models, capsys):
    path = write_synthetic_dataset(
        tmp_path / "src",
        "bridge",
        num_episodes=4,
        episode_lengths=[5, 6, 1, 5],
        image_size=48,
        with_annotations=False,
    )
    args = [
        f"--dataset={path}",
        f"--out={tmp_path / 'out'}",
        f"--video_segmenter={tiny_models['video_segmenter']}",
        f"--detector={tiny_models['detector']}",
        f"--segmenter={tiny_models['segmenter']}",
        f"--llm={tiny_models['llm']}",
        "--num_shards=2",
        "--max_video_frames=2",
        "--gripper_point=0.5,0.5",
        "--detection_threshold=0.0",
        "--min_mask_area=0.0",
        "--max_mask_area=1.0",
        "--proposal_expand=1.5",
        "--video_mask_threshold=-1e4",  # random SAM 2 sees no object (-1024): whole frame
    ]
    assert cli.main(args) == 0
    assert "annotate: shard" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["episodes"] == 4
    assert summary["reasons"]["no_close_event"] == 1  # the one-step episode
    report = [json.loads(x) for x in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    assert sum(r["kept"] for r in report) >= 1
    assert [r["index"] for r in report] == [0, 1, 2, 3]
    ds = StepDataset(tmp_path / "out" / "synthetic_bridge", action_chunk=3)
    assert ds.num_episodes == 4 and len(ds) == 17
    starts = [0, 5, 11, 12]
    for r, start in zip(report, starts):
        sample = ds[start]
        assert (sample["pixel_mask"] != b"") == r["kept"]
        if r["kept"]:
            mask = ann.decode_mask_png(sample["pixel_mask"])
            assert mask.shape == (48, 48) and abs(mask.mean() - r["mask_area"]) < 1e-6
    # A rerun skips every shard and leaves the output as it was.
    before = (tmp_path / "out" / "report.jsonl").read_text()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    rerun = json.loads(out[out.find("{") :])
    assert rerun["shards_done"] == [] and sorted(rerun["shards_skipped"]) == [0, 1]
    assert (tmp_path / "out" / "report.jsonl").read_text() == before


def test_cli_names_missing_models(tmp_path, capsys):
    assert cli.main([f"--dataset={tmp_path}", f"--out={tmp_path}/o"]) == 2
    assert "--video_segmenter=PATH" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backends({"video_segmenter": str(tmp_path / "nope"), "detector": "", "segmenter": ""})
