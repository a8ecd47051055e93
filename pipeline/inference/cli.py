"""Command line of ``test.py``: parse, merge the configs, run, print the summary, return the exit status."""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from ldm.cli import add_version, examples, find_config, one_line_warnings, parse_gpus, split_overrides
from ldm.errors import LesionDiffusionError
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.util import load_config, parse_overrides
from inference.results import summary_lines

# Flags that set an ``inference.*`` key (flag destination -> key).
FLAG_KEYS = {"exp": "exp_dir", "seed": "seed", "steps": "steps", "eta": "eta",
             "guidance_scale": "guidance_scale", "sampler": "sampler", "precision": "precision",
             "vq_device": "vq_device", "max_mask_num": "max_mask_num", "candidates": "candidates",
             "resample_failed": "resample_failed"}

EPILOG = examples(
    "python pipeline/test.py --base configs/diffusion/maskdiffusion_test.yaml --exp exp",
    "python pipeline/test.py --base configs/demo/linet_test.yaml --exp demo/exp --sampler dpmpp_2m --steps 20 "
    "--candidates 4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="test.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="LesionDiffusion inference: LMNet lesion masks (maskdiffusion_test.yaml) or LINet inpainting "
                    "(lesiondiffusion_test.yaml) for every case of an experiment folder. Extra key.sub=value "
                    "arguments override the configs. Config paths resolve against pipeline/ when relative and not "
                    "found from the current directory.")
    parser.add_argument("-b", "--base", nargs="+", required=True, metavar="CONFIG.yaml",
                        help="test configs, merged left to right")
    parser.add_argument("--exp", help="experiment folder written by preprocess.py (inference.exp_dir)")
    parser.add_argument("--gpus", help="GPU ids, one process each, e.g. 0,2 (default: inference.device, auto)")
    parser.add_argument("-s", "--seed", type=int, help="base seed (inference.seed, default 23)")
    parser.add_argument("--steps", type=int, help="sampling steps (inference.steps)")
    parser.add_argument("--eta", type=float, help="DDIM eta (inference.eta)")
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float,
                        help="classifier-free guidance scale (inference.guidance_scale; 1 = none)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="inference.sampler (see docs/samplers.md)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="UNet autocast on CUDA")
    parser.add_argument("--vq-device", dest="vq_device", choices=("same", "neighbour", "cpu"),
                        help="where LINet runs the VQ (inference.vq_device)")
    parser.add_argument("--max-mask-num", dest="max_mask_num", type=int,
                        help="lesions per case (inference.max_mask_num)")
    parser.add_argument("--candidates", type=int, metavar="K",
                        help="samples per lesion, the best-agreeing kept (inference.candidates, default 1)")
    parser.add_argument("--resample-failed", dest="resample_failed", type=int, metavar="R",
                        help="further rounds for a lesion that fails its checks (inference.resample_failed, default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite <stem>_0 instead of adding a new <stem>_k")
    parser.add_argument("--no-preview", action="store_true", help="no PNG previews")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read checkpoints with full unpickling (may run code from the file; trust_checkpoint)")
    parser.add_argument("-d", "--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def command_overrides(args: argparse.Namespace) -> list[str]:
    """``inference.*`` overrides for the flags that were given."""
    overrides = [f"inference.{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
                 if getattr(args, flag) is not None]
    for flag, key, value in (("overwrite", "overwrite", True), ("no_preview", "preview", False),
                             ("no_progress", "progress", False)):
        if getattr(args, flag):
            overrides.append(f"inference.{key}={str(value).lower()}")
    if args.trust_checkpoint:
        overrides.append("trust_checkpoint=true")
    return overrides


def main(argv: list[str] | None = None, after_stage=None, judge=None) -> int:
    """Entry point of ``test.py`` (which passes the quality gate as ``after_stage`` and its judge of candidates as
    ``judge``, see :func:`inference.runner.run_inference`); returns 0 when every case succeeded, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments, overrides = split_overrides(argv)
    args = build_parser().parse_args(arguments)
    with one_line_warnings():
        return run(args, overrides, after_stage, judge)


def run(args: argparse.Namespace, overrides: list[str], after_stage=None, judge=None) -> int:
    """Run the parsed command line; returns the exit status."""
    from inference.runner import run_inference
    from ldm.data import read_cache

    try:
        config = load_config([find_config(path) for path in args.base])
        config = OmegaConf.merge(config, parse_overrides(command_overrides(args) + overrides))
        with read_cache.enabled():  # preflight, the stage and the quality gate read the same files
            outcome = run_inference(config, gpus=parse_gpus(args.gpus), debug=args.debug, after_stage=after_stage,
                                    judge=judge)
    except LesionDiffusionError as error:
        if args.debug:
            raise
        print(f"test.py: error: {error}", file=sys.stderr)
        return 1
    if not outcome.main:  # ranks > 0 of torchrun/srun: rank 0 prints the merged summary
        return 1 if outcome.failed else 0
    for line in summary_lines(outcome.results, outcome.stage):
        print(line)
    for dropped in outcome.dropped:
        print(f"quality gate: {dropped.case_id}: {dropped.output.name} moved to {dropped.moved_to} "
              f"({'; '.join(dropped.reasons)})")
    if outcome.label_list is not None:
        print(f"masks listed for LINet in {outcome.label_list}")
    print(f"run report: {outcome.report_path}")
    for result in outcome.failed:
        if result.traceback:  # unexpected errors always, expected ones with --debug
            print(result.traceback, file=sys.stderr)
    if outcome.failed:
        names = ", ".join(result.case_id for result in outcome.failed)
        print(f"test.py: {len(outcome.failed)} case(s) failed: {names}", file=sys.stderr)
        return 1
    return 0
