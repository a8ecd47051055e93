"""Quality gates for synthetic lesions and their export to nnU-Net.

- :mod:`quality.tolerances`: the checks, their documented defaults and the ``quality.toml`` reader;
- :mod:`quality.outputs`: which inpainted CTs of an experiment folder are evaluated, with which mask and inputs;
- :mod:`quality.measure`: the per-lesion measurements and attribute verdicts (:class:`quality.measure.LesionQuality`,
  built on :mod:`ldm.lesion`, the one description of a lesion);
- :mod:`quality.evaluation`: what an evaluation found (shared by the two below, which do not import each other);
- :mod:`quality.gate`: pass/fail per check, the evaluation of a folder and the ``test.py`` hook;
- :mod:`quality.tables`: ``quality.csv`` and ``quality_summary.json``; :mod:`quality.plot`: ``quality.png``;
- :mod:`quality.fidelity`: per-attribute agreement (``fidelity.csv``, ``fidelity.png``); :mod:`quality.review`:
  ``review.html``, the page to review a run;
- :mod:`quality.nnunet`: nnU-Net v2 raw-dataset naming, ``dataset.json``, label schemes and read-back checks.

Entry points: ``pipeline/evaluate.py`` and ``pipeline/export_nnunet.py``.
"""
