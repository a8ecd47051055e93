"""DDPM base and LMNet (MaskDiffusion): schedule, EMA, checkpoints, conditioning, overfitting, release names."""

import pytest
import torch
from conftest import VOCABULARY_ENCODER, load_manifest, tiny_unet_config

from ldm.errors import MissingWeightsError
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.models.diffusion.mask import MaskDiffusion
from ldm.models.diffusion.masks import filled_bbox
from ldm.models.diffusion.samplers import SamplerSettings
from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config


def tiny_lmnet(**overrides) -> MaskDiffusion:
    params = dict(unet_config=tiny_unet_config(4, 1), cond_stage_config=VOCABULARY_ENCODER, timesteps=1000,
                  linear_start=0.0015, linear_end=0.0195, image_size=[8, 16, 16], learning_rate=1e-3)
    params.update(overrides)
    return MaskDiffusion(**params)


def lesion_batch(batch_size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    label = torch.zeros(batch_size, 1, 8, 16, 16, dtype=torch.long)
    label[0, :, 2:6, 4:10, 5:12] = 1
    label[-1, :, 3:7, 6:12, 2:8] = 1
    organ = torch.zeros_like(label)
    organ[:, :, 1:8, 2:14, 1:15] = 1
    return {
        "label": label,
        "seg": organ.float() * 5 / 104 + torch.rand(label.shape, generator=generator) * 0.01,
        "target": organ,
        "text": [{"location": "liver", "shape": "round-like,"}, {"location": "spleen", "shape": "irregular,"}][:batch_size],
    }


def randomise_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised layers random weights so every path of the network matters."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(123)
        for parameter in model.parameters():
            if parameter.abs().max() == 0 and parameter.ndim > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_schedule_buffers_match_the_release_schedule():
    model = tiny_lmnet()
    persistent = [name for name in model.state_dict() if "." not in name]
    assert persistent == list(SCHEDULE_BUFFERS)
    betas = model.betas.double()
    assert float(betas[0]) == pytest.approx(0.0015) and float(betas[-1]) == pytest.approx(0.0195)
    assert float(model.alphas_cumprod[-1]) == pytest.approx(1.423e-4, rel=1e-3)
    torch.testing.assert_close(model.alphas_cumprod, torch.cumprod(1 - model.betas.double(), 0).float())
    coef1 = model.betas * model.alphas_cumprod_prev.sqrt() / (1 - model.alphas_cumprod)
    torch.testing.assert_close(model.posterior_mean_coef1, coef1)


def test_q_sample_formula():
    model = tiny_lmnet()
    x0, noise, t = torch.ones(2, 1, 2, 2, 2), torch.full((2, 1, 2, 2, 2), 0.5), torch.tensor([0, 999])
    expected = model.sqrt_alphas_cumprod[t] + 0.5 * model.sqrt_one_minus_alphas_cumprod[t]
    torch.testing.assert_close(model.q_sample(x0, t, noise), expected.view(-1, 1, 1, 1, 1).expand_as(x0))


def test_filled_bbox_is_inclusive_and_per_sample():
    mask = torch.zeros(2, 1, 5, 6, 7)
    mask[0, 0, 1, 2, 3] = 1
    mask[0, 0, 3, 4, 5] = 1
    boxes = filled_bbox(mask)
    assert boxes[0].sum() == 3 * 3 * 3 and boxes[0, 0, 1:4, 2:5, 3:6].min() == 1
    assert boxes[1].sum() == 0


def test_lmnet_overfits_one_batch_at_fixed_noise():
    torch.manual_seed(0)
    model = tiny_lmnet(learning_rate=2e-3, use_ema=False)
    batch = lesion_batch()
    optimizer = model.configure_optimizers()
    inputs = model.get_input(batch)

    def fixed_loss():
        return model.loss_at_random_t(inputs, torch.Generator().manual_seed(11))[0]

    first = float(fixed_loss().detach())
    for _ in range(40):
        loss = fixed_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(fixed_loss().detach()) < first / 10


def test_fg_loss_weight_weights_the_box():
    model = tiny_lmnet(fg_loss_weight=1.0)
    heavy = tiny_lmnet(fg_loss_weight=1000.0)
    heavy.load_state_dict(model.state_dict())
    inputs = model.get_input(lesion_batch())
    t, noise = torch.tensor([10, 500]), torch.randn(inputs["x_start"].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = model.predict_noise(model.q_sample(inputs["x_start"], t, noise), t, inputs["cond"], inputs["context"])
        error = (noise - predicted).square()
        expected = (error * (1 + 999 * inputs["bbox"])).flatten(1).mean(1).mean()
        torch.testing.assert_close(heavy.p_losses(inputs, t, noise)[0], expected)


def test_context_changes_the_sample_and_guidance_scales():
    model = tiny_lmnet(use_ema=False)
    randomise_zero_init(model.model)
    model.eval()
    inputs = model.get_input(lesion_batch(1))
    other = model.encode_context([{"location": "kidney left", "shape": "cystic"}])
    draw = lambda context, scale=1.0: model.sample(inputs["cond"], context, SamplerSettings(steps=4),
                                                   generator=torch.Generator().manual_seed(0), guidance_scale=scale)
    base = draw(inputs["context"])
    assert base.shape == (1, 1, 8, 16, 16)
    assert torch.equal(base, draw(inputs["context"]))
    assert not torch.allclose(base, draw(other))
    torch.testing.assert_close(draw(inputs["context"], 0.0), draw(torch.zeros_like(inputs["context"])))


def test_cond_drop_zeroes_contexts_only_in_training():
    model = tiny_lmnet(cond_drop_prob=0.999999)
    batch = lesion_batch()
    model.train()
    assert model.encode_context(batch["text"]).abs().sum() == 0
    model.eval()
    assert model.encode_context(batch["text"]).abs().sum() > 0


def test_ema_names_warmup_scope_and_frozen_cond_stage():
    model = tiny_lmnet()
    assert "model_ema.input_blocks00weight" in model.state_dict()
    assert model.model_ema.num_updates.dtype == torch.int32
    before = model.model.input_blocks[0][0].weight.detach().clone()
    with torch.no_grad():
        model.model.input_blocks[0][0].weight.add_(1.0)
    model.model_ema(model.model)  # first update: decay min(0.9999, 2/11)
    shadow = model.model_ema.input_blocks00weight
    torch.testing.assert_close(shadow, before * (2 / 11) + (before + 1) * (9 / 11))
    trained = model.model.input_blocks[0][0].weight.detach().clone()
    with model.ema_scope():
        torch.testing.assert_close(model.model.input_blocks[0][0].weight, shadow)
    assert torch.equal(model.model.input_blocks[0][0].weight, trained)
    model.train()
    assert model.model.training and not model.cond_stage_model.training
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())


def test_checkpoint_round_trip_is_strict(tmp_path):
    model = tiny_lmnet()
    randomise_zero_init(model)
    path = tmp_path / "lmnet.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    restored = tiny_lmnet(ckpt_path=str(path))
    for key, value in model.state_dict().items():
        other = restored.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    state = model.state_dict()
    state["model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(MissingWeightsError, match="unexpected: model.extra.weight"):
        tiny_lmnet(ckpt_path=str(path))
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("cond_stage_model.")}
    torch.save({"state_dict": partial}, path)
    with pytest.raises(MissingWeightsError, match="missing: cond_stage_model"):
        tiny_lmnet(ckpt_path=str(path))
    tiny_lmnet(ckpt_path=str(path), ignore_keys=["cond_stage_model."])
    with pytest.raises(MissingWeightsError, match="checkpoint not found"):
        tiny_lmnet(ckpt_path=str(tmp_path / "absent.ckpt"))


def test_release_lmnet_matches_the_released_checkpoint_keys():
    manifest = load_manifest("lmnet_full_train.json")
    config = load_config([PIPELINE_DIR / "configs/diffusion/maskdiffusion.yaml"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model, key_path="model")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert list(ours) == list(manifest)
    assert ours == manifest
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2_527_489


def test_released_lmnet_checkpoint_loads_strictly(tmp_path):
    """A synthetic checkpoint with exactly the manifest's keys and shapes loads with strict=True."""
    manifest = load_manifest("lmnet_full_train.json")
    config = load_config([PIPELINE_DIR / "configs/diffusion/maskdiffusion.yaml"])
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in manifest.items():
        dtype = torch.int32 if key.endswith("num_updates") else torch.float32
        state[key] = torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point else torch.tensor(5, dtype=dtype)
    path = tmp_path / "LMNet.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    config.model.params.ckpt_path = str(path)
    model = instantiate_from_config(config.model)
    assert torch.equal(model.state_dict()["model.out.2.weight"], state["model.out.2.weight"])
    assert torch.equal(model.cond_stage_model.model.proj[0].weight, state["cond_stage_model.model.proj.0.weight"])


@pytest.mark.parametrize(("config_name", "manifest_name"), [
    ("maskdiffusion_test.yaml", "lmnet_full_test.json"),
    ("lesiondiffusion_test.yaml", "linet_full_test.json"),
])
def test_release_test_configs_match_the_test_time_modules(config_name, manifest_name):
    """The inference configs build the released modules; only the original's test-only LPIPS metric
    (``perceptual.*``, never in a training checkpoint) is left out."""
    manifest = {k: v for k, v in load_manifest(manifest_name).items() if not k.startswith("perceptual.")}
    config = load_config([PIPELINE_DIR / "configs/diffusion" / config_name], ["model.params.ckpt_path=null"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model, key_path="model")
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == manifest
