"""Text control: the attribute phantoms say what was drawn, and a tiny LINet trained on two texts obeys them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.make_phantoms import make_phantoms
from ldm.data.volume import read_volume
from ldm.models.diffusion.inpainting import InpaintingDiffusion
from preparation.measure import measure_lesion
from preparation.phrases import ISO_BAND_HU, measured_phrases

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
        measured = measure_lesion(ct, lesion, lesion, seg == LIVER, seg, LIVER, geometry.spacing_zyx, ISO_BAND_HU)
        phrases = measured_phrases(measured, LIVER).values
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


def test_mixed_phantoms_are_unchanged_by_the_attribute_option(tmp_path):
    mixed = make_phantoms(tmp_path / "mixed", n=2, seed=3, progress=False)
    kinds = [entry["lesion_type"] for entry in mixed["manifest"]["cases"]]
    assert kinds == ["cyst", "tumour"] and mixed["manifest"]["parameters"]["lesions"] == "mixed"


def _tiny_linet() -> InpaintingDiffusion:
    vq = {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 4, "n_embed": 64, "lossconfig": {"target": "torch.nn.Identity"},
        "ddconfig": {"dims": 3, "double_z": False, "z_channels": 4, "resolution": [8, 16, 16], "in_channels": 1,
                     "out_ch": 1, "ch": 16, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                     "attn_type": "none", "dropout": 0.0, "sample_depth": [0]}}}
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": [4, 8, 8], "dims": 3, "in_channels": 5, "out_channels": 5, "model_channels": 16,
        "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32, "legacy": True}}
    encoder = {"target": "ldm.modules.encoders.vocabulary.VocabularyEncoder", "params": {"output_dim": 32}}
    return InpaintingDiffusion(unet_config=unet, first_stage_config=vq, cond_stage_config=encoder, image_size=[4, 8, 8],
                               channels=4, loss_type="l1", timesteps=1000, linear_start=0.0015, linear_end=0.0195,
                               use_ema=False, monitor=None)


TEXTS = {"hypo": {"density": "hypodense lesion,", "CT value": "10.0 HU,"},
         "hyper": {"density": "hyperdense lesion,", "CT value": "110.0 HU,"}}
LESION_UNIT = {"hypo": 0.47, "hyper": 0.71}  # [0, 1] model intensities around a 0.59 (60 HU) organ


def _images() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    z, y, x = np.mgrid[:8, :16, :16]
    ball = (z - 3.5) ** 2 + ((y - 7.5) / 1.5) ** 2 + ((x - 7.5) / 1.5) ** 2 < 3.2 ** 2
    label = torch.from_numpy(np.where(ball, 2, 1)[None].astype(np.int64))
    images = {}
    for name, value in LESION_UNIT.items():
        image = np.where(ball, value, 0.59).astype(np.float32)
        images[name] = torch.from_numpy(image)[None, None]
    return images, label


def test_a_tiny_linet_trained_on_two_texts_inpaints_two_different_lesions():
    """Trained on a hypodense and a hyperdense lesion, each with its text, in the same place of the same organ:
    sampled with each text, the inpainted latent lands nearer the latent of the lesion that text described.
    A model that ignored the text could only produce one (average) lesion for both."""
    torch.manual_seed(0)
    model = _tiny_linet()
    images, label = _images()
    batch = {"image": torch.cat([images["hypo"], images["hyper"]] * 2), "label": torch.cat([label] * 4),
             "text": [TEXTS["hypo"], TEXTS["hyper"]] * 2}
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=2e-3)
    model.train()
    for _ in range(250):
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        latents = {name: model.encode(image) for name, image in images.items()}
        mask = model.latent_mask(label, latents["hypo"].shape)
        inside = mask[0, 0].bool()
        mask = mask.repeat(4, 1, 1, 1, 1)  # four samples per text
        background = latents["hypo"].repeat(4, 1, 1, 1, 1) * (1 - mask)  # the organ; the lesion is inpainted
        for name, text in TEXTS.items():
            sampled = model.sample(background, mask, model.encode_context([text] * 4), steps=20,
                                   generator=torch.Generator().manual_seed(1))
            distances = {other: float((sampled[:, :, inside] - latent[:, :, inside]).abs().mean())
                         for other, latent in latents.items()}
            other = "hyper" if name == "hypo" else "hypo"
            assert distances[name] < 0.5 * distances[other], (name, distances)
