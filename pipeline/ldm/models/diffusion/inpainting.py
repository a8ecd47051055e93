"""LINet: latent inpainting diffusion in the VQ latent (``InpaintingDiffusion`` of the original).

The clean latent is kept outside the lesion mask; the UNet sees ``[x_in, mask]`` (latent channels + 1) and
predicts ``[eps, mask logit]``. Loss: masked L1 on the noise, normalised by the latent box volume, plus a Dice
loss on the mask logit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import DDPM, freeze
from ldm.models.diffusion.masks import filled_bbox
from ldm.models.diffusion.samplers import SamplerSettings
from ldm.util import instantiate_from_config


def dice_loss(probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`` over the whole batch (the original's form)."""
    return 1 - (2 * (probabilities * target).sum() + eps) / (probabilities.sum() + target.sum() + eps)


LATENT_MASK_MODES = ("nearest", "cover")
def nearest_latent_mask(lesion: torch.Tensor, latent_size) -> torch.Tensor:
    """``[B, 1, *latent_size]`` float mask of a ``[B, 1, *S]`` lesion mask, nearest-neighbour downsampled: what
    training (here and in the original) and the original's inference use. It can miss lesion parts thinner than
    the VQ's downsampling factor."""
    return (F.interpolate(lesion.float(), size=tuple(int(n) for n in latent_size), mode="nearest") > 0.5).float()


class InpaintingDiffusion(DDPM):
    """Batch keys (``LesionDataset`` in VQ/LINet mode): ``image`` ([0,1]), ``label`` (lesion = ``lesion_value``),
    ``text`` (attribute dicts)."""

    def __init__(self, scale_factor: float = 1.0, dice_weight: float = 1.0, label_key: str = "label",
                 lesion_value: int = 2, latent_mask_mode: str = "nearest", latent_mask_dilation: int = 0, **kwargs):
        if latent_mask_mode not in LATENT_MASK_MODES or int(latent_mask_dilation) < 0:
            raise ValueError(f"latent_mask_mode must be one of {LATENT_MASK_MODES} and latent_mask_dilation >= 0, "
                             f"got {latent_mask_mode!r} and {latent_mask_dilation!r}")
        self.latent_mask_mode, self.latent_mask_dilation = latent_mask_mode, int(latent_mask_dilation)
        self.scale_factor = float(scale_factor)
        self.dice_weight = float(dice_weight)
        self.label_key, self.lesion_value = label_key, lesion_value
        super().__init__(**kwargs)

    def build_first_stage(self, config: dict | None) -> None:
        if config is None:
            raise ValueError("InpaintingDiffusion needs first_stage_config (the VQ autoencoder)")
        self.first_stage_model = freeze(instantiate_from_config(config, key_path="model.params.first_stage_config"))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent of an image in [0, 1] (``[B, 1, D, H, W]``), times ``scale_factor``."""
        return self.first_stage_model.encode(image.to(self.device)) * self.scale_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] space from a latent (quantised by the VQ on the way)."""
        return self.first_stage_model.decode(latent / self.scale_factor)

    def latent_mask(self, label: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
        """Training mask on the latent grid, ``[B, 1, d, h, w]``, of the lesion (``label == lesion_value``):
        ``nearest`` (the original) resizes it, so latent cells the lesion only partly covers stay known and show
        the lesion's HU to the model; ``cover`` masks every cell the lesion touches (what inference masks), then
        grows the mask by ``latent_mask_dilation`` cells, so the known latent around it (whose encoder receptive
        field reaches into the lesion) does not tell the lesion's HU either and the text has to."""
        label = label if label.ndim == 5 else label.unsqueeze(1)
        lesion = (label == self.lesion_value).float()
        if self.latent_mask_mode == "nearest":
            mask = nearest_latent_mask(lesion, latent_shape[2:])
        else:
            mask = F.adaptive_max_pool3d(lesion, tuple(latent_shape[2:]))
        if self.latent_mask_dilation:
            width = 2 * self.latent_mask_dilation + 1
            mask = F.max_pool3d(mask, width, stride=1, padding=self.latent_mask_dilation)
        return (mask > 0.5).float()

    def get_input(self, batch: dict) -> dict:
        latent = self.encode(batch[self.first_stage_key].float())
        mask = self.latent_mask(batch[self.label_key].to(self.device), latent.shape)
        return {
            "x_start": latent,
            "mask": mask,
            "bbox": filled_bbox(mask),
            "context": self.encode_context(batch.get(self.cond_stage_key)),
        }

    def predict(self, x_in: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor | None) -> torch.Tensor:
        """Raw UNet output ``[eps (latent channels), mask logit]``."""
        return self.model(torch.cat([x_in, mask.to(x_in.dtype)], dim=1), t, context=context)

    def p_losses(self, inputs: dict, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        latent, mask = inputs["x_start"], inputs["mask"]
        x_in = latent * (1 - mask) + self.q_sample(latent, t, noise) * mask
        output = self.predict(x_in, mask, t, inputs["context"])
        channels = latent.shape[1]
        predicted_noise, mask_logit = output[:, :channels], output[:, channels:]
        masked_error = self.elementwise_loss(noise * mask, predicted_noise * mask).flatten(1).sum(dim=1)
        loss_simple = (masked_error / (inputs["bbox"].flatten(1).sum(dim=1) + 1e-6)).mean()
        mask_dice = dice_loss(torch.sigmoid(mask_logit), mask)
        loss = self.l_simple_weight * loss_simple + self.dice_weight * mask_dice
        logs = {"loss_simple": loss_simple.detach(), "mask_dice_loss": mask_dice.detach(), "loss": loss.detach()}
        return loss, logs

    @torch.no_grad()
    def sample(self, latent: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None,
               sampling: SamplerSettings | None = None, generator: torch.Generator | None = None,
               guidance_scale: float = 1.0, blend: str = "clean", use_ema: bool = True,
               progress: bool = False) -> torch.Tensor:
        """Inpaint the ``mask`` = 1 region of ``latent`` (``[B, C, d, h, w]``); returns the new latent, equal to
        ``latent`` where ``mask`` is 0. ``blend``: ``clean`` (the original) or ``renoise``."""
        latent, mask = latent.to(self.device), mask.to(self.device).float()
        if context is not None:
            context = context.to(self.device)
        channels = latent.shape[1]
        denoise = self.guided(lambda x, t, c: self.predict(x, mask, t, c)[:, :channels], context, guidance_scale)
        return self.run_sampler(denoise, latent.shape, sampling, generator=generator,
                                known=latent, mask=mask, blend=blend, use_ema=use_ema, progress=progress)

    @torch.no_grad()
    def preview(self, batch: dict, steps: int = 10,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Named ``[B, 1, D, H, W]`` CPU volumes in [0, 1] for a preview montage: ``input`` (the image),
        ``condition`` (the image with the lesion blanked: what the model keeps), ``sample`` (the lesion inpainted
        with ``steps`` DDIM steps and decoded) and ``mask`` (the lesion)."""
        inputs = self.get_input(batch)
        image = batch[self.first_stage_key].float().to(self.device)
        image = image if image.ndim == 5 else image.unsqueeze(1)
        label = batch[self.label_key].to(self.device)
        lesion = ((label if label.ndim == 5 else label.unsqueeze(1)) == self.lesion_value).float()
        latent = self.sample(inputs["x_start"], inputs["mask"], inputs["context"], SamplerSettings(steps=steps),
                             generator=generator)
        decoded = self.decode(latent)[(Ellipsis, *(slice(0, size) for size in image.shape[2:]))]
        volumes = {"input": image, "condition": image * (1 - lesion), "sample": decoded.clamp(0, 1), "mask": lesion}
        return {name: volume.float().cpu() for name, volume in volumes.items()}
