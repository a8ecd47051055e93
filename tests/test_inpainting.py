"""LINet (InpaintingDiffusion): release checkpoint names, masked loss, clean-latent blend, overfitting."""
import numpy as np
import pytest
import torch
from conftest import VOCABULARY_ENCODER, load_manifest, tiny_unet_config

from inference.linet import latent_mask
from inference.options import parse_options
from ldm.errors import ConfigError
from ldm.models.diffusion.inpainting import InpaintingDiffusion, dice_loss
from ldm.models.diffusion.samplers import SamplerSettings
from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

TINY_VQ = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {
        "embed_dim": 4, "n_embed": 64,
        "ddconfig": dict(dims=3, double_z=False, z_channels=4, resolution=[16, 32, 32], in_channels=1, out_ch=1,
                         ch=16, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], attn_type="none",
                         dropout=0.0, sample_depth=[0]),
        "lossconfig": {"target": "torch.nn.Identity"},
    },
}


def tiny_linet(**overrides) -> InpaintingDiffusion:
    params = dict(unet_config=tiny_unet_config(5, 5), first_stage_config=TINY_VQ, cond_stage_config=VOCABULARY_ENCODER,
                  timesteps=1000, linear_start=0.0015, linear_end=0.0195, image_size=[8, 16, 16], channels=4,
                  loss_type="l1", learning_rate=1e-3)
    params.update(overrides)
    return InpaintingDiffusion(**params)


def image_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 16, 32, 32, generator=generator) * 0.2 + 0.4
    label = torch.zeros(1, 16, 32, 32, dtype=torch.long)
    label[0, 4:12, 8:20, 10:22] = 2
    image[:, :, 4:12, 8:20, 10:22] -= 0.2
    return {"image": image, "label": label, "text": [{"density": "hypodense lesion,", "CT value": "10 HU,"}]}


def test_release_linet_matches_the_released_checkpoint_keys():
    manifest = load_manifest("linet_full_train.json")
    config = load_config([PIPELINE_DIR / "configs/diffusion/lesiondiffusion.yaml"],
                         ["model.params.first_stage_config.params.ckpt_path=null"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model, key_path="model")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert list(ours) == list(manifest)
    assert ours == manifest
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 187_503_365


def test_inputs_mask_and_frozen_first_stage():
    model = tiny_linet()
    inputs = model.get_input(image_batch())
    assert inputs["x_start"].shape == (1, 4, 8, 16, 16)
    assert inputs["mask"].shape == (1, 1, 8, 16, 16)
    assert inputs["mask"][0, 0, 2:6, 4:10, 5:11].min() == 1 and inputs["mask"].sum() == 4 * 6 * 6
    model.train()
    assert not model.first_stage_model.training
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())


def test_loss_is_the_masked_l1_plus_dice():
    model = tiny_linet()
    inputs = model.get_input(image_batch())
    t = torch.tensor([300])
    noise = torch.randn(inputs["x_start"].shape, generator=torch.Generator().manual_seed(1))
    loss, logs = model.p_losses(inputs, t, noise)
    latent, mask = inputs["x_start"], inputs["mask"]
    x_in = latent * (1 - mask) + model.q_sample(latent, t, noise) * mask
    with torch.no_grad():
        output = model.predict(x_in, mask, t, inputs["context"])
    expected_simple = (noise * mask - output[:, :4] * mask).abs().sum() / inputs["bbox"].sum()
    torch.testing.assert_close(logs["loss_simple"], expected_simple)
    torch.testing.assert_close(logs["mask_dice_loss"], dice_loss(torch.sigmoid(output[:, 4:]), mask))
    torch.testing.assert_close(loss.detach(), expected_simple + logs["mask_dice_loss"])


def test_linet_overfits_one_batch_at_fixed_noise():
    torch.manual_seed(0)
    model = tiny_linet(learning_rate=2e-3, use_ema=False)
    optimizer = model.configure_optimizers()
    inputs = model.get_input(image_batch())

    def fixed_loss():
        return model.loss_at_random_t(inputs, torch.Generator().manual_seed(3))

    first = fixed_loss()[1]
    for _ in range(60):
        loss = fixed_loss()[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = fixed_loss()[1]
    assert last["loss_simple"] < first["loss_simple"] / 10
    assert last["mask_dice_loss"] < 0.8 * first["mask_dice_loss"]  # the zero-initialised mask head learns slower


@pytest.mark.parametrize("blend", ["clean", "renoise"])
def test_sampling_keeps_the_latent_outside_the_mask_and_decodes(blend):
    model = tiny_linet(use_ema=False).eval()
    inputs = model.get_input(image_batch())
    sample = model.sample(inputs["x_start"], inputs["mask"], inputs["context"], SamplerSettings(steps=3),
                          blend=blend, generator=torch.Generator().manual_seed(0))
    outside = (inputs["mask"] == 0).expand_as(sample)
    assert torch.equal(sample[outside], inputs["x_start"][outside])
    again = model.sample(inputs["x_start"], inputs["mask"], inputs["context"], SamplerSettings(steps=3),
                         blend=blend, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)
    assert model.decode(sample).shape == (1, 1, 16, 32, 32)


def test_inference_latent_mask_max_pool_covers_thin_lesions_and_nearest_is_the_training_mask():
    model = tiny_linet()
    label = image_batch()["label"].clone()
    label[0, 13, 2:6, 2:30] = 2  # a one-voxel-thin plate at an odd z: nearest downsampling (even z) misses it
    lesion = (label[0] == 2).numpy()
    max_pooled = latent_mask(lesion, 2, torch.device("cpu"))
    nearest = latent_mask(lesion, 2, torch.device("cpu"), mode="nearest")
    training = model.get_input({**image_batch(), "label": label})["mask"]
    assert torch.equal(nearest, training)
    reference = torch.from_numpy(lesion[::2, ::2, ::2].astype(np.float32))[None, None]
    assert torch.equal(nearest, reference)
    assert max_pooled[0, 0, 6, 1:3, 1:15].min() == 1 and nearest[0, 0, 6].sum() == 0
    assert torch.equal(max_pooled * nearest, nearest)  # max-pooling only adds latent voxels
    assert parse_options({"latent_mask": "nearest"}, "linet").latent_mask == "nearest"
    with pytest.raises(ConfigError, match="inference.latent_mask"):
        parse_options({"latent_mask": "linear"}, "linet")
