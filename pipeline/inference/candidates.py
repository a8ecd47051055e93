"""Best of K and resampling what fails: a lesion sampled several times, every sample judged, one kept.

With ``inference.candidates: K`` every lesion (LMNet: box; LINet: lesion of the mask) is sampled K times, **draws**
``0 .. K-1`` with the seeds of :func:`inference.plan.lesion_seed` (draw 0 is the seed a run without candidates
uses, so K = 1 is that run exactly). A **judge** (:data:`LesionJudge`, given by the caller: inference never
imports the quality gate that builds on it) measures each candidate against the report: LMNet's on what a mask
can show, LINet's on the inpainted CT. The kept candidate ranks first by (passes the judge's failing checks,
most agreeing attributes, smallest absolute HU error, lowest draw).

With ``inference.resample_failed: R``, a lesion whose best candidate still fails is sampled again, a **round** of
K fresh draws (``K .. 2K-1``, then ``2K ..``), up to R more rounds; the best over every round is kept. Only that
lesion is redone; the others of its case keep theirs. Every candidate's draw, round, seed and agreement goes into
the lesion's record (:class:`inference.results.LesionResult`), so the same seed and K give the same choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

from ldm.data.volume import Geometry
from ldm.errors import ConfigError
from inference.options import InferenceOptions
from inference.results import LesionResult

Candidate = TypeVar("Candidate")
JUDGE_HINT = ("run test.py or synthesize.py, or pass judge=quality.candidates.lesion_judge (Python: "
              "run_inference, sample_masks, inpaint_cases)")


@dataclass(frozen=True)
class Agreement:
    """How one candidate compares with its report: attributes that agree and disagree (n/a ones are in
    neither), the disagreeing ones that fail the lesion, and the HU error (measured - requested, None when not
    judged)."""

    agree: tuple[str, ...] = ()
    disagree: tuple[str, ...] = ()
    failing: tuple[str, ...] = ()
    hu_error: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failing


@dataclass(frozen=True)
class JudgedCase:
    """What a judge reads of a case besides the candidate: the input CT (HU, the grid the models ran on), the v1
    segmentation (None without one), the report, its path and the grid."""

    ct: np.ndarray
    seg: np.ndarray | None
    report: dict
    report_path: str
    geometry: Geometry


# judge(stage, case, image, lesion, lesions) -> Agreement: ``image`` is the CT with the candidate in it (LMNet:
# the input CT), ``lesion`` the candidate's boolean mask, ``lesions`` every lesion of the case with it.
LesionJudge = Callable[[str, JudgedCase, np.ndarray, np.ndarray, np.ndarray], Agreement]
JudgeFactory = Callable[[InferenceOptions], LesionJudge]


def judging(options: InferenceOptions) -> bool:
    """True when the options sample lesions more than once (K > 1 or resampling), which needs a judge."""
    return options.candidates > 1 or options.resample_failed > 0


def require_judge(options: InferenceOptions, judge: object) -> None:
    """ConfigError when the options need a judge and none was given."""
    if judging(options) and judge is None:
        raise ConfigError(f"inference.candidates {options.candidates} / inference.resample_failed "
                          f"{options.resample_failed} judge every sample, but no judge was given: {JUDGE_HINT}")


def rank_key(agreement: Agreement, draw: int) -> tuple:
    """Sort key of a candidate (smallest first is kept): passes, most agreeing, smallest |HU error|, first draw."""
    hu_error = math.inf if agreement.hu_error is None else abs(agreement.hu_error)
    return (not agreement.passed, -len(agreement.agree), hu_error, draw)


def chunks(items: Sequence, size: int) -> list[list]:
    """``items`` in consecutive lists of at most ``size`` (at least 1)."""
    size = max(1, int(size))
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


@dataclass
class Selection(Generic[Candidate]):
    """The kept candidate of one lesion, its draw, the rounds sampled, its agreement (None when not judged) and
    one record per candidate (draw, round, seed, agreement, kept)."""

    kept: Candidate
    draw: int
    tries: int = 1
    agreement: Agreement | None = None
    records: list[dict] = field(default_factory=list)


def candidate_record(draw: int, round_index: int, seed: int, agreement: Agreement) -> dict:
    """The report entry of one candidate."""
    return {"draw": draw, "round": round_index, "seed": int(seed), "agree": list(agreement.agree),
            "disagree": list(agreement.disagree), "failing": list(agreement.failing),
            "hu_error": None if agreement.hu_error is None else round(float(agreement.hu_error), 2),
            "kept": False}


def select(draw: Callable[[list[int]], list[Candidate]], judge: Callable[[Candidate], Agreement] | None,
           seed_of: Callable[[Candidate], int], candidates: int = 1, resample_failed: int = 0) -> Selection:
    """Sample, judge and keep one candidate of a lesion (module docstring).

    ``draw(draws)`` samples the candidates of the given draw numbers (in that order; one batch where it can);
    ``judge(candidate)`` its :class:`Agreement`; ``seed_of(candidate)`` the seed recorded. Without a judge the
    lesion is sampled once (draw 0), as a run without candidates."""
    if judge is None:
        return Selection(draw([0])[0], 0)
    best = best_key = best_agreement = None
    records: list[dict] = []
    for round_index in range(1 + int(resample_failed)):
        numbers = list(range(round_index * candidates, (round_index + 1) * candidates))
        for number, candidate in zip(numbers, draw(numbers)):
            agreement = judge(candidate)
            records.append(candidate_record(number, round_index, seed_of(candidate), agreement))
            key = rank_key(agreement, number)
            if best_key is None or key < best_key:
                best, best_key, best_agreement = candidate, key, agreement
        if best_agreement.passed:
            break
    kept_draw = best_key[-1]
    for record in records:
        record["kept"] = record["draw"] == kept_draw
    return Selection(best, kept_draw, round_index + 1, best_agreement, records)


def record_selection(record: LesionResult, selection: Selection) -> LesionResult:
    """``record`` with the rounds, every candidate's record and the kept one's disagreeing attributes; returns it."""
    record.tries, record.candidates = selection.tries, selection.records
    record.disagree = [] if selection.agreement is None else list(selection.agreement.disagree)
    return record
