"""LesionDiffusion's ground floor: configs, data, models. ``__version__``: the one version every entry point reports."""

__version__ = "0.1.0"
