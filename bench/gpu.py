"""One-GPU benchmark of the release-size pipeline; prints a table (and, with --json, one JSON line per row).

    .venv/bin/python bench/gpu.py [--steps 50 200] [--precisions fp32 bf16 fp16] [--vq-shape 512 512 400]
        [--vq-memory-gib 24] [--vq-tile 64] [--skip-vq]

Rows: per-lesion LMNet sampling (crop 64×152×152) and LINet encode + sampling + decode (crop 128³, latent 64³) at
each DDIM step count and UNet precision (autocast; the VQ stays float32), with the peak GPU memory of each; the
streamed VQ decode of a ``--vq-shape`` volume with the GPU capped at ``--vq-memory-gib`` (activations in host
memory when they do not fit); and end to end per lesion (LMNet + LINet, no file I/O). Weights come from the
configs' checkpoints when present, else they are random (time and memory do not depend on them); the text
context is a random tensor of the right shape (BiomedCLIP is not needed). Without a CUDA GPU it says so and
exits 0.
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

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTEXT_TOKENS = 8  # attributes per lesion description (order of magnitude; time barely depends on it)


def build(config_path: str, device: torch.device):
    """The model of a release config, its checkpoints loaded when present, without the text encoder."""
    from omegaconf import OmegaConf

    from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

    config = load_config([PIPELINE_DIR / config_path])
    params = config.model.params
    for block in (params, params.get("first_stage_config", {}).get("params", {})):
        if block and block.get("ckpt_path") and not (PIPELINE_DIR / str(block.ckpt_path)).is_file():
            block.ckpt_path = None
    params.cond_stage_config = None
    model = instantiate_from_config(config.model, key_path="model").to(device).eval()
    inference = OmegaConf.to_container(config.get("inference", {}) or {}, resolve=True)
    return model, inference


def timed(function, device: torch.device) -> tuple[float, float]:
    """Seconds and peak GPU memory (GiB) of one call."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    function()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30


def lmnet_runner(device: torch.device, config: str):
    model, inference = build(config, device)
    crop = inference.get("crop_size", [64, 152, 152])
    cond = torch.zeros(1, 3, *crop, device=device)
    cond[:, 1, 2:-2, 4:-4, 4:-4] = 1
    cond[:, 2, crop[0] // 4: -crop[0] // 4, crop[1] // 4: -crop[1] // 4, crop[2] // 4: -crop[2] // 4] = 1
    context = torch.randn(1, CONTEXT_TOKENS, model.model.context_dim or 512, device=device)

    def run(steps: int, dtype: torch.dtype | None) -> None:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            model.sample(cond, context, steps=steps, generator=torch.Generator().manual_seed(0))

    return run, crop


def linet_runner(device: torch.device, config: str):
    model, inference = build(config, device)
    crop = inference.get("crop_size", [128, 128, 128])
    image = torch.rand(1, 1, *crop, generator=torch.Generator().manual_seed(0)).to(device)
    label = torch.zeros(1, *crop, dtype=torch.long, device=device)
    label[:, crop[0] // 3: -crop[0] // 3, crop[1] // 3: -crop[1] // 3, crop[2] // 3: -crop[2] // 3] = 2
    context = torch.randn(1, CONTEXT_TOKENS, model.model.context_dim or 512, device=device)

    def run(steps: int, dtype: torch.dtype | None) -> None:
        latent = model.encode(image)
        mask = model.latent_mask(label, latent.shape)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            sample = model.sample(latent, mask, context, steps=steps, generator=torch.Generator().manual_seed(0))
        model.decode(sample.float())

    return run, crop


def streamed_vq(device: torch.device, shape: list[int], memory_gib: float, tile: int) -> dict:
    """Streamed release-VQ decode of a ``shape`` volume with the GPU capped at ``memory_gib``."""
    from omegaconf import OmegaConf

    from ldm.models.autoencoder import VQModelInterface
    from ldm.util import PIPELINE_DIR, load_config

    params = OmegaConf.to_container(
        load_config([PIPELINE_DIR / "configs/autoencoder/lesiondiffusion_vq.yaml"]).model.params, resolve=True)
    vq = VQModelInterface(ddconfig=params["ddconfig"], lossconfig={"target": "torch.nn.Identity"},
                          n_embed=params["n_embed"], embed_dim=params["embed_dim"]).to(device).eval()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total), device)
    factor = vq.downsample_factor
    latent = torch.randn(1, params["embed_dim"], *[size // factor for size in shape], device=device)
    widest = 4 * params["ddconfig"]["ch"] * max(params["ddconfig"]["ch_mult"]) * torch.tensor(shape).prod().item()
    storage = device if 2 * widest < memory_gib * 2**30 / 2 else torch.device("cpu")
    seconds, peak = timed(lambda: vq.decode_streamed(latent, tile=tile, storage=storage), device)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"stage": "VQ decode, streamed", "size": "x".join(map(str, shape)), "steps": "", "precision": "fp32",
            "seconds": seconds, "peak_gib": peak, "note": f"activations on {storage.type}, GPU capped at "
                                                          f"{memory_gib:g} GiB, tile {tile} latent voxels"}


def print_table(rows: list[dict], device_name: str) -> None:
    print(f"GPU: {device_name}")
    header = f"{'stage':<34} {'size':<13} {'steps':>5} {'precision':>9} {'s/lesion':>9} {'peak GiB':>9}  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['stage']:<34} {row['size']:<13} {row['steps']!s:>5} {row['precision']:>9} "
              f"{row['seconds']:>9.2f} {row['peak_gib']:>9.2f}  {row.get('note', '')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--lmnet-config", default="configs/diffusion/maskdiffusion_test.yaml")
    parser.add_argument("--linet-config", default="configs/diffusion/lesiondiffusion_test.yaml")
    parser.add_argument("--vq-shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--vq-memory-gib", type=float, default=24.0)
    parser.add_argument("--vq-tile", type=int, default=64, help="streamed tile edge in latent voxels")
    parser.add_argument("--skip-vq", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print each row as a JSON line")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU on this machine; nothing measured (run it on a GPU machine).")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = True
    rows, per_lesion = [], {}
    for stage, make in (("LMNet sampling", lmnet_runner), ("LINet encode+sampling+decode", linet_runner)):
        run, crop = make(device, args.lmnet_config if stage.startswith("LMNet") else args.linet_config)
        run(2, None)  # warm-up: cuDNN autotuning, allocator
        for steps in args.steps:
            for precision in args.precisions:
                seconds, peak = timed(lambda: run(steps, PRECISIONS[precision]), device)
                per_lesion.setdefault((steps, precision), []).append(seconds)
                rows.append({"stage": stage, "size": "x".join(map(str, crop)), "steps": steps,
                             "precision": precision, "seconds": seconds, "peak_gib": peak})
        del run
        torch.cuda.empty_cache()
    for (steps, precision), seconds in per_lesion.items():
        peak = max(row["peak_gib"] for row in rows if row["steps"] == steps and row["precision"] == precision)
        rows.append({"stage": "end to end (LMNet + LINet)", "size": "", "steps": steps, "precision": precision,
                     "seconds": sum(seconds), "peak_gib": peak})
    if not args.skip_vq:
        rows.append(streamed_vq(device, args.vq_shape, args.vq_memory_gib, args.vq_tile))
    print_table(rows, torch.cuda.get_device_name(device))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
