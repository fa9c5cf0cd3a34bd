"""A trained PixelVLA as a closed-loop policy: raw camera frames + text (+ mask) -> actions.

    policy = Policy.from_checkpoint("runs/pixelref")            # a workdir or its checkpoints/
    actions = policy.act(frames, ["pick up the red square"] * B, masks, ["mask"] * B)
    # -> [B, N_c, 7] in the dataset's standardised convention (gripper 1 = open, 0 = closed)

Everything the policy needs comes from the checkpoint (STYLE §7): the config (model, data
preprocessing, prompt template), the parameters, the action statistics used to
unnormalise, and the tokenizer path. Preprocessing calls exactly the training functions:
`data.image.resize_image` / `resize_mask` (or `center_crop` when the run trained with
OpenVLA's random-crop augmentation, as OpenVLA evaluates), the pipeline's tokenisation
(`SampleTransform.tokens_for`, same template and tokenizer) and `data.prompts` for visual
prompts. One jitted `predict_actions` call per `act`.

Prompt kinds (what a user gives the policy to single out the target), per sample:

    "mask"    the pixel mask -> the pixel-aware encoder (and, if the run trained with dense
              mask prompts, the same mask as a visual prompt)
    "points"  positive/negative points sampled from the mask -> the prompt encoder only
    "box"     the mask's bounding box -> the prompt encoder only
    "line"    a stroke through the mask -> the prompt encoder only
    "none"    no pixel-level input at all

Prompts are sampled with `data.prompts.sample_visual_prompt` seeded by (seed, sample index),
so an evaluation is reproducible.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import normalization
from pixelvla_jax.data import prompts as prompts_lib
from pixelvla_jax.models.observation import Observation

PROMPT_KINDS = ("mask", "points", "box", "line", "none")


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
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict | Mapping,
        params: Any,
        statistics: Mapping,
        tokenizer_path: str,
        dataset_name: str = "",
    ):
        from pixelvla_jax.data.pipeline import SampleTransform
        from pixelvla_jax.data.tokenizer import Tokenizer
        from pixelvla_jax.models.pixelvla import PixelVLA
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
        self.model_cfg = config_lib.model_config(cfg)
        self.data_cfg = config_lib.data_config(cfg, tokenizer_path)
        self.model = PixelVLA(self.model_cfg, dtype=config_lib.compute_dtype(cfg))
        self._transform = SampleTransform(
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
        """Loads a policy from a run's workdir (or its `checkpoints/` dir).

        Args:
          path: the workdir or checkpoints dir.
          step: which checkpoint (default: the newest complete one).
          dataset_name: whose statistics unnormalise the actions (default: the run's first
            dataset).
          decode_temperature: discrete head only: overrides the run's
            `model.decode_temperature` (0: greedy; > 0: sampled action tokens).
        """
        from pixelvla_jax.training import checkpoint as checkpoint_lib

        directory = checkpoint_lib.checkpoint_dir(path)
        ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
        try:
            if step is None:
                step = ckpt.latest_complete_step()
                if step is None:
                    raise FileNotFoundError(f"No complete checkpoint in {directory}.")
            saved = ckpt.restore(step)
            cfg = ml_collections.ConfigDict(saved.config)
            if decode_temperature is not None:  # checked before the params are read
                if cfg.model.head != "discrete":
                    raise ValueError(
                        f"decode_temperature={decode_temperature} applies to the discrete head; "
                        f"checkpoint {directory}/{step} has head={cfg.model.head!r}."
                    )
                cfg.model.decode_temperature = float(decode_temperature)
            _, params = ckpt.restore_params(step, abstract_params(cfg))
        finally:
            ckpt.close()
        stats_by_name = saved.dataset_statistics or {}
        names = list((saved.metadata or {}).get("datasets") or stats_by_name)
        if dataset_name is None:
            if not names:
                raise KeyError(f"Checkpoint {directory}/{step} holds no dataset statistics.")
            dataset_name = names[0]
        if dataset_name not in stats_by_name:
            raise KeyError(
                f"Checkpoint {directory}/{step} has no statistics for dataset {dataset_name!r}; "
                f"it has {sorted(stats_by_name)}. Pass dataset_name= one of those."
            )
        tokenizer = (saved.metadata or {}).get("tokenizer", "")
        if not tokenizer or not os.path.exists(tokenizer):
            raise FileNotFoundError(
                f"Checkpoint {directory}/{step}: its tokenizer {tokenizer!r} (metadata "
                "'tokenizer') does not exist; copy the run's tokenizer .model back to that path."
            )
        policy = cls(cfg, params, stats_by_name[dataset_name], tokenizer, dataset_name)
        policy.step = int(step)
        return policy

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
        aug = self.data_cfg.augment_cfg
        return bool(self.data_cfg.augment and aug.enabled and min(aug.crop_scale) < 1.0)

    # ------------------------------------------------------------------ acting

    def _prompt_config(self, kind: str) -> prompts_lib.PromptConfig:
        probs = tuple(float(k == kind) for k in prompts_lib.PROMPT_KINDS)
        return dataclasses.replace(self.data_cfg.prompt_cfg, kind_probs=probs)

    def _dense_mask_prompt_trained(self) -> bool:
        probs = dict(zip(prompts_lib.PROMPT_KINDS, self.data_cfg.prompt_cfg.kind_probs))
        return bool(self.data_cfg.visual_prompts and probs["mask"] > 0)

    def preprocess(
        self,
        images: np.ndarray,
        instructions: Sequence[str],
        pixel_masks: np.ndarray | None = None,
        prompt_kinds: Sequence[str] | None = None,
        seed: int = 0,
    ) -> Observation:
        """The model input of `act` (numpy leaves); see `act` for the arguments."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"Policy.act: images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}."
            )
        b = images.shape[0]
        if len(instructions) != b:
            raise ValueError(f"Policy.act: {len(instructions)} instructions for {b} images.")
        if pixel_masks is not None:
            pixel_masks = np.asarray(pixel_masks)
            if pixel_masks.shape != images.shape[:3]:
                raise ValueError(
                    f"Policy.act: pixel_masks shape {pixel_masks.shape} does not match images "
                    f"{images.shape}; give one [H, W] mask per image."
                )
        if prompt_kinds is None:
            prompt_kinds = [
                "mask" if pixel_masks is not None and pixel_masks[i].any() else "none"
                for i in range(b)
            ]
        if isinstance(prompt_kinds, str):
            prompt_kinds = [prompt_kinds] * b
        if len(prompt_kinds) != b:
            raise ValueError(f"Policy.act: {len(prompt_kinds)} prompt_kinds for {b} images.")
        s, p = self.image_size, self.data_cfg.prompt_cfg.max_points
        out = {k: [] for k in ("image", "pixel_mask", "has_pixel_mask", "tokens")}
        prompts = []
        for i in range(b):
            kind = prompt_kinds[i]
            if kind not in PROMPT_KINDS:
                raise ValueError(f"Policy.act: unknown prompt kind {kind!r}; use {PROMPT_KINDS}.")
            if kind != "none" and (pixel_masks is None or not pixel_masks[i].any()):
                raise ValueError(
                    f"Policy.act: prompt kind {kind!r} for sample {i} needs a non-empty pixel mask "
                    "(the prompt is derived from it); give pixel_masks or use 'none'."
                )
            mask = None
            if self.trained_with_crop:
                scale = float(np.mean(self.data_cfg.augment_cfg.crop_scale))
                if pixel_masks is None:
                    image = image_lib.center_crop(images[i], scale=scale, size=s)
                else:
                    image, mask = image_lib.center_crop(images[i], pixel_masks[i], scale, size=s)
            else:
                image = image_lib.resize_image(images[i], s)
                if pixel_masks is not None:
                    mask = image_lib.resize_mask(pixel_masks[i], s)
            if mask is not None and not mask.any():
                mask = None
            if kind != "none" and mask is None:
                raise ValueError(
                    f"Policy.act: the mask of sample {i} is empty after resizing to {s} px."
                )
            rng = np.random.default_rng([seed, i])
            no_prompt = kind == "mask" and not self._dense_mask_prompt_trained()
            if kind == "none" or no_prompt:
                prompt = prompts_lib.empty_prompt(p, s, s)
            else:
                prompt = prompts_lib.sample_visual_prompt(mask, rng, self._prompt_config(kind))
            use_mask = kind == "mask"
            out["image"].append(image)
            out["pixel_mask"].append(mask if use_mask else np.zeros((s, s), np.float32))
            out["has_pixel_mask"].append(use_mask)
            out["tokens"].append(self._transform.tokens_for(instructions[i]))
            prompts.append(prompt)
        tokens = np.stack(out["tokens"])
        return Observation(
            image=np.stack(out["image"]).astype(np.uint8),
            pixel_mask=np.stack(out["pixel_mask"]).astype(np.float32),
            has_pixel_mask=np.asarray(out["has_pixel_mask"], bool),
            prompt_points=np.stack([q["prompt_points"] for q in prompts]),
            prompt_types=np.stack([q["prompt_types"] for q in prompts]),
            prompt_mask=np.stack([q["prompt_mask"] for q in prompts]).astype(np.float32),
            has_prompt_mask=np.asarray([bool(q["has_prompt_mask"]) for q in prompts]),
            tokens=tokens,
            token_mask=tokens != 0,
        )

    def act(
        self,
        images: np.ndarray,
        instructions: Sequence[str],
        pixel_masks: np.ndarray | None = None,
        prompt_kinds: Sequence[str] | str | None = None,
        seed: int = 0,
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
        Returns:
          float32 [B, N_c, A] unnormalised actions (gripper: 1 = open, 0 = closed).
        """
        obs = self.preprocess(images, instructions, pixel_masks, prompt_kinds, seed)
        rng = jax.random.key(seed)  # used only by a sampling discrete head
        normed = self._predict(self.params, jax.tree.map(jnp.asarray, obs), rng)
        normed = np.asarray(jax.device_get(normed), np.float32)
        return unnormalize_actions(normed, self.statistics)


_PREDICT_CACHE: dict[Any, Any] = {}


def _jitted_predict(model: Any):
    """One jitted predict_actions per model definition (policies of one run share compiles)."""
    from pixelvla_jax.models.pixelvla import PixelVLA

    key = (model.config, jnp.dtype(model.dtype).name)
    if key not in _PREDICT_CACHE:

        def predict(params, obs, rng):
            return model.apply({"params": params}, obs, rng, method=PixelVLA.predict_actions)

        _PREDICT_CACHE[key] = jax.jit(predict)
    return _PREDICT_CACHE[key]


def unnormalize_actions(normed: np.ndarray, statistics: Mapping) -> np.ndarray:
    """[..., A] model outputs -> raw actions with the run's BOUNDS_Q99 statistics.

    Unmasked dims (the gripper) pass through; the gripper is clipped to [0, 1].
    """
    actions = normalization.unnormalize_bounds_q99(normed, statistics["action"])
    mask = np.asarray(statistics["action"].get("mask", np.ones(actions.shape[-1], bool)), bool)
    actions = np.where(mask, actions, np.clip(actions, 0.0, 1.0))
    return actions.astype(np.float32)


def abstract_params(cfg: ml_collections.ConfigDict) -> Any:
    """The run's parameter tree as ShapeDtypeStructs, frozen leaves in `model.frozen_dtype`."""
    from flax import linen as nn

    from pixelvla_jax.models.pixelvla import PixelVLA
    from pixelvla_jax.training import config as config_lib
    from pixelvla_jax.training import optimizer as optimizer_lib

    model_cfg = config_lib.model_config(cfg)
    model = PixelVLA(model_cfg, dtype=config_lib.compute_dtype(cfg))
    spec = model_cfg.spec(1)

    def init(rng):
        obs = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), spec)
        return nn.unbox(model.init(rng, obs)["params"])

    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    if cfg.model.get("frozen_dtype"):
        labels = optimizer_lib.freeze_labels(config_lib.optim_config(cfg), params)
        dtype = jnp.dtype(cfg.model.frozen_dtype)
        params = jax.eval_shape(lambda p: optimizer_lib.cast_frozen(p, labels, dtype), params)
    return params
