"""Per-lesion sampling time of LMNet and LINet, batched versus one by one (lesions of the UNet alone, and the
boxes of one case end to end), and peak memory of tiled versus untiled VQ decoding.

    .venv/bin/python bench/sample.py [--steps 10 50] [--device cpu|cuda] [--threads 2] [--batch 4]
        [--lmnet-config configs/demo/lmnet_test.yaml --linet-config configs/demo/linet_test.yaml]
        [--vq-config configs/demo/vq.yaml] [--vq-size 256]

Prints one JSON object per measurement. Every case runs in its own subprocess, so the peak memory (max RSS on
the CPU, max allocated on CUDA) is that case's alone. Models are built from the configs; their checkpoints are
loaded when present, else the weights stay random (timing and memory do not depend on the weights). LMNet and
LINet run with ``fast_conv`` off ("before", today's convolutions) and on ("after"), one right after the other;
the VQ decode compares ``whole`` (one pass), ``streamed`` and ``overlapping`` (the former exact tiling).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))


def peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(config_path: str, device, drop_checkpoints: bool):
    """The model of a config (checkpoints dropped when their files are absent) and the config's inference block."""
    from omegaconf import OmegaConf

    from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

    config = load_config([PIPELINE_DIR / config_path])
    params = config.model.params
    for block in (params, params.get("first_stage_config", {}).get("params", {})):
        if block and block.get("ckpt_path") and (drop_checkpoints or not Path(block.ckpt_path).is_file()):
            block.ckpt_path = None
    model = instantiate_from_config(config.model, key_path="model").to(device).eval()
    return model, OmegaConf.to_container(config.get("inference", {}) or {}, resolve=True)


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_lmnet(config: str, steps: int, device, fast_conv: bool) -> dict:
    import torch

    from ldm.modules.diffusionmodules.util import set_fast_conv

    model, inference = build(config, device, drop_checkpoints=False)
    set_fast_conv(model, fast_conv)
    crop = inference.get("crop_size", [64, 152, 152])
    cond = torch.zeros(1, 3, *crop, device=device)
    cond[:, 1, 2:-2, 4:-4, 4:-4] = 1
    cond[:, 2, crop[0] // 4: -crop[0] // 4, crop[1] // 4: -crop[1] // 4, crop[2] // 4: -crop[2] // 4] = 1
    context = model.encode_context([{"lesion location": "liver", "shape": "round-like,",
                                     "cavity": "within the parenchymal organ,"}])
    synchronise(device)
    start = time.perf_counter()
    model.sample(cond, context, steps=steps, generator=torch.Generator().manual_seed(0))
    synchronise(device)
    return {"crop": crop, "seconds_per_lesion": round(time.perf_counter() - start, 3)}


def bench_linet(config: str, steps: int, device, fast_conv: bool) -> dict:
    import torch

    from ldm.modules.diffusionmodules.util import set_fast_conv

    model, inference = build(config, device, drop_checkpoints=False)
    set_fast_conv(model, fast_conv)
    crop = inference.get("crop_size", [128, 128, 128])
    image = torch.rand(1, 1, *crop, generator=torch.Generator().manual_seed(0)).to(device)
    label = torch.zeros(1, *crop, dtype=torch.long, device=device)
    label[:, crop[0] // 3: -crop[0] // 3, crop[1] // 3: -crop[1] // 3, crop[2] // 3: -crop[2] // 3] = 2
    context = model.encode_context([{"lesion location": "liver", "density": "hypodense lesion,", "CT value": "10 HU,"}])
    synchronise(device)
    start = time.perf_counter()
    latent = model.encode(image)
    mask = model.latent_mask(label, latent.shape)
    sample = model.sample(latent, mask, context, steps=steps, generator=torch.Generator().manual_seed(0))
    model.decode(sample)
    synchronise(device)
    return {"crop": crop, "seconds_per_lesion": round(time.perf_counter() - start, 3)}


def bench_batching(stage: str, config: str, steps: int, batch: int, device, repeats: int = 2) -> dict:
    """UNet sampling of ``batch`` lesions one by one and as one batch (per-lesion generators), interleaved; the
    minimum of ``repeats`` per lesion, and the largest difference between the two results."""
    import torch

    model, inference = build(config, device, drop_checkpoints=False)
    crop = inference.get("crop_size", [64, 152, 152] if stage == "lmnet" else [128, 128, 128])
    shape = crop if stage == "lmnet" else [size // model.first_stage_model.downsample_factor for size in crop]
    inputs = [torch.rand(batch, 3, *shape).round().to(device)] if stage == "lmnet" else \
        [torch.randn(batch, model.channels, *shape).to(device), torch.zeros(batch, 1, *shape).to(device)]
    if stage == "linet":
        inputs[1][:, :, shape[0] // 3: -shape[0] // 3, shape[1] // 3: -shape[1] // 3, shape[2] // 3: -shape[2] // 3] = 1
    context = model.encode_context([{"lesion location": "liver", "shape": "round-like,"}] * batch)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in range(batch)]

    times = {"one_by_one": [], "batched": []}
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        alone = torch.cat([model.sample(*[x[i:i + 1] for x in inputs], context[i:i + 1], steps=steps,
                                        generator=generators()[i]) for i in range(batch)])
        synchronise(device)
        times["one_by_one"].append(time.perf_counter() - start)
        start = time.perf_counter()
        together = model.sample(*inputs, context, steps=steps, generator=generators())
        synchronise(device)
        times["batched"].append(time.perf_counter() - start)
    per_lesion = {f"{name}_seconds_per_lesion": round(min(values) / batch, 3) for name, values in times.items()}
    return {"crop": crop, **per_lesion,
            "max_abs_difference": float((alone - together).abs().max())}


def write_box_case(folder: Path, crop, boxes: int) -> dict:
    """A synthetic CT (soft tissue with noise, 1 mm), its segmentation (one liver block), a liver report and a
    box file with ``boxes`` boxes of ``crop / 4`` in a row, each in its own crop (so no box reaches another)."""
    import numpy as np

    from ldm.data.synthetic_geometry import geometry_for
    from ldm.data.volume import write_volume

    shape = (crop[0], crop[1], crop[2] * boxes)
    geometry = geometry_for(shape, (1.0, 1.0, 1.0))
    ct = np.random.default_rng(0).normal(50.0, 20.0, shape).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[2:-2, 2:-2, 2:-2] = 5
    box_file = np.zeros(shape, dtype=np.uint8)
    size = [max(size // 4, 2) for size in crop]
    for index in range(boxes):
        start = [(crop[0] - size[0]) // 2, (crop[1] - size[1]) // 2, index * crop[2] + (crop[2] - size[2]) // 2]
        box_file[tuple(slice(a, a + b - index % 2) for a, b in zip(start, size))] = 2  # distinct sizes
    report = {"lesion location": "5", "shape": "round-like,", "density": "low density lesion,",
              "CT value": "Mean density of the lesion region is approximately 12 HU,",
              "cavity": "within the parenchymal organ,"}
    paths = {"image": write_volume(folder / "ct.nii.gz", ct, geometry),
             "seg": write_volume(folder / "seg.nii.gz", seg, geometry),
             "boxes": write_volume(folder / "boxes.nii.gz", box_file, geometry), "type": folder / "type.json"}
    paths["type"].write_text(json.dumps({"5": ["round-like,", "", report, [[[0, 0, 0]], [size]]]}))
    return {name: str(path) for name, path in paths.items()}


def bench_boxes(lmnet_config: str, linet_config: str, steps: int, batch: int, device, repeats: int = 2) -> dict:
    """A case with ``batch`` boxes through LMNet then LINet (``inference.sample_case`` / ``inpaint_case``), its boxes
    one by one (batch_size 1) and in waves (batch_size ``batch``), interleaved; per stage the minimum of
    ``repeats`` per lesion and whether the outputs agree (LMNet masks equal, LINet largest HU difference)."""
    import tempfile

    import numpy as np

    from ldm.data.volume import read_volume
    from inference.batching import run_cases
    from inference.cases import CaseSpec
    from inference.linet import inpaint_case
    from inference.lmnet import sample_case
    from inference.options import parse_options

    stages = {}
    for stage, config, process in (("lmnet", lmnet_config, sample_case), ("linet", linet_config, inpaint_case)):
        model, inference = build(config, device, drop_checkpoints=False)
        inference.update(ddim_steps=steps, device=device.type, progress=False, preview=False, overwrite=False,
                         min_fill=0.0, max_mask_num=batch, min_component_voxels=1)
        stages[stage] = (model, parse_options(inference, stage), process)
    crop = [max(sizes) for sizes in zip(*(options.crop_size for _, options, _ in stages.values()))]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = write_box_case(folder, crop, batch)
        for stage, (model, options, process) in stages.items():
            case = CaseSpec(0, "boxes", dict(paths), folder / stage)
            times, outputs = {"one_by_one": [], "batched": []}, {}
            for _ in range(repeats):
                for name, size in (("one_by_one", 1), ("batched", batch)):
                    sized = options.with_overrides(batch_size=size)
                    synchronise(device)
                    result = run_cases(lambda unet, spec: process(unet, spec, sized), model, [case], sized, stage)[0]
                    if not result.ok:
                        raise RuntimeError(result.error)
                    times[name].append(result.seconds / len(result.lesions))
                    outputs[name] = result.outputs["mask" if stage == "lmnet" else "image"]
            alone, together = (read_volume(outputs[name])[0] for name in ("one_by_one", "batched"))
            paths["label"] = outputs["one_by_one"]
            agreement = {"masks_equal": bool(np.array_equal(alone, together))} if stage == "lmnet" else \
                {"max_abs_hu_difference": float(np.abs(alone - together).max())}
            results[stage] = {"crop": list(options.crop_size), "lesions": batch, **agreement,
                              **{f"{name}_seconds_per_lesion": round(min(values), 3) for name, values in times.items()}}
    return results


def bench_vq_decode(config: str, size: int, mode: str, tile: int, overlap: int, device) -> dict:
    """Decode a random latent to a ``size``³ image: ``whole`` (one pass), ``streamed`` (layer by layer over tiles of
    ``tile`` latent voxels) or ``overlapping`` (overlapping tiles, GroupNorm statistics measured in extra passes)."""
    import torch
    from omegaconf import OmegaConf

    from ldm.models.autoencoder import VQModelInterface
    from ldm.models.tiling import sliding_window
    from ldm.util import PIPELINE_DIR, load_config

    params = OmegaConf.to_container(load_config([PIPELINE_DIR / config]).model.params, resolve=True)
    vq = VQModelInterface(ddconfig=params["ddconfig"], lossconfig={"target": "torch.nn.Identity"},
                          n_embed=params["n_embed"], embed_dim=params["embed_dim"]).to(device).eval()
    factor = vq.downsample_factor
    latent = torch.randn(1, params["embed_dim"], *([size // factor] * 3), device=device)
    baseline = peak_mib(device)
    synchronise(device)
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "streamed":
            out = vq.decode_streamed(latent, tile=tile)
        elif mode == "overlapping":
            out = sliding_window(lambda part: vq.decode(part), latent, tile, overlap, scale=factor,
                                 sync_norms=vq.decoder)
        else:
            out = vq.decode(latent)
    synchronise(device)
    return {"volume": [size] * 3, "output": list(out.shape), "seconds": round(time.perf_counter() - start, 2),
            "peak_extra_mib": round(peak_mib(device) - baseline, 1)}


def run_case(case: dict, device_name: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    kind = case["kind"]
    if kind == "lmnet":
        result = bench_lmnet(case["config"], case["steps"], device, case["fast_conv"])
    elif kind == "linet":
        result = bench_linet(case["config"], case["steps"], device, case["fast_conv"])
    elif kind == "batching":
        result = bench_batching(case["stage"], case["config"], case["steps"], case["batch"], device)
    elif kind == "boxes":
        result = bench_boxes(case["lmnet_config"], case["linet_config"], case["steps"], case["batch"], device)
    else:
        result = bench_vq_decode(case["config"], case["size"], case["mode"], case["tile"], case["overlap"], device)
    return {**case, "device": device_name, "threads": threads, **result}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lmnet-config", default="configs/demo/lmnet_test.yaml")
    parser.add_argument("--linet-config", default="configs/demo/linet_test.yaml")
    parser.add_argument("--vq-config", default="configs/demo/vq.yaml")
    parser.add_argument("--vq-size", type=int, default=256, help="edge of the decoded cube (voxels)")
    parser.add_argument("--vq-tile", type=int, nargs=2, default=[32, 48], metavar=("TILE", "OVERLAP"),
                        help="latent tile (streamed and overlapping) and overlap (overlapping only)")
    parser.add_argument("--vq-modes", nargs="+", default=["whole", "streamed"],
                        choices=["whole", "streamed", "overlapping"],
                        help="VQ decodes to compare (overlapping: the old extra-pass tiling, ~17x slower)")
    parser.add_argument("--batch", type=int, default=4, help="lesions per UNet batch in the batching comparison")
    parser.add_argument("--only", choices=["lmnet", "linet", "vq", "batching", "boxes"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), args.device, args.threads)))
        return
    cases = [{"kind": kind, "config": config, "steps": steps, "fast_conv": fast}
             for kind, config in (("lmnet", args.lmnet_config), ("linet", args.linet_config))
             for steps in args.steps for fast in (False, True)]
    cases += [{"kind": "vq", "config": args.vq_config, "size": args.vq_size, "mode": mode, "tile": args.vq_tile[0],
               "overlap": args.vq_tile[1]} for mode in args.vq_modes]
    cases += [{"kind": "batching", "stage": stage, "config": config, "steps": args.steps[0], "batch": args.batch}
              for stage, config in (("lmnet", args.lmnet_config), ("linet", args.linet_config))]
    cases.append({"kind": "boxes", "lmnet_config": args.lmnet_config, "linet_config": args.linet_config,
                  "steps": args.steps[0], "batch": args.batch})
    for case in cases:
        if args.only and case["kind"] != args.only:
            continue
        command = [sys.executable, __file__, "--case", json.dumps(case), "--device", args.device,
                   "--threads", str(args.threads)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            print(json.dumps({**case, "error": (finished.stderr.strip().splitlines() or ["killed"])[-1]}), flush=True)
        else:
            print(finished.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
