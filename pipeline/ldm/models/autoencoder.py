"""VQ-GAN first stage: ``VQModel`` (trainable LightningModule) and ``VQModelInterface`` (LINet's frozen first stage).

Attribute names (``encoder``, ``decoder``, ``loss``, ``quantize``, ``quant_conv``, ``post_quant_conv``) and their
order match the original, so ``VQ.ckpt['state_dict']`` loads with ``strict=True``.

Sizes: the encoder halves each spatial axis once per resampling level (factor ``f = 2`` for the release
model). The original floors odd sizes and so loses the last voxel. Here ``encode`` first pads each spatial
axis at its end with air (``pad_value``, 0.0 in the [0, 1] intensity space) up to a multiple of ``f``, so the
latent has ``ceil(n / f)`` voxels; ``decode(..., output_shape=input_shape)`` crops back to the input shape.
For even sizes nothing changes.

Training uses manual optimisation (Lightning 2 has no ``optimizer_idx``): every ``training_step`` makes one
autoencoder step, then (from ``disc_start`` on) one discriminator step. ``disc_start`` counts autoencoder
steps (``generator_steps``, saved in the checkpoint), not Lightning's ``global_step``, which under manual
optimisation counts the steps of both optimisers. The original (Lightning 1.7, automatic optimisation) compared
``disc_start`` with ``global_step``, which counted both optimisers' steps from the first batch on, so its GAN
terms started after half as many batches; ``disc_start_counts: optimizer_steps`` reproduces that count.
"""
from __future__ import annotations

import inspect
import logging
import os
from fractions import Fraction
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError, DataError, MissingWeightsError
from ldm.models.checkpoint import load_checkpoint
from ldm.models.streaming import stream_decoder, stream_encoder, supports_streaming
from ldm.models.tiling import layout_tiles, per_axis, sliding_window
from ldm.modules.diffusionmodules.model import Decoder, Encoder, conv_nd, split_ddconfig
from ldm.modules.diffusionmodules.util import set_fast_conv
from ldm.modules.quantize import DEFAULT_CHUNK_SIZE, QuantizerInfo, VectorQuantizer
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

COMMITMENT_BETA = 0.25
ADAM_BETAS = (0.5, 0.9)
STEPS_KEY = "vq_generator_steps"
DISC_START_COUNTS = ("autoencoder_steps", "optimizer_steps")


def pad_to_multiple(volume: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """``volume`` ``(B, C, *S)`` padded with ``value`` at the end of each spatial axis to a multiple of ``multiple``."""
    padding: list[int] = []
    for size in reversed(volume.shape[2:]):
        padding += [0, (-size) % multiple]
    return F.pad(volume, padding, mode="constant", value=value) if any(padding) else volume


def crop_to_shape(volume: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """The leading ``spatial_shape`` corner of ``volume`` ``(B, C, *S)``; every target size must be ≤ ``S``."""
    spatial_shape = tuple(int(size) for size in spatial_shape)
    if len(spatial_shape) != volume.dim() - 2 or any(t > s for t, s in zip(spatial_shape, volume.shape[2:])):
        raise ValueError(f"cannot crop a volume of shape {tuple(volume.shape)} to spatial shape {spatial_shape}")
    return volume[(Ellipsis, *(slice(0, size) for size in spatial_shape))]


def build_loss(lossconfig: Mapping[str, Any], n_embed: int, dims: int) -> nn.Module:
    """The training loss from ``lossconfig``; like the original, ``n_classes``/``dims`` follow the model."""
    target = lossconfig.get("target") if isinstance(lossconfig, Mapping) else None
    if target is None:
        return instantiate_from_config(lossconfig, key_path="model.params.lossconfig")
    accepted = inspect.signature(get_obj_from_str(target, key_path="model.params.lossconfig.target")).parameters
    params = dict(lossconfig.get("params") or {})
    params.update({key: value for key, value in (("n_classes", n_embed), ("dims", dims)) if key in accepted})
    return instantiate_from_config({"target": target, "params": params}, key_path="model.params.lossconfig")


class VQModel(pl.LightningModule):
    """VQ-GAN autoencoder: ``forward(x)`` returns ``(reconstruction, codebook_loss)`` for images in [0, 1].

    ``fast_conv``: float32 CPU convolutions always through oneDNN (``SwitchableConv``; same parameters, results
    equal within float32 rounding; no effect on GPUs).
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], n_embed: int, embed_dim: int,
                 ckpt_path: str | os.PathLike | None = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "image", monitor: str | None = None, lr_g_factor: float = 1.0,
                 learning_rate: float = 1e-4, quantize_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                 pad_value: float = 0.0, fast_conv: bool = False, disc_start_counts: str = "autoencoder_steps"):
        super().__init__()
        if disc_start_counts not in DISC_START_COUNTS:
            raise ConfigError(f"model.params.disc_start_counts: {disc_start_counts!r} is not one of "
                              f"{', '.join(DISC_START_COUNTS)}")
        self.disc_start_counts = disc_start_counts
        self.automatic_optimization = False
        self.image_key, self.monitor = image_key, monitor
        self.n_embed, self.embed_dim = int(n_embed), int(embed_dim)
        self.learning_rate, self.lr_g_factor = float(learning_rate), float(lr_g_factor)
        self.pad_value = float(pad_value)
        encoder_kwargs, decoder_kwargs = split_ddconfig(dict(ddconfig))
        self.dims = int(ddconfig.get("dims", 3))
        self.encoder = Encoder(**encoder_kwargs)
        self.decoder = Decoder(**decoder_kwargs)
        self.loss = build_loss(lossconfig, self.n_embed, self.dims)
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, beta=COMMITMENT_BETA,
                                        chunk_size=quantize_chunk_size)
        z_channels = int(ddconfig["z_channels"]) * (2 if ddconfig.get("double_z", True) else 1)
        self.quant_conv = conv_nd(self.dims, z_channels, self.embed_dim, kernel_size=1)
        self.post_quant_conv = conv_nd(self.dims, self.embed_dim, int(ddconfig["z_channels"]), kernel_size=1)
        self.downsample_factor = 2 ** len(self.encoder.resampling_levels)
        self.generator_steps = 0
        set_fast_conv(self, fast_conv)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str | os.PathLike, ignore_keys: Sequence[str] = ()) -> tuple[list, list]:
        """Load a Lightning checkpoint (its ``state_dict``) or a bare state dict strictly, except keys starting
        with an ``ignore_keys`` prefix (e.g. ``loss.`` to load a full VQ checkpoint into LINet's first stage).
        Returns ``(missing, unexpected)`` ignored keys; anything else that does not fit raises."""
        if not os.path.isfile(path):
            raise MissingWeightsError(f"{path}: VQ checkpoint not found (train one with configs/autoencoder/"
                                      "lesiondiffusion_vq.yaml or place the released VQ.ckpt there)")
        return load_checkpoint(self, path, ignore_keys=ignore_keys)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent ``quant_conv(encoder(x))``, ``(B, embed_dim, *ceil(S / f))`` (``x`` padded)."""
        return self.quant_conv(self.encoder(pad_to_multiple(x, self.downsample_factor, self.pad_value)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerInfo]:
        """Quantised latent of ``x``: ``(z_q, codebook_loss, QuantizerInfo(perplexity, indices))``."""
        return self.quantize(self.encode_to_prequant(x))

    def decode_quantized(self, quant: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Image ``(B, out_ch, *L·f)`` from a quantised latent, cropped to ``output_shape`` when given."""
        decoded = self.decoder(self.post_quant_conv(quant))
        return decoded if output_shape is None else crop_to_shape(decoded, output_shape)

    def decode(self, quant: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Image from a quantised latent (see ``decode_quantized``)."""
        return self.decode_quantized(quant, output_shape)

    def decode_code(self, indices: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Image from code indices ``(B, *L)``."""
        return self.decode_quantized(self.quantize.get_codebook_entry(indices), output_shape)

    def forward(self, x: torch.Tensor, return_pred_indices: bool = False):
        """``(reconstruction, codebook_loss)`` (+ code indices), the reconstruction with ``x``'s shape."""
        quant, codebook_loss, info = self.quantize(self.encode_to_prequant(x))
        reconstruction = self.decode_quantized(quant, output_shape=x.shape[2:])
        return (reconstruction, codebook_loss, info.indices) if return_pred_indices else (reconstruction,
                                                                                            codebook_loss)

    def get_input(self, batch: Mapping[str, Any], key: str) -> torch.Tensor:
        """``batch[key]`` as a float tensor ``(B, C, *S)`` (a channel axis is added to ``(B, *S)``)."""
        if key not in batch:
            raise DataError(f"batch has no {key!r} entry (image_key); keys: {sorted(batch)}")
        x = batch[key]
        if x.dim() == self.dims + 1:
            x = x.unsqueeze(1)
        return x.to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last conv (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight

    def loss_step(self, optimizer_idx: int) -> int:
        """The step the loss compares with ``disc_start`` for optimiser ``optimizer_idx`` (0 autoencoder, 1
        discriminator): the autoencoder steps so far, or with ``disc_start_counts: optimizer_steps`` the count of
        the original's ``global_step``, where both optimisers stepped every batch: ``2 · batches + optimizer_idx``."""
        if self.disc_start_counts == "optimizer_steps":
            return 2 * self.generator_steps + optimizer_idx
        return self.generator_steps

    def _loss_step(self, x, reconstruction, codebook_loss, indices, optimizer_idx, split):
        return self.loss(codebook_loss, x, reconstruction, optimizer_idx, self.loss_step(optimizer_idx),
                         last_layer=self.get_last_layer(), split=split, predicted_indices=indices)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """One autoencoder step, then one discriminator step once the discriminator is active."""
        optimizer_ae, optimizer_disc = self.optimizers()
        x = self.get_input(batch, self.image_key)
        reconstruction, codebook_loss, indices = self(x, return_pred_indices=True)
        ae_loss, log = self._loss_step(x, reconstruction, codebook_loss, indices, 0, "train")
        optimizer_ae.zero_grad(set_to_none=True)
        self.manual_backward(ae_loss)
        optimizer_ae.step()
        if self.loss.discriminator_active(self.loss_step(1)):
            disc_loss, log_disc = self._loss_step(x, reconstruction.detach(), codebook_loss, indices, 1, "train")
            optimizer_disc.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            optimizer_disc.step()
            log.update(log_disc)
        self.generator_steps += 1
        self.log("train/rec_loss", log.pop("train/rec_loss"), prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=True)
        return ae_loss.detach()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Reconstruction and discriminator losses on a validation batch; logs ``val/rec_loss`` for checkpointing."""
        x = self.get_input(batch, self.image_key)
        reconstruction, codebook_loss, indices = self(x, return_pred_indices=True)
        _, log = self._loss_step(x, reconstruction, codebook_loss, indices, 0, "val")
        _, log_disc = self._loss_step(x, reconstruction, codebook_loss, indices, 1, "val")
        log.update(log_disc)
        self.log("val/rec_loss", log.pop("val/rec_loss"), prog_bar=True, on_epoch=True, sync_dist=True)
        self.log_dict(log, on_epoch=True, sync_dist=True)
        return log

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder, codebook and the two 1×1 convs (what the autoencoder optimiser updates)."""
        modules = (self.encoder, self.decoder, self.quantize, self.quant_conv, self.post_quant_conv)
        return [parameter for module in modules for parameter in module.parameters()]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[Adam(autoencoder, lr·lr_g_factor), Adam(discriminators, lr)]``, both with betas (0.5, 0.9)."""
        if not hasattr(self.loss, "discriminator_parameters"):
            raise ConfigError("model.params.lossconfig: training a VQModel needs a loss with discriminators "
                              "(ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator), not "
                              f"{type(self.loss).__name__}")
        optimizer_ae = torch.optim.Adam(self.autoencoder_parameters(), lr=self.learning_rate * self.lr_g_factor,
                                        betas=ADAM_BETAS)
        optimizer_disc = torch.optim.Adam(list(self.loss.discriminator_parameters()), lr=self.learning_rate,
                                          betas=ADAM_BETAS)
        return [optimizer_ae, optimizer_disc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STEPS_KEY] = self.generator_steps

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        self.generator_steps = int(checkpoint.get(STEPS_KEY, 0))


class VQModelInterface(VQModel):
    """LINet's first stage: ``encode`` gives the pre-quantisation latent, ``decode`` quantises then decodes.

    Use with ``lossconfig: {target: torch.nn.Identity}``; freeze it with ``.freeze()``.

    ``encode_tiled`` / ``decode_tiled`` process volumes too large for one pass. By default (``global_norm=True``)
    they stream (``ldm.models.streaming``): every layer runs over the whole volume tile by tile, GroupNorm
    statistics are summed while each layer's output is written, and activations stay in host memory when they do
    not fit on the device. The result equals the whole-volume one up to float rounding (tested ≤ 1e-5) at about
    the untiled time; ``overlap`` is then unused (tiles need no overlap). Networks with attention layers fall back
    to overlapping tiles with whole-volume GroupNorm statistics measured in extra passes (``ldm.models.tiling``:
    exact once ``3/8 · overlap`` reaches the receptive radius, release decoder 16 latent voxels; up to
    GroupNorm layers + 1 passes). ``global_norm=False``: overlapping tiles that each normalise themselves (one
    pass, visibly inexact: up to 0.8 on a body phantom), for quick previews only.
    """

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent ``(B, embed_dim, *ceil(S / f))`` of ``x`` ``(B, C, *S)`` (padded with air)."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False,
               output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Image ``(B, out_ch, *L·f)`` from a pre-quantisation latent (quantised unless ``force_not_quantize``),
        cropped to ``output_shape`` when given."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decode_quantized(quant, output_shape)

    def _to_module(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def _storage(self, volume: torch.Tensor, widest_layer_bytes: int, storage: str | torch.device | None
                 ) -> torch.device:
        """Where streamed activations live: ``storage`` if given; else the module's device when two activations of
        the widest layer fit in half its free memory, else host memory."""
        if storage is not None:
            return torch.device(storage)
        if self.device.type != "cuda":
            return volume.device if volume.device.type == "cpu" else torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if 2 * widest_layer_bytes < free // 2 else torch.device("cpu")

    def _widest_layer_bytes(self, spatial_at_image: Sequence[int], batch: int) -> int:
        """Bytes of a float32 activation with the decoder's most channels at image resolution (an upper bound)."""
        voxels = batch
        for size in spatial_at_image:
            voxels *= int(size)
        widest = max(conv.out_channels for conv in self.decoder.modules() if isinstance(conv, (nn.Conv2d, nn.Conv3d)))
        return 4 * voxels * widest

    def encode_streamed(self, x: torch.Tensor, tile: int | Sequence[int] = 64,
                        storage: str | torch.device | None = None) -> torch.Tensor:
        """``encode`` layer by layer over tiles of ``tile`` image voxels (see the class docstring).

        ``storage``: device of the whole-volume activations (default: the module's device when they fit, else
        the CPU). Returns the float32 latent ``(B, embed_dim, *ceil(S / f))`` on ``x``'s device.
        """
        padded = pad_to_multiple(x, self.downsample_factor, self.pad_value)
        place = self._storage(padded, self._widest_layer_bytes(padded.shape[2:], padded.shape[0]), storage)
        tiles = per_axis(tile, padded.dim() - 2, "tile")
        with torch.no_grad():
            latent = stream_encoder(self.encoder, padded.to(device=place, dtype=torch.float32), tiles, self.device,
                                    place, post=self.quant_conv)
        return latent.to(x.device)

    def decode_streamed(self, h: torch.Tensor, tile: int | Sequence[int] = 32, force_not_quantize: bool = False,
                        output_shape: Sequence[int] | None = None, storage: str | torch.device | None = None
                        ) -> torch.Tensor:
        """``decode`` layer by layer over tiles of ``tile`` latent voxels (see the class docstring); ``storage`` as in
        ``encode_streamed``. Returns a float32 image ``(B, out_ch, *L·f)`` on ``h``'s device, cropped to
        ``output_shape`` when given."""
        image_spatial = [size * self.downsample_factor for size in h.shape[2:]]
        place = self._storage(h, self._widest_layer_bytes(image_spatial, h.shape[0]), storage)

        def quantise(latent: torch.Tensor) -> torch.Tensor:
            return self.post_quant_conv(latent if force_not_quantize else self.quantize(latent)[0])

        tiles = per_axis(tile, h.dim() - 2, "tile")
        with torch.no_grad():
            decoded = stream_decoder(self.decoder, h.to(device=place, dtype=torch.float32), tiles, self.device, place,
                                     pre=quantise).to(h.device)
        return decoded if output_shape is None else crop_to_shape(decoded, output_shape)

    def encode_tiled(self, x: torch.Tensor, tile: int | Sequence[int] = 192, overlap: int | Sequence[int] = 64,
                     global_norm: bool = True) -> torch.Tensor:
        """``encode`` tile by tile: ``tile``/``overlap`` in image voxels, multiples of the downsampling factor.

        Any volume size works (it is padded with air to a multiple of the factor, as in ``encode``). With
        ``global_norm`` the result is exact: streamed (``encode_streamed``, ``overlap`` unused) or, for networks
        with attention, overlapping tiles with measured whole-volume statistics; without it each tile normalises
        itself (one pass, visibly inexact). The float32 result stays on ``x``'s device, shape
        ``(B, embed_dim, *ceil(S / f))``.
        """
        padded = pad_to_multiple(x, self.downsample_factor, self.pad_value)
        dims = padded.dim() - 2
        layout_tiles(padded.shape[2:], per_axis(tile, dims, "tile"), per_axis(overlap, dims, "overlap"),
                     self.downsample_factor)
        if global_norm and supports_streaming(self.encoder):
            return self.encode_streamed(x, tile)
        return sliding_window(lambda part: self.encode(self._to_module(part)), padded, tile, overlap,
                              scale=Fraction(1, self.downsample_factor), align=self.downsample_factor,
                              sync_norms=self.encoder if global_norm else None)

    def decode_tiled(self, h: torch.Tensor, tile: int | Sequence[int] = 96, overlap: int | Sequence[int] = 48,
                     force_not_quantize: bool = False, output_shape: Sequence[int] | None = None,
                     global_norm: bool = True) -> torch.Tensor:
        """``decode`` tile by tile: ``tile``/``overlap`` in latent voxels; ``global_norm`` as in ``encode_tiled``
        (streamed through ``decode_streamed`` when the decoder allows it).

        Quantisation is per voxel, so tiling it is exact. Returns a float32 image ``(B, out_ch, *L·f)`` on
        ``h``'s device, cropped to ``output_shape`` when given.
        """
        dims = h.dim() - 2
        layout_tiles(h.shape[2:], per_axis(tile, dims, "tile"), per_axis(overlap, dims, "overlap"), 1)
        if global_norm and supports_streaming(self.decoder):
            return self.decode_streamed(h, tile, force_not_quantize, output_shape)
        decoded = sliding_window(lambda part: self.decode(self._to_module(part), force_not_quantize), h, tile,
                                 overlap, scale=self.downsample_factor,
                                 sync_norms=self.decoder if global_norm else None)
        return decoded if output_shape is None else crop_to_shape(decoded, output_shape)
