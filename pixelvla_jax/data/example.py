"""The example builder: one raw frame + instruction (+ target mask) -> one model-ready example.

Training (`pipeline.SampleTransform.random_map`) and acting (`policy.Policy.preprocess`) both
call `ExampleBuilder.build`, so what a policy sees at evaluation is made by the function that
made its training examples (docs/design.md §2.1), from the same `DataConfig` the run trained with:

    build(..., train=True)    the training example:
        geometry  OpenVLA's random-resized crop + colour jitter (`image.augment`) when
                  `augment`, else `image.resize_image` / `resize_mask`
        pixels    the target mask, hidden with probability `pixel_mask_dropout`
        prompt    a kind drawn from `prompt_cfg.kind_probs`, sampled from the (kept) mask
        (`one_pixel_input`: one kind drawn per example, given as acting gives it: "mask" =
        the mask as pixel input and dense prompt, other kinds alone)
    build(..., train=False, prompt_kind=k)    the acting example:
        geometry  deterministic: `image.center_crop` at the mean crop scale when the run
                  trained with the random crop (what OpenVLA evaluates on), else the resize
        k="mask"  the mask as the pixel input (and as a dense mask prompt when the run
                  trained with those)
        k="points" / "line" / "box"   a prompt of that kind sampled from the mask; no
                  pixel input
        k="none"  neither

An example is made in two parts: `row` does the per-frame work on a decoded frame (geometry,
colour jitter, the drawn prompt, the grounding labels, the cached tokens) and returns an
`ExampleRow` whose masks stay compact (uint8 0 / 1, or None when absent); `collate` assembles
rows into a batch in numpy at once (stacking, float32 masks, zeros for absent inputs, token
masks), and `collate_actions` normalises a batch's action chunks and proprio with one
operation per dataset. `build` is `collate` of one row: the pipeline's batches (`collate` of
many rows, after Grain's `batch`) hold exactly the arrays `build` gives row by row, which the
policy acts with.

In both modes the text goes through the run's template and tokenizer (cached per
instruction), and the grounding labels (the referred objects' mask, else the target's, and
the target's centre) are computed with the same geometry. Random draws come from the
caller's `rng`, in a fixed order (training: mask dropout, the one-input kind, crop box,
colour jitter, prompt,
then the wrist camera's), so a pipeline seeded by (seed, index) gives the same example on
every run and resume, and a run with a wrist camera sees the same base examples as without.

The wrist camera (`use_wrist_image`) is preprocessed like the base camera, by the same
functions: with `wrist_crop` (OpenVLA-OFT, whose RLDS pipeline augments every camera the
same way with its own seed) the random crop + colour jitter in training and the centre
crop when acting; without it (openpi: wrist cameras get colour jitter only) the resize +
colour jitter in training and the resize when acting. A step stored without a wrist frame
gives zeros and `has_wrist_image` False. The state (`use_state`) is the proprio normalised
by `state` (the policy's path) and, a batch at a time, by `collate_actions` (the
pipeline's), with the same operations.

No Grain, no model: data knows the example layout (`data.config.BATCH_KEYS`), not models.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pixelvla_jax.data import image as image_lib
from pixelvla_jax.data import normalization, prompts
from pixelvla_jax.data.config import BATCH_KEYS, DataConfig
from pixelvla_jax.data.tokenizer import PAD_ID, Tokenizer

log = logging.getLogger(__name__)

__all__ = ["ACTION_KEYS", "EXAMPLE_KEYS", "ExampleBuilder", "ExampleRow"]

# The keys `ExampleBuilder.collate_actions` fills; `collate` / `build` fill the rest of
# BATCH_KEYS.
ACTION_KEYS = ("actions", "action_pad_mask", "proprio", "dataset_id")
EXAMPLE_KEYS = tuple(k for k in BATCH_KEYS if k not in ACTION_KEYS)


@dataclasses.dataclass(slots=True)
class ExampleRow:
    """One example after its per-frame work, before `ExampleBuilder.collate` batches it.

    Masks are uint8 [S, S] of 0 / 1 (shared, not copied: the mask prompt and the grounding
    label may be the pixel mask itself), or None for an absent one: zeros in the batch and
    its `has_*` flag False. `collate` turns them into the batch's float32 in one pass.
    """

    image: np.ndarray  # uint8 [S, S, 3]
    pixel_mask: np.ndarray | None  # uint8 [S, S]
    prompt_points: np.ndarray  # float32 [P, 2]
    prompt_types: np.ndarray  # int32 [P]
    prompt_mask: np.ndarray | None  # uint8 [S, S]
    tokens: np.ndarray  # int32 [L] (the builder's cached array: read only)
    grounding_mask: np.ndarray | None  # uint8 [S, S]
    target_point: np.ndarray | None  # float32 [2]
    # With use_wrist_image: uint8 [S, S, 3], or None for a step without a wrist frame (zeros,
    # has_wrist_image False).
    wrist_image: np.ndarray | None = None


class ExampleBuilder:
    """Builds model-ready examples for one run's `DataConfig` (see module docstring).

    Picklable (the pipeline's worker processes each get a copy).

    Args:
      cfg: the run's DataConfig (or a mapping of it).
      statistics: one OpenVLA-layout statistics dict per dataset (indexed by `dataset_id`
        in `check_actions` / `collate_actions`); `build` does not need them.
      tokenizer: the run's tokenizer.
    """

    def __init__(
        self,
        cfg: DataConfig | Mapping,
        statistics: Sequence[Mapping],
        tokenizer: Tokenizer,
    ):
        self.cfg = DataConfig.from_mapping(cfg)
        self.statistics = [dict(s) for s in statistics]
        self.tokenizer = tokenizer
        self._token_cache: dict[str, np.ndarray] = {}
        self._one_kind_cfgs: dict[str, Any] = {}
        self.truncated = 0  # prompts cut to max_tokens (on_long_prompt="truncate")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_token_cache"] = {}
        return state

    def _one_kind_cfg(self, kind: str) -> Any:
        """The run's PromptConfig drawing only `kind`, made once per kind (its validation
        was ~10% of an acting row's cost)."""
        if kind not in self._one_kind_cfgs:
            self._one_kind_cfgs[kind] = dataclasses.replace(
                self.cfg.prompt_cfg, kind_probs={kind: 1.0}
            )
        return self._one_kind_cfgs[kind]

    # ------------------------------------------------------------------ what the run trained

    @property
    def trained_with_crop(self) -> bool:
        """True when training used OpenVLA's random crop (acting then takes the centre crop)."""
        aug = self.cfg.augment_cfg
        return bool(self.cfg.augment and aug.enabled and min(aug.crop_scale) < 1.0)

    @property
    def trained_dense_mask_prompts(self) -> bool:
        """True when training showed the mask as a dense visual prompt (kind "mask")."""
        return bool(self.cfg.visual_prompts and self.cfg.prompt_cfg.kind_probs["mask"] > 0)

    # ------------------------------------------------------------------ text

    def tokens_for(self, instruction: str | bytes) -> np.ndarray:
        """Instruction -> padded int32 [L] token ids (cached per instruction)."""
        key = instruction if isinstance(instruction, str) else bytes(instruction).decode("utf-8")
        cached = self._token_cache.get(key)
        if cached is not None:
            return cached
        cfg = self.cfg
        text = prompts.format_instruction(key, cfg.prompt_template)
        # BOS + the prompt + the template's action separator (OpenVLA: `▁`, see prompts.py).
        separator = prompts.action_separator(cfg.prompt_template)
        ids = self.tokenizer.encode_prompt(text, separator)
        suffix = prompts.separate_suffix(cfg.prompt_template)  # openpi's π0: "\n" on its own
        if suffix:
            ids = ids + self.tokenizer.encode(suffix, add_bos=False)
        if len(ids) > cfg.max_tokens:
            if cfg.on_long_prompt == "error":
                raise ValueError(
                    f"prompt has {len(ids)} tokens > max_tokens={cfg.max_tokens}: {text!r}. Raise "
                    "DataConfig.max_tokens or set on_long_prompt='truncate'."
                )
            self.truncated += 1
            if self.truncated == 1:
                log.warning(
                    "truncating prompt of %d tokens to %d: %r", len(ids), cfg.max_tokens, text
                )
            ids = ids[: cfg.max_tokens]
        out = np.full((cfg.max_tokens,), PAD_ID, np.int32)
        out[: len(ids)] = ids
        if len(self._token_cache) < 100_000:
            self._token_cache[key] = out
        return out

    # ------------------------------------------------------------------ the example

    def build(
        self,
        image: np.ndarray | Image.Image,
        instruction: str | bytes,
        target_mask: np.ndarray | None = None,
        referred_mask: np.ndarray | None = None,
        *,
        rng: np.random.Generator,
        train: bool,
        prompt_kind: str | None = None,
        visual_prompt: prompts.VisualPrompt | None = None,
        wrist_image: np.ndarray | Image.Image | None = None,
    ) -> dict[str, np.ndarray]:
        """One example: the EXAMPLE_KEYS of a batch, unbatched (+ the wrist camera's keys).

        `collate` of the one `row` these arguments make: the row of a batch that the
        pipeline assembles from many rows.

        Args:
          image: uint8 [H, W, 3] raw frame (or a decoded PIL RGB image).
          instruction: the task instruction (str or UTF-8 bytes); the template is applied here.
          target_mask: [H, W] mask of the target object (bool / uint8 / float), or None.
          referred_mask: [H, W] mask of every object the instruction fits (grounding label
            only), or None: the target mask stands in.
          rng: the example's random draws (training: augmentation, dropout, prompt; acting:
            the points / line / box prompt).
          train: training example (augmentation, dropout, sampled prompt kind) or acting one.
          prompt_kind: acting only: one of `prompts.PROMPT_KINDS`.
          visual_prompt: acting only: an explicit prompt (coordinates in [0, 1] of `image`)
            instead of one derived from the mask; `prompt_kind` is then None or its kind, and
            `target_mask`, when given, is the pixel input (training shows both together).
          wrist_image: uint8 [H', W', 3] wrist frame (or PIL RGB), or None (this step has
            none); only for a config with `use_wrist_image`.
        Returns:
          dict: image uint8 [S, S, 3], pixel_mask float32 [S, S], has_pixel_mask bool,
          prompt_points float32 [P, 2], prompt_types int32 [P], prompt_mask float32 [S, S],
          has_prompt_mask bool, tokens int32 [L], token_mask bool [L], grounding_mask float32
          [S, S], has_grounding_mask bool, target_point float32 [2], has_target_point bool;
          with `use_wrist_image` also wrist_image uint8 [S, S, 3], has_wrist_image bool.
        """
        row = self.row(
            image,
            instruction,
            target_mask,
            referred_mask,
            rng=rng,
            train=train,
            prompt_kind=prompt_kind,
            visual_prompt=visual_prompt,
            wrist_image=wrist_image,
        )
        return {key: value[0] for key, value in self.collate([row]).items()}

    def row(
        self,
        image: np.ndarray | Image.Image,
        instruction: str | bytes,
        target_mask: np.ndarray | None = None,
        referred_mask: np.ndarray | None = None,
        *,
        rng: np.random.Generator,
        train: bool,
        prompt_kind: str | None = None,
        visual_prompt: prompts.VisualPrompt | None = None,
        wrist_image: np.ndarray | Image.Image | None = None,
        labels: bool = True,
    ) -> ExampleRow:
        """The per-frame part of `build` (same arguments, same random draws): an ExampleRow.
        With `labels=False` (acting: `Policy.example`) the training labels are left out
        (`grounding_mask` and `target_point` None); the model's inputs are the same."""
        cfg = self.cfg
        size = cfg.image_size
        if wrist_image is not None and not cfg.use_wrist_image:
            raise ValueError(
                "ExampleBuilder.build: a wrist_image was given but DataConfig.use_wrist_image "
                "is False; set it to train and act with the wrist camera."
            )
        if train and prompt_kind is not None:
            raise ValueError(
                f"ExampleBuilder.build: a training example draws its prompt kind from "
                f"DataConfig.prompt_cfg.kind_probs; got prompt_kind={prompt_kind!r}."
            )
        if visual_prompt is not None:
            _check_explicit_prompt(visual_prompt, prompt_kind, train)
        elif not train:
            _check_acting_kind(prompt_kind, target_mask)
        hw = image.size[::-1] if isinstance(image, Image.Image) else np.shape(image)[:2]
        for name, m in (("target_mask", target_mask), ("referred_mask", referred_mask)):
            if m is not None and np.shape(m) != tuple(hw):
                raise ValueError(
                    f"ExampleBuilder.build: {name} shape {np.shape(m)} does not match image "
                    f"shape {(*hw, 3)}."
                )

        # Drawn first (training), whether or not the mask has pixels: the draw order is fixed.
        dropped = (
            train
            and target_mask is not None
            and cfg.pixel_mask_dropout > 0
            and rng.random() < cfg.pixel_mask_dropout
        )
        # `one_pixel_input`: the example's one pixel input kind (what acting's prompt_kind is).
        one_kind = (
            prompts.draw_kind(rng, cfg.prompt_cfg.kind_probs)
            if train and cfg.one_pixel_input
            else None
        )
        # The patch-grounding target: the objects the instruction fits where the data says
        # (referred_mask), else the target itself. Unlike the pixel input, the target's mask
        # and centre stay labels when the input is dropped.
        if referred_mask is not None and not np.asarray(referred_mask).any():
            referred_mask = None
        image, (target, referred) = self._geometry(image, [target_mask, referred_mask], rng, train)
        grounding = target if referred_mask is None else referred
        # None where the crop or the resize removed the object (or there was none).
        target, grounding = (None if m is None or not m.any() else m for m in (target, grounding))

        if train and one_kind is not None:
            pixel_input = target if one_kind == "mask" else None
            prompt_source = target
            prompt_cfg = None if one_kind == "none" else self._one_kind_cfg(one_kind)
        elif train:
            pixel_input = None if dropped else target
            prompt_source = pixel_input
            prompt_cfg = cfg.prompt_cfg if cfg.visual_prompts else None
        elif visual_prompt is not None:
            pixel_input, prompt_cfg = target, None
        else:
            if prompt_kind != "none" and target is None:
                raise ValueError(
                    f"prompt kind {prompt_kind!r}: the target mask is empty after the resize to "
                    f"{size} px; give a larger mask or use 'none'."
                )
            pixel_input = target if prompt_kind == "mask" else None
            prompt_source = target
            mask_alone = prompt_kind == "mask" and not self.trained_dense_mask_prompts
            prompt_cfg = (
                None if prompt_kind == "none" or mask_alone else self._one_kind_cfg(prompt_kind)
            )
        prompt_mask = None
        if visual_prompt is not None:
            moved = dataclasses.replace(visual_prompt, points=self._acting_points(visual_prompt))
            prompt = prompts.explicit_visual_prompt(moved, cfg.prompt_cfg, (size, size))
            points, types = prompt["prompt_points"], prompt["prompt_types"]
        elif prompt_cfg is None or prompt_source is None:
            points, types = _empty_slots(cfg.prompt_cfg.max_points)
        else:  # `prompt_source` is a non-empty uint8 mask: the draws of sample_visual_prompt
            kind, points, types = prompts.sample_prompt_slots(
                prompt_source.view(bool), rng, prompt_cfg
            )
            prompt_mask = prompt_source if kind == "mask" else None
        row = ExampleRow(
            image=image,
            pixel_mask=pixel_input,
            prompt_points=points,
            prompt_types=types,
            prompt_mask=prompt_mask,
            tokens=self.tokens_for(instruction),
            grounding_mask=grounding if labels else None,
            target_point=_mask_centroid(target) if labels else None,
        )
        if cfg.use_wrist_image:  # drawn last: the base camera's draws do not depend on it
            row.wrist_image = None if wrist_image is None else self._wrist(wrist_image, rng, train)
        return row

    def collate(self, rows: Sequence[ExampleRow]) -> dict[str, np.ndarray]:
        """ExampleRows -> the EXAMPLE_KEYS of a batch (+ the wrist camera's), [B, ...] each,
        dtypes as `build` documents: stacked in numpy, masks converted to float32 once."""
        cfg, size = self.cfg, self.cfg.image_size
        tokens = np.stack([r.tokens for r in rows])
        points = [r.target_point for r in rows]
        batch = {
            "image": np.stack([r.image for r in rows]),
            "pixel_mask": _float_masks([r.pixel_mask for r in rows], size),
            "has_pixel_mask": np.array([r.pixel_mask is not None for r in rows]),
            "prompt_points": np.stack([r.prompt_points for r in rows]),
            "prompt_types": np.stack([r.prompt_types for r in rows]),
            "prompt_mask": _float_masks([r.prompt_mask for r in rows], size),
            "has_prompt_mask": np.array([r.prompt_mask is not None for r in rows]),
            "tokens": tokens,
            "token_mask": tokens != PAD_ID,
            "grounding_mask": _float_masks([r.grounding_mask for r in rows], size),
            "has_grounding_mask": np.array([r.grounding_mask is not None for r in rows]),
            "target_point": np.stack([_NO_POINT if p is None else p for p in points]),
            "has_target_point": np.array([p is not None for p in points]),
        }
        if cfg.use_wrist_image:
            wrists = [r.wrist_image for r in rows]
            zeros = np.zeros((size, size, 3), np.uint8)
            batch["wrist_image"] = np.stack([zeros if w is None else w for w in wrists])
            batch["has_wrist_image"] = np.array([w is not None for w in wrists])
        return batch

    def _wrist(
        self, image: np.ndarray | Image.Image, rng: np.random.Generator, train: bool
    ) -> np.ndarray:
        """Wrist frame -> uint8 [S, S, 3]: see the module docstring."""
        cfg, size = self.cfg, self.cfg.image_size
        if cfg.wrist_crop:
            return self._geometry(image, [], rng, train)[0]
        resized = image_lib.resize_image(image, size)
        if train and cfg.augment:
            return image_lib.jitter_colours(resized, rng, cfg.augment_cfg)
        return resized

    def _geometry(
        self,
        image: np.ndarray | Image.Image,
        masks: list[np.ndarray | None],
        rng: np.random.Generator,
        train: bool,
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Frame and masks -> uint8 [S, S, 3] and uint8 0 / 1 [S, S] masks: one resampling
        from the source frame, the same box for all."""
        cfg, size = self.cfg, self.cfg.image_size
        if train and cfg.augment:
            return image_lib.augment(image, masks, rng, cfg.augment_cfg, size=size, binary=True)
        if not train and self.trained_with_crop:
            scale = float(np.mean(cfg.augment_cfg.crop_scale))
            out, cropped = None, []
            for m in masks:
                if m is not None:
                    out, m = image_lib.center_crop(image, m, scale, size=size, binary=True)
                cropped.append(m)
            if out is None:
                out = image_lib.center_crop(image, scale=scale, size=size)
            return out, cropped
        resized = [None if m is None else image_lib.resize_mask(m, size, True) for m in masks]
        return image_lib.resize_image(image, size), resized

    def _acting_points(self, visual_prompt: prompts.VisualPrompt) -> np.ndarray:
        """An explicit prompt's [K, 2] points in the frame -> in the acting geometry's image:
        the resize keeps [0, 1] coordinates, the centre crop maps its box onto [0, 1]
        (points outside it are clipped to its edge by `explicit_visual_prompt`)."""
        points = np.asarray(visual_prompt.points, np.float32)
        if not self.trained_with_crop:
            return points
        side = float(np.sqrt(np.mean(self.cfg.augment_cfg.crop_scale)))
        return ((points - (1.0 - side) / 2.0) / side).astype(np.float32)

    # ------------------------------------------------------------------ state and actions

    def state(
        self, proprio: np.ndarray | None, dataset_id: int = 0, context: str = ""
    ) -> np.ndarray:
        """Raw proprio [P] -> float32 [proprio_dim]: normalised with the dataset's statistics
        by `DataConfig.normalization`, zero-padded (the batch's `proprio` and `state`).

        Acting (`Policy.preprocess`) calls this; the pipeline's batches (`collate_actions`)
        normalise with the same operations, a batch at a time.
        `context` names the sample in error messages.
        """
        proprio = self._checked_proprio(proprio, dataset_id, context)
        return self._collate_proprio([proprio], np.asarray([dataset_id]))[0]

    def _checked_proprio(self, proprio: np.ndarray | None, dataset_id: int, context: str):
        """Raw proprio [P] (or None) -> float32 [P], checked against the config (see `state`)."""
        cfg = self.cfg
        where = f" ({context})" if context else ""
        proprio = np.asarray(np.zeros((0,), np.float32) if proprio is None else proprio, np.float32)
        if proprio.ndim != 1:
            raise ValueError(f"proprio must be a vector [P], got shape {proprio.shape}{where}.")
        if proprio.shape[-1] > cfg.proprio_dim:
            raise ValueError(
                f"proprio has {proprio.shape[-1]} dims > DataConfig.proprio_dim={cfg.proprio_dim}"
                f"{where}."
            )
        stats = self.statistics[dataset_id]
        if cfg.use_state and (proprio.shape[-1] == 0 or not stats.get("proprio")):
            raise ValueError(
                f"DataConfig.use_state needs a proprio vector and its statistics; got "
                f"{proprio.shape[-1]} proprio dims and statistics "
                f"{'with' if stats.get('proprio') else 'without'} a 'proprio' entry{where}. "
                "Use a dataset whose DatasetSpec has proprio_keys, or set use_state=False."
            )
        return proprio

    def _collate_proprio(self, proprios: Sequence[np.ndarray], dataset_ids: np.ndarray):
        """Checked proprio vectors -> float32 [B, proprio_dim]: normalised, zero-padded; one
        normalisation per (dataset, width) in the batch."""
        cfg = self.cfg
        out = np.zeros((len(proprios), cfg.proprio_dim), np.float32)
        widths = np.asarray([len(p) for p in proprios])
        for first, rows in _groups(dataset_ids * (cfg.proprio_dim + 1) + widths):
            width = widths[first]
            if width == 0:
                continue
            values = np.stack(proprios if isinstance(rows, slice) else [proprios[i] for i in rows])
            stats = self.statistics[dataset_ids[first]]
            out[rows, :width] = normalization.normalize_proprio(values, stats, cfg.normalization)
        return out

    def check_actions(
        self,
        action_chunk: np.ndarray,
        proprio: np.ndarray | None,
        dataset_id: int,
        context: str = "",
    ) -> tuple[np.ndarray, np.ndarray]:
        """One training sample's raw chunk and proprio, checked against the config and the
        dataset's statistics (errors name `context`): (float32 [N_c, A], float32 [P])."""
        cfg = self.cfg
        where = f" ({context})" if context else ""
        chunk = np.asarray(action_chunk, np.float32)
        if chunk.shape != (cfg.action_chunk, cfg.action_dim):
            raise ValueError(
                f"action_chunk has shape {chunk.shape}, expected (action_chunk={cfg.action_chunk},"
                f" action_dim={cfg.action_dim}){where}; build the sources "
                "with the same chunk length as DataConfig.action_chunk."
            )
        stats = self.statistics[dataset_id]
        if "action" not in stats:
            raise KeyError(
                f"statistics of dataset {dataset_id} have no 'action' entry (keys: "
                f"{sorted(stats)}); expected the OpenVLA norm_stats layout from "
                "pixelvla_jax.data.statistics."
            )
        return chunk, self._checked_proprio(proprio, dataset_id, context)

    def collate_actions(
        self,
        action_chunks: Sequence[np.ndarray],
        action_pad_masks: Sequence[np.ndarray],
        proprios: Sequence[np.ndarray],
        dataset_ids: Sequence[int],
    ) -> dict[str, np.ndarray]:
        """Checked rows (`check_actions`) -> the ACTION_KEYS of a batch (+ `state` with
        `use_state`): actions float32 [B, N_c, A], action_pad_mask bool [B, N_c], proprio
        float32 [B, proprio_dim], dataset_id int32 [B]; normalised with one operation per
        dataset in the batch."""
        cfg = self.cfg
        ids = np.asarray(dataset_ids, np.int32)
        chunks = np.stack(action_chunks)
        actions = np.empty_like(chunks)
        for first, rows in _groups(ids):
            stats = self.statistics[ids[first]]["action"]
            actions[rows] = normalization.normalize(chunks[rows], stats, cfg.normalization)
        proprio = self._collate_proprio(proprios, ids)
        out = {
            "actions": actions,
            "action_pad_mask": np.stack(action_pad_masks).astype(bool, copy=False),
            "proprio": proprio,
            "dataset_id": ids,
        }
        if cfg.use_state:
            out["state"] = proprio.copy()
        return out


def _check_acting_kind(kind: Any, target_mask: np.ndarray | None) -> None:
    if kind not in prompts.PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; use one of {prompts.PROMPT_KINDS}.")
    if kind != "none" and (target_mask is None or not np.asarray(target_mask).any()):
        raise ValueError(
            f"prompt kind {kind!r} needs a non-empty pixel mask of the target (the prompt is "
            "derived from it); give one or use 'none'."
        )


def _check_explicit_prompt(prompt: Any, kind: Any, train: bool) -> None:
    if train:
        raise ValueError(
            "ExampleBuilder.build: a training example samples its prompt from the mask; "
            "visual_prompt= is for acting (train=False)."
        )
    if not isinstance(prompt, prompts.VisualPrompt):
        raise TypeError(f"visual_prompt must be a data.prompts.VisualPrompt, got {type(prompt)}.")
    if kind is not None and kind != prompt.kind:
        raise ValueError(
            f"prompt kind {kind!r} contradicts the explicit {prompt.kind!r} visual prompt; give "
            "one of them (or the same kind)."
        )


_NO_POINT = np.zeros(2, np.float32)  # the target point of a row without a target


def _empty_slots(max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The "none" prompt's slots: float32 [P, 2] zeros, int32 [P] PROMPT_PAD."""
    return np.zeros((max_points, 2), np.float32), np.full(
        (max_points,), prompts.PROMPT_PAD, np.int32
    )


def _float_masks(masks: Sequence[np.ndarray | None], size: int) -> np.ndarray:
    """uint8 [S, S] masks (None: absent) -> float32 [B, S, S], zeros for the absent ones.

    The rows of absent masks are never written: their pages stay the kernel's zero pages
    (most of a batch's dense prompt masks are absent; a batch is fresh memory).
    """
    out = np.zeros((len(masks), size, size), np.float32)
    for i, mask in enumerate(masks):
        if mask is not None:
            out[i] = mask
    return out


def _groups(keys: np.ndarray):
    """(index of its first row, its rows) per distinct value of keys [B]: `slice(None)` when
    all rows share one (the usual batch of one dataset: no gather), else index arrays."""
    if (keys == keys[0]).all():
        yield 0, slice(None)
        return
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        yield rows[0], rows


def _mask_centroid(mask: np.ndarray | None) -> np.ndarray | None:
    """uint8 0 / 1 [S, S] mask -> `image.mask_centroid`, or None for no mask."""
    return None if mask is None else image_lib.mask_centroid(mask)
