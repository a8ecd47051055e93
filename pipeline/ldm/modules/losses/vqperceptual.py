"""VQ-GAN training loss: pixel L1 + LPIPS on random 2D slices + codebook loss + 2D/3D PatchGAN (hinge).

``VQLPIPSWithDiscriminator(codebook_loss, inputs, reconstructions, optimizer_idx, global_step, ...)`` returns
``(loss, log)``; ``optimizer_idx`` 0 gives the autoencoder (generator) loss, 1 the discriminator loss. Volumes
are ``(B, C, D, H, W)``; the 2D terms use ``nframes_select`` random slices along the first spatial axis (the same
slices for inputs and reconstructions). The GAN terms are switched on at ``global_step >= disc_start``.
With ``dims=2`` the inputs are images: the slices are the images themselves and there is no 3D discriminator.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.modules.losses.discriminator import D_LOSSES, NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS

ADAPTIVE_WEIGHT_MAX = 1e4


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` once ``global_step >= threshold``, else ``value``."""
    return value if global_step < threshold else weight


class VQLPIPSWithDiscriminator(nn.Module):
    """Loss of the LesionDiffusion VQ-GAN (parameters as in the original config)."""

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 1, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: int | None = None, pixel_loss: str = "l1", gan_feat_weight: float = 0.0,
                 image_gan_weight: float = 0.5, ct_gan_weight: float = 0.5, nframes_select: int = 1, dims: int = 3,
                 lpips_path: str | os.PathLike | None = None, vgg_path: str | os.PathLike | None = None):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ConfigError(f"lossconfig.params.disc_loss: {disc_loss!r} is not one of {sorted(D_LOSSES)}")
        if pixel_loss not in ("l1", "l2"):
            raise ConfigError(f"lossconfig.params.pixel_loss: {pixel_loss!r} is not 'l1' or 'l2'")
        if use_actnorm or disc_conditional:
            raise ConfigError("lossconfig.params: use_actnorm and disc_conditional are not supported by the 3D "
                              "VQ-GAN loss (the released model uses neither); set them to false")
        if dims not in (2, 3):
            raise ConfigError(f"lossconfig.params.dims: {dims} is not supported (use 2 or 3)")
        if nframes_select < 1:
            raise ConfigError(f"lossconfig.params.nframes_select: {nframes_select} must be at least 1")
        self.disc_start, self.disc_factor, self.discriminator_weight = int(disc_start), disc_factor, disc_weight
        self.codebook_weight, self.pixel_weight = codebook_weight, pixelloss_weight
        self.perceptual_weight, self.gan_feat_weight = perceptual_weight, gan_feat_weight
        self.image_gan_weight, self.ct_gan_weight = image_gan_weight, ct_gan_weight
        self.nframes_select, self.dims, self.n_classes = int(nframes_select), dims, n_classes
        self.pixel_loss = pixel_loss
        self.disc_loss = D_LOSSES[disc_loss]
        if perceptual_weight > 0:
            self.perceptual_loss = LPIPS(lpips_path=lpips_path, vgg_path=vgg_path)
        self.frame_discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, dims=2)
        self.ct_discriminator = (NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, dims=3)
                                 if dims == 3 else None)

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of both discriminators (what the discriminator optimiser updates)."""
        yield from self.frame_discriminator.parameters()
        if self.ct_discriminator is not None:
            yield from self.ct_discriminator.parameters()

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at ``global_step`` (from ``disc_start`` on, unless ``disc_factor`` is 0)."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.disc_start) > 0

    def select_frames(self, *volumes: torch.Tensor) -> list[torch.Tensor]:
        """The same random slices (first spatial axis) of each volume, as a 2D batch ``(B·n, C, H, W)``."""
        if self.dims == 2:
            return list(volumes)
        depth = volumes[0].shape[2]
        index = torch.randperm(depth, device=volumes[0].device)[:self.nframes_select]
        return [volume.index_select(2, index).movedim(2, 1).flatten(0, 1) for volume in volumes]

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """Adaptive GAN weight: disc_weight · clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4) at ``last_layer``."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(weight, 0.0, ADAPTIVE_WEIGHT_MAX).detach() * self.discriminator_weight

    def _discriminate(self, frames: torch.Tensor, volume: torch.Tensor) -> tuple[list, list | None]:
        """Stage outputs of the 2D discriminator on ``frames`` and of the 3D one on ``volume`` (None in 2D)."""
        ct = self.ct_discriminator(volume) if self.ct_discriminator is not None else None
        return self.frame_discriminator(frames), ct

    def _weighted(self, frame_term: torch.Tensor, ct_term: torch.Tensor | None) -> torch.Tensor:
        if ct_term is None:
            return frame_term
        return self.image_gan_weight * frame_term + self.ct_gan_weight * ct_term

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train",
                predicted_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if cond is not None:
            raise ConfigError("VQLPIPSWithDiscriminator: conditional discrimination is not supported (cond given)")
        frames_real, frames_fake = self.select_frames(inputs.contiguous(), reconstructions.contiguous())
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)
        if optimizer_idx == 0:
            return self._generator_loss(codebook_loss, inputs, reconstructions, frames_real, frames_fake,
                                        disc_factor, last_layer, split, predicted_indices)
        if optimizer_idx == 1:
            frame_real, ct_real = self._discriminate(frames_real.detach(), inputs.detach())
            frame_fake, ct_fake = self._discriminate(frames_fake.detach(), reconstructions.detach())
            d_loss = self._weighted(self.disc_loss(frame_real[-1], frame_fake[-1]),
                                    None if ct_real is None else self.disc_loss(ct_real[-1], ct_fake[-1]))
            log = {f"{split}/disc_loss": d_loss.detach(),
                   f"{split}/logits_real": frame_real[-1].detach().mean(),
                   f"{split}/logits_fake": frame_fake[-1].detach().mean()}
            return disc_factor * d_loss, log
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")

    def _generator_loss(self, codebook_loss, inputs, reconstructions, frames_real, frames_fake, disc_factor,
                        last_layer, split, predicted_indices):
        """Autoencoder loss ``nll + d_weight · disc_factor · g + codebook_weight · codebook`` and its log."""
        if self.pixel_loss == "l1":
            rec_loss = torch.abs(inputs - reconstructions).mean()
        else:
            rec_loss = F.mse_loss(reconstructions, inputs)
        p_loss = torch.zeros((), device=inputs.device)
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(frames_real, frames_fake).mean()
        nll_loss = self.pixel_weight * rec_loss + self.perceptual_weight * p_loss
        codebook_loss = codebook_loss.mean()
        loss = nll_loss + self.codebook_weight * codebook_loss
        g_loss = d_weight = torch.zeros((), device=inputs.device)
        if disc_factor > 0:
            frame_fake, ct_fake = self._discriminate(frames_fake, reconstructions)
            g_loss = -self._weighted(frame_fake[-1].mean(), None if ct_fake is None else ct_fake[-1].mean())
            if self.training and torch.is_grad_enabled() and last_layer is not None:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss
            if self.gan_feat_weight > 0:
                loss = loss + self.gan_feat_weight * disc_factor * self._feature_matching(
                    frames_real, inputs, frame_fake, ct_fake)
        log = {f"{split}/total_loss": loss.detach(), f"{split}/quant_loss": codebook_loss.detach(),
               f"{split}/nll_loss": nll_loss.detach(), f"{split}/rec_loss": rec_loss.detach(),
               f"{split}/p_loss": p_loss.detach(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
               f"{split}/g_loss": g_loss.detach()}
        if predicted_indices is not None and self.n_classes:
            log.update(codebook_usage(predicted_indices, self.n_classes, split))
        return loss, log

    def _feature_matching(self, frames_real, inputs, frame_fake, ct_fake) -> torch.Tensor:
        """Mean L1 distance between the discriminators' intermediate features of real and reconstructed data."""
        with torch.no_grad():
            frame_real, ct_real = self._discriminate(frames_real, inputs)
        frame_term = sum(F.l1_loss(fake, real) for fake, real in zip(frame_fake[:-1], frame_real[:-1]))
        frame_term = frame_term / (len(frame_fake) - 1)
        ct_term = None
        if ct_fake is not None:
            ct_term = sum(F.l1_loss(fake, real) for fake, real in zip(ct_fake[:-1], ct_real[:-1])) / (len(ct_fake) - 1)
        return self._weighted(frame_term, ct_term)


def codebook_usage(indices: torch.Tensor, n_classes: int, split: str) -> dict[str, torch.Tensor]:
    """Perplexity of the used codes and the number of distinct codes in ``indices`` (for logging)."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_classes).float()
    probabilities = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-(probabilities * torch.log(probabilities + 1e-10)).sum())
    return {f"{split}/perplexity": perplexity, f"{split}/cluster_usage": (counts > 0).sum().float()}
