"""What a new user runs into with synthesize.py, preprocess.py, test.py and evaluate.py: every check before any
model runs (checkpoints opened, output folders, thin CTs), spacing from the configs, one stage's checkpoint at a
time with its hash in every report, messages naming the flag, failed cases' files moved aside."""
import hashlib
import json
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, TOTALSEG_EXAMPLE, require_shared
from omegaconf import OmegaConf
from test_inference_fixtures import (inference_config, phantom_dataset, phantom_experiment, save_checkpoint,
                                     saved_test_configs)

import evaluate
import preprocess
import synthesize
from ldm.errors import LesionDiffusionError
from ldm.previews import orthogonal_slices
from ldm.util import PIPELINE_DIR, load_config
from inference import cli
from inference.options import parse_options
from inference.previews import write_lesion_preview
from inference.runner import run_inference
from inference.spacing import command_spacing


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return saved_test_configs(tmp_path_factory.mktemp("check_configs"))


def example():
    folder = require_shared(TOTALSEG_EXAMPLE)
    return folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz"


def run(configs, out, cts, segs, **extra):
    extra.setdefault("spacing", [3.0])
    extra.setdefault("gate", False)  # random weights: their lesions are not what the report says
    return synthesize.synthesize(cts, "liver", "cyst", out, segs=segs, seg_version="v2",
                                 lmnet_config=configs["lmnet"], linet_config=configs["linet"], progress=False, **extra)


def with_training_spacing(configs, folder, spacing_mm):
    """Copies of the test configs that state the spacing their models were trained at."""
    folder.mkdir()
    copies = {}
    for stage, path in configs.items():
        config = OmegaConf.load(path)
        config.inference.training_spacing_mm = spacing_mm
        copies[stage] = folder / path.name
        OmegaConf.save(config, copies[stage])
    return copies


def test_spacing_defaults_to_the_models_and_a_different_one_is_named_once_with_the_flag(configs, tmp_path):
    ct, seg = example()
    trained = with_training_spacing(configs, tmp_path / "configs", 3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (row,) = run(trained, tmp_path / "out", [ct], [seg], spacing=None)
    assert row.ok, row.error
    assert nib.load(tmp_path / "out" / "example_ct_sm" / "ct.nii.gz").header.get_zooms() == (3.0, 3.0, 3.0)
    assert not [w for w in caught if "spacing" in str(w.message)]
    trained = with_training_spacing(configs, tmp_path / "configs_2mm", 2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (row,) = run(trained, tmp_path / "off", [ct], [seg], spacing=[3.0], boxes_per_case=1)
    spacing_warnings = [str(w.message) for w in caught if "spacing" in str(w.message)]
    assert len(spacing_warnings) == 1, spacing_warnings
    assert spacing_warnings[0].startswith("--spacing 3 mm differs from the models' training spacing 2 x 2 x 2 mm")
    assert "preprocess.py" not in spacing_warnings[0]
    assert not any("spacing" in warning for warning in row.warnings)


def test_the_readme_example_with_the_demo_configs_runs_at_the_demo_spacing():
    blocks = [block for page in ("README.md", "docs/synthesis.md")
              for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / page).read_text(encoding="utf-8"), re.M | re.S)
              if "pipeline/synthesize.py" in block]
    assert any("configs/demo/lmnet_test.yaml" in block for block in blocks)
    assert blocks and not [block for block in blocks if "--spacing 1" in block]
    args = synthesize.build_parser().parse_args(["--ct", "ct.nii.gz", "--organ", "liver", "--lesion", "cyst",
                                                 "--out", "out", "--lmnet-config", "configs/demo/lmnet_test.yaml",
                                                 "--linet-config", "configs/demo/linet_test.yaml"])
    options = [parse_options(load_config([PIPELINE_DIR / "configs" / "demo" / f"{stage}_test.yaml"]).inference, stage)
               for stage in ("lmnet", "linet")]
    assert args.spacing is None and command_spacing(args.spacing, options) == [2.0, 2.0, 2.0]


def test_a_truncated_or_wrong_checkpoint_fails_before_any_work_naming_its_stage(configs, tmp_path):
    broken = tmp_path / "linet_truncated.ckpt"
    data = (configs["linet"].parent / "linet.ckpt").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(LesionDiffusionError, match=r"^linet checkpoint .*linet_truncated\.ckpt "
                                                    r"\(model\.params\.ckpt_path of .*linet_test\.yaml\): cannot read"):
        run(configs, tmp_path / "out", ["ct.nii.gz"], None, linet_ckpt=broken)
    assert not (tmp_path / "out").exists()
    lmnet_weights = configs["lmnet"].parent / "lmnet.ckpt"
    with pytest.raises(LesionDiffusionError, match=r"^linet checkpoint .*lmnet\.ckpt .*does not fit the model"):
        run(configs, tmp_path / "out", ["ct.nii.gz"], None, linet_ckpt=lmnet_weights)
    assert not (tmp_path / "out").exists()


def test_one_stage_checkpoint_and_settings_at_a_time_and_every_report_names_its_weights(configs, tmp_path):
    ct, seg = example()
    other = save_checkpoint("linet", tmp_path / "other_linet.ckpt", seed=5)
    (row,) = run(configs, tmp_path / "out", [ct], [seg], linet_ckpt=other,
                 overrides=["linet.inference.rim_mm=3", "inference.max_mask_num=2"])
    assert row.ok, row.error
    out = tmp_path / "out"
    reports = {stage: json.loads((out / f"{stage}_report.json").read_text()) for stage in ("lmnet", "linet")}
    assert reports["linet"]["options"]["rim_mm"] == 3.0 and reports["lmnet"]["options"]["max_mask_num"] == 2
    assert reports["linet"]["options"]["max_mask_num"] == 2
    files = {"lmnet": configs["lmnet"].parent / "lmnet.ckpt", "linet": other}
    record = json.loads((out / "synthesize.json").read_text())
    for stage, path in files.items():
        expected = {"path": str(path.resolve()), "bytes": path.stat().st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        assert reports[stage]["weights"] == {"model.params.ckpt_path": expected}
        assert record["weights"][stage] == {"model.params.ckpt_path": expected}
    assert synthesize.stage_overrides(["lmnet.a=1", "linet.b=2", "c.d=3", "trust_checkpoint=true"]) == {
        "lmnet": ["a=1", "c.d=3", "trust_checkpoint=true"], "linet": ["b=2", "c.d=3", "trust_checkpoint=true"]}


def test_an_output_path_that_is_a_file_is_one_line_in_every_command(configs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    status = synthesize.main(["--ct", "ct.nii.gz", "--organ", "liver", "--lesion", "cyst", "--out", str(taken),
                              "--lmnet-config", str(configs["lmnet"]), "--linet-config", str(configs["linet"])])
    assert status == 1
    assert capsys.readouterr().err == f"synthesize.py: error: --out {taken}: exists and is not a folder; give a " \
                                      "folder (it is created when absent)\n"
    lists = tmp_path / "ct_list.txt"
    lists.write_text("ct.nii.gz\n")
    assert preprocess.main([str(lists), str(taken / "sub"), str(lists)]) == 1
    assert capsys.readouterr().err == f"error: exp_name {taken / 'sub'}: {taken} is a file, so the folder cannot " \
                                      "be created there\n"
    assert cli.main(["--base", str(configs["lmnet"]), "--exp", str(taken)]) == 1
    assert capsys.readouterr().err == f"test.py: error: {taken}: the experiment folder is a file (check --exp)\n"
    assert evaluate.main([str(taken)]) == 1
    assert capsys.readouterr().err == f"evaluate.py: error: {taken}: the experiment folder is a file, not a folder\n"
    assert taken.read_text() == "a file, not a folder"


def test_organ_and_attribute_mistakes_name_the_flag_once(configs, tmp_path, capsys):
    base = ["--ct", "ct.nii.gz", "--lesion", "cyst", "--out", str(tmp_path / "out"),
            "--lmnet-config", str(configs["lmnet"]), "--linet-config", str(configs["linet"])]
    assert synthesize.main([*base, "--organ", "livr"]) == 1
    captured = capsys.readouterr()
    assert re.fullmatch(r"synthesize\.py: error: --organ: unknown organ name 'livr'[^\n]*\n", captured.err)
    assert "attributes.txt" not in captured.err + captured.out
    assert synthesize.main([*base, "--organ", "liver", "--attributes", '{"colour": "red"}']) == 1
    captured = capsys.readouterr()
    assert re.fullmatch(r"synthesize\.py: error: --attributes: unknown attribute 'colour'; allowed keys: [^\n]*\n",
                        captured.err)
    assert not (tmp_path / "out").exists()


def test_a_one_slice_ct_fails_in_the_preflight_in_one_line(configs, tmp_path):
    ct, seg = example()
    thin = {}
    for name, path in (("ct", ct), ("seg", seg)):
        image = nib.load(path)
        thin[name] = tmp_path / f"thin_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, 15:16], image.affine, image.header), thin[name])
    (row,) = run(configs, tmp_path / "out", [thin["ct"]], [thin["seg"]])
    assert row.stage == "preflight", (row.stage, row.error)
    assert re.fullmatch(r"the CT is too thin for box 0 with its blend rim \(z: 1 \+ 2 x 1 rim voxels > 1\): .*",
                        row.error)
    assert not (tmp_path / "out" / "lmnet_report.json").exists()


def test_previews_of_a_one_voxel_thin_volume_are_written(tmp_path):
    volume = np.full((1, 30, 30), 40.0, dtype=np.float32)
    lesion = np.zeros(volume.shape, dtype=bool)
    lesion[0, 10:16, 12:18] = True
    path = write_lesion_preview(tmp_path / "thin.png", {"input": volume, "inpainted": volume + 30 * lesion},
                                [lesion], (3.0, 1.0, 1.0))
    assert path.stat().st_size > 0
    assert orthogonal_slices(lesion, (0, 13, 15))["coronal"].shape == (1, 30)


@pytest.fixture(scope="module")
def phantom_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("aside")
    return {"root": root, "phantoms": phantom_dataset(root / "phantoms"),
            "lmnet": save_checkpoint("lmnet", root / "lmnet.ckpt"), "linet": save_checkpoint("linet", root / "linet.ckpt")}


def test_a_case_that_fails_after_writing_leaves_no_output_in_its_folder(phantom_assets):
    exp_dir = phantom_experiment(phantom_assets["root"] / "exp", phantom_assets["phantoms"], cases=1)
    (masks,) = run_inference(inference_config("lmnet", phantom_assets["lmnet"], exp_dir)).results
    assert masks.ok, masks.error
    case_dir = exp_dir / masks.case_id
    (case_dir / "inpainting_0.png").mkdir()     # the preview cannot be written: the case fails after the volumes
    (result,) = run_inference(inference_config("linet", phantom_assets["linet"], exp_dir)).results
    assert not result.ok
    assert not (case_dir / "inpainting_0.nii.gz").exists() and not (case_dir / "inpainting_0_label.nii.gz").exists()
    moved = {kind: path for kind, path in result.outputs.items()}
    assert set(moved) >= {"failed_image", "failed_label"}
    for path in moved.values():
        assert path.startswith(str(case_dir / "failed")) and nib.load(path).shape == (64, 64, 32)


def test_preprocess_takes_its_default_spacing_from_the_configs(tmp_path):
    ct, seg = example()
    for name, text in (("cts", f"{ct}\n"), ("segs", f"{seg}\n"),
                       ("attributes", '{"organ type": "liver", "lesion type": "cyst"}\n')):
        (tmp_path / f"{name}.txt").write_text(text)
    demo = [str(PIPELINE_DIR / "configs" / "demo" / f"{stage}_test.yaml") for stage in ("lmnet", "linet")]
    argv = [str(tmp_path / "cts.txt"), str(tmp_path / "exp"), str(tmp_path / "attributes.txt"), "--seg-list",
            str(tmp_path / "segs.txt"), "--seg-version", "v2", "--no-progress", "--configs", *demo]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert preprocess.main(argv) == 0
    assert not [w for w in caught if "spacing" in str(w.message)]
    assert nib.load(tmp_path / "exp" / "example_ct_sm" / "ct.nii.gz").header.get_zooms() == (2.0, 2.0, 2.0)
