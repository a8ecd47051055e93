"""The cases an unfinished run has done, so that a rerun after a crash redoes only the others.

While a run goes, every process records each case it finishes in ``<exp>/<stage>_progress/<row>.json`` with the
run's fingerprint (a hash of the model block and of the settings that change outputs). A rerun with the same
fingerprint keeps every recorded case that succeeded and whose output files still exist, and runs the rest;
records of another fingerprint are ignored. When a run completes, its report is written and the folder removed,
so the next run starts afresh (and, as always, writes new ``<stem>_<k>`` files next to the earlier ones).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ldm.fileio import write_json_atomic
from inference.cases import CaseSpec
from inference.results import CaseResult, LesionResult

# Settings that change no output file (a rerun may change them and still resume).
NEUTRAL_SETTINGS = ("progress", "device", "vq_device", "batch_size", "batch_memory_mb")


def run_fingerprint(model_block: Any, options: dict[str, Any]) -> str:
    """A hex digest of the model block (target, parameters, checkpoint path) and the output-changing settings."""
    settings = {key: value for key, value in options.items() if key not in NEUTRAL_SETTINGS}
    text = json.dumps({"model": model_block, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def result_from_record(record: dict[str, Any]) -> CaseResult:
    """A :class:`CaseResult` from its ``asdict`` form."""
    lesions = [LesionResult(**lesion) for lesion in record.get("lesions", [])]
    return CaseResult(**{**record, "lesions": lesions})


@dataclass(frozen=True)
class CaseJournal:
    """The progress folder of one stage of one experiment, for runs of one fingerprint (picklable)."""

    folder: Path
    fingerprint: str

    @classmethod
    def for_run(cls, exp_dir: Path, stage: str, fingerprint: str) -> "CaseJournal":
        return cls(Path(exp_dir) / f"{stage}_progress", fingerprint)

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.json"

    def record(self, result: CaseResult) -> None:
        """Record one finished case (atomically; any process may call this for its own cases)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path(result.index), {"fingerprint": self.fingerprint, "result": asdict(result)})

    def finished(self, cases: Sequence[CaseSpec]) -> dict[int, CaseResult]:
        """``{row: result}`` of the cases of ``cases`` a run of this fingerprint has done and whose outputs exist."""
        done = {}
        for case in cases:
            path = self._path(case.index)
            if not path.is_file():
                continue
            try:
                record = json.loads(path.read_text())
                result = result_from_record(record["result"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record cut short or from another version: redo the case
            if (record.get("fingerprint") == self.fingerprint and result.ok and result.case_id == case.case_id
                    and all(Path(output).is_file() for output in result.outputs.values())):
                done[case.index] = result
        return done

    def clear(self) -> None:
        """Remove the progress folder (the run is complete)."""
        shutil.rmtree(self.folder, ignore_errors=True)
