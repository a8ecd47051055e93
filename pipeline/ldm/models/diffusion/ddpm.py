"""DDPM base: noise schedule, forward noising, EMA, frozen conditioning, optimiser, training/validation steps.

Subclasses (LMNet's :class:`MaskDiffusion`, LINet's :class:`InpaintingDiffusion`) implement ``get_input`` (a batch
-> the tensors they need) and ``p_losses`` (the loss at given timesteps and noise), and a public ``sample``.
Attribute names and buffers follow the original release so its checkpoints load with ``strict=True``:
``model.*`` (the UNet), ``model_ema.*``, ``cond_stage_model.*``, and the 12 schedule buffers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.models.checkpoint import load_checkpoint
from ldm.models.diffusion.samplers import SamplerSettings, make_sampler, sample_loop
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no gradients; :meth:`DDPM.train` keeps it in eval mode."""
    module.eval()
    module.requires_grad_(False)
    module.frozen = True
    return module


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[t]`` reshaped to broadcast against a tensor of ``ndim`` dimensions."""
    return values.gather(0, t).reshape(-1, *([1] * (ndim - 1)))


class DDPM(pl.LightningModule):
    """Denoising diffusion (eps-prediction) around a UNet given by ``unet_config``."""

    def __init__(
        self,
        unet_config: dict,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        loss_type: str = "l2",
        parameterization: str = "eps",
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        cond_stage_config: dict | str | None = None,
        cond_stage_key: str = "text",
        cond_stage_trainable: bool = False,
        cond_drop_prob: float = 0.0,
        conditioning_key: str | None = "crossattn",
        image_size: int | Sequence[int] = 64,
        channels: int = 1,
        first_stage_key: str = "image",
        monitor: str | None = "val/loss_simple_ema",
        scheduler_config: dict | None = None,
        learning_rate: float = 1e-4,
        clip_denoised: bool = False,
        log_every_t: int = 100,
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        first_stage_config: dict | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
    ):
        super().__init__()
        if parameterization != "eps":
            raise ValueError(f"only eps-prediction is implemented (the release uses it), got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.loss_type = loss_type
        self.parameterization = parameterization
        self.use_ema = use_ema
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_drop_prob = cond_drop_prob
        self.conditioning_key = conditioning_key
        self.image_size = [image_size] * 3 if isinstance(image_size, int) else list(image_size)
        self.channels = channels
        self.first_stage_key = first_stage_key
        self.monitor = monitor
        self.scheduler_config = scheduler_config
        self.learning_rate = learning_rate
        self.clip_denoised = clip_denoised
        self.l_simple_weight = l_simple_weight

        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.model = instantiate_from_config(unet_config, key_path="model.params.unet_config")
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        self.build_first_stage(first_stage_config)
        self.build_cond_stage(cond_stage_config)
        self.restore(ckpt_path, ignore_keys)

    # ----------------------------------------------------------------------------------------- set-up
    def register_schedule(self, schedule: str, timesteps: int, linear_start: float, linear_end: float,
                          cosine_s: float) -> None:
        """Register the 12 persistent schedule buffers (float32, computed in float64) of the original."""
        betas = np.asarray(make_beta_schedule(schedule, timesteps, linear_start=linear_start,
                                              linear_end=linear_end, cosine_s=cosine_s), dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32))
        self.num_timesteps = int(timesteps)

    def build_first_stage(self, config: dict | None) -> None:
        """Build the autoencoder of a latent model (subclasses that diffuse in a latent space override this)."""
        if config is not None:
            raise ValueError(f"{type(self).__name__} works in image space and takes no first_stage_config")

    def build_cond_stage(self, config: dict | str | None) -> None:
        """Build the attribute encoder; frozen (eval, no grad) unless ``cond_stage_trainable``."""
        self.cond_stage_model = instantiate_from_config(config, key_path="model.params.cond_stage_config") \
            if config is not None else None
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            freeze(self.cond_stage_model)

    def restore(self, ckpt_path: str | None, ignore_keys: Iterable[str] = ()) -> None:
        """Load ``ckpt_path`` (a released or self-trained Lightning checkpoint) strictly, except ``ignore_keys``."""
        if ckpt_path:
            load_checkpoint(self, ckpt_path, ignore_keys=ignore_keys)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():
            if getattr(module, "frozen", False):
                module.eval()
        return self

    # ------------------------------------------------------------------------------------ diffusion maths
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noised sample ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        return (extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def elementwise_loss(self, target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Per-element L1 or squared error (``loss_type``)."""
        difference = target - prediction
        return difference.abs() if self.loss_type == "l1" else difference.square()

    def encode_context(self, texts: Sequence[Any] | None) -> torch.Tensor | None:
        """Attribute context ``[B, n_attributes, context_dim]``; during training each sample's context is dropped
        (zeroed, the unconditional context) with probability ``cond_drop_prob`` for classifier-free guidance."""
        if self.cond_stage_model is None or texts is None:
            return None
        if self.cond_stage_trainable:
            context = self.cond_stage_model(list(texts))
        else:
            with torch.no_grad():
                context = self.cond_stage_model(list(texts))
        context = context.to(self.device)
        if self.training and self.cond_drop_prob > 0:
            keep = torch.rand(context.shape[0], device=context.device) >= self.cond_drop_prob
            context = context * keep.to(context.dtype).view(-1, 1, 1)
        return context

    def guided(self, predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
               context: torch.Tensor | None, guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A ``denoise(x, t)`` for the samplers; with ``guidance_scale != 1`` classifier-free guidance against the
        zero (dropped) context: ``eps_u + s (eps_c - eps_u)``."""
        if context is None or guidance_scale == 1.0:
            return lambda x, t: predict(x, t, context)
        unconditional = torch.zeros_like(context)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps_u = predict(x, t, unconditional)
            return eps_u + guidance_scale * (predict(x, t, context) - eps_u)

        return denoise

    @contextmanager
    def ema_scope(self, enabled: bool = True):
        """Within the block the UNet holds the EMA weights (a no-op without EMA or when ``enabled`` is False)."""
        if not (self.use_ema and enabled):
            yield
            return
        parameters = list(self.model.parameters())
        self.model_ema.store(parameters)
        self.model_ema.copy_to(self.model)
        try:
            yield
        finally:
            self.model_ema.restore(parameters)

    def run_sampler(self, denoise, shape, sampling: SamplerSettings | None = None,
                    generator: torch.Generator | None = None, known: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, blend: str = "clean", use_ema: bool = True,
                    progress: bool = False) -> torch.Tensor:
        """Run the sampler of ``sampling`` (default: DDIM, 50 steps, eta 1) with this model's schedule; EMA
        weights by default."""
        sampling = sampling or SamplerSettings()
        scheduler = make_sampler(sampling, self.alphas_cumprod)
        with self.ema_scope(use_ema):
            return sample_loop(scheduler, denoise, tuple(shape), sampling.steps, generator=generator,
                               device=self.device, known=known, mask=mask, blend=blend, progress=progress)

    # -------------------------------------------------------------------------------- subclass interface
    def get_input(self, batch: dict) -> dict:
        """Tensors the loss needs, from a collated batch (subclasses)."""
        raise NotImplementedError

    def p_losses(self, inputs: dict, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(loss, {name: value})`` at timesteps ``t`` with noise ``noise`` (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ training
    def shared_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of one batch at random timesteps."""
        return self.loss_at_random_t(self.get_input(batch))

    def loss_at_random_t(self, inputs: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Loss at random timesteps and noise (drawn from ``generator`` when given, for a reproducible value)."""
        x_start = inputs["x_start"]
        draw_device = generator.device if generator is not None else x_start.device
        t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), generator=generator, device=draw_device)
        noise = torch.randn(x_start.shape, generator=generator, device=draw_device, dtype=x_start.dtype)
        return self.p_losses(inputs, t.to(x_start.device), noise.to(x_start.device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        batch_size = len(batch[self.cond_stage_key]) if self.cond_stage_key in batch else None
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, prog_bar=False, on_step=True,
                      batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The same timesteps and noise for the raw and the EMA weights, fixed per batch: comparable, less noisy values.
        seed = 1_000_003 * (batch_idx + 1)
        inputs = self.get_input(batch)
        _, logs = self.loss_at_random_t(inputs, torch.Generator().manual_seed(seed))
        with self.ema_scope():
            _, logs_ema = self.loss_at_random_t(inputs, torch.Generator().manual_seed(seed))
        values = {f"val/{k}": v for k, v in logs.items()}
        values.update({f"val/{k}_ema": v for k, v in logs_ema.items()})
        self.log_dict(values, prog_bar=False, on_epoch=True, sync_dist=True, batch_size=1)

    def configure_optimizers(self):
        parameters = list(self.model.parameters())
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            parameters += list(self.cond_stage_model.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate)
        if self.scheduler_config is None:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config, key_path="model.params.scheduler_config")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
