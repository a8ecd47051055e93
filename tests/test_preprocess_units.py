"""Preprocessing building blocks: vocabulary, report format, user attributes, standardisation, box placement."""
import json

import nibabel as nib
import numpy as np
import pytest

from ldm.data.volume import read_geometry
from ldm.errors import DataError
from preprocessing.bbox import BoxPlacementError, box_problem, boxes_mask, centre_candidates, place_boxes
from preprocessing.inputs import case_ids, read_cases
from preprocessing.report_format import format_ct_value, format_size, parse_ct_value, parse_size
from preprocessing.standardise import labels_on_grid, respaced_grid, standardise_ct
from preprocessing.user_attributes import interpret_attributes, parse_attribute_line
from ldm.data.vocabulary import VocabularyError, canonical_value, split_phrases


# --- vocabulary ---------------------------------------------------------------------------------------------------

def test_canonical_value_normalises_case_spacing_and_commas():
    assert canonical_value("enhancement status", "Enhanced CT") == "enhanced ct,"
    assert canonical_value("shape", "Round-like , protrusion into the lumen") == "round-like,protrusion into the lumen,"
    assert canonical_value("specific features", "") == ""


def test_phrases_containing_commas_are_matched_whole():
    assert split_phrases("shape", "irregular,wall thickening,") == ["irregular,wall thickening"]
    value = "presence of increased attenuation areas, presence of decreased attenuation areas,"
    assert split_phrases("specific features", value) == [
        "presence of increased attenuation areas, presence of decreased attenuation areas"]


def test_vocabulary_errors_name_the_attribute_and_suggest():
    with pytest.raises(VocabularyError, match=r"density: 'hypodens lesion' is not in the vocabulary; did you mean 'hypodense lesion'"):
        canonical_value("density", "hypodens lesion,")
    with pytest.raises(VocabularyError, match="takes one phrase"):
        canonical_value("density", "hypodense lesion,isodense lesion,")
    with pytest.raises(VocabularyError, match="empty value"):
        canonical_value("shape", "")


def test_cavity_is_restricted_to_the_organ_kind():
    assert canonical_value("cavity", "wall thickening", hollow=True) == "wall thickening,"
    with pytest.raises(VocabularyError, match="is for solid organs; for this hollow organ use one of"):
        canonical_value("cavity", "within the parenchymal organ", hollow=True)
    with pytest.raises(VocabularyError, match="not in the vocabulary"):
        canonical_value("cavity", "inside", hollow=False)


# --- report format and user attributes -----------------------------------------------------------------------------

def test_size_and_ct_value_round_trip_the_original_strings():
    assert format_size((28, 29, 26)) == "[[28 29 26]] pixel,"
    assert parse_size("[[28 29 26]] pixel,") == (28, 29, 26)
    assert parse_size([[3, 4, 5]]) == (3, 4, 5)
    assert format_ct_value(57.4) == "Mean density of the lesion region is approximately 57 HU,"
    assert parse_ct_value(format_ct_value(-12)) == -12
    for bad in ([0, 1, 2], [1.5, 2, 3], "[[1 2]] pixel", [True, 2, 3]):
        with pytest.raises(DataError, match="size"):
            parse_size(bad)
    with pytest.raises(DataError, match="outside the CT range"):
        parse_ct_value(5000)


def test_user_attributes_are_checked_and_canonical():
    raw = parse_attribute_line('{"organ type": "Kidney_Left", "lesion type": "cyst", "density": "Hypodense lesion", '
                               '"size": [4, 5, 6], "CT value": "12 HU"}', "a.txt line 1")
    attributes = interpret_attributes(raw, "a.txt line 1")
    assert (attributes.organ_id, attributes.organ_name, attributes.hollow) == (3, "kidney left", False)
    assert attributes.fixed == {"density": "hypodense lesion,", "size": (4, 5, 6), "CT value": 12}
    with pytest.raises(DataError, match=r"a.txt line 2: not valid JSON"):
        parse_attribute_line('{"organ type": "liver",', "a.txt line 2")
    with pytest.raises(DataError, match=r"line 3: unknown organ name 'livr'; did you mean 'liver'"):
        interpret_attributes({"organ type": "livr", "lesion type": "cyst"}, "line 3")
    with pytest.raises(DataError, match=r"line 4: 'lesion type' is required"):
        interpret_attributes({"organ type": "liver"}, "line 4")
    with pytest.raises(DataError, match=r"line 5: unknown attribute 'colour'"):
        interpret_attributes({"organ type": "liver", "lesion type": "cyst", "colour": "red"}, "line 5")


def test_case_ids_are_unique_per_row():
    paths = ["/a/p1/ct.nii.gz", "/a/p2/ct.nii.gz", "/b/p1/ct.nii.gz", "/c/liver 1.nii"]
    assert case_ids(paths) == ["ct-1", "p2_ct", "ct-3", "liver_1"]


def test_attribute_file_shorter_than_the_file_list_names_the_case(tmp_path):
    (tmp_path / "imgs.txt").write_text("a.nii.gz\nb.nii.gz\n")
    (tmp_path / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "cyst"}\n\n')
    with pytest.raises(DataError, match=r"attrs.txt has 1 attribute lines but .*imgs.txt has 2 CTs: case 2 \(.*b.nii.gz\)"):
        read_cases(tmp_path / "imgs.txt", tmp_path / "attrs.txt")


# --- standardisation ------------------------------------------------------------------------------------------------

def _ramp_image(tmp_path, affine, shape, dtype=np.float32):
    """A volume whose value is a linear function of the world position (so linear resampling is exact)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    values = world @ np.array([0.7, -0.3, 1.1]) + 5.0
    path = tmp_path / "ramp.nii.gz"
    nib.save(nib.Nifti1Image(values.astype(dtype), affine), str(path))
    return path, values


def test_standardise_gives_lps_target_spacing_and_the_same_world(tmp_path):
    affine = np.array([[2.0, 0, 0, -40.0], [0, 1.5, 0, 12.0], [0, 0, 3.0, 90.0], [0, 0, 0, 1]])  # RAS, anisotropic
    source, _ = _ramp_image(tmp_path, affine, (20, 16, 10))
    before = source.read_bytes()
    target = standardise_ct(source, tmp_path / "out" / "ct.nii.gz", (1.0, 1.0, 1.5))
    assert source.read_bytes() == before
    image = nib.load(str(target))
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert np.allclose(np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0)), (1.0, 1.0, 1.5))
    assert np.allclose(image.header.get_zooms(), (1.0, 1.0, 1.5))
    assert np.allclose(image.header.get_sform(), image.affine) and np.allclose(image.header.get_qform(), image.affine)
    assert image.shape == (40, 24, 20)
    # The field of view keeps its centre: the world position of the middle of the grid is unchanged.
    old_centre = affine @ np.r_[(np.array([20, 16, 10]) - 1) / 2, 1]
    new_centre = image.affine @ np.r_[(np.array(image.shape) - 1) / 2, 1]
    assert np.allclose(old_centre, new_centre)
    # Each voxel holds the ramp's value at its own world position (interior voxels; edges are extrapolated).
    data = image.get_fdata()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), axis=-1).astype(np.float64)
    world = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    expected = world @ np.array([0.7, -0.3, 1.1]) + 5.0
    interior = (slice(2, -2), slice(2, -2), slice(2, -2))
    assert np.allclose(data[interior], expected[interior], atol=1e-3)


def test_respaced_grid_is_identity_at_the_same_spacing():
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    new_affine, shape, index_map = respaced_grid(affine, (10, 11, 12), (3.0, 3.0, 3.0))
    assert shape == (10, 11, 12) and np.allclose(index_map, np.eye(4)) and np.allclose(new_affine, affine)


def test_labels_follow_world_coordinates_onto_another_grid(tmp_path):
    labels = np.zeros((8, 6, 4), dtype=np.uint8)
    labels[1:3, 2:5, 1:3] = 5
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(labels, ras), str(tmp_path / "seg.nii.gz"))
    ct = standardise_ct(tmp_path / "seg.nii.gz", tmp_path / "ct.nii.gz", (1.0, 1.0, 1.0))
    resampled = labels_on_grid(tmp_path / "seg.nii.gz", read_geometry(ct))
    assert resampled.shape == (16, 12, 8) and set(np.unique(resampled)) == {0, 5}
    # LPS flips x and y; each 2 mm voxel becomes 2x2x2 voxels of 1 mm.
    expected = np.repeat(np.repeat(np.repeat(labels[::-1, ::-1, :], 2, 0), 2, 1), 2, 2)
    assert np.array_equal(resampled, expected)


# --- lesion boxes ---------------------------------------------------------------------------------------------------

def _sphere(shape=(40, 40, 40), radius=12.0, centre=(20, 20, 20)):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ((grid - np.asarray(centre)) ** 2).sum(axis=-1) <= radius ** 2


def test_within_rule_puts_the_whole_box_inside_the_organ():
    organ = _sphere()
    size = (9, 6, 11)
    for seed in range(5):
        (start, stop), = place_boxes(organ, size, 1, "within the parenchymal organ,", False, np.random.default_rng(seed))
        assert tuple(b - a for a, b in zip(start, stop)) == size
        assert organ[tuple(slice(a, b) for a, b in zip(start, stop))].all()


def test_within_candidates_match_a_brute_force_scan():
    organ = _sphere((16, 14, 12), 5.5, (8, 7, 6))
    size = (4, 3, 5)
    fast = centre_candidates(organ, size, "within")
    brute = np.zeros_like(organ)
    for c in np.argwhere(organ):
        start = c - np.asarray(size) // 2
        if np.all(start >= 0) and np.all(start + size <= organ.shape):
            brute[tuple(c)] = organ[tuple(slice(a, a + s) for a, s in zip(start, size))].all()
    assert np.array_equal(fast, brute)


def test_hollow_and_protruding_rules_place_the_centre_where_the_rule_says():
    organ = _sphere(radius=14.0)
    lumen = centre_candidates(organ, (3, 3, 3), "lumen")
    wall = centre_candidates(organ, (3, 3, 3), "wall")
    surface = centre_candidates(organ, (3, 3, 3), "surface")
    assert lumen.any() and wall.any() and not (lumen & wall).any() and np.array_equal(lumen | wall, organ)
    assert surface.sum() < wall.sum() and (surface <= wall).all()
    size = np.array((7, 7, 7))
    (start, stop), = place_boxes(organ, size, 1, "protruding from the parenchymal organ", False, np.random.default_rng(1))
    box = organ[tuple(slice(a, b) for a, b in zip(start, stop))]
    assert box.any() and not box.all()
    (start, _), = place_boxes(organ, size, 1, "wall thickening,", True, np.random.default_rng(2))
    assert wall[tuple(np.asarray(start) + size // 2)]


def test_boxes_are_seeded_separate_and_clamped():
    organ = np.zeros((30, 30, 30), dtype=bool)
    organ[:12, :, :] = True  # touches the image border
    args = (organ, (6, 6, 6), 4, "protruding from the parenchymal organ", False)
    first = place_boxes(*args, np.random.default_rng(7))
    assert first == place_boxes(*args, np.random.default_rng(7))
    assert first != place_boxes(*args, np.random.default_rng(8))
    mask = boxes_mask(organ.shape, first)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 2} and (mask == 2).sum() == 4 * 216
    for number, (start, stop) in enumerate(first):
        assert min(start) >= 0 and all(b <= 30 for b in stop)
        for other_start, other_stop in first[number + 1:]:
            gap = [max(a0 - b1, b0 - a1) for a0, a1, b0, b1 in zip(start, stop, other_start, other_stop)]
            assert max(gap) >= 1  # separated by at least one voxel along some axis


def test_a_box_that_cannot_fit_fails_with_the_organ_and_size():
    organ = _sphere(radius=4.0)
    with pytest.raises(BoxPlacementError, match=r"organ liver too small for a box of \[9 9 9\] \(X Y Z\) voxels"):
        place_boxes(organ, (9, 9, 9), 1, "within the parenchymal organ", False, np.random.default_rng(0), "liver")
    assert box_problem(organ, (3, 3, 3), 1, "within the parenchymal organ", False) is None
    assert "room for only" in box_problem(organ, (5, 5, 5), 30, "within the parenchymal organ", False)


def test_report_json_of_the_demo_parses_with_our_format(upstream_demo):
    report = json.loads((upstream_demo / "Liver_cancer" / "type.json").read_text())
    attributes = report["5"][2]
    assert parse_size(attributes["size"]) == (28, 29, 26)
    assert parse_ct_value(attributes["CT value"]) == 57
    for name in ("shape", "density", "density variations", "surface characteristics", "specific features"):
        assert canonical_value(name, attributes[name]) == attributes[name].lower()
