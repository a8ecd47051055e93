"""Augmentation experiments: does a segmentation model trained on real + synthetic cases find real lesions better?

- :mod:`experiments.splits`: leak-free cross-validation folds over the real cases (``splits_final.json``);
- :mod:`experiments.sampling`: the seeded, type-balanced choice of synthetic cases per fold;
- :mod:`experiments.datasets`: the splits, the capped synthetic cases and the paired real-only baseline dataset
  of an nnU-Net export;
- :mod:`experiments.lesions`: Dice and lesion-wise counts of one predicted case (the matching rules);
- :mod:`experiments.compare`: two prediction folders against the reference labels, with paired bootstrap
  intervals; :mod:`experiments.report`: its table, CSV, JSON and PNG.

Entry points: ``pipeline/export_nnunet.py`` (``--folds``, ``--with-baseline``, ``--synthetic-per-real``) and
``pipeline/compare_segmentation.py``.
"""
