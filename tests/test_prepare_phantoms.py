"""``prepare_dataset.py`` end to end on small nnU-Net v2 datasets of phantoms whose lesions are known by
construction (:mod:`tests.prepare_builders`): the reports state what was put there, the lists align, reruns skip,
inputs stay untouched, bad cases fail alone with one line each, and ``data.yaml`` trains the demo LMNet."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import prepare_dataset
from ldm.data.lists import read_aligned_lists
from ldm.data.volume import read_label
from ldm.util import instantiate_from_config, load_config
from ldm.lesion import DEFAULT
from ldm.lesion.compare import density_class
from tests.prepare_builders import LIVER, make_case, write_dataset_json

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipeline" / "configs" / "demo"
KINDS = ("image", "label", "seg", "coarseg", "type")
# case id -> (HU offset from the liver, lobulated, position, halves HU, halo)
CASES = {"hypo": (-40, False, "within", 0, False), "hyper": (40, False, "within", 0, False),
         "lobulated": (-35, True, "within", 0, False), "surface": (-40, False, "surface", 0, False),
         "varied": (-40, False, "within", 30, False), "halo": (-45, False, "within", 0, True)}


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The phantom dataset (segmentations in a v1 --seg-dir), prepared once; returns paths, known lesions, output."""
    base = tmp_path_factory.mktemp("prepare")
    dataset, segs, out = base / "Dataset901_Phantoms", base / "segs", base / "out"
    segs.mkdir()
    known = {case_id: make_case(dataset, case_id, index, offset, lobulated, position, segs, halves, halo)
             for index, (case_id, (offset, lobulated, position, halves, halo)) in enumerate(CASES.items())}
    write_dataset_json(dataset, len(known))
    before = digest(base)
    argv = [str(dataset), str(out), "--organ", "liver", "--lesion-label", "2", "--organ-label", "1", "--seg-dir",
            str(segs), "--spacing", "2", "--val-fraction", "0.34", "--seed", "3", "--workers", "2", "--no-progress"]
    assert prepare_dataset.main(argv) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    return {"dataset": dataset, "segs": segs, "out": out, "known": known, "argv": argv, "before": before,
            "cases": {case["case_id"]: case for case in report["cases"]}, "report": report}


def test_reports_state_what_was_put_there(prepared):
    for case_id, known in prepared["known"].items():
        case = prepared["cases"][case_id]
        assert case["status"] == "done" and case["error"] is None
        type_json = json.loads(Path(case["outputs"]["type"]).read_text())
        assert list(type_json) == [str(LIVER)]
        shape, empty, attributes, boxes = type_json[str(LIVER)]
        assert shape == attributes["shape"] and empty == ""
        assert attributes == case["attributes"] and attributes["lesion location"] == str(LIVER)
        assert attributes["size"] == f"[[{' '.join(map(str, known.size_vox))}]] pixel,"
        assert tuple(boxes[1][0]) == known.size_vox
        hu = int(attributes["CT value"].split("approximately ")[1].split()[0])
        assert abs(hu - known.mean_hu) <= 2
        assert abs(hu - (known.organ_hu + known.offset_hu)) <= 3
        assert density_class(attributes["density"], lung=False) == ("hypo" if known.offset_hu < 0 else "hyper")
        assert attributes["cavity"] == ("protruding from the parenchymal organ," if known.position == "surface"
                                        else "within the parenchymal organ,")
        assert attributes["shape"] == ("irregular," if known.irregular else "round-like,")
        assert (case["lesion"]["solidity"] < DEFAULT.round_solidity) == known.irregular
        varied = case_id == "varied"
        assert attributes["density variations"] == ("heterogeneous," if varied else "homogeneous,")
        assert attributes["specific features"] == ("presence of decreased density areas,presence of increased "
                                                   "density areas," if varied else "")
        assert attributes["surface characteristics"] == ("ill-defined margin," if case_id == "halo"
                                                         else "well-defined margin,")
        assert attributes["enhancement status"] in ("enhanced ct,", "non-contrast ct,")


def test_volumes_follow_the_original_convention(prepared):
    for case_id, known in prepared["known"].items():
        outputs = prepared["cases"][case_id]["outputs"]
        label, _ = read_label(outputs["label"])
        seg, _ = read_label(outputs["seg"])
        coarseg, _ = read_label(outputs["coarseg"])
        source, _ = read_label(prepared["dataset"] / "labelsTr" / f"{case_id}.nii.gz")
        assert set(np.unique(label)) <= {0, 1, 2}
        np.testing.assert_array_equal(label == 2, known.mask)
        np.testing.assert_array_equal(label == 1, source == 1)
        assert np.all(seg[label > 0] == LIVER)
        np.testing.assert_array_equal(seg[label == 0], coarseg[label == 0])


def test_lists_align_and_split_by_case(prepared):
    out = prepared["out"]
    rows = {}
    for split in ("train", "val"):
        lists = read_aligned_lists({kind: out / f"{split}_{kind}_list.txt" for kind in KINDS})
        for paths in zip(*lists.values()):
            folders = {Path(path).parent for path in paths}
            assert len(folders) == 1 and all(Path(path).is_file() for path in paths)
        rows[split] = [Path(path).parent.name for path in lists["image"]]
    assert sorted(rows["train"] + rows["val"]) == sorted(CASES) and len(rows["val"]) == 2
    assert all(prepared["cases"][case]["split"] == split for split in rows for case in rows[split])
    fragment = OmegaConf.load(out / "data.yaml")
    assert fragment.data.params.train.params.seg_list == str(out / "train_seg_list.txt")
    assert set(OmegaConf.load(out / "data_vq.yaml").data.params.validation.params) == {"image_list", "label_list"}


def test_rerun_skips_unchanged_cases_and_never_writes_inputs(prepared):
    base = prepared["dataset"].parent
    inputs_before = {k: v for k, v in prepared["before"].items()}
    outputs = {path: Path(path).stat().st_mtime_ns for case in prepared["cases"].values()
               for path in case["outputs"].values()}
    assert prepare_dataset.main(prepared["argv"]) == 0
    report = json.loads((prepared["out"] / "prepare_report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["skipped"] * len(CASES)
    assert [case["attributes"] for case in report["cases"]] == [prepared["cases"][c["case_id"]]["attributes"]
                                                              for c in report["cases"]]
    assert {path: Path(path).stat().st_mtime_ns for path in outputs} == outputs
    after = {k: v for k, v in digest(base).items() if not k.startswith("out/")}
    assert after == inputs_before


def test_fragments_build_every_stage_dataset(prepared):
    out = prepared["out"]
    for config, name, keys in (("vq.yaml", "data_vq.yaml", {"image", "label"}),
                               ("linet.yaml", "data_linet.yaml", {"image", "label", "text"}),
                               ("lmnet.yaml", "data.yaml", {"seg", "target", "label", "text"})):
        merged = load_config([DEMO / config, out / name])
        dataset = instantiate_from_config(merged.data.params.train)
        item = dataset[0]
        assert keys <= set(item), (config, sorted(item))
        assert len(dataset.cases) == len(CASES) - 2


def test_data_yaml_trains_the_demo_lmnet_through_main(prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "pipeline" / "main.py"), "--base", str(DEMO / "lmnet.yaml"),
               str(prepared["out"] / "data.yaml"), "-t", "--name", "prepared", "--logdir", str(tmp_path),
               "--max_steps", "2", "lightning.callbacks.image_logger.params.log_first_step=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = tmp_path / "prepared" / "checkpoints" / "last.ckpt"
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    saved = OmegaConf.load(next((tmp_path / "prepared" / "configs").glob("*-project.yaml")))
    assert saved.data.params.train.params.type_list == str(prepared["out"] / "train_type_list.txt")


def test_an_msd_task_converted_by_nnunet_is_prepared(prepared, tmp_path):
    """The path of docs/datasets.md: an MSD task (its own layout and dataset.json) -> nnUNetv2_convert_MSD_dataset ->
    prepare_dataset.py."""
    converter = Path(sys.executable).parent / "nnUNetv2_convert_MSD_dataset"
    if not converter.is_file():
        pytest.skip("nnunetv2 (installed with TotalSegmentator) is not in this environment")
    task = tmp_path / "Task03_Liver"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True)
    training = []
    for number, case_id in enumerate(("hypo", "hyper")):
        shutil.copy(prepared["dataset"] / "imagesTr" / f"{case_id}_0000.nii.gz", task / "imagesTr" / f"liver_{number}.nii.gz")
        shutil.copy(prepared["dataset"] / "labelsTr" / f"{case_id}.nii.gz", task / "labelsTr" / f"liver_{number}.nii.gz")
        training.append({"image": f"./imagesTr/liver_{number}.nii.gz", "label": f"./labelsTr/liver_{number}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": 2, "numTest": 0, "training": training, "test": []}))
    raw = tmp_path / "nnUNet_raw"
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results")}
    result = subprocess.run([str(converter), "-i", str(task), "-np", "1"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    segs = tmp_path / "segs"
    segs.mkdir()
    for number, case_id in enumerate(("hypo", "hyper")):
        shutil.copy(prepared["segs"] / f"{case_id}.nii.gz", segs / f"liver_{number}.nii.gz")
    out = tmp_path / "out"
    assert prepare_dataset.main([str(raw / "Dataset003_Liver"), str(out), "--organ", "liver", "--lesion-label", "2",
                                 "--organ-label", "1", "--seg-dir", str(segs), "--spacing", "2", "--no-progress"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["options"]["lesion_type"] == "cancer"
    for number, case_id in enumerate(("hypo", "hyper")):
        case = report["cases"][number]
        assert case["case_id"] == f"liver_{number}"
        assert case["attributes"] == prepared["cases"][case_id]["attributes"]
