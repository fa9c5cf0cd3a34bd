"""Bad input never passes silently (issue #18): a battery of bad inputs across `Policy`,
`train`, `evaluate`, `export` and `annotate`, each refused with a message naming its exact
cause, while an existing run's checkpoints stay byte-identical.

One tiny run is built once (a step-0 checkpoint of `pixelref:tiny`); each case is a callable
(the entry point's function, in-process) and the regex its error message must match. A few
subprocesses check the command-line wrapper itself (`pixelvla_jax.cli`): message alone, exit
status 2, the traceback only with PIXELVLA_VERBOSE=1.
"""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pixelvla_jax import cli, errors
from pixelvla_jax.envs.pixelref import PixelRefEnv
from pixelvla_jax.envs.rollout import episode_seeds
from pixelvla_jax.policy import Policy
from pixelvla_jax.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(root, **overrides):
    cfg = config_lib.load_config("pixelref:tiny")
    cfg.data.data_dir = str(root / "data")
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 2
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.tokenizer.path = str(root / "tokenizer.model")
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        node = cfg
        for part in section.split(".") if section else ():
            node = node[part]
        node[name] = value
    return cfg


def _hashes(directory):
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with a step-0 checkpoint, a policy of it, a sample observation, a tokenizer
    too large for the model, and the hash of every file under its checkpoints/."""
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer
    from pixelvla_jax.training import experiment

    root = tmp_path_factory.mktemp("bad_inputs")
    train_tiny_tokenizer(str(root / "tokenizer.model"), vocab_size=512)
    train_tiny_tokenizer(str(root / "too_large.model"), vocab_size=600)
    workdir = str(root / "run")
    exp = experiment.setup(_config(root), workdir)
    experiment.save_checkpoint(exp, 0)
    exp.checkpointer.wait_until_finished()
    exp.checkpointer.close()
    envs = [PixelRefEnv(s) for s in episode_seeds(3, 2)]
    obs = {
        "images": np.stack([e.image() for e in envs]),
        "instructions": [e.instruction for e in envs],
        "pixel_masks": np.stack([e.target_mask() for e in envs]),
    }
    checkpoints = os.path.join(workdir, "checkpoints")
    return {
        "root": root,
        "workdir": workdir,
        "policy": Policy.from_checkpoint(workdir),
        "obs": obs,
        "hashes": _hashes(checkpoints),
        "checkpoints": checkpoints,
    }


# ---------------------------------------------------------------------------- the table


def _act(images=None, instructions=None, pixel_masks="same", prompt_kinds=None):
    """A Policy.act case: the fixture's good observation with some inputs replaced."""

    def case(r):
        obs = r["obs"]
        r["policy"].act(
            obs["images"] if images is None else images(obs),
            obs["instructions"] if instructions is None else instructions(obs),
            obs["pixel_masks"] if pixel_masks == "same" else pixel_masks(obs),
            prompt_kinds,
        )

    return case


def _with_mask(i, make):
    def masks(obs):
        m = obs["pixel_masks"].astype(np.float32).copy()
        m[i] = make(obs["pixel_masks"][i])
        return m

    return masks


def _labels(mask):
    labels = np.zeros(mask.shape, np.float32)
    labels[: mask.shape[0] // 2] = 2
    labels[mask] = 3
    labels[0, 0] = 1
    return labels


def _replace(seq, i, value):
    out = list(seq)
    out[i] = value
    return out


def _from_checkpoint(path=None, **kwargs):
    return lambda r: Policy.from_checkpoint(path(r) if path else r["workdir"], **kwargs)


def _big_tokenizer_policy(r):
    p = r["policy"]
    Policy(p.cfg, p.params, p.statistics, str(r["root"] / "too_large.model"))


def _export(dtype="float32", out=None):
    from pixelvla_jax import export

    def case(r):
        export.export_inference(r["workdir"], out(r) if out else r["root"] / "export_x", 0, dtype)

    return case


def _evaluate(suite, checkpoint=None, **kwargs):
    def case(r):
        from pixelvla_jax import evaluate

        evaluate.evaluate(checkpoint(r) if checkpoint else r["workdir"], suite, **kwargs)

    return case


def _train(**overrides):
    """train.py's main does `experiment.train(config, workdir)`: called with the config the
    flags `--config=configs/pixelref.py:tiny --config.KEY=VALUE ...` give. Its workdir is the
    existing run (an error must leave it as it was)."""

    def case(r):
        from pixelvla_jax.training import experiment

        experiment.train(_config(r["root"], **overrides), r["workdir"])

    return case


def _annotate(*args, models=True):
    def case(r):
        from pixelvla_jax.annotate import __main__ as annotate

        models_dir = r["root"]  # exists: only the argument under test is wrong
        argv = [f"--dataset={r['root'] / 'data' / 'pixelref'}", f"--out={r['root'] / 'ann'}"]
        if models:
            argv += [f"--{m}={models_dir}" for m in ("video_segmenter", "detector", "segmenter")]
        argv += args  # the last value of a flag wins
        assert annotate.main(argv) == 2
        raise AnnotateRefused  # the message is on stderr, checked by the test

    return case


class AnnotateRefused(Exception):
    pass


M = "Policy.act: "
CASES = {
    # ---- Policy.act: each bad observation
    "act_empty_image": (
        _act(images=lambda o: np.zeros((2, 0, 0, 3), np.uint8), pixel_masks=lambda o: None),
        M + r"sample 0: the image is empty \(0x0 pixels",
    ),
    "act_float_images": (
        _act(images=lambda o: o["images"].astype(np.float32)),
        M + r"images must be uint8 \[B, H, W, 3\], got float32",
    ),
    "act_unbatched_image": (
        _act(images=lambda o: o["images"][0]),
        M + r"images must be uint8 \[B, H, W, 3\], got uint8 \(56, 56, 3\)",
    ),
    "act_no_samples": (
        _act(
            images=lambda o: o["images"][:0], instructions=lambda o: [], pixel_masks=lambda o: None
        ),
        M + r"no samples",
    ),
    "act_instance_labels_mask": (
        _act(pixel_masks=_with_mask(1, _labels)),
        M + r"sample 1: the pixel mask has values \{0\.0, 1\.0, 2\.0, 3\.0\}.*labels == k",
    ),
    "act_0_255_mask": (
        _act(pixel_masks=lambda o: o["pixel_masks"].astype(np.uint8) * 255),
        M + r"sample 0: the pixel mask has values \{0, 255\}.*mask > 127",
    ),
    "act_nan_mask": (
        _act(pixel_masks=_with_mask(1, lambda m: np.where(m, np.nan, 0.0))),
        M + r"sample 1: the pixel mask contains NaN",
    ),
    "act_string_mask": (
        _act(pixel_masks=lambda o: o["pixel_masks"].astype(str)),
        M + r"pixel_masks have dtype <U\d+; give bool, or uint8 / float with values in \{0, 1\}",
    ),
    "act_mask_shape": (
        _act(pixel_masks=lambda o: o["pixel_masks"][:, :10]),
        M + r"pixel_masks shape \(2, 10, 56\) does not match images \(2, 56, 56, 3\)",
    ),
    "act_empty_instruction": (
        _act(instructions=lambda o: _replace(o["instructions"], 1, "")),
        M + r"sample 1: the instruction is empty \(''\)",
    ),
    "act_blank_instruction": (
        _act(instructions=lambda o: _replace(o["instructions"], 0, "  \n")),
        M + r"sample 0: the instruction is empty",
    ),
    "act_none_instruction": (
        _act(instructions=lambda o: _replace(o["instructions"], 1, None)),
        M + r"sample 1: the instruction is NoneType \(None\); give the task as a non-empty str",
    ),
    "act_one_string_for_all": (
        _act(instructions=lambda o: "ab"),
        M + r"instructions must be a list of B=2 strings, got str",
    ),
    "act_instruction_count": (
        _act(instructions=lambda o: o["instructions"][:1]),
        M + r"1 instructions for 2 images",
    ),
    "act_unknown_prompt_kind": (
        _act(prompt_kinds=["mask", "scribble"]),
        M + r"sample 1: unknown prompt kind 'scribble'",
    ),
    "act_mask_kind_without_mask": (
        _act(pixel_masks=_with_mask(0, np.zeros_like), prompt_kinds="mask"),
        M + r"sample 0: prompt kind 'mask' needs a non-empty pixel mask",
    ),
    # ---- Policy construction
    "policy_missing_dir": (
        _from_checkpoint(lambda r: r["root"] / "nothing_here"),
        r"No checkpoints found at .*nothing_here.*Nor is it an export",
    ),
    "policy_not_a_run": (
        _from_checkpoint(lambda r: r["root"] / "data"),
        r"No checkpoints found at .*data: expected a training workdir",
    ),
    "policy_wrong_step": (
        _from_checkpoint(step=7),
        r"Checkpoint step 7 is not a complete checkpoint .*complete steps: \[0\]",
    ),
    "policy_unknown_dataset": (
        _from_checkpoint(dataset_name="libero_spatial_no_noops"),
        r"no statistics for dataset 'libero_spatial_no_noops'; it has \['pixelref'\]",
    ),
    "policy_temperature_for_l1_head": (
        _from_checkpoint(decode_temperature=0.5),
        r"decode_temperature=0\.5 applies to the discrete head; .* has head='l1'",
    ),
    "policy_tokenizer_too_large": (
        _big_tokenizer_policy,
        r"too_large\.model\) has 600 pieces but the model embeds a text vocabulary of 512 "
        r"\(embedding table: 576 rows.*config\.tokenizer\.tiny_vocab_size",
    ),
    # ---- export
    "export_float16": (
        _export("float16"),
        r"export dtype 'float16' is not supported; use one of float32, bfloat16",
    ),
    "export_unknown_dtype": (_export("fp4"), r"export dtype 'fp4' is not supported"),
    "export_out_exists": (
        _export(out=lambda r: r["root"] / "data"),
        r"--out=.*data already exists; an export is never overwritten",
    ),
    "export_missing_checkpoint": (
        lambda r: _export()({**r, "workdir": r["root"] / "gone"}),
        r"No checkpoints found at .*gone",
    ),
    # ---- evaluate
    "evaluate_other_suite": (
        _evaluate("libero_spatial"),
        r"trained on datasets \['pixelref'\], none of which is the data of suite "
        r"'libero_spatial' \(a dataset named 'libero_spatial' or libero_spatial_\*\).*--allow_dataset_mismatch",
    ),
    "evaluate_unknown_suite": (_evaluate("mujoco"), r"unknown suite 'mujoco'; use one of"),
    "evaluate_unknown_split": (
        _evaluate("pixelref", splits=("in_distribution", "unseen")),
        r"PixelRef splits \['in_distribution', 'unseen'\]: give one or more of",
    ),
    "evaluate_missing_checkpoint": (
        _evaluate("pixelref", checkpoint=lambda r: r["root"] / "gone"),
        r"No checkpoints found at .*gone",
    ),
    "evaluate_wrong_step": (_evaluate("pixelref", step=3), r"Checkpoint step 3 is not a complete"),
    # ---- train
    "train_unknown_key": (_train(**{"model.chunk_sise": 4}), r"Did you mean 'model\.chunk_size'"),
    "train_bad_stage": (
        _train(stage="cta"),
        r"config\.stage='cta' is not a stage of config\.model\.family='pixelvla'; use one of \('cat'",
    ),
    "train_batch_not_divisible": (
        _train(**{"data.batch_size": 3}),
        r"config\.data\.batch_size=3 is not a multiple of the 8 batch shards",
    ),
    "train_batch_zero": (
        _train(**{"data.batch_size": 0}),
        r"config\.data\.batch_size=0 must be >= 1",
    ),
    "train_missing_dataset": (
        _train(**{"data.data_dir": "/nonexistent/data", "data_generator.kind": ""}),
        r"Dataset 'pixelref' not found: looked for /nonexistent/data/pixelref.*pixelvla_jax\.data"
        r"\.convert",
    ),
    "train_image_size_mismatch": (
        _train(**{"data.image_size": 64}),
        r"config\.data\.image_size=64 differs from the model's input size 56 "
        r"\(config\.model\.preset='tiny'\); set config\.data\.image_size=56",
    ),
    "train_tiny_tokenizer_too_large": (
        _train(**{"tokenizer.path": "", "tokenizer.tiny_vocab_size": 1000}),
        r"\(config\.tokenizer\.tiny_vocab_size\) has 1000 pieces but the model embeds a text "
        r"vocabulary of 512",
    ),
    "train_tokenizer_file_too_large": (
        lambda r: _train(**{"tokenizer.path": str(r["root"] / "too_large.model")})(r),
        r"too_large\.model\) has 600 pieces .*a config\.model\.preset built for this tokenizer",
    ),
    # ---- annotate (returns 2, message on stderr)
    "annotate_missing_dataset": (
        _annotate("--dataset=/nonexistent/rlds"),
        r"annotate: dataset directory /nonexistent/rlds does not exist",
    ),
    "annotate_missing_model": (
        _annotate("--detector=/nonexistent/gdino"),
        r"annotate: --detector=/nonexistent/gdino: no such directory",
    ),
    "annotate_no_models": (
        _annotate(models=False),
        r"annotate: give local model folders for --video_segmenter=PATH, --detector=PATH",
    ),
    "annotate_bad_gripper_point": (
        _annotate("--gripper_point=0.5"),
        r"annotate: --gripper_point='0\.5': give 2 comma-separated numbers in \[0, 1\]",
    ),
    "annotate_out_is_a_file": (
        _annotate("--out=" + __file__),
        r"annotate: --out=.*test_bad_inputs\.py is a file",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_naming_its_cause(run, name, capsys):
    case, expected = CASES[name]
    with pytest.raises((errors.PixelVLAError, AnnotateRefused)) as info:
        case(run)
    message = capsys.readouterr().err if info.type is AnnotateRefused else str(info.value)
    assert info.type is AnnotateRefused or isinstance(info.value, errors.PixelVLAError)
    assert re.search(expected, message, re.S), f"{name}: {message}"
    assert _hashes(run["checkpoints"]) == run["hashes"], name
    assert not os.path.exists(run["root"] / "export_x")


def test_the_table_covers_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30


def test_a_good_observation_still_acts(run):
    obs = run["obs"]
    masks = obs["pixel_masks"]
    for given in (masks, masks.astype(np.uint8), masks.astype(np.float32)):
        actions = run["policy"].act(obs["images"], obs["instructions"], given, ["mask", "none"])
        assert actions.shape == (2, run["policy"].chunk_size, 7) and np.isfinite(actions).all()


# ---------------------------------------------------------------------------- the wrapper


class _Diverged(errors.PixelVLAError, RuntimeError):
    exit_code = 3


def test_cli_prints_project_errors_alone_and_keeps_bugs_tracebacks(capsys, monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)

    def refuses(argv):
        raise config_lib.ConfigError("config.stage='x'; use one of [...].")

    assert cli.call(refuses, []) == 2
    err = capsys.readouterr().err
    assert "error: config.stage='x'; use one of [...]." in err and "Traceback" not in err
    assert cli.call(lambda argv: (_ for _ in ()).throw(_Diverged("loss is NaN at step 3")), []) == 3
    assert "error: loss is NaN at step 3" in capsys.readouterr().err
    assert cli.call(lambda argv: None, []) == 0

    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):  # a real bug: not ours to summarise
        cli.call(bug, [])
    assert cli.call(refuses, [], verbose=True) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    assert cli.verbose_requested([]) and cli.verbose_requested(["--verbose"])
    monkeypatch.setenv(cli.VERBOSE_ENV, "0")
    assert not cli.verbose_requested([])


def _cli(module, *args, verbose=False):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(cli.VERBOSE_ENV, None)
    if verbose:
        env[cli.VERBOSE_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env
    )


def test_entry_points_exit_2_with_the_message_alone(run):
    root, workdir = run["root"], run["workdir"]
    cases = [
        (
            ("pixelvla_jax.export", f"--checkpoint={workdir}", f"--out={root}/e", "--dtype=int8"),
            r"export\.py: error: export dtype 'int8' is not supported",
        ),
        (
            ("pixelvla_jax.evaluate", f"--checkpoint={workdir}", "--suite=libero_goal"),
            r"evaluate\.py: error: .*trained on datasets \['pixelref'\]",
        ),
        (
            (
                "pixelvla_jax.train",
                "--config=configs/pixelref.py:tiny",
                f"--workdir={workdir}",
                "--config.model.chunk_sise=4",
            ),
            r"train\.py: error: a --config override names a key the config does not have "
            r"\(--config\.model\.chunk_sise=4\).*chunk_size",
        ),
        (
            (
                "pixelvla_jax.train",
                "--config=configs/pixelref.py:tiny",
                f"--workdir={workdir}",
                "--config.data.image_size=64",
            ),
            r"train\.py: error: config\.data\.image_size=64 differs",
        ),
        (
            (
                "pixelvla_jax.annotate",
                "--dataset=/nonexistent/rlds",
                f"--out={root}/a",
                *(f"--{m}={root}" for m in ("video_segmenter", "detector", "segmenter")),
            ),
            r"annotate: dataset directory /nonexistent/rlds does not exist",
        ),
    ]
    for argv, expected in cases:
        out = _cli(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert re.search(expected, out.stderr, re.S), (argv, out.stderr)
        assert "Traceback" not in out.stderr and "torch" not in out.stderr.lower(), out.stderr
    verbose = _cli(*cases[0][0], verbose=True)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert "InvalidInputError: export dtype 'int8'" in verbose.stderr
    assert _hashes(run["checkpoints"]) == run["hashes"]
    assert not os.path.exists(root / "e")
