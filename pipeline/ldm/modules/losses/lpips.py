"""LPIPS perceptual distance (VGG16 features + 5 linear heads), loaded only from local files.

Nothing is ever downloaded. Two files are needed, both given in the config:

* ``vgg_path``: torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``, keys ``features.N.*``; get it from
  https://download.pytorch.org/models/vgg16-397923af.pth on a machine with internet access);
* ``lpips_path``: the LPIPS linear heads (``vgg.pth`` of the LPIPS release v0.1, keys ``linK.model.1.weight``; in
  https://github.com/richzhang/PerceptualSimilarity under ``lpips/weights/v0.1/vgg.pth``).

The VGG16 layers are built here (same layout and indices as torchvision's ``vgg16().features``).
``lpips_path`` may also hold a complete LPIPS state dict (e.g. the ``loss.perceptual_loss.*`` entries of a VQ
checkpoint with the prefix removed); ``vgg_path`` is then not needed. Key names match the original
(``scaling_layer``, ``net.slice1..5``, ``lin0..4``).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from ldm.errors import MissingWeightsError
from ldm.models.checkpoint import read_checkpoint

# Conv widths and max-pools ("M") of VGG16 up to relu5_3 (the last pool is not needed).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG_SLICE_ENDS = (4, 9, 16, 23, 30)
VGG_CHANNELS = (64, 128, 256, 512, 512)
IMAGENET_SHIFT = (-0.030, -0.088, -0.188)
IMAGENET_SCALE = (0.458, 0.448, 0.450)
VGG_HINT = "torchvision's VGG16 ImageNet weights (https://download.pytorch.org/models/vgg16-397923af.pth)"
LIN_HINT = ("the LPIPS v0.1 linear heads vgg.pth (github.com/richzhang/PerceptualSimilarity, "
            "lpips/weights/v0.1/vgg.pth)")


class ScalingLayer(nn.Module):
    """Map intensities in [0, 1] to [-1, 1] (``shift_p``/``scale_p``), then apply LPIPS's ImageNet normalisation.

    ``shift_p``/``scale_p`` are the original's frozen scalar parameters; a loaded checkpoint overrides our
    defaults (0.5, 0.5). One-channel inputs broadcast against the three-channel shift/scale.
    """

    def __init__(self):
        super().__init__()
        self.shift_p = nn.Parameter(torch.full((1, 1, 1, 1), 0.5), requires_grad=False)
        self.scale_p = nn.Parameter(torch.full((1, 1, 1, 1), 0.5), requires_grad=False)
        self.register_buffer("shift", torch.tensor(IMAGENET_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(IMAGENET_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.shift_p) / self.scale_p
        return (x - self.shift) / self.scale


def vgg16_features() -> list[nn.Module]:
    """The 30 layers of torchvision's VGG16 ``features`` up to relu5_3 (same order, so the same indices)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = entry
    return layers


class VGG16Slices(nn.Module):
    """VGG16 ``features`` cut after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision layer indices kept)."""

    def __init__(self):
        super().__init__()
        features = vgg16_features()
        start = 0
        for number, end in enumerate(VGG_SLICE_ENDS, start=1):
            block = nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), features[index])
            setattr(self, f"slice{number}", block)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, len(VGG_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class NetLinLayer(nn.Module):
    """Dropout + bias-free 1×1 conv to one channel (``model.1.weight`` as in the original)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0,
                                                           bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _read_state_dict(path: str | os.PathLike | None, key: str, what: str) -> Mapping[str, torch.Tensor]:
    """Tensors of a local weights file (``{"state_dict": ...}`` unwrapped); MissingWeightsError when absent."""
    if path is None:
        raise MissingWeightsError(f"lossconfig.params.{key} is not set: LPIPS needs {what}; set {key} to the local "
                                  "file or set perceptual_weight: 0 to train without LPIPS")
    if not os.path.isfile(path):
        raise MissingWeightsError(f"{path}: {what} not found ({key}); put the file there (no download is "
                                  "attempted) or set perceptual_weight: 0 to train without LPIPS")
    state = read_checkpoint(path)  # safely: a weights file needs no code; names the file when unreadable
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise MissingWeightsError(f"{path}: {what} must be a state dict, got {type(state).__name__}")
    return state


class LPIPS(nn.Module):
    """Learned perceptual distance between two image batches in [0, 1]; frozen and always in eval mode.

    ``forward(input, target)`` returns a ``(B, 1, 1, 1)`` tensor of distances (dimensionless, ≥ 0).
    """

    def __init__(self, lpips_path: str | os.PathLike | None, vgg_path: str | os.PathLike | None = None):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for index, channels in enumerate(VGG_CHANNELS):
            setattr(self, f"lin{index}", NetLinLayer(channels))
        self.load_weights(lpips_path, vgg_path)
        for parameter in self.parameters():
            parameter.requires_grad = False
        self.eval()

    def load_weights(self, lpips_path: str | os.PathLike | None, vgg_path: str | os.PathLike | None) -> None:
        """Load the linear heads (and optionally everything) from ``lpips_path``, the VGG trunk from ``vgg_path``."""
        own = self.state_dict()
        heads = _read_state_dict(lpips_path, "lpips_path", LIN_HINT)
        lin_keys = [key for key in own if key.startswith("lin")]
        missing_heads = [key for key in lin_keys if key not in heads]
        if missing_heads:
            raise MissingWeightsError(f"{lpips_path}: not an LPIPS heads file, missing {missing_heads[:3]} "
                                      f"(expected {LIN_HINT})")
        loaded = {key: heads[key] for key in own if key in heads}
        net_keys = [key for key in own if key.startswith("net.")]
        if not all(key in heads for key in net_keys):
            vgg = _read_state_dict(vgg_path, "vgg_path", VGG_HINT)
            for key in net_keys:
                source = "features." + key.split(".", 2)[2]
                if source not in vgg:
                    raise MissingWeightsError(f"{vgg_path}: not a torchvision VGG16 state dict, missing {source!r} "
                                              f"(expected {VGG_HINT})")
                loaded[key] = vgg[source]
        try:
            self.load_state_dict(loaded, strict=False)
        except RuntimeError as error:
            raise MissingWeightsError(f"{lpips_path} / {vgg_path}: weights do not fit LPIPS-VGG16 ({error})") from None

    def train(self, mode: bool = True) -> "LPIPS":
        """Stay in eval mode: LPIPS is a fixed metric, its dropout must never be active."""
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features_input = self.net(self.scaling_layer(input))
        features_target = self.net(self.scaling_layer(target))
        distance = 0.0
        for index, (feature_in, feature_target) in enumerate(zip(features_input, features_target)):
            difference = (normalize_channels(feature_in) - normalize_channels(feature_target)) ** 2
            distance = distance + getattr(self, f"lin{index}")(difference).mean(dim=(2, 3), keepdim=True)
        return distance


def normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Features divided by their L2 norm over channels (per pixel)."""
    return features / (torch.sqrt(torch.sum(features ** 2, dim=1, keepdim=True)) + eps)
