"""Per-lesion sampling time of LMNet and LINet, batched versus one by one (lesions of the UNet alone, and the
boxes of one case end to end), best of K (``--only candidates``: one lesion with K = 1, K candidates one by one
and K in one batch), peak memory of tiled versus untiled VQ decoding, and where the time of one
``synthesize.py`` run goes (``--only phases``, see ``bench/phases.py``).

    .venv/bin/python bench/sample.py [--sampler ddim] [--steps 10 50] [--device cpu|cuda] [--threads 2] [--batch 4]
        [--candidates 4]
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


def settings(case: dict):
    """The sampler settings of a case: its sampler (default DDIM, eta 1) and step count."""
    from ldm.models.diffusion.samplers import SamplerSettings

    return SamplerSettings(case.get("sampler", "ddim"), case["steps"])


def bench_lmnet(config: str, sampling, device, fast_conv: bool) -> dict:
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
    model.sample(cond, context, sampling, generator=torch.Generator().manual_seed(0))
    synchronise(device)
    return {"crop": crop, "seconds_per_lesion": round(time.perf_counter() - start, 3)}


def bench_linet(config: str, sampling, device, fast_conv: bool) -> dict:
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
    sample = model.sample(latent, mask, context, sampling, generator=torch.Generator().manual_seed(0))
    model.decode(sample)
    synchronise(device)
    return {"crop": crop, "seconds_per_lesion": round(time.perf_counter() - start, 3)}


def bench_batching(stage: str, config: str, sampling, batch: int, device, repeats: int = 2) -> dict:
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
        alone = torch.cat([model.sample(*[x[i:i + 1] for x in inputs], context[i:i + 1], sampling,
                                        generator=generators()[i]) for i in range(batch)])
        synchronise(device)
        times["one_by_one"].append(time.perf_counter() - start)
        start = time.perf_counter()
        together = model.sample(*inputs, context, sampling, generator=generators())
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


def bench_boxes(lmnet_config: str, linet_config: str, sampling, batch: int, device, repeats: int = 2) -> dict:
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
        inference.update(steps=sampling.steps, sampler=sampling.name, device=device.type, progress=False,
                         preview=False, overwrite=False,
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


def bench_candidates(lmnet_config: str, linet_config: str, sampling, candidates: int, device,
                     repeats: int = 2) -> dict:
    """One case with one box through LMNet then LINet with K = 1, K = ``candidates`` one by one (batch_size 1) and
    in one batch (batch_size K), interleaved, judged by the quality gate's checks (default tolerances); per stage
    the minimum of ``repeats`` seconds per lesion and the kept draw of each setting."""
    import tempfile

    from inference.batching import run_cases
    from inference.cases import CaseSpec
    from inference.linet import inpaint_case
    from inference.lmnet import sample_case
    from inference.options import parse_options
    from quality.candidates import lesion_judge

    settings = {"k1": (1, 1), "one_by_one": (candidates, 1), "batched": (candidates, candidates)}
    stages = {}
    for stage, config, process in (("lmnet", lmnet_config, sample_case), ("linet", linet_config, inpaint_case)):
        model, inference = build(config, device, drop_checkpoints=False)
        inference.update(steps=sampling.steps, sampler=sampling.name, device=device.type, progress=False,
                         preview=False, overwrite=True, min_fill=0.0)
        stages[stage] = (model, parse_options(inference, stage), process)
    crop = [max(sizes) for sizes in zip(*(options.crop_size for _, options, _ in stages.values()))]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = write_box_case(folder, crop, 1)
        for stage, (model, options, process) in stages.items():
            options = options.with_overrides(exp_dir=folder)
            case = CaseSpec(0, "candidates", dict(paths), folder / stage)
            times, kept = {name: [] for name in settings}, {}
            for _ in range(repeats):
                for name, (count, batch) in settings.items():
                    sized = options.with_overrides(candidates=count, batch_size=batch)
                    judge = lesion_judge(sized) if count > 1 else None
                    synchronise(device)
                    result = run_cases(lambda unet, spec: process(unet, spec, sized, judge=judge), model, [case],
                                       sized, stage)[0]
                    if not result.ok:
                        raise RuntimeError(result.error)
                    times[name].append(result.seconds)
                    kept[name] = next((r["draw"] for r in result.lesions[0].candidates if r["kept"]), 0)
                    if name == "k1" and stage == "lmnet":
                        paths["label"] = result.outputs["mask"]
            results[stage] = {"crop": list(options.crop_size), "candidates": candidates, "kept_draw": kept,
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
        result = bench_lmnet(case["config"], settings(case), device, case["fast_conv"])
    elif kind == "linet":
        result = bench_linet(case["config"], settings(case), device, case["fast_conv"])
    elif kind == "batching":
        result = bench_batching(case["stage"], case["config"], settings(case), case["batch"], device)
    elif kind == "boxes":
        result = bench_boxes(case["lmnet_config"], case["linet_config"], settings(case), case["batch"], device)
    elif kind == "candidates":
        result = bench_candidates(case["lmnet_config"], case["linet_config"], settings(case), case["candidates"],
                                  device)
    elif kind == "phases":
        from phases import bench_phases  # bench/ is on the path: this script runs from it

        result = bench_phases(case["lmnet_config"], case["linet_config"], settings(case), device)
    else:
        result = bench_vq_decode(case["config"], case["size"], case["mode"], case["tile"], case["overlap"], device)
    return {**case, "device": device_name, "threads": threads, **result}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", default="ddim", help="sampler of every case (see docs/samplers.md)")
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
    parser.add_argument("--fast-conv", choices=["both", "on", "off"], default="both",
                        help="lmnet/linet cases with fast_conv off and on (both), or one of them")
    parser.add_argument("--batch", type=int, default=4, help="lesions per UNet batch in the batching comparison")
    parser.add_argument("--candidates", type=int, default=4, help="K of the best-of-K comparison")
    parser.add_argument("--only", choices=["lmnet", "linet", "vq", "batching", "boxes", "candidates", "phases"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), args.device, args.threads)))
        return
    switches = {"both": (False, True), "on": (True,), "off": (False,)}[args.fast_conv]
    cases = [{"kind": kind, "config": config, "sampler": args.sampler, "steps": steps, "fast_conv": fast}
             for kind, config in (("lmnet", args.lmnet_config), ("linet", args.linet_config))
             for steps in args.steps for fast in switches]
    cases += [{"kind": "vq", "config": args.vq_config, "size": args.vq_size, "mode": mode, "tile": args.vq_tile[0],
               "overlap": args.vq_tile[1]} for mode in args.vq_modes]
    cases += [{"kind": "batching", "stage": stage, "config": config, "sampler": args.sampler, "steps": args.steps[0],
               "batch": args.batch}
              for stage, config in (("lmnet", args.lmnet_config), ("linet", args.linet_config))]
    cases += [{"kind": kind, "lmnet_config": args.lmnet_config, "linet_config": args.linet_config,
               "sampler": args.sampler, "steps": args.steps[0], "batch": args.batch} for kind in ("boxes", "phases")]
    cases.append({"kind": "candidates", "lmnet_config": args.lmnet_config, "linet_config": args.linet_config,
                  "sampler": args.sampler, "steps": args.steps[0], "candidates": args.candidates})
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
