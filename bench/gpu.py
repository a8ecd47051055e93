"""One-GPU benchmark of the release-size pipeline; prints a table (and, with --json, one JSON line per row).

    .venv/bin/python bench/gpu.py [--steps 50 200] [--precisions fp32 bf16 fp16] [--fast-samplers dpmpp_2m_sde ...]
        [--fast-steps 20 25] [--vq-shape 512 512 400] [--vq-memory-gib 24] [--vq-tile 64] [--skip-vq]
    .venv/bin/python bench/gpu.py --device cpu       # the whole measuring path with tiny shapes, in seconds

Rows: per-lesion LMNet sampling (crop 64×152×152) and LINet encode + sampling + decode (crop 128³, latent 64³) with
DDIM (eta 1, the original) at each ``--steps`` count and UNet precision (autocast; the VQ stays float32), and with
each fast sampler at each ``--fast-steps`` count in bf16, with the peak GPU memory of each; the streamed VQ decode of
a ``--vq-shape`` volume with the GPU capped at ``--vq-memory-gib`` (activations in host memory when they do not
fit); and end to end per lesion (LMNet + LINet, no file I/O). Weights come from the configs' checkpoints when
present, else they are random (time and memory do not depend on them); the text context is a random tensor of the
right shape (BiomedCLIP is not needed, so the checkpoints' ``cond_stage_model.*`` weights are not loaded). Without a
CUDA GPU it says so and exits 0. ``--device cpu`` runs every row on the CPU with the demo configs, tiny crops
(``--crop``), two steps and a small VQ volume (peak memory: the process's maximum RSS), so a broken measuring path
shows on any machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

from ldm.models.diffusion.samplers import SAMPLERS, SamplerSettings  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTEXT_TOKENS = 8  # attributes per lesion description (order of magnitude; time barely depends on it)
FAST_SAMPLERS = [name for name in SAMPLERS if name not in ("ddim", "ddpm")]
# --device cpu: the demo configs and shapes small enough for seconds per row.
CPU_DEFAULTS = {"lmnet_config": "configs/demo/lmnet_test.yaml", "linet_config": "configs/demo/linet_test.yaml",
                "vq_config": "configs/demo/vq.yaml", "crop": [8, 16, 16], "steps": [2], "fast_steps": [2],
                "precisions": ["fp32", "bf16"], "vq_shape": [16, 32, 32], "vq_tile": 4}
GPU_DEFAULTS = {"lmnet_config": "configs/diffusion/maskdiffusion_test.yaml",
                "linet_config": "configs/diffusion/lesiondiffusion_test.yaml",
                "vq_config": "configs/autoencoder/lesiondiffusion_vq.yaml", "crop": None, "steps": [50, 200],
                "fast_steps": [20, 25], "precisions": list(PRECISIONS), "vq_shape": [512, 512, 400], "vq_tile": 64}


def build(config_path: str, device: torch.device):
    """The model of a test config, its checkpoints loaded when present, without the text encoder (whose weights in
    the checkpoint are then skipped)."""
    from omegaconf import OmegaConf

    from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

    config = load_config([PIPELINE_DIR / config_path])
    params = config.model.params
    for block in (params, params.get("first_stage_config", {}).get("params", {})):
        if block and block.get("ckpt_path") and not (PIPELINE_DIR / str(block.ckpt_path)).is_file():
            block.ckpt_path = None
    params.cond_stage_config = None
    params.ignore_keys = [*params.get("ignore_keys", []), "cond_stage_model."]
    model = instantiate_from_config(config.model, key_path="model").to(device).eval()
    inference = OmegaConf.to_container(config.get("inference", {}) or {}, resolve=True)
    return model, inference


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> tuple[float, float]:
    """Seconds and peak memory (GiB: the GPU's peak allocation, on the CPU the process's maximum RSS) of one call."""
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    function()
    synchronise(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated(device) / 2**30
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def lmnet_runner(device: torch.device, config: str, crop: list[int] | None = None):
    model, inference = build(config, device)
    crop = crop or inference.get("crop_size", [64, 152, 152])
    cond = torch.zeros(1, 3, *crop, device=device)
    cond[:, 1, 2:-2, 4:-4, 4:-4] = 1
    cond[:, 2, crop[0] // 4: -crop[0] // 4, crop[1] // 4: -crop[1] // 4, crop[2] // 4: -crop[2] // 4] = 1
    context = torch.randn(1, CONTEXT_TOKENS, model.model.context_dim or 512, device=device)

    def run(sampling: SamplerSettings, dtype: torch.dtype | None) -> None:
        with autocast(device, dtype):
            model.sample(cond, context, sampling, generator=torch.Generator().manual_seed(0))

    return run, crop


def linet_runner(device: torch.device, config: str, crop: list[int] | None = None):
    model, inference = build(config, device)
    crop = crop or inference.get("crop_size", [128, 128, 128])
    image = torch.rand(1, 1, *crop, generator=torch.Generator().manual_seed(0)).to(device)
    label = torch.zeros(1, *crop, dtype=torch.long, device=device)
    label[:, crop[0] // 3: -crop[0] // 3, crop[1] // 3: -crop[1] // 3, crop[2] // 3: -crop[2] // 3] = 2
    context = torch.randn(1, CONTEXT_TOKENS, model.model.context_dim or 512, device=device)

    def run(sampling: SamplerSettings, dtype: torch.dtype | None) -> None:
        latent = model.encode(image)
        mask = model.latent_mask(label, latent.shape)
        with autocast(device, dtype):
            sample = model.sample(latent, mask, context, sampling, generator=torch.Generator().manual_seed(0))
        model.decode(sample.float())

    return run, crop


def streamed_vq(device: torch.device, config: str, shape: list[int], memory_gib: float, tile: int) -> dict:
    """Streamed decode of a ``shape`` volume by the VQ of ``config`` (random weights), the GPU capped at
    ``memory_gib`` (no cap on the CPU)."""
    from omegaconf import OmegaConf

    from ldm.models.autoencoder import VQModelInterface
    from ldm.util import PIPELINE_DIR, load_config

    params = OmegaConf.to_container(load_config([PIPELINE_DIR / config]).model.params, resolve=True)
    vq = VQModelInterface(ddconfig=params["ddconfig"], lossconfig={"target": "torch.nn.Identity"},
                          n_embed=params["n_embed"], embed_dim=params["embed_dim"]).to(device).eval()
    factor = vq.downsample_factor
    latent = torch.randn(1, params["embed_dim"], *[size // factor for size in shape], device=device)
    storage, note = device, f"tile {tile} latent voxels"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total), device)
        widest = 4 * params["ddconfig"]["ch"] * max(params["ddconfig"]["ch_mult"]) * torch.tensor(shape).prod().item()
        storage = device if 2 * widest < memory_gib * 2**30 / 2 else torch.device("cpu")
        note = f"activations on {storage.type}, GPU capped at {memory_gib:g} GiB, {note}"
    try:
        with torch.no_grad():
            seconds, peak = timed(lambda: vq.decode_streamed(latent, tile=tile, storage=storage), device)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"stage": "VQ decode, streamed", "sampler": "", "size": "x".join(map(str, shape)), "steps": "",
            "precision": "fp32", "seconds": seconds, "peak_gib": peak, "note": note}


def measure(device: torch.device, args: argparse.Namespace) -> list[dict]:
    """Every row of the table on ``device``."""
    plans = [("ddim", steps, precision) for steps in args.steps for precision in args.precisions]
    plans += [(name, steps, "bf16") for name in args.fast_samplers for steps in args.fast_steps]
    rows, per_lesion = [], {}
    for stage, make, config in (("LMNet sampling", lmnet_runner, args.lmnet_config),
                                ("LINet encode+sampling+decode", linet_runner, args.linet_config)):
        run, crop = make(device, config, args.crop)
        run(SamplerSettings(steps=2), None)  # warm-up: cuDNN autotuning, allocator
        for name, steps, precision in plans:
            seconds, peak = timed(lambda: run(SamplerSettings(name, steps), PRECISIONS[precision]), device)
            per_lesion.setdefault((name, steps, precision), []).append((seconds, peak))
            rows.append({"stage": stage, "sampler": name, "size": "x".join(map(str, crop)), "steps": steps,
                         "precision": precision, "seconds": seconds, "peak_gib": peak})
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for (name, steps, precision), measured in per_lesion.items():
        rows.append({"stage": "end to end (LMNet + LINet)", "sampler": name, "size": "", "steps": steps,
                     "precision": precision, "seconds": sum(seconds for seconds, _ in measured),
                     "peak_gib": max(peak for _, peak in measured)})
    if not args.skip_vq:
        rows.append(streamed_vq(device, args.vq_config, args.vq_shape, args.vq_memory_gib, args.vq_tile))
    return rows


def print_table(rows: list[dict], device_name: str) -> None:
    print(f"device: {device_name}")
    header = (f"{'stage':<30} {'sampler':<12} {'size':<13} {'steps':>5} {'precision':>9} {'s/lesion':>9} "
              f"{'peak GiB':>9}  note")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['stage']:<30} {row['sampler']:<12} {row['size']:<13} {row['steps']!s:>5} {row['precision']:>9} "
              f"{row['seconds']:>9.2f} {row['peak_gib']:>9.2f}  {row.get('note', '')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, nargs="+", help="DDIM step counts (GPU default 50 200)")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), help="UNet precisions of the DDIM rows")
    parser.add_argument("--fast-samplers", nargs="*", default=FAST_SAMPLERS, choices=list(SAMPLERS),
                        help="samplers measured at --fast-steps in bf16")
    parser.add_argument("--fast-steps", type=int, nargs="+", help="their step counts (GPU default 20 25)")
    parser.add_argument("--lmnet-config")
    parser.add_argument("--linet-config")
    parser.add_argument("--vq-config", help="VQ of the streamed decode row")
    parser.add_argument("--crop", type=int, nargs=3, help="crop of both stages (default: the configs'; CPU 8 16 16)")
    parser.add_argument("--vq-shape", type=int, nargs=3)
    parser.add_argument("--vq-memory-gib", type=float, default=24.0)
    parser.add_argument("--vq-tile", type=int, help="streamed tile edge in latent voxels")
    parser.add_argument("--skip-vq", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print each row as a JSON line")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the defaults of ``--device`` (GPU: release sizes; CPU: demo configs, tiny shapes)."""
    args = build_parser().parse_args(argv)
    for key, value in (CPU_DEFAULTS if args.device == "cpu" else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU on this machine; nothing measured (run it on a GPU machine, or "
              "--device cpu to check the measuring path).")
        return 0
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        device, name = torch.device("cpu"), f"CPU ({torch.get_num_threads()} threads)"
    rows = measure(device, args)
    print_table(rows, name)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
