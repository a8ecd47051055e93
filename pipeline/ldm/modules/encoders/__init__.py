"""Attribute encoders: a batch of attribute dicts -> a context ``[B, n_attributes, 512]``.

The classes are imported on first access so that the offline vocabulary encoder does not pull in transformers.
"""
import importlib

_CLASS_MODULES = {
    "AttributeEncoder": "attributes",
    "BiomedCLIPTextEncoder": "biomedclip",
    "VocabularyEncoder": "vocabulary",
    "SentenceEncoder": "sentence",
}
__all__ = list(_CLASS_MODULES)


def __getattr__(name):
    if name not in _CLASS_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_CLASS_MODULES[name]}"), name)
