"""Preparation of public labelled datasets (nnU-Net v2 raw format) for training: ``prepare_dataset.py``.

Modules, in the order a case goes through them: ``source`` (the dataset: ``dataset.json``, cases, label names),
``case`` (one case: standardised CT, 0/1/2 label, organ segmentations, report; timed, fingerprinted, skipped
when done; the lesion is described by :mod:`ldm.lesion`, the one description of a lesion the quality gate uses
too), ``report`` (the ``type.json``, validated like the reporters' output; optional LLM refinement), ``outputs``
(seeded split, aligned lists, ``data*.yaml`` fragments, ``prepare_report.json``) and ``run`` (all cases in
parallel, then the outputs). ``describe`` is ``describe.py``'s logic: every lesion of a label map described on
its CT, as a case's report would be.
"""
