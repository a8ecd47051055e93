"""The ``fast_conv`` switch: oneDNN convolutions on the CPU, same parameters, outputs and gradients within fp32."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import load_manifest
from ldm.models.autoencoder import VQModelInterface
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import conv_nd, set_fast_conv
from test_unet import LMNET, TINY, randomise_zero_parameters, tiny_inputs
from test_vq import IDENTITY_LOSS, body_phantom, tiny_ddconfig


def conv_kernels(function) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        function()
    kernels = ("aten::mkldnn_convolution", "aten::slow_conv3d_forward")
    return {event.key for event in trace.key_averages() if event.key in kernels}


def test_small_cpu_convolution_goes_through_onednn_only_when_switched_on():
    conv = conv_nd(3, 16, 16, 3, padding=1)
    x = torch.randn(1, 16, 12, 12, 12)  # small enough for PyTorch's own im2col fallback
    with torch.no_grad():
        slow = conv(x)
        assert "aten::slow_conv3d_forward" in conv_kernels(lambda: conv(x))
        set_fast_conv(conv, True)
        fast = conv(x)
        assert conv_kernels(lambda: conv(x)) == {"aten::mkldnn_convolution"}
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


def test_unet_with_fast_conv_matches_outputs_gradients_and_keys():
    torch.manual_seed(0)
    reference = UNetModel(**TINY)
    randomise_zero_parameters(reference)
    fast = UNetModel(**TINY, fast_conv=True)
    fast.load_state_dict(reference.state_dict(), strict=True)
    assert list(fast.state_dict()) == list(reference.state_dict())
    x, timesteps, context = tiny_inputs(spatial=(6, 8, 10))
    outputs = []
    for model in (reference, fast):
        model.zero_grad()
        output = model(x, timesteps, context=context)
        output.square().mean().backward()
        outputs.append((output.detach(), [parameter.grad.clone() for parameter in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = outputs
    assert out_a.abs().max() > 0.1
    assert torch.allclose(out_a, out_b, atol=1e-5, rtol=1e-4)
    for grad_a, grad_b in zip(grads_a, grads_b):
        assert torch.allclose(grad_a, grad_b, atol=1e-5, rtol=1e-3)


def test_release_unet_keys_unchanged_by_fast_conv():
    with torch.device("meta"):
        model = UNetModel(**LMNET, fast_conv=True)
    expected = load_manifest("lmnet_unet.json")
    assert {key: list(tensor.shape) for key, tensor in model.state_dict().items()} == expected


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_vq_with_fast_conv_matches_round_trip(use_checkpoint):
    ddconfig = dict(tiny_ddconfig(num_res_blocks=1), use_checkpoint=use_checkpoint)
    torch.manual_seed(0)
    reference = VQModelInterface(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, n_embed=64, embed_dim=4)
    fast = VQModelInterface(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, n_embed=64, embed_dim=4, fast_conv=True)
    fast.load_state_dict(reference.state_dict(), strict=True)
    volume = body_phantom((12, 10, 14))
    results = []
    for model in (reference, fast):
        image = model.decode(model.encode(volume), force_not_quantize=True)
        image.abs().mean().backward()
        results.append((image.detach(), model.encoder.conv_in.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5, rtol=1e-3)
