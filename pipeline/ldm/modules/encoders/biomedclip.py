"""BiomedCLIP text tower (PubMedBERT + 768->640->512 MLP) as an attribute encoder, without open_clip.

The module mirrors ``open_clip.hf_model.HFTextEncoder`` as BiomedCLIP configures it (original-models.md §6):
BERT without its pooler, the last hidden state of token 0 ([CLS]) as the pooled output, a bias-free
``Linear -> GELU -> Linear`` projection, and attention mask ``ids != [PAD]``. Registered as
``cond_stage_model`` its state dict is exactly ``cond_stage_model.model.{transformer,proj}.*`` of the released
LMNet/LINet checkpoints.

The tokenizer (``vocab.txt`` and ``tokenizer_config.json`` of BiomedCLIP, MIT) ships in ``biomedclip_tokenizer/``
next to this file and is used unless ``vocab_file`` names another vocabulary. Nothing is read at construction
(the release configs build on any machine, also on the ``meta`` device): the vocabulary is read at the first
encode, the weights at the first encode or at ``load_weights``. Weights that arrive through ``load_state_dict`` of
a parent module (a LesionDiffusion checkpoint) count as loaded.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from ldm.errors import ConfigError, DataError, MissingWeightsError
from ldm.models.checkpoint import read_state_dict, version_dependent
from ldm.modules.encoders.attributes import AttributeEncoder

try:
    import ftfy
except ImportError:
    ftfy = None

HF_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
PUBMEDBERT_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
# Where the text-tower keys sit in the files we accept, tried in this order.
KEY_PREFIXES = ("cond_stage_model.model.", "text.", "model.", "")
TOKENIZER_DIR = Path(__file__).resolve().parent / "biomedclip_tokenizer"
DEFAULT_VOCAB_FILE = TOKENIZER_DIR / "vocab.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
# BertTokenizer settings read from a tokenizer_config.json, with the values BiomedCLIP uses when it has none.
TOKENIZER_DEFAULTS = {"do_lower_case": True, "tokenize_chinese_chars": True, "strip_accents": None,
                      "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "mask_token": "[MASK]"}
SPECIAL_TOKENS = ("pad_token", "unk_token", "cls_token", "sep_token")


def clean_text(text: str) -> str:
    """open_clip's ``whitespace`` clean: ftfy repair (when installed), html unescape twice, whitespace collapsed."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


def tokenizer_settings(vocab_file: str | os.PathLike) -> dict[str, Any]:
    """BertTokenizer settings from the ``tokenizer_config.json`` beside ``vocab_file`` (defaults without one)."""
    path = Path(vocab_file).with_name(TOKENIZER_CONFIG)
    if not path.is_file():
        return dict(TOKENIZER_DEFAULTS)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable tokenizer config ({error})") from None
    if not isinstance(stored, dict):
        raise DataError(f"{path}: expected a JSON object of tokenizer settings")
    return {key: stored.get(key, default) for key, default in TOKENIZER_DEFAULTS.items()}


def read_vocab(vocab_file: str | os.PathLike, required_tokens: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
               ) -> dict[str, int]:
    """Return ``{word piece: id}`` of a BERT ``vocab.txt`` (one piece per line, id = line number)."""
    path = Path(vocab_file)
    if not path.is_file():
        raise MissingWeightsError(
            f"{path}: BiomedCLIP vocabulary not found; remove vocab_file from the config to use the vocabulary "
            f"that ships with the project, or download vocab.txt from the Hugging Face repo {HF_REPO}")
    with path.open(encoding="utf-8") as handle:
        vocab = {line.rstrip("\n"): index for index, line in enumerate(handle)}
    missing = [token for token in required_tokens if token not in vocab]
    if missing:
        raise DataError(f"{path}: not a BERT vocabulary, special tokens {missing} are missing")
    return vocab


def read_text_tower_state(weights_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return the text-tower tensors of a weights file keyed ``transformer.*`` / ``proj.*``.

    Accepts BiomedCLIP's ``open_clip_pytorch_model.bin`` (``text.*``; the vision keys are ignored), a
    LesionDiffusion checkpoint (``cond_stage_model.model.*``) or a saved encoder/tower state dict.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise MissingWeightsError(
            f"{path}: BiomedCLIP weights not found; download open_clip_pytorch_model.bin from the Hugging Face repo "
            f"{HF_REPO} (or use a LesionDiffusion LMNet/LINet checkpoint) and set weights_path to it")
    content = read_state_dict(path)
    for prefix in KEY_PREFIXES:
        if prefix + "proj.0.weight" in content:
            break
    else:
        raise DataError(f"{path}: no BiomedCLIP text-tower keys (looked for "
                        f"{', '.join(p + 'proj.0.weight' for p in KEY_PREFIXES if p)})")
    state = {}
    for key, tensor in content.items():
        name = key[len(prefix):]
        if key.startswith(prefix) and name.startswith(("transformer.", "proj.")) and not version_dependent(name):
            state[name] = tensor
    return state


class BiomedCLIPTextTower(nn.Module):
    """PubMedBERT without pooler + bias-free MLP; maps token ids ``[N, L]`` to embeddings ``[N, output_dim]``."""

    def __init__(self, bert_config: BertConfig, output_dim: int, projection_hidden_dim: int):
        super().__init__()
        self.pad_token_id = bert_config.pad_token_id
        self.transformer = BertModel(bert_config, add_pooling_layer=False)
        self.proj = nn.Sequential(
            nn.Linear(bert_config.hidden_size, projection_hidden_dim, bias=False),
            nn.GELU(),
            nn.Linear(projection_hidden_dim, output_dim, bias=False),
        )

    def forward(self, input_ids: torch.Tensor, pad_token_id: int | None = None) -> torch.Tensor:
        """Return the projected [CLS] state of each sequence, ``[N, output_dim]``."""
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        attention_mask = (input_ids != pad).long()
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden[:, 0])


class BiomedCLIPTextEncoder(AttributeEncoder):
    """Frozen-by-config BiomedCLIP text tower: one 512-d vector per attribute phrase.

    Args:
        vocab_file: a BERT ``vocab.txt`` overriding the shipped BiomedCLIP vocabulary (read at the first encode;
            settings from ``tokenizer_config.json`` beside it, when present).
        weights_path: ``open_clip_pytorch_model.bin``, a LesionDiffusion checkpoint or a saved encoder state dict
            (read at the first encode unless weights arrived through ``load_state_dict`` or ``load_weights``).
        context_length: tokens per phrase including [CLS]/[SEP]; longer phrases are truncated (original: 256).
        output_dim: size of each context vector.
        bert_config: BERT numbers overriding PubMedBERT's (``PUBMEDBERT_CONFIG``); tests use tiny ones.
        projection_hidden_dim: width of the MLP's hidden layer; default ``(hidden_size + output_dim) // 2``.
        pad_to_context_length: pad every phrase to ``context_length`` tokens as the original did; the default
            pads to the longest phrase in the call, which gives the same vectors (pads are masked) far faster.
        allow_random_weights: encode with the random initial weights instead of raising when no weights exist.
    """

    def __init__(self, vocab_file: str | None = None, weights_path: str | None = None, context_length: int = 256,
                 output_dim: int = 512, bert_config: Mapping[str, Any] | None = None,
                 projection_hidden_dim: int | None = None, pad_to_context_length: bool = False,
                 allow_random_weights: bool = False):
        super().__init__(output_dim)
        unknown = sorted(set(bert_config or {}) - set(PUBMEDBERT_CONFIG))
        if unknown:
            raise ConfigError(f"cond_stage_config.params.bert_config: unknown keys {unknown}; "
                              f"known: {sorted(PUBMEDBERT_CONFIG)}")
        config = BertConfig(**{**PUBMEDBERT_CONFIG, **dict(bert_config or {})})
        if not 2 <= context_length <= config.max_position_embeddings:
            raise ConfigError(f"cond_stage_config.params.context_length: {context_length} must lie in "
                              f"[2, max_position_embeddings={config.max_position_embeddings}]")
        hidden = projection_hidden_dim or (config.hidden_size + output_dim) // 2
        self.model = BiomedCLIPTextTower(config, output_dim, hidden)
        self.vocab_file = vocab_file
        self.weights_path = weights_path
        self.context_length = int(context_length)
        self.pad_to_context_length = bool(pad_to_context_length)
        self.allow_random_weights = bool(allow_random_weights)
        self.weights_loaded = False
        self._tokenizer: BertTokenizer | None = None

    @property
    def vocab_path(self) -> Path:
        """The vocabulary in use: ``vocab_file``, or the one that ships with the project."""
        return Path(self.vocab_file) if self.vocab_file is not None else DEFAULT_VOCAB_FILE

    @property
    def tokenizer(self) -> BertTokenizer:
        """The BERT word-piece tokenizer, built from :attr:`vocab_path` and its settings on first use."""
        if self._tokenizer is None:
            settings = tokenizer_settings(self.vocab_path)
            vocab = read_vocab(self.vocab_path, tuple(settings[key] for key in SPECIAL_TOKENS))
            if len(vocab) > self.model.transformer.config.vocab_size:
                raise DataError(f"{self.vocab_path}: {len(vocab)} word pieces do not fit the model's vocab_size "
                                f"{self.model.transformer.config.vocab_size}")
            self._tokenizer = BertTokenizer(vocab=vocab, **settings)
        return self._tokenizer

    def tokenize(self, phrases: list[str]) -> torch.Tensor:
        """Return token ids ``[N, L]`` (int64, CPU): [CLS] pieces [SEP] then [PAD]s, ``L <= context_length``."""
        padding = "max_length" if self.pad_to_context_length else "longest"
        encoded = self.tokenizer([clean_text(phrase) for phrase in phrases], padding=padding, truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
        return encoded["input_ids"]

    def load_weights(self, weights_path: str | os.PathLike | None = None) -> None:
        """Load the text tower from ``weights_path`` (default: the configured one), strictly on the text keys."""
        path = weights_path if weights_path is not None else self.weights_path
        if path is None:
            raise MissingWeightsError(
                f"BiomedCLIPTextEncoder: no weights; set weights_path to open_clip_pytorch_model.bin from the Hugging "
                f"Face repo {HF_REPO} or to a LesionDiffusion checkpoint (or load one into the whole model)")
        state = read_text_tower_state(path)
        expected = self.model.state_dict()
        missing = [key for key in expected if key not in state]
        unexpected = [key for key in state if key not in expected]
        if missing or unexpected:
            raise DataError(f"{path}: text-tower keys differ from the model: missing {missing[:5]} "
                            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
        wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
                 for key, value in expected.items() if state[key].shape != value.shape]
        if wrong:
            raise DataError(f"{path}: text-tower shapes differ from the model (file vs model): {wrong[:3]}")
        on_meta = any(parameter.is_meta for parameter in self.model.parameters())
        trainable = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.load_state_dict(state, strict=True, assign=on_meta)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(trainable[name])
        if on_meta:
            self._rebuild_index_buffers()
        self.weights_loaded = True

    def _rebuild_index_buffers(self) -> None:
        """Recreate BERT's position / token-type index buffers, which no weights file holds, after a meta build."""
        embeddings = self.model.transformer.embeddings
        device = embeddings.position_embeddings.weight.device
        positions = torch.arange(embeddings.position_embeddings.num_embeddings, device=device).unsqueeze(0)
        embeddings.position_ids = positions
        embeddings.token_type_ids = torch.zeros_like(positions)
        still_meta = [name for name, buffer in self.model.named_buffers() if buffer.is_meta]
        if still_meta:
            raise ConfigError(f"BiomedCLIPTextEncoder: buffers {still_meta} are still on the meta device after loading")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if all(f"{prefix}model.{key}" in state_dict for key in self.model.state_dict()):
            self.weights_loaded = True

    def _ensure_weights(self) -> None:
        if self.weights_loaded:
            return
        if self.weights_path is None and self.allow_random_weights:
            return
        self.load_weights()

    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """Return one vector per phrase, ``[len(phrases), output_dim]``, on the module's device."""
        self._ensure_weights()
        if self.device.type == "meta":
            raise ConfigError("BiomedCLIPTextEncoder was built on the meta device: call load_weights() before "
                              "encoding")
        input_ids = self.tokenize(phrases).to(self.device)
        return self.model(input_ids, pad_token_id=self.tokenizer.pad_token_id)
