"""Tiled vs whole-volume VQ encode/decode: max abs differences and times, printed as JSON.

    python bench/vq_tiling.py --config demo --shape 96 96 96 --enc-tile 80 --enc-overlap 64 \
        --dec-tile 40 --dec-overlap 32

Random weights (seeded) on a body-like phantom in [0, 1] (air 0, body 0.5, a 0.9 blob, noise 0.02). "interior"
is the volume without a ``--margin``-voxel shell at its outer border, "border" that shell.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

from ldm.models.autoencoder import VQModelInterface  # noqa: E402
from ldm.util import load_config  # noqa: E402

CONFIGS = {"demo": ROOT / "pipeline" / "configs" / "demo" / "vq.yaml",
           "release": ROOT / "pipeline" / "configs" / "autoencoder" / "lesiondiffusion_vq.yaml"}


def phantom(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size) for size in shape], indexing="ij")
    radius = sum((axis / 0.85) ** 2 for axis in axes)
    blob = sum((axis - 0.25) ** 2 for axis in axes)
    noise = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return ((radius < 1).float() * 0.5 + (blob < 0.12).float() * 0.4 + noise).clamp(0, 1)[None, None]


def differences(whole: torch.Tensor, tiled: torch.Tensor, margin: int) -> dict[str, float]:
    difference = (whole.float().cpu() - tiled.float().cpu()).abs()
    interior = difference[(Ellipsis, *[slice(margin, -margin)] * (difference.dim() - 2))]
    border = difference.clone()
    border[(Ellipsis, *[slice(margin, -margin)] * (difference.dim() - 2))] = 0
    return {"max": difference.max().item(), "interior_max": interior.max().item(),
            "border_max": border.max().item(), "mean": difference.mean().item(), "whole_std": whole.std().item()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48])
    parser.add_argument("--enc-tile", type=int, default=32)
    parser.add_argument("--enc-overlap", type=int, default=16)
    parser.add_argument("--dec-tile", type=int, default=16)
    parser.add_argument("--dec-overlap", type=int, default=8)
    parser.add_argument("--margin", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    params = load_config([CONFIGS[args.config]]).model.params
    torch.manual_seed(0)
    model = VQModelInterface(ddconfig=dict(params.ddconfig), lossconfig={"target": "torch.nn.Identity"},
                             n_embed=params.n_embed, embed_dim=params.embed_dim).eval().to(args.device)
    volume = phantom(tuple(args.shape)).to(args.device)
    results = {"config": args.config, "shape": args.shape, "device": args.device}
    with torch.no_grad():
        start = time.perf_counter()
        latent = model.encode(volume)
        results["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        decoded = model.decode(latent, force_not_quantize=True)
        results["decode_s"] = time.perf_counter() - start
        for global_norm in (True, False):
            key = "global_norm" if global_norm else "per_tile_norm"
            start = time.perf_counter()
            tiled_latent = model.encode_tiled(volume, args.enc_tile, args.enc_overlap, global_norm=global_norm)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            tiled = model.decode_tiled(latent, args.dec_tile, args.dec_overlap, force_not_quantize=True,
                                       global_norm=global_norm)
            decode_s = time.perf_counter() - start
            results[key] = {"encode": {"tile": args.enc_tile, "overlap": args.enc_overlap, "seconds": encode_s,
                                       **differences(latent, tiled_latent, max(args.margin // 2, 1))},
                            "decode": {"tile": args.dec_tile, "overlap": args.dec_overlap, "seconds": decode_s,
                                       **differences(decoded, tiled, args.margin)}}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
