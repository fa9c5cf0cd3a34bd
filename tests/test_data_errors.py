"""Bad data never passes silently: damaged ArrayRecord files, interrupted generations, URLs.

Each error names the file and the dataset and says what to do.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from pixelvla_jax import paths
from pixelvla_jax.data import generate, generators, rlds, step_index
from pixelvla_jax.errors import PixelVLAError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A pristine tiny dataset; tests damage copies of it."""
    root = tmp_path_factory.mktemp("pristine")
    return generate.write_synthetic_dataset(
        root, "libero", num_episodes=2, episode_lengths=3, image_size=16
    )


def _copy(dataset, tmp_path):
    import shutil

    out = tmp_path / "synthetic_libero" / "1.0.0"
    shutil.copytree(dataset, out)
    return str(out)


def _shard(version_dir):
    (shard,) = glob.glob(os.path.join(version_dir, "*-train.array_record*"))
    return shard


def _truncate(path):
    # Half of a 64 KiB-aligned file: it still opens, with fewer records (0 here).
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


@pytest.mark.parametrize("damage", [_truncate, _garble])
def test_damaged_source_file_is_named_when_the_index_is_built(dataset, tmp_path, damage):
    version_dir = _copy(dataset, tmp_path)
    shard = _shard(version_dir)
    damage(shard)
    with pytest.raises(rlds.CorruptDataError) as e:
        step_index.open_step_index(version_dir, cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert isinstance(e.value, PixelVLAError)
    assert shard in message and "'synthetic_libero'" in message
    assert "truncated or corrupted" in message and "data.convert" in message
    assert "Download" in message and "delete" in message


def test_damage_only_a_read_sees_names_episode_and_file(dataset, tmp_path, monkeypatch):
    """Damage the footer check cannot see fails when the episode is parsed, named as well."""
    version_dir = _copy(dataset, tmp_path)
    shard = _shard(version_dir)
    _truncate(shard)
    monkeypatch.setattr(rlds, "check_split_files", lambda *a, **k: None)
    with pytest.raises(rlds.CorruptDataError, match=r"episode 0 \(stored in .*\) cannot be read"):
        step_index.open_step_index(version_dir, cache_dir=tmp_path / "cache")


def _built_cache(dataset, tmp_path):
    version_dir = _copy(dataset, tmp_path)
    index = step_index.open_step_index(version_dir, cache_dir=tmp_path / "cache")
    assert index.built_now
    return version_dir, index.path


@pytest.mark.parametrize(
    "file,damage",
    [
        ("frames.array_record", _truncate),
        ("frames.array_record", _garble),
        ("referred_masks.array_record", _garble),
        ("metadata.json", _garble),
        ("actions.npy", _truncate),
    ],
)
def test_damaged_cache_file_is_named_when_the_index_is_opened(dataset, tmp_path, file, damage):
    version_dir, cache = _built_cache(dataset, tmp_path)
    damage(os.path.join(cache, file))
    with pytest.raises(rlds.CorruptDataError) as e:
        step_index.open_step_index(version_dir, cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert os.path.join(cache, file) in message
    assert f"delete {cache}" in message and "rebuilds it" in message
    if file != "metadata.json":
        assert "'synthetic_libero'" in message
    # Rebuilding (what the message says) repairs it.
    step_index.open_step_index(version_dir, cache_dir=tmp_path / "cache", rebuild=True)


def test_bad_step_record_read_names_file_and_step(dataset, tmp_path, monkeypatch):
    version_dir, cache = _built_cache(dataset, tmp_path)
    ds = step_index.StepDataset(version_dir, action_chunk=2, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(ds.index.frames, "read", lambda i: b"PVS1\x05\x00\x00\x00")
    with pytest.raises(rlds.CorruptDataError, match=r"frames\.array_record holds a bad record at"):
        ds[1]


# ---------------------------------------------------------------------- interrupted generation


def _config(data_dir, kind, num_episodes=3):
    return ml_collections.ConfigDict(
        {
            "seed": 1,
            "data": {"data_dir": str(data_dir), "datasets": [(kind, 1.0)]},
            "data_generator": {
                "kind": kind,
                "num_episodes": num_episodes,
                "episode_length": 3,
                "image_size": 16,
            },
        }
    )


def _leftovers(data_dir):
    return sorted(p for p in os.listdir(data_dir) if p.startswith(".tmp-"))


def test_exception_mid_generation_leaves_nothing_and_the_next_run_generates(tmp_path, monkeypatch):
    from pixelvla_jax.envs import pixelref

    real, calls = pixelref.expert_episode, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-generation
        return real(*args, **kwargs)

    monkeypatch.setattr(pixelref, "expert_episode", failing)
    cfg = _config(tmp_path, "pixelref")
    with pytest.raises(KeyboardInterrupt):
        generators.ensure_data(cfg)
    assert not (tmp_path / "pixelref").exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(pixelref, "expert_episode", real)
    generators.ensure_data(cfg)
    assert (tmp_path / "pixelref" / generate.GENERATOR_FILE).is_file()
    generators.ensure_data(cfg)  # complete and as asked: accepted


def test_killed_generation_is_cleaned_up_and_the_next_run_generates(tmp_path):
    """SIGKILL mid-generation leaves only a temporary folder, removed by the next run."""
    script = textwrap.dedent(
        """
        import json, os, signal, sys
        import ml_collections
        from pixelvla_jax.data import generators
        from pixelvla_jax.envs import pixelref
        real, calls = pixelref.expert_episode, []
        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) > 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        pixelref.expert_episode = killed
        generators.ensure_data(ml_collections.ConfigDict(json.loads(sys.argv[1])))
        """
    )
    cfg = json.dumps(_config(tmp_path, "pixelref").to_dict())
    out = subprocess.run(
        [sys.executable, "-c", script, cfg],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    (leftover,) = _leftovers(tmp_path)
    assert not (tmp_path / "pixelref").exists()
    assert leftover.startswith(f".tmp-pixelref.{socket.gethostname()}.")
    generators.ensure_data(_config(tmp_path, "pixelref"))
    assert _leftovers(tmp_path) == []
    assert (tmp_path / "pixelref" / generate.GENERATOR_FILE).is_file()


@pytest.mark.parametrize("kind", ["pixelref", "synthetic_bridge"])
def test_dataset_folder_without_its_marker_is_reported_incomplete(tmp_path, kind):
    # What an interrupted run of the previous (non-atomic) generator left behind.
    (tmp_path / kind / "incomplete.ABC_1.0.0").mkdir(parents=True)
    with pytest.raises(generate.IncompleteDatasetError) as e:
        generators.ensure_data(_config(tmp_path, kind))
    message = str(e.value)
    assert "incomplete" in message and "Delete it to regenerate" in message
    assert str(tmp_path / kind) in message and generate.GENERATOR_FILE in message
    assert "older version" not in message


def test_synthetic_generation_writes_its_marker_last(tmp_path):
    generators.ensure_data(_config(tmp_path, "synthetic_libero", num_episodes=2))
    marker = json.loads((tmp_path / "synthetic_libero" / generate.GENERATOR_FILE).read_text())
    assert marker["num_episodes"] == 2 and marker["image_size"] == 16
    assert (tmp_path / "synthetic_libero" / "1.0.0" / "dataset_info.json").is_file()
    assert _leftovers(tmp_path) == []


def test_a_live_generation_is_left_alone(tmp_path):
    live = tmp_path / f".tmp-pixelref.{socket.gethostname()}.{os.getpid()}.abcd1234"
    other_host = tmp_path / ".tmp-pixelref.elsewhere.example.1.abcd1234"
    live.mkdir()
    other_host.mkdir()
    assert sorted(generate.clean_interrupted(tmp_path, "pixelref")) == sorted(
        [str(live), str(other_host)]
    )
    assert live.exists() and other_host.exists()


# ---------------------------------------------------------------------- paths that are URLs


def test_path_helpers_leave_urls_alone():
    assert paths.is_url("gs://bucket/runs/a") and not paths.is_url("runs/a")
    assert paths.absolute("gs://bucket/runs/a") == "gs://bucket/runs/a"
    assert paths.absolute("runs/a") == os.path.join(os.getcwd(), "runs", "a")
    assert paths.parent("gs://bucket/data/ds/1.0.0/") == "gs://bucket/data/ds"
    assert paths.parent("/data/ds/1.0.0") == "/data/ds"
    assert os.fspath(paths.as_path("gs://bucket/x")) == "gs://bucket/x"
    # The step-index cache of a remote dataset is a local folder, not a mangled "gs:/..." one.
    root = step_index.default_cache_root("gs://bucket/data/ds/1.0.0")
    assert root == os.path.expanduser("~/.cache/pixelvla_cache/gs/bucket/data/ds")
    assert step_index.default_cache_root("/data/ds/1.0.0") == "/data/ds/pixelvla_cache"


@pytest.fixture
def fake_bucket(tmp_path):
    """gs://bucket/... served from tmp_path by etils.epath's mock backend."""
    from etils.epath import testing as epath_testing

    url, local = "gs://bucket", str(tmp_path / "bucket")
    to_local = lambda p: os.fspath(p).replace(url, local)  # noqa: E731
    to_url = lambda p: os.fspath(p).replace(local, url)  # noqa: E731

    def mapped(fn, path, *args, **kwargs):
        return fn(to_local(path), *args, **kwargs)

    def glob_(fn, pattern):
        return [to_url(p) for p in fn(to_local(pattern))]

    def listdir(fn, path):
        return fn(to_local(path))

    fns = {k: mapped for k in ("exists", "isdir", "open", "makedirs", "mkdir", "stat", "rmtree")}
    with epath_testing.mock_epath(glob=glob_, listdir=listdir, **fns):
        yield url, local


def test_remote_dataset_and_tokenizer_are_read_through_epath(dataset, fake_bucket, tmp_path):
    import shutil

    from pixelvla_jax.data.tokenizer import Tokenizer, train_tiny_tokenizer

    url, local = fake_bucket
    shutil.copytree(dataset, os.path.join(local, "data", "synthetic_libero", "1.0.0"))
    dataset_url = f"{url}/data/synthetic_libero"
    version_dir = rlds.resolve_version_dir(dataset_url)
    assert version_dir == f"{dataset_url}/1.0.0"
    assert rlds.read_dataset_info(version_dir)["name"] == "synthetic_libero"
    rlds.check_random_access(version_dir)
    assert rlds.source_fingerprint(version_dir) == rlds.source_fingerprint(dataset)
    # A missing remote dataset is reported with its URL, not a local mangling of it.
    with pytest.raises(rlds.DatasetNotFoundError, match=f"{url}/data/missing does not exist"):
        rlds.resolve_version_dir(f"{url}/data/missing")
    cfg = _config(f"{url}/data", "")
    cfg.data.datasets = [("synthetic_libero", 1.0), ("absent", 1.0)]
    with pytest.raises(FileNotFoundError, match=f"looked for {url}/data/absent"):
        generators.ensure_data(cfg)
    # A tokenizer trained into a remote run directory, then loaded from there.
    train_tiny_tokenizer(f"{url}/run/tok.model", vocab_size=512)
    assert os.path.isfile(os.path.join(local, "run", "tok.model"))
    assert Tokenizer(f"{url}/run/tok.model").encode("pick up the block")
