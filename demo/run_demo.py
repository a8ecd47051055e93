"""The CPU demo behind ``make demo``: phantoms -> tiny VQ, LMNet, LINet -> lesions in a held-out healthy phantom.

    python demo/run_demo.py [--steps-vq 200 --steps-lmnet 300 --steps-linet 400] [--retrain]

1. builds the phantom data set in ``demo/data`` (seconds; reused when present);
2. trains the three tiny demo models with ``pipeline/main.py`` into ``demo/logs`` and copies each ``last.ckpt``
   (checked to hold the final step) to ``demo/checkpoints/{vq,lmnet,linet}.ckpt`` (reused when present, unless
   ``--retrain``);
3. synthesises a liver cyst into the first held-out healthy phantom with ``pipeline/synthesize.py``
   (``demo/out``) and prints where the NIfTI and PNG results are.
The tiny models train for minutes on a CPU: the pipeline runs end to end, the lesions are not realistic.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DEMO_DIR = Path(__file__).resolve().parent
ROOT = DEMO_DIR.parent
PIPELINE_DIR = ROOT / "pipeline"
sys.path.insert(0, str(PIPELINE_DIR))
sys.path.insert(0, str(ROOT))

from demo.make_phantoms import make_phantoms  # noqa: E402
from ldm.data.lists import read_list  # noqa: E402
from ldm.errors import LesionDiffusionError  # noqa: E402
from ldm.fileio import atomic_path  # noqa: E402

STAGES = ("vq", "lmnet", "linet")  # LINet's first stage is the VQ: it must come after it


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
    data = make_phantoms(DEMO_DIR / "data", n=8, seed=0)
    checkpoints, logs = DEMO_DIR / "checkpoints", DEMO_DIR / "logs"
    steps = {"vq": args.steps_vq, "lmnet": args.steps_lmnet, "linet": args.steps_linet}
    for stage in STAGES:
        train_stage(stage, steps[stage], checkpoints, logs, args.retrain)
    healthy = read_list(data["lists"]["healthy_list"])[0]
    segmentation = Path(healthy).with_name("seg.nii.gz")
    print(f"[demo] synthesising a liver cyst into {Path(healthy).relative_to(ROOT)}", flush=True)
    from synthesize import synthesize, table

    rows = synthesize([healthy], "liver", "cyst", DEMO_DIR / "out", segs=[segmentation], seg_version="v1",
                      lmnet_config="configs/demo/lmnet_test.yaml", linet_config="configs/demo/linet_test.yaml",
                      seed=args.seed, spacing=[2.0], steps=args.sample_steps, overwrite=True)
    print("\n".join(table(rows)))
    if all(row.ok for row in rows):
        print("[demo] open the NIfTI files in any viewer (they overlay the input CT); the PNGs show three planes "
              "through each lesion, before and after")
        return 0
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-vq", type=int, default=200, help="VQ training steps")
    parser.add_argument("--steps-lmnet", type=int, default=300, help="LMNet training steps")
    parser.add_argument("--steps-linet", type=int, default=400, help="LINet training steps")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the synthesis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train again even when checkpoints exist")
    args = parser.parse_args(argv)
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
