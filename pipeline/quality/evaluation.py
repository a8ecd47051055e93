"""What one evaluation found (:class:`Evaluation`), shared by :mod:`quality.gate`, which grades, and
:mod:`quality.tables`, which writes the results; neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass, field

from quality.measure import LesionQuality
from quality.outputs import Skipped
from quality.tolerances import Tolerances


@dataclass(frozen=True)
class OutputError:
    """An output that could not be evaluated, and why."""

    case_id: str
    output: str
    error: str


@dataclass
class Evaluation:
    """Everything one evaluation found: graded lesions, outputs that failed to evaluate, cases without output."""

    lesions: list[LesionQuality]
    errors: list[OutputError]
    skipped: list[Skipped]
    tolerances: Tolerances
    rim_mm: float
    outputs: list[str] = field(default_factory=list)

    def failed_outputs(self) -> dict[str, list[str]]:
        """Output name -> reasons, for every output with a failed lesion or an evaluation error."""
        failed: dict[str, list[str]] = {}
        for lesion in self.lesions:
            if not lesion.passed:
                failed.setdefault(lesion.output, []).append(
                    f"lesion {lesion.lesion} failed {', '.join(lesion.failed_checks)}")
        for error in self.errors:
            failed.setdefault(error.output, []).append(f"not evaluated: {error.error}")
        return failed
