"""Closed-loop evaluation of a trained PixelVLA checkpoint.

    python -m pixelvla_jax.evaluate --checkpoint=runs/pixelref --suite=pixelref --trials=200
    python -m pixelvla_jax.evaluate --checkpoint=runs/libero --suite=libero_spatial \
        --tasks=0,1 --trials=50 --pixel_input=oracle --out=runs/libero/eval
    python -m pixelvla_jax.evaluate --server=ws://127.0.0.1:8000 --suite=pixelref \
        --out=/tmp/eval_served     # a running `python -m pixelvla_jax.serve` instead

Suites:
  pixelref   the built-in PixelRef task (`envs/pixelref.py`): `--trials` seeded episodes per
             prompt kind (`--prompt_kinds`, default mask,points,box,line,none; with
             `--pixel_input=none` only "none"). Writes results.json, success.png (bar plot)
             and `--videos` rollout GIFs per prompt kind into `--out`.
  libero_*   LIBERO suites through `pixelvla_jax.envs.libero_eval.run` (needs LIBERO and
             MuJoCo installed).

The policy is `pixelvla_jax.policy.Policy.from_checkpoint`: the preprocessing, statistics
and tokenizer of the training run, nothing else; either model family (`config.model.family`:
the OpenVLA-based PixelVLA or π0). `--replan` defaults to the family's protocol: a π0 run
on LIBERO replans every 5 actions of its 50-action chunk (openpi's `examples/libero`),
everything else executes the whole chunk (OpenVLA-OFT).
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags

from pixelvla_jax import paths
from pixelvla_jax.envs.pixelref import EVAL_SPLITS
from pixelvla_jax.errors import InvalidInputError, UnknownNameError

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
SUITES = ("pixelref", *LIBERO_SUITES)
PI0_LIBERO_REPLAN = 5  # openpi's examples/libero/main.py: replan_steps=5
PIXELREF_SPLITS = tuple(EVAL_SPLITS)  # in_distribution, held_out_kinds, more_objects


def _define_flags() -> None:
    """Flags exist only when this module is the program (so importing it never clashes)."""
    global \
        _CHECKPOINT, \
        _STEP, \
        _SUITE, \
        _TASKS, \
        _TRIALS, \
        _OUT, \
        _PIXEL_INPUT, \
        _PROMPT_KINDS, \
        _REPLAN, \
        _WORKERS, \
        _VIDEOS, \
        _SEED, \
        _BATCH, \
        _TEMPERATURE
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir or its checkpoints/.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    _SUITE = flags.DEFINE_enum("suite", "pixelref", SUITES, "What to evaluate on.")
    _TASKS = flags.DEFINE_string("tasks", "", "Comma-separated task ids (LIBERO; default: all).")
    _TRIALS = flags.DEFINE_integer("trials", 50, "Episodes per task (PixelRef: per prompt kind).")
    _OUT = flags.DEFINE_string("out", "", "Output directory (default: <checkpoint>/eval_<suite>).")
    _PIXEL_INPUT = flags.DEFINE_string(
        "pixel_input", "oracle", "none | oracle (simulator masks) | FILE of precomputed masks."
    )
    _PROMPT_KINDS = flags.DEFINE_string(
        "prompt_kinds", "mask,points,box,line,none", "PixelRef: prompt kinds to evaluate."
    )
    _REPLAN = flags.DEFINE_integer(
        "replan",
        None,
        "Actions executed per chunk (0: the whole chunk; default: 5 for a π0 run on LIBERO, "
        "as openpi, else the whole chunk).",
    )
    global _SPLITS
    _SPLITS = flags.DEFINE_string(
        "splits",
        ",".join(PIXELREF_SPLITS),
        "PixelRef: scene splits evaluated (envs/pixelref.py EVAL_SPLITS), the first's figures "
        "on top: in_distribution, held_out_kinds (target kinds never named in training), "
        "more_objects (more objects than any training scene).",
    )
    _WORKERS = flags.DEFINE_integer("workers", 1, "Parallel environment workers (LIBERO).")
    _VIDEOS = flags.DEFINE_integer("videos", 2, "Rollout GIFs written per prompt kind / task.")
    _SEED = flags.DEFINE_integer("seed", 7, "Seeds episodes and visual prompts.")
    _BATCH = flags.DEFINE_integer("batch_size", 50, "PixelRef: episodes stepped together.")
    _TEMPERATURE = flags.DEFINE_float(
        "decode_temperature",
        None,
        "PixelRef, discrete head: 0 = greedy, > 0 = sampled action tokens "
        "(default: the checkpoint's model.decode_temperature).",
    )
    global _ALLOW_MISMATCH
    _ALLOW_MISMATCH = flags.DEFINE_bool(
        "allow_dataset_mismatch",
        False,
        "Evaluate on a suite although the run was not trained on its data (its statistics, "
        "action space and prompt template are another dataset's).",
    )
    global _SERVER, _API_KEY_ENV, _CONNECTIONS
    _SERVER = flags.DEFINE_string(
        "server",
        "",
        "ws://HOST:PORT of a running policy server (pixelvla_jax.serve) to evaluate instead "
        "of --checkpoint; --out is then required.",
    )
    _API_KEY_ENV = flags.DEFINE_string(
        "api_key_env", "", "--server: environment variable holding the server's API key."
    )
    _CONNECTIONS = flags.DEFINE_integer(
        "connections", 8, "--server: parallel connections (the server batches their requests)."
    )


def suite_datasets(suite: str, dataset_names: list[str]) -> list[str]:
    """The run's datasets that `suite` evaluates: a dataset named `suite` (PixelRef's
    "pixelref") or `<suite>_*` (LIBERO's "libero_spatial" <- "libero_spatial_no_noops")."""
    return [n for n in dataset_names if n == suite or n.startswith(f"{suite}_")]


def default_replan(family: str, suite: str) -> int:
    """Actions executed per predicted chunk when `--replan` is not given: openpi's 5 for a
    π0-family (`config.model.family`) run on LIBERO, 1 for one on PixelRef, else 0 (the
    whole chunk, as OpenVLA-OFT).

    PixelRef's episodes are a few steps long, so a chunk of 8 is most of an episode: a flow
    head that has not yet committed to one look-alike (no pixel input) closes the gripper
    where its chunk's motion and grasp timing disagree. Replanning after every action asks
    only "move which way now, close here?": measured (configs/pixelref.py:pi0_no_pixel,
    200 episodes) 31% vs 18.5% at replan 4; with the mask 99% or more either way."""
    if family == "pi0" and suite in LIBERO_SUITES:
        return PI0_LIBERO_REPLAN
    return 1 if family == "pi0" and suite == "pixelref" else 0


def evaluate(
    checkpoint: str,
    suite: str = "pixelref",
    *,
    tasks: list[int] | None = None,
    trials: int = 50,
    out_dir: str = "",
    pixel_input: str = "oracle",
    prompt_kinds: tuple[str, ...] = ("mask", "points", "box", "line", "none"),
    replan: int | None = None,
    workers: int = 1,
    videos: int = 2,
    seed: int = 7,
    step: int | None = None,
    batch_size: int = 50,
    decode_temperature: float | None = None,
    allow_dataset_mismatch: bool = False,
    splits: tuple[str, ...] = PIXELREF_SPLITS,
) -> dict:
    """Runs the evaluation; returns the results dict (also written as results.json).

    Refuses (InvalidInputError) a suite whose data the run was not trained on, unless
    `allow_dataset_mismatch`: the actions would be unnormalised with another dataset's
    statistics. `replan` None: `default_replan` of the run's family and the suite.
    PixelRef: every split in `splits` is evaluated on the same seeds and kinds (the first's
    figures on top, all under "splits").
    """
    from pixelvla_jax import runs

    if suite not in SUITES:
        raise UnknownNameError(f"unknown suite {suite!r}; use one of {SUITES}.")
    if suite == "pixelref":
        _check_splits(splits)
    run = runs.load_run(checkpoint, step, load_params=False)  # a missing run fails here
    fitting = suite_datasets(suite, run.dataset_names)
    if not fitting and not allow_dataset_mismatch:
        raise InvalidInputError(
            f"{checkpoint} (step {run.step}) was trained on datasets {run.dataset_names}, none "
            f"of which is the data of suite {suite!r} (a dataset named {suite!r} or {suite}_*): its "
            "action statistics, action space and prompt template are another dataset's. "
            "Evaluate it on its own data's suite, or pass --allow_dataset_mismatch "
            "(allow_dataset_mismatch=True) to evaluate anyway."
        )
    out_dir = out_dir or os.path.join(checkpoint, f"eval_{suite}")
    if replan is None:
        replan = default_replan(run.config.model.get("family", "pixelvla"), suite)
    if suite in LIBERO_SUITES:
        from pixelvla_jax.envs import libero_eval

        if decode_temperature is not None:
            raise InvalidInputError(
                "decode_temperature is a PixelRef evaluation option; LIBERO evaluation uses "
                "the checkpoint's model.decode_temperature."
            )
        return libero_eval.run(
            checkpoint,
            suite,
            tasks,
            trials,
            out_dir,
            pixel_input,
            replan,
            workers,
            videos,
            seed,
            step=run.step,
            dataset_name=fitting[0] if fitting else None,
        )
    from pixelvla_jax.policy import Policy

    prompt_kinds = _pixelref_prompt_kinds(pixel_input, prompt_kinds)
    policy = Policy.from_checkpoint(
        checkpoint,
        step=run.step,
        dataset_name=fitting[0] if fitting else None,
        decode_temperature=decode_temperature,
    )
    title = f"PixelRef, {os.path.basename(paths.absolute(checkpoint).rstrip('/'))}"
    return _evaluate_pixelref(
        policy, prompt_kinds, trials, replan, seed, out_dir, videos, batch_size, title, splits
    )


def _check_splits(splits: tuple[str, ...]) -> None:
    """PixelRef's scene splits must be names of `envs/pixelref.py` EVAL_SPLITS (checked
    before any checkpoint or server is touched)."""
    if not splits or any(s not in EVAL_SPLITS for s in splits):
        raise UnknownNameError(
            f"PixelRef splits {list(splits)}: give one or more of {tuple(EVAL_SPLITS)}."
        )


def _pixelref_prompt_kinds(pixel_input: str, prompt_kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The prompt kinds a PixelRef evaluation runs: all asked for with oracle masks, only
    "none" without pixel inputs; PixelRef has no precomputed-mask files."""
    if pixel_input == "none":
        return ("none",)
    if pixel_input != "oracle":
        raise InvalidInputError(
            f"--pixel_input={pixel_input!r}: PixelRef renders exact masks; use oracle or none."
        )
    return tuple(prompt_kinds)


def _evaluate_pixelref(
    policy, prompt_kinds, trials, replan, seed, out_dir, videos, batch_size, title, splits
) -> dict:
    """The PixelRef evaluation of a local `Policy` or a served `RemotePolicy`: the same
    seeded episodes, prompts and reports, on each of `splits`."""
    from pixelvla_jax.envs import rollout
    from pixelvla_jax.envs.pixelref import split_env

    return rollout.evaluate_policy(
        policy,
        split_env(splits[0]),
        num_episodes=trials,
        prompt_kinds=prompt_kinds,
        replan=replan,
        seed=seed,
        out_dir=out_dir,
        videos=videos,
        batch_size=batch_size,
        title=title,
        split=splits[0],
        more_splits={s: split_env(s) for s in splits[1:]},
    )


def evaluate_on_server(
    server: str,
    suite: str = "pixelref",
    *,
    tasks: list[int] | None = None,
    trials: int = 50,
    out_dir: str = "",
    pixel_input: str = "oracle",
    prompt_kinds: tuple[str, ...] = ("mask", "points", "box", "line", "none"),
    replan: int | None = None,
    workers: int = 1,
    videos: int = 2,
    seed: int = 7,
    batch_size: int = 50,
    api_key: str | None = None,
    connections: int = 8,
    allow_dataset_mismatch: bool = False,
    splits: tuple[str, ...] = PIXELREF_SPLITS,
) -> dict:
    """`evaluate` against a running policy server (`python -m pixelvla_jax.serve`) instead of
    a local checkpoint: the same episodes, seeds, prompts and reports, the policy being
    `serving.client.RemotePolicy` (row i of a step's batch is sent seeded as `Policy.act`'s
    row i, so the server derives the same visual prompts). `out_dir` is required. `replan`
    None: `default_replan` of the family the server's metadata names (`model_family`)."""
    from pixelvla_jax.serving.client import RemotePolicy

    if suite not in SUITES:
        raise UnknownNameError(f"unknown suite {suite!r}; use one of {SUITES}.")
    if not out_dir:
        raise InvalidInputError("--server needs --out=DIR (there is no checkpoint to write under).")
    if suite == "pixelref":
        prompt_kinds = _pixelref_prompt_kinds(pixel_input, prompt_kinds)
        _check_splits(splits)
    policy = RemotePolicy(server, connections=connections, api_key=api_key)
    try:
        if replan is None:  # the server names π0 runs "pi0" or "pixelvla_pi0" (encoders on)
            served = str(policy.metadata.get("model_family", "pixelvla"))
            replan = default_replan("pi0" if served.endswith("pi0") else "pixelvla", suite)
        served = policy.dataset_name
        if not suite_datasets(suite, [served]) and not allow_dataset_mismatch:
            raise InvalidInputError(
                f"the policy at {server} unnormalises with dataset {served!r}'s statistics, not "
                f"suite {suite!r}'s; serve a run trained on it, or pass --allow_dataset_mismatch."
            )
        if suite in LIBERO_SUITES:
            from pixelvla_jax.envs import libero_eval

            return libero_eval.run(
                policy, suite, tasks, trials, out_dir, pixel_input, replan, workers, videos, seed
            )
        return _evaluate_pixelref(
            policy, prompt_kinds, trials, replan, seed, out_dir, videos, batch_size,
            f"PixelRef, {server}", splits,
        )  # fmt: skip
    finally:
        policy.close()


def _main_on_server(tasks: list[int] | None, kinds: tuple[str, ...]) -> dict:
    if _CHECKPOINT.value or _STEP.value is not None or _TEMPERATURE.value is not None:
        raise app.UsageError(
            "--server evaluates the served policy: drop --checkpoint, --step and "
            "--decode_temperature (they are the server's: pixelvla_jax.serve)."
        )
    api_key = None
    if _API_KEY_ENV.value:
        api_key = os.environ.get(_API_KEY_ENV.value) or None
        if api_key is None:
            raise InvalidInputError(f"--api_key_env={_API_KEY_ENV.value}: unset or empty.")
    return evaluate_on_server(
        _SERVER.value,
        _SUITE.value,
        tasks=tasks,
        trials=_TRIALS.value,
        out_dir=_OUT.value,
        pixel_input=_PIXEL_INPUT.value,
        prompt_kinds=kinds,
        replan=_REPLAN.value,
        workers=_WORKERS.value,
        videos=_VIDEOS.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        api_key=api_key,
        connections=_CONNECTIONS.value,
        allow_dataset_mismatch=_ALLOW_MISMATCH.value,
        splits=_splits(),
    )


def _splits() -> tuple[str, ...]:
    return tuple(s.strip() for s in _SPLITS.value.split(",") if s.strip())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    tasks = [int(t) for t in _TASKS.value.split(",") if t.strip()] or None
    kinds = tuple(k.strip() for k in _PROMPT_KINDS.value.split(",") if k.strip())
    if _SERVER.value:
        _print_results(_main_on_server(tasks, kinds))
        return
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint=DIR is required (a training workdir).")
    results = evaluate(
        _CHECKPOINT.value,
        _SUITE.value,
        tasks=tasks,
        trials=_TRIALS.value,
        out_dir=_OUT.value,
        pixel_input=_PIXEL_INPUT.value,
        prompt_kinds=kinds,
        replan=_REPLAN.value,
        workers=_WORKERS.value,
        videos=_VIDEOS.value,
        seed=_SEED.value,
        step=_STEP.value,
        batch_size=_BATCH.value,
        decode_temperature=_TEMPERATURE.value,
        allow_dataset_mismatch=_ALLOW_MISMATCH.value,
        splits=_splits(),
    )
    _print_results(results)


def _print_results(results: dict) -> None:
    if _SUITE.value == "pixelref":
        from pixelvla_jax.envs.rollout import format_table

        print(format_table(results))
    else:
        print(json.dumps(results.get("summary", results), indent=2))


if __name__ == "__main__":
    from pixelvla_jax import cli

    _define_flags()
    cli.run(main)
