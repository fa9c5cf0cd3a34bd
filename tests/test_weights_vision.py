"""safetensors I/O (BF16, sharded) and the OpenVLA vision-weight import."""

import dataclasses
import json

import chex
import jax
import ml_dtypes
import numpy as np
import pytest

from pixelvla_jax.models.vision import FusedVisionBackbone, Projector, VisionConfig
from pixelvla_jax.models.vit import stack_block_params
from pixelvla_jax.testing.torch_reference import import_timm, import_torch
from pixelvla_jax.weights.safetensors_io import open_checkpoint, save_file, save_sharded
from pixelvla_jax.weights.timm_vision import (
    DINO_PREFIX,
    SIGLIP_PREFIX,
    vision_params_from_checkpoint,
    vit_params_from_torch,
)


def test_bf16_round_trip_and_cross_library(tmp_path):
    torch = import_torch()
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    rng = np.random.default_rng(0)
    tensors = {
        "w.bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "w.f32": rng.normal(size=(7,)).astype(np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.float32(2.5).reshape(()),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ckpt = open_checkpoint(path)
    assert sorted(ckpt.keys()) == sorted(tensors)
    got = {name: ckpt.get(name) for name in tensors}
    chex.assert_type(list(got.values()), [value.dtype for value in tensors.values()])
    chex.assert_trees_all_equal_shapes(got, tensors)
    chex.assert_trees_all_equal(got, tensors)
    for name, value in tensors.items():
        assert ckpt.dtype(name) == value.dtype and ckpt.shape(name) == value.shape

    # Our file reads back in the reference library, and theirs in ours (bf16 bit-exact).
    theirs = torch_load(str(path))
    assert theirs["w.bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        theirs["w.bf16"].float().numpy(), tensors["w.bf16"].astype(np.float32)
    )
    t = torch.randn(4, 3).to(torch.bfloat16)
    torch_save({"t": t, "u": torch.arange(5, dtype=torch.int32)}, str(tmp_path / "t.safetensors"))
    ours = open_checkpoint(tmp_path / "t.safetensors")
    assert ours.dtype("t") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ours.get("t").astype(np.float32), t.float().numpy())
    np.testing.assert_array_equal(ours.get("u"), np.arange(5, dtype=np.int32))


def test_sharded_checkpoint_directory(tmp_path):
    tensors = {f"layer.{i}.w": np.full((16, 16), i, np.float32) for i in range(5)}
    shards = save_sharded(tensors, tmp_path / "ckpt", max_shard_bytes=2 * 16 * 16 * 4)
    assert len(shards) == 3
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert sorted(ckpt.keys()) == sorted(tensors) and len(ckpt) == 5
    chex.assert_trees_all_equal({name: ckpt[name] for name in tensors}, tensors)
    with pytest.raises(KeyError, match=r"'nope'.*ckpt"):
        ckpt.get("nope")

    with open(tmp_path / "ckpt" / "model.safetensors.index.json") as f:
        index = json.load(f)
    index["weight_map"]["extra"] = "model-00009-of-00009.safetensors"
    with open(tmp_path / "ckpt" / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
        open_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no safetensors file or checkpoint directory"):
        open_checkpoint(tmp_path / "missing")


def _openvla_state_dict(cfg: VisionConfig):
    """A tiny OpenVLA-named vision state dict, bf16-representable, plus the torch modules."""
    timm, torch = import_timm(), import_torch()
    torch.manual_seed(0)
    towers = {}
    for key, name, vcfg in [
        ("dino", "vit_large_patch14_reg4_dinov2", cfg.dino),
        ("siglip", "vit_so400m_patch14_siglip_224", cfg.siglip),
    ]:
        m = timm.create_model(
            name,
            pretrained=False,
            img_size=vcfg.image_size,
            embed_dim=vcfg.width,
            depth=vcfg.depth,
            num_heads=vcfg.num_heads,
            num_classes=0,
        ).eval()
        with torch.no_grad():
            for pname, p in m.named_parameters():
                p.add_(0.1 * torch.randn_like(p))
                if pname.endswith(".gamma"):
                    p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
                p.copy_(p.to(torch.bfloat16).float())  # exactly representable in the bf16 file
        towers[key] = m
    dims = cfg.projector_dims
    fcs = [torch.nn.Linear(dims[i], dims[i + 1]) for i in range(3)]
    sd = {}
    for k, v in towers["dino"].state_dict().items():  # OpenVLA renames LayerScale gamma
        sd[DINO_PREFIX + k.replace(".gamma", ".scale_factor")] = v
    for k, v in towers["siglip"].state_dict().items():
        sd[SIGLIP_PREFIX + k] = v
    for i, fc in enumerate(fcs, start=1):
        with torch.no_grad():
            fc.weight.copy_(fc.weight.to(torch.bfloat16).float())
            fc.bias.copy_(fc.bias.to(torch.bfloat16).float())
        sd[f"projector.fc{i}.weight"], sd[f"projector.fc{i}.bias"] = fc.weight, fc.bias
    arrays = {k: v.detach().float().numpy().astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    return arrays, towers, fcs


def test_openvla_checkpoint_import_matches_torch(tmp_path):
    torch = import_torch()
    cfg = VisionConfig.tiny()
    arrays, towers, fcs = _openvla_state_dict(cfg)
    save_sharded(arrays, tmp_path / "openvla", max_shard_bytes=200_000)
    ckpt = open_checkpoint(tmp_path / "openvla")
    params = vision_params_from_checkpoint(ckpt, cfg)
    assert set(params) == {"dino", "siglip", "projector"}
    chex.assert_type(jax.tree.leaves(params), np.float32)  # bf16 file, float32 params

    image = np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        d = towers["dino"].get_intermediate_layers((x - mean) / std, n={cfg.dino.depth - 2})[0]
        s = towers["siglip"].get_intermediate_layers((x - 0.5) / 0.5, n={cfg.siglip.depth - 2})[0]
        ref = torch.cat([d, s], 2)
        for i, fc in enumerate(fcs):
            ref = fc(torch.nn.functional.gelu(ref) if i else ref)
    ref = ref.numpy()

    def forward(p, im, scan):
        backbone = FusedVisionBackbone(cfg, scan_layers=scan)
        fused, _ = backbone.apply({"params": {"dino": p["dino"], "siglip": p["siglip"]}}, im)
        return Projector(cfg).apply({"params": p["projector"]}, fused)

    out = jax.jit(forward, static_argnums=2)(params, image, False)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)

    scanned = vision_params_from_checkpoint(ckpt, cfg, scan_layers=True)
    stacked_dino = stack_block_params(params["dino"], cfg.dino.depth)
    chex.assert_trees_all_equal(scanned["dino"], stacked_dino)
    out_scan = jax.jit(forward, static_argnums=2)(scanned, image, True)
    chex.assert_trees_all_close(out_scan, ref, atol=1e-5, rtol=0)


def _tiny_dino_tensors():
    cfg = VisionConfig.tiny().dino
    timm = import_timm()
    m = timm.create_model(
        "vit_large_patch14_reg4_dinov2",
        pretrained=False,
        img_size=56,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=0,
    )
    return cfg, {k: v.detach().numpy() for k, v in m.state_dict().items()}


def test_import_errors_name_the_tensor_and_shapes():
    cfg, sd = _tiny_dino_tensors()
    params = vit_params_from_torch(sd.__getitem__, cfg)  # timm's own `.gamma` names work too
    chex.assert_shape(params["block_3"]["ls2"], (cfg.width,))

    missing = dict(sd)
    del missing["blocks.2.mlp.fc1.bias"]
    with pytest.raises(KeyError, match=r"blocks\.2\.mlp\.fc1\.bias"):
        vit_params_from_torch(missing.__getitem__, cfg)
    no_ls = {k: v for k, v in sd.items() if k != "blocks.1.ls1.gamma"}
    with pytest.raises(KeyError, match=r"blocks\.1\.ls1\.scale_factor' or 'blocks\.1\.ls1\.gamma"):
        vit_params_from_torch(no_ls.__getitem__, cfg)

    wrong = dict(sd)
    wrong["blocks.0.attn.qkv.weight"] = np.zeros((96, 33), np.float32)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*\(96, 33\).*\(96, 32\)"):
        vit_params_from_torch(wrong.__getitem__, cfg)
    with pytest.raises(ValueError, match=r"pos_embed.*\(1, 16, 32\).*\(1, 64, 32\)"):
        vit_params_from_torch(sd.__getitem__, dataclasses.replace(cfg, image_size=112))


def test_unused_heads_are_ignored():
    cfg, sd = _tiny_dino_tensors()
    headless = dataclasses.replace(cfg, final_norm=False)
    params = vit_params_from_torch(sd.__getitem__, headless)  # checkpoint has `norm.*`
    assert "norm" not in params and "attn_pool" not in params
    no_norm = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    assert vit_params_from_torch(no_norm.__getitem__, headless).keys() == params.keys()
    with pytest.raises(KeyError, match=r"'norm\.weight'"):
        vit_params_from_torch(no_norm.__getitem__, cfg)
