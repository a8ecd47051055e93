"""Streamed (layer-by-layer, tiled) VQ encoding/decoding equals the whole-volume forward."""
import pytest
import torch

from ldm.models.autoencoder import VQModelInterface
from ldm.models.streaming import Activation, supports_streaming
from test_vq import IDENTITY_LOSS, body_phantom, tiny_ddconfig


def interface(dims=3, ch_mult=(1, 2), num_res_blocks=1, attn_type="none", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    ddconfig = tiny_ddconfig(dims, num_res_blocks=num_res_blocks)
    ddconfig.update(ch_mult=list(ch_mult), attn_type=attn_type, dropout=dropout)
    return VQModelInterface(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, n_embed=64, embed_dim=4).eval()


@pytest.mark.parametrize("dims, shape, tile", [(3, (21, 14, 11), 4), (2, (45, 38), 7)])
def test_streamed_equals_whole_volume_with_many_tiles_and_odd_sizes(dims, shape, tile):
    # ch_mult (1, 2) changes the width (1×1 shortcut); tiles of a few voxels cut every layer several times per axis.
    model = interface(dims=dims)
    volume = body_phantom(shape)
    with torch.no_grad():
        latent = model.encode(volume)
        streamed_latent = model.encode_streamed(volume, tile=tile)
        image = model.decode(latent, output_shape=shape)
        streamed = model.decode_streamed(latent, tile=max(tile // 2, 1), output_shape=shape)
        raw = model.decode(latent, force_not_quantize=True)
        streamed_raw = model.decode_streamed(latent, tile=3, force_not_quantize=True)
    assert streamed_latent.shape == latent.shape and streamed.shape == image.shape == (1, 1, *shape)
    assert (streamed_latent - latent).abs().max() < 1e-5
    assert (streamed - image).abs().max() < 1e-5
    assert (streamed_raw - raw).abs().max() < 1e-5
    assert (raw[(Ellipsis, *(slice(0, s) for s in shape))] - image).abs().max() > 1e-3  # quantised or not differ


def test_tiled_entry_points_stream_and_match_streamed_exactly():
    model = interface()
    volume = body_phantom((12, 10, 8))
    with torch.no_grad():
        latent = model.encode(volume)
        assert torch.equal(model.encode_tiled(volume, tile=4, overlap=2), model.encode_streamed(volume, tile=4))
        assert torch.equal(model.decode_tiled(latent, tile=3, overlap=1), model.decode_streamed(latent, tile=3))
    assert torch.equal(volume, body_phantom((12, 10, 8)))  # input untouched


def test_networks_with_attention_fall_back_to_overlapping_tiles():
    model = interface(dims=2, ch_mult=(1, 1), attn_type="vanilla")
    assert not supports_streaming(model.decoder) and supports_streaming(interface(dims=2).decoder)
    image = body_phantom((24, 20))
    with torch.no_grad():
        latent = model.encode(image)
        tiled = model.decode_tiled(latent, tile=8, overlap=4)
    assert tiled.shape == (1, 1, 24, 20) and torch.isfinite(tiled).all()


def test_activation_group_statistics_match_torch_per_sample():
    values = torch.randn(2, 8, 5, 6, 7) * 3 + torch.tensor([1.0, -4.0]).view(2, 1, 1, 1, 1)
    activation = Activation.empty(values.shape, torch.device("cpu"))
    for start in range(0, 7, 3):  # written in three slabs, as tiles are
        box = (slice(None), slice(None), slice(start, start + 3))
        activation.write(box, values[(Ellipsis, *box)])
    assert torch.equal(activation.data, values)
    norm = torch.nn.GroupNorm(4, 8)
    mean, variance = activation.group_statistics(norm)
    grouped = values.reshape(2, 4, -1).double()
    assert torch.allclose(mean.view(2, 4, 2)[..., 0], grouped.mean(-1))
    assert torch.allclose(variance.view(2, 4, 2)[..., 1], grouped.var(-1, unbiased=False))


def test_streamed_batch_normalises_each_sample_with_its_own_statistics():
    model = interface(dims=2)
    images = torch.cat([body_phantom((20, 18)), 0.3 * body_phantom((20, 18), seed=1) + 0.6])
    with torch.no_grad():
        latent = model.encode(images)
        assert (model.encode_streamed(images, tile=6) - latent).abs().max() < 1e-5
        assert (model.decode_streamed(latent, tile=4) - model.decode(latent)).abs().max() < 1e-5


def test_streaming_refuses_active_dropout():
    model = interface(dropout=0.5).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.decode_streamed(torch.zeros(1, 4, 3, 3, 3), tile=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host vs GPU storage of activations needs a CUDA device")
def test_activations_in_host_memory_give_what_activations_on_the_gpu_give():
    model = interface().to("cuda")
    volume = body_phantom((21, 14, 11)).to("cuda")
    with torch.no_grad():
        latent = model.encode(volume)
        whole = model.decode(latent, output_shape=(21, 14, 11))
        on_gpu = model.decode_streamed(latent, tile=3, output_shape=(21, 14, 11), storage="cuda")
        on_host = model.decode_streamed(latent, tile=3, output_shape=(21, 14, 11), storage="cpu")
        latent_on_host = model.encode_streamed(volume, tile=4, storage="cpu")
    assert model._storage(latent, 1, None).type == "cuda", "a small volume keeps its activations on the GPU"
    assert model._storage(latent, torch.cuda.mem_get_info()[0], None).type == "cpu", "too large: host memory"
    assert (on_host.cpu() - on_gpu.cpu()).abs().max() < 1e-5 and (on_gpu.cpu() - whole.cpu()).abs().max() < 1e-5
    assert (latent_on_host.cpu() - latent.cpu()).abs().max() < 1e-5
