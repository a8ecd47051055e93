"""NIfTI I/O: canonical (z, y, x) arrays, exact round trips on the file grid for any orientation, clear errors."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from ldm.data.volume import read_geometry, read_label, read_volume, write_volume
from ldm.errors import DataError


def assert_same_file_content(written, original):
    a, b = nib.load(str(written)), nib.load(str(original))
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_real_ras_ct_round_trip(totalseg_example, tmp_path):
    source = totalseg_example / "example_ct_sm.nii.gz"
    array, geometry = read_volume(source)
    assert geometry.axcodes == ("R", "A", "S")
    assert array.shape == (30, 101, 122) == geometry.shape_zyx
    assert geometry.spacing_zyx == pytest.approx((3.0, 3.0, 3.0))
    assert -1100 <= array.min() < -900 and array.max() > 500
    written = write_volume(tmp_path / "ct.nii.gz", array, geometry, dtype=np.int16)
    assert_same_file_content(written, source)


def test_real_lps_label_round_trip(upstream_demo, tmp_path):
    source = upstream_demo / "Liver_cancer" / "label.nii.gz"
    labels, geometry = read_label(source)
    assert geometry.axcodes == ("L", "P", "S")
    assert labels.dtype == np.int16 and set(np.unique(labels)) <= {0, 1, 2}
    written = write_volume(tmp_path / "label.nii.gz", labels, geometry, dtype=np.float32)
    assert_same_file_content(written, source)


def test_canonical_orientation_is_las_whatever_the_file(totalseg_example, upstream_demo):
    """The same world point maps to the same canonical index: LAS means +x index = towards patient left."""
    for path in (totalseg_example / "example_ct_sm.nii.gz", upstream_demo / "Bladder_cancer" / "label.nii.gz"):
        geometry = read_geometry(path)
        assert nib.aff2axcodes(geometry.canonical_affine) == ("L", "A", "S")


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("P", "S", "R")])
def test_synthetic_orientations_round_trip_and_agree_in_world(tmp_path, axcodes):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(7, 9, 11)).astype(np.int16)
    ornt = nib.orientations.axcodes2ornt(axcodes)
    affine = nib.orientations.inv_ornt_aff(ornt, data.shape) @ np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] += (10.0, -20.0, 5.0)
    source = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(source))
    array, geometry = read_volume(source)
    written = write_volume(tmp_path / "out.nii.gz", array, geometry, dtype=np.int16)
    assert_same_file_content(written, source)
    # A voxel found in memory at (z, y, x) has the world position of that voxel in the file.
    z, y, x = 2, 3, 4
    world_from_memory = geometry.canonical_affine @ np.array([x, y, z, 1.0])
    file_index = np.linalg.solve(affine, world_from_memory)[:3]
    assert np.allclose(file_index, np.round(file_index))
    assert data[tuple(np.round(file_index).astype(int))] == array[z, y, x]


def test_oblique_affine_round_trip(tmp_path):
    angle = np.deg2rad(17)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.8, 2.0])
    data = np.arange(5 * 6 * 4, dtype=np.float32).reshape(5, 6, 4)
    source = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(source))
    array, geometry = read_volume(source)
    written = write_volume(tmp_path / "copy.nii.gz", array * 1, geometry)
    assert_same_file_content(written, source)


def test_write_rejects_wrong_shape_and_name(tmp_path, totalseg_example):
    array, geometry = read_volume(totalseg_example / "example_ct_sm.nii.gz")
    with pytest.raises(DataError, match="does not match"):
        write_volume(tmp_path / "x.nii.gz", array[:-1], geometry)
    with pytest.raises(DataError, match="not a NIfTI file name"):
        write_volume(tmp_path / "x.png", array, geometry)
    assert not any(tmp_path.iterdir())


def test_integer_outputs_are_rounded_and_clipped(tmp_path):
    source = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(source))
    _, geometry = read_volume(source)
    values = np.array([-40000.0, 1.6, 2.4, 40000.0, 0, 0, 0, 0]).reshape(2, 2, 2)
    write_volume(tmp_path / "i.nii.gz", values, geometry, dtype=np.int16)
    back, _ = read_volume(tmp_path / "i.nii.gz")
    assert back.min() == -32768 and back.max() == 32767
    assert np.count_nonzero(back == 2) == 2  # 1.6 and 2.4 both round to 2


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not a NIfTI file name"):
        read_volume(text)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), str(good))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt.nii.gz: cannot read"):
        read_volume(corrupt)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match="garbage.nii.gz: cannot read"):
        read_volume(garbage)
    fractional = tmp_path / "fractional.nii.gz"
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), str(fractional))
    with pytest.raises(DataError, match="fractional.nii.gz: expected a label map"):
        read_label(fractional)
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), str(four_d))
    with pytest.raises(DataError, match="four_d.nii.gz: expected a 3D volume"):
        read_volume(four_d)
