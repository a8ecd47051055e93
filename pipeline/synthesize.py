"""One command from healthy CTs to CTs with lesions: preprocess -> LMNet masks -> LINet inpainting.

    python pipeline/synthesize.py --ct CT.nii.gz [CT2.nii.gz ...] --organ liver --lesion cyst --out DIR \
        [--attributes '{"density": "hypodense lesion"}'] [--seg SEG.nii.gz ...] [--seg-version v2] \
        [--lmnet-config configs/demo/lmnet_test.yaml --linet-config configs/demo/linet_test.yaml] \
        [--lmnet-ckpt PATH] [--linet-ckpt PATH] [--set [lmnet.|linet.]KEY=VALUE ...] [--spacing MM] \
        [--seed N] [--reporter offline|llm] [--sampler NAME] [--steps N] [--gpus 0,1] \
        [--candidates K] [--resample-failed R] [--no-gate]

Writes ``DIR/<case>/inpainting_0.nii.gz`` (the CT with the lesions, on the grid of the CT given: same shape,
affine, data type and scaling, unchanged beyond a thin rim around the lesions) and ``inpainting_0_label.nii.gz``
(0 background, 1 organ, 2 lesion, same grid), a PNG preview, plus everything ``preprocess.py`` and ``test.py``
write, and prints a table of what was written with each lesion's warnings. Before any model runs, the weights of
both configs are opened and matched with their models, the reports are bounded by what the crops hold, and every
case is checked (files, crop fit, box inside the organ, room for the rim). The quality gate runs after LINet unless
``--no-gate``: a lesion that fails its checks is sampled again (``--resample-failed``, 2 rounds by default), and a
CT whose lesion still fails is reported as failed, naming what disagrees, its files kept in
``DIR/<case>/rejected/`` (docs/quality.md, "Best of K and resampling"). An identical rerun without
``--overwrite`` reuses the results (``DIR/synthesize.json``, which also records each checkpoint's sha256).
The same from Python: :func:`synthesize`. Paths on the command line resolve against the current directory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ldm.cli import HelpFormatter, add_version, examples, find_config, parse_gpus, run_command
from ldm.errors import ConfigError, DataError, MissingWeightsError
from ldm.fileio import check_output_folder, write_json_atomic, write_text_atomic
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.util import load_config, resolve_path
from inference.required_files import check_required_files
from inference.weights import weight_records

DEFAULT_LMNET_CONFIG = "configs/diffusion/maskdiffusion_test.yaml"
DEFAULT_LINET_CONFIG = "configs/diffusion/lesiondiffusion_test.yaml"
RUN_RECORD = "synthesize.json"
STAGES = ("lmnet", "linet")
# Further rounds for a lesion that fails its checks, by default: each costs one more sampling of that lesion only
# (with K candidates, K samples), and at a pass rate p per sample the chance of still failing falls to (1-p)^3.
DEFAULT_RESAMPLE_FAILED = 2


@dataclass
class SynthesisRow:
    """One input CT: where it ended (``stage`` of the failure, or ``done``; ``quality gate`` when a lesion failed
    the gate: its files were moved to ``rejected/``), why, the files written, and per judged lesion its stage,
    rank, samples, rounds and what still disagrees."""

    ct: str
    case_id: str | None = None
    stage: str = "done"
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lesions: list[dict] = field(default_factory=list)

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


def _run_preprocess(out: Path, lists: dict, seg_version: str, seed: int, reporter: str,
                    spacing: Sequence[float] | None, boxes_per_case: int, llm_base_url: str | None,
                    llm_model: str | None, overwrite: bool, progress: bool, max_lesion_size: Sequence[int],
                    config_files: Sequence[str]) -> list[dict]:
    """Run ``preprocess.py`` on the lists (``spacing`` None: the configs' training spacing); returns its per-case
    records (input order)."""
    import preprocess

    argv = [str(lists["filelist"]), str(out), str(lists["attributes"]), "--seed", str(seed), "--reporter", reporter,
            "--boxes-per-case", str(boxes_per_case), "--configs", *config_files,
            "--max-lesion-size", *[str(s) for s in max_lesion_size]]
    argv += ["--spacing", *[str(s) for s in spacing]] if spacing is not None else []
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


def stage_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """The ``--set`` overrides of each stage: ``lmnet.KEY=V`` / ``linet.KEY=V`` for that stage only (as
    ``KEY=V``), any other ``KEY=V`` for both."""
    per_stage = {stage: [] for stage in STAGES}
    for item in overrides:
        head, _, rest = item.partition(".")
        for stage in per_stage:
            if head not in STAGES:
                per_stage[stage].append(item)
            elif head == stage and rest:
                per_stage[stage].append(rest)
    return per_stage


def _stage_config(config_file: str, out: Path, seed: int, steps: int | None, overrides: Sequence[str],
                  overwrite: bool, progress: bool, checkpoint: str | Path | None = None,
                  judging: Sequence[str] = (), sampler: str | None = None):
    """The merged test config of one stage, pointed at the experiment folder ``out`` (and at ``checkpoint``
    when given); ``judging``: the overrides of best of K, resampling and the gate."""
    settings = [f"inference.exp_dir={out}", f"inference.seed={seed}", f"inference.overwrite={overwrite}",
                *judging]
    if steps is not None:
        settings.append(f"inference.steps={steps}")
    if sampler is not None:
        settings.append(f"inference.sampler={sampler}")
    if not progress:
        settings.append("inference.progress=false")
    config = load_config([config_file], [*settings, *overrides])
    if checkpoint is not None:
        config.model.params.ckpt_path = resolve_path(checkpoint, Path.cwd())
    return config


def _stage_options(configs: Sequence, config_files: Sequence[str]) -> list:
    """The checked ``inference:`` options of the LMNet and LINet configs. Before anything runs, every checkpoint
    is opened and matched with its model: MissingWeightsError naming the stage and the config otherwise."""
    from inference.options import parse_options
    from inference.runner import check_weights, config_stage
    from inference.weights import verify_weights

    options = []
    for config, config_file, expected in zip(configs, config_files, STAGES):
        stage = config_stage(config)
        if stage != expected:
            raise ConfigError(f"the --{expected}-config is a {stage} config")
        try:
            check_weights(config)
        except MissingWeightsError as error:
            raise MissingWeightsError(f"{stage} ({config_file}): {error}") from None
        verify_weights(config, stage, config_file)
        options.append(parse_options(config.get("inference"), stage))
    return options


def _check_request(organ: str, wanted: Mapping[str, str]) -> None:
    """The organ and attributes asked for, checked before anything is written; the error names the flag."""
    from ldm.data.organs import organ_id
    from preprocessing.user_attributes import interpret_attributes

    try:
        organ_id(organ)
    except DataError as error:
        raise ConfigError(f"--organ: {error}") from None
    interpret_attributes(dict(wanted), "--attributes")


def _fingerprint(settings: dict, config_files: Sequence[str], out: Path, case_ids: Sequence[str]) -> str:
    """Hash of the settings, the config files and every case's preprocessing fingerprint (input bytes included)."""
    content = {"settings": settings, "configs": [Path(path).read_text() for path in config_files], "cases": []}
    for case_id in case_ids:
        record = out / case_id / "preprocess.json"
        content["cases"].append(json.loads(record.read_text()).get("fingerprint") if record.is_file() else None)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(out: Path, fingerprint: str) -> list[SynthesisRow] | None:
    """The rows of an identical earlier run whose outputs all still exist, else None."""
    try:
        record = json.loads((out / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    rows = [SynthesisRow(**row) for row in record.get("rows", [])]
    if not rows or not all(Path(path).is_file() for row in rows for path in row.outputs.values()):
        return None
    return rows


def _preflight_rows(out: Path, options: Sequence, by_case: dict[str, SynthesisRow]) -> None:
    """Check every preprocessed case against both stages before LMNet runs; a case with a problem fails in
    ``preflight``, naming each problem."""
    from inference.cases import read_cases
    from inference.preflight import case_problems

    lmnet, linet = options
    for case in read_cases(out, dict(lmnet.lists)):
        row = by_case.get(case.case_id)
        problems = case_problems(case, lmnet, [(linet.crop_size, linet.rim_mm)])
        if row is not None and problems:
            row.stage, row.error = "preflight", "; ".join(problems)
            del by_case[case.case_id]


def _run_stages(configs: Sequence, gpus: Sequence[int], by_case: dict[str, SynthesisRow]) -> None:
    """LMNet then LINet with the quality gate; each case's row gets its outputs, warnings or failure."""
    from inference.runner import run_inference
    from quality.candidates import lesion_judge
    from quality.gate import gate_stage

    for stage, config in zip(STAGES, configs):
        outcome = run_inference(config, gpus=gpus, after_stage=gate_stage, judge=lesion_judge)
        for result in outcome.results:
            row = by_case.get(result.case_id)
            if row is None or not row.ok:
                continue
            row.warnings.extend(f"{stage}: {warning}" for warning in result.warnings)
            row.lesions.extend(_lesion_entry(stage, lesion) for lesion in result.lesions
                               if lesion.candidates or lesion.disagree)
            if result.ok:
                row.outputs.update({f"{stage}_{kind}": path for kind, path in result.outputs.items()})
            else:
                row.stage, row.error = stage, result.error
        for dropped in outcome.dropped:
            row = by_case.get(dropped.case_id)
            if row is not None and row.ok:
                row.stage = "quality gate"
                row.error = f"{'; '.join(dropped.reasons)}; files kept in {dropped.moved_to.parent}"


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
    spacing: Sequence[float] | None = None,
    boxes_per_case: int = 1,
    steps: int | None = None,
    gpus: Sequence[int] = (),
    overrides: Sequence[str] = (),
    llm_base_url: str | None = None,
    llm_model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    lmnet_ckpt: str | Path | None = None,
    linet_ckpt: str | Path | None = None,
    candidates: int = 1,
    resample_failed: int | None = None,
    gate: bool = True,
    sampler: str | None = None,
) -> list[SynthesisRow]:
    """Synthesise ``lesion`` lesions in ``organ`` of every CT; returns one row per CT, in input order.

    ``attributes`` fixes report attributes (e.g. ``{"density": "hypodense lesion"}``); ``segs`` gives organ
    segmentations instead of running TotalSegmentator; ``overrides`` (``inference.key=value``) apply to both
    stages, ``lmnet.KEY=V`` / ``linet.KEY=V`` to one; ``lmnet_ckpt`` / ``linet_ckpt`` replace a stage's checkpoint;
    ``spacing`` (mm) defaults to the configs' ``inference.training_spacing_mm``. ``candidates``: samples per
    lesion, the best-agreeing kept; ``resample_failed``: further rounds for a lesion that fails its checks (default
    :data:`DEFAULT_RESAMPLE_FAILED` with the gate, 0 without); ``gate``: the quality gate after LINet (a CT with a
    failed lesion fails in stage ``quality gate``, its files kept in ``<case>/rejected/``). A CT that fails at any
    stage is reported in its row; the others go on. ``sampler`` and ``steps`` (default: the configs') are
    those of both stages.
    """
    out = check_output_folder(resolve_path(out, Path.cwd()), "--out")
    cts = [Path(resolve_path(ct, Path.cwd())) for ct in cts]
    if not cts:
        raise ConfigError("no CT given: pass at least one --ct")
    if segs and len(segs) != len(cts):
        raise ConfigError(f"{len(cts)} CT(s) but {len(segs)} segmentation(s): give one --seg per --ct")
    segs = [Path(resolve_path(seg, Path.cwd())) for seg in segs] if segs else None
    from inference.preflight import capacity_xyz
    from inference.spacing import command_spacing
    from ldm.data import read_cache
    from preprocessing.standardise import as_spacing_xyz

    wanted = {"organ type": organ, "lesion type": lesion, **dict(attributes or {})}
    _check_request(organ, wanted)
    config_files = find_config(lmnet_config), find_config(linet_config)
    per_stage = stage_overrides(overrides)
    if resample_failed is None:
        resample_failed = DEFAULT_RESAMPLE_FAILED if gate else 0
    judging = [f"inference.candidates={candidates}", f"inference.resample_failed={resample_failed}"]
    configs = [_stage_config(path, out, seed, steps, per_stage[stage], overwrite, progress, checkpoint,
                             judging + [f"inference.quality_gate={str(gate).lower()}"] * (stage == "linet"), sampler)
               for path, stage, checkpoint in zip(config_files, STAGES, (lmnet_ckpt, linet_ckpt))]
    check_required_files(*configs)
    options = _stage_options(configs, config_files)
    given_spacing, spacing = spacing, command_spacing(spacing, options, warn=False)
    # preprocess.py resamples to that spacing and warns once when it is off the training spacing: the stages'
    # own check of the same thing would only repeat it.
    for config in configs:
        config.inference.training_spacing_mm = None
    weights = {stage: weight_records(config) for stage, config in zip(STAGES, configs)}
    bound = capacity_xyz(as_spacing_xyz(spacing), options[0].crop_size, options[1].crop_size, options[1].rim_mm)
    lists = _write_inputs(out, cts, wanted, segs)
    records = _run_preprocess(out, lists, seg_version, seed, reporter, given_spacing, boxes_per_case, llm_base_url,
                              llm_model, overwrite, progress, bound, config_files)
    settings = {"cts": [str(ct) for ct in cts], "segs": [str(seg) for seg in segs or []], "wanted": wanted,
                "seg_version": seg_version, "seed": seed, "reporter": reporter, "spacing": list(spacing),
                "boxes": boxes_per_case, "steps": steps, "overrides": list(overrides), "llm": [llm_base_url, llm_model],
                "weights": weights, "candidates": candidates, "resample_failed": resample_failed, "gate": gate}
    if sampler is not None:  # absent when not given, so the runs made before this option stay reusable
        settings["sampler"] = sampler
    fingerprint = _fingerprint(settings, config_files, out, [record["case_id"] for record in records])
    reused = None if overwrite else _reusable(out, fingerprint)
    if reused is not None:
        return reused
    rows = [SynthesisRow(ct=str(ct)) for ct in cts]
    by_case = {}
    for row, record in zip(rows, records):
        row.case_id = record["case_id"]
        if record["status"] == "failed":
            row.stage, row.error = "preprocess", record["error"]
        else:
            by_case[row.case_id] = row
    with read_cache.enabled():  # preflight, both stages and the quality gate read the same files
        if by_case:
            _preflight_rows(out, options, by_case)
        _run_stages(configs if by_case else (), gpus, by_case)
    write_json_atomic(out / RUN_RECORD, {"fingerprint": fingerprint, "weights": weights,
                                         "rows": [asdict(row) for row in rows]}, indent=1)
    return rows


def _lesion_entry(stage: str, lesion) -> dict:
    """What the table shows of one judged lesion (``inference.results.LesionResult``)."""
    return {"stage": stage, "rank": lesion.rank, "samples": len(lesion.candidates) or 1, "tries": lesion.tries,
            "seed": lesion.seed, "disagree": list(lesion.disagree)}


def _lesion_lines(row: SynthesisRow) -> list[str]:
    lines = []
    for entry in row.lesions:
        what = "box" if entry["stage"] == "lmnet" else "lesion"
        disagree = f"disagree: {', '.join(entry['disagree'])}" if entry["disagree"] else "agrees"
        lines.append(f"      {entry['stage']} {what} {entry['rank']}: {entry['tries']} round(s), "
                     f"{entry['samples']} sample(s), {disagree}")
    return lines


def table(rows: Sequence[SynthesisRow]) -> list[str]:
    """A plain-text table of the rows: input, case, the written CT or the failure, and per judged lesion its
    rounds and what still disagrees."""
    lines = []
    for row in rows:
        if row.ok:
            written = row.outputs.get("linet_image", "")
            lines.append(f"  {Path(row.ct).name} -> {row.case_id}: {written}")
            lines.extend(f"      {kind}: {path}" for kind, path in sorted(row.outputs.items()) if path != written)
            lines.extend(f"      warning: {warning}" for warning in row.warnings)
        else:
            lines.append(f"  {Path(row.ct).name} -> {row.case_id or '-'}: FAILED in {row.stage}: {row.error}")
            if row.stage == "quality gate":
                lines.extend(f"      {kind}: {path}" for kind, path in sorted(row.outputs.items())
                             if "rejected" in kind)
        lines.extend(_lesion_lines(row))
    failed = sum(not row.ok for row in rows)
    lines.append(f"synthesize: {len(rows)} CT(s), {len(rows) - failed} done, {failed} failed")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=examples("python pipeline/synthesize.py --ct CT.nii.gz --organ liver --lesion cyst --out out",
                        "python pipeline/synthesize.py --ct CT.nii.gz --seg SEG.nii.gz --seg-version v2 --organ liver "
                        "--lesion tumor --out out --steps 50 --gpus 0,1"))
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
    parser.add_argument("--lmnet-ckpt", help="LMNet checkpoint (.ckpt or .safetensors) instead of the config's")
    parser.add_argument("--linet-ckpt", help="LINet checkpoint (.ckpt or .safetensors) instead of the config's")
    parser.add_argument("--spacing", type=float, nargs="+",
                        help="standardised voxel size (mm; default: the configs' inference.training_spacing_mm, "
                             "else 1)")
    parser.add_argument("--boxes-per-case", type=int, default=1, help="lesions per CT")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS),
                        help="sampler of both stages (default: the configs'; see docs/samplers.md)")
    parser.add_argument("--steps", type=int, help="sampling steps of both stages (default: the configs')")
    parser.add_argument("--gpus", help="GPU ids, one process each, e.g. 0,1")
    parser.add_argument("--candidates", type=int, default=1, metavar="K",
                        help="samples per lesion; the one agreeing with the most requested attributes is kept")
    parser.add_argument("--resample-failed", type=int, metavar="R",
                        help=f"further rounds for a lesion that fails its checks (default {DEFAULT_RESAMPLE_FAILED}; "
                             "0 with --no-gate)")
    parser.add_argument("--no-gate", action="store_true",
                        help="skip the quality gate: lesions that disagree with their report count as done")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for both test configs, e.g. inference.guidance_scale=2; lmnet.KEY=V or "
                             "linet.KEY=V for one, e.g. linet.inference.rim_mm=3")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read checkpoints with full unpickling (may run code from the file)")
    parser.add_argument("--overwrite", action="store_true", help="redo work already done in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 when every CT got its lesions, 1 otherwise."""
    return run_command(run, build_parser().parse_args(argv), "synthesize.py")


def run(args: argparse.Namespace) -> int:
    """Synthesise for parsed arguments and print the table; returns the exit status."""
    try:
        attributes = json.loads(args.attributes)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--attributes is not valid JSON ({error})") from None
    if not isinstance(attributes, dict):
        raise ConfigError(f"--attributes {args.attributes!r}: expected a JSON object")
    rows = synthesize(args.ct, args.organ, args.lesion, args.out, attributes=attributes, segs=args.seg,
                      seg_version=args.seg_version, lmnet_config=args.lmnet_config, linet_config=args.linet_config,
                      seed=args.seed, reporter=args.reporter, spacing=args.spacing,
                      boxes_per_case=args.boxes_per_case, steps=args.steps, gpus=parse_gpus(args.gpus),
                      overrides=args.overrides + ["trust_checkpoint=true"] * args.trust_checkpoint,
                      llm_base_url=args.llm_base_url, llm_model=args.llm_model, overwrite=args.overwrite,
                      progress=not args.no_progress, lmnet_ckpt=args.lmnet_ckpt, linet_ckpt=args.linet_ckpt,
                      candidates=args.candidates, resample_failed=args.resample_failed, gate=not args.no_gate,
                      sampler=args.sampler)
    print("\n".join(table(rows)))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
