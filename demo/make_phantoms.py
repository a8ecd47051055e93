"""Seeded synthetic abdominal CT phantoms with one lesion each, in the LesionDiffusion data format.

Per case ``case_XXX/``: ``image.nii.gz`` (HU, int16), ``healthy.nii.gz`` (the same CT without the lesion),
``label.nii.gz`` (0 background / 1 target organ / 2 lesion), ``seg.nii.gz`` (TotalSegmentator v1 ids) and
``type.json`` (a structured report whose attributes are measured on the drawn lesion). The out dir gets the
list files ``{train,val}_{image,label,type,seg,coarseg}_list.txt`` (entries relative to the list's directory),
``healthy_list.txt`` (healthy CTs of the val cases) and the manifest ``phantoms.json``.

    python demo/make_phantoms.py --out demo/data --n 8 --seed 0 [--shape Z Y X] [--spacing S] [--overwrite]
        [--lesions mixed|attributes]

``--lesions mixed`` (default): the lesion kinds of :data:`demo.phantom_lesions.LESION_KINDS` take turns (cysts,
tumours, kidney, spleen and bladder lesions). ``--lesions attributes``: one liver lesion per case whose
attributes are drawn at random and independently (the data set that shows whether a model obeys the text):
density hypo / iso / hyper against the liver (``ATTRIBUTE_OFFSET_HU``), shape round or lobulated, margin sharp or
fading, density variations homogeneous or two-part (``TWO_PART_HU``; iso lesions are homogeneous: in two parts
they would be mixed-density), and size (``ATTRIBUTE_RADIUS_MM``, all three in :mod:`demo.phantom_lesions`). The
report is written from the construction in the
``type.json`` vocabulary; the manifest entry names the drawn density class.

Case ``i`` depends only on ``(seed, i)`` and the grid, so the same seed gives identical arrays. Arrays are drawn
in the canonical ``(z, y, x)`` LAS frame of :mod:`ldm.data.volume` and written in the requested orientation (LPS
by default, as the upstream demo). The report's ``size`` and ``[3]`` element count voxels along the file's
axes (x, y, z for LPS/RAS files), as the original preprocess did.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

_ROOT = Path(__file__).resolve().parents[1]
for _path in (str(_ROOT / "pipeline"), str(_ROOT)):  # the pipeline's packages, and demo/ as a package
    if _path not in sys.path:
        sys.path.insert(0, _path)

from demo.phantom_lesions import FOCAL_LESION, Lesion, draw_lesion  # noqa: E402
from ldm.cli import add_version, examples  # noqa: E402
from ldm.data.organs import is_hollow, organ_id  # noqa: E402
from ldm.data.synthetic_geometry import (  # noqa: E402
    Grid, geometry_for, random_blob, smooth_field, within_distance,
)
from ldm.data.volume import Geometry, write_volume  # noqa: E402
from ldm.fileio import write_text_atomic  # noqa: E402
from ldm.util import PIPELINE_DIR  # noqa: E402
from ldm.errors import ConfigError, DataError, LesionDiffusionError  # noqa: E402
from ldm.lesion.thresholds import DEFAULT as THRESHOLDS  # noqa: E402

FORMAT_VERSION = 1
MANIFEST_NAME = "phantoms.json"
CASE_FILES = ("image.nii.gz", "healthy.nii.gz", "label.nii.gz", "seg.nii.gz", "type.json")
LIST_FILES = {"image": "image.nii.gz", "label": "label.nii.gz", "type": "type.json", "seg": "seg.nii.gz",
              "coarseg": "seg.nii.gz"}
ORIENTATIONS = {"LPS": ("L", "P", "S"), "RAS": ("R", "A", "S")}
MIN_SHAPE = (32, 64, 64)
# Organs as ellipsoids, (centre, semi-axes) in body units (z/hz, y/ry, x/rx) with +z superior, +y anterior,
# +x towards the patient's left (canonical LAS), and HU. Later entries are painted over earlier ones.
ORGANS = {
    "liver": ((0.50, 0.05, -0.40), (0.60, 0.55, 0.42), 60.0),
    "spleen": ((0.50, -0.25, 0.55), (0.38, 0.38, 0.22), 50.0),
    "kidney right": ((-0.05, -0.36, -0.38), (0.40, 0.24, 0.18), 35.0),
    "kidney left": ((0.05, -0.36, 0.38), (0.40, 0.24, 0.18), 35.0),
    "urinary bladder": ((-0.70, 0.30, 0.0), (0.25, 0.38, 0.28), 5.0),
}
HU_THRESHOLD_DENSITY = 10.0  # |lesion - organ| mean HU below this is "isodense"
CLOSE_TO_OTHER_ORGAN_MM = 5.0
CAVITY = {"solid": "within the parenchymal organ,", "hollow": "wall thickening,"}
LESION_SETS = ("mixed", "attributes")
CYSTIC_SHAPE_PROBABILITY = 0.3  # a round fluid-like lesion is called "cystic" this often, as the offline reporter does
VERTEBRAE = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2", "T1")
def _phrase(rng: np.random.Generator, vocabulary: dict, attribute: str, group: int) -> str:
    """A random synonym of ``description.json[attribute][group]``, lower-case with one trailing comma."""
    synonyms = vocabulary[attribute][group]
    return synonyms[int(rng.integers(len(synonyms)))].lower().rstrip(",") + ","


def _draw_anatomy(rng: np.random.Generator, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Healthy anatomy: returns (HU before smoothing and noise, TotalSegmentator v1 label map), both ``(z, y, x)``."""
    hz, hy, hx = grid.half_extent
    rx, ry = 0.86 * hx * rng.uniform(0.93, 1.0), 0.66 * hy * rng.uniform(0.93, 1.0)
    z, y, x = grid.coordinates()
    girth = 1.0 + 0.04 * np.sin(np.pi * z / hz + rng.uniform(0, 2 * np.pi))
    fat = rng.uniform(0.07, 0.12) * ry
    body = (x / (rx * girth)) ** 2 + (y / (ry * girth)) ** 2 < 1.0
    inner = (x / (rx * girth - fat)) ** 2 + (y / (ry * girth - fat)) ** 2 < 1.0
    fat_hu = rng.uniform(-110, -90)
    hu = np.full(grid.shape, -1000.0)
    hu[body] = fat_hu
    soft_tissue = 40.0 + 6.0 * smooth_field(rng, grid, 40.0)
    hu[inner] = soft_tissue[inner]
    hu[inner & (smooth_field(rng, grid, 30.0) > 1.3)] = fat_hu  # mesenteric fat between the organs
    seg = np.zeros(grid.shape, dtype=np.int16)
    for name, (centre, semi, organ_hu) in ORGANS.items():
        scale = np.array([hz, ry, rx])
        jitter = rng.uniform(-0.03, 0.03, size=3)
        semi_mm = np.array(semi) * scale * rng.uniform(0.92, 1.08, 3)
        blob = random_blob(rng, (np.array(centre) + jitter) * scale, semi_mm, irregularity=0.12, max_tilt_deg=12.0)
        organ = blob.mask(grid) & inner
        seg[organ] = organ_id(name)
        hu[organ] = organ_hu + rng.uniform(-4, 4)
    bladder = seg == organ_id("urinary bladder")
    hu[bladder & ~ndimage.binary_erosion(bladder)] = 35.0  # bladder wall around the fluid
    _draw_spine_and_aorta(rng, grid, rx, ry, body, hu, seg)
    return hu, seg


def _draw_spine_and_aorta(rng, grid: Grid, rx: float, ry: float, body, hu: np.ndarray, seg: np.ndarray) -> None:
    """Paint vertebrae (body, arch, spinous process; discs between levels) and the aorta into ``hu``/``seg``."""
    z, y, x = grid.coordinates()
    hz = grid.half_extent[0]
    radius = 0.17 * rx
    centre_y = -0.42 * ry
    vertebral_body = (x / radius) ** 2 + ((y - centre_y) / (0.8 * radius)) ** 2 < 1.0
    cortex = vertebral_body & ~((x / (radius - 2.5)) ** 2 + ((y - centre_y) / (0.8 * radius - 2.5)) ** 2 < 1.0)
    canal_y, canal_radius = centre_y - 0.8 * radius - 0.38 * radius, 0.42 * radius
    canal_distance = np.sqrt(x ** 2 + (y - canal_y) ** 2)
    canal = canal_distance < canal_radius
    arch = (canal_distance < canal_radius + 0.3 * radius) & ~canal & ~vertebral_body
    spinous = (np.abs(x) < 0.25 * radius) & (y < canal_y) & (y > centre_y - 2.4 * radius)
    period = rng.uniform(30.0, 34.0)
    position = z + hz + rng.uniform(0.0, period)
    level = np.floor(position / period).astype(int)
    disc = np.mod(position, period) < 0.25 * period
    hu_bone = np.where(cortex, 700.0, rng.uniform(380.0, 450.0))
    for index in np.unique(level):
        if index >= len(VERTEBRAE):
            break
        slab = (level == index) & ~disc & body
        vertebra = slab & (vertebral_body | arch | spinous)
        hu[vertebra] = np.broadcast_to(np.where(vertebral_body, hu_bone, 600.0), grid.shape)[vertebra]
        seg[vertebra] = organ_id(f"vertebrae {VERTEBRAE[index]}")
    for soft_part, soft_hu in ((disc & vertebral_body, 90.0), (canal, 10.0)):  # intervertebral discs, spinal canal
        voxels = np.broadcast_to(soft_part, grid.shape) & body
        hu[voxels], seg[voxels] = soft_hu, 0
    aorta_radius = 0.09 * rx
    aorta_y = centre_y + 0.8 * radius + aorta_radius + 1.5
    aorta = ((x - 0.3 * radius) ** 2 + (y - aorta_y) ** 2 < aorta_radius ** 2) & (z > -0.5 * hz) & body
    hu[aorta], seg[aorta] = rng.uniform(150.0, 170.0), organ_id("aorta")


def _report(rng, lesion: Lesion, image: np.ndarray, seg: np.ndarray, geometry: Geometry, spacing) -> tuple[dict, dict]:
    """The structured report (``type.json`` content) and the manifest entry, both measured on the written arrays."""
    vocabulary = json.loads((PIPELINE_DIR / "description.json").read_text())
    key = organ_id(lesion.organ)
    organ = seg == key
    mean_hu = float(image[lesion.mask].mean())
    organ_mean = float(image[organ & (lesion.weight == 0)].mean())
    difference = mean_hu - organ_mean
    fluid = lesion.kind == "cyst" or (lesion.kind == FOCAL_LESION and not lesion.heterogeneous
                                      and THRESHOLDS.fluid_hu[0] <= mean_hu <= THRESHOLDS.fluid_hu[1])
    if difference < -HU_THRESHOLD_DENSITY:
        density = _phrase(rng, vocabulary, "density", 4 if fluid else 0)
    else:
        density = _phrase(rng, vocabulary, "density", 2 if difference > HU_THRESHOLD_DENSITY else 1)
    close = within_distance(lesion.mask, (seg != 0) & ~organ, spacing, CLOSE_TO_OTHER_ORGAN_MM)
    hollow = is_hollow(key)
    shape = _phrase(rng, vocabulary, "shape", 2 if hollow else (1 if lesion.irregular else 0))
    if lesion.kind == FOCAL_LESION and fluid and not lesion.irregular and rng.random() < CYSTIC_SHAPE_PROBABILITY:
        shape = _phrase(rng, vocabulary, "shape", 4)
    # Size and centre along the file's voxel axes, as the original preprocess wrote them (x, y, z for LPS/RAS).
    file_box = ndimage.find_objects(geometry.to_file(lesion.mask).astype(np.int8))[0]
    size = [int(axis.stop - axis.start) for axis in file_box]
    features = ""
    if lesion.heterogeneous:
        features = _phrase(rng, vocabulary, "specific features", 1) + _phrase(rng, vocabulary, "specific features", 0)
    attributes = {
        "enhancement status": _phrase(rng, vocabulary, "enhancement status", 0),
        "lesion location": str(key),
        "shape": shape,
        "size": f"[[{size[0]} {size[1]} {size[2]}]] pixel,",
        "density": density,
        "density variations": _phrase(rng, vocabulary, "density variations", 1 if lesion.heterogeneous else 0),
        "CT value": f"Mean density of the lesion region is approximately {int(round(mean_hu))} HU,",
        "surface characteristics": _phrase(rng, vocabulary, "surface characteristics", 3 if lesion.blurred else 0),
        "relationship with adjacent organs": _phrase(rng, vocabulary, "relationship with adjacent organs", int(close)),
        "specific features": features,
        "cavity": CAVITY["hollow" if hollow else "solid"],
    }
    centre = [int(axis.start + axis.stop - 1) // 2 for axis in file_box]
    report = {str(key): [shape, "", attributes, [[centre], [size]]]}
    box = ndimage.find_objects(lesion.mask.astype(np.int8))[0]
    entry = {
        "organ": lesion.organ, "organ_id": key, "lesion_type": lesion.kind, "lesion_voxels": int(lesion.mask.sum()),
        "mean_hu": round(mean_hu, 2), "organ_mean_hu": round(organ_mean, 2),
        "bbox_zyx": [[int(axis.start) for axis in box], [int(axis.stop) for axis in box]],
        "irregular": bool(lesion.irregular), "blurred_margin": bool(lesion.blurred),
        "heterogeneous": bool(lesion.heterogeneous),
        "density": "hypo" if difference < -HU_THRESHOLD_DENSITY else ("hyper" if difference > HU_THRESHOLD_DENSITY
                                                                        else "iso"),
    }
    return report, entry


def render_case(seed: int, index: int, geometry: Geometry, lesions: str = "mixed") -> dict:
    """Draw case ``index`` of dataset ``seed`` (``lesions``: one of :data:`LESION_SETS`); returns the ``(z, y, x)``
    arrays ``image``/``healthy`` (int16 HU), ``label``/``seg`` (uint8), the ``report`` dict and the manifest
    ``entry``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx)
    clean, seg = _draw_anatomy(rng, grid)
    healthy_smooth = ndimage.gaussian_filter(clean, sigma=0.6)  # partial-volume edges
    lesion = draw_lesion(rng, grid, index, clean, seg, lesions)
    with_lesion = healthy_smooth + lesion.weight * (lesion.values - healthy_smooth)
    noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape), sigma=0.5)
    noise *= rng.uniform(10.0, 15.0) / noise.std()
    healthy = np.clip(np.rint(healthy_smooth + noise), -1024, 3071).astype(np.int16)
    image = np.clip(np.rint(with_lesion + noise), -1024, 3071).astype(np.int16)
    label = np.where(lesion.mask, 2, np.where(seg == organ_id(lesion.organ), 1, 0)).astype(np.uint8)
    report, entry = _report(rng, lesion, image, seg, geometry, grid.spacing)
    return {"image": image, "healthy": healthy, "label": label, "seg": seg.astype(np.uint8), "report": report,
            "entry": entry}


def _parameters(n, seed, shape, spacing, orientation, lesions) -> dict:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    spacing = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]
    if orientation not in ORIENTATIONS:
        raise ConfigError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if lesions not in LESION_SETS:
        raise ConfigError(f"lesions must be one of {', '.join(LESION_SETS)}, got {lesions!r}")
    geometry = geometry_for(shape, spacing, ORIENTATIONS[orientation])
    if any(s < m for s, m in zip(geometry.shape_zyx, MIN_SHAPE)):
        raise ConfigError(f"shape {tuple(geometry.shape_zyx)} is too small; use at least {MIN_SHAPE} (z, y, x)")
    return {"version": FORMAT_VERSION, "n": int(n), "seed": int(seed), "shape": list(geometry.shape_zyx),
            "spacing": list(geometry.spacing_zyx), "orientation": orientation, "lesions": lesions}


def _list_paths(out: Path) -> dict[str, Path]:
    paths = {f"{split}_{name}_list": out / f"{split}_{name}_list.txt"
             for split in ("train", "val") for name in LIST_FILES}
    paths["healthy_list"] = out / "healthy_list.txt"
    return paths


def _read_manifest(path: Path) -> dict | None:
    """The manifest of an earlier run in the out dir, or None when there is none (or it is not ours)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("parameters"), dict) else None


def _is_complete(out: Path, manifest: dict) -> bool:
    cases = [entry.get("case", "") for entry in manifest.get("cases", [])]
    files = [out / case / name for case in cases for name in CASE_FILES] + list(_list_paths(out).values())
    return len(cases) == manifest["parameters"]["n"] and all(path.is_file() for path in files)


def _remove_stale_cases(out: Path, old: dict | None, keep: set[str]) -> None:
    """Delete the files of cases an earlier run wrote that the new dataset no longer has (only our file names)."""
    for entry in (old or {}).get("cases", []):
        case = str(entry.get("case", ""))
        if case and case not in keep and Path(case).name == case and case not in (".", ".."):
            for name in CASE_FILES:
                (out / case / name).unlink(missing_ok=True)
            if (out / case).is_dir() and not any((out / case).iterdir()):
                (out / case).rmdir()


def make_phantoms(out_dir, n: int = 8, seed: int = 0, shape=(48, 96, 96), spacing=2.0, overwrite: bool = False,
                  orientation: str = "LPS", progress: bool = True, lesions: str = "mixed") -> dict:
    """Write ``n`` phantom cases and their list files under ``out_dir`` (see the module docstring).

    ``shape``: ``(z, y, x)`` voxels; ``spacing``: mm, one number or ``(z, y, x)``; ``orientation``: ``"LPS"``
    (as the upstream demo) or ``"RAS"``; ``progress``: show a progress bar on stderr; ``lesions``: ``"mixed"`` (the
    lesion kinds of :data:`LESION_KINDS` in turn) or ``"attributes"`` (liver lesions with independent attributes).
    A complete dataset with the same parameters is left as it is; other contents raise DataError unless
    ``overwrite``. Returns ``{"out_dir", "lists": {name: path}, "manifest_path", "manifest", "generated"}``
    (``generated`` is False when nothing had to be written).
    """
    parameters = _parameters(n, seed, shape, spacing, orientation, lesions)
    out = Path(out_dir).expanduser().resolve()
    manifest_path = out / MANIFEST_NAME
    old = _read_manifest(manifest_path)
    lists = _list_paths(out)
    result = {"out_dir": str(out), "lists": {name: str(path) for name, path in lists.items()},
              "manifest_path": str(manifest_path)}
    if old is not None and old["parameters"] == parameters and _is_complete(out, old) and not overwrite:
        return {**result, "manifest": old, "generated": False}
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not overwrite:
        if old is not None and old["parameters"] != parameters:
            raise DataError(f"{out}: holds phantoms made with other parameters ({old['parameters']}); pass --overwrite "
                            "(overwrite=True) to replace them, or choose another --out")
        if old is None and out.is_dir() and any(out.iterdir()):
            raise DataError(f"{out}: not empty and not a complete phantom dataset; pass --overwrite (overwrite=True) "
                            "to write into it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    geometry = geometry_for(parameters["shape"], parameters["spacing"], ORIENTATIONS[orientation])
    names = [f"case_{index:03d}" for index in range(parameters["n"])]
    _remove_stale_cases(out, old, set(names))
    entries = []
    for index in tqdm(range(parameters["n"]), desc="phantoms", unit="case", disable=not progress):
        case = render_case(parameters["seed"], index, geometry, lesions)
        folder = out / names[index]
        for name, dtype in (("image", np.int16), ("healthy", np.int16), ("label", np.uint8), ("seg", np.uint8)):
            write_volume(folder / f"{name}.nii.gz", case[name], geometry, dtype=dtype)
        write_text_atomic(folder / "type.json", json.dumps(case["report"]) + "\n")
        entries.append({"case": names[index], **case["entry"]})
    val_count = max(1, round(parameters["n"] / 4))
    splits = {"train": names[: len(names) - val_count], "val": names[len(names) - val_count:]}
    for entry in entries:
        entry["split"] = "val" if entry["case"] in splits["val"] else "train"
    for split, cases in splits.items():
        for name, file_name in LIST_FILES.items():
            write_text_atomic(lists[f"{split}_{name}_list"], "".join(f"{case}/{file_name}\n" for case in cases))
    write_text_atomic(lists["healthy_list"], "".join(f"{case}/healthy.nii.gz\n" for case in splits["val"]))
    manifest = {"generator": "demo/make_phantoms.py", "parameters": parameters, "train_cases": splits["train"],
                "val_cases": splits["val"], "cases": entries}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return {**result, "manifest": json.loads(json.dumps(manifest)), "generated": True}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write seeded synthetic abdominal CT phantoms with lesions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples("python demo/make_phantoms.py --out demo/data --n 8 --seed 0",
                        "python demo/make_phantoms.py --out phantoms_ras --orientation RAS --spacing 2.5 1.6 1.6"))
    parser.add_argument("--out", required=True, help="output folder (created; relative to the current directory)")
    parser.add_argument("--n", type=int, default=8, help="number of cases (default 8; the last quarter is val)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96], metavar=("Z", "Y", "X"),
                        help="voxels per case (default 48 96 96)")
    parser.add_argument("--spacing", type=float, nargs="+", default=[2.0], metavar="MM",
                        help="voxel size in mm: one value or three (z y x) (default 2.0)")
    parser.add_argument("--orientation", choices=sorted(ORIENTATIONS), default="LPS", help="file orientation")
    parser.add_argument("--lesions", choices=LESION_SETS, default="mixed",
                        help="mixed: the lesion kinds in turn (default); attributes: liver lesions whose density, "
                             "shape, margin, density variations and size are drawn independently")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.spacing) not in (1, 3):
        parser.error("--spacing takes one value or three (z y x)")
    started = time.perf_counter()
    try:
        result = make_phantoms(args.out, n=args.n, seed=args.seed, shape=args.shape,
                               spacing=args.spacing[0] if len(args.spacing) == 1 else args.spacing,
                               overwrite=args.overwrite, orientation=args.orientation, lesions=args.lesions)
    except LesionDiffusionError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    manifest = result["manifest"]
    counts = f"{len(manifest['train_cases'])} train, {len(manifest['val_cases'])} val"
    if not result["generated"]:
        print(f"Up to date: {result['out_dir']} already holds these {manifest['parameters']['n']} phantom cases "
              f"({counts}); pass --overwrite to regenerate")
        return 0
    print(f"Wrote {manifest['parameters']['n']} phantom cases ({counts}) to {result['out_dir']} in "
          f"{time.perf_counter() - started:.1f} s")
    print(f"  lists: {{train,val}}_{{image,label,type,seg,coarseg}}_list.txt, healthy_list.txt; "
          f"manifest: {MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
