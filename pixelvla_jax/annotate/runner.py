"""Runs the annotation pipeline over an RLDS dataset: sharding, caches, resumability, output.

Layout of `out_dir`:
  work/run.json                    config + backend names of the run (a restart must match)
  work/episode_ids.json            source index -> episode id (one pass over the source)
  work/stage_a/shard-SSSSS.json    stage (a) results (close events, proposals) per shard
  work/nouns/<extractor>/shard-SSSSS.json   noun answers per distinct instruction
  work/stage_b/shard-SSSSS.json    final per-episode results (masks as PNG, base64)
  <name>/<version>/                the output RLDS ArrayRecord dataset (source + annotations)
  report.jsonl, summary.json       per-episode report and summary counts

Episodes go to shard `sha256(episode_id) % num_shards`; process p of P runs the shards
s with s % P == p, so any number of processes/hosts splits the work without talking.
Every file is written to a temporary name and renamed, so a shard's results exist whole or
not at all; a restart skips shards whose stage (b) file exists and reuses cached stage (a)
results and noun answers. When every shard is done, the process that sees it writes the
output dataset and the report (also via a temporary folder and a rename).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pixelvla_jax.annotate import config as C
from pixelvla_jax.annotate.backends import Backends
from pixelvla_jax.annotate.pipeline import (
    EpisodeInput,
    EpisodeResult,
    StageAResult,
    region_proposals,
    segment_target,
)
from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data import rlds
from pixelvla_jax.data.registry import DatasetSpec, get_spec

REPORT_FILE = "report.jsonl"
SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------ small helpers


def shard_of(episode_id: str, num_shards: int) -> int:
    """Deterministic shard of an episode (same on every host and Python process)."""
    digest = hashlib.sha256(episode_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % num_shards


def _atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: str, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def decode_frame(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(bytes(data))) as img:
        return np.asarray(img.convert("RGB"))


def _shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.json"


@dataclasses.dataclass(frozen=True)
class WorkDirs:
    out_dir: str

    @property
    def work(self) -> str:
        return os.path.join(self.out_dir, "work")

    def stage_a(self, shard: int, n: int) -> str:
        return os.path.join(self.work, "stage_a", _shard_name(shard, n))

    def stage_b(self, shard: int, n: int) -> str:
        return os.path.join(self.work, "stage_b", _shard_name(shard, n))

    def nouns_dir(self, extractor: str) -> str:
        safe = hashlib.sha256(extractor.encode()).hexdigest()[:12]
        return os.path.join(self.work, "nouns", safe)


def _result_to_json(r: EpisodeResult) -> dict:
    d = dataclasses.asdict(r)
    d["mask"] = base64.b64encode(ann.encode_mask_png(r.mask)).decode() if r.mask is not None else ""
    return d


def _result_from_json(d: dict) -> EpisodeResult:
    d = dict(d)
    mask = d.pop("mask")
    for k in ("proposal", "gripper_box", "detection_box"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    r = EpisodeResult(**d)
    r.mask = ann.decode_mask_png(base64.b64decode(mask)) if mask else None
    return r


# ------------------------------------------------------------------ source access


class EpisodeReader:
    """Reads what the stages need from an opened RLDS source with a dataset spec."""

    def __init__(self, source: rlds.RldsSource, spec: DatasetSpec, camera_key: str | None):
        self.source, self.spec = source, spec
        self.camera = camera_key or spec.image_key

    def episode_id(self, index: int, episode: dict | None = None) -> str:
        if self.spec.episode_id_key:
            episode = self.source.episodes[index] if episode is None else episode
            with contextlib.suppress(KeyError):
                return rlds.as_text(ann.lookup(episode, self.spec.episode_id_key))
        return f"episode_{index}"

    def read(self, index: int, episode_id: str) -> EpisodeInput:
        episode = self.source.episodes[index]
        steps = list(episode["steps"])
        where = dict(dataset=self.spec.name, episode=f"{index} ({episode_id})")
        gripper = np.array(
            [
                np.concatenate(
                    [
                        np.asarray(rlds.get_feature(s, k, step=t, **where), np.float32).ravel()
                        for k in self.spec.action_keys
                    ]
                )[-1]
                for t, s in enumerate(steps)
            ],
            np.float32,
        )
        instruction = (
            rlds.as_text(rlds.get_feature(steps[0], self.spec.instruction_key, step=0, **where))
            if steps
            else ""
        )
        camera = self.camera

        def frame(t: int) -> np.ndarray:
            return decode_frame(rlds.as_bytes(rlds.get_feature(steps[t], camera, step=t, **where)))

        return EpisodeInput(index, episode_id, instruction, gripper, frame)


def episode_ids(reader: EpisodeReader, dirs: WorkDirs) -> list[str]:
    """Source index -> episode id, computed once and cached in work/episode_ids.json."""
    path = os.path.join(dirs.work, "episode_ids.json")
    key = rlds.source_fingerprint(reader.source.version_dir, reader.source.split)
    if os.path.exists(path):
        cached = _read_json(path)
        if cached.get("source") == key:
            return cached["ids"]
    ids = [reader.episode_id(i) for i in range(len(reader.source))]
    if len(set(ids)) != len(ids):  # ids must be unique to shard and cache by them
        ids = [f"{i}:{eid}" for i, eid in enumerate(ids)]
    _atomic_write_json(path, {"source": key, "ids": ids})
    return ids


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class RunStats:
    shards_done: list[int] = dataclasses.field(default_factory=list)
    shards_skipped: list[int] = dataclasses.field(default_factory=list)
    episodes_annotated: int = 0
    merged: bool = False
    summary: dict | None = None


def _check_run_identity(dirs: WorkDirs, identity: dict) -> None:
    path = os.path.join(dirs.work, "run.json")
    if os.path.exists(path):
        old = _read_json(path)
        if old != identity:
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise ValueError(
                f"{dirs.out_dir} holds a run with different settings ({', '.join(changed)} "
                "differ); use a new --out directory or delete the old one"
            )
    else:
        _atomic_write_json(path, identity)


def _load_nouns(directory: str) -> dict[str, str]:
    nouns: dict[str, str] = {}
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json"):
                nouns.update(_read_json(os.path.join(directory, name)))
    return nouns


def annotate_dataset(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    backends: Backends,
    cfg: C.AnnotateConfig = C.AnnotateConfig(),  # noqa: B008 - frozen dataclass
    *,
    name: str | None = None,
    spec: DatasetSpec | None = None,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    merge: bool = True,
    out_name: str | None = None,
    reference_image: np.ndarray | None = None,
    log=print,
) -> RunStats:
    """Annotates this process's shards of a dataset; merges the output when all are done.

    Args:
      dataset_dir: the source RLDS ArrayRecord dataset (version folder or its parent).
      out_dir: where work files, the output dataset and the report go (see module doc).
      backends: the four role backends. cfg: AnnotateConfig.
      name / spec: the source's registry name (default: its TFDS name) or an explicit spec.
      process_index / process_count: this process's place among all processes/hosts.
      merge: write the output dataset + report once every shard is done.
      out_name: TFDS name of the output (default: the source's, so the registry spec applies).
      reference_image: uint8 [H, W, 3] prepended to every gripper video (overrides the
        prompt's `reference_image` path).
    Returns:
      RunStats: which shards this call ran or skipped, and the summary if it merged.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    out_dir = os.path.abspath(os.fspath(out_dir))
    dirs = WorkDirs(out_dir)
    source = rlds.open_rlds(dataset_dir, split)
    if spec is None:
        spec = get_spec(name or source.name)
    reader = EpisodeReader(source, spec, cfg.camera_key)
    n = cfg.num_shards
    identity = {
        "config": json.loads(json.dumps(C.config_to_dict(cfg))),
        "backends": backends.names(),
        "dataset": spec.name,
        "source": rlds.source_fingerprint(source.version_dir, split),
        "split": split,
    }
    os.makedirs(dirs.work, exist_ok=True)
    _check_run_identity(dirs, identity)
    ids = episode_ids(reader, dirs)
    shards: dict[int, list[int]] = {}
    for i, eid in enumerate(ids):
        shards.setdefault(shard_of(eid, n), []).append(i)
    prompt = cfg.prompt_for(spec.name, reader.camera)
    if reference_image is None and prompt.reference_image:
        reference_image = np.asarray(Image.open(prompt.reference_image).convert("RGB"))
    nouns_dir = dirs.nouns_dir(backends.nouns.name)
    nouns = _load_nouns(nouns_dir)
    stats = RunStats()
    for shard in range(n):
        if shard % process_count != process_index:
            continue
        if os.path.exists(dirs.stage_b(shard, n)):
            stats.shards_skipped.append(shard)
            continue
        indices = sorted(shards.get(shard, []), key=lambda i: ids[i])  # fixed order: by id
        episodes = [reader.read(i, ids[i]) for i in indices]
        # Stage (a), cached apart from stage (b).
        a_path = dirs.stage_a(shard, n)
        if os.path.exists(a_path):
            stage_a = {k: StageAResult.from_json(v) for k, v in _read_json(a_path).items()}
        else:
            stage_a = region_proposals(
                episodes, backends, cfg, spec.gripper_convention, prompt, reference_image
            )
            _atomic_write_json(a_path, {k: v.to_json() for k, v in stage_a.items()})
        # Noun answers, cached per distinct instruction.
        new_nouns = {}
        for ep in episodes:
            if stage_a[ep.episode_id].reason is None and ep.instruction not in nouns:
                nouns[ep.instruction] = new_nouns[ep.instruction] = backends.nouns.extract(
                    ep.instruction
                )
        if new_nouns:
            _atomic_write_json(os.path.join(nouns_dir, _shard_name(shard, n)), new_nouns)
        results = [
            segment_target(ep, stage_a[ep.episode_id], nouns.get(ep.instruction, ""), backends, cfg)
            for ep in episodes
        ]
        _atomic_write_json(dirs.stage_b(shard, n), [_result_to_json(r) for r in results])
        stats.shards_done.append(shard)
        stats.episodes_annotated += len(results)
        log(
            f"annotate: shard {shard}/{n}: {len(results)} episodes, "
            f"{sum(r.kept for r in results)} kept"
        )
    if merge and all(os.path.exists(dirs.stage_b(s, n)) for s in range(n)):
        stats.summary = merge_outputs(out_dir, source, spec, cfg, out_name or source.name)
        stats.merged = True
    return stats


# ------------------------------------------------------------------ output


def load_results(out_dir: str, num_shards: int) -> dict[int, EpisodeResult]:
    dirs = WorkDirs(os.path.abspath(os.fspath(out_dir)))
    results: dict[int, EpisodeResult] = {}
    for shard in range(num_shards):
        path = dirs.stage_b(shard, num_shards)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"shard {shard} of {num_shards} has no results ({path}); run the remaining "
                "processes (or rerun: finished shards are skipped) before merging"
            )
        for d in _read_json(path):
            r = _result_from_json(d)
            results[r.index] = r
    return results


def summarize(results: Sequence[EpisodeResult]) -> dict:
    counts = {reason: 0 for reason in C.REASONS}
    for r in results:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    kept = [r for r in results if r.kept]
    total = len(results)
    return {
        "episodes": total,
        "kept": len(kept),
        "kept_fraction": len(kept) / total if total else 0.0,
        "filtered": total - len(kept),
        "reasons": counts,
        "mean_detection_score": float(np.mean([r.detection_score for r in kept])) if kept else 0.0,
        "mean_mask_score": float(np.mean([r.mask_score for r in kept])) if kept else 0.0,
        "mean_mask_area": float(np.mean([r.mask_area for r in kept])) if kept else 0.0,
    }


def visual_prompts(mask: np.ndarray, seed: int) -> dict:
    """One point / line / box prompt of the mask, sampled with the data pipeline's own
    `data.prompts.sample_visual_prompt` (seeded): {kind: [[x, y, type], ...]} in [0, 1]."""
    from pixelvla_jax.data.prompts import PromptConfig, sample_visual_prompt
    from pixelvla_jax.models.observation import PROMPT_PAD

    out = {}
    for k, kind in enumerate(("points", "line", "box")):
        probs = tuple(float(j == k) for j in range(5))
        prompt = sample_visual_prompt(
            mask, np.random.default_rng([seed, k]), PromptConfig(kind_probs=probs)
        )
        valid = prompt["prompt_types"] != PROMPT_PAD
        out[kind] = [
            [round(float(x), 5), round(float(y), 5), int(t)]
            for (x, y), t in zip(prompt["prompt_points"][valid], prompt["prompt_types"][valid])
        ]
    return out


def _plain(value: Any) -> Any:
    """Lazy TFDS sequences/dicts -> plain lists/dicts the writer can encode again."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, str, np.ndarray, np.generic, int, float, bool)):
        return value
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return [_plain(value[i]) for i in range(len(value))]
    return value


def output_features(source: rlds.RldsSource) -> dict:
    """The source's features with the annotation features in its episode_metadata."""
    import tensorflow_datasets as tfds

    feats = tfds.builder_from_directory(source.version_dir).info.features
    top = {k: feats[k] for k in feats.keys()}  # noqa: SIM118 - FeaturesDict, not a dict
    meta = top.get("episode_metadata")
    meta_dict = {k: meta[k] for k in meta.keys()} if meta is not None else {}  # noqa: SIM118
    meta_dict.update(ann.annotation_features()["episode_metadata"])
    top["episode_metadata"] = meta_dict
    return top


def merge_outputs(
    out_dir: str, source: rlds.RldsSource, spec: DatasetSpec, cfg: C.AnnotateConfig, name: str
) -> dict:
    """Writes the output RLDS dataset (all source episodes + annotation features, or only
    the kept ones unless `cfg.keep_filtered`) and the report; returns the summary."""
    from pixelvla_jax.data.generate import write_rlds_dataset

    out_dir = os.path.abspath(os.fspath(out_dir))
    results = load_results(out_dir, cfg.num_shards)
    if len(results) != len(source):
        raise ValueError(
            f"results cover {len(results)} episodes but the source has {len(source)}; was the "
            f"source ({source.version_dir}) changed during the run?"
        )
    version = rlds.read_dataset_info(source.version_dir).get("version", "1.0.0")
    final = os.path.join(out_dir, name, version)
    summary = summarize([results[i] for i in range(len(source))])
    if not os.path.exists(os.path.join(final, "dataset_info.json")):
        features = output_features(source)

        def episodes():
            for i in range(len(source)):
                r = results[i]
                if not (r.kept or cfg.keep_filtered):
                    continue
                episode = _plain(source.episodes[i])
                if episode["steps"]:
                    first = rlds.get_feature(
                        episode["steps"][0], spec.image_key, dataset=spec.name, episode=i, step=0
                    )
                    hw = ann.encoded_image_size(rlds.as_bytes(first))
                else:  # empty episodes are skipped by the step index; any mask will do
                    hw = (1, 1)
                if r.kept and r.mask.shape != hw:
                    raise ValueError(
                        f"episode {i} ({r.episode_id}): the mask is {r.mask.shape} (from camera "
                        f"{cfg.camera_key!r}) but the training image {spec.image_key!r} is {hw}; "
                        "annotate the camera the policy is trained on"
                    )
                mask = r.mask if r.kept else np.zeros(hw, np.uint8)
                meta = dict(episode.get("episode_metadata", {}))
                meta.update(
                    target_mask=ann.encode_mask_png(mask),
                    target_object=r.object_name if r.kept else "",
                    gripper_box=np.asarray(r.proposal if r.kept else (0, 0, 0, 0), np.float32),
                    has_annotation=bool(r.kept),
                )
                episode["episode_metadata"] = meta
                yield episode

        tmp = os.path.join(out_dir, f".tmp-merge-{uuid.uuid4().hex[:8]}")
        try:
            write_rlds_dataset(tmp, name, episodes(), features, version=version)
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            try:
                os.rename(os.path.join(tmp, name, version), final)
            except OSError:
                if not os.path.exists(os.path.join(final, "dataset_info.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = []
    for i in range(len(source)):
        d = dataclasses.asdict(results[i])
        d.pop("mask")
        d["kept"] = results[i].kept
        if results[i].kept:
            d["visual_prompts"] = visual_prompts(results[i].mask, seed=i)
        lines.append(json.dumps(d, sort_keys=True))
    _atomic_write_bytes(os.path.join(out_dir, REPORT_FILE), ("\n".join(lines) + "\n").encode())
    _atomic_write_json(os.path.join(out_dir, SUMMARY_FILE), {**summary, "dataset_dir": final})
    return summary
