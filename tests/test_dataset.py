"""LesionDataset on real data: the upstream demo's 280^3 label maps and segmentations (every mode), and the real
TotalSegmentator example CT with its v2 segmentation (conversion, padding with air, multi-organ report)."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import TOTALSEG_EXAMPLE, UPSTREAM_DEMO, require_shared
from ldm.data.attributes import CAVITY_PHRASES
from ldm.data.crops import CropWindow, largest_component, take_crop
from ldm.data.dataset import LesionDataset
from ldm.data.intensity import hu_to_unit
from ldm.util import PIPELINE_DIR
from ldm.data.volume import read_label, read_volume, write_volume
from ldm.errors import DataError

CASES = ("Bladder_cancer", "Liver_cancer")
LMNET_CROP = [64, 152, 152]


def write_list(path, entries):
    path.write_text("".join(f"{entry}\n" for entry in entries))
    return str(path)


def organ_wise_hu(segmentation, label):
    """A stand-in CT: air outside the organs, one HU value per organ, the lesion at -20 HU."""
    hu = np.where(segmentation > 0, 20 + (segmentation % 7) * 10, -1000).astype(np.int16)
    hu[label == 2] = -20
    return hu


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Lists over the two upstream cases; a CT built from the segmentation for the bladder case only."""
    root = require_shared(UPSTREAM_DEMO)
    out = tmp_path_factory.mktemp("upstream")
    arrays = {}
    for case in CASES:
        label, geometry = read_label(root / case / "label.nii.gz")
        seg, _ = read_label(root / case / "totalseg_health.nii.gz")
        arrays[case] = {"label": label, "seg": seg}
    hu = organ_wise_hu(arrays["Bladder_cancer"]["seg"], arrays["Bladder_cancer"]["label"])
    arrays["Bladder_cancer"]["hu"] = hu
    _, geometry = read_label(root / "Bladder_cancer" / "label.nii.gz")
    write_volume(out / "bladder_ct.nii", hu, geometry, dtype=np.int16)
    lists = {
        # The liver CT does not exist: LMNet modes must never read the image.
        "image_list": write_list(out / "image.txt", [out / "bladder_ct.nii", out / "missing_liver_ct.nii.gz"]),
        "label_list": write_list(out / "label.txt", [root / c / "label.nii.gz" for c in CASES]),
        "type_list": write_list(out / "type.txt", [root / c / "type.json" for c in CASES]),
        "seg_list": write_list(out / "seg.txt", [root / c / "totalseg_health.nii.gz" for c in CASES]),
    }
    return {"lists": lists, "arrays": arrays, "root": root}


@pytest.fixture(scope="module")
def lmnet_items(upstream):
    lists = upstream["lists"]
    dataset = LesionDataset(**lists, coarseg_list=lists["seg_list"], crop_shape=LMNET_CROP, load_memory=True)
    return dataset, [dataset[0], dataset[1]]


def test_lmnet_training_items(upstream, lmnet_items):
    dataset, items = lmnet_items
    assert dataset.mode == "lmnet_training" and len(dataset) == 2
    for case, item, organ in zip(CASES, items, (104, 5)):
        assert set(item) == {"seg", "target", "label", "text", "image_path", "crop"}
        for key in ("seg", "target", "label"):
            assert item[key].shape == (1, *LMNET_CROP)
        assert item["seg"].dtype == torch.float32 and item["target"].dtype == item["label"].dtype == torch.int64
        window = CropWindow.from_dict(item["crop"])
        label, seg = upstream["arrays"][case]["label"], upstream["arrays"][case]["seg"]
        seg_crop = take_crop(seg, window)
        np.testing.assert_allclose(item["seg"][0].numpy() * 104, seg_crop, atol=1e-4)
        assert 0 <= item["seg"].min() and item["seg"].max() <= 1
        np.testing.assert_array_equal(item["target"][0].numpy(), seg_crop == organ)
        component = take_crop(largest_component(label == 2), window)
        np.testing.assert_array_equal(item["label"][0].numpy(), component)
        assert item["label"].sum() == (label == 2).sum(), "the whole lesion fits in the crop"
        assert item["text"]["lesion location"] == {104: "urinary bladder", 5: "liver"}[organ]
        assert list(item["text"])[-1] == "cavity"
    bladder, liver = items
    # Bladder: not clamped, so the crop centre is the lesion's bbox centre (80, 88, 146).
    assert bladder["crop"]["crop_center"] == [80, 88, 146]
    assert [s + c // 2 for s, c in zip(bladder["crop"]["crop_start"], LMNET_CROP)] == [80, 88, 146]
    assert bladder["text"]["cavity"] == "wall thickening,"
    # Liver: the lesion touches the top slice (z up to 279): the crop is clamped inside the volume.
    assert liver["crop"]["crop_start"][0] == 280 - 64
    # 63 % of the liver lesion's shell lies in the liver: the rule says it protrudes.
    assert liver["text"]["cavity"] == CAVITY_PHRASES[3]
    assert liver["text"]["specific features"].startswith("presence of increased density")


def test_collate_batches_two_cases_with_different_texts(lmnet_items):
    _, items = lmnet_items
    batch = LesionDataset.collate(items)
    assert batch["seg"].shape == (2, 1, *LMNET_CROP) and batch["label"].dtype == torch.int64
    assert [len(text) for text in batch["text"]] == [6, 7]
    assert batch["image_path"] == [item["image_path"] for item in items]
    assert batch["crop"][1]["crop_start"] == items[1]["crop"]["crop_start"]


def test_image_training_items(upstream):
    lists = upstream["lists"]
    dataset = LesionDataset(image_list=lists["image_list"], label_list=lists["label_list"],
                            type_list=lists["type_list"], coarseg_list=lists["seg_list"], crop_shape=[128] * 3, num=1)
    assert dataset.mode == "image_training" and len(dataset) == 1
    item = dataset[0]
    assert set(item) == {"image", "label", "text", "image_path", "crop"}
    assert item["image"].shape == (1, 128, 128, 128) and item["image"].dtype == torch.float32
    assert item["label"].shape == (128, 128, 128) and item["label"].dtype == torch.int64
    window = CropWindow.from_dict(item["crop"])
    arrays = upstream["arrays"]["Bladder_cancer"]
    expected = hu_to_unit(take_crop(arrays["hu"], window).astype(np.float32))
    np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    np.testing.assert_array_equal(item["label"].numpy(), take_crop(arrays["label"], window))
    assert set(torch.unique(item["label"]).tolist()) == {0, 1, 2} and (item["label"] == 2).sum() == 27793
    assert [s + 64 for s in item["crop"]["crop_start"]] == item["crop"]["crop_center"] == [80, 88, 146]
    assert list(item["text"].values())[1:] == [
        "urinary bladder", "round-like,protrusion into the lumen,", "isodense lesion,", "homogeneous,", "35.0 HU,",
        "serosal surface irregularity,", "no close relationship with surrounding organs,", "",
    ]


def test_inference_items(upstream):
    lists = upstream["lists"]
    linet = LesionDataset(image_list=lists["image_list"], label_list=lists["label_list"], type_list=lists["type_list"],
                          coarseg_list=lists["seg_list"], max_mask_num=3, crop_shape=[128, 128, 128], num=1)
    item = linet[0]
    arrays = upstream["arrays"]["Bladder_cancer"]
    assert linet.mode == "inference" and "seg" not in item
    assert item["image"].shape == (1, 280, 280, 280) and item["image"].dtype == torch.float32
    expected = hu_to_unit(arrays["hu"][70:90].astype(np.float32))
    np.testing.assert_allclose(item["image"][0, 70:90].numpy(), expected, atol=1e-6)
    for key in ("label", "coarseg"):
        assert item[key].shape == (280, 280, 280) and item[key].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), arrays["label"])
    np.testing.assert_array_equal(item["coarseg"].numpy(), arrays["seg"])
    root = upstream["root"]
    assert item["type"] == json.loads((root / "Bladder_cancer" / "type.json").read_text())
    assert item["max_mask_num"] == 3 and item["crop_size"] == [128, 128, 128] and item["spacing"] == [1.0, 1.0, 1.0]
    assert item["label_path"] == str(root / "Bladder_cancer" / "label.nii.gz")
    assert item["coarseg_path"] == item["type_path"].replace("type.json", "totalseg_health.nii.gz")
    del item
    lmnet = LesionDataset(**lists, max_mask_num=2, crop_shape=LMNET_CROP)
    item = lmnet[1]  # the liver case: its CT does not exist and is not read
    assert set(item) >= {"label", "seg", "type", "max_mask_num", "crop_size", "image_path", "seg_path"}
    assert "image" not in item and item["seg"].dtype == torch.int64 and item["crop_size"] == LMNET_CROP
    np.testing.assert_array_equal(item["seg"].numpy(), upstream["arrays"]["Liver_cancer"]["seg"])


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory):
    """The real TotalSegmentator example CT (30 x 101 x 122 at 3 mm, RAS, v2 segmentation) with a liver lesion."""
    root = require_shared(TOTALSEG_EXAMPLE)
    out = tmp_path_factory.mktemp("real_ct")
    seg_v2, geometry = read_label(root / "example_seg.nii.gz")
    liver = seg_v2 == 5
    depth = ndimage.distance_transform_edt(np.pad(liver, 1))[1:-1, 1:-1, 1:-1]
    centre = np.unravel_index(np.argmax(depth), depth.shape)
    grid = np.indices(liver.shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 9
    label = np.where(liver, 1, 0).astype(np.uint8)
    label[ball & liver] = 2
    write_volume(out / "label.nii.gz", label, geometry, dtype=np.uint8)
    attributes = {"enhancement status": "enhanced CT,", "lesion location": "5", "shape": "round-like,",
                  "density": "hypodense lesion,", "CT value": "approximately 20 HU,", "specific features": ""}
    report = {"1": ["", "", dict(attributes, **{"lesion location": "1"})], "5": ["", "", attributes]}
    (out / "type.json").write_text(json.dumps(report))
    lists = {
        "image_list": write_list(out / "image.txt", [root / "example_ct_sm.nii.gz"]),
        "label_list": write_list(out / "label.txt", [out / "label.nii.gz"]),
        "type_list": write_list(out / "type.txt", [out / "type.json"]),
        "seg_list": write_list(out / "seg.txt", [root / "example_seg.nii.gz"]),
    }
    return {"lists": lists, "seg_v2": seg_v2, "label": label, "ct": read_volume(root / "example_ct_sm.nii.gz")[0]}


def v2_names_in_v1(seg_v2):
    """The expected v1 map, computed by class name from the label tables."""
    tables = json.loads((PIPELINE_DIR / "totalseg_labels.json").read_text())
    v1_ids = {name.replace("_", " ").lower(): int(key) for key, name in tables["v1"].items()}
    lut = np.zeros(256, np.int64)
    for key, name in tables["v2"].items():
        lut[int(key)] = v1_ids.get(name.replace("_", " ").lower(), 0)
    return lut[seg_v2]


def test_real_ct_lmnet_with_v2_segmentation(real_ct):
    dataset = LesionDataset(**real_ct["lists"], seg_version="v2", crop_shape=[32, 64, 64])
    item = dataset[0]
    window = CropWindow.from_dict(item["crop"])
    assert window.pad_before == (1, 0, 0) and item["seg"].shape == (1, 32, 64, 64)
    expected = take_crop(v2_names_in_v1(real_ct["seg_v2"]), window)
    np.testing.assert_allclose(item["seg"][0].numpy() * 104, expected, atol=1e-4)
    assert item["seg"].max() * 104 > 100, "v1 ids of the vertebrae and ribs are present"
    np.testing.assert_array_equal(item["target"][0].numpy(), expected == 5)
    assert item["text"]["lesion location"] == "liver", "the multi-organ report picks the organ under the lesion"
    assert item["text"]["cavity"] == "within the parenchymal organ,", "a ball deep in the liver is within it"
    with pytest.raises(DataError, match="example_seg.nii.gz: organ ids up to 117 .* seg_version: v2"):
        LesionDataset(**real_ct["lists"], crop_shape=[32, 64, 64])[0]


def test_real_ct_image_crop_is_padded_with_air(real_ct):
    lists = dict(real_ct["lists"])
    lists["coarseg_list"] = lists.pop("seg_list")
    item = LesionDataset(**lists, seg_version="v2", crop_shape=[32, 64, 64])[0]
    window = CropWindow.from_dict(item["crop"])
    image = item["image"][0].numpy()
    assert np.all(image[0] == 0.0) and np.all(image[31] == 0.0), "padding is air (-1000 HU -> 0)"
    np.testing.assert_allclose(image[1:31], hu_to_unit(take_crop(real_ct["ct"], window)[1:31]), atol=1e-6)
    assert np.all(item["label"].numpy()[[0, 31]] == 0) and (item["label"] == 2).sum() == (real_ct["label"] == 2).sum()
    assert item["text"]["lesion location"] == "liver" and item["text"]["CT value"] == "20.0 HU,"
