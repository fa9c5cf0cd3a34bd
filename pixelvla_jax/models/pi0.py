"""PixelVLA-π0: openpi's π0 (PaliGemma prefix + flow-matching action expert) with PixelVLA's
pixel-aware and visual-prompt encoders in the prefix.

Sequence (one transformer, `models/gemma.py`, two experts):

    prefix (expert 0, Gemma-2B):  [cam 0: N_v image tokens] [cam 1: N_v] [E_p] [E_s] [text L]
    suffix (expert 1, Gemma-300M): [state] [H noisy action tokens]

- Images: uint8 or [0, 1] float, mapped to [-1, 1], through SigLIP (`vit.ProjectedViT`:
  So400m/14, final LayerNorm, linear `head` to the Gemma width), unscaled. Cameras in
  openpi's order: base, then (left) wrist; a camera whose `has_*` flag is False is masked
  (its tokens are invalid: no one attends to them and they do not advance positions), so a
  3-camera openpi model with the right wrist masked computes exactly what this 2-camera
  layout computes. A missing `wrist_image` (None) gives masked zero tokens.
- `E_p` / `E_s` (PixelVLA, `use_pixel_encoder` / `use_prompt_encoder`): the pixel encoder
  pools the base camera's SigLIP levels under the pixel mask; the prompt encoder encodes
  points and the prompt mask; both emit learned "absent" tokens for samples without them.
  With both off the model is exactly π0.
- Text: PaliGemma tokens (BOS + text + "\\n", right-padded) embedded and scaled by
  sqrt(width); image tokens are not scaled.
- Suffix (π0, not π0.5): `state_proj` (32 -> D_e) gives one state token; `action_in_proj`
  (32 -> D_e) on x_t, concatenated with the sin-cos time embedding (periods 4e-3..4,
  computed in float32 at HIGHEST precision), `action_time_mlp_in` (2 D_e -> D_e), swish,
  `action_time_mlp_out`; `action_out_proj` (D_e -> 32) reads the last H outputs.
- Attention (openpi's `make_attn_mask`, ar_mask prefix all False, state True, actions
  [True] + [False] * (H - 1)): the prefix is bidirectional and never sees the suffix; the
  state token sees the prefix and itself; action tokens see everything valid and each
  other. RoPE positions are cumsum(valid) - 1 over prefix + suffix.
- Flow matching, openpi's convention (t = 1 is noise, t = 0 data): t ~ Beta(1.5, 1) * 0.999
  + 0.001, x_t = t ε + (1 - t) a, target u_t = ε - a, loss = mean over the 32 padded action
  dims of (v_t - u_t)^2, averaged over the real (unpadded) chunk steps.
- Sampling: the prefix fills a KV cache once; `num_steps` Euler steps x <- x - v / num_steps
  from t = 1 run the suffix alone against it (static shapes, one `nn.scan`).

Params (openpi's names for the π0 parts, see `weights/pi0.py` for the mapping):
`PaliGemma/img/{tower,head}`, `PaliGemma/llm/...` (`_1` for the expert), `state_proj`,
`action_in_proj`, `action_time_mlp_in`, `action_time_mlp_out`, `action_out_proj`, and
`pixel_encoder`, `prompt_encoder` when on.

    model = Pi0(Pi0Config.tiny())
    params = init_params_fn(model)(jax.random.key(0))
    loss, metrics = model.apply({"params": params}, obs, actions, pad, rng, method=Pi0.loss)
    actions = model.apply({"params": params}, obs, rng, method=Pi0.predict_actions)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pixelvla_jax.models import gemma as gemma_lib
from pixelvla_jax.models.gemma import Gemma, GemmaConfig, make_attn_mask, positions_from_mask
from pixelvla_jax.models.lora import LoRARules
from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pixel_encoder import (
    PixelEncoder,
    PixelEncoderConfig,
    level_blocks,
)
from pixelvla_jax.models.pixelvla import count_params
from pixelvla_jax.models.prompt_encoder import PromptEncoder, PromptEncoderConfig
from pixelvla_jax.models.vision import image_to_unit_float
from pixelvla_jax.models.vit import ProjectedViT, ViTConfig

__all__ = [
    "Pi0",
    "Pi0Config",
    "abstract_variables",
    "count_params",
    "init_params_fn",
    "param_counts",
    "posemb_sincos",
]

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """The π0 family's model.

    Attributes:
      vlm: expert 0, PaliGemma's Gemma (gemma_2b); its `lora_rules` apply to its einsums.
      action_expert: expert 1, the action expert (gemma_300m); its own `lora_rules`.
      vision: the SigLIP tower (`ViTConfig.siglip_so400m14_paligemma`); its head projects to
        `vlm.width`.
      pixel_encoder, prompt_encoder: PixelVLA's encoders (out_dim = vlm.width).
      use_pixel_encoder, use_prompt_encoder: include E_p / E_s in the prefix.
      pixel_levels: SigLIP blocks feeding the pixel encoder; () -> evenly spaced blocks.
      action_horizon: H, actions per chunk (50).
      model_action_dim, model_state_dim: the padded widths the model works in (32). An
        expert narrower than that, trained from scratch, wants them near `action_dim`:
        each padded dim is pure noise whose velocity x_t / t it must carry through its
        residual stream (configs/pixelref.py's `pi0`: 23% -> 96% success at 8 dims).
      action_dim: the data's action width (7): `predict_actions` slices to it.
      num_steps: Euler steps of `predict_actions` (10).
      num_cameras: 1 (base) or 2 (base + wrist).
      max_text_tokens, max_prompt_points: shapes of `spec()` observations.
      dtype: compute dtype name ("bfloat16" as openpi, or "float32"), used when the module's
        own `dtype` is None.
      scan_layers: scan over stacked layers (openpi's layout; fast compile).
      remat: rematerialise every layer in the backward pass (openpi: nothing saveable).
      time_beta_alpha, time_beta_beta, time_scale, time_offset: t ~ Beta(a, b) * scale + offset.
      min_period, max_period: the sin-cos time embedding's periods.
      patch_grounding_weight: > 0 adds that weight times a per-patch BCE on the base camera's
        image tokens (expert 0's last hidden states, `patch_grounding` Dense(1)) against the
        objects the instruction names, pooled onto the patch grid (PixelVLA's own auxiliary
        loss, as `PixelVLAConfig.patch_grounding_weight`; not part of π0). The prefix is
        bidirectional, so image tokens already see the instruction. 0: exactly π0.
      target_point_scale: > 0: the flow also generates the target's centre (x, y in [0, 1]
        of the image, mapped to [-1, 1] and multiplied by this scale) in the two padded dims
        after `action_dim`, at every chunk step (PixelVLA's grounding before acting, as the
        discrete head's target-point tokens; needs model_action_dim >= action_dim + 2).
        Scaled up, the point is the highest-signal part of the sample, so the flow settles
        which object early in the integration and the actions follow it. `predict_actions`
        drops it. 0: exactly π0.
    """

    vlm: GemmaConfig = dataclasses.field(default_factory=gemma_lib.gemma_2b)
    action_expert: GemmaConfig = dataclasses.field(default_factory=gemma_lib.gemma_300m)
    vision: ViTConfig = dataclasses.field(default_factory=ViTConfig.siglip_so400m14_paligemma)
    pixel_encoder: PixelEncoderConfig = dataclasses.field(
        default_factory=lambda: PixelEncoderConfig(out_dim=2048)
    )
    prompt_encoder: PromptEncoderConfig = dataclasses.field(
        default_factory=lambda: PromptEncoderConfig(out_dim=2048)
    )
    use_pixel_encoder: bool = True
    use_prompt_encoder: bool = True
    pixel_levels: tuple[int, ...] = ()
    action_horizon: int = 50
    model_action_dim: int = 32
    model_state_dim: int = 32
    action_dim: int = 7
    num_steps: int = 10
    num_cameras: int = 2
    max_text_tokens: int = 48
    max_prompt_points: int = 8
    dtype: str = "bfloat16"
    scan_layers: bool = True
    remat: bool = False
    time_beta_alpha: float = 1.5
    time_beta_beta: float = 1.0
    time_scale: float = 0.999
    time_offset: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0
    patch_grounding_weight: float = 0.0
    target_point_scale: float = 0.0

    def __post_init__(self):
        gemma_lib.check_experts((self.vlm, self.action_expert))
        width = self.vlm.width
        for name, dim in (
            ("pixel_encoder.out_dim", self.pixel_encoder.out_dim),
            ("prompt_encoder.out_dim", self.prompt_encoder.out_dim),
        ):
            if dim != width:
                raise ValueError(f"Pi0Config: {name}={dim} must equal vlm.width={width}")
        if self.num_cameras not in (1, 2):
            raise ValueError(
                f"Pi0Config.num_cameras={self.num_cameras}; use 1 (base) or 2 (base + wrist)"
            )
        if not 0 < self.action_dim <= self.model_action_dim:
            raise ValueError(
                f"Pi0Config.action_dim={self.action_dim} must be in 1..model_action_dim="
                f"{self.model_action_dim}"
            )
        if self.action_horizon < 1 or self.num_steps < 1:
            raise ValueError(
                f"Pi0Config: action_horizon ({self.action_horizon}) and num_steps "
                f"({self.num_steps}) must be >= 1"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"Pi0Config.dtype={self.dtype!r}; use one of {DTYPES}")
        if self.target_point_scale < 0.0 or (
            self.target_point_scale > 0.0 and self.model_action_dim < self.action_dim + 2
        ):
            raise ValueError(
                f"Pi0Config.target_point_scale={self.target_point_scale} must be >= 0, and > 0 "
                f"needs model_action_dim ({self.model_action_dim}) >= action_dim + 2 "
                f"({self.action_dim + 2}): the point takes the two padded dims after the action."
            )
        if not self.patch_grounding_weight >= 0.0:
            raise ValueError(
                f"Pi0Config.patch_grounding_weight={self.patch_grounding_weight} must be >= 0"
            )
        if self.action_expert.width % 2:
            raise ValueError(
                f"Pi0Config: action_expert.width={self.action_expert.width} must be even "
                "(sin-cos time embedding)"
            )
        self.pixel_level_blocks  # noqa: B018 - raises when the levels do not add up

    def replace(self, **kwargs: Any) -> Pi0Config:
        return dataclasses.replace(self, **kwargs)

    # --- derived ---------------------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        """Actions per prediction (= action_horizon)."""
        return self.action_horizon

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens per camera (256 at 224 px)."""
        return self.vision.num_patches

    @property
    def pixel_level_blocks(self) -> tuple[int, ...]:
        return level_blocks(self.pixel_levels, self.vision.depth, self.pixel_encoder.num_levels)

    @property
    def num_prefix_extra_tokens(self) -> int:
        """N_p + N_s (0 with both encoders off)."""
        n = self.pixel_encoder.num_tokens if self.use_pixel_encoder else 0
        return n + (self.prompt_encoder.num_tokens if self.use_prompt_encoder else 0)

    def prefix_length(self, num_text_tokens: int | None = None) -> int:
        """Prefix tokens for `num_text_tokens` (default max_text_tokens) text tokens."""
        text = self.max_text_tokens if num_text_tokens is None else num_text_tokens
        return self.num_cameras * self.num_image_tokens + self.num_prefix_extra_tokens + text

    @property
    def suffix_length(self) -> int:
        """State token + H action tokens."""
        return 1 + self.action_horizon

    @property
    def lora_rules(self) -> LoRARules:
        """Both experts' rules (disjoint when built by `with_lora`), for `lora.merge_lora`."""
        return tuple(self.vlm.lora_rules) + tuple(self.action_expert.lora_rules)

    def with_lora(self, vlm_rank: int = 16, expert_rank: int = 32) -> Pi0Config:
        """openpi's `gemma_2b_lora` / `gemma_300m_lora`: LoRA (alpha = rank) on every linear
        layer of each expert; 0 leaves that expert without adapters."""
        vlm_rules = gemma_lib.expert_lora_rules(0, vlm_rank) if vlm_rank else ()
        expert_rules = gemma_lib.expert_lora_rules(1, expert_rank) if expert_rank else ()
        return self.replace(
            vlm=self.vlm.replace(lora_rules=vlm_rules),
            action_expert=self.action_expert.replace(lora_rules=expert_rules),
        )

    def spec(self, batch_size: int = 1) -> Observation:
        """Shape/dtype structure of a batch (wrist camera and state included)."""
        sds = jax.ShapeDtypeStruct
        s = self.image_size
        return Observation.spec(
            batch_size,
            image_size=s,
            max_prompt_points=self.max_prompt_points,
            max_tokens=self.max_text_tokens,
        ).replace(
            wrist_image=sds((batch_size, s, s, 3), jnp.uint8),
            has_wrist_image=sds((batch_size,), jnp.bool_),
            state=sds((batch_size, self.model_state_dim), jnp.float32),
        )

    # --- presets ---------------------------------------------------------------------------

    @classmethod
    def pi0(cls, **overrides: Any) -> Pi0Config:
        """Full size: SigLIP So400m/14 (224 px) + Gemma 2B + Gemma 300M expert (openpi's
        `Pi0Config()`), H = 50, 32-dim padded actions and state, 10 steps, bf16."""
        return cls().replace(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> Pi0Config:
        """Test size, same code paths: 56 px images (16 tokens per camera), a 64-wide
        2-layer VLM and a 32-wide expert (4 heads, MQA, head_dim 16), H = 8, float32.
        The vocabulary (576) fits the project's tiny test tokenizers."""
        config = cls(
            vlm=gemma_lib.tiny(vocab_size=576),
            action_expert=gemma_lib.tiny(width=32, mlp_dim=64, vocab_size=576),
            vision=ViTConfig.siglip_paligemma_tiny(56),
            pixel_encoder=PixelEncoderConfig.tiny(out_dim=64),
            prompt_encoder=PromptEncoderConfig.tiny(out_dim=64),
            action_horizon=8,
            dtype="float32",
        )
        return config.replace(**overrides)


def posemb_sincos(
    pos: jax.Array, embedding_dim: int, min_period: float, max_period: float
) -> jax.Array:
    """openpi's sin-cos embedding of a scalar per example: [B] -> [B, embedding_dim] float32.

    period_i = min * (max / min)^(i / (n - 1)), i < n = embedding_dim / 2; output
    [sin(2π pos / period), cos(2π pos / period)], the product at HIGHEST precision.
    """
    if embedding_dim % 2:
        raise ValueError(f"embedding_dim ({embedding_dim}) must be even")
    fraction = jnp.linspace(0.0, 1.0, embedding_dim // 2, dtype=jnp.float32)
    period = min_period * (max_period / min_period) ** fraction
    angles = jnp.einsum(
        "i,j->ij",
        jnp.asarray(pos, jnp.float32),
        1.0 / period * 2 * jnp.pi,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _pad_last(x: jax.Array, width: int, what: str) -> jax.Array:
    """Zero-pads the last axis of `x` to `width` (openpi's PadStatesAndActions)."""
    if x.shape[-1] > width:
        raise ValueError(
            f"{what} has {x.shape[-1]} dims, more than the model's {width}; raise "
            "Pi0Config.model_action_dim / model_state_dim or slice the data"
        )
    pad = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
    return jnp.pad(x, pad)


def _dense(features: int, axes: tuple[str | None, str | None], dtype, param_dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
    )


class PaliGemma(nn.Module):
    """openpi's `PaliGemma` container: `img` (SigLIP + head) and `llm` (Gemma, 2 experts)."""

    config: Pi0Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.img = ProjectedViT(
            cfg.vision, cfg.vlm.width, remat=cfg.remat, scan_layers=cfg.scan_layers, **kw
        )
        self.llm = Gemma(
            (cfg.vlm, cfg.action_expert), scan_layers=cfg.scan_layers, remat=cfg.remat, **kw
        )


class Pi0(nn.Module):
    """PixelVLA-π0 (see the module docstring).

    Attributes:
      config: the model.
      dtype: compute dtype; None -> `config.dtype`.
      param_dtype: storage dtype of the params.
    """

    config: Pi0Config
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.config.dtype if self.dtype is None else self.dtype)

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.compute_dtype, param_dtype=self.param_dtype)
        width = cfg.action_expert.width
        self.PaliGemma = PaliGemma(cfg, **kw)
        self.state_proj = _dense(width, (None, "embed"), **kw)
        self.action_in_proj = _dense(width, (None, "embed"), **kw)
        self.action_time_mlp_in = _dense(width, (None, "embed"), **kw)
        self.action_time_mlp_out = _dense(width, (None, "embed"), **kw)
        self.action_out_proj = _dense(cfg.model_action_dim, ("embed", None), **kw)
        if cfg.use_pixel_encoder:
            self.pixel_encoder = PixelEncoder(cfg.pixel_encoder, **kw)
        if cfg.use_prompt_encoder:
            self.prompt_encoder = PromptEncoder(cfg.prompt_encoder, **kw)
        if cfg.patch_grounding_weight > 0.0:
            self.patch_grounding = _dense(1, ("embed", None), **kw)

    # --- prefix / suffix -------------------------------------------------------------------

    def embed_prefix(self, obs: Observation) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (tokens [B, S, D], input_mask [B, S] bool, ar_mask [S] bool all False)."""
        cfg = self.config
        dtype = self.compute_dtype
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
        images = [image_to_unit_float(obs.image) * 2.0 - 1.0]
        use_wrist = cfg.num_cameras == 2 and obs.wrist_image is not None
        if use_wrist:
            if obs.wrist_image.shape != obs.image.shape:
                raise ValueError(
                    f"Observation.wrist_image {obs.wrist_image.shape} must have the base "
                    f"image's shape {obs.image.shape}"
                )
            images.append(image_to_unit_float(obs.wrist_image) * 2.0 - 1.0)
        levels_wanted = cfg.pixel_level_blocks if cfg.use_pixel_encoder else ()
        image_tokens, levels = self.PaliGemma.img(jnp.concatenate(images, axis=0), levels_wanted)
        image_tokens = image_tokens.astype(dtype)
        n = image_tokens.shape[1]
        parts = [image_tokens[:batch]]
        masks = [jnp.ones((batch, n), bool)]
        if cfg.num_cameras == 2:
            if use_wrist:
                parts.append(image_tokens[batch:])
                has_wrist = (
                    jnp.ones((batch,), bool)
                    if obs.has_wrist_image is None
                    else jnp.asarray(obs.has_wrist_image, bool)
                )
            else:
                parts.append(jnp.zeros_like(parts[0]))
                has_wrist = jnp.zeros((batch,), bool)
            masks.append(jnp.broadcast_to(has_wrist[:, None], (batch, n)))
        if cfg.use_pixel_encoder:
            base_levels = [level[:batch] for level in levels]
            e_p = self.pixel_encoder(base_levels, obs.pixel_mask, obs.has_pixel_mask)
            parts.append(e_p.astype(dtype))
            masks.append(jnp.ones(e_p.shape[:2], bool))
        if cfg.use_prompt_encoder:
            e_s = self.prompt_encoder(
                obs.prompt_points, obs.prompt_types, obs.prompt_mask, obs.has_prompt_mask
            )
            parts.append(e_s.astype(dtype))
            masks.append(jnp.ones(e_s.shape[:2], bool))
        parts.append(self.PaliGemma.llm.embed(obs.tokens))
        masks.append(jnp.asarray(obs.token_mask, bool))
        tokens = nn.with_logical_constraint(
            jnp.concatenate(parts, axis=1), ("batch", "length", "embed")
        )
        input_mask = jnp.concatenate(masks, axis=1)
        return tokens, input_mask, jnp.zeros((tokens.shape[1],), bool)

    def _padded_state(self, obs: Observation) -> jax.Array:
        """[B, model_state_dim] float32: the observation's state zero-padded (None -> zeros)."""
        cfg = self.config
        if obs.state is None:
            return jnp.zeros((obs.tokens.shape[0], cfg.model_state_dim), jnp.float32)
        return _pad_last(jnp.asarray(obs.state, jnp.float32), cfg.model_state_dim, "state")

    def embed_suffix(
        self, state: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """state [B, 32], x_t [B, H, 32], t [B] -> (tokens [B, 1 + H, D_e], input_mask
        [B, 1 + H], ar_mask [1 + H] = [True, True, False * (H - 1)])."""
        cfg = self.config
        dtype = self.compute_dtype
        width = cfg.action_expert.width
        batch, horizon = x_t.shape[:2]
        state_token = self.state_proj(state.astype(dtype))[:, None, :]
        action_tokens = self.action_in_proj(x_t.astype(dtype))
        time_emb = posemb_sincos(t, width, cfg.min_period, cfg.max_period)
        time_tokens = jnp.broadcast_to(time_emb[:, None, :], (batch, horizon, width))
        action_time = jnp.concatenate([action_tokens, time_tokens.astype(dtype)], axis=-1)
        action_time = self.action_time_mlp_in(action_time)
        action_time = self.action_time_mlp_out(nn.swish(action_time))
        tokens = jnp.concatenate([state_token, action_time.astype(dtype)], axis=1)
        input_mask = jnp.ones((batch, 1 + horizon), bool)
        ar_mask = jnp.asarray([True, True] + [False] * (horizon - 1))
        return tokens, input_mask, ar_mask

    def _read_velocity(self, suffix_out: jax.Array) -> jax.Array:
        """Last H expert outputs [B, ..., D_e] -> v_t [B, H, 32] float32."""
        h = self.config.action_horizon
        return self.action_out_proj(suffix_out[:, -h:]).astype(jnp.float32)

    # --- public API ------------------------------------------------------------------------

    def velocity(self, obs: Observation, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """One forward pass over prefix + suffix (no cache): x_t [B, H, 32], t [B] -> v_t
        [B, H, 32] float32."""
        return self._forward(obs, x_t, t)[0]

    def _forward(
        self, obs: Observation, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """`velocity` and expert 0's last hidden states: -> (v_t [B, H, 32] float32, prefix
        outputs [B, S, D])."""
        self._check_noise(x_t, obs.tokens.shape[0])
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        suffix, suffix_mask, suffix_ar = self.embed_suffix(self._padded_state(obs), x_t, t)
        input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
        ar_mask = jnp.concatenate([prefix_ar, suffix_ar])
        mask = make_attn_mask(input_mask, ar_mask)
        positions = positions_from_mask(input_mask)
        (prefix_out, suffix_out), _ = self.PaliGemma.llm([prefix, suffix], positions, mask)
        return self._read_velocity(suffix_out), prefix_out

    def _patch_grounding_loss(
        self, target_mask: jax.Array, has_mask: jax.Array, prefix_out: jax.Array
    ) -> jax.Array:
        """Per-patch BCE of the base camera's image tokens (the prefix's first N_v outputs)
        against `target_mask` [B, H, W] pooled onto the patch grid (the fraction of each
        patch covered), averaged over the samples with a non-empty mask. -> scalar."""
        n = self.config.num_image_tokens
        grid = int(round(n**0.5))
        batch, size = target_mask.shape[:2]
        if grid * grid != n or size % grid:
            raise ValueError(
                f"patch grounding pools the grounding mask ({size} px) onto a square grid of "
                f"{n} patches: the mask side must be a multiple of the grid side {grid}."
            )
        cell = size // grid
        mask = jnp.asarray(target_mask, jnp.float32).reshape(batch, grid, cell, grid, cell)
        target = mask.mean(axis=(2, 4)).reshape(batch, n)
        logits = self.patch_grounding(prefix_out[:, :n])[..., 0].astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(logits, target)
        weight = jnp.asarray(has_mask, jnp.float32) * (target.sum(-1) > 0)
        return jnp.sum(bce.mean(-1) * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    def _check_noise(self, x: jax.Array, batch: int) -> None:
        cfg = self.config
        expected = (batch, cfg.action_horizon, cfg.model_action_dim)
        if tuple(x.shape) != expected:
            raise ValueError(
                f"noise / x_t has shape {tuple(x.shape)}, expected [B, H, model_action_dim] = "
                f"{expected}"
            )

    def _cached_step(self, carry, step):
        """Euler step on the suffix alone against the cached prefix."""
        x_t, kv_cache, prefix_mask, state, dt = carry
        batch = x_t.shape[0]
        t = jnp.full((batch,), 1.0, jnp.float32) + step.astype(jnp.float32) * dt
        suffix, suffix_mask, suffix_ar = self.embed_suffix(state, x_t, t)
        suffix_len = suffix.shape[1]
        prefix_attn = jnp.broadcast_to(
            prefix_mask[:, None, :], (batch, suffix_len, prefix_mask.shape[1])
        )
        mask = jnp.concatenate([prefix_attn, make_attn_mask(suffix_mask, suffix_ar)], axis=-1)
        positions = jnp.sum(prefix_mask.astype(jnp.int32), axis=-1)[:, None] + (
            positions_from_mask(suffix_mask)
        )
        (_, suffix_out), _ = self.PaliGemma.llm([None, suffix], positions, mask, kv_cache=kv_cache)
        x_t = x_t + dt * self._read_velocity(suffix_out)
        return (x_t, kv_cache, prefix_mask, state, dt), None

    def _uncached_step(self, carry, step):
        """Euler step that recomputes the whole prefix (reference for the cached path)."""
        x_t, obs, dt = carry
        t = jnp.full((x_t.shape[0],), 1.0, jnp.float32) + step.astype(jnp.float32) * dt
        x_t = x_t + dt * self.velocity(obs, x_t, t)
        return (x_t, obs, dt), None

    def sample_actions(
        self,
        obs: Observation,
        noise: jax.Array,
        num_steps: int | None = None,
        use_cache: bool = True,
    ) -> jax.Array:
        """Euler integration of the flow from t = 1 (noise [B, H, 32]) to t = 0:
        -> x_0 [B, H, 32] float32, `num_steps` (default config.num_steps) uniform steps.

        `use_cache` runs the prefix once into a KV cache (openpi); False recomputes it
        every step (the same numbers, slower: a reference for tests and benchmarks).
        """
        cfg = self.config
        num_steps = cfg.num_steps if num_steps is None else int(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self._check_noise(noise, obs.tokens.shape[0])
        dt = jnp.asarray(-1.0 / num_steps, jnp.float32)
        x = jnp.asarray(noise, jnp.float32)
        steps = jnp.arange(num_steps, dtype=jnp.int32)
        scan = lambda fn: nn.scan(
            fn, variable_broadcast="params", split_rngs={"params": False}, length=num_steps
        )
        if use_cache:
            prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
            mask = make_attn_mask(prefix_mask, prefix_ar)
            _, kv_cache = self.PaliGemma.llm([prefix, None], positions_from_mask(prefix_mask), mask)
            carry = (x, kv_cache, prefix_mask, self._padded_state(obs), dt)
            (x, *_), _ = scan(Pi0._cached_step)(self, carry, steps)
        else:
            (x, *_), _ = scan(Pi0._uncached_step)(self, (x, obs, dt), steps)
        return x

    def predict_actions(self, obs: Observation, rng: jax.Array) -> jax.Array:
        """-> [B, H, action_dim] normalised actions: `sample_actions` from N(0, I) noise
        drawn from `rng`, sliced from the padded 32 dims."""
        cfg = self.config
        batch = obs.tokens.shape[0]
        noise = jax.random.normal(
            rng, (batch, cfg.action_horizon, cfg.model_action_dim), jnp.float32
        )
        return self.sample_actions(obs, noise)[..., : cfg.action_dim]

    def loss(
        self,
        obs: Observation,
        actions: jax.Array,
        action_pad_mask: jax.Array,
        rng: jax.Array,
        grounding_mask: jax.Array | None = None,
        has_grounding_mask: jax.Array | None = None,
        target_point: jax.Array | None = None,
        has_target_point: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Flow-matching loss (openpi's convention, see the module docstring).

        Args:
          actions: [B, H, action_dim] normalised target actions (zero-padded to 32 here).
          action_pad_mask: [B, H] bool, True on real chunk steps (all True: openpi's plain
            mean).
          rng: draws the noise and t.
          grounding_mask, has_grounding_mask: [B, H, W], [B]: the patch-grounding target
            (every object the instruction fits; the data pipeline's `grounding_mask`), used
            when `patch_grounding_weight` > 0; None -> the pixel mask.
          target_point, has_target_point: [B, 2] (x, y) in [0, 1], [B]: the target's centre,
            generated with the actions when `target_point_scale` > 0 (zeros where absent).

        Returns:
          (scalar loss, {"loss", "flow_mse", "flow_mse_per_dim" [action_dim]}, and
          "patch_grounding" when its weight is > 0).
        """
        cfg = self.config
        expected = (cfg.action_horizon, cfg.action_dim)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"actions must be [B, H, action_dim] = [B, {expected[0]}, {expected[1]}], "
                f"got {tuple(actions.shape)}"
            )
        if tuple(action_pad_mask.shape) != tuple(actions.shape[:2]):
            raise ValueError(
                f"action_pad_mask must be [B, H] = {tuple(actions.shape[:2])}, got "
                f"{tuple(action_pad_mask.shape)}"
            )
        batch = actions.shape[0]
        noise_rng, time_rng = jax.random.split(rng)
        target = _pad_last(jnp.asarray(actions, jnp.float32), cfg.model_action_dim, "actions")
        if cfg.target_point_scale > 0.0:
            if target_point is None or has_target_point is None:
                raise ValueError(
                    "Pi0Config.target_point_scale > 0 generates the target's point with the "
                    "actions: pass target_point [B, 2] and has_target_point [B] (the data "
                    "pipeline's batch has them)."
                )
            point = (jnp.asarray(target_point, jnp.float32) * 2.0 - 1.0) * cfg.target_point_scale
            point = point * jnp.asarray(has_target_point, jnp.float32)[:, None]
            a = cfg.action_dim
            target = target.at[:, :, a : a + 2].set(
                jnp.broadcast_to(point[:, None, :], (batch, cfg.action_horizon, 2))
            )
        noise = jax.random.normal(noise_rng, target.shape, jnp.float32)
        t = jax.random.beta(time_rng, cfg.time_beta_alpha, cfg.time_beta_beta, (batch,))
        t = t.astype(jnp.float32) * cfg.time_scale + cfg.time_offset
        t3 = t[:, None, None]
        x_t = t3 * noise + (1.0 - t3) * target
        u_t = noise - target
        v_t, prefix_out = self._forward(obs, x_t, t)
        err = jnp.square(v_t - u_t)  # [B, H, 32]
        weight = jnp.asarray(action_pad_mask, jnp.float32)
        denom = jnp.maximum(jnp.sum(weight), 1.0)
        flow = jnp.sum(jnp.mean(err, axis=-1) * weight) / denom
        per_dim = jnp.sum(err[..., : cfg.action_dim] * weight[..., None], axis=(0, 1)) / denom
        metrics = {"flow_mse": flow, "flow_mse_per_dim": per_dim}
        loss = flow
        if cfg.patch_grounding_weight > 0.0:
            if grounding_mask is None:
                grounding_mask, has_grounding_mask = obs.pixel_mask, obs.has_pixel_mask
            grounding = self._patch_grounding_loss(grounding_mask, has_grounding_mask, prefix_out)
            metrics["patch_grounding"] = grounding
            loss = loss + cfg.patch_grounding_weight * grounding
        return loss, {"loss": loss, **metrics}

    def __call__(self, obs: Observation) -> jax.Array:
        """For `init`: one `velocity` pass at t = 0.5 from zero x_t (creates every param)."""
        cfg = self.config
        batch = obs.tokens.shape[0]
        x_t = jnp.zeros((batch, cfg.action_horizon, cfg.model_action_dim), jnp.float32)
        v_t, prefix_out = self._forward(obs, x_t, jnp.full((batch,), 0.5, jnp.float32))
        if cfg.patch_grounding_weight > 0.0:
            self.patch_grounding(prefix_out[:, :1])  # creates its params
        return v_t


def init_params_fn(model: Pi0):
    """`rng -> params` (boxed with logical axes) of `model`, from a batch-1 zero observation
    (wrist camera and state included): for training's init and for `jax.eval_shape`."""
    spec = model.config.spec(1)

    def init_params(rng):
        dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
        return model.init(rng, dummy)["params"]

    return init_params


def abstract_variables(config: Pi0Config, dtype: Any = None, param_dtype: Any = jnp.float32) -> Any:
    """`jax.eval_shape` of `init`: the variables as ShapeDtypeStructs (Partitioned boxes kept)."""
    model = Pi0(config, dtype=dtype, param_dtype=param_dtype)
    return jax.eval_shape(model.init, jax.random.key(0), config.spec(1))


def param_counts(config: Pi0Config) -> dict[str, int]:
    """Scalars per part, built abstractly: "vision" (SigLIP + head), "vlm" (expert 0 with the
    embedding), "action_expert" (expert 1), "projections" (state / action / time MLP),
    "pixel_encoder", "prompt_encoder" (0 when off), and "total"."""
    params = nn.meta.unbox(abstract_variables(config)["params"])
    pali = params["PaliGemma"]
    counts = {"vision": count_params(pali["img"]), "vlm": 0, "action_expert": 0}

    def walk(node, expert):
        for key, value in node.items():
            is_expert = expert or key.endswith("_1")
            if isinstance(value, dict):
                walk(value, is_expert)
            else:
                counts["action_expert" if is_expert else "vlm"] += count_params(value)

    walk(pali["llm"], False)
    counts["projections"] = sum(
        count_params(params[k])
        for k in (
            "state_proj",
            "action_in_proj",
            "action_time_mlp_in",
            "action_time_mlp_out",
            "action_out_proj",
        )
    )
    counts["pixel_encoder"] = count_params(params.get("pixel_encoder", {}))
    counts["prompt_encoder"] = count_params(params.get("prompt_encoder", {}))
    counts["total"] = count_params(params)
    return counts
