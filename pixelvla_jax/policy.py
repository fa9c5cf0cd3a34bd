"""A trained PixelVLA as a closed-loop policy: raw camera frames + text (+ mask) -> actions.

    policy = Policy.from_checkpoint("runs/pixelref")   # a workdir, its checkpoints/, or an export
    actions = policy.act(frames, ["pick up the red square"] * B, masks, ["mask"] * B)
    # -> [B, N_c, 7] in the dataset's standardised convention (gripper 1 = open, 0 = closed)

Everything the policy needs comes from the checkpoint (docs/design.md §2.2), read by
`pixelvla_jax.runs.load_run` (the one loader of a trained run): the config (model, data
preprocessing, prompt template), the parameters, the action statistics used to
unnormalise, and the tokenizer file, copied into the checkpoint, so a run directory moved
to another machine still loads. An inference export (`python -m pixelvla_jax.export`)
loads the same way. Each sample's
model input is built by the training pipeline's own `data.example.ExampleBuilder` (acting
mode: `center_crop` when the run trained with OpenVLA's random crop, as OpenVLA evaluates,
else the training resize; same template and tokenizer), from the run's DataConfig. One
jitted `predict_actions` call per `act`.

Prompt kinds (`data.prompts.PROMPT_KINDS`: what a user gives the policy to single out the
target), per sample:

    "mask"    the pixel mask -> the pixel-aware encoder (and, if the run trained with dense
              mask prompts, the same mask as a visual prompt)
    "points"  positive/negative points sampled from the mask -> the prompt encoder only
    "line"    a stroke through the mask -> the prompt encoder only
    "box"     the mask's bounding box -> the prompt encoder only
    "none"    no pixel-level input at all

Prompts are sampled with `data.prompts.sample_visual_prompt` seeded by (seed, sample index),
so an evaluation is reproducible.

A run that trained with a wrist camera (`data.use_wrist_image`) or the proprio state
(`data.use_state`) needs them: `act(..., wrist_images=..., states=...)`, the wrist frames
preprocessed by the same builder as the base camera, the raw states normalised with the run's
proprio statistics. A run without them ignores them (openpi clients send every camera and
the state, whatever the policy). Actions are unnormalised by the run's
`data.normalization` (BOUNDS_Q99 or π0's z-score).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixelvla_jax.data import normalization
from pixelvla_jax.data import prompts as prompts_lib
from pixelvla_jax.errors import InvalidInputError, UnknownNameError
from pixelvla_jax.models.observation import Observation

if TYPE_CHECKING:
    from pixelvla_jax.data.example import ExampleRow

PROMPT_KINDS = prompts_lib.PROMPT_KINDS  # one vocabulary for data, policy and evaluation


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyRow:
    """One sample's model input before batching (`Policy.example` -> `Policy.collate`)."""

    example: ExampleRow  # the example builder's acting row
    state: np.ndarray | None  # float32 [proprio_dim] normalised, for a run with data.use_state


class Policy:
    """PixelVLA + the preprocessing and statistics of its training run (see module docstring).

    Build it with `from_checkpoint`, or directly from a trained experiment's pieces
    (`Policy(cfg, params, statistics, tokenizer_path)`).

    Args:
      cfg: the run's training config (ml_collections.ConfigDict or a dict of it).
      params: the model parameters (unboxed tree of arrays).
      statistics: the dataset's statistics dict (OpenVLA layout, with "action").
      tokenizer_path: the sentencepiece model used in training.
      dataset_name: for messages only.
      step: the checkpoint step the params come from (None: unknown).
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict | Mapping,
        params: Any,
        statistics: Mapping,
        tokenizer_path: str,
        dataset_name: str = "",
        step: int | None = None,
    ):
        from pixelvla_jax.data.example import ExampleBuilder
        from pixelvla_jax.data.tokenizer import Tokenizer
        from pixelvla_jax.training import config as config_lib

        if not isinstance(cfg, ml_collections.ConfigDict):
            cfg = ml_collections.ConfigDict(dict(cfg))
        if "action" not in statistics:
            raise KeyError(
                f"Policy: statistics of dataset {dataset_name!r} have no 'action' entry "
                f"(keys: {sorted(statistics)}); they are needed to unnormalise actions."
            )
        self.cfg = cfg
        self.params = params
        self.statistics = dict(statistics)
        self.dataset_name = dataset_name
        self.tokenizer_path = tokenizer_path
        self.step = step
        self.model_cfg = config_lib.model_config(cfg)
        config_lib.check_tokenizer_fits(self.model_cfg, tokenizer=tokenizer_path)
        self.data_cfg = config_lib.data_config(cfg, tokenizer_path)
        self.model = config_lib.build_model(cfg, self.model_cfg)  # the run's model family
        self.example_builder = ExampleBuilder(
            self.data_cfg, [self.statistics], Tokenizer(tokenizer_path)
        )
        self._predict = _jitted_predict(self.model)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        step: int | None = None,
        dataset_name: str | None = None,
        decode_temperature: float | None = None,
    ) -> Policy:
        """Loads a policy from a run's workdir, its `checkpoints/` dir, or an export directory.

        Args:
          path: the workdir, checkpoints dir or export dir (see `pixelvla_jax.runs.load_run`).
          step: which checkpoint (default: the newest complete one).
          dataset_name: whose statistics unnormalise the actions (default: the run's first
            dataset).
          decode_temperature: discrete head only: overrides the run's
            `model.decode_temperature` (0: greedy; > 0: sampled action tokens).
        """
        from pixelvla_jax import runs

        # Config, statistics and tokenizer first: everything is checked before params are read.
        run = runs.load_run(path, step, load_params=False)
        if run.kind == runs.EXPORT:
            where = f"Export {run.path} (step {run.step})"
        else:
            where = f"Checkpoint {os.path.join(run.path, str(run.step))}"
        cfg = run.config
        if decode_temperature is not None:
            if cfg.model.head != "discrete":
                raise InvalidInputError(
                    f"decode_temperature={decode_temperature} applies to the discrete head; "
                    f"{where} has head={cfg.model.head!r}."
                )
            cfg.model.decode_temperature = float(decode_temperature)
        if dataset_name is None:
            if not run.dataset_names:
                raise UnknownNameError(f"{where} holds no dataset statistics.")
            dataset_name = run.dataset_names[0]
        if dataset_name not in run.statistics:
            raise UnknownNameError(
                f"{where} has no statistics for dataset {dataset_name!r}; "
                f"it has {sorted(run.statistics)}. Pass dataset_name= one of those."
            )
        params = runs.load_run(run.path, run.step).params
        stats = run.statistics[dataset_name]
        return cls(cfg, params, stats, run.tokenizer_path, dataset_name, step=run.step)

    # ------------------------------------------------------------------ properties

    @property
    def chunk_size(self) -> int:
        return self.model_cfg.chunk_size

    @property
    def action_dim(self) -> int:
        return self.model_cfg.action_dim

    @property
    def image_size(self) -> int:
        return self.model_cfg.image_size

    @property
    def trained_with_crop(self) -> bool:
        return self.example_builder.trained_with_crop

    # ------------------------------------------------------------------ acting

    def preprocess(
        self,
        images: np.ndarray,
        instructions: Sequence[str],
        pixel_masks: np.ndarray | None = None,
        prompt_kinds: Sequence[str] | None = None,
        seed: int = 0,
        visual_prompts: Sequence[prompts_lib.VisualPrompt | None] | None = None,
        first_index: int = 0,
        wrist_images: np.ndarray | None = None,
        states: np.ndarray | None = None,
    ) -> Observation:
        """The model input of `act` (numpy leaves); see `act` for the arguments.

        `first_index`: row i draws its prompt with the rng (seed, first_index + i), so rows
        preprocessed one at a time (a server) match the rows of one batched call.
        """
        images, pixel_masks, wrist_images, states = check_observation(
            images, instructions, pixel_masks, wrist_images, states
        )
        b = images.shape[0]
        wrist_images = self._needed(wrist_images, "wrist_images", "use_wrist_image", b)
        states = self._needed(states, "states", "use_state", b)
        if visual_prompts is not None:
            if len(visual_prompts) != b:
                raise InvalidInputError(
                    f"Policy.act: {len(visual_prompts)} visual_prompts for {b} images; give one "
                    "per image (None where a sample has none)."
                )
            if prompt_kinds is None:  # an explicit prompt's own kind, else the default below
                masked = [False] * b if pixel_masks is None else [m.any() for m in pixel_masks]
                prompt_kinds = [
                    vp.kind if vp is not None else ("mask" if m else "none")
                    for vp, m in zip(visual_prompts, masked, strict=True)
                ]
        if prompt_kinds is None:
            prompt_kinds = [
                "mask" if pixel_masks is not None and pixel_masks[i].any() else "none"
                for i in range(b)
            ]
        if isinstance(prompt_kinds, str):
            prompt_kinds = [prompt_kinds] * b
        if len(prompt_kinds) != b:
            raise ValueError(f"Policy.act: {len(prompt_kinds)} prompt_kinds for {b} images.")
        examples = []
        for i in range(b):
            try:
                examples.append(
                    self.example(
                        images[i],
                        instructions[i],
                        None if pixel_masks is None else pixel_masks[i],
                        prompt_kinds[i],
                        seed=seed,
                        index=first_index + i,
                        visual_prompt=None if visual_prompts is None else visual_prompts[i],
                        wrist_image=None if wrist_images is None else wrist_images[i],
                        state=None if states is None else states[i],
                    )
                )
            except ValueError as err:
                raise InvalidInputError(f"Policy.act: sample {i}: {err}") from err
        return self.collate(examples)

    def example(
        self,
        image: np.ndarray,
        instruction: str,
        pixel_mask: np.ndarray | None,
        prompt_kind: str | None,
        *,
        seed: int = 0,
        index: int = 0,
        visual_prompt: prompts_lib.VisualPrompt | None = None,
        wrist_image: np.ndarray | None = None,
        state: np.ndarray | None = None,
    ) -> PolicyRow:
        """One row of `preprocess`, before `collate` stacks rows into the model input: the
        training example builder's acting row (`ExampleBuilder.row`, its prompt drawn by the
        rng (seed, index)) and the normalised state. `preprocess` checks its inputs first
        (`check_observation`); a caller that checked its own (the server's request parser)
        builds rows here, one at a time as they arrive. The wrist frame and the state are
        dropped for a run that did not train with them and required by one that did. Raises
        ValueError for what the builder refuses (an empty mask for a prompt kind that needs
        one, a prompt with too many points).
        """
        wrist_image = self._needed(wrist_image, "wrist_images", "use_wrist_image", 1)
        state = self._needed(state, "states", "use_state", 1)
        row = self.example_builder.row(
            image,
            instruction,
            pixel_mask,
            rng=np.random.default_rng([seed, index]),
            train=False,
            prompt_kind=prompt_kind,
            visual_prompt=visual_prompt,
            wrist_image=wrist_image,
            labels=False,  # the model's inputs alone: no centroid or grounding target per row
        )
        return PolicyRow(row, None if state is None else self.example_builder.state(state))

    def collate(self, rows: Sequence[PolicyRow], pad_to: int = 0) -> Observation:
        """Rows of `example` -> the batched model input, [B, ...] per field (numpy leaves;
        the builder's own `ExampleBuilder.collate`, as the training pipeline batches); with
        `pad_to` > B the first row is repeated up to `pad_to` rows (a server's precompiled
        batch sizes; the padding rows' actions are dropped)."""
        rows = list(rows) + [rows[0]] * (pad_to - len(rows))
        batch = self.example_builder.collate([r.example for r in rows])
        if rows[0].state is not None:
            batch["state"] = np.stack([r.state for r in rows])
        return Observation(
            **{f.name: batch[f.name] for f in dataclasses.fields(Observation) if f.name in batch}
        )

    def _needed(self, value: Any, name: str, field: str, b: int) -> Any:
        """`value` when the run trained with `data.<field>`, else None (ignored); a run that
        needs it and did not get it is an InvalidInputError."""
        if not getattr(self.data_cfg, field):
            return None
        if value is None:
            shape = {"wrist_images": "uint8 [B, H, W, 3] wrist frames"}.get(
                name, "float [B, P] raw proprio states"
            )
            raise InvalidInputError(
                f"Policy.act: this run trained with data.{field}=True; pass {name}= ({shape}, "
                f"B={b})."
            )
        return value

    @property
    def uses_wrist_image(self) -> bool:
        """The run trained with a wrist camera: `act` needs `wrist_images`."""
        return bool(self.data_cfg.use_wrist_image)

    @property
    def uses_state(self) -> bool:
        """The run trained with the proprio state: `act` needs `states`."""
        return bool(self.data_cfg.use_state)

    def act(
        self,
        images: np.ndarray,
        instructions: Sequence[str],
        pixel_masks: np.ndarray | None = None,
        prompt_kinds: Sequence[str] | str | None = None,
        seed: int = 0,
        visual_prompts: Sequence[prompts_lib.VisualPrompt | None] | None = None,
        wrist_images: np.ndarray | None = None,
        states: np.ndarray | None = None,
    ) -> np.ndarray:
        """Predicts an action chunk per sample.

        Args:
          images: uint8 [B, H, W, 3] raw camera frames (any size, training orientation).
          instructions: B task instructions (the template is applied here).
          pixel_masks: [B, H, W] target masks (bool / uint8 / float) or None.
          prompt_kinds: per sample one of PROMPT_KINDS (or one string for all); default:
            "mask" where a non-empty mask is given, else "none".
          seed: seeds the visual prompts sampled from the masks and, for a discrete head
            with `decode_temperature` > 0, the sampled action tokens.
          visual_prompts: per sample an explicit `data.prompts.VisualPrompt` (coordinates in
            [0, 1] of the frame) or None; a sample's prompt kind is then its kind, and its
            mask, if any, is the pixel input.
          wrist_images: uint8 [B, H', W', 3] wrist-camera frames (any size); needed by a run
            that trained with a wrist camera, ignored by others.
          states: float [B, P] raw proprio (LIBERO: eef pos 3, axis-angle 3, gripper qpos 2),
            normalised here with the run's statistics; needed by a run that trained with the
            state, ignored by others.
        Returns:
          float32 [B, N_c, A] unnormalised actions (gripper: 1 = open, 0 = closed).
        """
        obs = self.preprocess(
            images,
            instructions,
            pixel_masks,
            prompt_kinds,
            seed,
            visual_prompts=visual_prompts,
            wrist_images=wrist_images,
            states=states,
        )
        return self.predict(obs, seed)

    def predict(self, obs: Observation, seed: int = 0) -> np.ndarray:
        """`act` on a ready model input (`preprocess`'s, possibly rows of several calls
        stacked, as a server batches them) -> float32 [B, N_c, A] unnormalised actions."""
        # numpy leaves go to the jitted call as they are: its C++ dispatch transfers them in
        # one pass, ~0.5 ms less per call on a 2-core CPU than a jnp.asarray per field.
        normed = self._predict(self.params, obs, _rng_key(seed))
        return unnormalize_actions(
            np.asarray(normed, np.float32),
            self.statistics,
            self.data_cfg.normalization,
        )


def check_observation(
    images: Any,
    instructions: Any,
    pixel_masks: Any = None,
    wrist_images: Any = None,
    states: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """`Policy.act`'s inputs checked: (images, pixel_masks, wrist_images, states) as arrays
    (None where not given), else InvalidInputError.

    A policy that acts on a garbage observation moves a robot: every sample must be a
    non-empty uint8 frame, a non-empty str instruction, (optionally) a binary mask, a
    non-empty uint8 wrist frame and a finite state vector.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InvalidInputError(
            f"Policy.act: images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}."
        )
    b, h, w = images.shape[:3]
    if b == 0:
        raise InvalidInputError("Policy.act: no samples (images has batch size 0).")
    if h == 0 or w == 0:
        raise InvalidInputError(
            f"Policy.act: sample 0: the image is empty ({h}x{w} pixels, images {images.shape}); "
            "give camera frames of at least 1x1 pixels."
        )
    if isinstance(instructions, str | bytes) or not isinstance(instructions, Sequence | np.ndarray):
        raise InvalidInputError(
            f"Policy.act: instructions must be a list of B={b} strings, got "
            f"{type(instructions).__name__}; wrap a single instruction as [instruction] * B."
        )
    if len(instructions) != b:
        raise InvalidInputError(f"Policy.act: {len(instructions)} instructions for {b} images.")
    for i, text in enumerate(instructions):
        if not isinstance(text, str | bytes):
            raise InvalidInputError(
                f"Policy.act: sample {i}: the instruction is {type(text).__name__} "
                f"({text!r}); give the task as a non-empty str, e.g. 'pick up the red block'."
            )
        if not (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).strip():
            raise InvalidInputError(
                f"Policy.act: sample {i}: the instruction is empty ({text!r}); give the task "
                "as a non-empty str, e.g. 'pick up the red block'."
            )
    wrist_images = _check_wrist_images(wrist_images, b)
    states = _check_states(states, b)
    if pixel_masks is None:
        return images, None, wrist_images, states
    pixel_masks = np.asarray(pixel_masks)
    if pixel_masks.shape != images.shape[:3]:
        raise InvalidInputError(
            f"Policy.act: pixel_masks shape {pixel_masks.shape} does not match images "
            f"{images.shape}; give one [H, W] mask per image."
        )
    kind = pixel_masks.dtype.kind
    if kind not in "biuf":
        raise InvalidInputError(
            f"Policy.act: pixel_masks have dtype {pixel_masks.dtype}; give bool, or uint8 / "
            "float with values in {0, 1}."
        )
    if kind == "b":
        return images, pixel_masks, wrist_images, states
    for i, mask in enumerate(pixel_masks):
        if kind == "f" and not np.isfinite(mask).all():
            raise InvalidInputError(
                f"Policy.act: sample {i}: the pixel mask contains NaN or inf; give a binary "
                "mask: bool, or uint8 / float with values in {0, 1}."
            )
        if ((mask == 0) | (mask == 1)).all():  # np.unique (a sort) only for the message
            continue
        values = np.unique(mask)
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (
            ", ..." if len(values) > 6 else ""
        )
        raise InvalidInputError(
            f"Policy.act: sample {i}: the pixel mask has values {{{shown}}}, not only 0 and 1; "
            "give a binary mask: bool, or uint8 / float with values in {0, 1}. For instance "
            "labels (0 = background, k = object k) pass `labels == k` for the target "
            "object k; for a 0/255 image, `mask > 127`."
        )
    return images, pixel_masks, wrist_images, states


def _check_wrist_images(wrist_images: Any, b: int) -> np.ndarray | None:
    if wrist_images is None:
        return None
    wrist_images = np.asarray(wrist_images)
    if wrist_images.ndim != 4 or wrist_images.shape[-1] != 3 or wrist_images.dtype != np.uint8:
        raise InvalidInputError(
            f"Policy.act: wrist_images must be uint8 [B, H, W, 3], got {wrist_images.dtype} "
            f"{wrist_images.shape}."
        )
    if wrist_images.shape[0] != b:
        raise InvalidInputError(
            f"Policy.act: {wrist_images.shape[0]} wrist_images for {b} images; give one wrist "
            "frame per sample."
        )
    if 0 in wrist_images.shape[1:3]:
        raise InvalidInputError(
            f"Policy.act: the wrist frames are empty (wrist_images {wrist_images.shape}); give "
            "frames of at least 1x1 pixels."
        )
    return wrist_images


def _check_states(states: Any, b: int) -> np.ndarray | None:
    if states is None:
        return None
    states = np.asarray(states)
    if states.ndim != 2 or states.dtype.kind not in "iuf":
        raise InvalidInputError(
            f"Policy.act: states must be numbers [B, P] (the raw proprio of each sample), got "
            f"{states.dtype} {states.shape}."
        )
    if states.shape[0] != b:
        raise InvalidInputError(f"Policy.act: {states.shape[0]} states for {b} images.")
    bad = ~np.isfinite(states.astype(np.float64))
    if bad.any():
        i = int(np.argwhere(bad)[0, 0])
        raise InvalidInputError(
            f"Policy.act: sample {i}: the state contains NaN or inf ({states[i].tolist()}); "
            "give the robot's finite proprio."
        )
    return states.astype(np.float32)


_PREDICT_CACHE: dict[Any, Any] = {}


@functools.lru_cache(maxsize=1024)
def _rng_key(seed: int) -> jax.Array:
    """`jax.random.key(seed)`, made once per seed (~50 us per call, a server's every request):
    used only by a discrete head that samples its action tokens."""
    return jax.random.key(seed)


def _jitted_predict(model: Any):
    """One jitted predict_actions per model definition (policies of one run share compiles).

    Every model family has `predict_actions(obs, rng) -> [B, N_c, A]` normalised actions.
    """
    key = (type(model).__name__, model.config, jnp.dtype(model.dtype).name)
    if key not in _PREDICT_CACHE:

        def predict(params, obs, rng):
            return model.apply({"params": params}, obs, rng, method=type(model).predict_actions)

        _PREDICT_CACHE[key] = jax.jit(predict)
    return _PREDICT_CACHE[key]


def unnormalize_actions(
    normed: np.ndarray, statistics: Mapping, mode: str = "bounds_q99"
) -> np.ndarray:
    """[..., A] model outputs -> raw actions with the run's statistics, by the run's
    `data.normalization` mode ("bounds_q99" or "zscore").

    Unmasked dims (the gripper) pass through; the gripper is clipped to [0, 1].
    """
    actions = normalization.unnormalize(normed, statistics["action"], mode)
    mask = np.asarray(statistics["action"].get("mask", np.ones(actions.shape[-1], bool)), bool)
    actions = np.where(mask, actions, np.clip(actions, 0.0, 1.0))
    return actions.astype(np.float32)
