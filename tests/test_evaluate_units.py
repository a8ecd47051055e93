"""Unit tests of the quality measurements and checks on small hand-made arrays (no files unless needed)."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from ldm.data.volume import read_geometry, read_label, write_volume
from ldm.errors import ConfigError
from ldm.data.components import ranked_components
from ldm.lesion import ATTRIBUTES, Verdict
from ldm.lesion.measure import margin_gradient
from quality.gate import grade
from quality.measure import LesionQuality, box_assignment, changed_outside
from quality.plot import equivalent_diameter_mm
from quality.tolerances import CHECKS, Tolerances, load_tolerances, resolve_tolerances, tolerances_from_mapping


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre)) <= radius ** 2


def quality(**values) -> LesionQuality:
    base = dict(case="c", output="c/inpainting_0.nii.gz", mask="c/samples_0.nii.gz", lesion=0, organ="liver",
                organ_id=5, voxels=100, volume_mm3=100.0, extent_vox=(5, 5, 5), mean_hu=20.0, std_hu=5.0,
                margin_gradient_hu_per_mm=10.0, components=1, changed_outside_voxels=0,
                changed_outside_max_abs_hu=0.0, requested_size_vox=(5, 5, 5), requested_volume_mm3=65.4,
                volume_ratio=1.5, extent_ratio_min=1.0, extent_ratio_max=1.0, inside_organ_fraction=1.0,
                requested_hu=30.0, hu_error=-10.0, organ_reference_hu=60.0, contrast_hu=-40.0,
                interior_mean_hu=20.0, attributes=verdicts())
    return LesionQuality(**{**base, **values})


def verdicts(**changed) -> list[Verdict]:
    """Every attribute agreeing, except ``changed`` (attribute with underscores -> verdict)."""
    return [Verdict(name, "x,", "x,", changed.get(name.replace(" ", "_"), "agree")) for name in ATTRIBUTES]


def test_margin_gradient_of_a_linear_ramp_is_its_slope_in_hu_per_mm():
    spacing = (2.0, 0.5, 1.0)
    z = np.arange(12)[:, None, None] * spacing[0]
    image = np.broadcast_to(7.5 * z, (12, 10, 10)).astype(np.float32)
    lesion = np.zeros(image.shape, dtype=bool)
    lesion[4:8, 3:7, 3:7] = True
    assert margin_gradient(image, lesion, spacing) == pytest.approx(7.5)


def test_a_sharp_edge_is_steeper_than_a_blurred_one():
    from scipy import ndimage

    lesion = ball((24, 24, 24), (12, 12, 12), 6)
    sharp = np.where(lesion, 0.0, 60.0)
    blurred = ndimage.gaussian_filter(sharp, 2.0)
    # A 60 HU step across one voxel: central differences give 30 HU/mm per axis crossing the edge, so between
    # 30 (a face) and 30 sqrt(3) (a corner) on the rims.
    assert 30.0 <= margin_gradient(sharp, lesion, (1.0, 1.0, 1.0)) <= 30.0 * math.sqrt(3)
    assert margin_gradient(blurred, lesion, (1.0, 1.0, 1.0)) < 0.5 * margin_gradient(sharp, lesion, (1.0, 1.0, 1.0))


def test_changed_outside_allows_exactly_the_paste_region():
    lesion = np.zeros((30, 30, 30), dtype=bool)
    lesion[14:16, 14:16, 14:16] = True
    ct = np.zeros(lesion.shape, dtype=np.float32)
    inside = ct.copy()
    inside[lesion] = 100.0
    inside[15, 15, 15 + 2] = 7.0  # 2 voxels of 0.8 mm = 1.6 mm from the lesion: inside a 2 mm rim
    assert changed_outside(ct, inside, lesion, 2.0, (1.0, 1.0, 0.8)) == (0, 0.0)
    outside = inside.copy()
    outside[15, 15, 15 + 3] = -9.0  # 2.4 mm: outside
    outside[0, 0, 0] = 4.0
    assert changed_outside(ct, outside, lesion, 2.0, (1.0, 1.0, 0.8)) == (2, 9.0)
    assert changed_outside(ct, outside, lesion, 2.5, (1.0, 1.0, 0.8)) == (1, 4.0)


def test_components_are_ranked_largest_first_and_grouped_by_their_box():
    lesions = np.zeros((10, 20, 20), dtype=bool)
    lesions[2:4, 2:4, 2:4] = True        # 8 voxels, box 1
    lesions[2:4, 6:9, 2:5] = True        # 18 voxels, box 1 (a second piece)
    lesions[6:9, 12:16, 12:16] = True    # 48 voxels, box 2
    lesions[0, 19, 19] = True            # 1 voxel, no box
    components, ranked, _ = ranked_components(lesions)
    assert [int((components == label).sum()) for label in ranked] == [48, 18, 8, 1]
    boxes = np.zeros(lesions.shape, dtype=np.int16)
    boxes[1:5, 1:10, 1:6] = 2
    boxes[5:10, 11:17, 11:17] = 2
    assigned = box_assignment(components, len(ranked), boxes)
    by_rank = [int(assigned[label]) for label in ranked]
    assert by_rank[3] == 0 and by_rank[1] == by_rank[2] != by_rank[0] != 0
    assert box_assignment(components, len(ranked), None).tolist() == [0] * 5


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("R", "A", "S"), ("S", "R", "A")])
def test_extents_are_reported_along_the_file_axes(tmp_path, axcodes):
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    file_shape = (12, 16, 20)
    file_array = np.zeros(file_shape, dtype=np.uint8)
    file_array[2:5, 3:10, 4:9] = 2  # extents 3, 7, 5 along file axes i, j, k
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(axcodes))
    affine = np.diag([1.0, 2.0, 3.0, 1.0]) @ inv_ornt_aff(transform, file_shape)
    nib.save(nib.Nifti1Image(file_array, affine), str(tmp_path / "mask.nii.gz"))
    mask, geometry = read_label(tmp_path / "mask.nii.gz")
    assert nib.aff2axcodes(geometry.affine) == axcodes
    extent_zyx = [int(np.ptp(np.argwhere(mask == 2)[:, axis])) + 1 for axis in range(3)]
    assert tuple(extent_zyx[axis] for axis in geometry.memory_axes) == (3, 7, 5)
    write_volume(tmp_path / "back.nii.gz", mask, geometry, dtype=np.uint8)
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "back.nii.gz")).dataobj), file_array)
    assert read_geometry(tmp_path / "back.nii.gz").shape == file_shape


def test_grade_passes_and_fails_each_check_on_its_own():
    tolerances = Tolerances()
    graded = grade(quality(), tolerances)
    assert graded.passed and all(graded.checks[name] is True for name in CHECKS)
    cases = {"hu": dict(hu_error=50.5), "density": dict(attributes=verdicts(density="disagree")),
             "inside_organ": dict(inside_organ_fraction=0.89), "volume": dict(volume_ratio=2.01),
             "extent": dict(extent_ratio_max=1.6), "components": dict(components=2),
             "unchanged_outside": dict(changed_outside_voxels=1)}
    for check, values in cases.items():
        graded = grade(quality(**values), tolerances)
        assert graded.failed_checks == [check] and not graded.passed
    graded = grade(quality(attributes=verdicts(density_variations="disagree", shape="disagree")), tolerances)
    assert graded.failed_checks == ["attributes (density variations)"]  # shape does not fail by default
    assert graded.failed_attributes == ["density variations"]
    strict = tolerances.with_overrides(fail_attributes=("shape", "density variations"))
    assert grade(quality(attributes=verdicts(density_variations="disagree", shape="disagree")),
                 strict).failed_attributes == ["shape", "density variations"]
    not_applicable = verdicts(density="n/a", **{name.replace(" ", "_"): "n/a" for name in tolerances.fail_attributes})
    graded = grade(quality(requested_hu=None, hu_error=None, attributes=not_applicable, volume_ratio=None,
                           extent_ratio_min=None, extent_ratio_max=None), tolerances)
    assert graded.passed and [name for name, verdict in graded.checks.items() if verdict is None] == [
        "hu", "density", "volume", "extent", "attributes"]
    relaxed = grade(quality(hu_error=80.0), tolerances.with_overrides(disabled=("hu",)))
    assert relaxed.passed and relaxed.checks["hu"] is None


def test_tolerance_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "quality.toml"
    path.write_text('[tolerances]\nhu_abs = 30\nvolume_ratio = [0.5, 1.5]\ndisabled = ["extent"]\n')
    tolerances = load_tolerances(path)
    assert (tolerances.hu_abs, tolerances.volume_ratio, tolerances.disabled) == (30, (0.5, 1.5), ("extent",))
    assert tolerances.iso_band_hu == Tolerances().iso_band_hu
    assert resolve_tolerances(tmp_path) == tolerances
    assert resolve_tolerances(tmp_path / "elsewhere") == Tolerances()
    for text, message in (("[tolerances]\nhu = 3\n", "unknown tolerance"), ("[limits]\n", "unknown table"),
                          ("[tolerances]\nvolume_ratio = [2, 1]\n", "above high"),
                          ("[tolerances]\nhu_abs = -1\n", "hu_abs"), ("[tolerances\n", "not a valid TOML"),
                          ('[tolerances]\ndisabled = ["size"]\n', "unknown check"),
                          ('[tolerances]\nfail_attributes = ["colour"]\n', "unknown attribute")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_tolerances(path)
    with pytest.raises(ConfigError, match="max_components"):
        tolerances_from_mapping({"max_components": 1.5})
    assert set(Tolerances().as_dict()) >= {"hu_abs", "disabled"} and len(CHECKS) == 8


def test_equivalent_diameter_of_the_inscribed_ellipsoid_is_the_geometric_mean_axis():
    axes_mm = (6.0, 9.0, 12.0)
    volume = math.pi / 6 * np.prod(axes_mm)
    assert equivalent_diameter_mm(volume) == pytest.approx(np.prod(axes_mm) ** (1 / 3))
