"""Dataset registry and standardisation: specs, gripper conventions, standardised actions."""

import dataclasses

import numpy as np
import pytest

from pixelvla_jax.data import registry, trajectory
from pixelvla_jax.data.generate import write_synthetic_dataset
from pixelvla_jax.data.step_index import StepDataset

CONTRACT_NAMES = [
    "libero_spatial_no_noops",
    "libero_object_no_noops",
    "libero_goal_no_noops",
    "libero_10_no_noops",
    "fractal20220817_data",
    "bridge_orig",
    "bridge_dataset",
    "synthetic_libero",
    "synthetic_bridge",
    "synthetic_fractal",
    "pixelref",
]


def test_known_datasets_are_registered():
    for name in CONTRACT_NAMES:
        spec = registry.get_spec(name)
        assert spec.name == name
        assert spec.action_dim == 7
        assert spec.action_normalization_mask == (True,) * 6 + (False,)  # gripper not normalised


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as err:
        registry.get_spec("libero_spatial")
    msg = str(err.value)
    assert "unknown dataset name 'libero_spatial'" in msg
    assert all(name in msg for name in CONTRACT_NAMES)


def test_raw_feature_layouts():
    libero = registry.get_spec("libero_10_no_noops")
    assert (libero.image_key, libero.wrist_image_key) == (
        "observation/image",
        "observation/wrist_image",
    )
    assert libero.proprio_keys == ("observation/state",) and libero.gripper_convention == "libero"
    fractal = registry.get_spec("fractal20220817_data")
    assert fractal.action_keys == (
        "action/world_vector",
        "action/rotation_delta",
        "action/gripper_closedness_action",
    )
    assert fractal.instruction_key == "observation/natural_language_instruction"
    assert fractal.gripper_convention == "fractal"
    bridge = registry.get_spec("bridge_orig")
    assert bridge.image_key == "observation/image_0" and bridge.wrist_image_key is None
    assert bridge.gripper_convention == "bridge"


def test_register_and_fingerprint():
    spec = registry.spec_for_format("libero", "my_env_data")
    registry.register_spec(spec)
    assert registry.get_spec("my_env_data") is spec
    registry.register_spec(spec)  # same spec again is fine
    other = dataclasses.replace(spec, proprio_keys=())
    with pytest.raises(ValueError, match="already registered"):
        registry.register_spec(other)
    assert other.fingerprint() != spec.fingerprint()
    assert spec.fingerprint() == registry.spec_for_format("libero", "my_env_data").fingerprint()
    with pytest.raises(ValueError, match="gripper_convention"):
        dataclasses.replace(spec, gripper_convention="nope")
    with pytest.raises(ValueError, match="unknown RLDS format"):
        registry.spec_for_format("droid", "x")


def test_gripper_conventions():
    # LIBERO: -1 open / +1 close -> 1 open / 0 closed.
    np.testing.assert_array_equal(
        trajectory.standardize_gripper(np.array([-1, -1, 1, 1.0]), "libero"), [1, 1, 0, 0]
    )
    # Bridge: in-between values take the state reached after them; trailing ones the last.
    np.testing.assert_array_equal(
        trajectory.standardize_gripper(np.array([1.0, 0.6, 0.02, 0.01, 0.5, 0.97, 0.5]), "bridge"),
        [1, 0, 0, 0, 1, 1, 0.5],
    )
    # Fractal: relative closedness (+1 close, -1 open, 0 hold) -> absolute.
    np.testing.assert_array_equal(
        trajectory.standardize_gripper(np.array([0, 0, 1.0, 0, 0, -1, 0]), "fractal"),
        [1, 1, 0, 0, 0, 1, 1],
    )
    np.testing.assert_array_equal(
        trajectory.standardize_gripper(np.array([0, -1.0, 0]), "fractal"), [0, 1, 1]
    )  # first command "open" implies it was closed
    np.testing.assert_array_equal(trajectory.standardize_gripper(np.zeros(3), "fractal"), [1, 1, 1])
    np.testing.assert_array_equal(
        trajectory.standardize_gripper(np.array([0.0, 1.0]), "standard"), [0, 1]
    )


@pytest.mark.parametrize("fmt", ["libero", "bridge", "fractal"])
def test_standardised_actions_and_proprio(tmp_path, fmt):
    lengths = [4, 6]
    path, truths = write_synthetic_dataset(
        tmp_path, fmt, num_episodes=2, episode_lengths=lengths, image_size=16, return_truth=True
    )
    ds = StepDataset(path, action_chunk=1)
    spec = registry.get_spec(f"synthetic_{fmt}")
    for e, truth in enumerate(truths):
        raw = truth["actions"]
        want = raw.copy()
        want[:, -1] = trajectory.standardize_gripper(raw[:, -1], spec.gripper_convention)
        got = ds.index.episode_actions(e)
        np.testing.assert_allclose(got, want, rtol=0, atol=0)
        # Every format ends open -> closed after standardisation (the generated grasp).
        assert got[0, -1] == 1.0 and got[-1, -1] == 0.0
        start = sum(lengths[:e])
        np.testing.assert_array_equal(
            ds.index.proprio[start : start + lengths[e]], truth["proprio"]
        )
        np.testing.assert_array_equal(ds[start]["action_chunk"][0], want[0])
