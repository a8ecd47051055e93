"""LesionDataset on seeded phantoms (demo/make_phantoms.py): modes, cavity source, padding, augmentation,
respacing, transforms, bad cases and list errors."""
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from demo.make_phantoms import make_phantoms
from ldm.data.crops import CropWindow, bbox_center, largest_component, take_crop, with_flips
from ldm.data.dataset import LesionDataset
from ldm.data.intensity import hu_to_unit
from ldm.data.volume import read_label, read_volume, write_volume
from ldm.errors import ConfigError, DataError

CROP = [32, 64, 64]
KINDS = ("image", "label", "type", "seg", "coarseg")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    result = make_phantoms(out, n=5, seed=0, progress=False)
    return {"out": out, "manifest": result["manifest"], "lists": result["lists"]}


def lists(phantoms, split="train", kinds=KINDS):
    return {f"{kind}_list": phantoms["lists"][f"{split}_{kind}_list"] for kind in kinds}


def case_files(phantoms, index):
    folder = phantoms["out"] / f"case_{index:03d}"
    return {kind: folder / name for kind, name in
            (("image", "image.nii.gz"), ("label", "label.nii.gz"), ("type", "type.json"), ("seg", "seg.nii.gz"))}


def write_lists(folder, rows):
    """One list file per kind from rows of {kind: path}; returns the dataset keyword arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {}
    for kind in rows[0]:
        path = folder / f"{kind}.txt"
        path.write_text("".join(f"{row[kind]}\n" for row in rows))
        params[f"{kind}_list"] = str(path)
    return params


class MarkItem:
    """A transform built from a config block: adds ``key: value`` to every item."""

    def __init__(self, key, value):
        self.key, self.value = key, value

    def __call__(self, item):
        return {**item, self.key: self.value}


def test_lmnet_training_on_phantoms(phantoms):
    dataset = LesionDataset(**lists(phantoms), crop_shape=CROP)
    assert dataset.mode == "lmnet_training" and len(dataset) == 4
    for index in range(4):
        item = dataset[index]
        entry = phantoms["manifest"]["cases"][index]
        label, _ = read_label(case_files(phantoms, index)["label"])
        component = largest_component(label == 2)
        window = CropWindow.from_dict(item["crop"])
        assert item["label"].shape == item["seg"].shape == item["target"].shape == (1, *CROP)
        np.testing.assert_array_equal(item["label"][0].numpy(), take_crop(component, window))
        assert item["label"].sum() == component.sum() > 0
        assert item["crop"]["crop_center"] == list(bbox_center(component))
        assert item["target"].sum() > 0 and item["text"]["lesion location"] == entry["organ"]
        report = json.loads(case_files(phantoms, index)["type"].read_text())
        assert item["text"]["cavity"] == report[str(entry["organ_id"])][2]["cavity"]


def test_cavity_from_report_wins_and_rule_applies_without_it(phantoms, tmp_path):
    rows = []
    for index, cavity in ((0, "Protruding from the parenchymal organ"), (4, None), (1, None)):
        files = case_files(phantoms, index)
        report = json.loads(files["type"].read_text())
        for entry in report.values():
            entry[2].pop("cavity")
            if cavity:
                entry[2]["cavity"] = cavity
        (tmp_path / f"type_{index}.json").write_text(json.dumps(report))
        rows.append({**files, "type": tmp_path / f"type_{index}.json"})
    dataset = LesionDataset(**write_lists(tmp_path, rows), crop_shape=CROP)
    assert dataset[0]["text"]["cavity"] == "protruding from the parenchymal organ,"
    bladder = dataset[1]["text"]
    assert bladder["lesion location"] == "urinary bladder" and bladder["cavity"] == "wall thickening,"
    assert dataset[2]["text"]["cavity"] == "within the parenchymal organ,", "the phantom lesion lies inside its organ"


def test_image_training_on_phantoms(phantoms):
    dataset = LesionDataset(**lists(phantoms, kinds=("image", "label", "type", "coarseg")), crop_shape=CROP)
    assert dataset.mode == "image_training"
    item = dataset[2]
    hu, _ = read_volume(case_files(phantoms, 2)["image"])
    label, _ = read_label(case_files(phantoms, 2)["label"])
    window = CropWindow.from_dict(item["crop"])
    np.testing.assert_allclose(item["image"][0].numpy(), hu_to_unit(take_crop(hu, window)), atol=1e-6)
    np.testing.assert_array_equal(item["label"].numpy(), take_crop(label, window))
    assert (item["label"] == 2).sum() == (label == 2).sum()
    assert item["text"]["CT value"].endswith(" HU,") and "cavity" not in item["text"]


def test_crop_larger_than_volume_is_padded_with_air(phantoms):
    dataset = LesionDataset(**lists(phantoms, kinds=("image", "label")), crop_shape=[64, 128, 128])
    item = dataset[0]
    assert "text" not in item and item["crop"]["pad_before"] == [8, 16, 16]
    image, label = item["image"][0].numpy(), item["label"].numpy()
    inside = (slice(8, 56), slice(16, 112), slice(16, 112))
    hu, _ = read_volume(case_files(phantoms, 0)["image"])
    np.testing.assert_allclose(image[inside], hu_to_unit(hu), atol=1e-6)
    padding = np.ones(image.shape, bool)
    padding[inside] = False
    assert np.all(image[padding] == 0.0) and np.all(label[padding] == 0)


def test_inference_on_phantoms(phantoms):
    val_lists = lists(phantoms, "val", ("image", "label", "type", "coarseg"))
    item = LesionDataset(**val_lists, max_mask_num=3, crop_shape=CROP)[0]
    assert item["image"].shape == (1, 48, 96, 96) and item["label"].shape == item["coarseg"].shape == (48, 96, 96)
    assert set(item["type"]) == {"104"} and item["max_mask_num"] == 3 and item["spacing"] == [2.0, 2.0, 2.0]
    assert item["image_path"].endswith("case_004/image.nii.gz")
    coarse = LesionDataset(**lists(phantoms, "val", ("image", "label", "seg")), max_mask_num=1, respacing=True,
                           target_spacing=4)[0]
    assert coarse["label"].shape == coarse["seg"].shape == (24, 48, 48) and coarse["spacing"] == [4.0, 4.0, 4.0]
    assert set(torch.unique(coarse["label"]).tolist()) == {0, 1, 2} and coarse["crop_size"] is None


def test_augmentation_is_seeded_bounded_and_consistent(phantoms):
    params = dict(lists(phantoms, kinds=("image", "label")), crop_shape=CROP, augment={"jitter": 4, "flip": [2]})
    first = [LesionDataset(**params, seed=3)[1] for _ in range(2)]
    assert first[0]["crop"] == first[1]["crop"], "same seed, same draw"
    dataset = LesionDataset(**params, seed=3)
    crops = [dataset[1]["crop"] for _ in range(12)]
    centre = crops[0]["crop_center"]
    assert len({tuple(crop["crop_start"]) for crop in crops}) > 1
    for crop in crops:
        for start, size, middle, full in zip(crop["crop_start"], CROP, centre, crop["full_size"]):
            low, high = (min(max(middle + shift - size // 2, 0), full - size) for shift in (-4, 4))
            assert low <= start <= high, "jitter of at most 4 voxels, then clamped inside the volume"
    assert {tuple(crop["flipped"]) for crop in crops} == {(), (2,)}
    hu, _ = read_volume(case_files(phantoms, 1)["image"])
    for _ in range(4):
        item = dataset[1]
        window = CropWindow.from_dict(item["crop"])
        expected = take_crop(hu, with_flips(window, ()))
        expected = expected[:, :, ::-1] if window.flipped else expected
        np.testing.assert_allclose(item["image"][0].numpy(), hu_to_unit(expected), atol=1e-6)
        assert (item["label"] == 2).any()


def test_random_sample_iter_num_num_and_transforms(phantoms):
    dataset = LesionDataset(**lists(phantoms, kinds=("image", "label")), crop_shape=CROP, random_sample=True,
                            iter_num=7, seed=0, transform=lambda item: {**item, "seen": True})
    assert len(dataset) == 7
    paths = {dataset[i]["image_path"] for i in range(7)}
    assert len(paths) > 1 and all(path.endswith("image.nii.gz") for path in paths)
    assert dataset[0]["seen"] is True
    with pytest.raises(IndexError):
        dataset[7]
    short = LesionDataset(**lists(phantoms, kinds=("image", "label")), crop_shape=CROP, num=2, iter_num=5)
    assert [short[i]["image_path"].split("/")[-2] for i in range(5)] == ["case_000", "case_001"] * 2 + ["case_000"]
    block = {"target": "test_dataset_phantoms.MarkItem", "params": {"key": "origin", "value": "config"}}
    from_config = LesionDataset(**lists(phantoms, kinds=("image", "label")), crop_shape=CROP, transform=block)
    assert from_config[0]["origin"] == "config"
    with pytest.raises(ConfigError, match="transform must be"):
        LesionDataset(**lists(phantoms, kinds=("image", "label")), crop_shape=CROP, transform=42)


@pytest.fixture
def broken_cases(phantoms, tmp_path):
    """Rows for: a truncated label (corrupt gzip), a good case, a lesion-free label."""
    good = [case_files(phantoms, index) for index in range(3)]
    truncated = tmp_path / "truncated_label.nii.gz"
    data = good[0]["label"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    label, geometry = read_label(good[2]["label"])
    write_volume(tmp_path / "no_lesion_label.nii.gz", np.where(label == 2, 1, label), geometry, dtype=np.uint8)
    return [{**good[0], "label": truncated}, good[1], {**good[2], "label": tmp_path / "no_lesion_label.nii.gz"}]


def test_bad_cases_raise_naming_the_file(broken_cases, tmp_path):
    params = write_lists(tmp_path / "lists", broken_cases)
    dataset = LesionDataset(**params, crop_shape=CROP)
    with pytest.raises(DataError, match=r"case 0 .*truncated_label.nii.gz: cannot read"):
        dataset[0]
    assert dataset[1]["text"]
    with pytest.raises(DataError, match=r"no_lesion_label.nii.gz: the label holds no lesion voxel"):
        dataset[2]
    with pytest.raises(DataError, match="truncated_label.nii.gz"):
        LesionDataset(**params, crop_shape=CROP, load_memory=True)


def test_skip_bad_cases_is_bounded(broken_cases, tmp_path, caplog):
    params = write_lists(tmp_path / "lists", broken_cases)
    with caplog.at_level(logging.WARNING, logger="ldm.data.dataset"):
        dataset = LesionDataset(**params, crop_shape=CROP, skip_bad_cases=True)
        assert dataset[0]["image_path"].endswith("case_001/image.nii.gz")
        assert dataset[2]["image_path"].endswith("case_001/image.nii.gz")
    assert "skipping bad case 0" in caplog.text and "truncated_label.nii.gz" in caplog.text
    assert "skipping bad case 2" in caplog.text
    only_bad = write_lists(tmp_path / "bad", [broken_cases[0], broken_cases[2]])
    dataset = LesionDataset(**only_bad, crop_shape=CROP, skip_bad_cases=True, load_memory=True)
    with pytest.raises(DataError, match=r"image.txt: all 2 cases failed to load"):
        dataset[0]


def test_label_shape_mismatch(phantoms, tmp_path):
    files = case_files(phantoms, 1)
    image = nib.load(str(files["label"]))
    for trim in (2, 5):
        data = np.asanyarray(image.dataobj)[:-trim]
        nib.save(nib.Nifti1Image(data, image.affine, image.header), str(tmp_path / f"label_{trim}.nii.gz"))
    near = write_lists(tmp_path / "near", [{**files, "label": tmp_path / "label_2.nii.gz"}])
    item = LesionDataset(**near, max_mask_num=1)[0]
    # Without a CT the label is the reference grid: the segmentation is resized to it.
    assert item["label"].shape == item["seg"].shape == (48, 96, 94) and (item["label"] == 2).any()
    far = write_lists(tmp_path / "far", [{**files, "label": tmp_path / "label_5.nii.gz"}])
    far_message = r"seg.nii.gz: shape \(48, 96, 96\) does not match the label .*label_5.nii.gz \(48, 96, 91\)"
    with pytest.raises(DataError, match=far_message):
        LesionDataset(**far, max_mask_num=1)[0]
    far_image = {key: value for key, value in far.items() if key != "seg_list"}
    with pytest.raises(DataError, match=r"label_5.nii.gz: shape .* does not match the image .*image.nii.gz"):
        LesionDataset(**far_image, crop_shape=CROP)[0]


def test_malformed_report_and_bad_label_values(phantoms, tmp_path):
    files = case_files(phantoms, 0)
    (tmp_path / "bad_type.json").write_text('{"5": ["", ""]}')
    label, geometry = read_label(files["label"])
    write_volume(tmp_path / "label_values.nii.gz", np.where(label == 1, 7, label), geometry, dtype=np.uint8)
    bad_report = write_lists(tmp_path / "report", [{**files, "type": tmp_path / "bad_type.json"}])
    with pytest.raises(DataError, match=r"bad_type.json: report\['5'\] must be a list"):
        LesionDataset(**bad_report, crop_shape=CROP)[0]
    bad_values = write_lists(tmp_path / "values", [{**files, "label": tmp_path / "label_values.nii.gz"}])
    with pytest.raises(DataError, match="label_values.nii.gz: label values 0..7"):
        LesionDataset(**bad_values, crop_shape=CROP)[0]


def test_bad_lists(phantoms, tmp_path):
    params = lists(phantoms)
    (tmp_path / "short.txt").write_text("case_000/label.nii.gz\n")
    unequal = r"image_list .*train_image_list.txt has 4 entries but label_list .*short.txt has 1"
    with pytest.raises(DataError, match=unequal):
        LesionDataset(**{**params, "label_list": str(tmp_path / "short.txt")}, crop_shape=CROP)
    with pytest.raises(DataError, match="missing_type.txt: list file not found"):
        LesionDataset(**{**params, "type_list": str(tmp_path / "missing_type.txt")}, crop_shape=CROP)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="the list holds no case"):
        LesionDataset(image_list=str(tmp_path / "empty.txt"), label_list=str(tmp_path / "empty.txt"), crop_shape=CROP)


@pytest.mark.parametrize("override, message", [
    ({"crop_shape": None}, "crop_shape is required"),
    ({"type_list": None}, "needs type_list"),
    ({"seg_version": "v3"}, "seg_version must be"),
    ({"max_mask_num": 0}, "max_mask_num must be"),
    ({"max_mask_num": 1, "augment": {"jitter": 2}}, "training only"),
    ({"augment": {"jitter": 16}}, "below half the crop"),
    ({"augment": {"rotate": 1}}, "unknown augment option"),
    ({"augment": {"flip": [3]}}, "augment.flip"),
    ({"image_list": None}, "image_list and label_list are required"),
    ({"crop_shape": [32, 64]}, "three integers"),
])
def test_config_errors(phantoms, override, message):
    with pytest.raises(ConfigError, match=message):
        LesionDataset(**{**lists(phantoms), "crop_shape": CROP, **override})
