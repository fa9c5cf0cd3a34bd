"""List-valued config keys can be overridden on the command line, and a malformed value is
a ConfigError naming the key and the syntax (config_flags parses the flags as train.py does)."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training.param_rules import FROZEN

CONFIG = os.path.join(config_lib.CONFIGS_DIR, "libero.py") + ":tiny"


def _parse(*overrides):
    """`python -m pixelvla_jax.train --config=configs/libero.py:tiny OVERRIDES`'s config."""
    argv = ["train", f"--config={CONFIG}", *overrides]
    flag_values = flags.FlagValues()
    # config_flags reads the overrides from sys.argv: sys_argv stands in for it.
    config = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    return config.value


def test_datasets_from_name_weight_string():
    cfg = _parse("--config.data.datasets=libero_spatial_no_noops:1,libero_object_no_noops:0.5")
    assert config_lib.resolved(cfg).data.datasets == [
        ("libero_spatial_no_noops", 1.0),
        ("libero_object_no_noops", 0.5),
    ]
    data = config_lib.data_config(cfg, "")
    assert data.datasets == (("libero_spatial_no_noops", 1.0), ("libero_object_no_noops", 0.5))
    cfg = _parse("--config.data.datasets=libero_goal_no_noops")  # weight optional
    assert config_lib.resolved(cfg).data.datasets == [("libero_goal_no_noops", 1.0)]
    cfg = _parse("--config.data.datasets=[('a', 2), 'b']")  # a Python literal works too
    assert config_lib.resolved(cfg).data.datasets == [("a", 2.0), ("b", 1.0)]


@pytest.mark.parametrize(
    "value,problem",
    [
        ("a:1,,b", "empty entry"),
        ("a:x", "not a number"),
        ("a:", "no weight"),
        ("a:-1", "> 0"),
        ("a:1,a:2", "more than once"),
        ("3", "not a list"),
    ],
)
def test_malformed_datasets_string_is_a_config_error(value, problem):
    cfg = _parse(f"--config.data.datasets={value}")
    with pytest.raises(config_lib.ConfigError, match=problem) as e:
        config_lib.validate_config(cfg)
    assert "config.data.datasets=" in str(e.value) and "name:weight" in str(e.value)


def test_freeze_sharding_rules_and_no_decay_take_python_literals():
    cfg = _parse(
        '--config.optim.freeze=[("vision/.*", "frozen")]',
        '--config.sharding_rules=[("batch", ("data", "fsdp")), ("embed", None)]',
        '--config.optim.no_decay=["(.*/)?bias"]',
    )
    config_lib.validate_config(cfg)
    rules, _ = config_lib.freeze_rules(cfg)
    assert rules[0] == ("vision/.*", FROZEN)
    assert config_lib.optim_config(cfg).no_decay == ("(.*/)?bias",)
    assert config_lib.resolved(cfg).sharding_rules == [["batch", ("data", "fsdp")], ["embed", None]]


@pytest.mark.parametrize(
    "flag,match",
    [
        ("--config.optim.freeze=vision:frozen", r"optim\.freeze=.*Python literal"),
        ('--config.optim.freeze=[("vision/.*", "frozn")]', "label 'frozn'"),
        ('--config.optim.freeze=[("(", "frozen")]', "not a valid regex"),
        ("--config.sharding_rules=embed:fsdp", r"sharding_rules=.*Python literal"),
        ('--config.sharding_rules=[("embed",)]', "not a .logical_name, mesh_axes. pair"),
    ],
)
def test_malformed_list_overrides_are_config_errors(flag, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate_config(_parse(flag))


def test_configs_still_assign_plain_lists():
    cfg = config_lib.load_config("libero:tiny")
    cfg.data.datasets = [("x", 1.0)]
    assert cfg.data.datasets == [("x", 1.0)]
    assert config_lib.resolved(cfg).data.datasets == [("x", 1.0)]


def test_train_entry_point_reports_a_malformed_override():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixelvla_jax.train",
            f"--config={CONFIG}",
            "--workdir=/nonexistent/never_written",
            "--config.data.datasets=libero_spatial_no_noops:x",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert out.returncode != 0
    assert "config.data.datasets='libero_spatial_no_noops:x'" in out.stderr
    assert "not a number" in out.stderr
    assert not os.path.exists("/nonexistent/never_written")
