"""The TPU launch script prints every gcloud command it would run under --dry-run."""

import os
import pathlib
import re
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "launch" / "tpu.sh"


def _dry_run(*args, **env):
    full_env = {**os.environ, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
    )


def _commands(out):
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_create_direct_and_queued():
    cmds = _commands(_dry_run("create", TPU_NAME="t1", ACCELERATOR="v5litepod-8"))
    assert cmds == [
        "gcloud compute tpus tpu-vm create t1 --zone us-central2-b "
        "--accelerator-type v5litepod-8 --version tpu-ubuntu2204-base"
    ]
    cmds = _commands(_dry_run("create", TPU_NAME="t1", QUEUED="1", SPOT="1"))
    assert len(cmds) == 1
    assert cmds[0].startswith("gcloud compute tpus queued-resources create t1-qr --node-id t1")
    assert cmds[0].endswith("--spot")


def test_install_copies_to_all_workers_then_installs():
    cmds = _commands(_dry_run("install", TPU_NAME="t1"))
    assert len(cmds) == 2
    assert "tpu-vm scp --recurse" in cmds[0] and "--worker=all" in cmds[0]
    assert "--worker=all" in cmds[1] and "pip\\ install\\ -e" in cmds[1]


def test_install_pins_the_tested_jax_tpu():
    """jax[tpu] at setup.cfg's jax lower bound, everything else from constraints.txt."""
    (install,) = _commands(_dry_run("install", TPU_NAME="t1"))[1:]
    setup = (SCRIPT.parents[1] / "setup.cfg").read_text()
    (tested,) = re.findall(r"^\s*jax>=([0-9.]+)", setup, re.M)
    assert f"jax[tpu]=={tested}" in install.replace("\\", "")
    assert "-c\\ constraints.txt" in install


def test_train_runs_on_all_workers_with_gcs_dirs():
    out = _dry_run(
        "train", "--config=configs/libero.py", WORKDIR="gs://b/run", DATA_DIR="gs://b/rlds"
    )
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out)
    assert "--worker=all" in cmd
    for part in ["pixelvla_jax.train", "--config=configs/libero.py", "--workdir=gs://b/run"]:
        assert part in cmd


@pytest.mark.parametrize("missing", ["WORKDIR", "DATA_DIR"])
def test_train_refuses_without_gcs_dirs(missing):
    env = {"WORKDIR": "gs://b/run", "DATA_DIR": "gs://b/rlds"}
    env[missing] = ""
    out = _dry_run("train", "--config=configs/libero.py", **env)
    assert out.returncode != 0
    assert missing in out.stderr


def test_delete_and_unknown_command():
    assert _commands(_dry_run("delete", TPU_NAME="t1")) == [
        "gcloud compute tpus tpu-vm delete t1 --zone us-central2-b --quiet"
    ]
    out = _dry_run("bogus")
    assert out.returncode == 2 and "unknown command" in out.stderr
