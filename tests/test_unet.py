"""UNetModel: checkpoint-compatible names, forward/backward, context handling, precision; diffusion utilities."""
import math

import numpy as np
import pytest
import torch

from conftest import load_manifest
from ldm.errors import ConfigError, DataError
from ldm.modules.diffusionmodules.blocks import Downsample, Upsample
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import make_beta_schedule, normalization, timestep_embedding

RELEASE_COMMON = dict(channel_mult=[1, 2, 4], num_head_channels=32, use_spatial_transformer=True, context_dim=512)
LMNET = dict(RELEASE_COMMON, image_size=[64, 152, 152], in_channels=4, out_channels=1, model_channels=16,
             num_res_blocks=1, attention_resolutions=[4])
LINET_TEST = dict(RELEASE_COMMON, image_size=64, in_channels=5, out_channels=5, model_channels=128,
                  num_res_blocks=2, attention_resolutions=[4, 8], use_fp16=True, skip_context=True)
TINY = dict(image_size=8, in_channels=3, out_channels=2, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=16, use_spatial_transformer=True, context_dim=32)


def randomise_zero_parameters(module: torch.nn.Module) -> None:
    """Give zero-initialised parameters (residual heads, norm biases) random values so they carry signal."""
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.2)


def tiny_inputs(batch=2, spatial=(4, 8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *spatial, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, 5, 32, generator=generator)
    return x, timesteps, context


@pytest.mark.parametrize("manifest, config, n_params", [
    ("lmnet_unet.json", LMNET, 2_527_489),
    ("linet_unet.json", LINET_TEST, 187_503_365),
    ("linet_unet.json", dict(LINET_TEST, attention_resolutions=[4], use_fp16=False, skip_context=False),
     187_503_365),
])
def test_release_models_match_checkpoint_manifests(manifest, config, n_params):
    expected = load_manifest(manifest)
    with torch.device("meta"):
        model = UNetModel(**config)
    actual = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert list(actual) == list(expected)
    assert actual == expected
    assert sum(parameter.numel() for parameter in model.parameters()) == n_params


def test_tiny_unet_forward_backward_and_zero_output_at_init():
    torch.manual_seed(0)
    model = UNetModel(**TINY)
    x, timesteps, context = tiny_inputs()
    out = model(x, timesteps, context)
    assert out.shape == (2, 2, 4, 8, 8) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0
    randomise_zero_parameters(model)
    out = model(x, timesteps, context)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    out.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    assert grads["input_blocks.0.0.weight"].abs().sum() > 0
    assert grads["context_linear_projection.weight"].abs().sum() > 0


@pytest.mark.parametrize("skip_context", [False, True])
def test_context_changes_output_unless_skip_context(skip_context):
    torch.manual_seed(1)
    model = UNetModel(**dict(TINY, skip_context=skip_context)).eval()
    randomise_zero_parameters(model)
    x, timesteps, context = tiny_inputs(seed=1)
    with torch.no_grad():
        first = model(x, timesteps, context)
        second = model(x, timesteps, torch.randn_like(context))
        without = model(x, timesteps)
    if skip_context:
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, without, rtol=0, atol=0)
    else:
        assert (first - second).abs().max() > 1e-3


def test_skip_context_needs_transformer_width_equal_to_context_dim():
    with pytest.raises(ConfigError, match="skip_context=True needs every transformer width"):
        UNetModel(**dict(TINY, context_dim=48, skip_context=True))


def test_state_dict_round_trips_through_torch_save(tmp_path):
    torch.manual_seed(2)
    source = UNetModel(**TINY)
    randomise_zero_parameters(source)
    path = tmp_path / "unet.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(3)
    target = UNetModel(**TINY)
    result = target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    x, timesteps, context = tiny_inputs(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(target(x, timesteps, context), source(x, timesteps, context), rtol=0, atol=0)


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(4)
    plain = UNetModel(**TINY).double()
    randomise_zero_parameters(plain)
    checkpointed = UNetModel(**dict(TINY, use_checkpoint=True)).double()
    checkpointed.load_state_dict(plain.state_dict())
    x, timesteps, context = (t.double() if t.is_floating_point() else t for t in tiny_inputs(seed=4))
    for model in (plain, checkpointed):
        model(x, timesteps, context).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_autocast_runs_in_low_precision_and_returns_the_input_dtype():
    torch.manual_seed(5)
    model = UNetModel(**TINY).eval()
    randomise_zero_parameters(model)
    x, timesteps, context = tiny_inputs(batch=1, spatial=(2, 4, 4), seed=5)
    with torch.no_grad():
        reference = model(x, timesteps, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x, timesteps, context)
        as_double = model.double()(x.double(), timesteps, context.double())
    assert mixed.dtype == torch.float32 and as_double.dtype == torch.float64
    assert not torch.equal(mixed, reference)
    assert (mixed - reference).abs().max() < 0.15 * reference.abs().max()
    assert (as_double.float() - reference).abs().max() < 1e-4 * reference.abs().max()


@pytest.mark.parametrize("variant", [
    dict(use_spatial_transformer=False, context_dim=None, num_heads=2, num_head_channels=-1, dims=2),
    dict(use_spatial_transformer=False, context_dim=None, use_new_attention_order=True, legacy=False, dims=2),
    dict(resblock_updown=True, use_scale_shift_norm=True, dropout=0.1),
    dict(num_classes=3, n_embed=7, conv_resample=False, transformer_depth=2),
])
def test_unet_variants_run_forward_and_backward(variant):
    torch.manual_seed(6)
    model = UNetModel(**dict(TINY, **variant))
    randomise_zero_parameters(model)
    spatial = (8, 8) if variant.get("dims") == 2 else (4, 8, 8)
    x, timesteps, context = tiny_inputs(spatial=spatial, seed=6)
    context = context if model.context_dim else None
    labels = torch.tensor([0, 2]) if model.num_classes else None
    out = model(x, timesteps, context, y=labels)
    channels = variant.get("n_embed", TINY["out_channels"])
    assert out.shape == (2, channels, *spatial)
    out.square().mean().backward()
    assert model.input_blocks[0][0].weight.grad.abs().sum() > 0


def test_bad_inputs_and_configs_raise_clear_errors():
    model = UNetModel(**TINY)
    x, timesteps, context = tiny_inputs()
    with pytest.raises(DataError, match="divisible by 2"):
        model(x[..., :7], timesteps, context)
    with pytest.raises(DataError, match=r"expected \(B, 3"):
        model(x[:, :2], timesteps, context)
    with pytest.raises(ConfigError, match="class labels"):
        model(x, timesteps, context, y=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="num_heads or num_head_channels"):
        UNetModel(**dict(TINY, num_head_channels=-1))
    with pytest.raises(ConfigError, match="needs context_dim"):
        UNetModel(**dict(TINY, context_dim=None))
    with pytest.raises(TypeError, match="unexpected keyword"):
        UNetModel(**dict(TINY, use_linear_in_transformer=True))


def test_resampling_acts_on_every_axis():
    x = torch.randn(1, 4, 3, 5, 6)
    assert Upsample(4, True, dims=3)(x).shape == (1, 4, 6, 10, 12)
    assert Downsample(4, True, dims=3)(x).shape == (1, 4, 2, 3, 3)
    torch.testing.assert_close(Upsample(4, False, dims=3)(x)[:, :, 1::2, 1::2, 1::2], x, rtol=0, atol=0)
    assert Downsample(4, False, dims=3)(torch.randn(1, 4, 4, 6, 8)).shape == (1, 4, 2, 3, 4)


def test_normalization_groups():
    assert normalization(64).num_groups == 32 and normalization(16).num_groups == 16
    assert normalization(64).eps == 1e-5


def test_timestep_embedding_equals_formula():
    timesteps = torch.tensor([0, 1, 17, 999])
    dim = 10
    embedding = timestep_embedding(timesteps, dim)
    assert embedding.shape == (4, 10) and embedding.dtype == torch.float32
    for row, t in enumerate(timesteps.tolist()):
        for i in range(dim // 2):
            frequency = math.exp(-math.log(10000) * i / (dim // 2))
            assert embedding[row, i].item() == pytest.approx(math.cos(t * frequency), abs=1e-4)
            assert embedding[row, dim // 2 + i].item() == pytest.approx(math.sin(t * frequency), abs=1e-4)
    odd = timestep_embedding(timesteps, 11)
    assert odd.shape == (4, 11) and torch.all(odd[:, -1] == 0)


def test_beta_schedules():
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0195)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(0.0015, rel=1e-12) and betas[-1] == pytest.approx(0.0195, rel=1e-12)
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 1000))
    assert np.cumprod(1 - betas)[-1] == pytest.approx(1.423e-4, rel=1e-3)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 5, 0.1, 0.5), [0.1, 0.2, 0.3, 0.4, 0.5])
    cosine = make_beta_schedule("cosine", 1000)
    steps = np.arange(1001) / 1000 + 8e-3
    alphas_cumprod = np.cos(steps / (1 + 8e-3) * np.pi / 2) ** 2
    np.testing.assert_allclose(np.cumprod(1 - cosine), alphas_cumprod[1:] / alphas_cumprod[0], atol=1e-3)
    assert cosine.max() <= 0.999 and cosine.min() >= 0
    with pytest.raises(ConfigError, match="beta_schedule='quadratic'"):
        make_beta_schedule("quadratic", 10)
