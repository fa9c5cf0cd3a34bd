"""PixelRef task: expert, determinism, exact masks, ambiguity by construction, dataset, training."""

import collections
import os

import numpy as np
import pytest

from pixelvla_jax.envs import pixelref
from pixelvla_jax.envs.pixelref import COLOURS, PixelRefConfig, PixelRefEnv
from pixelvla_jax.envs.rollout import episode_seeds

SEEDS = episode_seeds(7, 200)


def _expert_rollout(env, seed):
    rng = np.random.default_rng(seed)
    while not env.done:
        env.step(env.expert_action(rng))
    return env


def test_scripted_expert_solves_seeded_episodes():
    successes = [_expert_rollout(PixelRefEnv(s), s).success for s in SEEDS]
    assert np.mean(successes) >= 0.98, np.mean(successes)


def test_rendering_and_masks_are_deterministic_per_seed():
    for seed in SEEDS[:20]:
        a, b = PixelRefEnv(seed), PixelRefEnv(seed)
        np.testing.assert_array_equal(a.image(), b.image())
        np.testing.assert_array_equal(a.target_mask(), b.target_mask())
        assert a.instruction == b.instruction
        for env in (a, b):
            _expert_rollout(env, seed)
        np.testing.assert_array_equal(a.image(), b.image())
    frames = {PixelRefEnv(s).image().tobytes() for s in SEEDS[:20]}
    assert len(frames) == 20, "different seeds must give different scenes"
    # Resolution is configurable; the scene (layout) does not depend on it.
    big = PixelRefEnv(SEEDS[0], PixelRefConfig(image_size=128))
    assert big.image().shape == (128, 128, 3)
    assert big.objects == PixelRefEnv(SEEDS[0]).objects


def test_mask_covers_exactly_the_target():
    for seed in SEEDS[:50]:
        env = PixelRefEnv(seed)
        mask = env.target_mask().astype(bool)
        frame = env.image()
        assert mask.shape == frame.shape[:2] and mask.any()
        # Exactly the target's pixels: all of them in the target's colour ...
        colour = np.array(COLOURS[env.target_object.colour], np.uint8)
        assert (frame[mask] == colour).all()
        # ... and none of any other object (object masks are disjoint).
        for i in range(len(env.objects)):
            if i != env.target:
                assert not (mask & env.object_mask(i).astype(bool)).any()
        # Removing the target from the scene changes exactly the masked pixels.
        env2 = PixelRefEnv(seed)
        env2.grasped = env2.target  # a held object is not drawn on the table
        changed = (env2.image() != frame).any(-1)
        np.testing.assert_array_equal(changed, mask)


def test_referred_mask_is_the_target_and_its_lookalikes():
    for seed in SEEDS[:50]:
        env = PixelRefEnv(seed)
        referred = env.referred_mask().astype(bool)
        expected = np.zeros_like(referred)
        for i in [env.target, *env.lookalikes]:
            expected |= env.object_mask(i).astype(bool)
        np.testing.assert_array_equal(referred, expected)
        assert len(env.lookalikes) >= 1 and referred.sum() > env.target_mask().sum()
        # Every referred pixel shows the named colour: language alone singles them out.
        colour = np.array(COLOURS[env.target_object.colour], np.uint8)
        assert (env.image()[referred] == colour).all()


def test_instruction_is_ambiguous_in_every_episode():
    chances = []
    for seed in SEEDS:
        env = PixelRefEnv(seed)
        assert 3 <= len(env.objects) <= 6
        assert env.lookalikes, f"seed {seed}: the target has no look-alike"
        for i in env.lookalikes:
            assert env.objects[i].name == env.target_object.name
            assert env.objects[i].name in env.instruction
        chances.append(env.chance)
    assert 0.3 < np.mean(chances) <= 0.5


def test_scene_alone_does_not_tell_the_named_kind():
    # With room for it, a second kind appears at least twice (a decoy pair): picking "the
    # kind seen more than once" is no substitute for reading the instruction.
    def only_target_kind_repeats(env):
        counts = collections.Counter(o.name for o in env.objects)
        target = env.target_object.name
        room = len(env.objects) - counts[target] >= 2
        return room, all(n == 1 for kind, n in counts.items() if kind != target)

    rooms = [only_target_kind_repeats(PixelRefEnv(seed)) for seed in SEEDS]
    assert sum(room for room, _ in rooms) >= len(SEEDS) // 3
    assert not any(room and only for room, only in rooms)
    plain = PixelRefConfig(decoy_pair=False)
    rooms = [only_target_kind_repeats(PixelRefEnv(seed, plain)) for seed in SEEDS]
    assert sum(room and only for room, only in rooms) >= len(SEEDS) // 4


def test_grasping_a_lookalike_or_nothing_fails():
    env = PixelRefEnv(SEEDS[3])
    other = env.objects[env.lookalikes[0]]
    for _ in range(20):
        delta = np.array([other.x, other.y]) - env.gripper
        env.step(np.r_[np.clip(delta, -0.1, 0.1), np.zeros(4), -1.0])
    assert not env.done
    env.step(np.r_[np.zeros(6), 1.0])
    assert env.done and env.grasped == env.lookalikes[0] and not env.success
    assert env.outcome == "look-alike"

    env = PixelRefEnv(SEEDS[3])
    env.step(np.r_[np.zeros(6), 1.0])  # the start is far from every object
    assert env.done and env.grasped is None and not env.success

    env = PixelRefEnv(SEEDS[3])
    for _ in range(env.max_steps):
        env.step(np.r_[0.05, 0.0, np.zeros(4), -1.0])
    assert env.done and not env.success and env.steps == env.max_steps


def test_demonstrations_record_the_clean_correction_from_the_noisy_state():
    # DART: the executed action is noisy, the label is the expert's action from where the
    # noise led, so labels are a function of the rendered state and cover off-centre states.
    offsets = []
    for seed in SEEDS[:30]:
        ep = pixelref.expert_episode(seed)
        env = PixelRefEnv(seed)
        for t, label in enumerate(ep["actions"][:-1]):
            env.gripper = ep["states"][t][:2].astype(np.float64)
            np.testing.assert_allclose(label, env.expert_action(), atol=1e-6)
        cell = (ep["states"][:, :2] * env.cfg.grid) % 1.0 - 0.5
        offsets.append(np.abs(cell).max())
    assert np.mean(offsets) > 0.05  # the gripper leaves the cell centres
    assert ep["success"]


def test_outcome_names_how_the_episode_ended():
    env = PixelRefEnv(SEEDS[0])
    assert env.outcome == "running"
    _expert_rollout(env, 0)
    assert env.outcome == "target"
    env = PixelRefEnv(SEEDS[3])
    env.step(np.r_[np.zeros(6), 1.0])
    assert env.outcome == "nothing"
    env = PixelRefEnv(SEEDS[3])
    for _ in range(env.max_steps):
        env.step(np.r_[np.zeros(6), -1.0])
    assert env.outcome == "timeout"


def test_generated_dataset_reads_back_with_masks_and_standardised_actions(tmp_path):
    from pixelvla_jax.data import image as image_lib
    from pixelvla_jax.data.step_index import StepDataset

    path = pixelref.generate_dataset(tmp_path, num_episodes=3, seed=5)
    ds = StepDataset(path, action_chunk=4, name="pixelref")
    episodes = [pixelref.expert_episode(pixelref.training_seed(5, k)) for k in range(3)]
    assert len(ds) == sum(len(e["actions"]) for e in episodes)
    sample = ds[0]
    first = episodes[0]
    assert sample["instruction"] in (first["instruction"], first["instruction"].encode())
    np.testing.assert_array_equal(image_lib.decode_mask(sample["pixel_mask"]), first["target_mask"])
    referred = image_lib.decode_mask(sample["referred_mask"])
    np.testing.assert_array_equal(referred, first["referred_mask"])
    frame = image_lib.decode_image(sample["image"])
    assert frame.shape == (56, 56, 3)
    for k in range(len(first["actions"])):  # JPEG: close to the renders
        frame = image_lib.decode_image(ds[k]["image"])
        assert np.abs(frame.astype(int) - first["frames"][k]).mean() < 4
    # LIBERO gripper (-1 open) -> standardised 1 = open; translation deltas kept.
    np.testing.assert_allclose(sample["action_chunk"][0, :2], first["actions"][0, :2], atol=1e-6)
    assert sample["action_chunk"][0, 6] == 1.0
    last = ds[len(episodes[0]["actions"]) - 1]
    assert last["action_chunk"][0, 6] == 0.0  # closed while holding

    # Generated data records how it was made; other settings or older data are refused.
    dataset_dir = os.path.dirname(path)
    cfg = PixelRefConfig()
    pixelref.check_generated(dataset_dir, 3, 5, cfg)
    for args in ((4, 5, cfg), (3, 6, cfg), (3, 5, PixelRefConfig(expert_noise=0.0))):
        with pytest.raises(ValueError, match="Delete"):
            pixelref.check_generated(dataset_dir, *args)
    os.remove(os.path.join(dataset_dir, pixelref.GENERATOR_FILE))
    with pytest.raises(ValueError, match="incomplete.*Delete it to regenerate"):
        pixelref.check_generated(dataset_dir, 3, 5, cfg)


def _pixelref_config(variant="tiny"):
    from pixelvla_jax.training import config as config_lib

    return config_lib.load_config(f"pixelref:{variant}")


def test_config_variants():
    default = _pixelref_config("default")
    # One model for every pixel input: one kind per example, evenly.
    assert default.model.use_pixel_encoder and default.model.use_prompt_encoder
    assert default.data.visual_prompts and default.data.one_pixel_input
    kinds = {k: p for k, p in default.data.prompt_cfg.kind_probs.items() if p}
    assert kinds == {"mask": 0.25, "points": 0.25, "box": 0.25, "line": 0.25}
    baseline = _pixelref_config("no_pixel")
    assert not baseline.model.use_pixel_encoder and not baseline.model.use_prompt_encoder
    assert not _pixelref_config("mask_only").data.visual_prompts
    prompts = _pixelref_config("prompts").data
    assert prompts.visual_prompts and not prompts.one_pixel_input and prompts.pixel_mask_dropout
    with pytest.raises(ValueError, match="unknown variant"):
        _pixelref_config("huge")
    # The baseline is the same recipe: only the pixel-level inputs differ.
    flat = lambda c: {  # noqa: E731
        f"{group}.{key}": value
        for group, node in c.to_dict().items()
        if isinstance(node, dict)
        for key, value in node.items()
    }
    a, b = flat(default), flat(baseline)
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} == {"model.use_pixel_encoder", "model.use_prompt_encoder"}


# Training a tiny PixelRef run on generated data (the loss goes down) is tested in
# tests/test_serving.py, whose server serves that trained checkpoint.


def test_held_out_target_kinds_never_named_in_training_scenes():
    """Training scenes (and the in-distribution split) never name a held-out kind as the
    target, though those kinds appear as other objects and their colours and shapes are
    targets of other kinds; the held-out split names only them; the more-objects split has
    more objects than any training scene."""
    train_cfg = PixelRefConfig()
    held_out = set(pixelref.HELD_OUT_TARGETS)
    targets, others, sizes = collections.Counter(), collections.Counter(), set()
    for k in range(400):
        env = PixelRefEnv(pixelref.training_seed(0, k), train_cfg)
        targets[env.target_object.name] += 1
        others.update(o.name for i, o in enumerate(env.objects) if i != env.target)
        sizes.add(len(env.objects))
    assert not held_out & set(targets)
    assert held_out <= set(others)
    named = {w for name in targets for w in name.split()}
    assert {w for name in held_out for w in name.split()} <= named
    assert len(targets) == 12 - len(held_out)
    split = {name: pixelref.split_env(name) for name in pixelref.EVAL_SPLITS}
    assert {split["held_out_kinds"](s).target_object.name for s in SEEDS} == held_out
    assert not held_out & {split["in_distribution"](s).target_object.name for s in SEEDS}
    crowded = [len(split["more_objects"](s).objects) for s in SEEDS]
    assert min(crowded) > max(sizes) == train_cfg.max_objects
    for env in (split["held_out_kinds"](s) for s in SEEDS[:50]):
        assert len(env.lookalikes) >= 1  # still ambiguous without the pixel input
    with pytest.raises(ValueError, match="not colour-shape kinds"):
        PixelRefConfig(held_out_targets=("purple square",))
    with pytest.raises(ValueError, match="unknown PixelRef split"):
        pixelref.split_env("unseen")
