"""The measured ``type.json``: built from the phrases, checked exactly like the reporters' output.

Both reporters go through :func:`preprocessing.report_validation.validate_reply` (every value made of vocabulary
phrases, one phrase where one is allowed, the cavity of the organ's kind, the CT value a number of HU, the size
within the organ's extent), so a measured report is held to the same rules as an LLM's.

- :class:`MeasuredReporter` (``--reporter offline``, the default): the measured phrases, undecided ones with
  their fallback (:mod:`ldm.lesion.phrases`).
- :class:`RefiningReporter` (``--reporter llm``): the measured values are given to the LLM as fixed attributes
  (they always win), so the LLM only fills the attributes the image could not decide (it is not asked when there
  are none); its reply is validated and retried by :class:`preprocessing.report_llm.LLMReporter`.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from ldm.data.organs import is_hollow, organ_name
from ldm.lesion import DEFAULT, LesionMeasurement, Phrases
from preprocessing.report_format import CT_VALUE, SIZE, ReportRequest, build_report
from preprocessing.report_validation import validate_reply


def report_request(organ_id: int, lesion_type: str, organ_extent_xyz: Sequence[int], spacing_xyz: Sequence[float],
                   measurement: LesionMeasurement, fixed: dict[str, Any]) -> ReportRequest:
    """The request the validation (and an LLM) sees for one case."""
    return ReportRequest(
        organ_id=int(organ_id), organ_name=organ_name(organ_id), hollow=is_hollow(organ_id), lesion_type=lesion_type,
        organ_extent_xyz=tuple(int(e) for e in organ_extent_xyz), spacing_xyz_mm=tuple(float(s) for s in spacing_xyz),
        fixed=fixed, organ_mean_hu=measurement.organ_reference_hu,
        contrast_enhanced=None if measurement.aorta_hu is None else measurement.aorta_hu > DEFAULT.enhanced_aorta_hu,
    )


def measured_report(organ_id: int, phrases: Phrases, measurement: LesionMeasurement,
                    organ_extent_xyz: Sequence[int], spacing_xyz: Sequence[float], lesion_type: str) -> dict[str, list]:
    """The validated report of the measured phrases (ReportError naming every problem otherwise)."""
    values = {**phrases.values, CT_VALUE: round(measurement.interior_mean_hu)}
    report = build_report(organ_id, values, organ_extent_xyz, measurement.size_vox)
    request = report_request(organ_id, lesion_type, organ_extent_xyz, spacing_xyz, measurement, {})
    return validate_reply(json.dumps(report), request)


class MeasuredReporter:
    """Reports made of the measured phrases only; no network."""

    name = "offline"
    settings = {"reporter": "measured"}

    def generate(self, organ_id: int, phrases: Phrases, measurement: LesionMeasurement,
                 organ_extent_xyz: Sequence[int], spacing_xyz: Sequence[float], lesion_type: str) -> dict[str, list]:
        """The ``type.json`` dict (see :func:`measured_report`)."""
        return measured_report(organ_id, phrases, measurement, organ_extent_xyz, spacing_xyz, lesion_type)


class RefiningReporter:
    """An LLM fills the undecided attributes; every measured value is fixed (module docstring)."""

    name = "llm"

    def __init__(self, llm: Any):
        self.llm = llm

    @property
    def settings(self) -> dict[str, Any]:
        """What identifies this reporter's output (part of a case's fingerprint)."""
        return {**self.llm.settings, "refines": "undecided measured attributes"}

    def generate(self, organ_id: int, phrases: Phrases, measurement: LesionMeasurement,
                 organ_extent_xyz: Sequence[int], spacing_xyz: Sequence[float], lesion_type: str) -> dict[str, list]:
        """The validated ``type.json`` dict from the LLM; measured attributes are kept as measured. Without
        undecided attributes the LLM is not asked."""
        if not phrases.undecided:
            return measured_report(organ_id, phrases, measurement, organ_extent_xyz, spacing_xyz, lesion_type)
        fixed: dict[str, Any] = {name: value for name, value in phrases.values.items() if name not in phrases.undecided}
        fixed[CT_VALUE] = round(measurement.interior_mean_hu)
        fixed[SIZE] = tuple(measurement.size_vox)
        request = report_request(organ_id, lesion_type, organ_extent_xyz, spacing_xyz, measurement, fixed)
        return self.llm.generate(request)
