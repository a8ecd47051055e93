"""What a run writes besides the cases: the seeded split, the aligned lists, the config fragments, the run report.

- Split: by case, over **every** case of the dataset (failed ones included), from ``--seed`` and
  ``--val-fraction``, so a case keeps its split whatever else fails or is added to a rerun with the same cases.
  At least one validation case when the fraction is positive and there are two cases or more.
- ``OUT/{train,val}_{image,label,seg,coarseg,type}_list.txt``: row N of every list of a split is the same case
  (successful cases, in case-id order); entries are relative to ``OUT`` (lists resolve entries against their own
  folder), so ``OUT`` can be moved as a whole.
- ``OUT/data.yaml`` (LMNet: all five lists), ``OUT/data_linet.yaml`` (image, label, type, coarseg) and
  ``OUT/data_vq.yaml`` (image, label): ``data:`` fragments to merge after a release or demo config. One fragment
  cannot serve all three stages: the dataset trains LMNet exactly when a ``seg_list`` is given. The list paths in
  them are absolute, since relative paths inside a config resolve against ``pipeline/``.
- ``OUT/prepare_report.json``: options, summary, split, per case inputs, outputs, measurements, attributes,
  undecided attributes, seconds per step and error.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ldm.fileio import write_json_atomic, write_text_atomic
from preparation.case import CASES_DIR, OUTPUT_FILES, CaseResult, PrepareOptions

SPLITS = {"train": "train", "val": "validation"}
SUCCEEDED = ("done", "skipped")
REPORT_FILE = "prepare_report.json"
# Lists each stage's dataset reads (LesionDataset trains LMNet when seg_list is given, VQ/LINet otherwise).
STAGE_LISTS = {"data.yaml": ("image", "label", "type", "seg", "coarseg"),
               "data_linet.yaml": ("image", "label", "type", "coarseg"),
               "data_vq.yaml": ("image", "label")}
STAGE_CONFIGS = {"data.yaml": "configs/diffusion/maskdiffusion.yaml",
                 "data_linet.yaml": "configs/diffusion/lesiondiffusion.yaml",
                 "data_vq.yaml": "configs/autoencoder/lesiondiffusion_vq.yaml"}


def split_cases(case_ids: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """``{case_id: "train" | "val"}``: a seeded permutation of the sorted ids; the first ``round(n * fraction)``
    (at least 1 when the fraction is positive and n >= 2) are validation cases."""
    ordered = sorted(case_ids)
    count = int(round(len(ordered) * val_fraction))
    if val_fraction > 0 and len(ordered) >= 2:
        count = min(max(count, 1), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    validation = {ordered[i] for i in order[:count]}
    return {case_id: "val" if case_id in validation else "train" for case_id in ordered}


def list_path(out_dir: Path, split: str, kind: str) -> Path:
    """``OUT/<split>_<kind>_list.txt``."""
    return out_dir / f"{split}_{kind}_list.txt"


def write_lists(out_dir: Path, results: Sequence[CaseResult]) -> dict[str, int]:
    """Write the ten aligned lists; returns the number of rows per split."""
    rows = {}
    for split in SPLITS:
        cases = [r.case_id for r in sorted(results, key=lambda r: r.case_id) if r.status in SUCCEEDED and r.split == split]
        for kind, file_name in OUTPUT_FILES.items():
            write_text_atomic(list_path(out_dir, split, kind), "".join(f"{CASES_DIR}/{c}/{file_name}\n" for c in cases))
        rows[split] = len(cases)
    return rows


def fragment(out_dir: Path, kinds: Sequence[str], splits: Sequence[str]) -> dict[str, Any]:
    """The ``data:`` fragment pointing a config's datasets at the lists of ``splits``; a split without cases is
    set to null, which removes the config's own block for it (no validation without validation cases)."""
    blocks: dict[str, Any] = {}
    for split, block in SPLITS.items():
        lists = {f"{kind}_list": str(list_path(out_dir.resolve(), split, kind)) for kind in kinds}
        blocks[block] = {"params": lists} if split in splits else None
    return {"data": {"params": blocks}}


def write_fragments(out_dir: Path, rows: dict[str, int]) -> list[Path]:
    """Write ``data.yaml``, ``data_linet.yaml`` and ``data_vq.yaml`` (splits without cases set to null)."""
    splits = [split for split in SPLITS if rows.get(split)]
    written = []
    for name, kinds in STAGE_LISTS.items():
        header = (f"# Data lists written by prepare_dataset.py; merge after a config:\n"
                  f"#   python pipeline/main.py --base {STAGE_CONFIGS[name]} {out_dir / name} -t\n")
        body = yaml.safe_dump(fragment(out_dir, kinds, splits), sort_keys=False)
        written.append(write_text_atomic(out_dir / name, header + body))
    return written


def write_run_report(out_dir: Path, dataset: str, results: Sequence[CaseResult], options: PrepareOptions,
                     settings: dict[str, Any], seconds: float) -> Path:
    """Write ``prepare_report.json`` (module docstring)."""
    summary = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    report = {
        "dataset": dataset,
        "options": {**asdict(options), **settings},
        "summary": {**summary, "cases": len(results), "seconds": round(seconds, 3),
                    **{f"{split}_rows": sum(r.split == split and r.status in SUCCEEDED for r in results)
                       for split in SPLITS}},
        "lists": {f"{split}_{kind}": list_path(Path("."), split, kind).name for split in SPLITS for kind in OUTPUT_FILES},
        "cases": [asdict(result) for result in results],
    }
    return write_json_atomic(out_dir / REPORT_FILE, report)
