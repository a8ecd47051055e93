"""What inference did per case and per lesion, the run summary, and the run report ``<exp>/<stage>_report.json``."""
from __future__ import annotations

import traceback as traceback_module
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import LesionDiffusionError
from ldm.fileio import move_aside, write_json_atomic
from inference.memory import is_out_of_memory, out_of_memory_message

# Where the files a case wrote before it failed go (inside the case folder), so that no half-finished result sits
# beside the good ones.
FAILED_FOLDER = "failed"


@dataclass
class LesionResult:
    """One lesion: its rank in the case (0 = largest box/lesion), seed, voxels, and stage details.

    ``organ``: the organ of the report entry used for the text. LMNet: ``threshold``, ``target_voxels`` (the box's
    target volume) and ``attempts``; LINet: ``hu_offset`` (HU added to match the surroundings), ``mean_hu`` (mean
    of the lesion in the output) and ``requested_hu`` (the report's ``CT value``, when it has one). When lesions
    are judged (:mod:`inference.candidates`): ``tries`` (rounds sampled), ``disagree`` (attributes of the kept
    sample that disagree with the report; after the quality gate, the gate's failed checks) and ``candidates``
    (every sample's draw, round, seed and agreement, and which was kept).
    """

    rank: int
    seed: int
    voxels: int
    organ: str = ""
    threshold: float | None = None
    target_voxels: float | None = None
    attempts: int = 1
    hu_offset: float | None = None
    mean_hu: float | None = None
    requested_hu: float | None = None
    seconds: float = 0.0
    tries: int = 1
    disagree: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)


@dataclass
class CaseResult:
    """One case: ``status`` is ``done`` or ``failed`` (``error`` says why); ``outputs`` maps kind -> path;
    ``warnings`` flags results to look at (e.g. a lesion far from the requested HU)."""

    index: int
    case_id: str
    status: str = "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    lesions: list[LesionResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def fail(self, error: BaseException, debug: bool = False) -> "CaseResult":
        """Record ``error``: a LesionDiffusionError by its message, a CUDA out-of-memory error by the case and the
        allocation that failed, anything else with its type and traceback. Files the case already wrote are
        moved to ``failed/`` in their folder and listed as ``failed_<kind>``."""
        self.status = "failed"
        moved = {}
        for kind, path in list(self.outputs.items()):
            if path not in moved and Path(path).is_file():
                moved[path] = str(move_aside(path, FAILED_FOLDER))
            self.outputs[f"failed_{kind}"] = moved.get(path, path)
            del self.outputs[kind]
        if is_out_of_memory(error):
            self.error = out_of_memory_message(self.case_id, error)
            self.traceback = traceback_module.format_exc() if debug else None
        elif isinstance(error, LesionDiffusionError):
            self.error = str(error)
            self.traceback = traceback_module.format_exc() if debug else None
        else:
            self.error = f"{type(error).__name__}: {error}"
            self.traceback = traceback_module.format_exc()
        return self


def summary_lines(results: list[CaseResult], stage: str) -> list[str]:
    """A short table of the run: one line per case (outputs or the reason of the failure), then the counts."""
    lines = []
    for result in results:
        if result.ok:
            written = ", ".join(Path(path).name for path in result.outputs.values())
            lines.append(f"  {result.case_id}: {len(result.lesions)} lesion(s) -> {written} "
                         f"({result.seconds:.1f} s)")
            lines.extend(f"    warning: {warning}" for warning in result.warnings)
            lines.extend(lesion_line(lesion) for lesion in result.lesions if lesion.candidates or lesion.disagree)
        else:
            lines.append(f"  {result.case_id}: FAILED: {result.error}")
    failed = sum(not result.ok for result in results)
    lines.append(f"{stage}: {len(results)} case(s), {len(results) - failed} done, {failed} failed")
    return lines


def lesion_line(lesion: LesionResult) -> str:
    """One line for a judged lesion: samples, rounds, kept seed, and what still disagrees with the report."""
    disagree = f"disagree: {', '.join(lesion.disagree)}" if lesion.disagree else "every judged attribute agrees"
    return (f"    lesion {lesion.rank}: {len(lesion.candidates) or 1} sample(s) in {lesion.tries} round(s), "
            f"seed {lesion.seed}; {disagree}")


def write_run_report(path: Path, stage: str, options: dict[str, Any], results: list[CaseResult],
                     weights: dict[str, dict] | None = None) -> Path:
    """Write the run report (options, the weight files with their sizes and sha256, then every case with its
    lesions) as JSON, atomically; returns ``path``."""
    report = {"stage": stage, "options": options, "weights": weights or {},
              "cases": [asdict(result) for result in results]}
    return write_json_atomic(path, report, indent=1)
