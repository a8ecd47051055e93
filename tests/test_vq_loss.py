"""VQ-GAN training: LPIPS loading, discriminators, loss terms, manifest of the full module, overfitting, Lightning."""
import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.models import vgg16

from ldm.errors import ConfigError, MissingWeightsError
from ldm.models.autoencoder import VQModel, VQModelInterface
from ldm.modules.losses.discriminator import NLayerDiscriminator, hinge_d_loss
from ldm.modules.losses.lpips import LPIPS
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator
from ldm.util import count_params, load_config

COMPAT = Path(__file__).resolve().parents[2] / "shared" / "compat"
PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
LOSS_TARGET = "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"


def smooth_phantom(shape):
    """Noise-free body (0.5) with a bright blob (0.9) in air (0): what a VQ can memorise quickly."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size) for size in shape], indexing="ij")
    radius = sum((axis / 0.85) ** 2 for axis in axes)
    blob = sum((axis - 0.25) ** 2 for axis in axes)
    return ((radius < 1).float() * 0.5 + (blob < 0.15).float() * 0.4)[None, None]


def tiny_vq(disc_start=10**6, learning_rate=1e-3, seed=0, disc_start_counts="autoencoder_steps", **loss_params):
    ddconfig = dict(dims=3, double_z=False, z_channels=4, resolution=[8, 16, 16], in_channels=1, out_ch=1, ch=16,
                    ch_mult=[1, 1], num_res_blocks=0, attn_resolutions=[], attn_type="none", dropout=0.0,
                    sample_depth=[0])
    params = {"disc_start": disc_start, "perceptual_weight": 0.0, "disc_ndf": 8, **loss_params}
    torch.manual_seed(seed)
    return VQModel(ddconfig=ddconfig, lossconfig={"target": LOSS_TARGET, "params": params}, n_embed=64, embed_dim=4,
                   learning_rate=learning_rate, disc_start_counts=disc_start_counts)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random stand-ins for vgg16-397923af.pth (torchvision keys) and the LPIPS heads vgg.pth."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(1)
    features = {f"features.{key}": value for key, value in vgg16(weights=None).features.state_dict().items()}
    heads = {f"lin{index}.model.1.weight": torch.rand(1, channels, 1, 1)
             for index, channels in enumerate((64, 128, 256, 512, 512))}
    torch.save(features, folder / "vgg16.pth")
    torch.save(heads, folder / "vgg_lpips.pth")
    return folder / "vgg_lpips.pth", folder / "vgg16.pth", features, heads


def test_full_release_module_matches_manifest_and_loads_a_checkpoint_strictly(lpips_files, tmp_path):
    lpips_path, vgg_path, features, heads = lpips_files
    config = load_config([PIPELINE / "configs" / "autoencoder" / "lesiondiffusion_vq.yaml"],
                         [f"model.params.lossconfig.params.lpips_path={lpips_path}",
                          f"model.params.lossconfig.params.vgg_path={vgg_path}"]).model.params
    model = VQModel(ddconfig=dict(config.ddconfig), lossconfig=config.lossconfig, n_embed=2048, embed_dim=4)
    expected_path = COMPAT / "vq_full_with_loss.json"
    if not expected_path.exists():
        pytest.skip("compat manifest not present")
    expected = json.loads(expected_path.read_text())
    state = model.state_dict()
    assert list(state) == list(expected)
    assert {key: list(value.shape) for key, value in state.items()} == expected
    assert count_params(model) == 35_540_017
    assert count_params(model.loss.perceptual_loss) == 14_716_162
    assert count_params(model.loss.frame_discriminator) == 2_764_481
    assert count_params(model.loss.ct_discriminator) == 11_049_665
    assert torch.equal(state["loss.perceptual_loss.net.slice4.19.weight"], features["features.19.weight"])
    assert torch.equal(state["loss.perceptual_loss.lin3.model.1.weight"], heads["lin3.model.1.weight"])
    generator = torch.Generator().manual_seed(0)
    synthetic = {key: (torch.randint(0, 9, shape, generator=generator) if key.endswith("num_batches_tracked")
                       else torch.randn(shape, generator=generator)) for key, shape in expected.items()}
    model.load_state_dict(synthetic, strict=True)
    torch.save({"state_dict": synthetic}, tmp_path / "VQ.ckpt")
    first_stage = VQModelInterface(ddconfig=dict(config.ddconfig), lossconfig={"target": "torch.nn.Identity"},
                                   n_embed=2048, embed_dim=4)
    with pytest.raises(MissingWeightsError, match=r"unexpected: loss\..*\(85 in all\)"):
        first_stage.init_from_ckpt(tmp_path / "VQ.ckpt")
    missing, unexpected = first_stage.init_from_ckpt(tmp_path / "VQ.ckpt", ignore_keys=["loss."])
    assert missing == [] and len(unexpected) == 85 and all(key.startswith("loss.") for key in unexpected)
    assert torch.equal(first_stage.encoder.conv_in.weight, synthetic["encoder.conv_in.weight"])


def test_lpips_loads_local_files_only_and_behaves_as_a_distance(lpips_files, tmp_path):
    lpips_path, vgg_path, _, _ = lpips_files
    metric = LPIPS(lpips_path=lpips_path, vgg_path=vgg_path)
    torch.save(metric.state_dict(), tmp_path / "full_lpips.pth")
    reloaded = LPIPS(lpips_path=tmp_path / "full_lpips.pth")
    assert all(torch.equal(a, b) for a, b in zip(metric.state_dict().values(), reloaded.state_dict().values()))
    metric.train()
    assert not metric.training and not any(p.requires_grad for p in metric.parameters())
    torch.manual_seed(0)
    image = torch.rand(2, 1, 32, 32)
    other = image.clone().requires_grad_()
    with torch.no_grad():
        assert torch.all(metric(image, image) == 0)
    distance = metric(image + 0.2 * torch.randn_like(image), other)
    assert distance.shape == (2, 1, 1, 1) and torch.all(distance > 0)
    distance.sum().backward()
    assert other.grad.abs().sum() > 0


def test_missing_lpips_weights_raise_and_zero_weight_skips_lpips(tmp_path):
    with pytest.raises(MissingWeightsError, match="vgg_lpips.pth"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, lpips_path=tmp_path / "vgg_lpips.pth",
                                 vgg_path=tmp_path / "vgg16.pth")
    with pytest.raises(MissingWeightsError, match="lpips_path is not set"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    loss = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=8)
    assert not hasattr(loss, "perceptual_loss")


def test_discriminators_are_patchgans_with_intermediate_features():
    torch.manual_seed(0)
    frame = NLayerDiscriminator(1, 8, 3, dims=2)
    volume = NLayerDiscriminator(1, 8, 3, dims=3)
    frame_stages = frame(torch.rand(2, 1, 32, 32))
    volume_stages = volume(torch.rand(1, 1, 16, 16, 16))
    assert len(frame_stages) == len(volume_stages) == 5
    assert [tuple(s.shape[1:]) for s in frame_stages] == [(8, 17, 17), (16, 9, 9), (32, 5, 5), (64, 6, 6), (1, 7, 7)]
    assert tuple(volume_stages[-1].shape) == (1, 1, 5, 5, 5)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.25])
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.625)))


def test_generator_loss_terms_and_adaptive_weight():
    model = tiny_vq(disc_start=5, disc_weight=0.5)
    volume = smooth_phantom((8, 16, 16))
    reconstruction, codebook_loss = model(volume)
    loss, log = model.loss(codebook_loss, volume, reconstruction, 0, 4, last_layer=model.get_last_layer())
    assert torch.isclose(loss, (volume - reconstruction).abs().mean() + codebook_loss)
    assert log["train/disc_factor"] == 0 and log["train/g_loss"] == 0
    torch.manual_seed(3)
    loss, log = model.loss(codebook_loss, volume, reconstruction, 0, 5, last_layer=model.get_last_layer())
    assert torch.isfinite(loss) and log["train/d_weight"] > 0
    nll = (volume - reconstruction).abs().mean()
    torch.manual_seed(3)
    frames = model.loss.select_frames(reconstruction)[0]
    g_loss = -(0.5 * model.loss.frame_discriminator(frames)[-1].mean()
               + 0.5 * model.loss.ct_discriminator(reconstruction)[-1].mean())
    grads = [torch.autograd.grad(term, model.get_last_layer(), retain_graph=True)[0] for term in (nll, g_loss)]
    d_weight = 0.5 * grads[0].norm() / (grads[1].norm() + 1e-4)
    assert torch.isclose(log["train/d_weight"], d_weight, rtol=1e-4)
    assert torch.isclose(loss, nll + codebook_loss + d_weight * g_loss, rtol=1e-4)


def test_tiny_vq_overfits_one_volume():
    model = tiny_vq(learning_rate=1e-3)
    volume = smooth_phantom((8, 16, 16))
    optimizer_ae, _ = model.configure_optimizers()
    with torch.no_grad():
        initial = (model(volume)[0] - volume).abs().mean()
    for step in range(100):
        reconstruction, codebook_loss = model(volume)
        loss, _ = model.loss(codebook_loss, volume, reconstruction, 0, step, last_layer=model.get_last_layer())
        optimizer_ae.zero_grad()
        loss.backward()
        optimizer_ae.step()
    with torch.no_grad():
        final = (model(volume)[0] - volume).abs().mean()
    assert final < initial / 5, (initial, final)


class RepeatedVolume(Dataset):
    def __init__(self, volume, length):
        self.volume, self.length = volume, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {"image": self.volume}


def test_lightning_manual_optimisation_runs_both_steps_after_disc_start(tmp_path):
    model = tiny_vq(disc_start=1)
    before = copy.deepcopy(model.loss.ct_discriminator.state_dict())
    loader = DataLoader(RepeatedVolume(smooth_phantom((8, 16, 16))[0], 3), batch_size=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, loader, loader)
    assert model.generator_steps == 3
    assert trainer.global_step == 5  # 3 autoencoder steps + 2 discriminator steps (from step 1 on)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/disc_loss"]) and torch.isfinite(metrics["val/rec_loss"])
    after = model.loss.ct_discriminator.state_dict()
    assert not torch.equal(before["model0.0.weight"], after["model0.0.weight"])
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    restored = tiny_vq()
    restored.on_load_checkpoint(checkpoint)
    assert restored.generator_steps == 3


def fit_three_batches(model, tmp_path):
    loader = DataLoader(RepeatedVolume(smooth_phantom((8, 16, 16))[0], 3), batch_size=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    return trainer


@pytest.mark.parametrize("counts, disc_steps", [("autoencoder_steps", 0), ("optimizer_steps", 2)])
def test_disc_start_counts_autoencoder_steps_or_the_originals_optimizer_steps(tmp_path, counts, disc_steps):
    # disc_start 3: counted in autoencoder steps the GAN is still off after 3 batches; counted as the original's
    # Lightning 1.7 global_step (both optimisers, 2 per batch) the discriminator steps at batches 1 and 2.
    model = tiny_vq(disc_start=3, disc_start_counts=counts)
    trainer = fit_three_batches(model, tmp_path)
    assert model.generator_steps == 3
    assert trainer.global_step == 3 + disc_steps
    assert [model.loss_step(0), model.loss_step(1)] == ([3, 3] if counts == "autoencoder_steps" else [6, 7])
    with pytest.raises(ConfigError, match="disc_start_counts"):
        tiny_vq(disc_start_counts="batches")
