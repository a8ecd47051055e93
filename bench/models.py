"""Speed and memory of the networks on this machine, before/after the speed switches; one JSON object per line.

    .venv/bin/python bench/models.py [--only unet|vq|attention] [--names linet_release ...] [--threads 1]
        [--device cpu|cuda] [--repeats 2] [--rounds 2]

UNet and VQ cases run with the switches off ("before": today's code path) and on ("after": ``fast_conv``), in
alternating subprocesses (``--rounds`` times each, interleaved so that load from other jobs hits both alike); the
summary line per case gives the minimum time and peak memory of each and their ratios. Each phase (``infer``:
no-grad forward / VQ round trip; ``train``: forward + backward; ``train_ckpt``: the same with ``use_checkpoint``)
is a separate subprocess so that its peak memory (max RSS on the CPU, max allocated on CUDA) is its own. Small
inputs on the CPU: release-size sampling needs a GPU (see docs/speed.md and bench/gpu.py).
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

UNETS = {
    "lmnet_release": dict(in_channels=4, out_channels=1, model_channels=16, attention_resolutions=[4],
                          num_res_blocks=1, channel_mult=[1, 2, 4], num_head_channels=32),
    "linet_release": dict(in_channels=5, out_channels=5, model_channels=128, attention_resolutions=[4],
                          num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=32),
    "lmnet_tiny": dict(in_channels=4, out_channels=1, model_channels=16, attention_resolutions=[2],
                       num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8),
    "linet_tiny": dict(in_channels=5, out_channels=5, model_channels=32, attention_resolutions=[2],
                       num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16),
}
VQS = {
    "vq_release": dict(ch=96, ch_mult=[1, 1, 1], num_res_blocks=1, n_embed=2048),
    "vq_tiny": dict(ch=16, ch_mult=[1, 1], num_res_blocks=1, n_embed=256),
}
SMALL, LARGER = [16, 32, 32], [32, 64, 64]
CASES = (
    [("unet", name, size) for name in UNETS for size in ([SMALL] if "release" in name else [SMALL, LARGER])]
    + [("vq", name, size) for name in VQS for size in ([[32, 32, 32]] if "release" in name else [[32, 32, 32], [64, 64, 64]])]
    + [("attention", kind, tokens) for tokens in (4096, 23104) for kind in ("sdpa", "plain")]
)
PHASES = ("infer", "train", "train_ckpt")


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function, device, repeats: int) -> float:
    import torch

    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench_unet(name: str, size: list[int], device, repeats: int, phase: str, fast: bool) -> dict:
    import torch

    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.util import count_params

    spec = UNETS[name]
    torch.manual_seed(0)
    model = UNetModel(image_size=size, dims=3, use_spatial_transformer=True, context_dim=512, fast_conv=fast,
                      use_checkpoint=phase == "train_ckpt", **spec).to(device)
    x = torch.randn(1, spec["in_channels"], *size, device=device)
    t = torch.tensor([500], device=device)
    context = torch.randn(1, 9, 512, device=device)
    return {"params": count_params(model), "seconds": round(run_phase(model, lambda: model(x, t, context=context),
                                                                        device, repeats, phase), 4)}


def bench_vq(name: str, size: list[int], device, repeats: int, phase: str, fast: bool) -> dict:
    import torch

    from ldm.models.autoencoder import VQModelInterface
    from ldm.util import count_params

    spec = VQS[name]
    ddconfig = dict(dims=3, double_z=False, z_channels=4, resolution=size, in_channels=1, out_ch=1, ch=spec["ch"],
                    ch_mult=spec["ch_mult"], num_res_blocks=spec["num_res_blocks"], attn_resolutions=[],
                    attn_type="none", dropout=0.0, sample_depth=[0], use_checkpoint=phase == "train_ckpt")
    torch.manual_seed(0)
    model = VQModelInterface(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, n_embed=spec["n_embed"],
                             embed_dim=4, fast_conv=fast).to(device)
    x = torch.rand(1, 1, *size, device=device)
    return {"params": count_params(model), "seconds": round(run_phase(model, lambda: model.decode(model.encode(x)),
                                                                        device, repeats, phase), 4)}


def run_phase(model, forward, device, repeats: int, phase: str) -> float:
    """Best time of ``forward`` without autograd (``infer``) or of forward + backward of a mean-square loss."""
    import torch

    if phase == "infer":
        with torch.no_grad():
            return timed(forward, device, repeats)

    def train_step():
        model.zero_grad(set_to_none=True)
        forward().square().mean().backward()

    return timed(train_step, device, repeats)


def bench_attention(kind: str, tokens: int, device, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    heads = 16 if tokens == 4096 else 2  # LINet's 16 x 32 at 16^3 tokens, LMNet's 2 x 32 at 16 x 38 x 38
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, 32, generator=generator).to(device) for _ in range(3))

    def plain():
        scores = torch.softmax(q @ k.transpose(-1, -2) * 32**-0.5, dim=-1)
        return scores @ v

    function = (lambda: F.scaled_dot_product_attention(q, k, v)) if kind == "sdpa" else plain
    with torch.no_grad():
        return {"heads": heads, "seconds": round(timed(function, device, repeats), 4)}


def run_case(case: list, device_name: str, threads: int, repeats: int) -> dict:
    import torch

    kind, name, size = case[:3]
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    baseline = peak_memory_mib(device)
    if kind == "attention":
        result = bench_attention(name, size, device, repeats)
    else:
        result = {"unet": bench_unet, "vq": bench_vq}[kind](name, size, device, repeats, case[3], case[4])
    return {**result, "peak_extra_mib": round(peak_memory_mib(device) - baseline, 1)}


def measure(case: list, args) -> dict:
    command = [sys.executable, __file__, "--case", json.dumps(case), "--device", args.device,
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        return {"error": (finished.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def compare(case: tuple, args) -> dict:
    """Switches off versus on, interleaved ``args.rounds`` times; minimum time and peak memory of each."""
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, fast in (("before", False), ("after", True)):
            runs[label].append(measure([*case, fast], args))
    summary = {"kind": case[0], "name": case[1], "size": case[2], "phase": case[3], "device": args.device,
               "threads": args.threads}
    for label, results in runs.items():
        good = [result for result in results if "error" not in result]
        if not good:
            return {**summary, "error": results[0]["error"]}
        summary[f"{label}_s"] = min(result["seconds"] for result in good)
        summary[f"{label}_mib"] = min(result["peak_extra_mib"] for result in good)
    summary["time_ratio"] = round(summary["after_s"] / summary["before_s"], 3)
    summary["memory_ratio"] = round(summary["after_mib"] / max(summary["before_mib"], 1e-9), 3)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["unet", "vq", "attention"])
    parser.add_argument("--names", nargs="+", help="only these networks (e.g. linet_release vq_tiny)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved before/after subprocess pairs")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), args.device, args.threads, args.repeats)))
        return
    for case in CASES:
        if (args.only and case[0] != args.only) or (args.names and case[1] not in args.names):
            continue
        if case[0] == "attention":
            print(json.dumps({"kind": case[0], "name": case[1], "tokens": case[2], **measure(list(case), args)}),
                  flush=True)
            continue
        for phase in args.phases:
            print(json.dumps(compare((*case, phase), args)), flush=True)


if __name__ == "__main__":
    main()
