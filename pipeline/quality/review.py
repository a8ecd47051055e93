"""``EXP_DIR/review.html``: one self-contained static page to review a run (no server, nothing fetched).

Top: the run's counts, the per-attribute fidelity table (:mod:`quality.fidelity`) and its confusion matrices
(``fidelity.png``, embedded). Then one section per lesion: the before/after picture (axial slice through the
lesion, embedded PNG), the failed checks, and a table of every report attribute with the requested and measured
phrases side by side; a disagreement is marked (row class ``disagree``), an n/a gives its reason. Images are
``data:`` URIs, styles are inline: the file can be mailed or opened from any folder.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from ldm.fileio import write_text_atomic
from ldm.lesion import DISAGREE
from quality.evaluation import Evaluation
from quality.fidelity import fidelity
from quality.measure import LesionQuality

PAGE_NAME = "review.html"
STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f0f0f0}
tr.disagree td{background:#fde2e1}tr.disagree td.verdict{color:#b3261e;font-weight:bold}
tr.na td{color:#888}section.lesion{border-top:2px solid #ddd;margin-top:1.2em;padding-top:.6em}
.failed{color:#b3261e}.passed{color:#1a7f37}img{max-width:100%}"""


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fidelity_table(evaluation: Evaluation) -> str:
    rows = "".join(f"<tr><td>{html.escape(row.attribute)}</td><td>{row.judged}</td>"
                   f"<td>{'' if row.rate is None else f'{100 * row.rate:.0f} %'}</td><td>{row.disagree}</td>"
                   f"<td>{row.not_applicable}</td></tr>" for row in fidelity(evaluation.lesions))
    return ('<table id="fidelity"><tr><th>attribute</th><th>lesions judged</th><th>agreement</th>'
            f"<th>disagree</th><th>n/a</th></tr>{rows}</table>")


def _lesion_section(lesion: LesionQuality) -> str:
    status = ('<p class="passed">passed every check</p>' if lesion.passed else
              f'<p class="failed">failed: {html.escape(", ".join(lesion.failed_checks))}</p>')
    rows = []
    for verdict in lesion.attributes:
        kind = "disagree" if verdict.verdict == DISAGREE else ("na" if verdict.verdict == "n/a" else "agree")
        cells = (verdict.attribute, verdict.requested, verdict.measured)
        rows.append(f'<tr class="{kind}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + f'<td class="verdict">{html.escape(verdict.verdict)}</td><td>{html.escape(verdict.reason)}</td>'
                      "</tr>")
    table = ("<table><tr><th>attribute</th><th>requested</th><th>measured</th><th>verdict</th><th>why n/a</th></tr>"
             + "".join(rows) + "</table>") if rows else "<p>not described (no segmentation)</p>"
    picture = _image(lesion.preview_png, f"{lesion.case} lesion {lesion.lesion}") if lesion.preview_png else ""
    title = f"{lesion.case} · {Path(lesion.output).name} · lesion {lesion.lesion} ({lesion.organ})"
    return (f'<section class="lesion"><h3>{html.escape(title)}</h3>{status}{picture}'
            f"<p>interior mean {lesion.interior_mean_hu:.0f} HU, {lesion.voxels} voxels, "
            f"{lesion.volume_mm3:.0f} mm3</p>{table}</section>")


def review_html(evaluation: Evaluation, matrices_png: bytes | None) -> str:
    """The page (module docstring); ``matrices_png``: the bytes of ``fidelity.png`` (None: not drawn)."""
    lesions = evaluation.lesions
    passed = sum(lesion.passed for lesion in lesions)
    matrices = _image(matrices_png, "confusion matrices") if matrices_png else ""
    errors = "".join(f"<li>{html.escape(e.case_id)} {html.escape(e.output)}: {html.escape(e.error)}</li>"
                     for e in evaluation.errors)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>LesionDiffusion run review"
            f"</title><style>{STYLE}</style></head><body><h1>Run review</h1>"
            f"<p>{len(evaluation.outputs)} output(s), {len(lesions)} lesion(s), {passed} passed every check.</p>"
            + (f"<h2>Not evaluated</h2><ul>{errors}</ul>" if errors else "")
            + f"<h2>Fidelity per attribute</h2>{_fidelity_table(evaluation)}{matrices}<h2>Lesions</h2>"
            + "".join(_lesion_section(lesion) for lesion in lesions) + "</body></html>\n")


def write_review(exp_dir: Path, evaluation: Evaluation, matrices: Path | None = None) -> Path:
    """Write ``review.html`` into ``exp_dir``, embedding the confusion matrices ``matrices`` (``fidelity.png``)
    when given; returns its path."""
    return write_text_atomic(Path(exp_dir) / PAGE_NAME,
                             review_html(evaluation, Path(matrices).read_bytes() if matrices else None))
