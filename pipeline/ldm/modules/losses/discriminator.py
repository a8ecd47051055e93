"""PatchGAN discriminators of the VQ-GAN loss (pix2pixHD layout, 2D for slices and 3D for volumes).

Sub-module names (``model0`` … ``model{n_layers + 1}``, each an ``nn.Sequential``) match the original
``getIntermFeat=True`` discriminators, so ``loss.frame_discriminator.*`` / ``loss.ct_discriminator.*`` of a
released ``VQ.ckpt`` load as they are. The original used ``SyncBatchNorm``, whose state-dict keys equal
``BatchNorm``'s; we build plain ``BatchNorm`` (CPU and single-GPU friendly) and
``nn.SyncBatchNorm.convert_sync_batchnorm`` can be applied under DDP.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ldm.errors import ConfigError

KERNEL_SIZE = 4
LEAKY_SLOPE = 0.2
MAX_CHANNELS = 512


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 convs (the last of them stride 1) and a 1-channel logit map.

    ``forward`` returns the output of every stage (a list of ``n_layers + 2`` tensors); the last one holds the
    patch logits, the others are the intermediate features used for feature matching.
    """

    def __init__(self, input_nc: int = 1, ndf: int = 64, n_layers: int = 3, dims: int = 2,
                 use_sigmoid: bool = False):
        super().__init__()
        if dims not in (2, 3):
            raise ConfigError(f"discriminator dims: {dims} is not supported (use 2 or 3)")
        if n_layers < 1:
            raise ConfigError(f"disc_num_layers: {n_layers} must be at least 1")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        padding = math.ceil((KERNEL_SIZE - 1) / 2)
        self.n_stages = n_layers + 2
        stages = [[conv(input_nc, ndf, KERNEL_SIZE, stride=2, padding=padding), nn.LeakyReLU(LEAKY_SLOPE, True)]]
        channels = ndf
        for layer in range(1, n_layers + 1):
            previous, channels = channels, min(channels * 2, MAX_CHANNELS)
            stride = 2 if layer < n_layers else 1
            stages.append([conv(previous, channels, KERNEL_SIZE, stride=stride, padding=padding), norm(channels),
                           nn.LeakyReLU(LEAKY_SLOPE, True)])
        stages.append([conv(channels, 1, KERNEL_SIZE, stride=1, padding=padding)])
        if use_sigmoid:
            stages[-1].append(nn.Sigmoid())
        for index, layers in enumerate(stages):
            setattr(self, f"model{index}", nn.Sequential(*layers))
        self.apply(init_discriminator_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index in range(self.n_stages):
            x = getattr(self, f"model{index}")(x)
            features.append(x)
        return features


def init_discriminator_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), norm weights N(1, 0.02), norm biases 0."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2`` (scalar)."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss ``(mean(softplus(-real)) + mean(softplus(fake))) / 2`` (scalar)."""
    return 0.5 * (nn.functional.softplus(-logits_real).mean() + nn.functional.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
