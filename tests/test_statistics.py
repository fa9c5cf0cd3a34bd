"""Dataset statistics: numpy parity, OpenVLA layout, cached once per dataset + standardisation."""

import json
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pixelvla_jax.data import statistics
from pixelvla_jax.data.generate import write_synthetic_dataset
from pixelvla_jax.data.normalization import normalize_bounds_q99, unnormalize_bounds_q99
from pixelvla_jax.data.step_index import StepDataset
from pixelvla_jax.data.trajectory import standardize_gripper


def _check_against_numpy(entry, x, mask):
    as_arrays = lambda keys: {k: np.asarray(entry[k]) for k in keys}
    expected = {
        "q01": np.quantile(x, 0.01, axis=0),
        "q99": np.quantile(x, 0.99, axis=0),
        "mean": x.mean(0),
        "std": x.std(0),
    }
    chex.assert_trees_all_close(as_arrays(expected), expected, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(as_arrays(["min", "max"]), {"min": x.min(0), "max": x.max(0)})
    assert entry["mask"] == list(mask)


def test_compute_statistics_equals_numpy():
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(500, 7)).astype(np.float32)
    proprio = rng.uniform(-3, 3, size=(500, 8)).astype(np.float32)
    mask = [True] * 6 + [False]
    stats = statistics.compute_statistics(actions, proprio, num_trajectories=9, action_mask=mask)
    _check_against_numpy(stats["action"], actions.astype(np.float64), mask)
    _check_against_numpy(stats["proprio"], proprio.astype(np.float64), [True] * 8)
    assert stats["num_transitions"] == 500 and stats["num_trajectories"] == 9
    json.dumps(stats)  # plain JSON, checkpoints carry it
    empty = statistics.compute_statistics(actions, np.zeros((500, 0)), 9)
    assert empty["proprio"]["q01"] == [] and empty["proprio"]["mask"] == []
    with pytest.raises(ValueError, match="action mask has 3 entries for 7 action dims"):
        statistics.compute_statistics(actions, proprio, 9, action_mask=[True] * 3)


def test_dataset_statistics_cached_and_match_data(tmp_path, monkeypatch):
    lengths = [5, 9, 3]
    path, truths = write_synthetic_dataset(
        tmp_path,
        "bridge",
        num_episodes=3,
        episode_lengths=lengths,
        image_size=16,
        return_truth=True,
    )
    ds = StepDataset(path, action_chunk=2)
    stats = ds.statistics()
    actions = np.concatenate([t["actions"] for t in truths]).astype(np.float64)
    gripper = np.concatenate([standardize_gripper(t["actions"][:, -1], "bridge") for t in truths])
    actions[:, -1] = gripper
    _check_against_numpy(stats["action"], actions, [True] * 6 + [False])
    proprio = np.concatenate([t["proprio"] for t in truths]).astype(np.float64)
    _check_against_numpy(stats["proprio"], proprio, [True] * 7)
    assert stats["num_transitions"] == sum(lengths) and stats["num_trajectories"] == 3
    # Cached as JSON keyed by the index key (source + standardisation hash).
    cached = statistics.statistics_path(ds.index)
    assert os.path.isfile(cached) and ds.index.key in os.path.basename(cached)
    assert statistics.load_statistics(cached) == stats

    def no_recompute(*args, **kwargs):
        raise AssertionError("statistics must be read from the cache")

    monkeypatch.setattr(statistics, "compute_statistics", no_recompute)
    assert StepDataset(path, action_chunk=2).statistics() == stats
    assert statistics.get_dataset_statistics(ds.index) == stats


def test_other_data_gets_other_statistics_key(tmp_path):
    a = StepDataset(write_synthetic_dataset(tmp_path / "a", "libero", 2, 4, 16, seed=0))
    b = StepDataset(write_synthetic_dataset(tmp_path / "b", "libero", 2, 5, 16, seed=0))
    assert a.index.key != b.index.key
    assert a.statistics()["num_transitions"] == 8 and b.statistics()["num_transitions"] == 10


class NormalizationJitTest(chex.TestCase):
    """BOUNDS_Q99 normalisation with computed statistics: jnp path == numpy path, with and
    without jit, and unnormalise(normalise(a)) == a inside [q01, q99]."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_bounds_q99_round_trip_with_computed_statistics(self):
        rng = np.random.default_rng(1)
        actions = rng.normal(size=(500, 7)).astype(np.float32)
        mask = [True] * 6 + [False]
        stats = statistics.compute_statistics(actions, np.zeros((500, 0)), 3, action_mask=mask)
        entry = stats["action"]
        normalize = self.variant(lambda a: normalize_bounds_q99(a, entry))
        unnormalize = self.variant(lambda a: unnormalize_bounds_q99(a, entry))

        normed = normalize(jnp.asarray(actions))
        chex.assert_type(normed, jnp.float32)
        chex.assert_trees_all_close(
            normed, normalize_bounds_q99(actions, entry), rtol=1e-6, atol=1e-6
        )
        assert float(jnp.abs(normed[:, :6]).max()) <= 1.0
        chex.assert_trees_all_equal(normed[:, 6], actions[:, 6])  # unmasked dim passes through

        inside = np.clip(actions, np.asarray(entry["q01"]), np.asarray(entry["q99"]))
        back = unnormalize(normalize(jnp.asarray(inside)))
        chex.assert_trees_all_close(back, inside, rtol=1e-5, atol=1e-5)
