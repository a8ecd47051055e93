"""Results on the user's own grid: synthesize.py into the real example CT (RAS, 3 mm) and into a phantom stored
oblique, anisotropic and scaled (uint16 with an intercept); only the lesion and its rim change, bit for bit."""
import nibabel as nib
import numpy as np
import pytest
from conftest import TOTALSEG_EXAMPLE, require_shared
from scipy import ndimage
from test_inference_fixtures import saved_test_configs

import synthesize
from demo.make_phantoms import make_phantoms
from inference.paste import lesion_region
from inference.source_grid import measure_changes, voxel_sizes

RIM_MM = 2.0


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return saved_test_configs(tmp_path_factory.mktemp("grid_configs"))


def assert_on_input_grid(row, ct_path):
    """Output and label on the grid of ``ct_path``; stored values beyond the rim bit-identical; returns
    ``(changed voxels outside the lesion, max distance in mm of a changed voxel from the lesion)``."""
    assert row.ok, row.error
    source, output, label = (nib.load(path) for path in (ct_path, row.outputs["linet_image"],
                                                          row.outputs["linet_label"]))
    for written in (output, label):
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert int(written.header["qform_code"]) == int(source.header["qform_code"])
        assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    assert output.get_data_dtype() == source.get_data_dtype() and label.get_data_dtype() == np.uint8
    assert (output.dataobj.slope, output.dataobj.inter) == (source.dataobj.slope, source.dataobj.inter)
    values = np.asanyarray(label.dataobj)
    assert set(np.unique(values)) <= {0, 1, 2} and (values == 2).any() and (values == 1).any()
    lesion = values == 2
    spacing = voxel_sizes(source.affine)
    stored, original = output.dataobj.get_unscaled(), source.dataobj.get_unscaled()
    beyond = ~lesion_region(lesion, RIM_MM, spacing)
    assert np.array_equal(stored[beyond], original[beyond])
    changed = stored != original
    outside = changed & ~lesion
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    measured = measure_changes(ct_path, row.outputs["linet_image"], row.outputs["linet_label"])
    assert measured["changed_in_lesion"] == int(changed[lesion].sum()) > 0
    assert measured["changed_outside_lesion"] == int(outside.sum())
    assert measured["max_distance_mm"] == round(float(distance[outside].max(initial=0.0)), 2)
    return measured["changed_outside_lesion"], measured["max_distance_mm"]


def test_synthesis_into_the_real_ct_stays_on_its_grid(configs, tmp_path):
    example = require_shared(TOTALSEG_EXAMPLE)
    ct, seg = example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"
    kwargs = dict(segs=[seg], seg_version="v2", lmnet_config=configs["lmnet"], linet_config=configs["linet"],
                  spacing=[1.0], seed=5, progress=False, overrides=["inference.steps=2"],
                  gate=False)  # random weights: the gate would reject the lesion (test_synthesize_gate.py)
    (row,) = synthesize.synthesize([ct], "liver", "cyst", tmp_path / "a", **kwargs)
    outside, reach = assert_on_input_grid(row, ct)
    assert outside == 0 and reach == 0.0   # 3 mm voxels, 2 mm rim: only lesion voxels change
    standardised = nib.load(row.outputs["linet_standardised"])
    assert standardised.shape == (366, 303, 90) and nib.aff2axcodes(standardised.affine) == ("L", "P", "S")
    (again,) = synthesize.synthesize([ct], "liver", "cyst", tmp_path / "b", **kwargs)
    for kind in ("linet_image", "linet_label"):
        assert np.array_equal(np.asanyarray(nib.load(again.outputs[kind]).dataobj),
                              np.asanyarray(nib.load(row.outputs[kind]).dataobj))


def _oblique_scaled_phantom(root):
    """A healthy phantom rewritten as uint16 with intercept -1024, on an oblique, anisotropic grid."""
    phantoms = make_phantoms(root / "phantoms", n=1, seed=2, shape=(32, 64, 64), spacing=(2.5, 1.5, 1.2),
                             progress=False)
    case = root / "phantoms" / "case_000"
    angle = np.deg2rad(12.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    paths = {}
    for name, dtype in (("healthy", np.uint16), ("seg", np.uint8)):
        image = nib.load(case / f"{name}.nii.gz")
        affine = rotation @ image.affine
        data = np.asanyarray(image.dataobj)
        if name == "healthy":
            data = (data.astype(np.int32) + 1024).astype(dtype)
        written = nib.Nifti1Image(data, affine)
        written.set_qform(affine, code=1)
        written.set_sform(affine, code=2)
        if name == "healthy":
            written.header.set_slope_inter(1.0, -1024.0)
        paths[name] = root / f"oblique_{name}.nii.gz"
        nib.save(written, paths[name])
    assert phantoms["manifest"]["cases"][0]["organ"]
    return paths, phantoms["manifest"]["cases"][0]["organ"]


def test_synthesis_into_an_oblique_scaled_anisotropic_phantom(configs, tmp_path):
    paths, organ = _oblique_scaled_phantom(tmp_path)
    (row,) = synthesize.synthesize([paths["healthy"]], organ, "cyst", tmp_path / "out", segs=[paths["seg"]],
                                   lmnet_config=configs["lmnet"], linet_config=configs["linet"], spacing=[1.0],
                                   seed=1, progress=False, overrides=["inference.steps=2"], gate=False)
    outside, reach = assert_on_input_grid(row, paths["healthy"])
    assert reach < RIM_MM and outside > 0   # 1.2-1.5 mm in-plane voxels: the 2 mm rim holds a few voxels
    assert nib.load(row.outputs["linet_image"]).get_data_dtype() == np.uint16
