"""Benchmark: full-size fused DINOv2 + SigLIP vision backbone forward, Flax (jit) vs timm PyTorch.

    python bench/vision.py [--batch 1] [--iters 3]

Both sides use the SAME random weights (timm models built without pretrained weights, then
converted with `pixelvla_jax.weights.timm_vision`), 224 px, float32, on this machine's CPU.
Both stop at the block they need (torch: `forward_intermediates(stop_early=True)`), so the
comparison is kernel against kernel. Timed iterations alternate between the two backends so
that background load hits both alike. Prints a table and a final `BENCH {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pixelvla_jax.models.vision import FusedVisionBackbone, VisionConfig  # noqa: E402
from pixelvla_jax.testing.torch_reference import import_timm, import_torch  # noqa: E402
from pixelvla_jax.weights.timm_vision import state_dict_getter, vit_params_from_torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    timm, torch = import_timm(), import_torch()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cfg = VisionConfig.openvla()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    towers = {}
    for key, name in [
        ("dino", "vit_large_patch14_reg4_dinov2"),
        ("siglip", "vit_so400m_patch14_siglip_224"),
    ]:
        # Built on the meta device and filled with plain normals: timm's truncated-normal
        # init of ~0.7B parameters takes minutes on a small CPU and does not matter here.
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, img_size=224, num_classes=0)
        model = model.to_empty(device="cpu").eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith((".gamma", "norm1.weight", "norm2.weight", "norm.weight")):
                    p.normal_(1.0, 0.02)
                else:
                    p.normal_(0.0, 0.02)
        towers[key] = model
    params = {
        key: jax.tree_util.tree_map(
            jnp.asarray,
            vit_params_from_torch(state_dict_getter(m.state_dict()), getattr(cfg, key)),
        )
        for key, m in towers.items()
    }
    setup_s = time.perf_counter() - t0

    image = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def torch_forward(im: np.ndarray):
        x = torch.from_numpy(im).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            outs = []
            for key, m, x_norm in [
                ("dino", towers["dino"], (x - mean) / std),
                ("siglip", towers["siglip"], (x - 0.5) / 0.5),
            ]:
                block = getattr(cfg, f"{key}_block")
                outs.append(
                    m.forward_intermediates(
                        x_norm,
                        indices=[block],
                        stop_early=True,
                        intermediates_only=True,
                        output_fmt="NLC",
                    )[0]
                )
            return torch.cat(outs, dim=2)

    backbone = FusedVisionBackbone(cfg)
    flax_fn = jax.jit(lambda p, im: backbone.apply({"params": p}, im)[0])

    def flax_forward(im: np.ndarray):
        return jax.block_until_ready(flax_fn(params, im))

    t0 = time.perf_counter()
    flax_out = np.asarray(flax_forward(image))  # compile + warm-up
    compile_s = time.perf_counter() - t0
    torch_out = torch_forward(image).numpy()  # warm-up
    max_diff = float(np.abs(flax_out - torch_out).max())

    times = {"flax": [], "torch": []}
    for _ in range(args.iters):
        for name, fn in (("flax", flax_forward), ("torch", torch_forward)):
            t = time.perf_counter()
            fn(image)
            times[name].append(time.perf_counter() - t)

    best = {k: min(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in best.items()}
    ratio = ips["flax"] / ips["torch"]

    print(
        f"Fused vision backbone (DINOv2 ViT-L/14-reg4 + SigLIP So400m/14), 224 px, fp32, CPU x{cores}"
    )
    print(f"batch {args.batch}, {args.iters} timed iterations each (best of), interleaved")
    print(
        f"setup {setup_s:.1f} s, flax compile+first run {compile_s:.1f} s, output shape {flax_out.shape}"
    )
    print(f"max |flax - torch| on the fused features: {max_diff:.2e}")
    print(f"{'backend':<10}{'best ms/batch':>15}{'median ms':>12}{'images/s':>10}")
    for k in ("flax", "torch"):
        print(
            f"{k:<10}{1e3 * best[k]:>15.0f}{1e3 * float(np.median(times[k])):>12.0f}{ips[k]:>10.2f}"
        )
    print(
        f"flax / torch throughput: {ratio:.2f}x  (other processes share this CPU: indicative only)"
    )
    figures = {
        "flax_images_per_s": round(ips["flax"], 3),
        "torch_images_per_s": round(ips["torch"], 3),
        "flax_vs_torch_fp32": round(ratio, 3),
        "batch": args.batch,
        "max_abs_diff": max_diff,
        "cpu_cores": cores,
    }
    bench = {
        "name": "vision",
        "figures": figures,
        "targets": {"flax_vs_torch_fp32": [round(ratio, 3), ">=", 1.0]},
    }
    print("BENCH " + json.dumps(bench))


if __name__ == "__main__":
    main()
