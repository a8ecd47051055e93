"""Errors raised for bad input. Entry points print them as one line and exit non-zero."""


class LesionDiffusionError(Exception):
    """Base class: a problem the user can fix (bad file, bad config, missing weights)."""


class ConfigError(LesionDiffusionError):
    """A configuration is invalid; the message names the key path."""


class DataError(LesionDiffusionError):
    """An input file is missing, unreadable or inconsistent; the message names the file."""


class MissingWeightsError(LesionDiffusionError):
    """Model weights or tokenizer files are absent; the message says where to get them."""
