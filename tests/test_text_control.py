"""Text control: the attribute phantoms say what was drawn; LINet's training mask hides the lesion like inference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.fidelity import agrees, describe_lesion, fidelity_line, judge, phrase_class
from demo.make_phantoms import make_phantoms
from ldm.data.volume import read_volume
from inference.linet import latent_mask
from ldm.models.diffusion.inpainting import InpaintingDiffusion

LIVER = 5


@pytest.fixture(scope="module")
def attribute_phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("attributes"), n=12, seed=0, lesions="attributes", progress=False)


def _first_word(phrase: str) -> str:
    return phrase.split(",")[0].split()[0]


def test_attribute_phantoms_draw_every_attribute_and_report_what_was_drawn(attribute_phantoms):
    out = Path(attribute_phantoms["out_dir"])
    entries = attribute_phantoms["manifest"]["cases"]
    assert attribute_phantoms["manifest"]["parameters"]["lesions"] == "attributes"
    assert {entry["organ"] for entry in entries} == {"liver"}
    assert {entry["density"] for entry in entries} == {"hypo", "iso", "hyper"}
    assert {entry["irregular"] for entry in entries} == {True, False}
    assert {entry["blurred_margin"] for entry in entries} == {True, False}
    assert {entry["heterogeneous"] for entry in entries} == {True, False}
    agree = {"density": [], "shape": [], "surface": [], "variations": []}
    for entry in entries:
        folder = out / entry["case"]
        ct, geometry = read_volume(folder / "image.nii.gz")
        label, _ = read_volume(folder / "label.nii.gz")
        seg, _ = read_volume(folder / "seg.nii.gz")
        report = json.loads((folder / "type.json").read_text())[str(LIVER)][2]
        lesion = label == 2
        phrases, measured = describe_lesion(ct, lesion, seg, LIVER, geometry.spacing_zyx)
        # The report is written from the construction, in the original vocabulary.
        assert ("irregular" in report["shape"]) == entry["irregular"]
        assert ("ill-defined" in report["surface characteristics"]) == entry["blurred_margin"]
        assert report["density variations"] == ("heterogeneous," if entry["heterogeneous"] else "homogeneous,")
        assert not (entry["density"] == "iso" and entry["heterogeneous"])  # two parts of an iso lesion: mixed
        density_word = {"hypo": ("hypodense", "low", "hypoattenuating"), "iso": ("isodense", "isoattenuating"),
                        "hyper": ("hyperdense", "high", "hyperattenuating")}[entry["density"]]
        assert _first_word(report["density"]) in density_word
        # ... and the measurement of preparation/ reads the same lesion back.
        agree["density"].append(_first_word(phrases["density"]) == density_word[0])
        agree["shape"].append((phrases["shape"] == "irregular,") == entry["irregular"])
        agree["variations"].append(phrases["density variations"] == report["density variations"])
        if measured.margin_leak is not None:
            agree["surface"].append(phrases["surface characteristics"] == report["surface characteristics"])
    assert all(np.mean(values) >= 0.9 for values in agree.values()), agree


@pytest.mark.parametrize("attribute, phrase, expected", [
    ("density", "hypoattenuating fluid-like lesion,", "hypo"), ("density", "high density lesion,", "hyper"),
    ("density", "isoattenuating lesion,", "iso"), ("density", "mixed attenuation lesion,", "mixed"),
    ("shape", "cystic,", "round"), ("shape", "round-like,", "round"), ("shape", "irregular,", "irregular"),
    ("surface characteristics", "unclear boundary with the renal parenchyma,", "fading"),
    ("surface characteristics", "clear serosal surface,", "sharp"),
    ("density variations", "heterogeneous,", "heterogeneous"), ("shape", "luminal narrowing,", "luminal narrowing")])
def test_phrase_class_folds_synonyms(attribute, phrase, expected):
    assert phrase_class(attribute, phrase) == expected


def test_fidelity_line_of_a_phantom_lesion_against_its_own_report(attribute_phantoms):
    out = Path(attribute_phantoms["out_dir"])
    for entry in attribute_phantoms["manifest"]["cases"]:
        folder = out / entry["case"]
        ct, geometry = read_volume(folder / "image.nii.gz")
        label, _ = read_volume(folder / "label.nii.gz")
        seg, _ = read_volume(folder / "seg.nii.gz")
        report = json.loads((folder / "type.json").read_text())[str(LIVER)][2]
        phrases, measurement = describe_lesion(ct, label == 2, seg, LIVER, geometry.spacing_zyx)
        pairs = judge(report, phrases, measurement)
        assert agrees("CT value", pairs["CT value"])  # the report's CT value is the drawn lesion's mean
        if entry["density"] == "iso":
            assert pairs["surface characteristics"][1] is None and "n/a" in fidelity_line(pairs, 1)
        line = fidelity_line(pairs, 2)
        assert line.endswith("components 2 DIFFERS") and line.count(" -> ") == 5


def test_default_phantoms_keep_their_lesion_kinds_in_turn(tmp_path):
    mixed = make_phantoms(tmp_path / "mixed", n=2, seed=3, progress=False)
    kinds = [entry["lesion_type"] for entry in mixed["manifest"]["cases"]]
    assert kinds == ["cyst", "tumour"] and mixed["manifest"]["parameters"]["lesions"] == "mixed"


@pytest.mark.parametrize("dilation", [0, 1])
def test_cover_training_mask_is_the_inference_mask(dilation):
    """Training with ``latent_mask_mode: cover`` masks exactly what inference masks (every latent cell the lesion
    touches, grown by the same dilation); the original nearest resize leaves partly covered cells known."""
    rng = np.random.default_rng(0)
    lesion = np.zeros((16, 32, 32), dtype=bool)
    lesion[5:12, 9:20, 13:22] = rng.random((7, 11, 9)) < 0.8
    label = torch.from_numpy(np.where(lesion, 2, 1)[None].astype(np.int64))
    model = InpaintingDiffusion.__new__(InpaintingDiffusion)
    torch.nn.Module.__init__(model)
    model.lesion_value, model.latent_mask_mode, model.latent_mask_dilation = 2, "cover", dilation
    training = model.latent_mask(label, torch.Size([1, 4, 8, 16, 16]))
    assert torch.equal(training, latent_mask(lesion, 2, torch.device("cpu"), dilation=dilation))
    model.latent_mask_mode, model.latent_mask_dilation = "nearest", 0
    nearest = model.latent_mask(label, torch.Size([1, 4, 8, 16, 16]))
    assert bool((training >= nearest).all()) and training.sum() > nearest.sum()
    touched = lesion.reshape(8, 2, 16, 2, 16, 2).any(axis=(1, 3, 5))
    assert bool(training[0, 0][torch.from_numpy(touched)].all())


def test_latent_mask_options_are_checked():
    with pytest.raises(ValueError, match="latent_mask_mode"):
        InpaintingDiffusion(unet_config={}, latent_mask_mode="dilate")
