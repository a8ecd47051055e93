"""Turn a labelled nnU-Net v2 raw dataset (MSD, KiTS, LiTS ...) into LesionDiffusion training lists, with reports
measured from the scans.

    python pipeline/prepare_dataset.py DATASET_DIR OUT --organ liver --lesion-label 2 [--organ-label 1]
        [--seg-dir DIR --seg-version v1|v2] [--reporter offline|llm ...] [--val-fraction 0.2] [--seed 0]
        [--spacing 1] [--workers N]

Per case ``OUT/cases/<case>/{ct,label,seg,coarseg}.nii.gz`` and ``type.json`` (see :mod:`preparation.case`), then
``OUT/{train,val}_{image,label,seg,coarseg,type}_list.txt``, ``OUT/data.yaml`` (LMNet), ``OUT/data_linet.yaml``,
``OUT/data_vq.yaml`` and ``OUT/prepare_report.json`` (see :mod:`preparation.outputs`). A failed case never stops
the others; the summary names each with the reason and the exit code is 1. Paths on the command line resolve
against the current directory; the dataset is only read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.cli import HelpFormatter, add_version, examples, run_command  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402
from ldm.util import resolve_path  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=examples('python pipeline/prepare_dataset.py "$nnUNet_raw/Dataset003_Liver" data/liver --organ liver '
                        "--lesion-label 2 --organ-label 1 --workers 4",
                        "python pipeline/prepare_dataset.py Dataset003_Liver data/liver --organ liver --lesion-label 2 "
                        "--seg-dir segs --seg-version v2"))
    parser.add_argument("dataset_dir", help="nnU-Net v2 raw dataset: dataset.json, imagesTr/, labelsTr/")
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--organ", required=True, help="organ of the lesions, a TotalSegmentator v1 name (liver, pancreas, kidney left ...)")
    parser.add_argument("--lesion-label", type=int, nargs="+", required=True, help="label value(s) of the lesions")
    parser.add_argument("--organ-label", type=int, nargs="+", default=[],
                        help="label value(s) of the organ when the dataset labels it; otherwise the organ comes from the segmentation")
    parser.add_argument("--lesion-type", help="lesion type given to the LLM (default: dataset.json's name of the lesion label)")
    seg = parser.add_argument_group("organ segmentation")
    seg.add_argument("--seg-dir", help="folder of segmentations, <case>.nii.gz each, instead of running TotalSegmentator")
    seg.add_argument("--seg-version", choices=("v1", "v2"), default="v1", help="label numbering of the --seg-dir files")
    seg.add_argument("--seg-fast", action="store_true", help="TotalSegmentator's 3 mm 'fast' model")
    seg.add_argument("--seg-device", default="auto", help="TotalSegmentator device: auto, cpu, gpu, gpu:N, mps")
    seg.add_argument("--seg-workers", type=int, default=1, help="TotalSegmentator runs at the same time")
    report = parser.add_argument_group("structured report")
    report.add_argument("--reporter", choices=("offline", "llm"), default="offline",
                        help="offline: measured phrases only; llm: an LLM fills the attributes the image cannot decide")
    report.add_argument("--llm-base-url", help="OpenAI-compatible base URL such as http://127.0.0.1:8000/v1")
    report.add_argument("--llm-model", default="gpt-4o-mini")
    report.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    report.add_argument("--llm-retries", type=int, default=2, help="extra attempts after an invalid reply")
    report.add_argument("--llm-temperature", type=float, default=0.2)
    report.add_argument("--llm-max-tokens", type=int, default=2048)
    report.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases for validation (split by case)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.0],
                        help="target voxel size in mm: one value, or three (x y z of the LPS grid)")
    parser.add_argument("--workers", type=int, default=1, help="cases processed in parallel (threads)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def make_reporter(args: argparse.Namespace):
    """The measured reporter, or the LLM refinement the flags ask for."""
    from preparation.report import MeasuredReporter, RefiningReporter
    from preprocessing.report_llm import LLMReporter

    if args.reporter == "offline":
        return MeasuredReporter()
    api_key = os.environ.get(args.llm_api_key_env) or None
    if not api_key and not args.llm_base_url:
        raise ConfigError(f"--reporter llm needs an API key in ${args.llm_api_key_env} or the --llm-base-url of a "
                          "local server; or use --reporter offline")
    if args.llm_retries < 0:
        raise ConfigError("--llm-retries must be 0 or more")
    return RefiningReporter(LLMReporter(args.llm_base_url, args.llm_model, api_key, args.llm_retries,
                                        args.llm_temperature, args.llm_max_tokens, args.llm_timeout))


def _check_numbers(args: argparse.Namespace) -> None:
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for flag, value in (("--workers", args.workers), ("--seg-workers", args.seg_workers)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    overlap = set(args.lesion_label) & set(args.organ_label)
    if overlap:
        raise ConfigError(f"label value(s) {sorted(overlap)} given both as --lesion-label and --organ-label")


def _print_summary(results, out_dir: Path, debug: bool) -> None:
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    rows = {split: sum(r.split == split and r.status != "failed" for r in results) for split in ("train", "val")}
    print(f"prepare_dataset: {len(results)} case(s): {counts['done']} done, {counts['skipped']} skipped, "
          f"{counts['failed']} failed -> {out_dir} ({rows['train']} train, {rows['val']} val rows)")
    for result in results:
        if result.status == "failed":
            if debug and result.traceback:
                print(result.traceback, file=sys.stderr)
            print(f"FAILED case {result.case_id}: {result.error}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the command for parsed arguments; returns the exit code."""
    from ldm.data.organs import organ_id
    from preparation.case import PrepareOptions
    from preparation.run import prepare_dataset
    from preparation.source import read_dataset
    from preprocessing.segment import ready_to_segment
    from preprocessing.standardise import as_spacing_xyz

    _check_numbers(args)
    cwd = Path.cwd()
    dataset_dir, out_dir = Path(resolve_path(args.dataset_dir, cwd)), Path(resolve_path(args.out, cwd))
    if out_dir.resolve() == dataset_dir.resolve():
        raise ConfigError(f"OUT {out_dir} is the dataset folder itself; choose another folder (inputs are never written)")
    organ_id(args.organ)
    seg_dir = resolve_path(args.seg_dir, cwd) if args.seg_dir else None
    dataset = read_dataset(dataset_dir, seg_dir)
    dataset.check_labels(args.lesion_label, "--lesion-label")
    dataset.check_labels(args.organ_label, "--organ-label")
    options = PrepareOptions(
        organ=args.organ, lesion_labels=tuple(args.lesion_label), organ_labels=tuple(args.organ_label),
        lesion_type=args.lesion_type or " ".join(dataset.label_names(args.lesion_label)),
        spacing_xyz=as_spacing_xyz(args.spacing), seg_version=args.seg_version, seg_fast=args.seg_fast,
        seg_device=args.seg_device, overwrite=args.overwrite, debug=args.debug)
    reporter = make_reporter(args)
    if seg_dir is None:
        ready_to_segment(options.seg_device, options.seg_task, options.seg_fast)
    results = prepare_dataset(dataset, out_dir, options, reporter, args.val_fraction, args.seed, args.workers,
                              args.seg_workers, not args.no_progress)
    _print_summary(results, out_dir, args.debug)
    return 1 if any(result.status == "failed" for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (errors are printed as one line each)."""
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
