"""The denoising UNet of LMNet and LINet (3D by default), with text cross-attention.

``UNetModel`` takes the original constructor parameters, so the release YAML configs build it unchanged, and its
``state_dict()`` keys and shapes equal those of the released checkpoints (see ``shared/compat/*_unet.json``).

Precision: weights are never cast inside the model. ``use_fp16`` is accepted for compatibility with the original
configs and only recorded; choose precision at run time with ``torch.autocast`` (e.g. fp16/bf16 on CUDA), or cast
the whole module yourself. Inputs are cast to the parameters' dtype and the output comes back in the input's dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.errors import ConfigError, DataError
from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.blocks import (AttentionBlock, Downsample, ResBlock, TimestepEmbedSequential,
                                                  Upsample)
from ldm.modules.diffusionmodules.util import (conv_nd, normalization, set_fast_conv, timestep_embedding,
                                                zero_module)


class UNetModel(nn.Module):
    """Timestep- and text-conditioned UNet (the ``openaimodel`` UNet of LDM with the LesionDiffusion changes).

    Encoder: input conv, then per level ``num_res_blocks`` ResBlocks (+ attention where the downsampling factor is
    in ``attention_resolutions``) and a stride-2 Downsample between levels. Middle: ResBlock, attention, ResBlock.
    Decoder: per level ``num_res_blocks + 1`` ResBlocks on ``[h, skip]`` (+ attention) and a ×2 Upsample.
    Head: GroupNorm → SiLU → zero-initialised conv to ``out_channels``.

    LesionDiffusion additions: ``context_linear_projection`` (bias-free Linear(context_dim, context_dim)) is applied
    to the context before every transformer, and ``skip_context=True`` discards the context so every ``attn2``
    becomes a second self-attention (the LINet test config; needs transformer width == ``context_dim``).
    ``use_checkpoint`` recomputes ResBlock, attention and transformer activations in the backward pass.
    ``image_size`` is recorded only; any spatial size divisible by ``2**(len(channel_mult)-1)`` works.
    ``fast_conv`` sends float32 CPU convolutions to oneDNN (``SwitchableConv``; same parameters and outputs within
    float32 rounding); ``set_fast_conv(model, flag)`` flips it later.
    """

    def __init__(self, image_size, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 3,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | None = None, n_embed: int | None = None,
                 legacy: bool = True, skip_context: bool = False, fast_conv: bool = False):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ConfigError("UNetModel: use_spatial_transformer=True needs context_dim (the text feature width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ConfigError("UNetModel: context_dim is set but use_spatial_transformer=False; "
                              "cross-attention exists only in spatial transformers")
        if num_heads == -1 and num_head_channels == -1:
            raise ConfigError("UNetModel: set num_heads or num_head_channels (both are -1)")
        if num_res_blocks < 1 or not channel_mult:
            raise ConfigError("UNetModel: num_res_blocks must be >= 1 and channel_mult non-empty")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.dims = dims
        self.num_classes = num_classes
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_spatial_transformer = use_spatial_transformer
        self.transformer_depth = transformer_depth
        self.context_dim = context_dim
        self.legacy = legacy
        self.skip_context = skip_context
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        if context_dim is not None:
            self.context_linear_projection = nn.Linear(context_dim, context_dim, bias=False)

        def res_block(channels: int, out: int, **resample) -> ResBlock:
            return ResBlock(channels, time_embed_dim, dropout, out_channels=out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **resample)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, decoder=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        middle: list[nn.Module] = [res_block(ch, ch)]
        if self.attention_resolutions:
            middle.append(self._attention(ch, decoder=False))
        middle.append(res_block(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, decoder=True))
                if level and index == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))
        if skip_context:
            self._check_self_attention_widths()
        set_fast_conv(self, fast_conv)

    def _attention(self, channels: int, decoder: bool) -> nn.Module:
        """Attention layer at width ``channels``: heads and head width follow the original ``legacy`` rules."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            dim_head = channels // heads
        else:
            heads = channels // self.num_head_channels
            dim_head = self.num_head_channels
        if heads < 1:
            raise ConfigError(f"UNetModel: {channels} channels give no attention head "
                              f"(num_head_channels={self.num_head_channels})")
        if self.legacy:
            dim_head = channels // heads if self.use_spatial_transformer else self.num_head_channels
        if self.use_spatial_transformer:
            return SpatialTransformer(channels, heads, dim_head, depth=self.transformer_depth,
                                      context_dim=self.context_dim, dims=self.dims,
                                      use_checkpoint=self.use_checkpoint)
        return AttentionBlock(channels, num_heads=self.num_heads_upsample if decoder else heads,
                              num_head_channels=dim_head, use_checkpoint=self.use_checkpoint,
                              use_new_attention_order=self.use_new_attention_order)

    def _check_self_attention_widths(self) -> None:
        """With ``skip_context`` every attn2 attends to its own tokens, so its key width must equal its query width."""
        for name, module in self.named_modules():
            if isinstance(module, BasicTransformerBlock) and \
                    module.attn2.to_k.in_features != module.attn2.to_q.in_features:
                raise ConfigError(
                    f"UNetModel: skip_context=True needs every transformer width to equal context_dim="
                    f"{self.context_dim}, but {name} has width {module.attn2.to_q.in_features}")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network output for a noisy batch.

        ``x`` (B, in_channels, *spatial), ``timesteps`` (B,) integer or float steps, ``context`` (B, M, context_dim)
        text features or None, ``y`` (B,) class labels (only with ``num_classes``). Returns
        (B, out_channels, *spatial) in ``x``'s dtype (codebook logits (B, n_embed, *spatial) with ``n_embed``).
        """
        if (y is None) != (self.num_classes is None):
            raise ConfigError("UNetModel: pass class labels y exactly when the model was built with num_classes")
        factor = 2 ** (len(self.channel_mult) - 1)
        spatial = tuple(x.shape[2:])
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels or any(size % factor for size in spatial):
            raise DataError(f"UNetModel: input of shape {tuple(x.shape)} does not fit; expected (B, "
                            f"{self.in_channels}, {self.dims} spatial axes each divisible by {factor})")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        if context is not None and self.context_dim is None:
            raise ConfigError("UNetModel: a context was given but the model was built without context_dim")
        if self.skip_context:
            context = None
        elif context is not None:
            context = self.context_linear_projection(context.to(dtype))

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        return head(h).to(x.dtype)
