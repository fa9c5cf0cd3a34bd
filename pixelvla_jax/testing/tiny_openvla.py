"""A tiny random OpenVLA checkpoint directory and a PyTorch reference of OpenVLA's wiring.

`build_tiny_openvla(directory)` writes what the real `openvla/openvla-7b` Hugging Face
directory holds, at toy size:

- `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`, with the
  OpenVLA names: `vision_backbone.featurizer.*` (timm DINOv2 with registers, LayerScale
  gammas stored as `.scale_factor`), `vision_backbone.fused_featurizer.*` (timm SigLIP),
  `projector.fc{1,2,3}.*`, `language_model.model.*` / `language_model.lm_head.weight`
  (HF `LlamaForCausalLM`, embedding padded to a multiple of 64 past the pad token);
- `config.json` with `text_config`, `timm_model_ids`, `n_action_bins` and `norm_stats`;
- `tokenizer.model`: a sentencepiece model trained on the spot (byte fallback, ids
  unk=0, bos=1, eos=2 as in Llama). As in OpenVLA, the action tokens are the last
  `n_bins` ids below the tokenizer's vocabulary size.

It also returns `OpenVLAReference`, the torch module the shards were written from, whose
methods reproduce OpenVLA's `predict_action` wiring (both towers'
`get_intermediate_layers(n={len(blocks) - 2})`, concatenation, projector, vision tokens
after BOS, greedy decoding of 7 action tokens, bin-centre decoding). Needs torch, timm,
transformers (the `reference` extra); used by tests and benchmarks only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import types
from typing import Any

import numpy as np

from pixelvla_jax.testing.torch_reference import (
    import_timm,
    import_torch,
    import_transformers,
)

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
DINO_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WORDS = [
    "pick",
    "place",
    "put",
    "the",
    "a",
    "an",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "cup",
    "bowl",
    "plate",
    "spoon",
    "fork",
    "mug",
    "can",
    "bottle",
    "sponge",
    "cloth",
    "on",
    "in",
    "into",
    "onto",
    "from",
    "drawer",
    "open",
    "close",
    "top",
    "bottom",
    "left",
    "right",
    "middle",
    "of",
    "table",
    "robot",
    "move",
    "block",
    "stack",
    "push",
    "pull",
    "towel",
    "fold",
    "lift",
    "turn",
    "knob",
    "stove",
    "sink",
    "basket",
    "box",
    "lid",
    "pot",
    "pan",
]


@dataclasses.dataclass(frozen=True)
class TinyOpenVLASpec:
    """Sizes of the tiny checkpoint (the real one: 1024/24/16, 1152/27/16, 4096/11008/32/32)."""

    image_size: int = 56
    patch_size: int = 14
    dino_width: int = 32
    dino_depth: int = 4
    dino_heads: int = 2
    dino_mlp: int = 128
    siglip_width: int = 48
    siglip_depth: int = 5
    siglip_heads: int = 3
    siglip_mlp: int = 179
    llm_width: int = 64
    llm_mlp: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tokenizer_vocab: int = 512
    n_bins: int = 256
    pad_to_multiple_of: int = 64

    @classmethod
    def from_config(cls, config) -> TinyOpenVLASpec:
        """The sizes of a `PixelVLAConfig` (its vision towers, Llama and vocabulary)."""
        dino, siglip, llm = config.vision.dino, config.vision.siglip, config.llama
        spec = cls(
            image_size=config.vision.image_size,
            patch_size=dino.patch_size,
            dino_width=dino.width,
            dino_depth=dino.depth,
            dino_heads=dino.num_heads,
            dino_mlp=dino.mlp_dim,
            siglip_width=siglip.width,
            siglip_depth=siglip.depth,
            siglip_heads=siglip.num_heads,
            siglip_mlp=siglip.mlp_dim,
            llm_width=llm.width,
            llm_mlp=llm.mlp_dim,
            llm_layers=llm.depth,
            llm_heads=llm.num_heads,
            llm_kv_heads=llm.num_kv_heads,
            rms_norm_eps=llm.norm_eps,
            rope_theta=llm.rope_theta,
            tokenizer_vocab=config.tokenizer_vocab_size,
            n_bins=config.n_action_bins,
        )
        if spec.model_vocab != llm.vocab_size or llm.head_dim * llm.num_heads != llm.width:
            raise ValueError(
                f"config.llama (vocab {llm.vocab_size}, head_dim {llm.head_dim}) is not an "
                f"OpenVLA-style layout: vocab must be {spec.model_vocab} (tokenizer "
                f"{spec.tokenizer_vocab} + pad, padded to {spec.pad_to_multiple_of}) and "
                "head_dim * num_heads == width"
            )
        return spec

    @property
    def model_vocab(self) -> int:
        """Tokenizer vocabulary + 1 pad token, rounded up (OpenVLA: 32000 + 1 -> 32064)."""
        m = self.pad_to_multiple_of
        return -(-(self.tokenizer_vocab + 1) // m) * m

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass
class TinyOpenVLA:
    """What `build_tiny_openvla` wrote, and the torch module it was written from."""

    directory: str
    spec: TinyOpenVLASpec
    reference: Any  # OpenVLAReference (a torch.nn.Module)
    tokenizer_path: str
    norm_stats: dict

    def tokenizer(self):
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=self.tokenizer_path)

    def prompt_ids(self, instruction: str) -> list[int]:
        """BOS + the OpenVLA prompt's token ids."""
        sp = self.tokenizer()
        return [sp.bos_id()] + sp.encode(OPENVLA_PROMPT.format(instruction=instruction))


def bin_centers(n_bins: int = 256) -> np.ndarray:
    bins = np.linspace(-1.0, 1.0, n_bins)
    return (bins[:-1] + bins[1:]) / 2.0


def decode_action_tokens(tokens: np.ndarray, tokenizer_vocab: int, n_bins: int = 256) -> np.ndarray:
    """OpenVLA's `predict_action` decoding: token ids -> normalised actions (bin centres)."""
    centers = bin_centers(n_bins)
    discretized = tokenizer_vocab - np.asarray(tokens)
    discretized = np.clip(discretized - 1, 0, centers.shape[0] - 1)
    return centers[discretized]


def unnormalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    """OpenVLA's BOUNDS_Q99 un-normalisation (masked dims only)."""
    low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    mask = np.asarray(stats.get("mask", np.ones_like(low, bool)), bool)
    return np.where(mask, 0.5 * (actions + 1) * (high - low) + low, actions)


def fast_random_params(abstract_params: Any, seed: int = 0) -> Any:
    """Random params filled on the host with numpy, shaped like `abstract_params`.

    `jax.jit(model.init)` of even the tiny model spends ~20 CPU-seconds compiling one random
    op per parameter; tests and benchmarks that only need *some* well-scaled weights use
    this instead: kernels ~ N(0, 1/fan_in), norm scales 1, biases and LoRA `lora_b` 0,
    LayerScale in [0.5, 1], everything else (embeddings, tokens, slots) ~ N(0, 0.02).
    `Partitioned` boxes are unboxed; returns float32 jax arrays (leaf dtypes kept).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if name == "scale" and len(shape) >= 1:
            value = np.ones(shape)
        elif name == "bias" or name.endswith("_bias") or name == "lora_b":
            value = np.zeros(shape)
        elif name in ("ls1", "ls2"):
            value = rng.uniform(0.5, 1.0, shape)
        elif name.endswith("kernel") or name == "lora_a":
            if name in ("query_kernel", "key_kernel", "value_kernel"):
                fan_in = shape[0]  # [D, H, hd]
            else:
                fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        else:
            value = rng.normal(0.0, 0.02, shape)
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract_params))


def _make_reference_class():
    torch = import_torch()
    nn = torch.nn

    class OpenVLAReference(nn.Module):
        """OpenVLA's modules under the checkpoint's names, and its inference wiring."""

        def __init__(self, featurizer, fused_featurizer, llm, spec: TinyOpenVLASpec):
            super().__init__()
            self.spec = spec
            self.vision_backbone = nn.Module()
            self.vision_backbone.featurizer = featurizer
            self.vision_backbone.fused_featurizer = fused_featurizer
            vision_dim = featurizer.embed_dim + fused_featurizer.embed_dim
            llm_dim = llm.config.hidden_size
            self.projector = nn.Module()
            self.projector.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.projector.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.projector.fc3 = nn.Linear(llm_dim, llm_dim)
            self.language_model = llm

        def pixel_values(self, image: np.ndarray):
            """[B, H, W, 3] uint8 at image_size -> [B, 6, H, W] (DINOv2 then SigLIP norm)."""
            image = np.asarray(image)
            s = self.spec.image_size
            if image.shape[1:] != (s, s, 3):
                raise ValueError(f"image must be [B, {s}, {s}, 3], got {image.shape}")
            x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            return torch.cat([(x - mean) / std, (x - 0.5) / 0.5], dim=1)

        def patch_features(self, pixel_values):
            """[B, 6, H, W] -> [B, N, D_dino + D_siglip], second-to-last blocks."""
            outs = []
            for tower, x in (
                (self.vision_backbone.featurizer, pixel_values[:, :3]),
                (self.vision_backbone.fused_featurizer, pixel_values[:, 3:]),
            ):
                (feat,) = tower.get_intermediate_layers(x, n={len(tower.blocks) - 2})
                outs.append(feat)
            return torch.cat(outs, dim=2)

        def vision_tokens(self, pixel_values):
            """[B, 6, H, W] -> [B, N, D_llm] (FusedMLPProjector: fc1, GELU, fc2, GELU, fc3)."""
            x = self.patch_features(pixel_values)
            p = self.projector
            x = p.fc3(nn.functional.gelu(p.fc2(nn.functional.gelu(p.fc1(x)))))
            return x

        def logits(self, pixel_values, input_ids):
            """[B, 6, H, W], [B, L] (BOS first, no padding) -> [B, 1 + N + L - 1, V]."""
            embed = self.language_model.get_input_embeddings()(input_ids)
            vis = self.vision_tokens(pixel_values)
            x = torch.cat([embed[:, :1], vis, embed[:, 1:]], dim=1)
            mask = torch.ones(x.shape[:2], dtype=torch.long)
            return self.language_model(inputs_embeds=x, attention_mask=mask).logits

        @torch.no_grad()
        def generate_action_tokens(self, pixel_values, input_ids, num_tokens: int = 7):
            """Greedy decoding of `num_tokens` tokens (argmax over the whole padded vocab)."""
            ids = input_ids
            for _ in range(num_tokens):
                nxt = self.logits(pixel_values, ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            return ids[:, input_ids.shape[1] :]

        @torch.no_grad()
        def predict_action(self, image: np.ndarray, input_ids: np.ndarray, action_dim: int = 7):
            """uint8 images [B, H, W, 3], prompt ids [B, L] -> (tokens [B, 7], actions [B, 7])."""
            pv = self.pixel_values(image)
            ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
            tokens = self.generate_action_tokens(pv, ids, action_dim).numpy()
            actions = decode_action_tokens(tokens, self.spec.tokenizer_vocab, self.spec.n_bins)
            return tokens, actions

    return OpenVLAReference


def _patch_layerscale(tower) -> None:
    """OpenVLA stores timm LayerScale `gamma` as `scale_factor` (HF renames `gamma` keys)."""
    torch = import_torch()
    timm = import_timm()
    layer_scale_cls = timm.layers.LayerScale

    def forward(self, x):
        return x * self.scale_factor

    for module in tower.modules():
        if isinstance(module, layer_scale_cls):
            module.scale_factor = torch.nn.Parameter(module.gamma.detach().clone())
            del module.gamma
            module.forward = types.MethodType(forward, module)


def build_reference(spec: TinyOpenVLASpec = TinyOpenVLASpec(), seed: int = 0):
    """Random OpenVLA-structured torch modules (weights perturbed so every tensor matters)."""
    torch = import_torch()
    timm = import_timm()
    transformers = import_transformers()
    torch.manual_seed(seed)
    dino = timm.create_model(
        DINO_TIMM_ID,
        pretrained=False,
        num_classes=0,
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        embed_dim=spec.dino_width,
        depth=spec.dino_depth,
        num_heads=spec.dino_heads,
        mlp_ratio=(spec.dino_mlp + 0.5) / spec.dino_width,  # timm: int(width * mlp_ratio)
    )
    siglip = timm.create_model(
        SIGLIP_TIMM_ID,
        pretrained=False,
        num_classes=0,
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        embed_dim=spec.siglip_width,
        depth=spec.siglip_depth,
        num_heads=spec.siglip_heads,
        mlp_ratio=(spec.siglip_mlp + 0.5) / spec.siglip_width,
    )
    _patch_layerscale(dino)
    llm_config = transformers.LlamaConfig(
        vocab_size=spec.model_vocab,
        hidden_size=spec.llm_width,
        intermediate_size=spec.llm_mlp,
        num_hidden_layers=spec.llm_layers,
        num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        max_position_embeddings=2048,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=spec.tokenizer_vocab,
        bos_token_id=1,
        eos_token_id=2,
    )
    llm = transformers.LlamaForCausalLM(llm_config)
    model = _make_reference_class()(dino, siglip, llm, spec).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("scale_factor"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
            elif p.ndim == 1 or name.endswith(("_token", "pos_embed", "latent")):
                p.add_(0.1 * noise)  # norms, biases, learned tokens: not just 1 / 0
    return model


def train_tokenizer(path: str, vocab_size: int = 512, seed: int = 0) -> str:
    """Trains a Llama-like sentencepiece BPE model on robot instructions; writes `path`."""
    import sentencepiece as spm

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    extra = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(400)]
    lines = [
        OPENVLA_PROMPT.format(
            instruction=" ".join(rng.choice(_WORDS + extra) for _ in range(rng.randint(3, 10)))
        )
        for _ in range(3000)
    ]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path


def fake_norm_stats(action_dim: int = 7, proprio_dim: int = 8, seed: int = 0) -> dict:
    """OpenVLA `norm_stats` layout for one dataset key (`tiny_dataset`)."""
    rng = np.random.default_rng(seed)

    def stats(dim, mask):
        low = rng.uniform(-1.0, -0.1, dim)
        high = rng.uniform(0.1, 1.0, dim)
        return {
            "mean": ((low + high) / 2).tolist(),
            "std": ((high - low) / 4).tolist(),
            "max": (high * 1.2).tolist(),
            "min": (low * 1.2).tolist(),
            "q01": low.tolist(),
            "q99": high.tolist(),
            "mask": mask,
        }

    return {
        "tiny_dataset": {
            "action": stats(action_dim, [True] * (action_dim - 1) + [False]),
            "proprio": stats(proprio_dim, [True] * proprio_dim),
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    }


def write_sharded_safetensors(
    tensors: dict, directory: str, num_shards: int = 2, prefix: str = "model"
) -> str:
    """Writes `{prefix}-0000k-of-0000n.safetensors` + `{prefix}.safetensors.index.json`."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    groups = [list(g) for g in np.array_split(np.array(names, dtype=object), num_shards)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"{prefix}-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {n: tensors[n].detach().contiguous().clone() for n in group}
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        for n, t in shard.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index_path = os.path.join(directory, f"{prefix}.safetensors.index.json")
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return index_path


def build_tiny_openvla(
    directory: str,
    spec: TinyOpenVLASpec = TinyOpenVLASpec(),
    seed: int = 0,
    num_shards: int = 2,
    dtype: str = "bfloat16",
) -> TinyOpenVLA:
    """Writes a tiny OpenVLA HF checkpoint into `directory` (created if needed).

    `dtype="bfloat16"` stores the shards in bf16 like the released checkpoint; the returned
    torch reference then holds the same bf16-rounded values (in float32), so a float32
    import must reproduce its outputs.
    """
    torch = import_torch()
    os.makedirs(directory, exist_ok=True)
    model = build_reference(spec, seed)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch_dtype).to(torch.float32))
    state = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
    write_sharded_safetensors(state, directory, num_shards=num_shards)
    tokenizer_path = train_tokenizer(
        os.path.join(directory, "tokenizer.model"), spec.tokenizer_vocab, seed
    )
    norm_stats = fake_norm_stats(seed=seed)
    text_config = model.language_model.config.to_dict()
    text_config = {k: v for k, v in text_config.items() if k not in ("id2label", "label2id")}
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [spec.image_size, spec.image_size],
        "timm_model_ids": [DINO_TIMM_ID, SIGLIP_TIMM_ID],
        "timm_override_act_layers": [None, None],
        "n_action_bins": spec.n_bins,
        "pad_token_id": spec.tokenizer_vocab,
        "pad_to_multiple_of": spec.pad_to_multiple_of,
        "torch_dtype": dtype,
        "text_config": text_config,
        "norm_stats": norm_stats,
        "tiny_openvla_spec": dataclasses.asdict(spec),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return TinyOpenVLA(
        directory=directory,
        spec=spec,
        reference=model,
        tokenizer_path=tokenizer_path,
        norm_stats=norm_stats,
    )
