"""Policy round trip from a checkpoint, training-identical preprocessing, evaluate CLI outputs."""

import json
import os

import jax
import numpy as np
import pytest

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import normalization
from pixelvla_jax.envs.pixelref import HELD_OUT_TARGETS, PixelRefEnv
from pixelvla_jax.envs.rollout import episode_seeds
from pixelvla_jax.models.observation import PROMPT_BOX_TOP_LEFT, PROMPT_PAD, PROMPT_POSITIVE
from pixelvla_jax.models.pixelvla import PixelVLA
from pixelvla_jax.policy import Policy
from pixelvla_jax.training import config as config_lib


def _config(data_dir):
    cfg = config_lib.load_config("pixelref:tiny")
    cfg.data.data_dir = str(data_dir)
    cfg.data.num_threads = 1
    cfg.data.shuffle = False
    cfg.data_generator.num_episodes = 3
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint of a freshly initialised run (nothing trained: no train-step compile)."""
    from pixelvla_jax.training import experiment

    root = tmp_path_factory.mktemp("policy")
    cfg = _config(root / "data")
    exp = experiment.setup(cfg, str(root / "run"))
    experiment.save_checkpoint(exp, 0)
    exp.checkpointer.wait_until_finished()
    exp.checkpointer.close()
    return exp, str(root / "run")


@pytest.fixture(scope="module")
def policy(run):
    return Policy.from_checkpoint(run[1])


def _scene(n=3):
    envs = [PixelRefEnv(s) for s in episode_seeds(7, n)]
    images = np.stack([e.image() for e in envs])
    masks = np.stack([e.target_mask() for e in envs])
    return envs, images, masks


def test_round_trip_shapes_params_and_statistics(run, policy):
    exp, workdir = run
    assert (policy.chunk_size, policy.action_dim, policy.image_size) == (4, 7, 56)
    assert policy.step == 0
    flat_a = jax.tree_util.tree_leaves_with_path(exp.state.params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(policy.params))
    for path, value in flat_a:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]))
    # The statistics are the checkpoint's, i.e. those of the training dataset.
    stats = exp.statistics[0]["action"]
    np.testing.assert_allclose(policy.statistics["action"]["q01"], stats["q01"])
    np.testing.assert_allclose(policy.statistics["action"]["q99"], stats["q99"])
    # The checkpoints/ dir works too.
    again = Policy.from_checkpoint(os.path.join(workdir, "checkpoints"), step=0)
    envs, images, masks = _scene(3)
    instructions = [e.instruction for e in envs]
    a = policy.act(images, instructions, masks, seed=1)
    b = again.act(images, instructions, masks, seed=1)
    assert a.shape == (3, 4, 7) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_actions_are_unnormalised_with_the_checkpoint_statistics(policy):
    envs, images, masks = _scene(2)
    instructions = [e.instruction for e in envs]
    obs = policy.preprocess(images, instructions, masks, ["mask", "none"], seed=3)
    # The model itself, outside the policy's jitted call.
    normed = jax.jit(
        lambda p, o: policy.model.apply({"params": p}, o, method=PixelVLA.predict_actions)
    )(policy.params, jax.tree.map(np.asarray, obs))
    expected = normalization.unnormalize_bounds_q99(np.asarray(normed), policy.statistics["action"])
    expected[..., 6] = np.clip(expected[..., 6], 0, 1)
    got = policy.act(images, instructions, masks, ["mask", "none"], seed=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Other statistics -> other actions (the mapping really uses them).
    scaled = {
        "action": {
            **policy.statistics["action"],
            "q99": list(np.asarray(policy.statistics["action"]["q99"]) * 2),
        }
    }
    other = Policy(policy.cfg, policy.params, scaled, policy.tokenizer_path)
    moved = other.act(images, instructions, masks, ["mask", "none"], seed=3)
    assert not np.allclose(moved[..., :2], got[..., :2])


def test_preprocessing_is_the_training_pipeline(run, policy):
    """The policy's input for a raw dataset frame equals the training batch's."""
    from pixelvla_jax.data import pipeline as pipeline_lib
    from pixelvla_jax.data.step_index import StepDataset

    exp, _ = run
    cfg = exp.cfg
    source = StepDataset(
        os.path.join(cfg.data.data_dir, "pixelref"), action_chunk=4, name="pixelref"
    )
    dcfg = policy.data_cfg
    transform = pipeline_lib.SampleTransform(
        dcfg, [policy.statistics], policy.example_builder.tokenizer
    )
    sample = source[2]
    example = transform.random_map((0, sample), np.random.default_rng(0))
    frame = image_lib.decode_image(sample["image"])
    mask = image_lib.decode_mask(sample["pixel_mask"])
    text = sample["instruction"]
    text = text.decode() if isinstance(text, bytes) else text
    obs = policy.preprocess(frame[None], [text], mask[None], ["mask"])
    np.testing.assert_array_equal(obs.image[0], example["image"])
    np.testing.assert_array_equal(obs.pixel_mask[0], example["pixel_mask"])
    np.testing.assert_array_equal(obs.tokens[0], example["tokens"])
    assert obs.has_pixel_mask[0] and example["has_pixel_mask"]


def test_prompt_kinds_select_the_inputs(policy):
    envs, images, masks = _scene(4)
    instructions = [e.instruction for e in envs]
    obs = policy.preprocess(images, instructions, masks, ["mask", "points", "box", "none"], seed=0)
    np.testing.assert_array_equal(obs.has_pixel_mask, [True, False, False, False])
    # The default run trains without visual prompts: "mask" feeds the pixel encoder only.
    assert not obs.has_prompt_mask.any() and (obs.prompt_types[0] == PROMPT_PAD).all()
    assert (obs.prompt_types[1] == PROMPT_POSITIVE).any()
    small = image_lib.resize_mask(masks[1], 56)
    for (x, y), t in zip(obs.prompt_points[1], obs.prompt_types[1]):
        if t == PROMPT_POSITIVE:
            assert small[int(y * 56), int(x * 56)] == 1  # positive points lie on the target
    assert obs.prompt_types[2, 0] == PROMPT_BOX_TOP_LEFT
    assert (obs.prompt_types[3] == PROMPT_PAD).all() and not obs.pixel_mask[3].any()
    # Seeded: the same call gives the same prompts.
    again = policy.preprocess(images, instructions, masks, ["mask", "points", "box", "none"])
    np.testing.assert_array_equal(again.prompt_points, obs.prompt_points)
    # Default kinds: "mask" where a mask is given.
    plain = policy.preprocess(images, instructions, masks)
    assert plain.has_pixel_mask.all()
    assert not policy.preprocess(images, instructions).has_pixel_mask.any()


def test_act_errors_name_the_problem(policy):
    envs, images, masks = _scene(2)
    instructions = [e.instruction for e in envs]
    with pytest.raises(ValueError, match=r"pixel_masks shape \(2, 8, 8\)"):
        policy.act(images, instructions, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="unknown prompt kind 'scribble'"):
        policy.act(images, instructions, masks, ["scribble", "mask"])
    with pytest.raises(ValueError, match="needs a non-empty pixel mask"):
        policy.act(images, instructions, None, ["points", "none"])
    with pytest.raises(ValueError, match="1 instructions for 2 images"):
        policy.act(images, instructions[:1])
    with pytest.raises(FileNotFoundError, match="No checkpoints found"):
        Policy.from_checkpoint("/nonexistent/run")


def test_evaluate_writes_results_json_plot_and_gifs(run, tmp_path):
    from pixelvla_jax import evaluate
    from pixelvla_jax.envs.rollout import format_table

    out = tmp_path / "eval"
    results = evaluate.evaluate(
        run[1], "pixelref", trials=3, out_dir=str(out), prompt_kinds=("mask", "none"), videos=1
    )
    assert set(results["success"]) == {"mask", "none"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_episodes"] == 3 and len(saved["episodes"]["mask"]) == 3
    assert 0 < saved["chance_rate"] <= 0.5
    assert (out / "success.png").stat().st_size > 0
    # Every scene split on the same seeds and kinds; the first's figures on top.
    assert list(saved["splits"]) == ["in_distribution", "held_out_kinds", "more_objects"]
    assert saved["splits"]["in_distribution"]["success"] == saved["success"]
    for split in saved["splits"].values():
        assert set(split["success"]) == {"mask", "none"} and 0 < split["chance_rate"] <= 0.5
    held_out = saved["splits"]["held_out_kinds"]["episodes"]["mask"]
    assert {e["instruction"].removeprefix("pick up the ") for e in held_out} <= set(
        HELD_OUT_TARGETS
    )
    gifs = sorted(p.name for p in out.glob("*.gif"))
    assert gifs == [f"mask_{episode_seeds(7, 1)[0]}.gif", f"none_{episode_seeds(7, 1)[0]}.gif"]
    table = format_table(results)
    header, rows = table.splitlines()[0], table.splitlines()[2:]
    assert all(s in header for s in saved["splits"]) and "chance" in table
    mask_row = next(r for r in rows if r.startswith("mask"))
    for split in saved["splits"].values():
        assert f"{split['success']['mask'] * 100:.1f}%" in mask_row


def test_rollout_gifs_draw_the_prompt_the_policy_was_given(policy):
    """`given_prompt` reproduces row k of a batched call (the policy's own preprocessing,
    rng (seed, k)), and `draw_prompt` draws it: points, the box, the line's stroke, the mask
    outline, each in its colour where the prompt is."""
    from PIL import Image

    from pixelvla_jax.envs import rollout

    envs, images, masks = _scene(3)
    instructions = [e.instruction for e in envs]
    for kind in ("points", "box", "line", "mask"):
        obs = policy.preprocess(images, instructions, masks, kind, seed=5)
        for k in range(3):
            given = rollout.given_prompt(
                policy, images[k], instructions[k], masks[k], kind, seed=5, row=k
            )
            for name, value in given.items():
                np.testing.assert_array_equal(value, np.asarray(getattr(obs, name))[k])
        scale = 4
        frame = Image.fromarray(images[0]).resize((56 * scale, 56 * scale), Image.NEAREST)
        given = rollout.given_prompt(policy, images[0], instructions[0], masks[0], kind, 5, 0)
        drawn = np.asarray(rollout.draw_prompt(frame.copy(), given))
        changed = np.any(drawn != np.asarray(frame), axis=-1)
        ys, xs = np.nonzero(masks[0])
        box = (xs.min() * scale - 6, ys.min() * scale - 6, (xs.max() + 1) * scale + 6,
               (ys.max() + 1) * scale + 6)  # fmt: skip
        colour = rollout.PROMPT_COLOURS[{"points": 1, "line": 3}.get(kind, kind)]
        cy, cx = np.nonzero(np.all(drawn == colour, axis=-1))
        assert len(cy) > 10, kind  # drawn in the kind's colour on or around the target
        assert (cx >= box[0]).all() and (cx <= box[2]).all(), kind
        assert (cy >= box[1]).all() and (cy <= box[3]).all(), kind
        if kind != "points":  # only negative points may lie away from the target
            cy, cx = np.nonzero(changed)
            assert (cx >= box[0]).all() and (cx <= box[2]).all(), kind
    assert rollout.draw_prompt(frame, None) is frame  # a served policy: nothing to draw


def test_decode_temperature_override_needs_a_discrete_checkpoint(run):
    with pytest.raises(ValueError, match="discrete head"):
        Policy.from_checkpoint(run[1], decode_temperature=1.0)
