"""Export the inpainted CTs of an experiment folder (and optionally real training cases) as an nnU-Net v2 raw
dataset, ready for ``nnUNetv2_plan_and_preprocess -d <id> --verify_dataset_integrity``.

    python pipeline/export_nnunet.py EXP_DIR OUT_DIR --dataset-id 501 --name SynthLesions \\
        [--labels organ-lesion|lesion] [--only-passed [--failed ignore|drop]] \\
        [--include-real IMAGES_LIST LABELS_LIST [--folds 5 [--group-by REGEX]] [--with-baseline 502]
         [--synthetic-per-real F] [--seed 0]] [--overwrite]

Writes ``OUT_DIR/Dataset501_SynthLesions/{imagesTr,labelsTr,dataset.json}`` (see :mod:`quality.nnunet`); use
``"$nnUNet_raw"`` as OUT_DIR to train on it directly. One case per evaluated output (:mod:`quality.outputs`),
named ``syn_<case>_<k>``: the inpainted CT **on the grid of the CT the user gave** and its label, i.e. the pair
``inpainting_<k>.nii.gz`` + ``inpainting_<k>_label.nii.gz`` LINet wrote (:mod:`inference.source_grid`), remapped
to 1 organ, 2 lesion (or lesion only). An experiment folder without that pair (written before LINet recorded it)
exports the standardised pair the gate measured: the output with its mask ``samples_<k>.nii.gz`` (or label-list
row). Real cases (``real_<folder>_<file>``) come from two aligned lists of CTs and 0/1/2 labels, remapped the same
way.

``--only-passed`` runs the quality gate (:mod:`quality.gate`, tolerances as for ``evaluate.py``; it also writes
``EXP_DIR/quality.csv``). A failed lesion is then, with ``--failed ignore`` (default), covered by the ignore
label over its whole paste region (the lesion and its ``rim_mm`` blend rim, on the exported grid with its own
spacing; passed lesions keep their labels),
so nnU-Net neither learns it as lesion nor as background; its case is dropped instead when every lesion failed,
when the output changed voxels outside the paste regions, or when it could not be evaluated. With
``--failed drop`` any failed lesion drops its case. Every written case is read back and checked (grids, label
values, counts). A case that cannot be exported is named with the reason and the exit status is 1.

Experiments (:mod:`experiments.datasets`): ``--folds K`` writes nnU-Net's ``splits_final.json``, K leak-free folds
over the real cases (:mod:`experiments.splits`; synthetic cases train in every fold except those validating the CT
or patient they were made from), into the dataset folder and, when ``$nnUNet_preprocessed`` is set, where
``nnUNetv2_train`` reads it. ``--with-baseline ID`` also writes the real cases alone as ``Dataset<ID>_<name>Real``
with the same folds; ``--synthetic-per-real F`` caps the synthetic cases at F per real training case (seeded,
balanced over lesion types).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.data.lists import read_aligned_lists  # noqa: E402
from ldm.data.volume import Geometry, read_geometry, read_label, write_volume  # noqa: E402
from ldm.cli import add_version, examples, run_command  # noqa: E402
from ldm.data.components import ranked_components  # noqa: E402
from ldm.errors import ConfigError, DataError, LesionDiffusionError  # noqa: E402
from ldm.fileio import atomic_path, write_json_atomic  # noqa: E402
from experiments.datasets import (BASELINE_SUFFIX, check_options, choose_synthetic, lesion_type,  # noqa: E402
                                  write_baseline)
from experiments.splits import PREPROCESSED_ENV, SPLITS_FILE, SplitCase, place_splits, real_only  # noqa: E402
from inference.cases import recorded_source  # noqa: E402
from inference.source_grid import nearest_on_source_grid  # noqa: E402
from quality import nnunet  # noqa: E402
from quality.gate import display_path, evaluate_outputs  # noqa: E402
from quality.measure import GRID_ATOL_MM, LesionQuality, paste_region  # noqa: E402
from quality.outputs import STANDARDISED_SUFFIX, WHICH, OutputSpec, find_outputs, paste_rim  # noqa: E402
from quality.tables import write_results  # noqa: E402
from quality.tolerances import Tolerances, resolve_tolerances  # noqa: E402

FAILED_MODES = ("ignore", "drop")


@dataclass(frozen=True)
class ExportedCase:
    """One written case: identifier, ``synthetic`` or ``real``, its source file, lesions marked ignore, the CT it
    was made from (``origin``, the user's CT) and the lesion type its report names (synthetic cases)."""

    identifier: str
    kind: str
    source: str
    ignored_lesions: int = 0
    origin: str = ""
    lesion_type: str = ""


@dataclass
class ExportResult:
    """The written dataset: folder, labels declared, cases, what was dropped or failed (source, reason), and with
    the experiment options the folds, where ``splits_final.json`` went, the baseline folder and notes."""

    dataset_dir: Path
    labels: dict[str, int]
    cases: list[ExportedCase] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    folds: list[dict[str, list[str]]] | None = None
    splits_files: list[Path] = field(default_factory=list)
    baseline_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def _same_grid(image_path: Path, label_path: Path, label_geometry: Geometry) -> Geometry:
    """The image's geometry; DataError when the label lies on another grid."""
    image = read_geometry(image_path)
    if image.shape_zyx != label_geometry.shape_zyx or not np.allclose(image.affine, label_geometry.affine,
                                                                     atol=GRID_ATOL_MM):
        raise DataError(f"{label_path}: its grid (shape {label_geometry.shape}) does not match the image "
                        f"{image_path} (shape {image.shape})")
    return image


def copy_image(source: Path, target: Path) -> Path:
    """Write the CT as ``.nii.gz`` (a byte copy when it already is one), atomically; returns ``target``."""
    with atomic_path(target) as temporary:
        if source.name.endswith(nnunet.FILE_ENDING):
            shutil.copyfile(source, temporary)
        else:
            nib.save(nib.load(str(source)), str(temporary))
    return target


def gate_outcome(lesions: list[LesionQuality], failed_mode: str) -> tuple[list[LesionQuality], str, bool]:
    """The verdicts of one output as ``(failed lesions, reason, drop the case)``."""
    failed = [lesion for lesion in lesions if not lesion.passed]
    reason = "; ".join(f"lesion {lesion.lesion} failed {', '.join(lesion.failed_checks)}" for lesion in failed)
    drop = bool(failed) and (failed_mode == "drop" or len(failed) == len(lesions) or any(
        lesion.checks.get("unchanged_outside") is False for lesion in failed))
    return failed, reason, drop


def failed_voxels(mask: np.ndarray, failed: list[LesionQuality]) -> np.ndarray:
    """The voxels of the ``failed`` lesions (ranked components of value 2) of ``mask``, the grid they were graded on."""
    components, ranked, _ = ranked_components(mask == 2)
    return np.isin(components, [ranked[lesion.lesion] for lesion in failed])


def ignore_failed(label: np.ndarray, lesions: np.ndarray, failed: np.ndarray, ignore: int, rim_mm: float,
                  spacing) -> np.ndarray:
    """``label`` with the paste region (``rim_mm``, ``spacing`` mm per axis) of the ``failed`` lesion voxels set to
    ``ignore``, except voxels of the other ``lesions``."""
    label = label.copy()
    label[paste_region(failed, rim_mm, spacing) & ~(lesions & ~failed)] = ignore
    return label


def user_grid_pair(inpainted: Path) -> tuple[Path, Path] | None:
    """``(inpainting_<k>.nii.gz, inpainting_<k>_label.nii.gz)`` beside the gate's file ``inpainted`` (itself, or
    its ``_std`` sibling on the standardised grid), or None when LINet did not write that pair."""
    stem = inpainted.name[: -len(nnunet.FILE_ENDING)].removesuffix(STANDARDISED_SUFFIX)
    image, label = (inpainted.with_name(f"{stem}{suffix}{nnunet.FILE_ENDING}") for suffix in ("", "_label"))
    return (image, label) if image.is_file() and label.is_file() else None


class DatasetWriter:
    """Writes cases into ``imagesTr``/``labelsTr`` and remembers them; ``origins`` / ``lesion_types``: also
    record the CT each case was made from (for folds) and its lesion type (for a balanced sample)."""

    def __init__(self, dataset_dir: Path, scheme: str, origins: bool = False, lesion_types: bool = False):
        self.dataset_dir, self.scheme = dataset_dir, scheme
        self.origins, self.lesion_types = origins, lesion_types
        self.taken: set[str] = set()
        self.cases: list[ExportedCase] = []

    def origin(self, image: Path) -> Path:
        """The user's CT that ``image`` was standardised from (``preprocess.json``), else ``image``; only looked
        up when folds are made (a recorded CT that is gone is then an error for the case)."""
        return (recorded_source(image) if self.origins else None) or image

    def write(self, name: str, kind: str, image: Path, label: np.ndarray, geometry: Geometry, ignored: int = 0,
              origin: Path | None = None, lesions: str = "") -> None:
        """Write one case (``label``: ``(z, y, x)`` on ``geometry``, the image's grid) under a unique identifier;
        ``origin``: the user's CT it was made from (default ``image``), ``lesions``: its lesion type."""
        identifier = nnunet.safe_identifier(name, self.taken)
        copy_image(image, self.dataset_dir / "imagesTr" / nnunet.image_name(identifier))
        write_volume(self.dataset_dir / "labelsTr" / nnunet.label_name(identifier), label, geometry, dtype=np.uint8)
        self.cases.append(ExportedCase(identifier, kind, str(image), ignored, str(origin or image), lesions))


def _synthetic_case(writer: DatasetWriter, spec: OutputSpec, exp_dir: Path,
                    verdicts: dict[str, list[LesionQuality] | None] | None, failed_mode: str,
                    rim_mm: float, result: ExportResult) -> None:
    """Export one inpainted CT (the user-grid pair when there is one, see the module docstring); with
    ``verdicts`` (output name -> graded lesions) only what the gate keeps."""
    output_verdicts = None if verdicts is None else verdicts.get(display_path(spec.inpainted, exp_dir))
    if verdicts is not None and output_verdicts is None:
        result.dropped.append((str(spec.inpainted), "could not be evaluated (see quality_summary.json)"))
        return
    failed, reason, drop = gate_outcome(output_verdicts or [], failed_mode)
    if drop:
        result.dropped.append((str(spec.inpainted), reason))
        return
    graded, graded_geometry = read_label(spec.mask)
    pair = user_grid_pair(spec.inpainted)
    image, label_path = pair or (spec.inpainted, spec.mask)
    mask, mask_geometry = (graded, graded_geometry) if pair is None else read_label(label_path)
    geometry = _same_grid(image, label_path, mask_geometry)
    label = nnunet.remap_label(mask, writer.scheme, label_path)
    if failed:
        failed_std = failed_voxels(graded, failed)
        failed_here = failed_std if pair is None else geometry.to_memory(nearest_on_source_grid(
            failed_std.astype(np.uint8), graded_geometry, geometry.affine, geometry.shape)) > 0
        label = ignore_failed(label, mask == 2, failed_here & (mask == 2), nnunet.ignore_value(writer.scheme),
                              rim_mm, geometry.spacing_zyx)
    number = spec.number if spec.number is not None else 0
    writer.write(f"syn_{spec.case_id}_{number}", "synthetic", image, label, geometry, len(failed),
                 writer.origin(spec.image), lesion_type(spec.report) if writer.lesion_types else "")


def _real_case(writer: DatasetWriter, image: Path, label_path: Path) -> None:
    source, label_geometry = read_label(label_path)
    geometry = _same_grid(image, label_path, label_geometry)
    stem = image.name[: -len(nnunet.FILE_ENDING)] if image.name.endswith(nnunet.FILE_ENDING) else image.stem
    writer.write(f"real_{image.parent.name}_{stem}", "real", image, nnunet.remap_label(source, writer.scheme,
                                                                                        label_path), geometry,
                 origin=writer.origin(image))


def _prepare_folder(dataset_dir: Path, overwrite: bool) -> None:
    if dataset_dir.exists() and any(dataset_dir.iterdir()) and not overwrite:
        raise DataError(f"{dataset_dir}: already exists; pass --overwrite (overwrite=True) to replace it")
    for folder in ("imagesTr", "labelsTr"):
        (dataset_dir / folder).mkdir(parents=True, exist_ok=True)


def _remove_stale(dataset_dir: Path, identifiers: set[str]) -> None:
    """Delete case files of an earlier export that this one did not write."""
    keep = {"imagesTr": {nnunet.image_name(i) for i in identifiers},
            "labelsTr": {nnunet.label_name(i) for i in identifiers}}
    for folder, names in keep.items():
        for path in (dataset_dir / folder).iterdir():
            if path.name not in names:
                path.unlink()


def _verdicts(specs: list[OutputSpec], exp_dir: Path, tolerances: Tolerances, rim_mm: float,
              progress: bool) -> dict[str, list[LesionQuality] | None]:
    """Output name -> graded lesions (None when it could not be evaluated); writes the quality files."""
    evaluation = evaluate_outputs(specs, exp_dir, tolerances, rim_mm, progress=progress)
    write_results(exp_dir, evaluation)
    verdicts: dict[str, list[LesionQuality] | None] = {name: [] for name in evaluation.outputs}
    for lesion in evaluation.lesions:
        verdicts[lesion.output].append(lesion)
    for error in evaluation.errors:
        verdicts[error.output] = None
    return verdicts


def export_nnunet(exp_dir: str | os.PathLike, out_dir: str | os.PathLike, dataset_id: int, name: str,
                  labels: str = "organ-lesion", only_passed: bool = False, failed: str = "ignore",
                  include_real: tuple[str | os.PathLike, str | os.PathLike] | None = None,
                  tolerances: Tolerances | None = None, which: str = "latest", overwrite: bool = False,
                  progress: bool = True, folds: int | None = None, seed: int = 0, group_by: str | None = None,
                  synthetic_per_real: float | None = None, with_baseline: int | None = None) -> ExportResult:
    """Write the nnU-Net v2 raw dataset (module docstring) and check it by reading it back; returns what was
    written. Bad options raise ConfigError, a bad experiment folder DataError; a case that fails is recorded in
    ``errors`` and left out. ``folds``, ``seed``, ``group_by``, ``synthetic_per_real`` and ``with_baseline``:
    the experiment options (:mod:`experiments.datasets`)."""
    exp_dir, out_dir = Path(exp_dir), Path(out_dir)
    folder_name = nnunet.dataset_folder_name(dataset_id, name)
    scheme_labels = nnunet.scheme_labels(labels)
    if failed not in FAILED_MODES:
        raise ConfigError(f"--failed: {failed!r} is not one of {', '.join(FAILED_MODES)}")
    baseline_name = check_options(include_real is not None, folds, synthetic_per_real, with_baseline, dataset_id,
                                  name)
    specs, skipped = find_outputs(exp_dir, which)
    real_rows = read_aligned_lists({"image": include_real[0], "label": include_real[1]}) if include_real else None
    dataset_dir = out_dir / folder_name
    for folder in (folder_name, baseline_name) if baseline_name else (folder_name,):
        nnunet.check_free_id(out_dir, folder)
        _prepare_folder(out_dir / folder, overwrite)
    result = ExportResult(dataset_dir, scheme_labels, dropped=[(item.case_id, item.reason) for item in skipped])
    rim_mm = paste_rim(exp_dir)
    verdicts = None
    if only_passed:
        tolerances = tolerances or resolve_tolerances(exp_dir)
        verdicts = _verdicts(specs, exp_dir, tolerances, rim_mm, progress)
    writer = DatasetWriter(dataset_dir, labels, origins=folds is not None,
                           lesion_types=synthetic_per_real is not None)
    jobs: list[tuple[str, Callable[[], None]]] = [
        (str(spec.inpainted), partial(_synthetic_case, writer, spec, exp_dir, verdicts, failed, rim_mm, result))
        for spec in specs]
    if real_rows:
        jobs += [(image, partial(_real_case, writer, Path(image), Path(label)))
                 for image, label in zip(real_rows["image"], real_rows["label"])]
    for source, job in tqdm(jobs, desc="nnU-Net export", unit="case", disable=not progress):
        try:
            job()
        except LesionDiffusionError as error:
            result.errors.append((source, str(error)))
    result.cases = writer.cases
    if not result.cases:
        raise DataError(f"{exp_dir}: nothing to export (no output passed, or none could be read)")
    splits, keep, result.notes = choose_synthetic(
        [SplitCase(case.identifier, case.kind, case.origin, case.lesion_type) for case in result.cases],
        folds, seed, group_by, synthetic_per_real)
    result.cases = [case for case in result.cases if case.kind == "real" or case.identifier in keep]
    ignored = sum(case.ignored_lesions for case in result.cases)
    if ignored:
        result.labels = {**scheme_labels, nnunet.IGNORE: nnunet.ignore_value(labels)}
    provenance = {"exp_dir": str(exp_dir.resolve()), "label_scheme": labels, "only_passed": only_passed,
                  "failed_lesions": failed if only_passed else None, "ignored_lesions": ignored,
                  "synthetic_cases": sum(case.kind == "synthetic" for case in result.cases),
                  "real_cases": sum(case.kind == "real" for case in result.cases),
                  "tolerances": tolerances.as_dict() if only_passed else None,
                  "folds": folds, "seed": seed, "group_by": group_by, "synthetic_per_real": synthetic_per_real,
                  "dropped": [{"source": source, "reason": reason} for source, reason in result.dropped]}
    write_json_atomic(dataset_dir / "dataset.json",
                      nnunet.dataset_json(name, result.labels, len(result.cases), provenance))
    identifiers = {case.identifier for case in result.cases}
    _remove_stale(dataset_dir, identifiers)
    nnunet.verify_dataset(dataset_dir, identifiers)
    if splits is None:
        (dataset_dir / SPLITS_FILE).unlink(missing_ok=True)  # an earlier export's folds no longer match
    else:
        result.folds = splits.folds
        result.splits_files = [path for path in place_splits(splits.folds, dataset_dir) if path]
    if baseline_name:
        real = [case.identifier for case in result.cases if case.kind == "real"]
        result.baseline_dir = write_baseline(dataset_dir, out_dir / baseline_name, real, result.labels,
                                             name + BASELINE_SUFFIX, provenance)
        if splits is None:
            (result.baseline_dir / SPLITS_FILE).unlink(missing_ok=True)
        else:
            result.splits_files += [path for path in place_splits(real_only(splits.folds, set(real)),
                                                                  result.baseline_dir) if path]
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export_nnunet.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples('python pipeline/export_nnunet.py exp "$nnUNet_raw" --dataset-id 501 --name SynthLesions',
                        'python pipeline/export_nnunet.py exp "$nnUNet_raw" --dataset-id 501 --name SynthLesions '
                        "--only-passed --include-real train_images.txt train_labels.txt"))
    parser.add_argument("exp_dir", help="experiment folder with inpainted CTs (test.py with LINet)")
    parser.add_argument("out_dir", help="where Dataset<id>_<name> goes, e.g. \"$nnUNet_raw\"")
    parser.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id, 1..999 (e.g. 501)")
    parser.add_argument("--name", required=True, help="dataset name (letters, digits, _ or -), e.g. SynthLesions")
    parser.add_argument("--labels", choices=tuple(nnunet.SCHEMES), default="organ-lesion",
                        help="organ-lesion: 0/1 organ/2 lesion; lesion: 0/1 lesion (default organ-lesion)")
    parser.add_argument("--only-passed", action="store_true", help="run the quality gate and keep passed lesions")
    parser.add_argument("--failed", choices=FAILED_MODES, default="ignore",
                        help="with --only-passed: mark a failed lesion with the ignore label, or drop its case")
    parser.add_argument("--include-real", nargs=2, metavar=("IMAGES_LIST", "LABELS_LIST"),
                        help="also export real cases: aligned lists of CTs and 0/1/2 labels")
    parser.add_argument("--folds", type=int, help="write splits_final.json: this many leak-free folds over the real "
                        "cases (e.g. 5)")
    parser.add_argument("--group-by", metavar="REGEX", help="patient id in a CT's path (first group, else the match): "
                        "cases of one patient share a fold, e.g. 'patient_[0-9]+'")
    parser.add_argument("--with-baseline", type=int, metavar="ID", help="also write the real cases alone as "
                        "Dataset<ID>_<name>Real, same folds (the paired baseline)")
    parser.add_argument("--synthetic-per-real", type=float, metavar="F", help="at most F synthetic cases per real "
                        "training case (seeded, balanced over lesion types)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of the synthetic sample (default 0)")
    parser.add_argument("--tolerances", metavar="FILE.toml", help="gate tolerances (default: EXP_DIR/quality.toml)")
    parser.add_argument("--which", choices=WHICH, default="latest",
                        help="latest: the last LINet run's outputs; all: every inpainting_<k> (default latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-d", "--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when a case could not be exported)."""
    return run_command(run, build_parser().parse_args(argv), "export_nnunet.py")


def run(args: argparse.Namespace) -> int:
    """Run the command for parsed arguments; returns the exit status."""
    tolerances = resolve_tolerances(args.exp_dir, args.tolerances) if args.only_passed else None
    result = export_nnunet(args.exp_dir, args.out_dir, args.dataset_id, args.name, args.labels, args.only_passed,
                           args.failed, tuple(args.include_real) if args.include_real else None, tolerances,
                           args.which, args.overwrite, not args.no_progress, args.folds, args.seed, args.group_by,
                           args.synthetic_per_real, args.with_baseline)
    kinds = {kind: sum(case.kind == kind for case in result.cases) for kind in ("synthetic", "real")}
    ignored = sum(case.ignored_lesions for case in result.cases)
    print(f"{result.dataset_dir}: {len(result.cases)} case(s) ({kinds['synthetic']} synthetic, {kinds['real']} real), "
          f"labels {result.labels}" + (f", {ignored} failed lesion(s) marked ignore" if ignored else ""))
    for source, reason in result.dropped:
        print(f"  dropped {source}: {reason}")
    for note in result.notes:
        print(f"  note: {note}")
    for source, reason in result.errors:
        print(f"export_nnunet.py: {source}: {reason}", file=sys.stderr)
    ids = [args.dataset_id] + ([args.with_baseline] if result.baseline_dir else [])
    if result.baseline_dir:
        print(f"{result.baseline_dir}: the paired baseline, {kinds['real']} real case(s)")
    for path in result.splits_files:
        print(f"{path}: {len(result.folds)} folds over the real cases")
    if result.folds and not os.environ.get(PREPROCESSED_ENV):
        for dataset_dir in filter(None, (result.dataset_dir, result.baseline_dir)):
            target = f"\"${PREPROCESSED_ENV}/{dataset_dir.name}\""
            print(f"  {PREPROCESSED_ENV} is not set; after setting it: mkdir -p {target} && cp "
                  f"{dataset_dir / SPLITS_FILE} {target}/")
    print(f"next: nnUNetv2_plan_and_preprocess -d {' '.join(map(str, ids))} --verify_dataset_integrity "
          "(with nnUNet_raw set to OUT_DIR)")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
