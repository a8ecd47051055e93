"""LMNet then LINet on the real CT of the TotalSegmentator example (RAS, 3 mm, int16, v2 labels), tiny random
models; crops taller than the 30-slice volume exercise the padding (the original sliced with negative starts)."""
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import TOTALSEG_EXAMPLE, require_shared
from scipy import ndimage
from test_inference_fixtures import inference_config, save_checkpoint, totalseg_experiment

from ldm.data.attributes import short_ct_value
from ldm.data.volume import read_label, read_volume
from inference.paste import lesion_region
from inference.runner import run_inference

LIVER_V2 = 5
CROP = [32, 16, 16]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    example = require_shared(TOTALSEG_EXAMPLE)
    root = tmp_path_factory.mktemp("totalseg")
    seg, _ = read_label(example / "example_seg.nii.gz")
    depth = ndimage.distance_transform_edt(seg == LIVER_V2)
    centre = np.unravel_index(int(np.argmax(depth)), depth.shape)
    box = tuple(slice(c - half, c + half + 1) for c, half in zip(centre, (1, 2, 2)))
    exp_dir = totalseg_experiment(root, example, box)
    settings = {"seg_version": "v2", "crop_size": CROP}
    lmnet = run_inference(inference_config("lmnet", save_checkpoint("lmnet", root / "lmnet.ckpt"), exp_dir, **settings))
    linet = run_inference(inference_config("linet", save_checkpoint("linet", root / "linet.ckpt"), exp_dir, **settings))
    return {"example": example, "exp": exp_dir, "box": box, "lmnet": lmnet, "linet": linet}


def test_lmnet_mask_on_the_real_ct_grid(example_run):
    (result,) = example_run["lmnet"].results
    assert result.ok, result.error
    assert result.lesions[0].organ == "liver" and result.outputs["mask"].endswith("totalseg-example/samples_0.nii.gz")
    written, ct = nib.load(result.outputs["mask"]), nib.load(example_run["example"] / "example_ct_sm.nii.gz")
    np.testing.assert_array_equal(written.affine, ct.affine)
    assert written.shape == ct.shape == (122, 101, 30) and nib.aff2axcodes(written.affine) == ("R", "A", "S")
    mask, _ = read_label(result.outputs["mask"])
    seg, _ = read_label(example_run["example"] / "example_seg.nii.gz")
    box = np.zeros(mask.shape, dtype=bool)
    box[example_run["box"]] = True
    assert (mask == 2).any() and ((mask == 2) <= box).all()
    assert np.array_equal(mask == 1, (seg == LIVER_V2) & (mask != 2))


def test_linet_keeps_every_voxel_outside_the_lesion_region(example_run):
    (result,) = example_run["linet"].results
    assert result.ok, result.error
    source = nib.load(example_run["example"] / "example_ct_sm.nii.gz")
    output = nib.load(result.outputs["image"])
    np.testing.assert_array_equal(output.affine, source.affine)
    assert output.shape == source.shape and output.get_data_dtype() == source.get_data_dtype() == np.int16
    mask, geometry = read_label(example_run["lmnet"].results[0].outputs["mask"])
    outside = geometry.to_file(~lesion_region(mask == 2, 2.0, geometry.spacing_zyx))
    assert np.array_equal(np.asanyarray(output.dataobj)[outside], np.asanyarray(source.dataobj)[outside])
    inpainted, _ = read_volume(result.outputs["image"])
    original, _ = read_volume(example_run["example"] / "example_ct_sm.nii.gz")
    assert not np.array_equal(inpainted[mask == 2], original[mask == 2])
    assert original.min() < -1000 and inpainted.min() == original.min()   # no HU clipping outside the lesion
    assert (example_run["exp"] / "totalseg-example" / "inpainting_0.png").stat().st_size > 1000


def test_preprocess_then_lmnet_then_linet(tmp_path, monkeypatch):
    """The real chain: preprocess.py (TotalSegmentator v2 file given, offline report, two boxes), then both
    stages reading exactly what the previous step wrote."""
    import preprocess

    example = require_shared(TOTALSEG_EXAMPLE)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs.txt").write_text(f"{example / 'example_ct_sm.nii.gz'}\n")
    (tmp_path / "segs.txt").write_text(f"{example / 'example_seg.nii.gz'}\n")
    (tmp_path / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "cyst"}\n')
    assert preprocess.main(["imgs.txt", "exp", "attrs.txt", "--seg-list", "segs.txt", "--seg-version", "v2",
                            "--spacing", "3", "--reporter", "offline", "--boxes-per-case", "2",
                            "--no-progress"]) == 0
    exp_dir = tmp_path / "exp"
    lmnet = run_inference(inference_config("lmnet", save_checkpoint("lmnet", tmp_path / "lmnet.ckpt"), exp_dir,
                                           crop_size=[32, 16, 16]))
    (masks,) = lmnet.results
    assert masks.ok, masks.error
    assert len(masks.lesions) == 2 and masks.outputs["mask"] == str(exp_dir / "example_ct_sm" / "samples_0.nii.gz")
    mask, geometry = read_label(masks.outputs["mask"])
    components, count = ndimage.label(mask == 2)
    assert count >= 2 and geometry.axcodes == ("L", "P", "S")
    linet = run_inference(inference_config("linet", save_checkpoint("linet", tmp_path / "linet.ckpt"), exp_dir,
                                           crop_size=[32, 24, 24]))
    (inpainted,) = linet.results
    assert inpainted.ok, inpainted.error
    report = json.loads((exp_dir / "example_ct_sm" / "type.json").read_text())
    requested = float(short_ct_value(report["5"][2]["CT value"]).split()[0])
    assert [lesion.requested_hu for lesion in inpainted.lesions] == [requested, requested]
    # The standardised result (the grid the models ran on) beside the one on the user's grid.
    ct = nib.load(exp_dir / "example_ct_sm" / "ct.nii.gz")
    standardised = nib.load(inpainted.outputs["standardised"])
    np.testing.assert_array_equal(standardised.affine, ct.affine)
    assert standardised.shape == ct.shape and standardised.get_data_dtype() == ct.get_data_dtype()
    outside = geometry.to_file(~lesion_region(mask == 2, 2.0, geometry.spacing_zyx))
    assert np.array_equal(np.asanyarray(standardised.dataobj)[outside], np.asanyarray(ct.dataobj)[outside])
    source = nib.load(example / "example_ct_sm.nii.gz")
    output, label = nib.load(inpainted.outputs["image"]), nib.load(inpainted.outputs["label"])
    for written in (output, label):
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.shape == source.shape
    user_lesion = np.asanyarray(label.dataobj) == 2
    assert user_lesion.any() and np.array_equal(output.dataobj.get_unscaled()[~user_lesion],
                                                source.dataobj.get_unscaled()[~user_lesion])
