"""The assembled PixelVLA model: vision + pixel/prompt encoders + Llama + action head.

Token sequence into the LLM (docs/design.md §1.3), for a batch of `Observation`s:

    [BOS] [E_v: N_v vision tokens] [E_p: N_p pixel tokens] [E_s: N_s prompt tokens]
    [text tokens after BOS, right-padded to L-1] [suffix]

`E_p` / `E_s` exist only when `use_pixel_encoder` / `use_prompt_encoder` is on (stage 1
and plain OpenVLA turn them off, and the sequence is then exactly OpenVLA's); a sample
without a mask or prompt gets the encoders' learned "absent" tokens, under the same jit.
RoPE positions count only valid tokens (`positions_from_mask`), so the text padding
leaves positions contiguous and the suffix continues right after the last real token.

`text_first=True` puts the instruction before the image instead,

    [BOS] [text tokens after BOS, right-padded to L-1] [E_v] [E_p] [E_s] [suffix]

so that, under causal attention, every image token sees the instruction (with the image
first, only the tokens after it can bind words to patches). It is what
`patch_grounding_weight` needs: an auxiliary loss that asks each image token's last hidden
state whether its patch shows an object the instruction names (BCE against the data's
referred-objects mask, else the target mask, pooled onto the patch grid), dense
supervision for reading the instruction off the image. From-scratch models
(configs/pixelref.py) learn to ground the instruction this way; OpenVLA checkpoints keep
their image-first order.

The suffix depends on the head:
- `head="l1"`, `l1_mode="pixelvla"` (PixelVLA's default): `N_c * A` action slots (a learned
  embedding per slot), attended bidirectionally among themselves and causally to the
  prefix; their last hidden states go through the `L1ActionHead` MLP-ResNet -> [B, N_c, A].
- `head="l1"`, `l1_mode="oft"`: exactly OpenVLA-OFT's parallel decoding (its
  `predict_action` with an L1 head, `prismatic/extern/hf/modeling_prismatic.py`, and its
  Llama fork whose attention is fully bidirectional): `N_c * A` action positions whose
  input embeddings are zeros, then the stop token (EOS, 2); the *whole* sequence attends
  bidirectionally (only padding is masked); the head reads the hidden states shifted back
  by one, from the last prompt token through the second-to-last action position. With
  `use_wrist_image` a second camera goes through the same fused backbone and its vision
  tokens follow the first camera's; with `use_proprio` the proprio projector's token
  (state -> LLM width, `ProprioProjector`) follows the vision tokens, as OFT appends it:

      [BOS] [E_v] [E_v wrist] [proprio] [E_p] [E_s] [text] [0 x N_c*A] [EOS]

  (E_p, E_s when the pixel/prompt encoders are on: PixelVLA's stage 2 from an OFT
  checkpoint; with them off the sequence is exactly OFT's). OFT's FiLM is not implemented.
- `head="discrete"`: OpenVLA's head. Training appends the `A` action tokens of the first
  action (`DiscreteActionTokenizer`), causally; the cross-entropy covers the prediction of
  those A tokens and of EOS (A + 1 positions), nothing else. Inference prefills the KV
  cache with the prefix and greedily decodes A tokens (argmax over the whole padded
  vocabulary, as OpenVLA's `generate`), then maps them to bin centres: chunk size 1.
  `target_point_tokens=True` prepends two tokens to the action: the target's centre (x, y)
  in [0, 1] of the image, binned like actions and learnt from the target mask's centroid
  (grounding before acting, as ECoT's bounding boxes). Sampled first, the point commits the
  action tokens to one object where the instruction fits several.

Entry points (all jit-able, static shapes):
    model = PixelVLA(config)
    variables = model.init(rng, obs)                       # or abstract_variables(config)
    loss, metrics = model.apply(variables, obs, actions, pad_mask, method=PixelVLA.loss)
    actions = model.apply(variables, obs, method=PixelVLA.predict_actions)  # [B, N_c, A]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pixelvla_jax.models import llama as llama_lib
from pixelvla_jax.models.action_heads import (
    DiscreteActionTokenizer,
    L1ActionHead,
    L1ActionHeadConfig,
    l1_loss,
    l1_per_dimension,
)
from pixelvla_jax.models.layers import logical_dense
from pixelvla_jax.models.llama import (
    KVCache,
    Llama,
    LlamaConfig,
    make_attention_mask,
    make_cache_attention_mask,
    positions_from_mask,
)
from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pixel_encoder import (
    PixelEncoder,
    PixelEncoderConfig,
    level_blocks,
)
from pixelvla_jax.models.prompt_encoder import PromptEncoder, PromptEncoderConfig
from pixelvla_jax.models.vision import (
    FusedVisionBackbone,
    Projector,
    VisionConfig,
    image_to_unit_float,
)

HEADS = ("l1", "discrete")
L1_MODES = ("pixelvla", "oft")


@dataclasses.dataclass(frozen=True)
class PixelVLAConfig:
    """The whole model.

    Attributes:
      vision: the fused DINOv2 + SigLIP backbone and projector (projector output = LLM width).
      llama: the language model (vocab_size is the padded embedding size, 32064 in OpenVLA).
      pixel_encoder, prompt_encoder: the pixel-level encoders (out_dim = LLM width).
      action_head: the L1 head; its `chunk_size` (N_c) and `action_dim` (A) are the model's.
      use_pixel_encoder, use_prompt_encoder: include E_p / E_s in the sequence (stage 1: off).
      head: "l1" (continuous chunk, parallel decoding) or "discrete" (OpenVLA tokens).
      l1_mode: the L1 head's decoding, "pixelvla" (learned action slots after a causal
        prompt) or "oft" (OpenVLA-OFT's; see the module docstring).
      use_proprio: OFT mode: the proprio projector's token from `Observation.state`.
      proprio_dim: the proprio projector's input width (OFT: 8 LIBERO, 14 ALOHA); a wider
        or narrower `state` is sliced or zero-padded to it.
      use_wrist_image: OFT mode: `Observation.wrist_image` through the fused backbone too.
      tokenizer_vocab_size: the text tokenizer's vocabulary (32000): action tokens are its
        last `n_action_bins` ids.
      n_action_bins: discretisation bins (256).
      eos_token_id: stop token appended after the discrete action tokens (Llama: 2).
      pixel_levels: SigLIP blocks feeding the pixel encoder; () -> evenly spaced blocks.
      vision_scan_layers, vision_remat: passed to both ViT towers.
      max_text_tokens, max_prompt_points: shapes of `spec()` observations (the model itself
        accepts any L and P).
      decode_temperature: discrete head decoding. 0: greedy argmax over the whole vocabulary
        (OpenVLA); > 0: each action token is sampled from softmax(logits / T) over the
        `n_action_bins` action tokens only, so the policy can commit to one of several
        equally likely actions instead of the most likely token per step (needs an rng).
      text_first: the instruction before the image tokens (see the module docstring).
      target_point_tokens: discrete head: decode the target's centre (2 tokens) before the
        action tokens, trained on the target mask's centroid (see `loss`).
      patch_grounding_weight: > 0 adds that weight times the per-patch target BCE to the loss
        (needs `text_first`: image tokens must see the instruction).
    """

    vision: VisionConfig
    llama: LlamaConfig
    pixel_encoder: PixelEncoderConfig
    prompt_encoder: PromptEncoderConfig
    action_head: L1ActionHeadConfig
    use_pixel_encoder: bool = True
    use_prompt_encoder: bool = True
    head: str = "l1"
    l1_mode: str = "pixelvla"
    use_proprio: bool = False
    proprio_dim: int = 8
    use_wrist_image: bool = False
    tokenizer_vocab_size: int = 32000
    n_action_bins: int = 256
    eos_token_id: int = 2
    pixel_levels: tuple[int, ...] = ()
    vision_scan_layers: bool = False
    vision_remat: bool = False
    max_text_tokens: int = 48
    max_prompt_points: int = 8
    decode_temperature: float = 0.0
    text_first: bool = False
    target_point_tokens: bool = False
    patch_grounding_weight: float = 0.0

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"PixelVLAConfig.head={self.head!r}; use one of {HEADS}")
        if self.l1_mode not in L1_MODES:
            raise ValueError(f"PixelVLAConfig.l1_mode={self.l1_mode!r}; use one of {L1_MODES}")
        if self.l1_mode == "oft" and (self.head != "l1" or self.text_first):
            raise ValueError(
                "PixelVLAConfig.l1_mode='oft' is OpenVLA-OFT's decoding of the L1 head, with "
                f"the image first: it needs head='l1' and text_first=False, got head="
                f"{self.head!r}, text_first={self.text_first}."
            )
        if (self.use_proprio or self.use_wrist_image) and not self.is_oft:
            raise ValueError(
                "PixelVLAConfig.use_proprio / use_wrist_image are OpenVLA-OFT's inputs: set "
                "head='l1' and l1_mode='oft' as well."
            )
        if self.proprio_dim < 1:
            raise ValueError(f"PixelVLAConfig.proprio_dim={self.proprio_dim} must be >= 1.")
        if not self.decode_temperature >= 0.0:
            raise ValueError(
                f"PixelVLAConfig.decode_temperature={self.decode_temperature} must be >= 0 "
                "(0: greedy decoding)."
            )
        if self.target_point_tokens and self.head != "discrete":
            raise ValueError(
                "PixelVLAConfig.target_point_tokens decodes the target's point as tokens before "
                f"the action tokens: it needs head='discrete', got head={self.head!r}."
            )
        if not self.patch_grounding_weight >= 0.0:
            raise ValueError(
                f"PixelVLAConfig.patch_grounding_weight={self.patch_grounding_weight} must be >= 0."
            )
        if self.patch_grounding_weight > 0.0 and not self.text_first:
            raise ValueError(
                "PixelVLAConfig.patch_grounding_weight > 0 trains image tokens to find the target "
                "the instruction names, but with the image first they cannot see the "
                "instruction: set text_first=True as well."
            )
        width = self.llama.width
        for name, dim in (
            ("vision.llm_dim", self.vision.llm_dim),
            ("pixel_encoder.out_dim", self.pixel_encoder.out_dim),
            ("prompt_encoder.out_dim", self.prompt_encoder.out_dim),
        ):
            if dim != width:
                raise ValueError(
                    f"PixelVLAConfig: {name}={dim} must equal the LLM width llama.width={width}"
                )
        if self.tokenizer_vocab_size > self.llama.vocab_size:
            raise ValueError(
                f"tokenizer_vocab_size={self.tokenizer_vocab_size} exceeds the LLM's "
                f"vocab_size={self.llama.vocab_size}"
            )
        if self.n_action_bins > self.tokenizer_vocab_size:
            raise ValueError(
                f"n_action_bins={self.n_action_bins} exceeds tokenizer_vocab_size="
                f"{self.tokenizer_vocab_size}"
            )
        self.pixel_level_blocks  # noqa: B018 - raises when the levels do not add up

    def replace(self, **kwargs: Any) -> PixelVLAConfig:
        return dataclasses.replace(self, **kwargs)

    # --- derived sizes ---------------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        """N_c actions per prediction (1 for the discrete head)."""
        return self.action_head.chunk_size if self.head == "l1" else 1

    @property
    def is_oft(self) -> bool:
        """The L1 head in OpenVLA-OFT's mode."""
        return self.head == "l1" and self.l1_mode == "oft"

    @property
    def suffix_length(self) -> int:
        """LLM tokens after the prefix in training: the action slots (OFT: + the stop
        token), or the discrete head's decoded tokens + EOS."""
        if self.head == "discrete":
            return self.num_decoded_tokens + 1
        return self.num_action_slots + (1 if self.is_oft else 0)

    @property
    def num_decoded_tokens(self) -> int:
        """Discrete head: tokens decoded per prediction (target point, if any, + actions)."""
        return self.action_dim + (2 if self.target_point_tokens else 0)

    @property
    def action_dim(self) -> int:
        return self.action_head.action_dim

    @property
    def num_action_slots(self) -> int:
        return self.action_head.num_action_slots

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def pixel_level_blocks(self) -> tuple[int, ...]:
        return level_blocks(
            self.pixel_levels, self.vision.siglip.depth, self.pixel_encoder.num_levels
        )

    @property
    def num_prefix_extra_tokens(self) -> int:
        """Tokens between the vision tokens and the text: proprio (OFT) + N_p + N_s."""
        n = 1 if self.use_proprio else 0
        n += self.pixel_encoder.num_tokens if self.use_pixel_encoder else 0
        return n + (self.prompt_encoder.num_tokens if self.use_prompt_encoder else 0)

    @property
    def num_vision_tokens(self) -> int:
        """Vision tokens of all cameras (OFT's wrist camera: twice the patches)."""
        return self.vision.num_patches * (2 if self.use_wrist_image else 1)

    def prefix_length(self, num_text_tokens: int) -> int:
        """Sequence length before the suffix, for `num_text_tokens` = L (BOS included)."""
        return num_text_tokens + self.num_vision_tokens + self.num_prefix_extra_tokens

    @property
    def action_tokenizer(self) -> DiscreteActionTokenizer:
        return DiscreteActionTokenizer(
            vocab_size=self.tokenizer_vocab_size, n_bins=self.n_action_bins
        )

    def spec(self, batch_size: int = 1) -> Observation:
        """`Observation.spec` at this model's image size and text/prompt lengths, with the
        wrist camera and state when the model reads them."""
        spec = Observation.spec(
            batch_size,
            image_size=self.image_size,
            max_prompt_points=self.max_prompt_points,
            max_tokens=self.max_text_tokens,
        )
        sds = jax.ShapeDtypeStruct
        if self.use_wrist_image:
            spec = spec.replace(
                wrist_image=spec.image, has_wrist_image=sds((batch_size,), jnp.bool_)
            )
        if self.use_proprio:
            spec = spec.replace(state=sds((batch_size, self.proprio_dim), jnp.float32))
        return spec

    # --- presets ---------------------------------------------------------------------------

    @classmethod
    def openvla_7b(cls, **overrides: Any) -> PixelVLAConfig:
        """Full-size PixelVLA on OpenVLA-7B (DINOv2-L + SigLIP-So400m, Llama-2-7B), L1 head."""
        config = cls(
            vision=VisionConfig.openvla(224),
            llama=llama_lib.llama2_7b(),
            pixel_encoder=PixelEncoderConfig.openvla_7b(),
            prompt_encoder=PromptEncoderConfig.openvla_7b(),
            action_head=L1ActionHeadConfig.libero(),
            tokenizer_vocab_size=32000,
        )
        return config.replace(**overrides)

    @classmethod
    def tiny(cls, width: int = 64, depth: int = 2, **overrides: Any) -> PixelVLAConfig:
        """Test size: the same code paths, a 56 px image (16 patches), a 64-wide 2-layer LLM.

        `width` (LLM hidden size, a multiple of 32: head_dim 16, an even number of heads,
        MLP 2x) and `depth` (LLM layers) scale the LLM for small from-scratch runs
        (configs/pixelref.py).
        The vocabulary matches `pixelvla_jax.testing.tiny_openvla`: a 512-piece tokenizer,
        + 1 pad token, padded to 576 (a multiple of 64, as OpenVLA's 32001 -> 32064).
        """
        if width % 32 or width < 32 or depth < 1:
            raise ValueError(
                f"PixelVLAConfig.tiny: width={width} must be a positive multiple of 32 "
                f"(head_dim 16, an even number of heads) and depth={depth} >= 1."
            )
        heads = width // 16
        config = cls(
            vision=VisionConfig.tiny(56, llm_dim=width),
            llama=llama_lib.tiny(
                vocab_size=576,
                width=width,
                depth=depth,
                num_heads=heads,
                num_kv_heads=heads // 2,
                head_dim=16,
                mlp_dim=2 * width,
            ),
            pixel_encoder=PixelEncoderConfig.tiny(out_dim=width),
            prompt_encoder=PromptEncoderConfig.tiny(out_dim=width),
            action_head=L1ActionHeadConfig.tiny(),
            tokenizer_vocab_size=512,
            max_text_tokens=48,
            max_prompt_points=8,
        )
        return config.replace(**overrides)


class ProprioProjector(nn.Module):
    """OpenVLA-OFT's `ProprioProjector` (`prismatic/models/projectors.py`): Dense(P -> D),
    exact GELU, Dense(D -> D). [B, P] -> [B, D]."""

    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, state: jax.Array) -> jax.Array:
        x = state.astype(self.dtype)
        x = logical_dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        return logical_dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(x)


class PixelVLA(nn.Module):
    """PixelVLA (see the module docstring). Submodules: `vision`, `projector`, `llm`,
    `pixel_encoder`, `prompt_encoder`, `action_head` (+ param `action_slots` in the
    PixelVLA L1 mode), `proprio_projector` (OFT mode with proprio)."""

    config: PixelVLAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision = FusedVisionBackbone(
            cfg.vision, remat=cfg.vision_remat, scan_layers=cfg.vision_scan_layers, **kw
        )
        self.projector = Projector(cfg.vision, **kw)
        self.llm = Llama(cfg.llama, **kw)
        if cfg.use_pixel_encoder:
            self.pixel_encoder = PixelEncoder(cfg.pixel_encoder, **kw)
        if cfg.use_prompt_encoder:
            self.prompt_encoder = PromptEncoder(cfg.prompt_encoder, **kw)
        if cfg.use_proprio:
            self.proprio_projector = ProprioProjector(cfg.llama.width, **kw)
        if cfg.head == "l1" and not cfg.is_oft:
            self.action_slots = self.param(
                "action_slots",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (cfg.num_action_slots, cfg.llama.width),
                self.param_dtype,
            )
        if cfg.head == "l1":
            self.action_head = L1ActionHead(cfg.action_head, **kw)
        if cfg.patch_grounding_weight > 0.0:
            self.patch_grounding = nn.Dense(1, name="patch_grounding", **kw)

    # --- sequence ----------------------------------------------------------------------------

    def embed_prefix(self, obs: Observation) -> tuple[jax.Array, jax.Array]:
        """Observation -> (embeddings [B, S, D], valid [B, S] bool), S = config.prefix_length(L)."""
        cfg = self.config
        if obs.tokens.ndim != 2 or obs.token_mask.shape != obs.tokens.shape:
            raise ValueError(
                f"Observation.tokens {obs.tokens.shape} and token_mask {obs.token_mask.shape} "
                "must both be [B, L]"
            )
        batch = obs.tokens.shape[0]
        if obs.image.shape[0] != batch:
            raise ValueError(
                f"Observation.image has batch {obs.image.shape[0]}, tokens have batch {batch}"
            )
        levels = cfg.pixel_level_blocks if cfg.use_pixel_encoder else ()
        if cfg.use_wrist_image:
            # Both cameras in one backbone call: the batch stacks them.
            images = jnp.concatenate(
                [image_to_unit_float(obs.image), image_to_unit_float(self._wrist_image(obs))]
            )
            fused, siglip_levels = self.vision(images, levels)
            siglip_levels = [level[:batch] for level in siglip_levels]  # the main camera's
            vision = self.projector(fused).astype(self.dtype)
            n = vision.shape[1]
            vision_tokens = jnp.concatenate([vision[:batch], vision[batch:]], axis=1)
            has_wrist = obs.has_wrist_image
            wrist_valid = jnp.ones((batch,), bool) if has_wrist is None else has_wrist
            vision_valid = jnp.concatenate(
                [
                    jnp.ones((batch, n), bool),
                    jnp.broadcast_to(jnp.asarray(wrist_valid, bool)[:, None], (batch, n)),
                ],
                axis=1,
            )
        else:
            fused, siglip_levels = self.vision(obs.image, levels)
            vision_tokens = self.projector(fused).astype(self.dtype)
            vision_valid = jnp.ones(vision_tokens.shape[:2], bool)
        text = self.llm.embed(obs.tokens)
        if cfg.text_first:
            parts = [text, vision_tokens]
            valid = [jnp.asarray(obs.token_mask, bool), vision_valid]
        else:
            parts = [text[:, :1], vision_tokens]
            valid = [jnp.ones((batch, 1), bool), vision_valid]
        if cfg.use_proprio:
            proprio = self.proprio_projector(self._proprio(obs))[:, None].astype(self.dtype)
            parts.append(proprio)
            valid.append(jnp.ones((batch, 1), bool))
        if cfg.use_pixel_encoder:
            e_p = self.pixel_encoder(siglip_levels, obs.pixel_mask, obs.has_pixel_mask)
            parts.append(e_p.astype(self.dtype))
            valid.append(jnp.ones(e_p.shape[:2], bool))
        if cfg.use_prompt_encoder:
            e_s = self.prompt_encoder(
                obs.prompt_points, obs.prompt_types, obs.prompt_mask, obs.has_prompt_mask
            )
            parts.append(e_s.astype(self.dtype))
            valid.append(jnp.ones(e_s.shape[:2], bool))
        if not cfg.text_first:
            parts.append(text[:, 1:])
            valid.append(jnp.asarray(obs.token_mask[:, 1:], bool))
        embeddings = jnp.concatenate(parts, axis=1)
        embeddings = nn.with_logical_constraint(embeddings, ("batch", "length", "embed"))
        return embeddings, jnp.concatenate(valid, axis=1)

    def _wrist_image(self, obs: Observation) -> jax.Array:
        """The wrist camera [B, H, W, 3], checked against the main camera."""
        if obs.wrist_image is None:
            raise ValueError(
                "PixelVLAConfig.use_wrist_image is on but Observation.wrist_image is None: "
                "give the wrist camera (the data pipeline does with DataConfig.use_wrist_image)."
            )
        if obs.wrist_image.shape != obs.image.shape:
            raise ValueError(
                f"Observation.wrist_image has shape {tuple(obs.wrist_image.shape)}, the main "
                f"image {tuple(obs.image.shape)}: both cameras must be [B, H, W, 3] at one size."
            )
        return obs.wrist_image

    def _proprio(self, obs: Observation) -> jax.Array:
        """`Observation.state` [B, P'] sliced or zero-padded to [B, proprio_dim]."""
        cfg = self.config
        if obs.state is None:
            raise ValueError(
                "PixelVLAConfig.use_proprio is on but Observation.state is None: give the "
                "normalised proprio (the data pipeline does with DataConfig.use_state)."
            )
        state = jnp.asarray(obs.state, jnp.float32)
        if state.ndim != 2 or state.shape[0] != obs.tokens.shape[0]:
            raise ValueError(
                f"Observation.state must be [B={obs.tokens.shape[0]}, P], got {state.shape}"
            )
        p = cfg.proprio_dim
        if state.shape[1] >= p:
            return state[:, :p]
        return jnp.pad(state, ((0, 0), (0, p - state.shape[1])))

    def _run_llm(
        self,
        embeddings: jax.Array,
        valid: jax.Array,
        bidirectional: jax.Array,
        keep_last: int | None = None,
    ) -> jax.Array:
        """[B, T, D], [B, T], [B, T] -> last hidden states [B, T, D] ([B, keep_last, D]: the
        last positions only, `Llama.__call__`'s keep_last)."""
        positions = positions_from_mask(valid)
        mask = make_attention_mask(valid, bidirectional)
        hidden, _ = self.llm(embeddings, positions, mask, keep_last=keep_last)
        return hidden

    def _last_index(self, valid: jax.Array) -> jax.Array:
        """[B, S] -> [B] index of the last prefix token: the last valid one when the text
        (right-padded) ends the prefix (a masked wrist camera may leave gaps before it), else
        S - 1 (image and pixel tokens are all valid)."""
        s = valid.shape[1]
        if self.config.text_first:
            return jnp.full(valid.shape[:1], s - 1, jnp.int32)
        return (s - 1 - jnp.argmax(jnp.asarray(valid, bool)[:, ::-1], axis=1)).astype(jnp.int32)

    def _vision_start(self, obs: Observation) -> int:
        """Index of the first vision token in the prefix."""
        return obs.tokens.shape[1] if self.config.text_first else 1

    def _patch_grounding_loss(
        self, target_mask: jax.Array, has_mask: jax.Array, hidden: jax.Array, obs: Observation
    ) -> jax.Array:
        """Per-patch BCE of the image tokens' hidden states against `target_mask` [B, H, W]
        pooled onto the patch grid (fraction of each patch covered), averaged over the
        samples that have a non-empty mask. -> scalar."""
        n = self.config.vision.num_patches
        grid = int(round(n**0.5))
        batch, size = target_mask.shape[:2]
        if grid * grid != n or size % grid:
            raise ValueError(
                f"patch grounding pools the pixel mask ({size} px) onto a square grid of {n} "
                "patches: the mask side must be a multiple of the grid side."
            )
        cell = size // grid
        mask = jnp.asarray(target_mask, jnp.float32).reshape(batch, grid, cell, grid, cell)
        target = mask.mean(axis=(2, 4)).reshape(batch, n)
        start = self._vision_start(obs)
        logits = self.patch_grounding(hidden[:, start : start + n])[..., 0].astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(logits, target)
        weight = jnp.asarray(has_mask, jnp.float32) * (target.sum(-1) > 0)
        loss = jnp.sum(bce.mean(-1) * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        return loss

    # --- L1 head -----------------------------------------------------------------------------

    def l1_actions(self, obs: Observation) -> jax.Array:
        """One forward pass: -> [B, N_c, A] normalised actions.

        Only the hidden states the head reads are computed in the last LLM layer (the action
        slots, `Llama.__call__`'s keep_last): the same actions as `_l1_forward`'s, for ~1/depth
        less of the LLM's work (OFT's readout starts at a per-row position: all of it runs).
        """
        return self._l1_forward(obs, readout_only=True)[0]

    def _l1_forward(
        self, obs: Observation, readout_only: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """-> ([B, N_c, A] normalised actions, [B, S + suffix, D] last hidden states; with
        `readout_only` (PixelVLA's slots) the action slots' alone, [B, K, D])."""
        cfg = self.config
        if cfg.head != "l1":
            raise ValueError("l1_actions needs head='l1'")
        if cfg.is_oft:
            return self._oft_forward(obs)
        prefix, valid = self.embed_prefix(obs)
        batch, s = valid.shape
        k = cfg.num_action_slots
        slots = jnp.broadcast_to(
            self.action_slots.astype(self.dtype)[None], (batch, k, prefix.shape[-1])
        )
        embeddings = jnp.concatenate([prefix, slots], axis=1)
        valid = jnp.concatenate([valid, jnp.ones((batch, k), bool)], axis=1)
        bidirectional = jnp.concatenate(
            [jnp.zeros((batch, s), bool), jnp.ones((batch, k), bool)], axis=1
        )
        hidden = self._run_llm(embeddings, valid, bidirectional, k if readout_only else None)
        if self.is_initializing():  # create lm_head, which the OpenVLA checkpoint carries
            self.llm.logits(hidden[:, :1])
        return self.action_head(hidden[:, hidden.shape[1] - k :]), hidden

    def _oft_forward(self, obs: Observation) -> tuple[jax.Array, jax.Array]:
        """OpenVLA-OFT's L1 forward (`_regression_or_discrete_prediction`): zeroed action
        inputs + the stop token after the prefix, all of it bidirectional, the head reading
        from the last prompt token on. -> ([B, N_c, A], [B, S + K + 1, D])."""
        cfg = self.config
        prefix, valid = self.embed_prefix(obs)
        batch, s, width = prefix.shape
        k = cfg.num_action_slots
        stop = self.llm.embed(jnp.full((batch, 1), cfg.eos_token_id, jnp.int32))
        embeddings = jnp.concatenate(
            [prefix, jnp.zeros((batch, k, width), prefix.dtype), stop.astype(prefix.dtype)],
            axis=1,
        )
        full_valid = jnp.concatenate([valid, jnp.ones((batch, k + 1), bool)], axis=1)
        hidden = self._run_llm(embeddings, full_valid, jnp.ones_like(full_valid))
        if self.is_initializing():  # create lm_head, which the OpenVLA checkpoint carries
            self.llm.logits(hidden[:, :1])
        # Shifted by one: the last real prompt token (before the text padding), then the
        # action positions but the last.
        last = jnp.take_along_axis(hidden, self._last_index(valid)[:, None, None], axis=1)
        readout = jnp.concatenate([last, hidden[:, s : s + k - 1]], axis=1)
        return self.action_head(readout), hidden

    # --- discrete head -------------------------------------------------------------------------

    def discrete_logits(self, obs: Observation, action_tokens: jax.Array) -> jax.Array:
        """Teacher-forced logits predicting the A action tokens and EOS.

        Args:
          action_tokens: [B, A] int32, the target tokens (appended after the prompt).
        Returns:
          [B, A + 1, V]: row 0 is read at the last prompt token, row i at action token i.
        """
        return self._discrete_forward(obs, action_tokens)[0]

    def _discrete_forward(
        self, obs: Observation, action_tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """-> (`discrete_logits`, [B, S + A, D] last hidden states)."""
        prefix, valid = self.embed_prefix(obs)
        batch, s = valid.shape
        a = action_tokens.shape[1]
        embeddings = jnp.concatenate([prefix, self.llm.embed(action_tokens)], axis=1)
        full_valid = jnp.concatenate([valid, jnp.ones((batch, a), bool)], axis=1)
        hidden = self._run_llm(embeddings, full_valid, jnp.zeros_like(full_valid))
        first = jnp.take_along_axis(hidden, self._last_index(valid)[:, None, None], axis=1)
        return self.llm.logits(jnp.concatenate([first, hidden[:, s:]], axis=1)), hidden

    def _sampling_noise(self, rng: jax.Array | None, batch: int) -> jax.Array | None:
        """The Gumbel noise of every decoding step, drawn at once: [num_decoded_tokens, B,
        n_action_tokens] float32, or None for greedy decoding (rng None).

        Step i uses the key `jax.random.categorical` would get there (the rng split once
        per step: `step_i, rng = split(rng)`), and the very draw it makes inside
        (`gumbel(step_i, [B, n])`), so argmax(noise[i] + logits / T) is its sample. Drawn
        in one vmapped call rather than at every step inside the loop, where the random
        bits' threefry (a rolled loop on a CPU) took ~2.5 of a batch of 16's 14 ms.
        """
        if rng is None:
            return None
        cfg = self.config
        shape = (batch, cfg.tokenizer_vocab_size - cfg.action_tokenizer.first_token)
        step_keys = []
        for _ in range(cfg.num_decoded_tokens):
            step_rng, rng = jax.random.split(rng)
            step_keys.append(step_rng)
        return jax.vmap(lambda key: jax.random.gumbel(key, shape, jnp.float32))(
            jnp.stack(step_keys)
        )

    def _next_token(self, logits: jax.Array, noise: jax.Array | None) -> jax.Array:
        """[B, V] logits -> [B] int32 token: greedy argmax (noise None), or the action
        token sampled at `decode_temperature` with this step's Gumbel noise [B, n]
        (`_sampling_noise`: jax.random.categorical's own draw)."""
        cfg = self.config
        if noise is None:
            return self._argmax(logits)
        first = cfg.action_tokenizer.first_token
        action_logits = logits[:, first : cfg.tokenizer_vocab_size].astype(jnp.float32)
        return first + self._argmax(noise + action_logits / cfg.decode_temperature)

    @staticmethod
    def _argmax(x: jax.Array) -> jax.Array:
        """[B, V] -> [B] int32, `jnp.argmax(x, -1)` exactly (the first maximum; the first NaN
        if any) as a max and a min: XLA's CPU argmax (a variadic reduce) cost ~6x more, at
        every decoding step."""
        top = jnp.max(x, axis=-1, keepdims=True)
        hit = (x == top) | jnp.isnan(x)
        slots = jnp.arange(x.shape[-1], dtype=jnp.int32)
        return jnp.min(jnp.where(hit, slots, x.shape[-1]), axis=-1)

    def _decode_step(self, carry, noise):
        """One decoding step: feed the last token into slot `index` of the cache."""
        cache, key_valid, token, position = carry
        index = cache.index
        key_valid = jax.lax.dynamic_update_slice(
            key_valid, jnp.ones((key_valid.shape[0], 1), bool), (0, index)
        )
        mask = make_cache_attention_mask(key_valid, index, 1)
        hidden, cache = self.llm(self.llm.embed(token[:, None]), position[:, None], mask, cache)
        next_token = self._next_token(self.llm.logits(hidden)[:, 0], noise)
        return (cache, key_valid, next_token, position + 1), next_token

    def generate_action_tokens(self, obs: Observation, rng: jax.Array | None = None) -> jax.Array:
        """Prefill the KV cache with the prefix, then decode A tokens: -> [B, A].

        Greedy with `decode_temperature` 0; sampled otherwise, from `rng` (required then).
        """
        tokens = self.generate_tokens(obs, rng)
        return tokens[:, tokens.shape[1] - self.config.action_dim :]

    def generate_tokens(self, obs: Observation, rng: jax.Array | None = None) -> jax.Array:
        """`generate_action_tokens` with the target point's 2 tokens first when
        `target_point_tokens` is on: -> [B, num_decoded_tokens].

        One prefill, then the remaining tokens one at a time from the KV cache (a scan), the
        sampling noise of every step drawn beforehand (`_sampling_noise`).
        """
        cfg = self.config
        if cfg.decode_temperature > 0.0 and rng is None:
            raise ValueError(
                f"decode_temperature={cfg.decode_temperature} samples action tokens: pass an "
                "rng (a jax.random key) to predict_actions / generate_action_tokens, or set "
                "decode_temperature=0 for greedy decoding."
            )
        if cfg.decode_temperature == 0.0:
            rng = None  # greedy: `_next_token` takes the argmax when it gets no noise
        prefix, valid = self.embed_prefix(obs)
        batch, s = valid.shape
        a = cfg.num_decoded_tokens
        noise = self._sampling_noise(rng, batch)
        cache = KVCache.init(cfg.llama, batch, s + a, dtype=self.dtype)
        key_valid = jnp.concatenate([valid, jnp.zeros((batch, a), bool)], axis=1)
        mask = make_cache_attention_mask(key_valid, 0, s)
        if cfg.text_first:  # the first token is read at the prefix's last position
            first, cache = self.llm(prefix, positions_from_mask(valid), mask, cache, keep_last=1)
        else:
            hidden, cache = self.llm(prefix, positions_from_mask(valid), mask, cache)
            first = jnp.take_along_axis(hidden, self._last_index(valid)[:, None, None], axis=1)
        token = self._next_token(self.llm.logits(first)[:, 0], None if noise is None else noise[0])
        if a == 1:
            return token[:, None]
        scan = nn.scan(
            PixelVLA._decode_step,
            variable_broadcast="params",
            split_rngs={"params": False},
            length=a - 1,
        )
        next_position = jnp.sum(valid.astype(jnp.int32), axis=1)  # RoPE counts valid tokens
        carry = (cache, key_valid, token, next_position)
        _, rest = scan(self, carry, None if noise is None else noise[1:])  # [A - 1, B]
        return jnp.concatenate([token[:, None], rest.T], axis=1)

    # --- public API ------------------------------------------------------------------------

    def predict_actions(self, obs: Observation, rng: jax.Array | None = None) -> jax.Array:
        """-> [B, N_c, A] normalised actions (discrete head: N_c = 1, bin centres).

        `rng` is used only by the discrete head with `decode_temperature` > 0.
        """
        if self.config.head == "l1":
            return self.l1_actions(obs)
        tokens = self.generate_action_tokens(obs, rng)
        return self.config.action_tokenizer.detokenize(tokens)[:, None, :]

    def loss(
        self,
        obs: Observation,
        actions: jax.Array,
        action_pad_mask: jax.Array,
        grounding_mask: jax.Array | None = None,
        has_grounding_mask: jax.Array | None = None,
        target_point: jax.Array | None = None,
        has_target_point: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training loss.

        Args:
          actions: [B, N_c, A] normalised target actions.
          action_pad_mask: [B, N_c] bool, True on real actions.
          grounding_mask, has_grounding_mask: [B, H, W], [B]: the patch-grounding target
            (every object the instruction fits; the data pipeline's `grounding_mask`).
            None: the observation's pixel mask (the target alone).
          target_point, has_target_point: [B, 2] (x, y) in [0, 1], [B]: what the point tokens
            learn (the pipeline's centroid of the target mask, kept where the pixel input
            was dropped). None: the centroid of the observation's pixel mask.
        Returns:
          (scalar loss, metrics dict of scalars / [A] vectors).
        """
        cfg = self.config
        if actions.ndim != 3 or actions.shape[2] != cfg.action_dim:
            raise ValueError(
                f"actions must be [B, N_c, A={cfg.action_dim}], got shape {actions.shape}"
            )
        if action_pad_mask.shape != actions.shape[:2]:
            raise ValueError(
                f"action_pad_mask must be [B, N_c]={actions.shape[:2]}, got {action_pad_mask.shape}"
            )
        if cfg.head == "l1":
            if actions.shape[1] != cfg.chunk_size:
                raise ValueError(
                    f"actions has a chunk of {actions.shape[1]}, the L1 head predicts "
                    f"N_c={cfg.chunk_size} (action_head.chunk_size)"
                )
            pred, hidden = self._l1_forward(obs)
            loss = l1_loss(pred, actions, action_pad_mask)
            metrics = {
                "l1": loss,
                "l1_per_dim": l1_per_dimension(pred, actions, action_pad_mask),
            }
        else:
            if target_point is None:
                target_point, has_target_point = mask_centroid(obs.pixel_mask, obs.has_pixel_mask)
            point = (target_point, jnp.asarray(has_target_point, jnp.float32))
            loss, metrics, hidden = self._discrete_loss(obs, actions, action_pad_mask, point)
        if cfg.patch_grounding_weight > 0.0:
            if grounding_mask is None:
                grounding_mask, has_grounding_mask = obs.pixel_mask, obs.has_pixel_mask
            grounding = self._patch_grounding_loss(grounding_mask, has_grounding_mask, hidden, obs)
            metrics["patch_grounding"] = grounding
            metrics["action_loss"] = loss
            loss = loss + cfg.patch_grounding_weight * grounding
        return loss, {"loss": loss, **metrics}

    def _discrete_loss(
        self,
        obs: Observation,
        actions: jax.Array,
        action_pad_mask: jax.Array,
        target: tuple[jax.Array, jax.Array],
    ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """Token cross-entropy of the first action (and the target point, if decoded)."""
        cfg = self.config
        tokenizer = cfg.action_tokenizer
        a = cfg.action_dim
        action_tokens = tokenizer.tokenize(jnp.asarray(actions[:, 0], jnp.float32))
        batch = action_tokens.shape[0]
        action_weight = jnp.asarray(action_pad_mask[:, 0], jnp.float32)
        tokens, weights = [action_tokens], [jnp.repeat(action_weight[:, None], a + 1, axis=1)]
        if cfg.target_point_tokens:
            point, has_point = target
            tokens.insert(0, tokenizer.tokenize(point * 2.0 - 1.0))
            weights.insert(0, jnp.repeat((has_point * action_weight)[:, None], 2, axis=1))
        tokens = jnp.concatenate(tokens, axis=1)
        weight = jnp.concatenate(weights, axis=1)  # [B, T + 1]: T tokens, then EOS
        eos = jnp.full((batch, 1), cfg.eos_token_id, jnp.int32)
        targets = jnp.concatenate([tokens, eos], axis=1)
        logits, hidden = self._discrete_forward(obs, tokens)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        loss = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        first = tokens.shape[1] - a  # the action tokens' first position
        act_weight = weight[:, first : first + a]
        correct = (predicted[:, first : first + a] == action_tokens).astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(act_weight), 1.0)
        decoded = tokenizer.detokenize(predicted[:, first : first + a])
        metrics = {
            "action_accuracy": jnp.sum(correct * act_weight) / denom,
            "l1": jnp.sum(jnp.abs(decoded - actions[:, 0]) * act_weight) / denom,
        }
        if cfg.target_point_tokens:
            point_weight = weight[:, :2]
            guess = (tokenizer.detokenize(predicted[:, :2]) + 1.0) / 2.0
            metrics["target_point_error"] = jnp.sum(
                jnp.abs(guess - point) * point_weight
            ) / jnp.maximum(jnp.sum(point_weight), 1.0)
        return loss, metrics, hidden

    def __call__(self, obs: Observation) -> jax.Array:
        """For `init`: creates every param. L1: [B, N_c, A] actions; discrete: the logits
        [B, V] of the first decoded token (prefix only, no cache)."""
        if self.config.head == "l1":
            actions, hidden = self._l1_forward(obs)
        else:
            prefix, valid = self.embed_prefix(obs)
            hidden = self._run_llm(prefix, valid, jnp.zeros_like(valid))
            first = jnp.take_along_axis(hidden, self._last_index(valid)[:, None, None], axis=1)
            actions = self.llm.logits(first)[:, 0]
        if self.config.patch_grounding_weight > 0.0:
            # Creates the grounding head's params.
            self._patch_grounding_loss(obs.pixel_mask, obs.has_pixel_mask, hidden, obs)
        return actions


def mask_centroid(pixel_mask: jax.Array, has_pixel_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Centroid of each mask in [0, 1] image coordinates (x right, y down; a pixel (r, c)
    covers ((c + 0.5) / W, (r + 0.5) / H)): [B, H, W], [B] -> ([B, 2], [B] float 0/1 valid)."""
    mask = jnp.asarray(pixel_mask, jnp.float32)
    h, w = mask.shape[1:]
    area = jnp.sum(mask, axis=(1, 2))
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    safe = jnp.maximum(area, 1e-6)
    x = jnp.sum(mask * xs[None, None, :], axis=(1, 2)) / safe
    y = jnp.sum(mask * ys[None, :, None], axis=(1, 2)) / safe
    valid = jnp.asarray(has_pixel_mask, jnp.float32) * (area > 0)
    return jnp.stack([x, y], axis=-1), valid


def init_params_fn(model: PixelVLA):
    """`rng -> params` (boxed with logical axes) of `model`, from a batch-1 zero observation:
    what training initialises, and what `jax.eval_shape` turns into the abstract params that
    checkpoints are restored into."""
    spec = model.config.spec(1)

    def init_params(rng):
        dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
        return model.init(rng, dummy)["params"]

    return init_params


def abstract_variables(
    config: PixelVLAConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> Any:
    """`jax.eval_shape` of `init`: the variables as ShapeDtypeStructs (Partitioned boxes kept)."""
    model = PixelVLA(config, dtype=dtype, param_dtype=param_dtype)
    return jax.eval_shape(model.init, jax.random.key(0), config.spec(1))


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract, possibly boxed) params tree."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
    total = 0
    for x in leaves:
        n = 1
        for d in x.shape:
            n *= int(d)
        total += n
    return total
