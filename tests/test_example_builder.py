"""One example builder for training and acting (docs/design.md §2.1), and the runners' shared batched act.

The pipeline (`SampleTransform.random_map`) and the policy (`Policy.preprocess`) must build
their examples with the same function, `ExampleBuilder.build`: checked by spying on it, and
by comparing the policy's inputs for every prompt kind with the training pipeline's example
of the same raw frames (augmentation off, the prompt kind forced).
"""

import dataclasses
import io

import chex
import numpy as np
import pytest
from PIL import Image

from pixelvla_jax.data import example as example_lib
from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import pipeline, prompts
from pixelvla_jax.envs import libero_eval, rollout
from pixelvla_jax.envs.pixelref import PixelRefConfig, PixelRefEnv
from pixelvla_jax.models.observation import Observation

FRAME = 96  # raw frames are larger than the tiny model's 56 px: the resize is exercised
KINDS = ("mask", "points", "box", "line", "none")
STATS = {
    "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
    "num_transitions": 0,
}


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from pixelvla_jax.data.tokenizer import train_tiny_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tiny.model")
    train_tiny_tokenizer(path, vocab_size=400)
    return path


def _policy(tokenizer_path, variant="tiny", **data):
    """A Policy over the pixelref config (no params: only its preprocessing is used)."""
    from pixelvla_jax.policy import Policy
    from pixelvla_jax.training.config import load_config

    cfg = load_config(f"pixelref:{variant}")
    cfg.data.max_tokens = 64  # the tiny tokenizer's pieces
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return Policy(cfg, None, STATS, tokenizer_path)


def _scenes(n=4):
    """Raw frames, target masks, referred masks and instructions of PixelRef scenes."""
    envs = [PixelRefEnv(100 + k, PixelRefConfig(image_size=FRAME)) for k in range(n)]
    return (
        np.stack([e.image() for e in envs]),
        np.stack([e.target_mask() for e in envs]).astype(np.float32),
        np.stack([e.referred_mask() for e in envs]).astype(np.float32),
        [e.instruction for e in envs],
    )


def _sample(image, mask, instruction, cfg, referred=None):
    """A step sample as the pipeline reads it (PNG: lossless, decodes to the same arrays)."""
    return {
        "image": _png(image),
        "pixel_mask": _png((mask > 0).astype(np.uint8) * 255),
        "referred_mask": b"" if referred is None else _png((referred > 0).astype(np.uint8) * 255),
        "instruction": instruction,
        "action_chunk": np.zeros((cfg.action_chunk, cfg.action_dim), np.float32),
        "action_pad_mask": np.ones(cfg.action_chunk, bool),
        "proprio": np.zeros(3, np.float32),
    }


def _given(obs):
    """The names of the Observation fields that are set (the optional ones may be None)."""
    return [f.name for f in dataclasses.fields(Observation) if getattr(obs, f.name) is not None]


def test_pipeline_and_policy_build_examples_with_the_same_function(tokenizer_path, monkeypatch):
    policy = _policy(tokenizer_path)
    images, masks, referred, instructions = _scenes(2)
    transform = pipeline.SampleTransform(
        policy.data_cfg, [policy.statistics], policy.example_builder.tokenizer
    )
    # Both hold an ExampleBuilder of the run's own DataConfig ...
    assert type(transform.builder) is type(policy.example_builder) is example_lib.ExampleBuilder
    assert transform.builder.cfg == policy.example_builder.cfg == policy.data_cfg

    calls = []
    original = example_lib.ExampleBuilder.row

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((kwargs["train"], kwargs.get("prompt_kind"), out))
        return out

    monkeypatch.setattr(example_lib.ExampleBuilder, "row", spy)
    # ... and both make each example with its `row` and batch rows with its `collate`.
    sample = _sample(images[0], masks[0], instructions[0], policy.data_cfg, referred[0])
    example = transform.random_map((0, sample), np.random.default_rng(0))
    assert [c[:2] for c in calls] == [(True, None)]
    built = policy.example_builder.collate([calls[0][2]])
    for key in example_lib.EXAMPLE_KEYS:
        np.testing.assert_array_equal(example[key], built[key][0], err_msg=key)
    calls.clear()
    obs = policy.preprocess(images, instructions, masks, ["mask", "points"], seed=0)
    assert [c[:2] for c in calls] == [(False, "mask"), (False, "points")]
    built = policy.example_builder.collate([c[2] for c in calls])
    for name in _given(obs):
        if name in built:
            np.testing.assert_array_equal(getattr(obs, name), built[name], err_msg=name)


def test_acting_rows_leave_out_the_training_labels_alone(tokenizer_path):
    """`Policy.example` (what the server runs per request) skips the labels (target centroid,
    grounding target); every model input equals the labelled row of the same draws."""
    policy = _policy(tokenizer_path)
    images, masks, _, instructions = _scenes(1)
    mask = (masks[0] > 0).astype(np.uint8)
    for kind in ("mask", "points"):
        acting = policy.example(images[0], instructions[0], mask, kind, seed=3, index=1).example
        labelled = policy.example_builder.row(
            images[0], instructions[0], mask, rng=np.random.default_rng([3, 1]), train=False,
            prompt_kind=kind,
        )  # fmt: skip
        assert acting.target_point is None and acting.grounding_mask is None
        assert labelled.target_point is not None and labelled.grounding_mask is not None
        inputs = [f.name for f in dataclasses.fields(acting)]
        inputs = [n for n in inputs if n not in ("target_point", "grounding_mask")]
        assert [n for n in inputs if getattr(labelled, n) is None] == [
            n for n in inputs if getattr(acting, n) is None
        ]
        chex.assert_trees_all_equal(
            {n: getattr(acting, n) for n in inputs if getattr(acting, n) is not None},
            {n: getattr(labelled, n) for n in inputs if getattr(labelled, n) is not None},
        )


@pytest.mark.parametrize("variant", ["tiny", "prompts"])
def test_acting_examples_equal_the_pipeline_with_augmentation_off(tokenizer_path, variant):
    """Per prompt kind and sample: the policy's input is the training example of the same
    frame with augmentation off, no mask dropout and that prompt kind forced (same RNG);
    prompt-only kinds withhold the pixel mask. "tiny" trains without visual prompts ("mask"
    is the pixel input alone), "prompts" with them ("mask" is also a dense prompt)."""
    policy = _policy(tokenizer_path, variant)
    assert not policy.trained_with_crop
    images, masks, referred, instructions = _scenes(4)
    dense = policy.example_builder.trained_dense_mask_prompts
    assert dense == (variant == "prompts")
    size = policy.image_size
    for kind in KINDS:
        seed = 11
        obs = policy.preprocess(images, instructions, masks, kind, seed=seed)
        chex.assert_shape(obs.image, (4, size, size, 3))
        chex.assert_shape([obs.pixel_mask, obs.prompt_mask], (4, size, size))
        train_cfg = dataclasses.replace(
            policy.data_cfg,
            augment=False,
            pixel_mask_dropout=0.0,
            visual_prompts=kind != "mask" or dense,
            prompt_cfg=dataclasses.replace(policy.data_cfg.prompt_cfg, kind_probs={kind: 1.0}),
        )
        transform = pipeline.SampleTransform(
            train_cfg, [policy.statistics], policy.example_builder.tokenizer
        )
        for i in range(4):
            sample = _sample(images[i], masks[i], instructions[i], train_cfg, referred[i])
            example = transform.random_map((0, sample), np.random.default_rng([seed, i]))
            assert prompts.prompt_kind(example) == (
                "none" if kind == "mask" and not dense else kind
            )
            acting = {name: getattr(obs, name)[i] for name in _given(obs)}
            expected = {k: example[k] for k in acting}
            if kind != "mask":  # the prompt alone singles out the target
                assert example["has_pixel_mask"] and not acting["has_pixel_mask"]
                expected["pixel_mask"] = np.zeros_like(example["pixel_mask"])
                expected["has_pixel_mask"] = np.bool_(False)
            chex.assert_trees_all_equal_dtypes(acting, expected)
            chex.assert_trees_all_equal(acting, expected)


def test_acting_geometry_of_a_crop_trained_run_is_the_centre_crop(tokenizer_path):
    policy = _policy(tokenizer_path, augment=True, cache_samples=False)
    assert policy.trained_with_crop  # the default augmentation keeps 0.9 of the area
    images, masks, _, instructions = _scenes(2)
    obs = policy.preprocess(images, instructions, masks, "mask")
    for i in range(2):
        image, mask = image_lib.center_crop(images[i], masks[i], 0.9, size=policy.image_size)
        np.testing.assert_array_equal(obs.image[i], image)
        np.testing.assert_array_equal(obs.pixel_mask[i], mask)


def test_training_mode_draws_dropout_then_augmentation_then_prompt(tokenizer_path):
    """The order of a training example's random draws is fixed (resumed pipelines must give
    the same batches): the dropout coin, the crop box and colour jitter, then the prompt."""
    policy = _policy(tokenizer_path, "prompts", augment=True, cache_samples=False)
    builder, cfg = policy.example_builder, policy.data_cfg
    assert cfg.augment and cfg.visual_prompts and cfg.pixel_mask_dropout == 0.5
    images, masks, referred, instructions = _scenes(4)
    dropped = 0
    for i in range(4):
        rng = np.random.default_rng(i)
        got = builder.build(images[i], instructions[i], masks[i], referred[i], rng=rng, train=True)
        rng = np.random.default_rng(i)
        drop = rng.random() < cfg.pixel_mask_dropout
        image, (target, grounding) = image_lib.augment(
            images[i], [masks[i], referred[i]], rng, cfg.augment_cfg, size=cfg.image_size
        )
        size = (cfg.image_size, cfg.image_size)
        prompt = prompts.sample_visual_prompt(None if drop else target, rng, cfg.prompt_cfg, size)
        np.testing.assert_array_equal(got["image"], image)
        np.testing.assert_array_equal(got["grounding_mask"], grounding)  # kept when dropped
        np.testing.assert_array_equal(got["pixel_mask"], 0 * target if drop else target)
        for key, value in prompt.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        dropped += drop
    assert 0 < dropped < 4
    image, text, mask = images[0], instructions[0], masks[0]
    with pytest.raises(ValueError, match="draws its prompt kind"):
        builder.build(image, text, mask, rng=None, train=True, prompt_kind="box")
    with pytest.raises(ValueError, match="unknown prompt kind 'scribble'"):
        builder.build(image, text, mask, rng=None, train=False, prompt_kind="scribble")
    with pytest.raises(ValueError, match="target_mask shape"):
        builder.build(image, text, mask[:8], rng=None, train=False, prompt_kind="none")


# ---------------------------------------------------------------------- runners


class _RecordingPolicy:
    """Returns actions whose gripper is the row index's parity; records each call."""

    chunk_size = 2

    def __init__(self):
        self.calls = []

    def act(self, images, instructions, pixel_masks=None, prompt_kinds=None, seed=0):
        self.calls.append((images.shape, len(instructions), pixel_masks, list(prompt_kinds), seed))
        b = images.shape[0]
        actions = np.zeros((b, self.chunk_size, 7), np.float32)
        actions[..., 0] = np.arange(b)[:, None]
        actions[..., 6] = (np.arange(b) % 2)[:, None]
        return actions


def test_act_padded_pads_to_one_batch_shape_and_drops_the_padding():
    policy = _RecordingPolicy()
    images = [np.zeros((16, 16, 3), np.uint8)] * 3
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    actions = rollout.act_padded(
        policy, images, ["a", "b", "c"], [mask, None, np.zeros((16, 16))], "box", 5, seed=4
    )
    chex.assert_shape(actions, (3, 2, 7))
    np.testing.assert_array_equal(actions[:, 0, 0], [0, 1, 2])
    shape, n_text, masks, kinds, seed = policy.calls[-1]
    assert shape == (5, 16, 16, 3) and n_text == 5 and seed == 4
    assert kinds == ["box", "none", "none", "box", "box"]  # empty masks -> "none"; pad: row 0
    assert masks.shape == (5, 16, 16) and masks.dtype == np.float32
    # No mask anywhere: the policy is not given any.
    rollout.act_padded(policy, images[:1], ["a"], [None], "mask", 2, seed=0)
    assert policy.calls[-1][2] is None and policy.calls[-1][3] == ["none", "none"]
    with pytest.raises(ValueError, match="for a batch of 2"):
        rollout.act_padded(policy, images, ["a", "b", "c"], [None] * 3, "mask", 2, seed=0)


def test_both_runners_share_the_batched_act_and_the_libero_conversion():
    actions = np.array([[0.1, -0.2, 0.0, 0.0, 0.0, 0.3, 1.0], [0, 0, 0, 0, 0, 0, 0.2]])
    converted = rollout.to_libero_actions(actions)
    np.testing.assert_array_equal(converted[:, 6], [-1.0, 1.0])  # 1 = open -> -1 (LIBERO)
    np.testing.assert_array_equal(converted[:, :6], actions[:, :6].astype(np.float32))
    np.testing.assert_allclose(rollout.to_libero_actions(actions, binarize=False)[:, 6], [-1, 0.6])
    # The LIBERO runner's call = the shared padded act + the shared conversion.
    image = np.zeros((16, 16, 3), np.uint8)
    payloads = [{"image": image, "instruction": "go", "mask": None}] * 2
    got = libero_eval._act(_RecordingPolicy(), payloads, 4, "mask", seed=9)
    want = rollout.to_libero_actions(
        rollout.act_padded(_RecordingPolicy(), [image] * 2, ["go"] * 2, [None] * 2, "mask", 4, 9)
    )
    np.testing.assert_array_equal(got, want)
    assert not hasattr(libero_eval, "_to_libero")

    # The PixelRef runner steps its environments with the same conversion, batch padded.
    class Env:
        instruction, max_steps, chance = "go", 4, 0.5

        def __init__(self, seed):
            self.steps, self.done, self.success, self.sent = 0, False, False, []

        def image(self):
            return image

        def target_mask(self):
            return None

        def step(self, action):
            self.sent.append(action)
            self.steps += 1
            self.done = self.steps >= self.max_steps
            return self.done

    made = []

    def make_env(seed):
        made.append(Env(seed))
        return made[-1]

    policy = _RecordingPolicy()
    results = rollout.run_episodes(policy, make_env, [1, 2, 3], "points", batch_size=4)
    assert len(results) == 3 and all(r["steps"] == 4 for r in results)
    assert {c[0] for c in policy.calls} == {(4, 16, 16, 3)}  # always the padded batch
    # Episode 1 is row 1: its first action is (1, 0, ..., gripper 1 = open) -> LIBERO -1.
    np.testing.assert_array_equal(made[1].sent[0], [1, 0, 0, 0, 0, 0, -1])


def test_one_pixel_input_examples_have_the_acting_layout_of_their_kind(tokenizer_path):
    """The default PixelRef recipe (`data.one_pixel_input`): each training example gets one
    pixel input, its kind drawn evenly from mask / points / box / line, laid out exactly as
    acting lays out that kind (the mask as pixel input and dense prompt; the other kinds
    alone, without the pixel mask), sampled from the target's mask."""
    policy = _policy(tokenizer_path, "default")
    builder = policy.example_builder
    images, masks, referred, instructions = _scenes(4)
    layout = lambda e: (  # noqa: E731
        bool(e["has_pixel_mask"]),
        bool(e["has_prompt_mask"]),
        prompts.prompt_kind(e),
    )
    acting = {}
    for kind in ("mask", "points", "box", "line"):
        obs = policy.preprocess(images[:1], instructions[:1], masks[:1], kind)
        acting[kind] = layout({name: getattr(obs, name)[0] for name in _given(obs)})
    assert acting["mask"] == (True, True, "mask")
    assert acting["points"] == (False, False, "points")
    counts = dict.fromkeys(acting, 0)
    for n in range(400):
        i = n % 4
        rng = np.random.default_rng([3, n])
        got = builder.build(images[i], instructions[i], masks[i], referred[i], rng=rng, train=True)
        kind = prompts.prompt_kind(got)
        assert layout(got) == acting[kind], (n, kind)
        counts[kind] += 1
        target = builder.build(images[i], instructions[i], masks[i], rng=rng, train=False,
                               prompt_kind="mask")["pixel_mask"]  # fmt: skip
        if kind == "mask":
            np.testing.assert_array_equal(got["pixel_mask"], target)
        elif kind == "points":  # positive points lie on the target
            size = target.shape[0]
            for (x, y), t in zip(got["prompt_points"], got["prompt_types"]):
                if t == prompts.PROMPT_POSITIVE:
                    assert target[int(y * size), int(x * size)] == 1
    assert all(abs(c / 400 - 0.25) < 0.08 for c in counts.values()), counts
