"""synthesize.py: the whole chain (preprocess -> LMNet -> LINet) in one call, on the real example CT."""
import nibabel as nib
import numpy as np
import pytest
from conftest import TOTALSEG_EXAMPLE, require_shared
from omegaconf import OmegaConf
from test_inference_fixtures import saved_test_configs

import synthesize
from inference.runner import run_inference
from ldm.errors import LesionDiffusionError


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return saved_test_configs(tmp_path_factory.mktemp("synth_configs"))


def run(configs, out, cts, segs, gate=False, **extra):
    # Random weights: the gate (on by default) rejects their lesions; test_synthesize_gate.py tests it.
    return synthesize.synthesize(cts, "liver", "cyst", out, segs=segs, seg_version="v2",
                                 lmnet_config=configs["lmnet"], linet_config=configs["linet"], spacing=[3.0],
                                 progress=False, gate=gate, **extra)


def test_one_call_from_a_healthy_ct_to_a_ct_with_a_lesion(configs, tmp_path):
    example = require_shared(TOTALSEG_EXAMPLE)
    ct, seg = example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"
    missing = tmp_path / "absent.nii.gz"
    rows = run(configs, tmp_path / "out", [ct, missing], [seg, seg], seed=3)
    first, second = rows
    assert first.ok, first.error
    assert first.case_id == "example_ct_sm" and second.stage == "preprocess" and "absent.nii.gz" in second.error
    written = nib.load(first.outputs["linet_standardised"])
    standardised = nib.load(tmp_path / "out" / "example_ct_sm" / "ct.nii.gz")
    np.testing.assert_array_equal(written.affine, standardised.affine)
    assert written.shape == standardised.shape and written.get_data_dtype() == standardised.get_data_dtype()
    assert nib.load(first.outputs["linet_image"]).shape == nib.load(ct).shape
    mask = np.asanyarray(nib.load(first.outputs["lmnet_mask"]).dataobj)
    assert (mask == 2).any()
    assert first.outputs["linet_preview"].endswith("inpainting_0.png")
    lines = synthesize.table(rows)
    assert lines[-1] == "synthesize: 2 CT(s), 1 done, 1 failed"
    assert any("FAILED in preprocess" in line for line in lines)


def test_command_line_reports_bad_input_in_one_line(configs, tmp_path, capsys):
    example = require_shared(TOTALSEG_EXAMPLE)
    status = synthesize.main(["--ct", str(example / "example_ct_sm.nii.gz"), "--organ", "liver", "--lesion", "cyst",
                              "--out", str(tmp_path / "out"), "--attributes", "[1, 2]",
                              "--lmnet-config", str(configs["lmnet"]), "--linet-config", str(configs["linet"])])
    assert status == 1
    assert capsys.readouterr().err.strip() == "synthesize.py: error: --attributes '[1, 2]': expected a JSON object"
    with pytest.raises(SystemExit):
        synthesize.main(["--organ", "liver"])
    status = synthesize.main(["--ct", "x.nii.gz", "--organ", "liver", "--lesion", "cyst", "--out", str(tmp_path),
                              "--seg", "a.nii.gz", "b.nii.gz", "--lmnet-config", str(configs["lmnet"]),
                              "--linet-config", str(configs["linet"])])
    assert status == 1 and "give one --seg per --ct" in capsys.readouterr().err


def test_quiet_rerun_reuses_the_results_and_the_table_shows_warnings(configs, tmp_path, capfd):
    example = require_shared(TOTALSEG_EXAMPLE)
    ct, seg = example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"
    argv = ["--ct", str(ct), "--seg", str(seg), "--seg-version", "v2", "--organ", "liver", "--lesion", "cyst",
            "--out", str(tmp_path / "out"), "--spacing", "3", "--steps", "2", "--no-progress",
            "--lmnet-config", str(configs["lmnet"]), "--linet-config", str(configs["linet"]),
            "--set", "inference.hu_tolerance=0.001", "--no-gate"]
    assert synthesize.main(argv) == 0
    first = capfd.readouterr()
    assert "it/s" not in first.err and "%|" not in first.err      # no progress bar of any stage
    assert "warning: linet: lesion 0: mean" in first.out            # the HU sanity check, per lesion
    written = tmp_path / "out" / "example_ct_sm" / "inpainting_0.nii.gz"
    stamp = written.stat().st_mtime_ns
    assert synthesize.main(argv) == 0
    second = capfd.readouterr()
    assert written.stat().st_mtime_ns == stamp and not (written.parent / "inpainting_1.nii.gz").exists()
    assert second.out.splitlines()[-1] == first.out.splitlines()[-1]


def test_a_lesion_that_cannot_fit_fails_before_lmnet(configs, tmp_path):
    example = require_shared(TOTALSEG_EXAMPLE)
    ct, seg = example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"
    size = {"size": "[[18 18 6]] pixel,"}
    (row,) = run(configs, tmp_path / "out", [ct], [seg], attributes=size)
    # LMNet crop 16 in y and x; LINet crop 24 less a one-voxel rim (2 mm at 3 mm) on each side: 16 x 16 x 30.
    assert row.stage == "preprocess" and "larger than [16, 16, 30] voxels (X, Y, Z)" in row.error
    assert not (tmp_path / "out" / "lmnet_report.json").exists()
    # A folder prepared for larger crops, then run with the small ones: the preflight names the problem and
    # LMNet samples nothing.
    (row,) = run(configs, tmp_path / "big", [ct], [seg], attributes=size, overrides=["inference.crop_size=[32,24,24]"])
    assert row.ok, row.error
    config = OmegaConf.load(configs["lmnet"])
    config.inference.exp_dir = str(tmp_path / "big")
    config.inference.overwrite = False
    (refused,) = run_inference(config).results
    assert refused.error.startswith("preflight: box 0 spans [6, 18, 18] voxels (z, y, x)")
    assert not (tmp_path / "big" / "example_ct_sm" / "samples_1.nii.gz").exists()


def test_missing_weights_are_named_before_any_work(configs, tmp_path):
    config = OmegaConf.load(configs["linet"])
    config.model.params.ckpt_path = str(tmp_path / "absent.ckpt")
    OmegaConf.save(config, tmp_path / "linet.yaml")
    with pytest.raises(LesionDiffusionError, match="absent.ckpt: checkpoint not found"):
        run({"lmnet": configs["lmnet"], "linet": tmp_path / "linet.yaml"}, tmp_path / "out", ["x.nii.gz"], None)
    assert not (tmp_path / "out").exists()
