"""Llama-2 decoder: RoPE, grouped KV heads, SwiGLU, RMSNorm, functional KV cache, LoRA.

Param layout (names follow Hugging Face's so that LoRA regexes read naturally):

    embed_tokens/embedding            [V, D]           ("vocab", "embed")
    layers_{i}/input_layernorm/scale  [D]              ("embed",)
    layers_{i}/attn/{q,k,v,o}_proj/kernel              q: [D, H*hd] ("embed", "heads"),
                                                       k/v: [D, K*hd] ("embed", "kv_heads"),
                                                       o: [H*hd, D] ("heads", "embed")
    layers_{i}/post_attention_layernorm/scale [D]
    layers_{i}/mlp/{gate,up}_proj/kernel [D, F] ("embed", "mlp"); down_proj [F, D]
    norm/scale                        [D]
    lm_head/kernel                    [D, V]           ("embed", "vocab")

With `scan_layers=True` the per-layer params live once under `layers/...` with a leading
stacked axis of size `depth` (logical name "layers"). The q/k/v/o kernels keep the heads and
head_dim axes flattened (as in HF's Linear weights): sharding "heads" then splits whole heads
whenever the mesh axis divides the head count.

RoPE uses HF's rotate-half convention (the first and second halves of head_dim form the
complex pairs), so HF q/k weights load without permutation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pixelvla_jax.models.lora import Dense, LoRARules

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's RoPE frequency scaling (HF `rope_type` "llama3").

    Wavelengths shorter than original_max_position_embeddings / high_freq_factor keep their
    frequency, those longer than original_max_position_embeddings / low_freq_factor are
    divided by `factor`, and the band in between is interpolated smoothly (as transformers'
    `_compute_llama3_parameters`).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder hyper-parameters.

    Attributes:
      vocab_size: rows of the embedding and of lm_head (OpenVLA pads 32001 to 32064).
      width: model width D.
      depth: number of decoder blocks.
      num_heads: query heads H.
      num_kv_heads: key/value heads K (H must be a multiple of K; K == H is plain MHA).
      head_dim: hd.
      mlp_dim: SwiGLU hidden width F.
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      max_seq_len: longest sequence the model is meant for (documentation / cache default).
      lora_rules: (regex, LoRAConfig) pairs over module paths, e.g. `.*/(q_proj|v_proj)`.
      remat: rematerialise each block in the backward pass.
      scan_layers: scan over one stacked block (fast compile, params on a "layers" axis).
      rope_scaling: None (plain RoPE, HF rope_type "default") or a Llama3RopeScaling.
    """

    vocab_size: int = 32064
    width: int = 4096
    depth: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    mlp_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    lora_rules: LoRARules = ()
    remat: bool = False
    scan_layers: bool = False
    rope_scaling: Llama3RopeScaling | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")

    def replace(self, **kwargs: Any) -> LlamaConfig:
        return dataclasses.replace(self, **kwargs)


def llama2_7b(**overrides: Any) -> LlamaConfig:
    """Llama-2-7B as inside OpenVLA-7B (vocabulary 32000 + pad, padded to 32064)."""
    return LlamaConfig(
        vocab_size=32064,
        width=4096,
        depth=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        mlp_dim=11008,
        norm_eps=1e-6,
        rope_theta=10000.0,
        max_seq_len=2048,
    ).replace(**overrides)


def tiny(**overrides: Any) -> LlamaConfig:
    """A few-thousand-parameter decoder for tests (grouped KV heads: 4 query, 2 kv)."""
    return LlamaConfig(
        vocab_size=128,
        width=32,
        depth=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        norm_eps=1e-6,
        rope_theta=10000.0,
        max_seq_len=64,
    ).replace(**overrides)


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written in place at `index` (functional update).

    Attributes:
      k, v: [depth, B, max_len, K, hd].
      index: int32 scalar, the next slot to write. A call with L tokens writes slots
        index..index+L-1 and returns a cache with index + L. Writing past max_len is not
        checked under jit (XLA clamps the slice): size max_len for prompt + generation.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(
        cls, config: LlamaConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32
    ) -> KVCache:
        """An empty cache (zeros, index 0)."""
        shape = (config.depth, batch_size, max_len, config.num_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32)
        )


# ----------------------------------------------------------------------------- masks


def make_attention_mask(valid: jax.Array, bidirectional: jax.Array) -> jax.Array:
    """[B, L] bool, [B, L] bool -> [B, L, L] bool (query i, key j).

    Token i sees token j iff valid_j and (j <= i or (bidirectional_i and bidirectional_j)):
    the prompt is causal, a block of bidirectional tokens (the action slots) attends to
    itself in both directions, and no prompt token sees a later token.
    """
    valid = jnp.asarray(valid, bool)
    bidirectional = jnp.asarray(bidirectional, bool)
    length = valid.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    both = bidirectional[:, :, None] & bidirectional[:, None, :]
    return valid[:, None, :] & (causal | both)


def make_cache_attention_mask(
    key_valid: jax.Array, query_start: jax.Array | int, num_queries: int
) -> jax.Array:
    """Causal mask over a KV cache: [B, M] bool -> [B, num_queries, M] bool.

    Query q sits in slot query_start + q and sees slot j iff key_valid_j and
    j <= query_start + q. `key_valid` marks the slots holding real tokens (the padding of a
    right-padded prompt is False), including the slots the current call writes.
    """
    key_valid = jnp.asarray(key_valid, bool)
    slots = jnp.arange(key_valid.shape[-1])
    query_slots = jnp.asarray(query_start, jnp.int32) + jnp.arange(num_queries)
    causal = slots[None, :] <= query_slots[:, None]
    return key_valid[:, None, :] & causal[None]


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """[B, L] bool -> [B, L] int32 RoPE positions: cumsum(valid) - 1, clipped at 0.

    Tokens placed after right padding continue the count of the real tokens before them.
    """
    return jnp.maximum(jnp.cumsum(jnp.asarray(valid, jnp.int32), axis=-1) - 1, 0)


# ----------------------------------------------------------------------------- layers


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> jax.Array:
    """[head_dim / 2] float32 inverse frequencies (HF's default or "llama3" RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float,
    scaling: Llama3RopeScaling | None = None,
) -> jax.Array:
    """Rotary embedding, HF rotate-half convention. x [B, L, N, hd], positions [B, L]."""
    inv_freq = rope_inv_freq(x.shape[-1], theta, scaling)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, L, 1, hd]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """RMSNorm in float32; the normalised value is cast to `dtype` before the scale (as HF)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return normed * scale.astype(self.dtype)


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
    """Softmax attention, grouped-query: q [B, L, H, hd], k/v [B, M, K, hd] (H a multiple of
    K: query head i reads KV head i // (H / K)), mask [B, L, M] bool -> [B, L, H * hd].

    Logits and softmax in float32, masked logits at a large negative value (a fully masked
    row comes out uniform, not NaN), probabilities cast to `dtype`.
    """
    b, length, h, hd = q.shape
    k_heads = k.shape[2]
    q = q.reshape(b, length, k_heads, h // k_heads, hd) * jnp.asarray(hd**-0.5, dtype)
    logits = jnp.einsum("blkgd,bmkd->bkglm", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bkglm,bmkd->blkgd", probs, v).reshape(b, length, h * hd)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional per-layer KV cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache_k: jax.Array | None = None,
        cache_v: jax.Array | None = None,
        cache_index: jax.Array | None = None,
        keep_last: int | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """x [B, L, D], positions [B, L], mask [B, L, Lk] bool; cache_k/v [B, M, K, hd].

        keep_last: None, or queries for the last `keep_last` positions only (the keys and
        values, and what a cache gets, still come from all L).
        Returns (out [B, L or keep_last, D], new cache_k, new cache_v); Lk == M with a cache,
        else L.
        """
        cfg = self.config
        b, length, _ = x.shape
        keys = length if cache_k is None else cache_k.shape[1]
        if mask.shape != (b, length, keys):
            raise ValueError(
                f"attn_mask has shape {mask.shape}, expected {(b, length, keys)} "
                "([B, L, L] without a cache, [B, L, cache max_len] with one)"
            )
        x_q, q_positions = x, positions
        if keep_last is not None:
            x_q, q_positions = x[:, -keep_last:], positions[:, -keep_last:]
            mask = mask[:, -keep_last:]
        h, k_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = lambda features, axes, name: Dense(
            features,
            kernel_axes=axes,
            lora_rules=cfg.lora_rules,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        q = dense(h * hd, ("embed", "heads"), "q_proj")(x_q).reshape(b, x_q.shape[1], h, hd)
        k = dense(k_heads * hd, ("embed", "kv_heads"), "k_proj")(x).reshape(b, length, k_heads, hd)
        v = dense(k_heads * hd, ("embed", "kv_heads"), "v_proj")(x).reshape(b, length, k_heads, hd)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q = rope(q, q_positions, cfg.rope_theta, cfg.rope_scaling)
        k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)

        if cache_k is not None:
            start = (0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            k, v = cache_k.astype(self.dtype), cache_v.astype(self.dtype)

        out = grouped_attention(q, k, v, mask, self.dtype)
        out = dense(cfg.width, ("heads", "embed"), "o_proj")(out)
        return out, cache_k, cache_v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        cfg = self.config
        dense = lambda features, axes, name: Dense(
            features,
            kernel_axes=axes,
            lora_rules=cfg.lora_rules,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.mlp_dim, ("embed", "mlp"), "up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.width, ("mlp", "embed"), "down_proj")(hidden)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scan-compatible signature."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache_k, cache_v, positions, mask, cache_index, keep_last=None):
        """x [B, L, D]; cache_k/v [B, M, K, hd] or None -> (x, (cache_k, cache_v)).

        keep_last: None, or the block's output for the last `keep_last` positions only
        (x [B, keep_last, D]; its attention still reads the keys and values of all L).
        """
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.norm_eps, name="input_layernorm", **kw)(x)
        h, cache_k, cache_v = Attention(cfg, name="attn", **kw)(
            h, positions, mask, cache_k, cache_v, cache_index, keep_last
        )
        if keep_last is not None:
            x = x[:, -keep_last:]
        x = x + h
        h = RMSNorm(cfg.norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + MLP(cfg, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (cache_k, cache_v)


class Llama(nn.Module):
    """The decoder. Methods (call through `model.apply(variables, ..., method=...)`):

    `embed(tokens)`, `__call__(embeddings, positions, attn_mask, cache)`, `logits(hidden)`,
    and `forward(tokens, positions, attn_mask, cache)` = all three (use it for `init`).
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), ("vocab", "embed")
            ),
            **kw,
        )
        block = DecoderBlock
        if cfg.remat:
            # Unrolled, each block gets keep_last (argument 7, counting self), a Python int
            # (or None) that shapes it; a scanned block never gets it.
            static = () if cfg.scan_layers else (7,)
            block = nn.remat(block, prevent_cse=not cfg.scan_layers, static_argnums=static)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, **kw)
        else:
            self.layers = [block(cfg, **kw) for _ in range(cfg.depth)]
        self.norm = RMSNorm(cfg.norm_eps, **kw)
        self.lm_head = Dense(
            cfg.vocab_size,
            kernel_axes=("embed", "vocab"),
            lora_rules=cfg.lora_rules,
            kernel_init=nn.initializers.normal(stddev=0.02),
            **kw,
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int32 -> [B, L, D] in `dtype`."""
        x = self.embed_tokens(tokens)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def __call__(
        self,
        embeddings: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None = None,
        keep_last: int | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the blocks and the final RMSNorm.

        Args:
          embeddings: [B, L, D].
          positions: [B, L] int32 RoPE positions.
          attn_mask: [B, L, L] bool without a cache; [B, L, cache.max_len] with one
            (query i, key slot j; see `make_attention_mask` / `make_cache_attention_mask`).
          cache: a KVCache to write these L tokens into at `cache.index`, or None.
          keep_last: None, or only the last `keep_last` positions' hidden states are wanted
            (a head that reads the action slots, or the next token's logits): with unrolled
            layers the last block computes its queries, attention output and MLP for those
            positions alone (keys, values and the cache still cover all L); the result
            equals the full call's last `keep_last` rows. With `scan_layers` every block runs
            the full length (one scanned block has one shape) and the rows are sliced.

        Returns:
          (hidden [B, L or keep_last, D], the updated cache or None).
        """
        cfg = self.config
        x = nn.with_logical_constraint(embeddings.astype(self.dtype), ("batch", "length", "embed"))
        positions = jnp.asarray(positions, jnp.int32)
        attn_mask = jnp.asarray(attn_mask, bool)
        length = x.shape[1]
        if keep_last is not None and not 1 <= keep_last <= length:
            raise ValueError(f"keep_last={keep_last}: must be in [1, L={length}].")
        index = None if cache is None else cache.index
        cache_k = None if cache is None else cache.k
        cache_v = None if cache is None else cache.v
        if cfg.scan_layers:
            x, (new_k, new_v) = self.layers(x, cache_k, cache_v, positions, attn_mask, index)
            if keep_last is not None:
                x = x[:, -keep_last:]
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                layer_k = None if cache is None else cache_k[i]
                layer_v = None if cache is None else cache_v[i]
                last = keep_last if i == len(self.layers) - 1 else None
                x, (layer_k, layer_v) = layer(
                    x, layer_k, layer_v, positions, attn_mask, index, last
                )
                new_k.append(layer_k)
                new_v.append(layer_v)
            if cache is not None:
                new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(k=new_k, v=new_v, index=cache.index + embeddings.shape[1])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, V] (float32 not enforced: `dtype`)."""
        out = self.lm_head(hidden)
        return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens [B, L] -> (logits [B, L, V], cache): embed, blocks, lm_head."""
        hidden, cache = self(self.embed(tokens), positions, attn_mask, cache)
        return self.logits(hidden), cache
