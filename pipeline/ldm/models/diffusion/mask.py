"""LMNet: pixel-space diffusion of a binary lesion mask, conditioned on the organ segmentation, the organ mask,
the lesion box and the attribute context (``MaskDiffusion`` of the original)."""
from __future__ import annotations

import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.masks import filled_bbox
from ldm.models.diffusion.samplers import SamplerSettings


class MaskDiffusion(DDPM):
    """UNet input ``[x_t, seg/104, organ mask, lesion bbox]`` (4 channels), output the predicted noise.

    Loss: squared error weighted ``fg_loss_weight`` inside the lesion box and 1 outside (the original's 1000).
    Batch keys (from ``LesionDataset`` in LMNet mode): ``label`` (lesion {0,1}), ``seg`` (labels/104),
    ``target`` (organ mask), ``text`` (attribute dicts).
    """

    def __init__(self, fg_loss_weight: float = 1000.0, label_key: str = "label", seg_key: str = "seg",
                 target_key: str = "target", **kwargs):
        self.fg_loss_weight = float(fg_loss_weight)
        self.label_key, self.seg_key, self.target_key = label_key, seg_key, target_key
        super().__init__(**kwargs)

    def condition_volume(self, seg: torch.Tensor, organ: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        """The 3 conditioning channels ``[seg/104, organ mask, lesion bbox]``, each ``[B, 1, D, H, W]`` float."""
        return torch.cat([seg.float(), organ.float(), bbox.float()], dim=1).to(self.device)

    def get_input(self, batch: dict) -> dict:
        label = batch[self.label_key].to(self.device)
        label = label if label.ndim == 5 else label.unsqueeze(1)
        x_start = (label > 0).float()
        bbox = filled_bbox(x_start)
        seg, organ = batch[self.seg_key].to(self.device), batch[self.target_key].to(self.device)
        return {
            "x_start": x_start,
            "bbox": bbox,
            "cond": self.condition_volume(seg, organ, bbox),
            "context": self.encode_context(batch.get(self.cond_stage_key)),
        }

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      context: torch.Tensor | None) -> torch.Tensor:
        """The UNet's noise prediction for ``x_t`` given the conditioning volume and context."""
        return self.model(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t, context=context)

    def p_losses(self, inputs: dict, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x_t = self.q_sample(inputs["x_start"], t, noise)
        predicted = self.predict_noise(x_t, t, inputs["cond"], inputs["context"])
        weight = 1.0 + (self.fg_loss_weight - 1.0) * inputs["bbox"]
        per_sample = (self.elementwise_loss(noise, predicted) * weight).flatten(1).mean(dim=1)
        loss = self.l_simple_weight * per_sample.mean()
        return loss, {"loss_simple": per_sample.mean().detach(), "loss": loss.detach()}

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, context: torch.Tensor | None = None, sampling: SamplerSettings | None = None,
               generator: torch.Generator | None = None, guidance_scale: float = 1.0,
               use_ema: bool = True, progress: bool = False) -> torch.Tensor:
        """Sample lesion masks ``[B, 1, D, H, W]`` (continuous, about [0, 1]; threshold them) for the conditioning
        volume ``cond`` (``[B, 3, D, H, W]``, see :meth:`condition_volume`) and attribute ``context``."""
        cond = cond.to(self.device)
        if context is not None:
            context = context.to(self.device)
        denoise = self.guided(lambda x, t, c: self.predict_noise(x, t, cond, c), context, guidance_scale)
        shape = (cond.shape[0], self.channels, *cond.shape[2:])
        return self.run_sampler(denoise, shape, sampling, generator=generator,
                                use_ema=use_ema, progress=progress)

    @torch.no_grad()
    def preview(self, batch: dict, steps: int = 10,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Named ``[B, 1, D, H, W]`` CPU volumes for a preview montage: ``input`` (the true lesion mask),
        ``condition`` (the organ mask), ``sample`` (a mask sampled with ``steps`` DDIM steps, values about [0, 1])
        and ``mask`` (the lesion box the sample is conditioned on)."""
        inputs = self.get_input(batch)
        sample = self.sample(inputs["cond"], inputs["context"], SamplerSettings(steps=steps), generator=generator)
        volumes = {"input": inputs["x_start"], "condition": inputs["cond"][:, 1:2], "sample": sample,
                   "mask": inputs["bbox"]}
        return {name: volume.float().cpu() for name, volume in volumes.items()}
