"""Preprocessing for ``preprocess.py``: CT -> standardised CT, organ segmentation, structured report, lesion boxes.

Modules, in the order a case goes through them: ``inputs`` (the lists, one case per CT), ``user_attributes``
(the attribute file), ``standardise`` (LPS, target spacing, correct affine), ``segment`` (TotalSegmentator or
``--seg-list``, v1 labels), ``report_offline`` / ``report_llm`` (the report; ``report_validation``,
``report_format`` and ``vocabulary`` check and write it), ``bbox`` (box placement), ``case`` (one case, timed and
fingerprinted) and ``cases`` (all cases, lists, run report).
"""
