"""Inference from a test config: LMNet lesion masks, then LINet inpainting, for every case of an experiment folder.

    python pipeline/test.py --base configs/diffusion/maskdiffusion_test.yaml --exp exp      # -> <case>/samples_<k>
    python pipeline/test.py --base configs/diffusion/lesiondiffusion_test.yaml --exp exp    # -> <case>/inpainting_<k>
    python pipeline/test.py --base configs/diffusion/lesiondiffusion_test.yaml --exp exp --gpus 0,2 --steps 50
    torchrun --nproc-per-node 4 pipeline/test.py --base configs/diffusion/maskdiffusion_test.yaml --exp exp

``exp`` is the folder ``preprocess.py`` wrote. The LMNet run also writes ``exp/label_list.txt``, which the LINet
run reads: no list needs editing. Exit status 1 when any case failed (each named with the reason). See
``inference/`` for the Python API (``inference.runner.run_inference``, ``inference.lmnet.sample_masks``,
``inference.linet.inpaint_cases``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference.cli import build_parser, main  # noqa: E402,F401 (build_parser: the command line, for tools)
from quality.candidates import lesion_judge  # noqa: E402
from quality.gate import gate_stage  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(after_stage=gate_stage, judge=lesion_judge))
