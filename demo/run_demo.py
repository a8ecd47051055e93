"""The CPU demo behind ``make demo``: phantoms -> tiny VQ, LMNet, LINet -> lesions in a held-out healthy phantom.

    python demo/run_demo.py [--steps-vq 600 --steps-lmnet 400 --steps-linet 1000] [--retrain]

1. builds the phantom data set in ``demo/data`` (seconds; reused when present);
2. trains the three tiny demo models with ``pipeline/main.py`` into ``demo/logs`` and copies each ``last.ckpt``
   (checked to hold the final step) to ``demo/checkpoints/{vq,lmnet,linet}.ckpt`` (reused when present, unless
   ``--retrain``);
3. synthesises a liver cyst with ``pipeline/synthesize.py`` (``demo/out``) into a held-out healthy phantom stored
   the way a user's CT may come: RAS, anisotropic voxels (2.5 x 1.6 x 1.6 mm), int16 with a scaling intercept
   (``demo/data_user``); the models run on their 2 mm LPS grid, the result comes back on the phantom's own grid.
   The demo then shows the round trip: same grid, data type and scaling as the input, and which voxels changed.
The tiny models train for minutes on a CPU: the pipeline runs end to end, the lesions are not realistic.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

DEMO_DIR = Path(__file__).resolve().parent
ROOT = DEMO_DIR.parent
PIPELINE_DIR = ROOT / "pipeline"
sys.path.insert(0, str(PIPELINE_DIR))
sys.path.insert(0, str(ROOT))

from demo.make_phantoms import make_phantoms  # noqa: E402
from ldm.cli import add_version, examples  # noqa: E402
from ldm.errors import LesionDiffusionError  # noqa: E402
from ldm.fileio import atomic_path  # noqa: E402

STAGES = ("vq", "lmnet", "linet")  # LINet's first stage is the VQ: it must come after it
DEFAULT_STEPS = {"vq": 600, "lmnet": 400, "linet": 1000}
TRAINING_CASES = 48  # attribute phantoms (make_phantoms lesions="attributes"): the last quarter is validation


def train_stage(stage: str, steps: int, checkpoints: Path, logs: Path, retrain: bool) -> Path:
    """Train ``configs/demo/<stage>.yaml`` for ``steps`` steps (unless its checkpoint exists); returns the checkpoint."""
    target = checkpoints / f"{stage}.ckpt"
    if target.is_file() and not retrain:
        print(f"[demo] {stage}: reusing {target.relative_to(ROOT)}")
        return target
    name = f"demo_{stage}"
    if (logs / name).exists():
        shutil.rmtree(logs / name)
    command = [sys.executable, str(PIPELINE_DIR / "main.py"), "--base", f"configs/demo/{stage}.yaml", "-t",
               "--name", name, "--logdir", str(logs), "--max_steps", str(steps), "--max_epochs", "1000"]
    print(f"[demo] {stage}: training {steps} steps ({' '.join(command[1:])})", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=PIPELINE_DIR, check=True)
    last = logs / name / "checkpoints" / "last.ckpt"
    trained = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    if trained < steps:  # the VQ steps two optimisers per batch and may end one step past max_steps
        raise LesionDiffusionError(f"{last} holds step {trained}, not all {steps} steps trained")
    with atomic_path(target) as temporary:
        shutil.copyfile(last, temporary)
    print(f"[demo] {stage}: {time.perf_counter() - start:.0f} s -> {target.relative_to(ROOT)}", flush=True)
    return target


def run(args: argparse.Namespace) -> int:
    make_phantoms(DEMO_DIR / "data", n=TRAINING_CASES, seed=0, lesions="attributes")
    checkpoints, logs = DEMO_DIR / "checkpoints", DEMO_DIR / "logs"
    steps = {"vq": args.steps_vq, "lmnet": args.steps_lmnet, "linet": args.steps_linet}
    for stage in STAGES:
        train_stage(stage, steps[stage], checkpoints, logs, args.retrain)
    healthy, segmentation = user_phantom(DEMO_DIR / "data_user", args.seed)
    print(f"[demo] synthesising a liver cyst into {healthy.relative_to(ROOT)} ({describe(healthy)})", flush=True)
    from synthesize import synthesize, table

    rows = synthesize([healthy], "liver", "cyst", DEMO_DIR / "out", segs=[segmentation], seg_version="v1",
                      lmnet_config="configs/demo/lmnet_test.yaml", linet_config="configs/demo/linet_test.yaml",
                      seed=args.seed, spacing=[2.0], steps=args.sample_steps, overwrite=True)
    print("\n".join(table(rows)))
    row = rows[0]
    if not row.ok and row.stage != "quality gate":
        return 1
    if not row.ok:  # the pipeline ran end to end; the gate moved the outputs aside because the lesion disagrees
        row.outputs = {kind: str(rejected_path(path)) for kind, path in row.outputs.items()}
        print("[demo] the quality gate REJECTED the lesion of the tiny demo models (see the table: what disagrees "
              "with the report); its files are kept in rejected/ and shown below. These models do not follow the "
              "text well yet: docs/text_control.md")
    show_round_trip(healthy, row.outputs)
    print(f"[demo] fidelity: {lesion_fidelity(row)}")
    print("[demo] open the NIfTI files in any viewer (they overlay the input CT); the PNGs show three planes "
          "through each lesion, before and after")
    return 0


def user_phantom(folder: Path, seed: int) -> tuple[Path, Path]:
    """A healthy phantom and its segmentation as a user's CT may come (module docstring), written in ``folder``."""
    made = make_phantoms(folder, n=1, seed=seed + 100, shape=(40, 120, 120), spacing=(2.5, 1.6, 1.6),
                         orientation="RAS", overwrite=True, progress=False)
    case = Path(made["out_dir"]) / "case_000"
    stored = nib.load(case / "healthy.nii.gz")
    image = nib.Nifti1Image(np.asanyarray(stored.dataobj).astype(np.int16) + np.int16(1024), stored.affine,
                            stored.header)
    image.header.set_slope_inter(1.0, -1024.0)
    healthy = folder / "user_ct.nii.gz"
    with atomic_path(healthy) as temporary:
        nib.save(image, str(temporary))
    return healthy, case / "seg.nii.gz"


def describe(path: Path) -> str:
    """Shape, voxel size, orientation, data type and scaling of a NIfTI file, in words."""
    image = nib.load(str(path))
    sizes = "x".join(f"{size:g}" for size in image.header.get_zooms()[:3])
    return (f"{'x'.join(map(str, image.shape))} voxels of {sizes} mm, {''.join(nib.aff2axcodes(image.affine))}, "
            f"{image.get_data_dtype()} with slope {image.dataobj.slope:g} and intercept {image.dataobj.inter:g}")


def rejected_path(path: str | Path) -> Path:
    """Where the quality gate moved an output of a case (``<case>/rejected/``, or a deeper one for the standardised
    outputs; the newest when an earlier run's file of that name was kept as ``name~2``); ``path`` itself when it is
    still in place."""
    path = Path(path)
    if path.exists():
        return path
    moved = sorted((path.parent / "rejected").glob(path.name + "*"), key=lambda candidate: candidate.stat().st_mtime)
    return moved[-1] if moved else path


def show_round_trip(healthy: Path, outputs: dict) -> None:
    """Print that the result lies on the input's grid and where it differs from the input."""
    from inference.source_grid import measure_changes

    result = Path(outputs["linet_image"])
    print(f"[demo] input  {describe(healthy)}")
    print(f"[demo] output {describe(result)}  ({result.relative_to(ROOT)})")
    changes = measure_changes(healthy, result, outputs["linet_label"])
    print(f"[demo] {changes['changed_in_lesion']} of {changes['lesion_voxels']} lesion voxels changed; outside the "
          f"lesion {changes['changed_outside_lesion']} voxels changed, at most {changes['max_distance_mm']} mm from it "
          "(the 2 mm blend rim); every other voxel is the input's, bit for bit")


def lesion_fidelity(row) -> str:
    """The fidelity line of the synthesised lesion: its report (what was asked for) against what the output
    shows, measured on the standardised grid the models ran on (the grid the quality gate measures;
    :mod:`demo.fidelity`)."""
    import json

    from scipy import ndimage

    from demo.fidelity import describe_lesion, fidelity_line, judge
    from ldm.data.attributes import report_attributes
    from ldm.data.organs import organ_id
    from ldm.data.volume import read_volume

    case = DEMO_DIR / "out" / row.case_id
    image, geometry = read_volume(row.outputs["linet_standardised"])
    mask, _ = read_volume(row.outputs["lmnet_mask"])
    seg, _ = read_volume(case / "totalseg.nii.gz")
    liver = organ_id("liver")
    lesion = mask == 2
    requested = report_attributes(json.loads((case / "type.json").read_text()), str(liver))
    phrases, measurement = describe_lesion(image, lesion, seg, liver, geometry.spacing_zyx)
    components = ndimage.label(lesion)[1]
    return fidelity_line(judge(requested, phrases, measurement), components)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples("python demo/run_demo.py", "python demo/run_demo.py --retrain --steps-lmnet 600"))
    parser.add_argument("--steps-vq", type=int, default=DEFAULT_STEPS["vq"], help="VQ training steps")
    parser.add_argument("--steps-lmnet", type=int, default=DEFAULT_STEPS["lmnet"], help="LMNet training steps")
    parser.add_argument("--steps-linet", type=int, default=DEFAULT_STEPS["linet"], help="LINet training steps")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the synthesis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train again even when checkpoints exist")
    return add_version(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        status = run(args)
    except (LesionDiffusionError, subprocess.CalledProcessError) as error:
        print(f"[demo] error: {error}", file=sys.stderr)
        return 1
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
