"""Convergence of every sampler against a 1000-step deterministic DDIM (eta 0) reference from the same noise.

    .venv/bin/python bench/samplers.py [--steps 10 20 50 200] [--reference-steps 1000] [--crop 16 32 32]
        [--weights demo|random|gaussian] [--threads 2]

For LMNet (the final mask logits) and LINet (the final latent, inpainting blend ``clean`` on, error inside the
mask) and each sampler and step count: the relative RMS error ``||x - x_ref|| / ||x_ref||`` and the largest
absolute error against the reference, which every run starts from the same initial noise (seeded) and the same
conditioning. Deterministic samplers (DDIM eta 0, dpmpp_2m, unipc) converge to the reference; the stochastic ones
(DDIM eta 1, ddpm, dpmpp_2m_sde) draw fresh noise at every step, so their error measures the spread of the samples
rather than a discretisation error. ``--weights demo`` loads ``demo/checkpoints`` (``make demo``; the conditioning is
a phantom-like organ with a box and a fixed report), ``random`` gives the demo architectures random weights in
their zero-initialised layers (untrained: its noise predictions are not those of any data, so its numbers check
that the path runs and say nothing about convergence), ``gaussian`` replaces both models by the exact denoiser of
Gaussian data (mean 0.3, std 0.6 per voxel; LINet's known latent and mask as with the models): the solvers'
discretisation error alone. Prints one JSON line per row, then a table.
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

from ldm.models.diffusion.samplers import SAMPLERS, SamplerSettings  # noqa: E402

CONFIGS = {"lmnet": "configs/demo/lmnet_test.yaml", "linet": "configs/demo/linet_test.yaml"}
TEXT = {"lmnet": {"lesion location": "liver", "shape": "round-like,", "cavity": "within the parenchymal organ,"},
        "linet": {"lesion location": "liver", "density": "low density lesion,", "CT value": "10 HU,"}}
# (sampler, eta) rows: DDIM deterministic and as the original (eta 1), then the others.
CANDIDATES = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0), ("dpmpp_2m", 1.0), ("dpmpp_2m_sde", 1.0), ("unipc", 1.0)]


def load_model(stage: str, weights: str):
    """The demo model of ``stage``: trained (``demo/checkpoints``) or with random weights in its zero-initialised
    layers. Raises SystemExit with what to run when the trained checkpoint is missing."""
    from ldm.modules.ema import LitEma
    from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

    config = load_config([PIPELINE_DIR / CONFIGS[stage]])
    if weights == "random":
        config.model.params.ckpt_path = None
    elif not Path(config.model.params.ckpt_path).is_file():
        raise SystemExit(f"bench/samplers.py: {config.model.params.ckpt_path} not found: run `make demo` first, "
                         "or pass --weights random")
    model = instantiate_from_config(config.model, key_path="model").eval()
    if weights == "random":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.model.parameters():
                if parameter.ndim > 1 and parameter.abs().max() == 0:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        model.model_ema = LitEma(model.model)
    return model


def stage_inputs(stage: str, model, crop: list[int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The conditioning of one lesion: an organ block with a box (LMNet) or a latent with a central mask (LINet)."""
    context = model.encode_context([TEXT[stage]])
    if stage == "lmnet":
        cond = torch.zeros(1, 3, *crop)
        cond[:, 0] = 5 / 104
        cond[:, 1, 2:-2, 4:-4, 4:-4] = 1
        cond[:, 2, crop[0] // 4: -crop[0] // 4, crop[1] // 4: -crop[1] // 4, crop[2] // 4: -crop[2] // 4] = 1
        return [cond], context
    image = 0.45 + 0.05 * torch.rand(1, 1, *crop, generator=torch.Generator().manual_seed(0))
    latent = model.encode(image)
    mask = torch.zeros(1, 1, *latent.shape[2:])
    quarter = [size // 4 for size in latent.shape[2:]]
    mask[..., quarter[0]:-quarter[0], quarter[1]:-quarter[1], quarter[2]:-quarter[2]] = 1
    return [latent, mask], context


class GaussianData:
    """Stands in for a model: the exact noise prediction for data ~ N(mean, std^2) per voxel, sampled through
    :func:`sample_loop` with the same schedule, latent shape and inpainting blend as the demo models."""

    def __init__(self, stage: str, mean: float = 0.3, std: float = 0.6):
        from ldm.modules.diffusionmodules.util import make_beta_schedule

        self.stage, self.mean, self.std = stage, mean, std
        self.alphas_cumprod = torch.from_numpy((1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195)).cumprod(0))

    def encode_context(self, texts):
        return None

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return torch.randn(1, 4, *[size // 2 for size in image.shape[2:]], generator=torch.Generator().manual_seed(0))

    def sample(self, *inputs, sampling: SamplerSettings, generator: torch.Generator) -> torch.Tensor:
        from ldm.models.diffusion.samplers import make_sampler, sample_loop

        def denoise(x, t):
            alpha = self.alphas_cumprod[t.cpu()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            return (1 - alpha).sqrt() * (x - alpha.sqrt() * self.mean) / (alpha * self.std**2 + 1 - alpha)

        known, mask = (None, None) if self.stage == "lmnet" else inputs
        shape = (1, 1, *inputs[0].shape[2:]) if self.stage == "lmnet" else tuple(known.shape)
        return sample_loop(make_sampler(sampling, self.alphas_cumprod), denoise, shape, sampling.steps, generator,
                           known=known, mask=mask)


def run(model, inputs, context, sampling: SamplerSettings) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    if isinstance(model, GaussianData):
        sample = model.sample(*inputs, sampling=sampling, generator=torch.Generator().manual_seed(7))
    else:
        sample = model.sample(*inputs, context, sampling, generator=torch.Generator().manual_seed(7))
    return sample, time.perf_counter() - start


def errors(sample: torch.Tensor, reference: torch.Tensor, region: torch.Tensor | None) -> dict:
    difference = sample - reference
    if region is not None:
        difference, reference = difference[region], reference[region]
    return {"relative_rms": round(float(difference.norm() / reference.norm()), 5),
            "max_abs": round(float(difference.abs().max()), 5)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 200])
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--crop", type=int, nargs=3, default=[16, 32, 32], help="image crop of both stages")
    parser.add_argument("--weights", choices=("demo", "random", "gaussian"), default="demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for stage in args.stages:
        model = GaussianData(stage) if args.weights == "gaussian" else load_model(stage, args.weights)
        inputs, context = stage_inputs(stage, model, args.crop)
        region = (inputs[1] > 0).expand_as(inputs[0]) if stage == "linet" else None
        reference, seconds = run(model, inputs, context, SamplerSettings("ddim", args.reference_steps, eta=0.0))
        print(json.dumps({"stage": stage, "sampler": "reference ddim eta 0", "steps": args.reference_steps,
                          "seconds": round(seconds, 2)}), flush=True)
        plans = [(name, eta, steps) for name, eta in CANDIDATES for steps in args.steps]
        plans.insert(0, ("ddim", 0.0, 100))
        for name, eta, steps in plans:
            sample, seconds = run(model, inputs, context, SamplerSettings(name, steps, eta=eta))
            row = {"stage": stage, "weights": args.weights, "sampler": name, "eta": eta if name == "ddim" else None,
                   "steps": steps, "spacing": SamplerSettings(name).resolved_spacing,
                   **errors(sample, reference, region), "seconds": round(seconds, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'stage':<6} {'sampler':<16} {'steps':>5} {'rel. RMS':>9} {'max abs':>8} {'seconds':>8}")
    for row in rows:
        label = row["sampler"] + (f" eta {row['eta']:g}" if row["eta"] is not None else "")
        print(f"{row['stage']:<6} {label:<16} {row['steps']:>5} {row['relative_rms']:>9.4f} {row['max_abs']:>8.4f} "
              f"{row['seconds']:>8.2f}")


if __name__ == "__main__":
    main()
