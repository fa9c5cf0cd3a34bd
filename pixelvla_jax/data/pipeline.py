"""The Grain input pipeline: step sources -> mixture -> per-sample transforms -> batches.

    sources (one StepDataset per dataset; random access to standardised step samples)
      -> per source: shard by JAX process, shuffle (seeded by (seed, source, epoch): a
       numpy permutation per epoch), repeat (reshuffled each epoch)
      -> mixture with weights (optionally times the dataset sizes)
      -> per-sample transform with an RNG seeded from (seed, global index), the per-frame
         work only (`SampleTransform.row`): decode (OpenCV; a camera the config does not
         use is not decoded, an episode's mask once for all its steps), then
         `data.example.ExampleBuilder.row` (the builder the policy acts with): resize (the
         evaluation resize) or, when augmenting, OpenVLA's random crop resampled straight
         from the source frame (same crop on the mask) + colour jitter, visual prompt from
         the mask, cached tokens, the wrist camera (`use_wrist_image`) likewise
      -> batch (drop remainder), assembled by `SampleTransform.collate` in numpy a batch at
         a time: stacking, float32 masks, token masks, normalisation of actions and
         proprio (BOUNDS_Q99 or z-score; `state`) with one operation per dataset
      -> thread-parallel reading -> optional worker processes.

The per-sample stage holds the GIL only briefly (its decode, resampling and colour jitter run
in OpenCV, which releases it), so reader threads fill the cores; everything that is cheaper
done once per batch is done there. A batch is exactly the stack of the per-row examples
(`SampleTransform.random_map`: `collate` of one row, as the policy builds its input).

Everything up to the batch is a `grain.MapDataset`: batch k depends only on (seed, k), not
on the number of threads or workers, and the iterator's state is one index:
`it.get_state()` / `it.set_state(state)` resumes with identical batches. A batch is a dict
of numpy arrays whose keys map 1:1 onto `pixelvla_jax.models.observation.Observation`
fields plus `actions`, `action_pad_mask`, `proprio`, `dataset_id` (see `batch_spec`); the
wrist camera's keys and `state` only when the config asks for them.

Worker processes (`worker_count > 0`) use `mp_prefetch`; Grain then needs absl flags to be
parsed (run under `absl.app.run`, or call `absl.flags.FLAGS.mark_as_parsed()` first), and
the workers re-import `__main__`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data.config import (
    BATCH_KEYS,
    DataConfig,
    batch_keys,
    batch_spec,
    reader_threads,
)
from pixelvla_jax.data.example import ExampleBuilder, ExampleRow
from pixelvla_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_KEYS",
    "DataConfig",
    "SampleTransform",
    "TrainingRow",
    "batch_keys",
    "batch_spec",
    "make_dataset",
    "reader_threads",
]

# ------------------------------------------------------------------ per-sample transform


class _TaggedSource:
    """A source whose samples come as (dataset_id, sample), so the transform picks that
    dataset's statistics (a source wrapper, not a Grain map stage: no per-item stage cost)."""

    def __init__(self, source: Any, dataset_id: int):
        self.source = source
        self.dataset_id = dataset_id

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, Mapping]:
        return self.dataset_id, self.source[index]


class _EpochShuffle(grain.MapDataset):
    """`MapDataset.shuffle` with each epoch's order drawn at once: a numpy permutation seeded
    by (seed, epoch), kept for the two latest epochs (4 bytes per sample each). Grain's
    `shuffle` computes each index with `index_shuffle` instead: 35-65 µs of CPU (holding the
    GIL) per sample on this 2-core machine type, against ~3 µs here."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            with self._lock:  # one permutation per epoch, whichever thread needs it first
                order = self._orders.get(epoch)
                if order is None:
                    n = len(self._parent)
                    order = np.random.default_rng([self._seed, epoch]).permutation(n)
                    order = order.astype(np.int32 if n < 2**31 else np.int64)
                    kept = {e: o for e, o in self._orders.items() if e == epoch - 1}
                    self._orders = {**kept, epoch: order}
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, position = divmod(index, n)
        return self._parent[int(self._order(epoch)[position]) + epoch * n]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_orders"], state["_lock"] = {}, None  # worker processes draw their own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _RowTransform(grain.transforms.RandomMap):
    """Grain's per-sample stage: `SampleTransform.row`."""

    def __init__(self, transform: SampleTransform):
        self.transform = transform

    def random_map(self, element, rng: np.random.Generator) -> TrainingRow:
        return self.transform.row(element, rng)


class _CachedTransformedSource:
    """A random-access source of transformed rows, each computed once and then kept.

    Only for deterministic transforms (checked by `make_sample_dataset`): the row of a
    record is then the same whatever the Grain RNG, so caching it changes no batch.
    Thread-safe (a dict store is atomic; two threads may compute one row twice).
    """

    def __init__(self, source: Any, dataset_id: int, transform: SampleTransform):
        self.source = source
        self.dataset_id = dataset_id
        self.transform = transform
        self._cache: dict[int, TrainingRow] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> TrainingRow:
        index = int(index)
        row = self._cache.get(index)
        if row is None:
            element = (self.dataset_id, self.source[index])
            row = self.transform.row(element, np.random.default_rng(0))
            self._cache[index] = row
        return row

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # worker processes build their own
        return state


class _MaskCache:
    """Encoded mask bytes -> decoded read-only bool [H, W], up to `max_bytes` of masks.

    An episode's mask (`episode_metadata/target_mask`, the referred-objects mask) comes with
    every step of the episode: decoding it once per episode instead of once per sample saves
    a PNG decode per sample (~0.1-0.2 ms at 256 px). 32 MiB holds the masks of 512 episodes
    at 256 px (every LIBERO suite); in larger shuffled mixtures most lookups miss and cost a
    dict lookup (the cache is emptied when full). Per-step masks simply miss. Thread-safe
    (dict operations are atomic; two threads may decode one mask twice). Not pickled: each
    worker process builds its own.
    """

    def __init__(self, max_bytes: int = 32 << 20):
        self.max_bytes = max_bytes
        self._masks: dict[bytes, np.ndarray] = {}
        self._bytes = 0

    def decode(self, data: bytes) -> np.ndarray:
        key = bytes(data)
        mask = self._masks.get(key)
        if mask is None:
            mask = image_lib.decode_binary_mask(key)
            mask.flags.writeable = False  # shared by every sample of the episode
            if self._bytes + mask.nbytes > self.max_bytes:
                self._masks, self._bytes = {}, 0
            self._masks[key] = mask
            self._bytes += mask.nbytes
        return mask

    def __getstate__(self):
        return {"max_bytes": self.max_bytes, "_masks": {}, "_bytes": 0}


def _decode_sample_mask(
    sample: Mapping, key: str, image_hw: tuple[int, int], cache: _MaskCache
) -> np.ndarray | None:
    """The sample's encoded mask `key` -> read-only bool [H, W], or None (absent)."""
    data = sample.get(key, b"")
    if data is None or len(data) == 0:
        return None
    mask = cache.decode(data)
    if mask.shape != tuple(image_hw):
        raise ValueError(
            f"{key} shape {mask.shape} does not match image shape {(*image_hw, 3)} "
            f"({_sample_context(sample)})."
        )
    return mask


def _sample_context(sample: Mapping) -> str:
    return (
        f"dataset {sample.get('dataset_name', '?')!r}, episode {sample.get('episode_index', '?')},"
        f" step {sample.get('step_index', '?')}"
    )


class TrainingRow(NamedTuple):
    """One training sample after its per-frame work (`SampleTransform.row`): the example's
    row and its checked raw actions, normalised a batch at a time by `collate`."""

    example: ExampleRow
    action_chunk: np.ndarray  # float32 [N_c, A]
    action_pad_mask: np.ndarray  # bool [N_c]
    proprio: np.ndarray  # float32 [P]
    dataset_id: int


class SampleTransform(grain.transforms.RandomMap):
    """Standardised step samples (+ dataset id) -> model-ready examples and batches (numpy).

    Decodes a sample and hands it to `ExampleBuilder` (the builder `Policy` acts with):
    `row` (per sample) then `collate` (per batch) build a batch; `random_map` is `collate`
    of one row, one example. Picklable (for worker processes). The RNG comes from Grain,
    seeded by (seed, index).
    """

    def __init__(self, cfg: DataConfig, statistics: Sequence[Mapping], tokenizer: Tokenizer):
        self.builder = ExampleBuilder(cfg, statistics, tokenizer)
        self.keys = batch_keys(self.builder.cfg)
        self.masks = _MaskCache()

    @property
    def cfg(self) -> DataConfig:
        return self.builder.cfg

    def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """(dataset_id, sample) -> one example (the `batch_keys` of a batch, unbatched):
        `collate` of its one `row`."""
        return self.example(self.row(element, rng))

    def row(self, element, rng: np.random.Generator) -> TrainingRow:
        """(dataset_id, sample) -> its TrainingRow, the per-frame work: decode, then
        `ExampleBuilder.row` and the checked raw actions; errors name the sample."""
        dataset_id, sample = element
        chunk, proprio = self.builder.check_actions(
            sample["action_chunk"], sample.get("proprio"), dataset_id, _sample_context(sample)
        )
        image = image_lib.decode_image(sample["image"])
        # A camera the config does not use (the wrist frame without use_wrist_image) is
        # never decoded.
        wrist = None
        if self.cfg.use_wrist_image and len(sample.get("wrist_image") or b""):
            wrist = image_lib.decode_image(sample["wrist_image"])
        example = self.builder.row(
            image,
            sample["instruction"],
            _decode_sample_mask(sample, "pixel_mask", image.shape[:2], self.masks),
            _decode_sample_mask(sample, "referred_mask", image.shape[:2], self.masks),
            rng=rng,
            train=True,
            wrist_image=wrist,
        )
        return TrainingRow(
            example, chunk, np.asarray(sample["action_pad_mask"], bool), proprio, dataset_id
        )

    def collate(self, rows: Sequence[TrainingRow]) -> dict[str, np.ndarray]:
        """TrainingRows -> one batch (`batch_keys`, [B, ...] each): `random_map`'s examples,
        stacked, assembled a batch at a time (`ExampleBuilder.collate`, `collate_actions`)."""
        batch = self.builder.collate([r.example for r in rows])
        batch.update(
            self.builder.collate_actions(
                [r.action_chunk for r in rows],
                [r.action_pad_mask for r in rows],
                [r.proprio for r in rows],
                [r.dataset_id for r in rows],
            )
        )
        return {k: batch[k] for k in self.keys}

    def example(self, row: TrainingRow) -> dict[str, np.ndarray]:
        """One TrainingRow -> its example (`collate` of one row, unbatched)."""
        return {key: value[0] for key, value in self.collate([row]).items()}


# ------------------------------------------------------------------ sources


def build_sources(cfg: DataConfig) -> tuple[list[Any], list[dict]]:
    """Opens one StepDataset per `cfg.datasets` entry and loads its statistics.

    Returns (sources, statistics) in the order of `cfg.datasets`.
    """
    import os

    from pixelvla_jax.data import step_index

    if not cfg.datasets:
        raise ValueError("DataConfig.datasets is empty: name at least one (name, weight) pair.")
    sources, stats = [], []
    for name, _ in cfg.datasets:
        source = step_index.StepDataset(
            os.path.join(cfg.data_dir, name),
            action_chunk=cfg.action_chunk,
            name=name,
            cache_dir=cfg.cache_dir,
        )
        sources.append(source)
        stats.append(source.statistics())
    return sources, stats


def has_wrist_camera(source: Any) -> bool:
    """Whether a sample source stores a wrist camera: a StepDataset's spec says so (its
    index would not build if the frames lacked it); another source is asked for sample 0."""
    spec = getattr(source, "spec", None)
    if spec is not None:
        return bool(spec.wrist_image_key)
    return len(source) > 0 and len(source[0].get("wrist_image") or b"") > 0


def check_wrist_cameras(cfg: DataConfig, sources: Sequence[Any]) -> list[str]:
    """With `use_wrist_image`, the datasets that store no wrist camera (returned): their
    samples get a zero wrist image and `has_wrist_image` False, as in Octo's mixtures, and
    a warning names them. A config whose datasets have none at all is an error (the camera
    would be zeros throughout)."""
    if not cfg.use_wrist_image:
        return []
    missing = [
        str(getattr(s, "dataset_name", f"source {i}"))
        for i, s in enumerate(sources)
        if not has_wrist_camera(s)
    ]
    if missing and len(missing) == len(sources):
        raise ValueError(
            f"DataConfig.use_wrist_image is set but dataset(s) {missing} store no wrist camera "
            "(their DatasetSpec has no wrist_image_key): every sample would get a zero wrist "
            "image. Set use_wrist_image=False, or train on datasets that have one (e.g. "
            "LIBERO's observation/wrist_image)."
        )
    if missing:
        log.warning(
            "DataConfig.use_wrist_image: dataset(s) %s store no wrist camera; their samples "
            "get a zero wrist image with has_wrist_image=False.",
            missing,
        )
    return missing


def _process_shard(length: int, index: int, count: int) -> slice:
    """Strided shard of equal size on every process (drops at most count - 1 samples)."""
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is outside [0, process_count={count}).")
    per_host = length // count
    if per_host == 0:
        raise ValueError(f"a source of {length} samples cannot be sharded over {count} processes.")
    return slice(index, per_host * count, count)


def make_sample_dataset(
    cfg: DataConfig | Mapping,
    sources: Sequence[Any],
    statistics: Sequence[Mapping],
    tokenizer: Tokenizer,
    weights: Sequence[float] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The per-sample MapDataset: element = one example (the `batch_keys` of a batch,
    unbatched), the rows of `make_dataset`'s batches one at a time."""
    rows, transform = _row_dataset(
        cfg, sources, statistics, tokenizer, weights, process_index, process_count
    )
    return rows.map(transform.example)


def _row_dataset(
    cfg: DataConfig | Mapping,
    sources: Sequence[Any],
    statistics: Sequence[Mapping],
    tokenizer: Tokenizer,
    weights: Sequence[float] | None,
    process_index: int | None,
    process_count: int | None,
) -> tuple[grain.MapDataset, SampleTransform]:
    """The MapDataset of TrainingRows before batching, and the transform that collates them
    (arguments as `make_dataset`'s)."""
    import jax

    cfg = DataConfig.from_mapping(cfg)
    if len(sources) == 0:
        raise ValueError("make_dataset: no sources given.")
    if len(statistics) != len(sources):
        raise ValueError(f"got {len(sources)} sources but {len(statistics)} statistics dicts.")
    if weights is None:
        weights = [w for _, w in cfg.datasets] if len(cfg.datasets) == len(sources) else None
        weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"got {len(sources)} sources but {len(weights)} weights.")
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count

    check_wrist_cameras(cfg, sources)
    transform = SampleTransform(cfg, statistics, tokenizer)
    if cfg.cache_samples:
        random_parts = [
            name
            for name, on in (
                ("augment", cfg.augment),
                ("visual_prompts", cfg.visual_prompts),
                ("pixel_mask_dropout > 0", cfg.pixel_mask_dropout > 0),
            )
            if on
        ]
        if random_parts:
            raise ValueError(
                f"DataConfig.cache_samples needs a deterministic transform, but "
                f"{', '.join(random_parts)} is on: a cached sample would repeat one random "
                "draw every epoch. Turn those off or set cache_samples=False."
            )
    parts, sizes = [], []
    for i, source in enumerate(sources):
        if cfg.cache_samples:
            source = _CachedTransformedSource(source, i, transform)
        else:
            source = _TaggedSource(source, i)
        ds = grain.MapDataset.source(source)
        ds = ds[_process_shard(len(ds), index, count)]
        sizes.append(len(ds))
        if cfg.shuffle:
            ds = _EpochShuffle(ds, seed=cfg.seed + 7919 * i)
        parts.append(ds.repeat(cfg.num_epochs))
    w = np.asarray(weights, np.float64)
    if cfg.balance_by_size:
        w = w * np.asarray(sizes, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be >= 0 and not all 0, got {list(w)}.")
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(w / w.sum()))
    if cfg.cache_samples:
        return mixed, transform  # already transformed
    return mixed.random_map(_RowTransform(transform), seed=cfg.seed), transform


def make_dataset(
    cfg: DataConfig | Mapping,
    sources: Sequence[Any] | None = None,
    statistics: Sequence[Mapping] | None = None,
    tokenizer: Tokenizer | None = None,
    weights: Sequence[float] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The training input pipeline; `iter(make_dataset(...))` yields per-host batches.

    Args:
      cfg: DataConfig (or a dict / ConfigDict with its fields).
      sources: StepDataset-like random-access sources (`len`, `[i]` -> step sample dict);
        default: `build_sources(cfg)`.
      statistics: one OpenVLA-layout statistics dict per source (default: with the sources).
      tokenizer: default `Tokenizer(cfg.tokenizer_path)`.
      weights: mixture weights per source (default: from `cfg.datasets`, else uniform).
      process_index / process_count: this host's shard (default: JAX's).
    Returns:
      a grain IterDataset of dicts shaped as `batch_spec(cfg)`; its iterator has
      `get_state()` / `set_state()`.
    """
    cfg = DataConfig.from_mapping(cfg)
    if sources is None:
        sources, built_stats = build_sources(cfg)
        statistics = statistics if statistics is not None else built_stats
    if statistics is None:
        statistics = [s.statistics() if callable(s.statistics) else s.statistics for s in sources]
    if tokenizer is None:
        if not cfg.tokenizer_path:
            raise ValueError("make_dataset: give a tokenizer or set DataConfig.tokenizer_path.")
        tokenizer = Tokenizer(cfg.tokenizer_path)
    rows, transform = _row_dataset(
        cfg, sources, statistics, tokenizer, weights, process_index, process_count
    )
    # Batching on the MapDataset makes batch k a function of (seed, k) only: the same
    # batches come out whatever the number of threads or worker processes.
    batches = rows.batch(cfg.batch_size, drop_remainder=True, batch_fn=transform.collate)
    read = grain.ReadOptions(
        num_threads=reader_threads(cfg), prefetch_buffer_size=cfg.prefetch_batches
    )
    ds = batches.to_iter_dataset(read)
    if cfg.worker_count > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return ds


def to_global_array(batch: Mapping[str, np.ndarray], mesh, partition_spec=None):
    """Per-host numpy batch -> dict of global `jax.Array`s sharded on `mesh`.

    Args:
      batch: dict of [B_host, ...] arrays (this process's part of the global batch).
      mesh: a `jax.sharding.Mesh`.
      partition_spec: a PartitionSpec for the leading (batch) axis used for every key, or a
        dict key -> PartitionSpec. Default: the batch axis split over all mesh axes.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if partition_spec is None:
        partition_spec = PartitionSpec(tuple(mesh.axis_names))

    def spec_for(key):
        if isinstance(partition_spec, Mapping):
            if key not in partition_spec:
                raise KeyError(f"to_global_array: no partition spec for batch key {key!r}.")
            return partition_spec[key]
        return partition_spec

    out = {}
    for key, value in batch.items():
        sharding = NamedSharding(mesh, spec_for(key))
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out
