"""What a training checkpoint costs: the wall time of one ``last.ckpt`` write (and read) of the release LMNet and
LINet, and what a kill costs at the configs' default ``every_n_train_steps``. Prints one JSON object per model.

    .venv/bin/python bench/checkpoint_write.py [--only lmnet|linet] [--repeats 3] [--out DIR] [--step-seconds 0.5 1 2]

The models are built from the release configs with random weights (no released weights needed); the optimiser
state is the AdamW state after one step, as in a real checkpoint. The write is what ``LastCheckpoint`` does
(``ldm.callbacks.checkpointing.write_checkpoint``: ``torch.save`` into a temporary file, fsync, one rename). ``--out`` should
be on the file system the runs write to (a shared file system is slower than a local disk).

A kill loses the steps since the last save: at most ``every_n_train_steps``, half of it on average, plus the
restart (process start and the read of ``last.ckpt``). The time per training step depends on the GPU: pass the
seconds per step you measured (the progress bar shows it) as ``--step-seconds`` to get the cost in minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

MODELS = {"lmnet": "configs/diffusion/maskdiffusion.yaml", "linet": "configs/diffusion/lesiondiffusion.yaml"}
NO_WEIGHTS = {"lmnet": [], "linet": ["model.params.first_stage_config.params.ckpt_path=null"]}


def release_checkpoint(name: str) -> tuple[dict, int]:
    """A Lightning-format checkpoint of the release model ``name`` with random weights and the AdamW
    state after one step; returns ``(checkpoint, trainable parameter count)``."""
    import pytorch_lightning as pl
    import torch

    from ldm.util import count_params, instantiate_from_config, load_config

    config = load_config([ROOT / "pipeline" / MODELS[name]], NO_WEIGHTS[name])
    model = instantiate_from_config(config.model, key_path="model")
    model.learning_rate = float(config.model.base_learning_rate)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    checkpoint = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": pl.__version__,
                  "state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                  "loops": {}, "callbacks": {}}
    return checkpoint, count_params(model, trainable_only=True)


def measure(name: str, repeats: int, out_dir: Path, step_seconds: list[float]) -> dict:
    import torch

    from ldm.callbacks.checkpointing import write_checkpoint
    from ldm.runs import every_n_train_steps
    from ldm.util import load_config

    checkpoint, trainable = release_checkpoint(name)
    path = out_dir / f"{name}-last.ckpt"
    writes, reads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        write_checkpoint(checkpoint, path)
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=False)
        reads.append(time.perf_counter() - start)
    interval = every_n_train_steps(load_config([ROOT / "pipeline" / MODELS[name]], NO_WEIGHTS[name]))
    result = {"model": name, "config": MODELS[name], "trainable_params": trainable,
              "checkpoint_mib": round(path.stat().st_size / 2**20, 1), "write_s": round(min(writes), 2),
              "read_s": round(min(reads), 2), "every_n_train_steps": interval,
              "kill_loses_steps": {"at_most": interval, "on_average": interval / 2}}
    for seconds in step_seconds:
        result[f"at_{seconds}_s_per_step"] = {
            "kill_loses_min_at_most": round(interval * seconds / 60, 1),
            "kill_loses_min_on_average": round(interval * seconds / 120, 1),
            "write_overhead_percent": round(100 * min(writes) / (interval * seconds), 2)}
    path.unlink()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(MODELS), help="one model only")
    parser.add_argument("--repeats", type=int, default=3, help="writes per model; the minimum is reported")
    parser.add_argument("--out", type=Path, default=None, help="folder to write into (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--step-seconds", type=float, nargs="*", default=[],
                        help="seconds per training step on your GPU(s): also print the kill cost in minutes")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        for name in [args.only] if args.only else sorted(MODELS):
            print(json.dumps(measure(name, args.repeats, Path(scratch), args.step_seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
