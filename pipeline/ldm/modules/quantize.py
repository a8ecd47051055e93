"""Vector quantiser of the VQ-GAN (taming's legacy ``VectorQuantizer``, with a memory-bounded code search).

The nearest code of every latent vector is found in chunks of ``chunk_size`` vectors, so the distance matrix
never exceeds ``chunk_size × n_e`` floats (a 64³ latent against 2,048 codes would otherwise need 2 GiB).
Each vector's distances and argmin do not depend on the other vectors, so chunking does not change the result.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ldm.errors import ConfigError

DEFAULT_CHUNK_SIZE = 32768


class QuantizerInfo(NamedTuple):
    """Side outputs of a quantisation: codebook perplexity (scalar tensor) and code indices ``(B, *spatial)``."""

    perplexity: torch.Tensor
    indices: torch.Tensor


class VectorQuantizer(nn.Module):
    """Replace each ``e_dim`` vector of a channels-first latent by its nearest codebook entry (squared L2).

    The commitment loss uses the original (taming ``legacy=True``) ordering:
    ``mean((sg[z_q] - z)²) + beta · mean((z_q - sg[z])²)`` with ``beta`` 0.25 in the release model.
    Gradients pass straight through the quantisation to ``z``.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, chunk_size: int | None = DEFAULT_CHUNK_SIZE):
        super().__init__()
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigError(f"quantize chunk_size: {chunk_size} must be a positive number of vectors (or None)")
        self.n_e, self.e_dim, self.beta = int(n_e), int(e_dim), float(beta)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index (int64, shape ``(N,)``) of the nearest codebook entry of each row of ``vectors`` ``(N, e_dim)``."""
        # Distances in float32 even for half-precision latents: fp16 rounding would change the nearest code.
        codebook = self.embedding.weight.float()
        vectors = vectors.float()
        code_norms = codebook.pow(2).sum(dim=1)
        step = max(vectors.shape[0] if self.chunk_size is None else self.chunk_size, 1)
        indices = []
        for start in range(0, vectors.shape[0], step):
            chunk = vectors[start:start + step]
            # ||z||² is constant per row and does not change the argmin, but is kept so distances are true distances.
            distances = chunk.pow(2).sum(dim=1, keepdim=True) + code_norms - 2.0 * chunk @ codebook.t()
            indices.append(distances.argmin(dim=1))
        if not indices:
            return torch.zeros(0, dtype=torch.long, device=vectors.device)
        return torch.cat(indices)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerInfo]:
        """Quantise ``z`` ``(B, e_dim, *spatial)``.

        Returns ``(z_q, loss, info)``: ``z_q`` like ``z`` (straight-through), the scalar commitment/codebook loss,
        and ``QuantizerInfo(perplexity, indices)``.
        """
        if z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer: expected {self.e_dim} latent channels, got shape {tuple(z.shape)}")
        channels_last = z.movedim(1, -1)
        vectors = channels_last.reshape(-1, self.e_dim)
        with torch.no_grad():
            indices = self.nearest_codes(vectors.detach())
        z_q = self.embedding(indices).view(channels_last.shape).movedim(-1, 1).to(z.dtype)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        counts = torch.bincount(indices, minlength=self.n_e).to(z.dtype)
        probabilities = counts / max(indices.numel(), 1)
        perplexity = torch.exp(-torch.sum(probabilities * torch.log(probabilities + 1e-10)))
        spatial_indices = indices.view(channels_last.shape[:-1])
        return z_q, loss, QuantizerInfo(perplexity, spatial_indices)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for ``indices`` ``(B, *spatial)``, returned channels-first ``(B, e_dim, *spatial)``."""
        return self.embedding(indices.long()).movedim(-1, 1).contiguous()
