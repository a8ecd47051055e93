"""Builders shared by the inference tests (no tests here): tiny random LMNet/LINet checkpoints, their test configs,
and experiment folders made from phantoms or the real TotalSegmentator example, in the layout preprocess.py
writes (``img/seg/type/bbox_list.txt``; boxes of value 2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import VOCABULARY_ENCODER, tiny_unet_config
from omegaconf import OmegaConf

from demo.make_phantoms import make_phantoms
from ldm.data.crops import mask_bbox
from ldm.data.volume import read_label, write_volume
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}
TINY_VQ = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {"embed_dim": 4, "n_embed": 64, "lossconfig": {"target": "torch.nn.Identity"},
               "ddconfig": {"dims": 3, "double_z": False, "z_channels": 4, "resolution": [16, 32, 32],
                            "in_channels": 1, "out_ch": 1, "ch": 16, "ch_mult": [1, 1], "num_res_blocks": 1,
                            "attn_resolutions": [], "attn_type": "none", "dropout": 0.0, "sample_depth": [0]}},
}
LMNET_CROP, LINET_CROP = (8, 16, 16), (16, 16, 16)


def model_block(stage: str) -> dict:
    """The ``model:`` block of a tiny LMNet or LINet (random weights, offline attribute encoder)."""
    if stage == "lmnet":
        params = dict(unet_config=tiny_unet_config(4, 1), cond_stage_config=VOCABULARY_ENCODER,
                      image_size=list(LMNET_CROP), **SCHEDULE)
        return {"target": "ldm.models.diffusion.mask.MaskDiffusion", "params": params}
    params = dict(unet_config=tiny_unet_config(5, 5), cond_stage_config=VOCABULARY_ENCODER,
                  first_stage_config=TINY_VQ, channels=4, loss_type="l1",
                  image_size=[size // 2 for size in LINET_CROP], **SCHEDULE)
    return {"target": "ldm.models.diffusion.inpainting.InpaintingDiffusion", "params": params}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every zero-initialised UNet layer random weights (so outputs depend on every input, the text
    included), then restart the EMA from the result, which sampling uses."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.parameters():
            if parameter.ndim > 1 and parameter.abs().max() == 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.model_ema = LitEma(model.model)


def save_checkpoint(stage: str, path: Path, seed: int = 0) -> Path:
    """Build a tiny random model of ``stage``, randomise it and save a Lightning-style checkpoint."""
    torch.manual_seed(seed)
    model = instantiate_from_config(model_block(stage))
    randomise(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def inference_config(stage: str, checkpoint: Path, exp_dir: Path | None, **inference):
    """A merged test config for the tiny model: few DDIM steps, tiny crops, no progress bars, CPU."""
    settings = {"exp_dir": str(exp_dir) if exp_dir else None, "steps": 3, "seed": 7, "device": "cpu",
                "crop_size": list(LMNET_CROP if stage == "lmnet" else LINET_CROP), "progress": False,
                **({"rim_mm": 2.0} if stage == "linet" else {})}
    settings.update(inference)
    block = model_block(stage)
    block["params"]["ckpt_path"] = str(checkpoint)
    return OmegaConf.create({"model": block, "inference": settings})


def saved_test_configs(root: Path) -> dict[str, Path]:
    """Test configs of tiny random LMNet/LINet models (crops 32x16x16 and 32x24x24, no experiment folder), saved
    as YAML files under ``root`` as a user would pass them; ``{stage: path}``."""
    paths = {}
    for stage, crop in (("lmnet", [32, 16, 16]), ("linet", [32, 24, 24])):
        config = inference_config(stage, save_checkpoint(stage, root / f"{stage}.ckpt"), None, crop_size=crop)
        paths[stage] = root / f"{stage}_test.yaml"
        OmegaConf.save(config, paths[stage])
    return paths


def box_volume(label: np.ndarray) -> np.ndarray:
    """A box file's content: the filled bounding box of the lesion (value 2 of ``label``) as value 2."""
    boxes = np.zeros(label.shape, dtype=np.uint8)
    boxes[mask_bbox(label == 2)] = 2
    return boxes


def write_lists(exp_dir: Path, rows: list[dict[str, Path]]) -> Path:
    """Write ``img/seg/type/bbox_list.txt`` for ``rows`` (keys img, seg, type, bbox); returns ``exp_dir``."""
    for kind in ("img", "seg", "type", "bbox"):
        (exp_dir / f"{kind}_list.txt").write_text("".join(f"{row[kind]}\n" for row in rows))
    return exp_dir


def phantom_dataset(root: Path) -> Path:
    """Eight seeded 32 x 64 x 64 phantoms (2 mm, LPS) under ``root``; returns their folder."""
    return Path(make_phantoms(root, n=8, seed=0, shape=(32, 64, 64), spacing=2.0, progress=False)["out_dir"])


def phantom_row(exp_dir: Path, phantoms: Path, case: str) -> dict[str, Path]:
    """One list row for the healthy CT of phantom ``case``; its box is the bounding box of the drawn lesion."""
    folder = phantoms / case
    label, geometry = read_label(folder / "label.nii.gz")
    bbox = write_volume(exp_dir / case / "bbox.nii.gz", box_volume(label), geometry, dtype=np.uint8)
    return {"img": folder / "healthy.nii.gz", "seg": folder / "seg.nii.gz", "type": folder / "type.json",
            "bbox": bbox}


def phantom_experiment(exp_dir: Path, phantoms: Path, cases: int = 2) -> Path:
    """An experiment folder over the first ``cases`` healthy phantoms (``healthy_list.txt`` first, then the train
    cases' healthy CTs). Returns the folder."""
    healthy = [Path(line).parent.name for line in (phantoms / "healthy_list.txt").read_text().split()]
    names = (healthy + [f"case_{index:03d}" for index in range(8) if f"case_{index:03d}" not in healthy])[:cases]
    return write_lists(exp_dir, [phantom_row(exp_dir, phantoms, name) for name in names])


def totalseg_experiment(root: Path, example: Path, box_zyx: tuple[slice, slice, slice]) -> Path:
    """An experiment folder with the real example CT (its v2 segmentation, ``seg_version: v2``), a liver report
    and one box at ``box_zyx``. Returns the folder."""
    exp_dir = root / "exp"
    case = exp_dir / example.name  # the folder inference writes to for a CT outside exp_dir
    seg, geometry = read_label(example / "example_seg.nii.gz")
    boxes = np.zeros(seg.shape, dtype=np.uint8)
    boxes[box_zyx] = 2
    write_volume(case / "bbox.nii.gz", boxes, geometry, dtype=np.uint8)
    attributes = {"enhancement status": "enhanced ct,", "lesion location": "5", "shape": "round-like,",
                  "size": "[[4 4 3]] pixel,", "density": "low density lesion,", "density variations": "homogeneous,",
                  "CT value": "Mean density of the lesion region is approximately 12 HU,",
                  "surface characteristics": "well-defined margin,",
                  "relationship with adjacent organs": "no close relationship with surrounding organs,",
                  "specific features": "", "cavity": "within the parenchymal organ,"}
    (case / "type.json").write_text(json.dumps({"5": ["round-like,", "", attributes, [[[0, 0, 0]], [[4, 4, 3]]]]}))
    row = {"img": example / "example_ct_sm.nii.gz", "seg": example / "example_seg.nii.gz",
           "type": case / "type.json", "bbox": case / "bbox.nii.gz"}
    return write_lists(exp_dir, [row])
