"""Time and peak memory of reading each release-size checkpoint: pickle (.ckpt, safe loading) vs safetensors.

    .venv/bin/python bench/checkpoint_loading.py [--dir DIR] [--repeats 3]

Builds LMNet, LINet and VQ from the release configs (random weights), saves them the way Lightning does
(``Trainer.save_checkpoint``) and converts them with ``convert_checkpoint.py``; files already in ``--dir`` are
reused. Then, for every file and reader, in a fresh subprocess each time (so the peak belongs to that read alone),
measures the seconds to read the file and touch every tensor (a checksum, so lazily mapped pages count too) and
the growth of the peak resident memory above the process after its imports. Readers: ``pickle``
(``torch.load(weights_only=True)`` with the allow-list, read into memory), ``pickle-mmap``
(``ldm.models.checkpoint.read_checkpoint``: the same, memory-mapped) and ``safetensors``. Repeats are interleaved; the minimum time and the maximum peak
are reported, one JSON object per file and reader.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

MODELS = {"VQ": ("autoencoder/lesiondiffusion_vq.yaml", ["model.params.lossconfig.params.perceptual_weight=0"]),
          "LMNet": ("diffusion/maskdiffusion.yaml", []),
          "LINet": ("diffusion/lesiondiffusion.yaml", [])}
READERS = ("pickle", "pickle-mmap", "safetensors")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(folder: Path) -> dict[str, Path]:
    """The three release-size checkpoints and their safetensors copies in ``folder`` (reused when present)."""
    import pytorch_lightning as pl
    import torch

    import convert_checkpoint
    from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

    files = {}
    for name, (config, overrides) in MODELS.items():
        path = folder / f"{name}.ckpt"
        if not path.is_file():
            extra = [f"model.params.first_stage_config.params.ckpt_path={folder / 'VQ.ckpt'}"] if name == "LINet" else []
            block = load_config([PIPELINE_DIR / "configs" / config],
                                ["model.params.ckpt_path=null", *overrides, *extra]).model
            torch.manual_seed(0)
            model = instantiate_from_config(block)
            model.save_hyperparameters(block.params)
            trainer = pl.Trainer(logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                                 enable_model_summary=False)
            trainer.strategy.connect(model)
            trainer.save_checkpoint(path)
            del model, trainer
        converted = path.with_suffix(".safetensors")
        if not converted.is_file():
            convert_checkpoint.convert(path, converted)
        files[name] = path
    return files


def measure(reader: str, path: Path) -> dict:
    """Read ``path`` with ``reader`` in this process; seconds and peak growth (MB) above the imports."""
    import torch

    from safetensors.torch import load_file  # noqa: F401 - imported before the clock, as in a running program

    from ldm.models.checkpoint import allowed_globals, read_checkpoint

    allowed_globals()  # imports OmegaConf and Lightning once; a program that trains or samples has them already
    before = peak_mb()
    start = time.perf_counter()
    if reader == "pickle":
        with torch.serialization.safe_globals(list(allowed_globals())):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)["state_dict"]
    elif reader == "pickle-mmap":
        state = read_checkpoint(path)["state_dict"]
    else:
        state = read_checkpoint(path.with_suffix(".safetensors"))["state_dict"]
    checksum = sum(float(value.double().sum()) for value in state.values() if isinstance(value, torch.Tensor))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "peak_mb": round(peak_mb() - before), "checksum": checksum}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where the checkpoints are built / reused (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="checkpoint_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    files = build(folder)
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for name, path in files.items():
            for reader in READERS:
                output = subprocess.run([sys.executable, __file__, "--measure", reader, str(path)], check=True,
                                        capture_output=True, text=True).stdout
                runs.setdefault((name, reader), []).append(json.loads(output.strip().splitlines()[-1]))
    for (name, reader), results in runs.items():
        checksums = {result["checksum"] for result in results}
        source = files[name].with_suffix(".safetensors" if reader == "safetensors" else ".ckpt")
        print(json.dumps({"model": name, "reader": reader, "file_mb": round(source.stat().st_size / 2 ** 20),
                          "seconds_min": min(result["seconds"] for result in results),
                          "peak_mb_max": max(result["peak_mb"] for result in results),
                          "same_values": len(checksums) == 1, "repeats": len(results)}))


if __name__ == "__main__":
    main()
