"""The Grain pipeline: batch layout, determinism, resume, host sharding, mixtures, global arrays."""

import dataclasses
import io

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pixelvla_jax.data import pipeline, prompts
from pixelvla_jax.data.tokenizer import train_tiny_tokenizer
from pixelvla_jax.models.observation import Observation

IMG = 72  # source frame size (resized to SIZE by the pipeline)
SIZE = 64
NC, A, P = 4, 7, 3


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class FakeStepSource:
    """In-memory stand-in for data-sources' StepDataset (same sample dict).

    proprio[0] carries the global sample index and proprio[1] the source id, so tests can
    see which samples were read.
    """

    def __init__(self, n, source_id=0, with_masks=True):
        self.n, self.source_id, self.with_masks = n, source_id, with_masks
        rng = np.random.default_rng(source_id)
        self._frames, self._masks = [], []
        for k in range(4):
            img = np.full((IMG, IMG, 3), (50, 120, 70), np.uint8)
            x0, y0 = rng.integers(8, IMG - 30, 2)
            img[y0 : y0 + 20, x0 : x0 + 20] = (220, 20, 20)
            mask = np.zeros((IMG, IMG), np.uint8)
            mask[y0 : y0 + 20, x0 : x0 + 20] = 255
            self._frames.append(_png(img))
            self._masks.append(_png(mask))
            del k

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        t = i % 10
        chunk = np.tile(np.linspace(-1, 1, A, dtype=np.float32), (NC, 1)) * (t / 10)
        return {
            "image": self._frames[i % 4],
            "wrist_image": b"",
            "proprio": np.array([i, self.source_id, 0.5], np.float32),
            "action_chunk": chunk,
            "action_pad_mask": np.arange(NC) < max(1, 10 - t),
            "instruction": ["pick up the red block", "Put the bowl on the plate"][i % 2],
            "object_name": "red block",
            "pixel_mask": self._masks[i % 4] if (self.with_masks and i % 3) else b"",
            "dataset_name": f"fake{self.source_id}",
            "episode_index": i // 10,
            "step_index": t,
        }


STATS = {
    "action": {"q01": [-1.0] * A, "q99": [1.0] * A, "mask": [True] * (A - 1) + [False]},
    "num_transitions": 0,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


def _cfg(**kw):
    base = dict(
        batch_size=4,
        image_size=SIZE,
        action_chunk=NC,
        action_dim=A,
        proprio_dim=5,
        max_tokens=40,
        num_threads=2,
        prefetch_batches=4,
        seed=3,
    )
    base.update(kw)
    return pipeline.DataConfig(**base)


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_shapes_dtypes_and_contents(tokenizer):
    cfg = _cfg()
    ds = pipeline.make_dataset(
        cfg, [FakeStepSource(40)], [STATS], tokenizer, process_count=1, process_index=0
    )
    batches = _take(ds, 3)
    spec = pipeline.batch_spec(cfg)
    assert tuple(spec) == pipeline.BATCH_KEYS
    for batch in batches:
        assert set(batch) == set(spec)
        for key, (shape, dtype) in spec.items():
            assert batch[key].shape == shape, key
            assert batch[key].dtype == dtype, key
        assert (batch["tokens"][:, 0] == 1).all()
        np.testing.assert_array_equal(batch["token_mask"], batch["tokens"] != 0)
        lengths = batch["token_mask"].sum(1)
        assert (batch["token_mask"] == (np.arange(40)[None] < lengths[:, None])).all()
        assert np.abs(batch["actions"][..., :6]).max() <= 1.0
        has = batch["has_pixel_mask"]
        assert (batch["pixel_mask"][~has] == 0).all()
        assert (batch["pixel_mask"][has].reshape(has.sum(), -1).sum(1) > 0).all()
        assert set(np.unique(batch["pixel_mask"])) <= {0.0, 1.0}
        # Raw proprio passes through (no proprio statistics) and is zero-padded to 5.
        np.testing.assert_array_equal(batch["proprio"][:, 2:], [[0.5, 0, 0]] * 4)
    # Observation fields are a subset of the batch keys with matching shapes.
    spec_obs = Observation.spec(4, image_size=SIZE, max_prompt_points=8, max_tokens=40)
    for field in spec_obs.__dataclass_fields__:
        if getattr(spec_obs, field) is None:  # optional inputs (wrist camera, state): off
            assert field not in batches[0], field
            continue
        assert getattr(spec_obs, field).shape == batches[0][field].shape, field
    all_has = np.concatenate([b["has_pixel_mask"] for b in batches])
    assert all_has.any() and not all_has.all()  # masks absent on every third sample
    for batch in batches:  # no referred_mask in this data: the target mask stands in
        np.testing.assert_array_equal(batch["has_grounding_mask"], batch["has_pixel_mask"])
        np.testing.assert_array_equal(batch["grounding_mask"], batch["pixel_mask"])
        np.testing.assert_array_equal(batch["has_target_point"], batch["has_pixel_mask"])


class ReferredSource(FakeStepSource):
    """Samples with a target mask and a referred-objects mask (the target's square and a
    look-alike's)."""

    def __init__(self, n):
        super().__init__(n)
        self._referred = []
        for k in range(4):
            referred = np.asarray(Image.open(io.BytesIO(self._masks[k]))).copy()
            referred[2:12, 2:12] = 255  # a look-alike in the corner (targets start at 8)
            self._referred.append(_png(referred))

    def __getitem__(self, i):
        sample = super().__getitem__(i)
        sample["pixel_mask"] = self._masks[int(i) % 4]  # every sample has its target's mask
        sample["referred_mask"] = self._referred[int(i) % 4]
        return sample


@pytest.mark.parametrize("augment", [False, True])
def test_grounding_mask_is_the_referred_mask_and_survives_pixel_mask_dropout(tokenizer, augment):
    cfg = _cfg(pixel_mask_dropout=0.5, augment=augment, batch_size=8)
    ds = pipeline.make_dataset(
        cfg, [ReferredSource(40)], [STATS], tokenizer, process_count=1, process_index=0
    )
    dropped = kept = 0
    for batch in _take(ds, 4):
        assert batch["has_grounding_mask"].all()  # every sample, with or without its mask
        grounding, pixel, has = (
            batch["grounding_mask"],
            batch["pixel_mask"],
            batch["has_pixel_mask"],
        )
        assert set(np.unique(grounding)) <= {0.0, 1.0}
        # The target (where given) lies inside the referred objects; the look-alike adds more.
        assert (grounding >= pixel).all()
        assert (grounding.reshape(8, -1).sum(1) > pixel.reshape(8, -1).sum(1)).all()
        if not augment:  # same geometry as the target mask: resized with the image
            corner = grounding[:, : 12 * SIZE // IMG, : 12 * SIZE // IMG]
            assert (corner[:, 2:-1, 2:-1] == 1.0).all()
        # The target's centre is kept for every sample (the point tokens' label).
        assert batch["has_target_point"].all()
        for k in range(8):
            x, y = batch["target_point"][k]
            assert grounding[k, int(y * SIZE), int(x * SIZE)] == 1.0  # inside the target
            if has[k]:
                rows, cols = np.nonzero(pixel[k])
                centre = [(cols.mean() + 0.5) / SIZE, (rows.mean() + 0.5) / SIZE]
                np.testing.assert_allclose(batch["target_point"][k], centre, atol=1e-6)
        dropped += int((~has).sum())
        kept += int(has.sum())
    assert dropped > 0 and kept > 0


def test_same_seed_same_batches_and_resume(tokenizer):
    src = [FakeStepSource(30)]
    make = lambda seed: pipeline.make_dataset(
        _cfg(seed=seed), src, [STATS], tokenizer, process_index=0, process_count=1
    )
    first = _take(make(3), 4)
    again = _take(make(3), 4)
    for a, b in zip(first, again):
        _assert_same(a, b)
    other = _take(make(4), 1)[0]
    assert not np.array_equal(other["image"], first[0]["image"])

    it = iter(make(3))
    next(it)
    next(it)
    state = it.get_state()
    following = [next(it), next(it)]
    resumed = iter(make(3))
    resumed.set_state(state)
    for a in following:
        _assert_same(a, next(resumed))


class UndecodableWristSource(FakeStepSource):
    """Samples whose stored wrist frame is not an image: decoding it would raise."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "wrist_image": b"not a JPEG"}


def test_an_unused_camera_is_not_decoded_and_episode_masks_are_decoded_once(tokenizer):
    """Without use_wrist_image the wrist frame is never decoded (the undecodable one passes;
    the same source with use_wrist_image fails on it). Each distinct mask is decoded once
    and shared read-only: the source's 4 masks serve all of its samples."""
    src = [UndecodableWristSource(16)]
    make = lambda **kw: pipeline.make_dataset(  # noqa: E731
        _cfg(**kw), src, [STATS], tokenizer, process_index=0, process_count=1
    )
    batches = _take(make(), 2)
    assert batches[0]["image"].shape == (4, SIZE, SIZE, 3)
    transform = pipeline.SampleTransform(_cfg(), [STATS], tokenizer)
    for i in range(12):
        transform.random_map((0, src[0][i]), np.random.default_rng(i))
    cached = list(transform.masks._masks.values())
    assert len(cached) == 4 and not any(m.flags.writeable for m in cached)
    with pytest.raises(ValueError, match="decode"):
        _take(make(use_wrist_image=True), 1)


class CountingSource(FakeStepSource):
    """FakeStepSource that counts record reads."""

    reads = 0

    def __getitem__(self, i):
        CountingSource.reads += 1
        return super().__getitem__(i)


def test_cached_samples_give_the_same_batches_and_read_each_record_once(tokenizer):
    deterministic = dict(augment=False, visual_prompts=False, num_threads=1)
    make = lambda cache, source: pipeline.make_dataset(  # noqa: E731
        _cfg(cache_samples=cache, **deterministic),
        [source],
        [STATS],
        tokenizer,
        process_index=0,
        process_count=1,
    )
    # 3 epochs of 12 samples: the cached pipeline reads each record once.
    plain = _take(make(False, FakeStepSource(12)), 9)
    CountingSource.reads = 0
    cached_ds = make(True, CountingSource(12))
    cached = _take(cached_ds, 9)
    for a, b in zip(plain, cached):
        _assert_same(a, b)
    assert CountingSource.reads == 12
    # Resume from a saved position gives the same batches too.
    it = iter(make(True, CountingSource(12)))
    next(it)
    state = it.get_state()
    resumed = iter(make(True, CountingSource(12)))
    resumed.set_state(state)
    _assert_same(next(it), next(resumed))
    # A random transform cannot be cached: each epoch must draw afresh.
    for random_part in (dict(augment=True), dict(visual_prompts=True)):
        kw = {**deterministic, **random_part}
        with pytest.raises(ValueError, match="deterministic"):
            pipeline.make_dataset(
                _cfg(cache_samples=True, **kw),
                [FakeStepSource(12)],
                [STATS],
                tokenizer,
                process_index=0,
                process_count=1,
            )


def test_hosts_read_disjoint_shards_covering_the_data(tokenizer):
    n = 24
    cfg = _cfg(num_epochs=1, augment=False, visual_prompts=False)
    seen = []
    for host in range(2):
        ds = pipeline.make_sample_dataset(
            cfg, [FakeStepSource(n)], [STATS], tokenizer, process_index=host, process_count=2
        )
        assert len(ds) == n // 2
        seen.append({int(ds[i]["proprio"][0]) for i in range(len(ds))})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))


def test_mixture_respects_weights(tokenizer):
    cfg = _cfg(augment=False, visual_prompts=False)
    sources = [FakeStepSource(20, 0), FakeStepSource(50, 1)]
    ds = pipeline.make_sample_dataset(
        cfg,
        sources,
        [STATS, STATS],
        tokenizer,
        weights=[0.8, 0.2],
        process_index=0,
        process_count=1,
    )
    ids = np.array([ds[i]["dataset_id"] for i in range(200)])
    assert abs((ids == 0).mean() - 0.8) < 0.05
    # Samples of source 1 really come from source 1.
    assert all(ds[i]["proprio"][1] == ds[i]["dataset_id"] for i in range(20))
    balanced = pipeline.make_sample_dataset(
        _cfg(augment=False, visual_prompts=False, balance_by_size=True),
        sources,
        [STATS, STATS],
        tokenizer,
        weights=[1.0, 1.0],
        process_index=0,
        process_count=1,
    )
    ids = np.array([balanced[i]["dataset_id"] for i in range(280)])
    assert abs((ids == 1).mean() - 50 / 70) < 0.05


def test_long_prompt_error_and_truncation(tokenizer):
    src = [FakeStepSource(8)]
    ds = pipeline.make_dataset(
        _cfg(max_tokens=6), src, [STATS], tokenizer, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="max_tokens=6"):
        _take(ds, 1)
    ds = pipeline.make_dataset(
        _cfg(max_tokens=6, on_long_prompt="truncate"),
        src,
        [STATS],
        tokenizer,
        process_index=0,
        process_count=1,
    )
    batch = _take(ds, 1)[0]
    assert batch["tokens"].shape == (4, 6) and batch["token_mask"].all()


def test_config_from_mapping():
    cfg = pipeline.DataConfig.from_mapping(
        {"batch_size": 2, "prompt_cfg": {"max_points": 6, "kind_probs": [1, 0, 0, 0, 0]}}
    )
    assert cfg.batch_size == 2 and cfg.prompt_cfg.max_points == 6
    # The positional kind_probs of configs saved before they became a mapping (order:
    # points, line, box, mask, none) is converted.
    assert cfg.prompt_cfg.kind_probs == {"points": 1.0, "line": 0, "box": 0, "mask": 0, "none": 0}
    mapped = pipeline.DataConfig.from_mapping(
        {"batch_size": 2, "prompt_cfg": {"max_points": 6, "kind_probs": {"points": 1.0}}}
    )
    assert mapped == cfg
    # The training config's view (a ConfigDict of dataclasses.asdict) round-trips.
    view = ml_collections.ConfigDict(dataclasses.asdict(pipeline.DataConfig()))
    assert pipeline.DataConfig.from_mapping(view) == pipeline.DataConfig()
    with pytest.raises(ValueError, match="unknown fields"):
        pipeline.DataConfig.from_mapping({"batchsize": 2})


def test_each_epoch_is_a_fresh_permutation_of_the_hosts_shard(tokenizer):
    """The shuffle draws one permutation per (seed, source, epoch): every sample of the
    host's shard once per epoch, a different order each epoch, the same on every run."""
    cfg = _cfg(num_epochs=3, augment=False, visual_prompts=False)
    make = lambda: pipeline.make_sample_dataset(  # noqa: E731
        cfg, [FakeStepSource(20)], [STATS], tokenizer, process_index=1, process_count=2
    )
    ds = make()
    order = [int(ds[i]["proprio"][0]) for i in range(len(ds))]
    epochs = [order[k * 10 : (k + 1) * 10] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(1, 20, 2))
    assert epochs[0] != epochs[1] != epochs[2]
    again = make()
    assert [int(again[i]["proprio"][0]) for i in range(len(again) - 1, -1, -1)] == order[::-1]


def test_reader_threads_default_to_the_usable_cpus_up_to_4(monkeypatch):
    for cpus, want in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _, n=cpus: set(range(n)))
        assert pipeline.reader_threads(pipeline.DataConfig()) == want
    assert pipeline.reader_threads(pipeline.DataConfig(num_threads=7)) == 7
    with pytest.raises(ValueError, match="num_threads=0"):
        pipeline.DataConfig(num_threads=0)


def test_to_global_array_on_8_devices(tokenizer):
    from jax.sharding import PartitionSpec

    assert jax.device_count() == 8
    cfg = _cfg(batch_size=8)
    batch = _take(
        pipeline.make_dataset(
            cfg, [FakeStepSource(16)], [STATS], tokenizer, process_index=0, process_count=1
        ),
        1,
    )[0]
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    out = pipeline.to_global_array(batch, mesh, PartitionSpec(("data", "fsdp")))
    for key, value in batch.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype
        assert len(out[key].addressable_shards) == 8
        assert out[key].addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(out[key]), value)
    default = pipeline.to_global_array({"tokens": batch["tokens"]}, mesh)
    assert default["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"))


def test_end_to_end_with_generated_libero_dataset(tmp_path, tokenizer):
    """data-sources' generator + StepDataset + build_sources -> batches with aligned masks."""
    from pixelvla_jax.data import generate

    generate.write_synthetic_dataset(
        tmp_path / "data",
        fmt="libero",
        num_episodes=3,
        episode_lengths=[5, 9, 6],
        image_size=SIZE,
        per_step_mask=True,
        annotated_episodes=[0, 2],
        seed=1,
    )
    cfg = _cfg(
        datasets=(("synthetic_libero", 1.0),),
        data_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        proprio_dim=8,
        max_tokens=64,
    )
    ds = pipeline.make_dataset(cfg, tokenizer=tokenizer, process_index=0, process_count=1)
    batches = _take(ds, 5)
    spec = pipeline.batch_spec(cfg)
    for batch in batches:
        for key, (shape, dtype) in spec.items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        assert np.abs(batch["proprio"]).max() <= 1.0  # normalised with the dataset's q01/q99
        for b in np.nonzero(batch["has_pixel_mask"])[0]:
            mask = batch["pixel_mask"][b] > 0
            core = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0)
            core &= np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
            if core.sum() < 4:
                continue
            # The object is one flat colour: inside the (augmented) mask, pixels are near-uniform
            # and differ from the noisy background around it.
            pixels = batch["image"][b][core].astype(np.float32)
            assert pixels.std(0).max() < 12, pixels.std(0)
    has = np.concatenate([b["has_pixel_mask"] for b in batches])
    assert has.any() and not has.all()  # episode 1 has no annotation


class TwoCameraSource(FakeStepSource):
    """FakeStepSource with a wrist frame on two steps of three and a referred-objects mask
    on every other step (the other steps store none)."""

    def __getitem__(self, i):
        sample = super().__getitem__(i)
        i = int(i)
        sample["wrist_image"] = b"" if i % 3 == 2 else self._frames[(i + 1) % 4]
        sample["referred_mask"] = self._masks[(i + 2) % 4] if i % 2 else b""
        return sample


def _stats_with_proprio(low, high):
    return {
        "action": {"q01": [low] * A, "q99": [high] * A, "mask": [True] * (A - 1) + [False]},
        "proprio": {"q01": [0.0, 0.0, low], "q99": [30.0, 1.0, high], "mask": [True] * P},
        "num_transitions": 0,
    }


def test_batches_are_the_per_row_examples_stacked(tokenizer):
    """The pipeline does the per-frame work per sample and the rest per batch (float masks,
    token masks, normalisation with one operation per dataset): its batches equal the
    examples built one at a time (`SampleTransform.random_map`: `collate` of one row, as the
    policy builds its input), exactly, for every prompt kind, dropped and
    absent masks, steps with and without a wrist frame, the state, two datasets with their
    own statistics."""
    cfg = _cfg(batch_size=8, pixel_mask_dropout=0.3, use_wrist_image=True, use_state=True)
    sources = [TwoCameraSource(24, 0), TwoCameraSource(30, 1)]
    stats = [_stats_with_proprio(-1.0, 1.0), _stats_with_proprio(-0.5, 2.0)]
    kw = dict(weights=[0.5, 0.5], process_index=0, process_count=1)
    batches = _take(pipeline.make_dataset(cfg, sources, stats, tokenizer, **kw), 2)
    samples = pipeline.make_sample_dataset(cfg, sources, stats, tokenizer, **kw)
    for k, batch in enumerate(batches):
        assert set(batch["dataset_id"]) == {0, 1}
        for i in range(cfg.batch_size):
            example = samples[k * cfg.batch_size + i]
            assert example.keys() == batch.keys()
            for key, value in example.items():
                assert batch[key][i].dtype == value.dtype, key
                np.testing.assert_array_equal(batch[key][i], value, err_msg=key)

    transform = pipeline.SampleTransform(cfg, stats, tokenizer)
    elements = [(j % 2, sources[j % 2][j]) for j in range(24)]
    rows = [transform.row(e, np.random.default_rng([5, j])) for j, e in enumerate(elements)]
    batch = transform.collate(rows)
    assert batch.keys() == set(pipeline.batch_spec(cfg))
    for key, (shape, dtype) in pipeline.batch_spec(cfg).items():
        assert batch[key].shape == (len(rows), *shape[1:]) and batch[key].dtype == dtype, key
    kinds = set()
    for j, element in enumerate(elements):
        example = transform.random_map(element, np.random.default_rng([5, j]))
        assert example.keys() == batch.keys()
        for key, value in example.items():
            assert batch[key][j].dtype == value.dtype, key
            np.testing.assert_array_equal(batch[key][j], value, err_msg=key)
        kinds.add(prompts.prompt_kind(example))
    assert kinds == set(prompts.PROMPT_KINDS)
    for flag in ("has_pixel_mask", "has_wrist_image", "has_grounding_mask"):
        assert batch[flag].any() and not batch[flag].all(), flag
    # The state is the proprio normalised with the row's own dataset's statistics.
    for j, (dataset_id, sample) in enumerate(elements):
        entry = stats[dataset_id]["proprio"]
        q01, q99 = np.float32(entry["q01"]), np.float32(entry["q99"])
        want = np.clip(2 * (sample["proprio"] - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
        np.testing.assert_allclose(batch["state"][j, :P], want, rtol=1e-6, atol=1e-6)


def test_worker_processes_give_the_same_batches(tokenizer):
    """mp_prefetch workers (they need absl flags marked parsed: docs/design.md §5.3) == threads."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    src = [FakeStepSource(24)]
    threads = _take(
        pipeline.make_dataset(_cfg(), src, [STATS], tokenizer, process_index=0, process_count=1), 3
    )
    ds = pipeline.make_dataset(
        _cfg(worker_count=2), src, [STATS], tokenizer, process_index=0, process_count=1
    )
    it = iter(ds)
    workers = [next(it) for _ in range(3)]
    for a, b in zip(threads, workers):
        _assert_same(a, b)
