"""LMNet then LINet inference end to end on phantom CTs with tiny random models (CPU, 3 DDIM steps)."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from test_inference_fixtures import (inference_config, phantom_dataset, phantom_experiment, phantom_row,
                                     save_checkpoint, write_lists)

from ldm.data.organs import organ_id
from ldm.data.volume import read_label, read_volume, write_volume
from ldm.errors import ConfigError
from ldm.models.autoencoder import VQModelInterface
from inference.cases import read_cases
from inference.devices import Placement
from inference.lmnet import sample_masks
from inference.options import parse_options
from inference.paste import lesion_region
from inference.runner import load_model, run_inference
from quality.gate import gate_stage

RIM_MM, SPACING = 2.0, (2.0, 2.0, 2.0)   # the phantoms are 2 mm, the fixture's rim 2 mm


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    return {"root": root, "phantoms": phantom_dataset(root / "phantoms"),
            "lmnet": save_checkpoint("lmnet", root / "lmnet.ckpt"),
            "linet": save_checkpoint("linet", root / "linet.ckpt")}


def run(stage, assets, exp_dir, **inference):
    return run_inference(inference_config(stage, assets[stage], exp_dir, **inference))


@pytest.fixture(scope="module")
def pipeline(assets):
    """Four cases: good, box where the organ is not (no room), unreadable segmentation, good."""
    exp_dir, phantoms = assets["root"] / "exp", assets["phantoms"]
    rows = [phantom_row(exp_dir, phantoms, name) for name in ("case_006", "case_007", "case_002", "case_000")]
    label, geometry = read_label(phantoms / "case_007" / "label.nii.gz")
    air_box = np.zeros(label.shape, dtype=np.uint8)
    air_box[0:4, 0:4, 0:4] = 2
    rows[1]["bbox"] = write_volume(exp_dir / "case_007" / "bbox.nii.gz", air_box, geometry, dtype=np.uint8)
    broken = exp_dir / "case_002" / "seg.nii.gz"
    broken.write_bytes(b"not a nifti file")
    rows[2]["seg"] = broken
    write_lists(exp_dir, rows)
    lmnet = run("lmnet", assets, exp_dir)
    linet = run("linet", assets, exp_dir)
    return {"exp": exp_dir, "rows": rows, "lmnet": lmnet, "linet": linet}


def test_lmnet_writes_masks_on_the_ct_grid_for_every_good_case(pipeline):
    results = pipeline["lmnet"].results
    assert [r.status for r in results] == ["done", "failed", "failed", "done"]
    assert results[0].index == 0 and results[0].case_id == "case_006"      # the first case is processed
    for result, row in zip(results, pipeline["rows"]):
        if not result.ok:
            continue
        mask_image, ct_image = nib.load(result.outputs["mask"]), nib.load(row["img"])
        np.testing.assert_array_equal(mask_image.affine, ct_image.affine)
        assert mask_image.shape == ct_image.shape and mask_image.get_data_dtype() == np.uint8
        mask, _ = read_label(result.outputs["mask"])
        boxes, _ = read_label(row["bbox"])
        seg, _ = read_label(row["seg"])
        organ = organ_id(result.lesions[0].organ)
        assert str(organ) in json.loads(row["type"].read_text())
        assert set(np.unique(mask)) == {0, 1, 2}
        assert ((mask == 2) <= (boxes == 2)).all()                                   # the lesion stays in its box
        assert ((mask == 1) <= (seg == organ)).all() and (mask == 1).sum() > 0
        assert (mask == 2).sum() == result.lesions[0].voxels > 0
        assert result.outputs["preview"].endswith("samples_0.png")


def test_failed_cases_fail_alone_with_the_reason(pipeline):
    no_room, broken = pipeline["lmnet"].results[1:3]
    assert "does not overlap the kidney right" in no_room.error and "no room" in no_room.error
    assert "seg.nii.gz" in broken.error and "cannot read" in broken.error
    rows = (pipeline["exp"] / "label_list.txt").read_text().split()
    assert rows == [f"{case}/samples_0.nii.gz" for case in ("case_006", "case_007", "case_002", "case_000")]
    assert not (pipeline["exp"] / "case_007" / "samples_0.nii.gz").exists()
    report = json.loads((pipeline["exp"] / "lmnet_report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["done", "failed", "failed", "done"]
    assert report["options"]["steps"] == 3


def test_linet_changes_only_the_lesion_region(pipeline):
    results = pipeline["linet"].results
    assert [r.status for r in results] == ["done", "failed", "failed", "done"]
    assert "lesion mask not found" in results[1].error and "LMNet stage failed" in results[1].error
    for result, row, mask_result in zip(results, pipeline["rows"], pipeline["lmnet"].results):
        if not result.ok:
            continue
        output, source = nib.load(result.outputs["image"]), nib.load(row["img"])
        np.testing.assert_array_equal(output.affine, source.affine)
        assert output.shape == source.shape and output.get_data_dtype() == source.get_data_dtype() == np.int16
        inpainted, geometry = read_volume(result.outputs["image"])
        original, _ = read_volume(row["img"])
        mask, _ = read_label(mask_result.outputs["mask"])
        region = lesion_region(mask == 2, RIM_MM, SPACING)
        assert np.array_equal(geometry.to_file(inpainted)[geometry.to_file(~region)],
                              np.asanyarray(source.dataobj)[geometry.to_file(~region)])
        assert not np.array_equal(inpainted[mask == 2], original[mask == 2])
        assert result.outputs["preview"].endswith("inpainting_0.png") and result.lesions[0].organ


def test_same_seed_same_outputs_new_seed_new_outputs(assets, tmp_path):
    exp_dir = phantom_experiment(tmp_path / "exp", assets["phantoms"], cases=1)
    first, again = run("lmnet", assets, exp_dir), run("lmnet", assets, exp_dir)
    other = run("lmnet", assets, exp_dir, seed=8)
    masks = [read_label(o.results[0].outputs["mask"])[0] for o in (first, again, other)]
    assert [o.results[0].outputs["mask"].rsplit("/", 1)[1] for o in (first, again, other)] == \
        ["samples_0.nii.gz", "samples_1.nii.gz", "samples_2.nii.gz"]
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])
    assert (exp_dir / "label_list.txt").read_text().split() == ["case_006/samples_2.nii.gz"]
    images = [read_volume(run("linet", assets, exp_dir, **extra).results[0].outputs["image"])[0]
              for extra in ({}, {}, {"seed": 8})]
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    rewritten = run("lmnet", assets, exp_dir, overwrite=True)
    assert rewritten.results[0].outputs["mask"].endswith("samples_0.nii.gz")
    assert sorted(p.name for p in (exp_dir / "case_006").glob("samples_*.nii.gz")) == \
        ["samples_0.nii.gz", "samples_1.nii.gz", "samples_2.nii.gz"]


def test_the_report_text_steers_linet_unless_skip_context(assets, tmp_path):
    exp_dir = phantom_experiment(tmp_path / "exp", assets["phantoms"], cases=1)
    run("lmnet", assets, exp_dir)
    report = json.loads((assets["phantoms"] / "case_006" / "type.json").read_text())
    report["5"][2].update({"density": "low density lesion,", "CT value": "about -20 HU,", "shape": "irregular,"})
    changed = exp_dir / "case_006" / "type_changed.json"
    changed.write_text(json.dumps(report))
    original_types = (exp_dir / "type_list.txt").read_text()

    def inpaint(type_file, skip_context):
        (exp_dir / "type_list.txt").write_text(f"{type_file}\n")
        config = inference_config("linet", assets["linet"], exp_dir, overwrite=True)
        config.model.params.unet_config.params.skip_context = skip_context
        return read_volume(run_inference(config).results[0].outputs["image"])[0]

    with_text = [inpaint(path, False) for path in (original_types.strip(), changed)]
    with pytest.warns(UserWarning, match="ignores the report's attributes"):
        skipped = [inpaint(path, True) for path in (original_types.strip(), changed)]
    assert not np.array_equal(with_text[0], with_text[1])
    assert np.array_equal(skipped[0], skipped[1])


def test_two_cpu_processes_shard_the_cases_with_identical_results(assets, tmp_path):
    single_dir = phantom_experiment(tmp_path / "single", assets["phantoms"], cases=3)
    single = run("lmnet", assets, single_dir)
    sharded_dir = tmp_path / "sharded"
    shutil.copytree(single_dir, sharded_dir, ignore=shutil.ignore_patterns("samples_*", "*.json", "label_list.txt"))
    placements = [Placement(0, 2, "cpu", "cpu"), Placement(1, 2, "cpu", "cpu")]
    sharded = run_inference(inference_config("lmnet", assets["lmnet"], sharded_dir), placements=placements)
    assert [r.index for r in sharded.results] == [0, 1, 2] and all(r.ok for r in sharded.results)
    for a, b in zip(single.results, sharded.results):
        assert a.case_id == b.case_id and a.lesions[0].seed == b.lesions[0].seed
        assert np.array_equal(read_label(a.outputs["mask"])[0], read_label(b.outputs["mask"])[0])
    assert (sharded_dir / "label_list.txt").read_text() == (single_dir / "label_list.txt").read_text()


def test_tiled_vq_encoding_and_decoding_keep_the_guarantees(assets, tmp_path, monkeypatch):
    exp_dir = phantom_experiment(tmp_path / "exp", assets["phantoms"], cases=1)
    run("lmnet", assets, exp_dir)
    whole = run("linet", assets, exp_dir, vq_tiling="never").results[0]
    streamed_calls = []
    for name in ("encode_streamed", "decode_streamed"):
        real = getattr(VQModelInterface, name)
        monkeypatch.setattr(VQModelInterface, name,
                            lambda self, *args, _real=real, _name=name, **kw: streamed_calls.append(_name) or
                            _real(self, *args, **kw))
    tiled = run("linet", assets, exp_dir, vq_tiling="always", vq_tile=4, vq_tile_overlap=2).results[0]
    assert whole.ok and tiled.ok, (whole.error, tiled.error)
    mask, _ = read_label(exp_dir / "case_006" / "samples_0.nii.gz")
    original = read_volume(assets["phantoms"] / "case_006" / "healthy.nii.gz")[0]
    outside = ~lesion_region(mask == 2, RIM_MM, SPACING)
    images = [read_volume(result.outputs["image"])[0] for result in (whole, tiled)]
    for image in images:
        assert np.array_equal(image[outside], original[outside]) and not np.array_equal(image, original)
    # The streamed tiles really ran, and they give the whole-volume result (exact up to fp32 rounding, < 1 HU).
    assert {"encode_streamed", "decode_streamed"} <= set(streamed_calls)
    assert np.abs(images[0].astype(np.float64) - images[1]).max() <= 1.0


def test_python_api_gives_what_the_runner_gives(assets, tmp_path):
    exp_dir = phantom_experiment(tmp_path / "exp", assets["phantoms"], cases=2)
    config = inference_config("lmnet", assets["lmnet"], exp_dir)
    outcome = run_inference(config)
    options = parse_options(config.inference, "lmnet")
    results = sample_masks(load_model(config, "cpu"), read_cases(options.exp_dir, dict(options.lists)), options)
    assert [r.outputs["mask"].rsplit("/", 1)[1] for r in results] == ["samples_1.nii.gz"] * 2
    for by_runner, by_api in zip(outcome.results, results):
        assert by_runner.case_id == by_api.case_id
        assert np.array_equal(read_label(by_runner.outputs["mask"])[0], read_label(by_api.outputs["mask"])[0])


def test_quality_gate_moves_failing_outputs_aside(assets, tmp_path):
    """With ``quality_gate: true`` every lesion is measured; with a 0-HU tolerance none passes, so each output
    moves to ``<case>/rejected/`` and the result says so; the measurements are written next to the run."""
    exp_dir = phantom_experiment(tmp_path / "exp", assets["phantoms"], cases=2)
    (exp_dir / "quality.toml").write_text("[tolerances]\nhu_abs = 0.0\n")
    run("lmnet", assets, exp_dir)
    with pytest.raises(ConfigError, match="quality_gate is true but no gate was given"):
        run("linet", assets, exp_dir, quality_gate=True)
    outcome = run_inference(inference_config("linet", assets["linet"], exp_dir, quality_gate=True),
                            after_stage=gate_stage)
    assert len(outcome.dropped) == 2
    for result, dropped in zip(outcome.results, outcome.dropped):
        assert "image" not in result.outputs and result.outputs["rejected_image"] == str(dropped.moved_to)
        assert dropped.moved_to.parent.name == "rejected" and dropped.moved_to.is_file()
        assert not dropped.output.exists()
        assert any("hu" in reason for reason in dropped.reasons)
    assert (exp_dir / "quality.csv").is_file() and (exp_dir / "quality_summary.json").is_file()
    report = json.loads((exp_dir / "linet_report.json").read_text())
    assert report["options"]["quality_gate"] is True
