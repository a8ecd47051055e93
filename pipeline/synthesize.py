"""One command from healthy CTs to CTs with lesions: preprocess -> LMNet masks -> LINet inpainting.

    python pipeline/synthesize.py --ct CT.nii.gz [CT2.nii.gz ...] --organ liver --lesion cyst --out DIR \
        [--attributes '{"density": "hypodense lesion"}'] [--seg SEG.nii.gz ...] [--seg-version v2] \
        [--lmnet-config configs/demo/lmnet_test.yaml --linet-config configs/demo/linet_test.yaml] \
        [--seed N] [--reporter offline|llm] [--steps N] [--gpus 0,1]

Writes ``DIR/<case>/inpainting_0.nii.gz`` (the CT with the lesions, on the input's standardised grid) with a
PNG preview beside it, plus everything ``preprocess.py`` and ``test.py`` write, and prints a table of what was
written. The same from Python: :func:`synthesize`. Paths on the command line resolve against the current directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ldm.cli import find_config, one_line_warnings, parse_gpus
from ldm.errors import ConfigError, LesionDiffusionError
from ldm.fileio import write_text_atomic
from ldm.util import load_config, resolve_path
from inference.required_files import check_config_files

DEFAULT_LMNET_CONFIG = "configs/diffusion/maskdiffusion_test.yaml"
DEFAULT_LINET_CONFIG = "configs/diffusion/lesiondiffusion_test.yaml"


@dataclass
class SynthesisRow:
    """One input CT: where it ended (``stage`` of the failure, or ``done``), why, and the files written."""

    ct: str
    case_id: str | None = None
    stage: str = "done"
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stage == "done"


def _write_inputs(out: Path, cts: Sequence[Path], attributes: Mapping[str, str], segs: Sequence[Path] | None) -> dict:
    """The three input lists of ``preprocess.py`` under ``out/inputs``; returns their paths."""
    inputs = out / "inputs"
    lists = {"filelist": inputs / "ct_list.txt", "attributes": inputs / "attributes.txt"}
    write_text_atomic(lists["filelist"], "".join(f"{ct}\n" for ct in cts))
    write_text_atomic(lists["attributes"], "".join(json.dumps(dict(attributes)) + "\n" for _ in cts))
    if segs:
        lists["seg_list"] = inputs / "seg_list.txt"
        write_text_atomic(lists["seg_list"], "".join(f"{seg}\n" for seg in segs))
    return lists


def _run_preprocess(out: Path, lists: dict, seg_version: str, seed: int, reporter: str, spacing: Sequence[float],
                    boxes_per_case: int, llm_base_url: str | None, llm_model: str | None, overwrite: bool,
                    progress: bool) -> list[dict]:
    """Run ``preprocess.py`` on the lists; returns its per-case records (input order)."""
    import preprocess

    argv = [str(lists["filelist"]), str(out), str(lists["attributes"]), "--seed", str(seed), "--reporter", reporter,
            "--boxes-per-case", str(boxes_per_case), "--spacing", *[str(s) for s in spacing]]
    if "seg_list" in lists:
        argv += ["--seg-list", str(lists["seg_list"]), "--seg-version", seg_version]
    if llm_base_url:
        argv += ["--llm-base-url", llm_base_url]
    if llm_model:
        argv += ["--llm-model", llm_model]
    argv += ["--overwrite"] if overwrite else []
    argv += [] if progress else ["--no-progress"]
    preprocess.run(preprocess.build_parser().parse_args(argv))
    return json.loads((out / "preprocess_report.json").read_text())["cases"]


def _run_stage(config_file: str, out: Path, seed: int, steps: int | None, gpus: Sequence[int],
               overrides: Sequence[str], overwrite: bool):
    """Run one inference stage (the test config's) on the experiment folder ``out``; returns its outcome."""
    from inference.runner import run_inference

    stage_overrides = [f"inference.exp_dir={out}", f"inference.seed={seed}", f"inference.overwrite={overwrite}"]
    if steps is not None:
        stage_overrides.append(f"inference.ddim_steps={steps}")
    config = load_config([config_file], [*stage_overrides, *overrides])
    return run_inference(config, gpus=gpus)


def synthesize(
    cts: Sequence[str | Path],
    organ: str,
    lesion: str,
    out: str | Path,
    attributes: Mapping[str, str] | None = None,
    segs: Sequence[str | Path] | None = None,
    seg_version: str = "v1",
    lmnet_config: str | Path = DEFAULT_LMNET_CONFIG,
    linet_config: str | Path = DEFAULT_LINET_CONFIG,
    seed: int = 0,
    reporter: str = "offline",
    spacing: Sequence[float] = (1.0,),
    boxes_per_case: int = 1,
    steps: int | None = None,
    gpus: Sequence[int] = (),
    overrides: Sequence[str] = (),
    llm_base_url: str | None = None,
    llm_model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[SynthesisRow]:
    """Synthesise ``lesion`` lesions in ``organ`` of every CT; returns one row per CT, in input order.

    ``attributes`` fixes report attributes (e.g. ``{"density": "hypodense lesion"}``); ``segs`` gives organ
    segmentations instead of running TotalSegmentator; ``overrides`` (``inference.key=value``) apply to both
    stages. A CT that fails at any stage is reported in its row; the others go on.
    """
    out = Path(resolve_path(out, Path.cwd()))
    cts = [Path(resolve_path(ct, Path.cwd())) for ct in cts]
    if not cts:
        raise ConfigError("no CT given: pass at least one --ct")
    if segs and len(segs) != len(cts):
        raise ConfigError(f"{len(cts)} CT(s) but {len(segs)} segmentation(s): give one --seg per --ct")
    segs = [Path(resolve_path(seg, Path.cwd())) for seg in segs] if segs else None
    configs = find_config(lmnet_config), find_config(linet_config)
    check_config_files(configs, overrides)
    wanted = {"organ type": organ, "lesion type": lesion, **dict(attributes or {})}
    lists = _write_inputs(out, cts, wanted, segs)
    records = _run_preprocess(out, lists, seg_version, seed, reporter, spacing, boxes_per_case, llm_base_url,
                              llm_model, overwrite, progress)
    rows = [SynthesisRow(ct=str(ct)) for ct in cts]
    by_case = {}
    for row, record in zip(rows, records):
        row.case_id = record["case_id"]
        if record["status"] == "failed":
            row.stage, row.error = "preprocess", record["error"]
        else:
            by_case[row.case_id] = row
    if not by_case:
        return rows
    for stage, config_file in zip(("lmnet", "linet"), configs):
        outcome = _run_stage(config_file, out, seed, steps, gpus, overrides, overwrite)
        for result in outcome.results:
            row = by_case.get(result.case_id)
            if row is None or not row.ok:
                continue
            if result.ok:
                row.outputs.update({f"{stage}_{kind}": path for kind, path in result.outputs.items()})
            else:
                row.stage, row.error = stage, result.error
    return rows


def table(rows: Sequence[SynthesisRow]) -> list[str]:
    """A plain-text table of the rows: input, case, and the written CT or the failure."""
    lines = []
    for row in rows:
        if row.ok:
            written = row.outputs.get("linet_image", "")
            lines.append(f"  {Path(row.ct).name} -> {row.case_id}: {written}")
            lines.extend(f"      {kind}: {path}" for kind, path in sorted(row.outputs.items()) if path != written)
        else:
            lines.append(f"  {Path(row.ct).name} -> {row.case_id or '-'}: FAILED in {row.stage}: {row.error}")
    failed = sum(not row.ok for row in rows)
    lines.append(f"synthesize: {len(rows)} CT(s), {len(rows) - failed} done, {failed} failed")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ct", nargs="+", required=True, help="healthy CT(s), NIfTI in HU")
    parser.add_argument("--organ", required=True, help="organ name of pipeline/organ_type.json, e.g. liver")
    parser.add_argument("--lesion", required=True, help="lesion type, e.g. cyst, tumor, stone")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--attributes", default="{}", help="JSON object of report attributes to fix")
    parser.add_argument("--seg", nargs="+", help="organ segmentation(s), one per CT, instead of TotalSegmentator")
    parser.add_argument("--seg-version", choices=("v1", "v2"), default="v1", help="TotalSegmentator numbering of --seg")
    parser.add_argument("--lmnet-config", default=DEFAULT_LMNET_CONFIG, help="LMNet test config")
    parser.add_argument("--linet-config", default=DEFAULT_LINET_CONFIG, help="LINet test config")
    parser.add_argument("--seed", type=int, default=0, help="seed of the report, the boxes and the sampling")
    parser.add_argument("--reporter", choices=("offline", "llm"), default="offline", help="who writes the report")
    parser.add_argument("--llm-base-url", help="OpenAI-compatible base URL for --reporter llm")
    parser.add_argument("--llm-model", help="model name for --reporter llm")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.0], help="standardised voxel size (mm)")
    parser.add_argument("--boxes-per-case", type=int, default=1, help="lesions per CT")
    parser.add_argument("--steps", type=int, help="DDIM steps of both stages (default: the configs')")
    parser.add_argument("--gpus", help="GPU ids, one process each, e.g. 0,1")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for both test configs, e.g. inference.guidance_scale=2")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read checkpoints with full unpickling (may run code from the file)")
    parser.add_argument("--overwrite", action="store_true", help="redo work already done in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 when every CT got its lesions, 1 otherwise."""
    args = build_parser().parse_args(argv)
    with one_line_warnings():
        try:
            attributes = json.loads(args.attributes)
            if not isinstance(attributes, dict):
                raise ConfigError(f"--attributes {args.attributes!r}: expected a JSON object")
            rows = synthesize(args.ct, args.organ, args.lesion, args.out, attributes, args.seg, args.seg_version,
                              args.lmnet_config, args.linet_config, args.seed, args.reporter, args.spacing,
                              args.boxes_per_case, args.steps, parse_gpus(args.gpus),
                              args.overrides + ["trust_checkpoint=true"] * args.trust_checkpoint,
                              args.llm_base_url, args.llm_model, args.overwrite, not args.no_progress)
        except json.JSONDecodeError as error:
            print(f"synthesize.py: error: --attributes is not valid JSON ({error})", file=sys.stderr)
            return 1
        except LesionDiffusionError as error:
            if args.debug:
                raise
            print(f"synthesize.py: error: {error}", file=sys.stderr)
            return 1
    print("\n".join(table(rows)))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
