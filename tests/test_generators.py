"""Generated datasets by name: the registry, lazy imports, and its errors."""

import os
import subprocess
import sys

import ml_collections
import pytest

from pixelvla_jax.data import generators

REQUESTS = []


def record_request(request):
    """A generator registered by "module:function" in the test below."""
    REQUESTS.append(request)


def _config(data_dir, kind, datasets):
    return ml_collections.ConfigDict(
        {
            "seed": 3,
            "data": {"data_dir": str(data_dir), "datasets": [(name, 1.0) for name in datasets]},
            "data_generator": {
                "kind": kind,
                "num_episodes": 2,
                "episode_length": 4,
                "image_size": 32,
            },
        }
    )


def test_every_synthetic_format_and_pixelref_are_registered():
    from pixelvla_jax.data.generate import FORMATS

    assert set(generators.known_kinds()) >= {"pixelref", *(f"synthetic_{f}" for f in FORMATS)}


def test_unknown_kind_lists_the_known_ones(tmp_path):
    cfg = _config(tmp_path, "synthetic_libro", ["synthetic_libro"])
    with pytest.raises(ValueError, match=r"data_generator\.kind='synthetic_libro'") as e:
        generators.ensure_data(cfg)
    for kind in generators.known_kinds():
        assert repr(kind) in str(e.value)


def test_registered_by_name_is_imported_on_use_with_the_request(tmp_path, monkeypatch):
    monkeypatch.setitem(generators._REGISTRY, "toy", f"{__name__}:record_request")
    REQUESTS.clear()
    generators.ensure_data(_config(tmp_path, "toy", ["toy"]))
    assert [
        generators.GenerationRequest(
            data_dir=str(tmp_path),
            name="toy",
            num_episodes=2,
            episode_length=4,
            image_size=32,
            seed=3,
        )
    ] == REQUESTS
    with pytest.raises(ValueError, match="already registered"):
        generators.register("toy", record_request)


def test_synthetic_dataset_is_generated_once(tmp_path):
    cfg = _config(tmp_path, "synthetic_bridge", ["synthetic_bridge"])
    generators.ensure_data(cfg)
    version = tmp_path / "synthetic_bridge" / "1.0.0"
    assert version.is_dir()
    stamp = os.stat(version).st_mtime_ns
    generators.ensure_data(cfg)  # present: left as it is
    assert os.stat(version).st_mtime_ns == stamp


def test_missing_dataset_names_directory_and_command(tmp_path):
    cfg = _config(tmp_path, "synthetic_libero", ["synthetic_libero", "bridge"])
    with pytest.raises(FileNotFoundError, match=r"'bridge' not found.*data\.convert") as e:
        generators.ensure_data(cfg)
    assert str(tmp_path / "bridge") in str(e.value)


def test_training_code_imports_no_environment():
    code = (
        "import sys; import pixelvla_jax.training.experiment, pixelvla_jax.data.generators; "
        "print(sorted(m for m in sys.modules if m.startswith('pixelvla_jax.envs')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.strip() == "[]"
