"""Phantom generator: files and lists, label/seg ids, reports that agree with the drawn lesion, HU ranges,
geometry, determinism, reruns. The shared dataset is seed 0 with 5 cases: one of each lesion kind, covering
sharp/blurred margins, homogeneous/heterogeneous texture, round/irregular shape and hypo/iso/hyperdense lesions."""
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import ROOT
from demo.make_phantoms import CAVITY, make_phantoms
from ldm.data.organs import is_hollow, organ_id, organ_names
from ldm.data.synthetic_geometry import Grid, distance_inside, geometry_for, random_blob, smooth_field, within_distance
from ldm.data.volume import read_label, read_volume, write_volume
from ldm.errors import ConfigError, DataError
from ldm.util import PIPELINE_DIR

SMALL = (32, 64, 64)
LIST_NAMES = [f"{split}_{kind}_list" for split in ("train", "val")
              for kind in ("image", "label", "type", "seg", "coarseg")]
DRAWN_ORGANS = ("spleen", "kidney right", "kidney left", "liver", "aorta", "urinary bladder")
VOCABULARY = json.loads((PIPELINE_DIR / "description.json").read_text())
ATTRIBUTE_ORDER = ["enhancement status", "lesion location", "shape", "size", "density", "density variations",
                   "CT value", "surface characteristics", "relationship with adjacent organs", "specific features",
                   "cavity"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "data", n=5, seed=0, progress=False)


def load_case(out_dir, case):
    folder = out_dir / case
    image, geometry = read_volume(folder / "image.nii.gz")
    healthy, _ = read_volume(folder / "healthy.nii.gz")
    label, _ = read_label(folder / "label.nii.gz")
    seg, _ = read_label(folder / "seg.nii.gz")
    report = json.loads((folder / "type.json").read_text())
    return image, healthy, label, seg, report, geometry


def cases(dataset):
    out = Path(dataset["out_dir"])
    for entry in dataset["manifest"]["cases"]:
        yield entry, load_case(out, entry["case"])


def vocabulary_groups(attribute, value):
    """Group indices (in description.json) of the comma-terminated phrases that make up ``value``; None if it
    is not a concatenation of vocabulary phrases."""
    phrases = {synonym.lower().rstrip(",") + ",": group for group, synonyms in enumerate(VOCABULARY[attribute])
               for synonym in synonyms}
    if value == "":
        return []
    for phrase, group in sorted(phrases.items(), key=lambda item: -len(item[0])):
        if value.startswith(phrase):
            rest = vocabulary_groups(attribute, value[len(phrase):])
            if rest is not None:
                return [group] + rest
    return None


def ellipsoid_fit_iou(mask, spacing):
    """IoU of a mask with the solid ellipsoid of the same second moments (1 for an exact ellipsoid)."""
    points = np.argwhere(mask) * np.array(spacing)
    centre = points.mean(axis=0)
    inverse = np.linalg.inv(5.0 * np.cov((points - centre).T, bias=True))
    everything = np.argwhere(np.ones_like(mask)) * np.array(spacing) - centre
    fitted = (np.einsum("ni,ij,nj->n", everything, inverse, everything) <= 1.0).reshape(mask.shape)
    return (fitted & mask).sum() / (fitted | mask).sum()


def test_files_and_lists_exist_and_align(dataset):
    out = Path(dataset["out_dir"])
    manifest = dataset["manifest"]
    assert manifest["train_cases"] == ["case_000", "case_001", "case_002", "case_003"]
    assert manifest["val_cases"] == ["case_004"]
    assert set(dataset["lists"]) == set(LIST_NAMES) | {"healthy_list"}
    for name in LIST_NAMES:
        lines = (out / f"{name}.txt").read_text().splitlines()
        split_cases = manifest["train_cases" if name.startswith("train") else "val_cases"]
        assert [line.split("/")[0] for line in lines] == split_cases, name
        for line in lines:
            assert not line.startswith("/") and (out / line).is_file()  # relative to the list's directory
    assert (out / "train_seg_list.txt").read_text() == (out / "train_coarseg_list.txt").read_text()
    assert (out / "healthy_list.txt").read_text() == "case_004/healthy.nii.gz\n"
    assert json.loads((out / "phantoms.json").read_text()) == manifest
    assert manifest["parameters"] == {"version": 1, "n": 5, "seed": 0, "shape": [48, 96, 96],
                                      "spacing": [2.0, 2.0, 2.0], "orientation": "LPS", "lesions": "mixed"}


def test_volumes_dtypes_and_geometry(dataset):
    out = Path(dataset["out_dir"])
    for entry in dataset["manifest"]["cases"]:
        for name, dtype in (("image", np.int16), ("healthy", np.int16), ("label", np.uint8), ("seg", np.uint8)):
            image = nib.load(str(out / entry["case"] / f"{name}.nii.gz"))
            assert image.get_data_dtype() == dtype
            assert image.shape == (96, 96, 48)  # file axes x, y, z
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
            assert image.header.get_zooms() == (2.0, 2.0, 2.0)
            np.testing.assert_allclose(image.affine[:3, :3], np.diag([-2.0, -2.0, 2.0]))
            np.testing.assert_allclose(image.affine @ [47.5, 47.5, 23.5, 1.0], [0, 0, 0, 1])  # centred at the origin


def test_labels_and_segmentation_ids(dataset):
    valid_ids = set(organ_names())
    for entry, (image, healthy, label, seg, report, _) in cases(dataset):
        key = organ_id(entry["organ"])
        assert set(np.unique(label)) == {0, 1, 2}
        np.testing.assert_array_equal(label > 0, seg == key)  # label 1|2 is exactly the target organ
        assert np.all(seg[label == 2] == key)  # the lesion lies inside its organ
        ids = set(np.unique(seg).tolist()) - {0}
        assert ids <= valid_ids
        assert {organ_id(name) for name in DRAWN_ORGANS} <= ids
        assert ids & set(range(organ_id("vertebrae L5"), organ_id("vertebrae C1") + 1))
        assert entry["lesion_voxels"] == int((label == 2).sum())
        assert ndimage.label(label == 2)[1] == 1  # one face-connected lesion: inference sees one lesion per piece
        lesion_box = ndimage.find_objects((label == 2).astype(np.int8))[0]
        assert entry["bbox_zyx"] == [[s.start for s in lesion_box], [s.stop for s in lesion_box]]


def test_report_format_and_measured_values(dataset):
    out = Path(dataset["out_dir"])
    kinds = set()
    for entry, (image, healthy, label, seg, report, geometry) in cases(dataset):
        key = organ_id(entry["organ"])
        assert list(report) == [str(key)]
        shape, empty, attributes, (centre, size) = report[str(key)]
        assert empty == "" and shape == attributes["shape"]
        assert list(attributes) == ATTRIBUTE_ORDER
        assert attributes["lesion location"] == str(key)
        for name, value in attributes.items():
            assert value == "" or value.endswith(",") or name == "lesion location", (name, value)
            if name in VOCABULARY:
                assert vocabulary_groups(name, value) is not None, (name, value)
            if name != "CT value":
                assert value == value.lower()
        # Size: bbox extent of the lesion along the file's voxel axes, as in "[[28 29 26]] pixel,".
        file_label = np.asanyarray(nib.load(str(out / entry["case"] / "label.nii.gz")).dataobj)
        box = ndimage.find_objects((file_label == 2).astype(np.int8))[0]
        extent = [s.stop - s.start for s in box]
        assert attributes["size"] == f"[[{extent[0]} {extent[1]} {extent[2]}]] pixel,"
        assert size == [extent] and all(s.start <= c < s.stop for s, c in zip(box, centre[0]))
        lesion = label == 2
        mean_hu = float(image[lesion].mean())
        reported = re.fullmatch(r"Mean density of the lesion region is approximately (-?\d+) HU,",
                                attributes["CT value"])
        assert reported and abs(int(reported.group(1)) - mean_hu) <= 1.0
        assert abs(entry["mean_hu"] - mean_hu) < 0.01
        organ_mean = float(image[label == 1].mean())
        (density_group,) = vocabulary_groups("density", attributes["density"])
        if density_group in (0, 4):
            assert mean_hu < organ_mean - 5, "hypodense lesion must be darker than its organ"
        elif density_group == 2:
            assert mean_hu > organ_mean + 5, "hyperdense lesion must be brighter than its organ"
        else:
            assert density_group == 1 and abs(mean_hu - organ_mean) < 10
        kinds.add(density_group)
        assert attributes["cavity"] == CAVITY["hollow" if is_hollow(key) else "solid"]
        others = (seg != 0) & (seg != key)
        distance = ndimage.distance_transform_edt(~others, sampling=geometry.spacing_zyx)[lesion].min()
        relationship = attributes["relationship with adjacent organs"]
        assert vocabulary_groups("relationship with adjacent organs", relationship) == [int(distance <= 5.0)]
    assert kinds & {0, 4} and {1, 2} <= kinds  # hypo-, iso- and hyperdense lesions all checked


def test_drawn_margin_texture_and_shape_match_the_report(dataset):
    seen = set()
    for entry, (image, healthy, label, seg, report, geometry) in cases(dataset):
        attributes = report[str(organ_id(entry["organ"]))][2]
        lesion = label == 2
        changed = image.astype(np.int32) != healthy
        # Healthy differs from image only inside the organ, at the lesion and its (blurred) margin.
        assert not np.any(changed & ~(label > 0))
        assert ndimage.distance_transform_edt(~lesion)[changed].max() <= 4.0  # voxels
        assert changed[lesion].mean() > 0.5
        (margin,) = vocabulary_groups("surface characteristics", attributes["surface characteristics"])
        if margin == 0:  # well-defined: a sharp edge, nothing changes outside the lesion
            assert not np.any(changed & ~lesion)
        else:
            assert margin == 3 and np.any(changed & ~lesion), "an ill-defined margin blurs beyond the lesion"
        signal = (image.astype(np.float64) - healthy)[ndimage.binary_erosion(lesion)]
        (texture,) = vocabulary_groups("density variations", attributes["density variations"])
        if texture == 1:  # heterogeneous: both increased and decreased density areas
            assert vocabulary_groups("specific features", attributes["specific features"]) == [1, 0]
            assert signal.max() - np.median(signal) > 15 and np.median(signal) - signal.min() > 15
        else:
            assert attributes["specific features"] == "" and signal.std() < 6
        shape_groups = vocabulary_groups("shape", attributes["shape"])
        if is_hollow(organ_id(entry["organ"])):
            assert shape_groups == [2]
        else:
            fit = ellipsoid_fit_iou(lesion, geometry.spacing_zyx)
            assert (fit >= 0.87) if shape_groups == [0] else (shape_groups == [1] and fit < 0.87), (shape_groups, fit)
            seen.add(("shape", shape_groups[0]))
        seen |= {("margin", margin), ("texture", texture)}
    assert seen == {("shape", 0), ("shape", 1), ("margin", 0), ("margin", 3), ("texture", 0), ("texture", 1)}


def test_hu_ranges_are_realistic(dataset):
    for entry, (image, healthy, label, seg, report, _) in cases(dataset):
        corners = healthy[:, :4, :4]
        assert abs(np.median(corners) + 1000) <= 5 and healthy.min() >= -1024
        for name in ("liver", "spleen", "kidney right", "kidney left", "urinary bladder"):
            assert 0 <= healthy[seg == organ_id(name)].mean() <= 100, name
        vertebrae = (seg >= organ_id("vertebrae L5")) & (seg <= organ_id("vertebrae C1"))
        assert np.median(healthy[vertebrae]) > 300 and healthy.max() > 500
        assert -30 < image[label == 2].mean() < 130
        liver_core = ndimage.binary_erosion(seg == organ_id("liver"), iterations=2)
        assert 8 < healthy[liver_core].std() < 17  # noise of a homogeneous organ


def world_centroid(mask, geometry):
    """Centroid of a canonical (z, y, x) mask in world mm (RAS+)."""
    z, y, x = np.argwhere(mask).mean(axis=0)
    return (geometry.canonical_affine @ [x, y, z, 1.0])[:3]


@pytest.mark.parametrize("orientation, spacing", [("LPS", 2.0), ("RAS", (3.0, 1.5, 1.5))])
def test_geometry_and_anatomy_in_world_coordinates(dataset, tmp_path, orientation, spacing):
    if orientation == "LPS":
        out, case = Path(dataset["out_dir"]), "case_000"
    else:
        result = make_phantoms(tmp_path / "ras", n=1, seed=4, shape=SMALL, spacing=spacing, orientation="RAS",
                               progress=False)
        out, case = Path(result["out_dir"]), "case_000"
        image = nib.load(str(out / case / "image.nii.gz"))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S") and image.shape == (64, 64, 32)
        np.testing.assert_allclose(image.header.get_zooms(), (1.5, 1.5, 3.0))
    _, _, _, seg, _, geometry = load_case(out, case)
    # World is RAS+ (+x = patient right): the liver lies right of the spleen, the bladder below the liver,
    # the aorta in front of the spine.
    centroid = {name: world_centroid(seg == organ_id(name), geometry)
                for name in ("liver", "spleen", "urinary bladder", "aorta")}
    spine = world_centroid((seg >= organ_id("vertebrae L5")) & (seg <= organ_id("vertebrae C1")), geometry)
    assert centroid["liver"][0] > centroid["spleen"][0]
    assert centroid["urinary bladder"][2] < centroid["liver"][2]
    assert centroid["aorta"][1] > spine[1]


def test_same_seed_identical_different_seed_different(tmp_path):
    first = make_phantoms(tmp_path / "a", n=2, seed=7, shape=SMALL, progress=False)
    second = make_phantoms(tmp_path / "b", n=2, seed=7, shape=SMALL, progress=False)
    alone = make_phantoms(tmp_path / "c", n=1, seed=7, shape=SMALL, progress=False)
    other = make_phantoms(tmp_path / "d", n=2, seed=8, shape=SMALL, progress=False)
    roots = {name: Path(result["out_dir"]) for name, result in
             {"a": first, "b": second, "c": alone, "d": other}.items()}
    for case in ("case_000", "case_001"):
        for name in ("image.nii.gz", "healthy.nii.gz", "label.nii.gz", "seg.nii.gz", "type.json"):
            assert (roots["a"] / case / name).read_bytes() == (roots["b"] / case / name).read_bytes(), (case, name)
    # A case depends on (seed, index) only, not on how many cases are made.
    assert (roots["a"] / "case_000/image.nii.gz").read_bytes() == (roots["c"] / "case_000/image.nii.gz").read_bytes()
    for case in ("case_000", "case_001"):
        a, _ = read_volume(roots["a"] / case / "image.nii.gz")
        d, _ = read_volume(roots["d"] / case / "image.nii.gz")
        assert np.mean(a != d) > 0.5


def test_rerun_is_a_no_op_and_changes_need_overwrite(tmp_path):
    out = tmp_path / "data"
    make_phantoms(out, n=2, seed=1, shape=SMALL, progress=False)
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    again = make_phantoms(out, n=2, seed=1, shape=SMALL, progress=False)
    assert again["generated"] is False and {path: path.stat().st_mtime_ns for path in out.rglob("*")} == stamps
    with pytest.raises(DataError, match="other parameters.*--overwrite"):
        make_phantoms(out, n=2, seed=2, shape=SMALL, progress=False)
    smaller = make_phantoms(out, n=1, seed=2, shape=SMALL, overwrite=True, progress=False)
    assert smaller["generated"] and not (out / "case_001").exists()
    assert (out / "val_image_list.txt").read_text() == "case_000/image.nii.gz\n"
    assert (out / "train_image_list.txt").read_text() == ""
    (out / "case_000" / "seg.nii.gz").unlink()  # an incomplete dataset of the same parameters is regenerated
    assert make_phantoms(out, n=1, seed=2, shape=SMALL, progress=False)["generated"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty.*--overwrite"):
        make_phantoms(foreign, n=1, shape=SMALL, progress=False)


@pytest.mark.parametrize("arguments, message", [
    ({"n": 0}, "n must be a positive integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"shape": (16, 32, 32)}, "too small"),
    ({"spacing": -1.0}, "spacing must be three positive numbers"),
    ({"orientation": "LAS"}, "orientation must be one of"),
])
def test_invalid_parameters_raise_before_writing(tmp_path, arguments, message):
    with pytest.raises(ConfigError, match=message):
        make_phantoms(tmp_path / "out", **{"shape": SMALL, **arguments})
    assert not (tmp_path / "out").exists()


def test_command_line_from_another_directory(tmp_path):
    command = [sys.executable, str(ROOT / "demo" / "make_phantoms.py"), "--out", "cli", "--n", "1", "--shape", "32",
               "64", "64"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "Wrote 1 phantom cases" in first.stdout and str(tmp_path / "cli") in first.stdout
    assert (tmp_path / "cli" / "case_000" / "image.nii.gz").is_file()
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 0 and "Up to date" in second.stdout
    third = subprocess.run(command + ["--seed", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert third.returncode == 1 and "Traceback" not in third.stderr
    assert third.stderr.strip().startswith("error:") and "--overwrite" in third.stderr
    assert len(third.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("R", "A", "S"), ("P", "S", "R")])
def test_geometry_for_orientation_spacing_and_round_trip(tmp_path, axcodes):
    geometry = geometry_for((5, 6, 7), (3.0, 2.0, 1.0), axcodes)
    assert geometry.axcodes == axcodes
    assert geometry.shape_zyx == (5, 6, 7) and geometry.spacing_zyx == pytest.approx((3.0, 2.0, 1.0))
    np.testing.assert_allclose(geometry.canonical_affine @ [3.0, 2.5, 2.0, 1.0], [0, 0, 0, 1], atol=1e-12)
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    write_volume(tmp_path / "v.nii.gz", data, geometry)
    back, read_geometry = read_volume(tmp_path / "v.nii.gz", dtype=np.int16)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(read_geometry.affine, geometry.affine)
    with pytest.raises(ConfigError, match="axcodes"):
        geometry_for((5, 6, 7), (1, 1, 1), ("L", "R", "S"))
    with pytest.raises(ConfigError, match="shape must be three positive integers"):
        geometry_for((5, 6.5, 7), (1, 1, 1))
    placed = geometry_for((5, 6, 7), (1, 1, 1), axcodes, origin=(10.0, -20.0, 30.5))
    np.testing.assert_allclose(placed.affine[:3, 3], (10.0, -20.0, 30.5))


def test_shape_primitives():
    grid = Grid((40, 40, 40), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    ellipsoid = random_blob(rng, (0.5, -1.0, 2.0), (12.0, 9.0, 6.0), irregularity=0.0, max_tilt_deg=30.0)
    mask = ellipsoid.mask(grid)
    assert abs(mask.sum() / (4 / 3 * np.pi * 12 * 9 * 6) - 1) < 0.03
    assert ellipsoid_fit_iou(mask, (1.0, 1.0, 1.0)) > 0.97
    lobed = random_blob(rng, (0, 0, 0), (10.0, 10.0, 10.0), irregularity=0.6, lobes=6)
    points = np.argwhere(lobed.mask(grid)) - 19.5
    assert np.sqrt((points ** 2).sum(axis=1)).max() <= lobed.reach
    assert ellipsoid_fit_iou(lobed.mask(grid), (1.0, 1.0, 1.0)) < 0.87
    field = smooth_field(rng, grid, 10.0)
    assert abs(field.mean()) < 0.2 and 0.6 < field.std() < 1.4
    cube = np.zeros((9, 9, 9), bool)
    cube[2:7, 2:7, 2:7] = True
    depth = distance_inside(cube, (2.0, 1.0, 1.0))
    assert depth[4, 4, 4] == 3.0 and depth[2, 4, 4] == 2.0 and depth[4, 2, 4] == 1.0 and depth[0, 0, 0] == 0
    other = np.zeros_like(cube)
    other[4, 4, 8] = True
    assert within_distance(cube, other, (1.0, 1.0, 1.0), 2.0) and not within_distance(cube, other, (1.0, 1.0, 1.0), 1.5)
