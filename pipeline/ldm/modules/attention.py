"""Transformer attention over the voxels of a feature map, conditioned on text tokens.

Parameter names and shapes equal the original LesionDiffusion checkpoints. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``, which uses flash/memory-efficient kernels where available and
never materialises the token×token matrix; the result equals softmax(QKᵀ/√d)·V of the original einsum code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.modules.diffusionmodules.util import checkpoint, conv_nd, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention from ``query_dim`` tokens to ``context_dim`` tokens (self-attention without context).

    Projections ``to_q``/``to_k``/``to_v`` have no bias; ``to_out`` is Linear + Dropout. Scale ``dim_head^-0.5``.
    No attention mask: every context token is attended to, as in the original.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        return tokens.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, N, query_dim), ``context`` (B, M, context_dim) or None. Returns (B, N, query_dim)."""
        keys_from = x if context is None else context
        if keys_from.shape[-1] != self.to_k.in_features:
            source = "the query tokens (no context given) have" if context is None else "the context has"
            raise ConfigError(f"attention: {source} width {keys_from.shape[-1]}, but to_k expects "
                              f"{self.to_k.in_features}; pass a context of that width or build the model with "
                              "context_dim matching the transformer width")
        query = self._split_heads(self.to_q(x))
        key = self._split_heads(self.to_k(keys_from))
        value = self._split_heads(self.to_v(keys_from))
        attended = F.scaled_dot_product_attention(query, key, value)
        batch, heads, length, dim_head = attended.shape
        return self.to_out(attended.transpose(1, 2).reshape(batch, length, heads * dim_head))


class FeedForward(nn.Module):
    """Position-wise MLP ``Linear(dim, mult·dim) → GELU → Dropout → Linear(mult·dim, dim_out)``.

    The first Linear+GELU pair sits in its own Sequential so the state-dict names (``net.0.0``, ``net.2``) match the
    original checkpoints.
    """

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim if dim_out is None else dim_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns a tensor of the same leading shape with ``dim_out`` features."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the context, feed-forward.

    ``attn2`` attends to ``context`` when one is given and to the tokens themselves otherwise. Modules are
    registered in the original order (attn1, ff, attn2, norm1..3) so ``state_dict()`` lists keys identically.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 use_checkpoint: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, N, dim), ``context`` (B, M, context_dim) or None. Returns (B, N, dim)."""
        if context is None:
            return checkpoint(self._forward, x, enabled=self.use_checkpoint)
        return checkpoint(self._forward, x, context, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over all positions of a 1D/2D/3D feature map, added back as a residual.

    GroupNorm(32, eps 1e-6) → 1×…×1 ``proj_in`` → tokens ``(B, D·H·W, C)`` → ``depth`` transformer blocks →
    back to the map → zero-initialised 1×…×1 ``proj_out`` → ``+ input``. No positional encoding. ``in_channels``
    must be a multiple of 32.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, dims: int = 3, use_checkpoint: bool = False):
        super().__init__()
        if in_channels % 32:
            raise ConfigError(f"SpatialTransformer: in_channels={in_channels} must be a multiple of 32 (GroupNorm)")
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = conv_nd(dims, in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  use_checkpoint=use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(conv_nd(dims, inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, *spatial), ``context`` (B, M, context_dim) or None. Returns a tensor shaped like ``x``."""
        batch, _, *spatial = x.shape
        hidden = self.proj_in(self.norm(x))
        width = hidden.shape[1]
        tokens = hidden.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        hidden = tokens.transpose(1, 2).reshape(batch, width, *spatial)
        return self.proj_out(hidden) + x
