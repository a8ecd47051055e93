"""VQ-GAN model: checkpoint-compatible names, shapes, odd sizes, chunked quantisation, tiled encode/decode."""
import json
from pathlib import Path

import pytest
import torch

from ldm.errors import ConfigError, MissingWeightsError
from ldm.models.autoencoder import VQModelInterface, crop_to_shape, pad_to_multiple
from ldm.modules.diffusionmodules.model import Decoder, Encoder, split_ddconfig
from ldm.modules.quantize import VectorQuantizer
from ldm.util import count_params, load_config

COMPAT = Path(__file__).resolve().parents[2] / "shared" / "compat"
PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
RELEASE_CONFIG = PIPELINE / "configs" / "autoencoder" / "lesiondiffusion_vq.yaml"
IDENTITY_LOSS = {"target": "torch.nn.Identity"}


def manifest(name):
    path = COMPAT / name
    if not path.exists():
        pytest.skip(f"compat manifest {path} not present")
    return json.loads(path.read_text())


def release_ddconfig():
    return dict(load_config([RELEASE_CONFIG]).model.params.ddconfig)


def tiny_ddconfig(dims=3, num_res_blocks=0, resolution=32):
    return dict(dims=dims, double_z=False, z_channels=4, resolution=resolution, in_channels=1, out_ch=1, ch=16,
                ch_mult=[1, 1], num_res_blocks=num_res_blocks, attn_resolutions=[], attn_type="none", dropout=0.0,
                sample_depth=[0])


def tiny_interface(dims=3, seed=0):
    torch.manual_seed(seed)
    return VQModelInterface(ddconfig=tiny_ddconfig(dims), lossconfig=IDENTITY_LOSS, n_embed=64, embed_dim=4).eval()


def body_phantom(shape, seed=0):
    """Air (0) around an ellipsoidal body (0.5) with a brighter blob (0.9) and mild noise, in [0, 1]."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size) for size in shape], indexing="ij")
    radius = sum((axis / 0.85) ** 2 for axis in axes)
    blob = sum((axis - 0.25) ** 2 for axis in axes)
    noise = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return ((radius < 1).float() * 0.5 + (blob < 0.12).float() * 0.4 + noise).clamp(0, 1)[None, None]


def test_release_vq_matches_manifest_and_parameter_count():
    with torch.device("meta"):
        model = VQModelInterface(ddconfig=release_ddconfig(), lossconfig=IDENTITY_LOSS, n_embed=2048, embed_dim=4)
    state = model.state_dict()
    expected = manifest("vq.json")
    assert list(state) == list(expected)
    assert {key: list(value.shape) for key, value in state.items()} == expected
    assert count_params(model) == 7_009_709
    assert count_params(model.encoder) == 2_753_380 and count_params(model.decoder) == 4_248_097


def test_release_vq_downsamples_by_two_on_meta():
    with torch.device("meta"):
        model = VQModelInterface(ddconfig=release_ddconfig(), lossconfig=IDENTITY_LOSS, n_embed=2048, embed_dim=4)
        latent = model.encode(torch.empty(1, 1, 128, 128, 128))
        assert tuple(latent.shape) == (1, 4, 64, 64, 64)
        assert tuple(model.decode(latent, force_not_quantize=True).shape) == (1, 1, 128, 128, 128)
    assert model.downsample_factor == 2
    assert hasattr(model.encoder.down[0], "downsample") and not hasattr(model.encoder.down[1], "downsample")
    assert hasattr(model.decoder.up[1], "upsample") and not hasattr(model.decoder.up[0], "upsample")


def test_synthetic_release_checkpoint_loads_strictly(tmp_path):
    expected = manifest("vq.json")
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in expected.items()}
    path = tmp_path / "VQ.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = VQModelInterface(ddconfig=release_ddconfig(), lossconfig=IDENTITY_LOSS, n_embed=2048, embed_dim=4)
    model.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=True)
    reloaded = VQModelInterface(ddconfig=release_ddconfig(), lossconfig=IDENTITY_LOSS, n_embed=2048, embed_dim=4,
                                ckpt_path=str(path), ignore_keys=["quantize."])
    assert torch.equal(reloaded.decoder.conv_out.weight, state["decoder.conv_out.weight"])
    assert not torch.equal(reloaded.quantize.embedding.weight, state["quantize.embedding.weight"])
    missing, unexpected = reloaded.init_from_ckpt(str(path))
    assert missing == [] and unexpected == []
    assert torch.equal(reloaded.quantize.embedding.weight, state["quantize.embedding.weight"])


def test_missing_checkpoint_and_bad_ddconfig_raise_clear_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="nothing.ckpt"):
        VQModelInterface(ddconfig=tiny_ddconfig(), lossconfig=IDENTITY_LOSS, n_embed=8, embed_dim=4,
                         ckpt_path=str(tmp_path / "nothing.ckpt"))
    with pytest.raises(ConfigError, match="chanel_mult"):
        split_ddconfig({**tiny_ddconfig(), "chanel_mult": [1]})
    with pytest.raises(ConfigError, match="sample_depth"):
        Encoder(**split_ddconfig({**tiny_ddconfig(), "sample_depth": [1]})[0])


def test_odd_sizes_pad_with_air_and_crop_back():
    model = tiny_interface()
    volume = body_phantom((17, 20, 23))
    with torch.no_grad():
        latent = model.encode(volume)
        assert tuple(latent.shape) == (1, 4, 9, 10, 12)
        assert tuple(model.decode(latent).shape) == (1, 1, 18, 20, 24)
        assert tuple(model.decode(latent, output_shape=(17, 20, 23)).shape) == (1, 1, 17, 20, 23)
        reconstruction, codebook_loss = model(volume)
    assert reconstruction.shape == volume.shape and codebook_loss.dim() == 0
    padded = pad_to_multiple(volume, 2)
    assert tuple(padded.shape[2:]) == (18, 20, 24)
    assert torch.equal(padded[..., :17, :, :23], volume)
    assert padded[..., 17, :, :].abs().max() == 0 and padded[..., 23].abs().max() == 0
    assert torch.equal(crop_to_shape(padded, (17, 20, 23)), volume)
    with pytest.raises(ValueError):
        crop_to_shape(volume, (18, 20, 23))


def test_two_dimensional_model_and_gradient_checkpointing_agree():
    config = {**tiny_ddconfig(dims=2, num_res_blocks=1), "use_checkpoint": True}
    torch.manual_seed(0)
    checkpointed = Decoder(**split_ddconfig(config)[1])
    plain = Decoder(**split_ddconfig({**config, "use_checkpoint": False})[1])
    plain.load_state_dict(checkpointed.state_dict())
    latent = torch.randn(2, 4, 6, 5)
    outputs = [decoder(latent) for decoder in (checkpointed, plain)]
    assert tuple(outputs[0].shape) == (2, 1, 12, 10)
    for output in outputs:
        output.square().mean().backward()
    assert torch.allclose(outputs[0], outputs[1])
    assert torch.allclose(checkpointed.conv_in.weight.grad, plain.conv_in.weight.grad, atol=1e-6)


def test_quantizer_chunked_equals_unchunked_and_reference():
    torch.manual_seed(0)
    chunked = VectorQuantizer(256, 4, chunk_size=7)
    whole = VectorQuantizer(256, 4, chunk_size=None)
    whole.load_state_dict(chunked.state_dict())
    codebook = chunked.embedding.weight
    assert codebook.abs().max() <= 1 / 256
    z = (torch.randn(2, 4, 5, 6, 7) * 0.004).requires_grad_()
    z_q, loss, info = chunked(z)
    z_q_whole, loss_whole, info_whole = whole(z)
    assert torch.equal(info.indices, info_whole.indices) and torch.equal(z_q, z_q_whole)
    assert torch.equal(loss, loss_whole) and torch.equal(info.perplexity, info_whole.perplexity)
    vectors = z.detach().movedim(1, -1).reshape(-1, 4)
    reference = torch.cdist(vectors.double(), codebook.detach().double()).argmin(dim=1)
    assert torch.equal(info.indices.reshape(-1), reference)
    assert tuple(info.indices.shape) == (2, 5, 6, 7)
    nearest = codebook[reference].reshape(2, 5, 6, 7, 4).movedim(-1, 1)
    assert torch.allclose(z_q, nearest)
    assert torch.allclose(loss, 1.25 * torch.mean((nearest - z.detach()) ** 2))
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert torch.equal(chunked.get_codebook_entry(info.indices), nearest)


def report_difference(whole, tiled, margin):
    difference = (whole - tiled).abs()
    interior = difference[(Ellipsis, *[slice(margin, -margin)] * (difference.dim() - 2))]
    return difference.max().item(), interior.max().item()


def test_tiled_decode_and_encode_match_whole_volume_in_2d():
    # 2D runs the same dimension-generic tiling code at a fraction of the 3D cost, with tiles cut on every axis.
    # Overlaps satisfy 3/8 · overlap >= receptive radius (measured: decoder 9 latent px, encoder 12 px), so with
    # whole-image GroupNorm statistics the tiled result equals the whole-image one up to float rounding
    # (measured <= 1e-5, also in 3D: bench/vq_tiling.py); the tolerance is 1e-4, far below any tiling artefact.
    model = tiny_interface(dims=2)
    image = body_phantom((90, 77))
    with torch.no_grad():
        latent = model.encode(image)
        tiled_latent = model.encode_tiled(image, tile=48, overlap=36)
        decoded = model.decode(latent, output_shape=(90, 77))
        tiled = model.decode_tiled(latent, tile=40, overlap=24, output_shape=(90, 77))
        per_tile = model.decode_tiled(latent, tile=40, overlap=24, output_shape=(90, 77), global_norm=False)
    assert tuple(tiled_latent.shape) == (1, 4, 45, 39) and tuple(tiled.shape) == (1, 1, 90, 77)
    assert max(report_difference(latent, tiled_latent, 4)) < 1e-4
    assert max(report_difference(decoded, tiled, 8)) < 1e-4
    # Without whole-volume GroupNorm statistics each tile normalises itself: visibly different.
    assert report_difference(decoded, per_tile, 8)[1] > 1e-2


def test_tiled_3d_matches_whole_volume_along_a_cut_axis():
    # Tiles cut the first axis only (keeps the CPU cost small). Radii of this model: decoder 9 latent voxels
    # (3/8 · 24 = 9), encoder 12 image voxels (3/8 · 32 = 12).
    model = tiny_interface()
    volume = body_phantom((64, 14, 12))
    with torch.no_grad():
        latent = model.encode(volume)
        decoded = model.decode(latent)
        tiled = model.decode_tiled(latent, tile=(28, 8, 8), overlap=(24, 0, 0))
        tiled_latent = model.encode_tiled(volume, tile=(48, 14, 12), overlap=(32, 0, 0))
    assert max(report_difference(decoded, tiled, 2)) < 1e-4
    assert max(report_difference(latent, tiled_latent, 2)) < 1e-4


def test_tiled_3d_handles_odd_sizes_and_volumes_smaller_than_a_tile():
    model = tiny_interface()
    volume = body_phantom((13, 11, 9))
    with torch.no_grad():
        whole = model.encode(volume)
        single_tile = model.encode_tiled(volume, tile=32, overlap=8)
        assert torch.allclose(single_tile, whole, atol=1e-5)
        tiled = model.encode_tiled(volume, tile=8, overlap=4)
        assert tuple(tiled.shape) == (1, 4, 7, 6, 5) and torch.isfinite(tiled).all()
        decoded = model.decode_tiled(whole, tile=4, overlap=2, output_shape=(13, 11, 9))
        assert tuple(decoded.shape) == (1, 1, 13, 11, 9) and torch.isfinite(decoded).all()
        assert torch.allclose(model.decode_tiled(whole, tile=16, overlap=4), model.decode(whole), atol=1e-5)
    with pytest.raises(ConfigError, match="multiples of 2"):
        model.encode_tiled(volume, tile=7, overlap=2)
    with pytest.raises(ConfigError, match="overlap"):
        model.decode_tiled(whole, tile=4, overlap=4)
