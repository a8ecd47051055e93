"""Prepare CTs for lesion synthesis: standardise, segment organs, write a structured report, place lesion boxes.

    python pipeline/preprocess.py filelist exp_name attributes [options]

``filelist``: one CT path per line; ``exp_name``: output folder; ``attributes``: one JSON object per line with
at least ``"organ type"`` and ``"lesion type"``. Writes ``exp_name/{img,seg,type,bbox}_list.txt`` (aligned, in
input order, successful cases only), a folder per case and ``exp_name/preprocess_report.json``. Exit code 1
when any case failed (each named in the summary), 0 otherwise. Paths on the command line resolve against the
current directory. Under ``torchrun`` or ``srun`` every process takes its share of the CTs and rank 0 writes the
lists and the report (docs/inference.md, 'Several processes and nodes').
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.cli import HelpFormatter, add_version, examples, run_command
from ldm.errors import ConfigError
from ldm.fileio import check_output_folder
from ldm.util import resolve_path

if TYPE_CHECKING:
    from ldm.distributed import Launch

DEFAULT_SPACING_MM = 1.0
# The test configs whose crops bound the reports and whose training spacing is the default --spacing.
RELEASE_TEST_CONFIGS = ("configs/diffusion/maskdiffusion_test.yaml", "configs/diffusion/lesiondiffusion_test.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=examples("python pipeline/preprocess.py cts.txt exp attributes.txt --seg-list segs.txt --seg-version v2",
                        "python pipeline/preprocess.py cts.txt exp attributes.txt --boxes-per-case 3 --workers 4"))
    parser.add_argument("filelist", help="text file, one CT (.nii/.nii.gz) per line")
    parser.add_argument("exp_name", help="output folder (created)")
    parser.add_argument("attributes", help='text file, one JSON object per CT, e.g. {"organ type": "liver", "lesion type": "cyst"}')
    seg = parser.add_argument_group("organ segmentation")
    seg.add_argument("--seg-list", help="use these organ segmentations (one per CT) instead of running TotalSegmentator")
    seg.add_argument("--seg-version", choices=("v1", "v2"), default="v1",
                     help="label numbering of --seg-list files: TotalSegmentator 1.x (v1) or 2.x (v2, converted to v1)")
    seg.add_argument("--seg-fast", action="store_true", help="TotalSegmentator's 3 mm 'fast' model")
    seg.add_argument("--seg-device", default="auto", help="TotalSegmentator device: auto, cpu, gpu, gpu:N, mps")
    seg.add_argument("--seg-workers", type=int, default=1, help="TotalSegmentator runs at the same time")
    report = parser.add_argument_group("structured report")
    report.add_argument("--reporter", choices=("llm", "offline"),
                        help="default: llm when the API key variable or --llm-base-url is set, else offline")
    report.add_argument("--llm-base-url", help="OpenAI-compatible base URL such as http://127.0.0.1:8000/v1; OpenAI's when not given")
    report.add_argument("--llm-model", default="gpt-4o-mini", help="model name on that endpoint")
    report.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    report.add_argument("--llm-retries", type=int, default=2, help="extra attempts after an invalid reply")
    report.add_argument("--llm-temperature", type=float, default=0.7)
    report.add_argument("--llm-max-tokens", type=int, default=2048)
    report.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--spacing", type=float, nargs="+",
                        help="target voxel size in mm: one value, or three (x y z of the LPS grid); default: the "
                             "--configs' inference.training_spacing_mm (1 mm for the released models). Inference "
                             "works in voxels: another spacing changes the physical size of the lesions (warned)")
    parser.add_argument("--configs", nargs=2, metavar=("LMNET_TEST.yaml", "LINET_TEST.yaml"),
                        default=list(RELEASE_TEST_CONFIGS),
                        help="the test configs the cases are prepared for: their training spacing and crops")
    parser.add_argument("--max-lesion-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="largest lesion (voxels of the standardised grid) a report may ask for; default: what "
                             "the --configs' crops hold at --spacing with their blend rim")
    parser.add_argument("--boxes-per-case", type=int, default=1,
                        help="lesion boxes per CT (inference uses at most its max_mask_num, 3 in the release configs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reports and the box positions")
    parser.add_argument("--workers", type=int, default=1, help="cases processed in parallel (threads)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def make_reporter(args: argparse.Namespace):
    """The reporter the flags ask for (see ``--reporter``)."""
    from preprocessing.report_llm import LLMReporter
    from preprocessing.report_offline import OfflineReporter

    api_key = os.environ.get(args.llm_api_key_env) or None
    name = args.reporter or ("llm" if api_key or args.llm_base_url else "offline")
    if name == "offline":
        return OfflineReporter()
    if not api_key and not args.llm_base_url:
        raise ConfigError(f"--reporter llm needs an API key in ${args.llm_api_key_env} or the --llm-base-url of a "
                          "local server; or use --reporter offline")
    if args.llm_retries < 0:
        raise ConfigError("--llm-retries must be 0 or more")
    return LLMReporter(args.llm_base_url, args.llm_model, api_key, args.llm_retries, args.llm_temperature,
                       args.llm_max_tokens, args.llm_timeout)


def _options(args: argparse.Namespace):
    from inference.options import parse_options
    from inference.preflight import capacity_xyz
    from inference.spacing import command_spacing
    from ldm.cli import find_config
    from ldm.util import load_config
    from preprocessing.case import PreprocessOptions
    from preprocessing.standardise import as_spacing_xyz

    for flag, value, minimum in (("--boxes-per-case", args.boxes_per_case, 1), ("--workers", args.workers, 1),
                                 ("--seg-workers", args.seg_workers, 1)):
        if value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum}, got {value}")
    stages = [parse_options(load_config([find_config(path)]).get("inference"), stage)
              for path, stage in zip(args.configs, ("lmnet", "linet"))]
    spacing_xyz = as_spacing_xyz(command_spacing(args.spacing, stages, DEFAULT_SPACING_MM))
    lmnet, linet = stages
    bound = tuple(args.max_lesion_size) if args.max_lesion_size else capacity_xyz(
        spacing_xyz, lmnet.crop_size, linet.crop_size, linet.rim_mm)
    if min(bound) < 1:
        raise ConfigError(f"--max-lesion-size must be positive, got {list(bound)}")
    return PreprocessOptions(spacing_xyz=spacing_xyz, max_lesion_size_xyz=bound, seg_version=args.seg_version,
                             seg_fast=args.seg_fast, seg_device=args.seg_device, boxes_per_case=args.boxes_per_case,
                             seed=args.seed, overwrite=args.overwrite, debug=args.debug)


def _print_summary(results, exp_dir: Path, debug: bool) -> None:
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    print(f"preprocess: {len(results)} case(s): {counts['done']} done, {counts['skipped']} skipped, "
          f"{counts['failed']} failed -> {exp_dir} ({counts['done'] + counts['skipped']} row(s) in each list)")
    for result in results:
        for warning in result.warnings:
            print(f"warning: case {result.case_id}: {warning}")
        if result.status == "failed":
            if debug and result.traceback:
                print(result.traceback, file=sys.stderr)
            print(f"FAILED case {result.case_id} ({result.inputs['ct']}): {result.error}", file=sys.stderr)


def process_seg_device(seg_device: str, launch: Launch) -> str:
    """TotalSegmentator's device in this process: under torchrun/srun ``auto`` is the GPU of the local rank (or
    the only visible one), so the processes of a node do not all segment on GPU 0."""
    import torch

    if not launch.distributed or seg_device != "auto" or not torch.cuda.is_available():
        return seg_device
    return f"gpu:{launch.local_rank if torch.cuda.device_count() > 1 else 0}"


def run(args: argparse.Namespace) -> int:
    """Run the command for parsed arguments; returns the exit code."""
    from preprocessing.cases import preprocess
    from preprocessing.inputs import read_cases
    from preprocessing.segment import ready_to_segment
    from ldm.distributed import detect_launch

    options = _options(args)
    cwd = Path.cwd()
    exp_dir = check_output_folder(resolve_path(args.exp_name, cwd), "exp_name")
    seg_list = resolve_path(args.seg_list, cwd) if args.seg_list else None
    cases = read_cases(resolve_path(args.filelist, cwd), resolve_path(args.attributes, cwd), seg_list)
    reporter = make_reporter(args)
    if seg_list is None:
        ready_to_segment(options.seg_device, options.seg_task, options.seg_fast)
    launch = detect_launch()
    options = replace(options, seg_device=process_seg_device(options.seg_device, launch))
    results = preprocess(cases, exp_dir, options, reporter, args.workers, args.seg_workers,
                         not args.no_progress and launch.local_rank == 0, launch)
    if launch.is_main:  # the other ranks' results are in rank 0's summary
        _print_summary(results, exp_dir, args.debug)
    return 1 if any(result.status == "failed" for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (our warnings and errors are printed as one line each)."""
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
