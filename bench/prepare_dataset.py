"""Speed of ``prepare_dataset.py`` and its measured attributes against lesions known by construction.

    .venv/bin/python bench/prepare_dataset.py [--spacings 3 1] [--out DIR]

Builds (in a temporary folder unless ``--out``) two nnU-Net datasets: the phantom cases of the tests (lesions
of known HU offset, shape, margin and position in the liver) and the real CT of ``../shared/data/totalseg-example``
with a hypo- and a hyperdense lesion inserted in its liver, prepares them (``--seg-dir``; the TotalSegmentator run
itself is not timed), and prints one JSON line per case (known vs measured) and per run (seconds per case).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "pipeline"), str(ROOT)]

import prepare_dataset  # noqa: E402
from ldm.lesion.compare import density_class  # noqa: E402
from tests.prepare_builders import make_case, make_example_ct_case, write_dataset_json  # noqa: E402

EXAMPLE = ROOT.parent / "shared" / "data" / "totalseg-example"
PHANTOMS = {"hypo": dict(offset_hu=-40), "hyper": dict(offset_hu=40), "lobulated": dict(offset_hu=-35, irregular=True),
            "surface": dict(offset_hu=-40, position="surface"), "varied": dict(offset_hu=-40, halves_hu=30),
            "halo": dict(offset_hu=-45, halo=True)}
EXAMPLE_CASES = {"ct_hypo": -50.0, "ct_hyper": 45.0}


def known_row(known, options: dict) -> dict:
    return {"size_vox": list(known.size_vox), "mean_hu": round(known.mean_hu, 1),
            "target_hu": round(known.organ_hu + known.offset_hu, 1), "density": "hypo" if known.offset_hu < 0 else "hyper",
            "shape": "irregular" if known.irregular else "round-like", "position": known.position,
            "heterogeneous": bool(options.get("halves_hu")), "ill_defined": bool(options.get("halo"))}


def measured_row(case: dict) -> dict:
    attributes = case["attributes"]
    return {"size": attributes["size"], "ct_value": attributes["CT value"].split("approximately ")[1],
            "density": attributes["density"], "density_class": density_class(attributes["density"], lung=False),
            "shape": attributes["shape"], "cavity": attributes["cavity"],
            "variations": attributes["density variations"], "surface": attributes["surface characteristics"],
            "features": attributes["specific features"], "enhancement": attributes["enhancement status"],
            "contrast_hu": case["lesion"]["contrast_hu"], "solidity": case["lesion"]["solidity"],
            "margin_leak": case["lesion"]["margin_leak"]}


def prepare(dataset: Path, out: Path, segs: Path, extra: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    code = prepare_dataset.main([str(dataset), str(out), "--seg-dir", str(segs), "--overwrite", "--no-progress",
                                 "--val-fraction", "0", *extra])
    seconds = time.perf_counter() - start
    report = json.loads((out / "prepare_report.json").read_text())
    if code != 0:
        raise SystemExit(f"prepare_dataset failed: {[c['error'] for c in report['cases'] if c['error']]}")
    return seconds, {case["case_id"]: case for case in report["cases"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spacings", type=float, nargs="+", default=[3.0, 1.0], help="--spacing values for the example CT")
    parser.add_argument("--out", help="work folder (default: a temporary one, removed)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        phantoms, phantom_segs = work / "Dataset911_Phantoms", work / "phantom_segs"
        phantom_segs.mkdir(parents=True, exist_ok=True)
        known = {case: (make_case(phantoms, case, index, seg_dir=phantom_segs, **options), options)
                 for index, (case, options) in enumerate(PHANTOMS.items())}
        write_dataset_json(phantoms, len(known))
        seconds, cases = prepare(phantoms, work / "out_phantoms", phantom_segs,
                                 ["--organ", "liver", "--lesion-label", "2", "--organ-label", "1", "--spacing", "2"])
        for case, (lesion, options) in known.items():
            print(json.dumps({"dataset": "phantoms", "case": case, "known": known_row(lesion, options),
                              "measured": measured_row(cases[case])}))
        print(json.dumps({"dataset": "phantoms", "spacing_mm": 2, "cases": len(cases),
                          "seconds_per_case": round(seconds / len(cases), 3)}))
        example, example_segs = work / "Dataset912_ExampleCT", work / "example_segs"
        example_segs.mkdir(parents=True, exist_ok=True)
        inserted = {}
        for seed, (case, offset) in enumerate(EXAMPLE_CASES.items()):
            inserted[case] = make_example_ct_case(example, case, EXAMPLE / "example_ct_sm.nii.gz",
                                                  EXAMPLE / "example_seg.nii.gz", offset, seed=seed)
            shutil.copy(EXAMPLE / "example_seg.nii.gz", example_segs / f"{case}.nii.gz")
        write_dataset_json(example, len(inserted), {"background": 0, "lesion": 1})
        for spacing in args.spacings:
            seconds, cases = prepare(example, work / f"out_example_{spacing:g}mm", example_segs,
                                     ["--organ", "liver", "--lesion-label", "1", "--seg-version", "v2",
                                      "--spacing", f"{spacing:g}"])
            for case, lesion in inserted.items():
                print(json.dumps({"dataset": "example_ct", "spacing_mm": spacing, "case": case,
                                  "known": known_row(lesion, {}), "measured": measured_row(cases[case]),
                                  "seconds": cases[case]["seconds"]}))
            print(json.dumps({"dataset": "example_ct", "spacing_mm": spacing, "cases": len(cases),
                              "seconds_per_case": round(seconds / len(cases), 3)}))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
