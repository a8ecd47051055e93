"""``describe.py`` on the real abdominal CT of ``../shared/data/totalseg-example`` with lesions inserted in its liver:
it states what was put there (size along the file's axes, CT value, density, homogeneity, shape, cavity), on the
RAS file and an LPS copy, at its 3 mm voxels and at 1 mm; bad inputs give one line naming the file."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import describe
from ldm.data.synthetic_geometry import distance_inside
from ldm.lesion.compare import density_class

LIVER = 5  # the same id in TotalSegmentator v1 and v2
NOISE_HU = 8.0


def _lesion_in_liver(seg: np.ndarray, zooms, semi_mm=(14.0, 11.0, 9.0)) -> np.ndarray:
    """An ellipsoid around the liver voxel farthest from the liver's edge and the volume's border (file axes, mm
    from ``zooms``)."""
    liver = seg == LIVER
    depth = distance_inside(liver, zooms)
    centre = np.unravel_index(int(np.argmax(depth)), depth.shape)
    grids = np.meshgrid(*[(np.arange(n) - c) * z for n, c, z in zip(seg.shape, centre, zooms)], indexing="ij")
    return (sum((g / s) ** 2 for g, s in zip(grids, semi_mm)) <= 1.0) & liver


def _finer(array: np.ndarray, affine: np.ndarray, factor: int, box) -> tuple[np.ndarray, np.ndarray]:
    """``array[box]`` repeated ``factor`` times along each axis and the affine of that finer grid."""
    part = array[box]
    for axis in range(3):
        part = np.repeat(part, factor, axis=axis)
    start = np.array([s.start for s in box], dtype=np.float64)
    offset = start - (factor - 1) / (2.0 * factor)  # fine voxel 0 sits at coarse index start - (f-1)/(2f)
    fine = affine.copy()
    fine[:3, :3] = affine[:3, :3] / factor
    fine[:3, 3] = (affine @ np.append(offset, 1.0))[:3]
    return part, fine


def _to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [array.shape[0] - 1, array.shape[1] - 1]
    return np.ascontiguousarray(array[::-1, ::-1, :]), affine @ flip


def _write(path, array, affine, dtype, slope=None):
    image = nib.Nifti1Image(array.astype(dtype), affine)
    if slope is not None:
        image.header.set_slope_inter(*slope)
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="module")
def example():
    from conftest import TOTALSEG_EXAMPLE, require_shared

    folder = require_shared(TOTALSEG_EXAMPLE)
    ct = nib.load(str(folder / "example_ct_sm.nii.gz"))
    seg = nib.load(str(folder / "example_seg.nii.gz"))
    return (np.asanyarray(ct.dataobj).astype(np.float64), np.asanyarray(seg.dataobj).astype(np.int16),
            ct.affine.copy())


def _case(root, example, offset_hu, orientation, spacing):
    """Write CT (int16 with a slope, as scanners store it), label (lesion = 2) and v2 segmentation; returns the
    paths and what was inserted (file-axis box size and mean HU)."""
    ct, seg, affine = example
    if spacing == 1:
        liver = np.argwhere(seg == LIVER)
        box = tuple(slice(max(int(low) - 2, 0), int(high) + 3) for low, high in zip(liver.min(0), liver.max(0)))
        ct, _ = _finer(ct, affine, 3, box)
        seg, affine = _finer(seg, affine, 3, box)
    if orientation == "LPS":
        ct, _ = _to_lps(ct, affine)
        seg, affine = _to_lps(seg, affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lesion = _lesion_in_liver(seg, zooms)
    organ_hu = float(np.median(ct[seg == LIVER]))
    rng = np.random.default_rng(0)
    ct = ct.copy()
    ct[lesion] = np.rint(organ_hu + offset_hu + rng.normal(0.0, NOISE_HU, int(lesion.sum())))
    label = np.where(lesion, 2, np.where(seg == LIVER, 1, 0))
    where = np.argwhere(lesion)
    size = tuple(int(v) for v in where.max(0) - where.min(0) + 1)
    paths = (_write(root / "ct.nii.gz", np.rint(ct / 2.0), affine, np.int16, slope=(2.0, 0.0)),
             _write(root / "label.nii.gz", label, affine, np.uint8), _write(root / "seg.nii.gz", seg, affine, np.uint8))
    return paths, size, float(ct[lesion].mean()), organ_hu


@pytest.mark.parametrize("orientation,spacing", [("RAS", 3), ("LPS", 3), ("RAS", 1), ("LPS", 1)])
@pytest.mark.parametrize("offset_hu", [-50.0, 45.0])
def test_describe_states_the_inserted_lesion(tmp_path, example, orientation, spacing, offset_hu, capsys):
    (ct, label, seg), size, mean_hu, organ_hu = _case(tmp_path, example, offset_hu, orientation, spacing)
    before = [path.read_bytes() for path in (ct, label, seg)]
    out = tmp_path / "described.json"
    assert describe.main([str(ct), str(label), "--seg", str(seg), "--seg-version", "v2", "--json", str(out)]) == 0
    assert [path.read_bytes() for path in (ct, label, seg)] == before  # inputs are never written
    printed = capsys.readouterr().out
    assert "lesion 0 (liver" in printed and "interior_mean_hu" in printed
    (lesion,) = json.loads(out.read_text())
    entry = lesion["report"][str(LIVER)]
    attributes = entry[2]
    assert tuple(entry[3][1][0]) == size and attributes["size"] == f"[[{' '.join(map(str, size))}]] pixel,"
    hu = int(attributes["CT value"].split("approximately ")[1].split()[0])
    assert abs(hu - mean_hu) <= 4  # the interior mean, rounded; the rim holds a few voxels more or less
    assert density_class(attributes["density"], lung=False) == ("hypo" if offset_hu < 0 else "hyper")
    assert attributes["density variations"] == "homogeneous,"
    assert attributes["shape"] == "round-like,"
    assert attributes["cavity"] == "within the parenchymal organ,"
    assert abs(lesion["measurements"]["organ_reference_hu"] - organ_hu) <= 10
    assert lesion["measurements"]["volume_mm3"] == pytest.approx(lesion["measurements"]["voxels"] * spacing ** 3)


def _one_line_error(capsys, argv) -> str:
    assert describe.main([str(a) for a in argv]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    return error


def test_bad_inputs_give_one_line_naming_the_file(tmp_path, example, capsys):
    (ct, label, seg), _, _, _ = _case(tmp_path, example, -50.0, "RAS", 3)
    ct_image = nib.load(str(ct))
    empty = _write(tmp_path / "empty.nii.gz", np.zeros(ct_image.shape), ct_image.affine, np.uint8)
    assert str(empty) in _one_line_error(capsys, [ct, empty, "--seg", seg, "--seg-version", "v2"])
    shifted = ct_image.affine.copy()
    shifted[0, 3] += 5.0
    moved = _write(tmp_path / "moved.nii.gz", np.asanyarray(nib.load(str(label)).dataobj), shifted, np.uint8)
    error = _one_line_error(capsys, [ct, moved, "--seg", seg, "--seg-version", "v2"])
    assert str(moved) in error and "grid" in error
    error = _one_line_error(capsys, [ct, label, "--seg", seg, "--seg-version", "v2", "--organ", "brain"])
    assert str(seg) in error and "brain" in error
    error = _one_line_error(capsys, [ct, label, "--seg", seg, "--organ", "livr"])
    assert "organ_type.json" in error and "'liver'" in error
    error = _one_line_error(capsys, [ct, label])
    assert str(label) in error and "--organ" in error
