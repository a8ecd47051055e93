"""synthesize.py: the whole chain (preprocess -> LMNet -> LINet) in one call, on the real example CT."""
import nibabel as nib
import numpy as np
import pytest
from conftest import TOTALSEG_EXAMPLE, require_shared
from omegaconf import OmegaConf
from test_inference_fixtures import inference_config, save_checkpoint

import synthesize


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Test configs of tiny random LMNet/LINet models, saved as YAML files as a user would pass them."""
    root = tmp_path_factory.mktemp("synth_configs")
    paths = {}
    for stage, crop in (("lmnet", [32, 16, 16]), ("linet", [32, 24, 24])):
        config = inference_config(stage, save_checkpoint(stage, root / f"{stage}.ckpt"), None, crop_size=crop)
        paths[stage] = root / f"{stage}_test.yaml"
        OmegaConf.save(config, paths[stage])
    return paths


def run(configs, out, cts, segs, **extra):
    return synthesize.synthesize(cts, "liver", "cyst", out, segs=segs, seg_version="v2",
                                 lmnet_config=configs["lmnet"], linet_config=configs["linet"], spacing=[3.0],
                                 progress=False, **extra)


def test_one_call_from_a_healthy_ct_to_a_ct_with_a_lesion(configs, tmp_path):
    example = require_shared(TOTALSEG_EXAMPLE)
    ct, seg = example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"
    missing = tmp_path / "absent.nii.gz"
    rows = run(configs, tmp_path / "out", [ct, missing], [seg, seg], seed=3)
    first, second = rows
    assert first.ok, first.error
    assert first.case_id == "example_ct_sm" and second.stage == "preprocess" and "absent.nii.gz" in second.error
    written = nib.load(first.outputs["linet_image"])
    standardised = nib.load(tmp_path / "out" / "example_ct_sm" / "ct.nii.gz")
    np.testing.assert_array_equal(written.affine, standardised.affine)
    assert written.shape == standardised.shape and written.get_data_dtype() == standardised.get_data_dtype()
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
