"""Best of K and resampling what fails (inference.candidates): the kept sample is the best-agreeing one by the
gate's checks (hand-computed rankings on candidates that differ by construction), resampling redoes only the
lesion that fails and records every seed, K = 1 is the run without candidates, and reruns are identical."""
import json

import numpy as np
import pytest
from scipy import ndimage
from test_inference_fixtures import inference_config, phantom_experiment, phantom_row, write_lists
from test_inference_phantoms import assets  # noqa: F401 - the fixture: phantoms and tiny random checkpoints

from ldm.data.attributes import read_report
from ldm.data.volume import read_label, read_volume, write_volume
from ldm.errors import ConfigError
from inference.candidates import Agreement, JudgedCase, rank_key, select
from inference.cli import build_parser, command_overrides
from inference.plan import lesion_seed
from inference.results import summary_lines
from inference.runner import run_inference
from quality.candidates import GateJudge, lesion_judge
from quality.gate import gate_stage
from quality.tolerances import Tolerances

LIVER = 5
BOX = (3, 4, 4)  # z, y, x voxels


def run(stage, assets, exp_dir, **inference):
    return run_inference(inference_config(stage, assets[stage], exp_dir, preview=False, **inference),
                         judge=lesion_judge, after_stage=gate_stage)


def fields(lesion):
    return {key: value for key, value in vars(lesion).items() if key != "seconds"}


def test_select_ranks_by_pass_then_agreement_then_hu_error_then_draw():
    table = {0: Agreement(("volume", "extent"), ("hu",), ("hu",), 5.0),      # fails
             1: Agreement(("a", "b", "c"), (), (), 30.0),
             2: Agreement(("a", "b", "c"), (), (), -10.0),                    # kept: |-10| is the smallest
             3: Agreement(("a", "b", "c"), (), (), 10.0),                     # same |error| as 2, later draw
             4: Agreement(("a", "b"), (), (), 0.0)}
    asked = []

    def draw(numbers):
        asked.append(numbers)
        return numbers

    selection = select(draw, table.__getitem__, lambda number: 100 + number, candidates=5, resample_failed=2)
    assert selection.kept == 2 and selection.tries == 1 and asked == [[0, 1, 2, 3, 4]]
    assert [record["seed"] for record in selection.records] == [100, 101, 102, 103, 104]
    assert [record["kept"] for record in selection.records] == [False, False, True, False, False]
    assert sorted(range(5), key=lambda n: rank_key(table[n], n)) == [2, 3, 1, 4, 0]


def test_select_resamples_in_rounds_until_one_passes_and_keeps_the_best_of_all():
    failing = Agreement((), ("density",), ("density",), 40.0)
    table = {0: failing, 1: Agreement(("hu",), ("density",), ("density",), 20.0), 2: failing, 3: failing,
             4: Agreement(("hu", "density"), (), (), 45.0), 5: failing, 6: failing}
    asked = []

    def draw(numbers):
        asked.append(numbers)
        return numbers

    selection = select(draw, table.__getitem__, lambda number: number, candidates=2, resample_failed=5)
    assert asked == [[0, 1], [2, 3], [4, 5]] and selection.kept == 4 and selection.tries == 3
    assert [record["round"] for record in selection.records] == [0, 0, 1, 1, 2, 2]
    asked.clear()
    never = select(draw, lambda number: table[number] if number != 4 else failing, lambda number: number,
                   candidates=2, resample_failed=2)
    assert asked == [[0, 1], [2, 3], [4, 5]] and never.kept == 1 and not never.agreement.passed
    assert select(draw, None, lambda number: number, candidates=4).kept == 0   # no judge: one draw


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre)) <= radius ** 2


def _judged(phantoms, case="case_000"):
    folder = phantoms / case
    ct, geometry = read_volume(folder / "healthy.nii.gz", dtype=np.float32)
    seg, _ = read_label(folder / "seg.nii.gz")
    return JudgedCase(ct, seg, read_report(folder / "type.json"), str(folder / "type.json"), geometry)


def test_linet_candidates_are_ranked_by_what_the_hu_show_as_computed_by_hand(assets):
    case = _judged(assets["phantoms"])
    # case_000's report: about 6 HU, hypodense fluid-like, homogeneous, well-defined; its liver is about 56 HU.
    assert "approximately 6 HU" in case.report[str(LIVER)][2]["CT value"]
    lesion = _ball(case.ct.shape, (21, 34, 18), 2.5)
    assert (case.seg[lesion] == LIVER).all()
    reference = float(np.median(case.ct[case.seg == LIVER]))
    values = [150.0, 52.0, 16.0, 2.0, 10.0]
    # By hand: CT value agrees when |value - 6| <= 50 HU; density when value - liver < -10 HU (hypodense); a
    # uniform lesion is homogeneous and sharp-edged (well-defined), except that an isodense one shows no margin
    # (n/a); no specific feature is asked for and one phase shows no enhancement (n/a).
    expected = []
    for value in values:
        isodense = abs(value - reference) <= 10
        verdicts = {"CT value": abs(value - 6) <= 50, "density": value - reference < -10,
                    "density variations": True, "surface characteristics": None if isodense else True}
        expected.append([name for name, agrees in verdicts.items() if agrees])
    assert expected[:2] == [["density variations", "surface characteristics"], ["CT value", "density variations"]]
    judge = GateJudge(Tolerances())
    images = []
    for value in values:
        image = case.ct.copy()
        image[lesion] = value
        images.append(image)
    selection = select(lambda numbers: [images[n] for n in numbers],
                       lambda image: judge("linet", case, image, lesion, lesion), lambda image: 0, candidates=5)
    assert [record["agree"] for record in selection.records] == expected
    assert [record["hu_error"] for record in selection.records] == [v - 6 for v in values]
    assert [record["failing"] for record in selection.records[:2]] == [["hu", "density"], ["density"]]
    assert selection.draw == 3    # 2 HU: full agreement, |error| 4 ties with 10 HU's, and comes first


def test_lmnet_candidates_are_ranked_on_what_a_mask_shows_as_computed_by_hand(assets):
    case = _judged(assets["phantoms"])
    drawn, _ = read_label(assets["phantoms"] / "case_000" / "label.nii.gz")
    fitting = drawn == 2                                     # the lesion the report's size was measured on
    shifted = np.roll(fitting, 30, axis=2)                   # the same lesion moved onto the spleen
    tiny = np.zeros_like(fitting)
    first = np.argwhere(fitting)[0]
    tiny[tuple(slice(c, c + 2) for c in first)] = True
    tiny &= fitting
    spleen = 1
    under = case.seg[shifted]
    assert np.bincount(under[under > 0]).argmax() == spleen and not (under == LIVER).any()
    candidates = [tiny, shifted, fitting, fitting.copy()]
    everything = ["lesion location", "size", "shape", "cavity", "relationship with adjacent organs", "inside_organ",
                  "volume", "components"]
    # By hand: the tiny part of the drawn lesion has its place and (nodular counts as round) shape but not its
    # size or volume; the shifted one has its size and shape but lies on the spleen, out of the liver (location, cavity, a close
    # organ, inside the liver); the drawn lesion agrees on all; its copy ties with it and comes later.
    expected = [[name for name in everything if name not in ("size", "volume")],
                ["size", "shape", "volume", "components"], everything, everything]
    judge = GateJudge(Tolerances())
    selection = select(lambda numbers: [candidates[n] for n in numbers],
                       lambda mask: judge("lmnet", case, case.ct, mask, mask), lambda mask: 0, candidates=4)
    assert [record["agree"] for record in selection.records] == expected
    assert selection.records[0]["failing"] == ["volume", "extent"]
    assert selection.draw == 2


def test_best_of_k_in_a_run_keeps_the_best_recorded_candidate_and_writes_it(assets):
    exp_dir = phantom_experiment(assets["root"] / "best_of_k", assets["phantoms"], cases=2)
    masks = run("lmnet", assets, exp_dir, candidates=3, min_fill=0.0)
    linet = run("linet", assets, exp_dir, candidates=3, resample_failed=1, quality_gate=True)
    rows = {}
    with open(exp_dir / "quality.csv") as handle:
        header = handle.readline().strip().split(",")
        for line in handle:
            row = dict(zip(header, line.strip().split(",")))
            rows[row["case"]] = row
    for result in [*masks.results, *linet.results]:
        stage = "lmnet" if result in masks.results else "linet"
        for lesion in result.lesions:
            records = lesion.candidates
            assert [r["draw"] for r in records] == list(range(len(records))) == list(range(3 * lesion.tries))
            # One attempt per draw (min_fill 0), so the seed of every draw is its first attempt's.
            assert [r["seed"] for r in records] == [lesion_seed(7, stage, result.index, lesion.rank, 0, r["draw"])
                                                    for r in records]
            kept = min(records, key=lambda r: rank_key(Agreement(tuple(r["agree"]), tuple(r["disagree"]),
                                                                 tuple(r["failing"]), r["hu_error"]), r["draw"]))
            assert kept["kept"] and sum(r["kept"] for r in records) == 1 and kept["seed"] == lesion.seed
            assert lesion.tries == 1 or not any(r["failing"] == [] for r in records[:-3])
    for result in linet.results:
        (lesion,) = result.lesions
        kept = next(r for r in lesion.candidates if r["kept"])
        # What the gate measured on the written file is the kept candidate (HU error within the int16 rounding).
        assert abs(float(rows[result.case_id]["hu_error"]) - kept["hu_error"]) < 0.6
    # The same seed and K: the same draws, the same choice, the same image.
    def image(result):
        return read_volume(result.outputs.get("image") or result.outputs["rejected_image"])[0]

    images = [image(result) for result in linet.results]
    again = run("linet", assets, exp_dir, candidates=3, resample_failed=1, quality_gate=True, overwrite=True)
    for first_run, second_run, first_image in zip(linet.results, again.results, images):
        assert [fields(lesion) for lesion in first_run.lesions] == [fields(lesion) for lesion in second_run.lesions]
        np.testing.assert_array_equal(image(second_run), first_image)
    # LMNet draws: each candidate's first attempt seeded from the run's seed, draw 0 as a run without candidates.
    first = masks.results[0].lesions[0].candidates
    assert first[0]["seed"] == lesion_seed(7, "lmnet", 0, 0)
    assert first[1]["seed"] == lesion_seed(7, "lmnet", 0, 0, 0, 1)


def _boxes(liver, count_inside, count_across):
    """Boxes of BOX voxels in the liver: ``count_inside`` wholly inside, ``count_across`` at most 35 % inside,
    every pair at least 3 voxels apart (scan order)."""
    chosen = {"inside": [], "across": []}
    for start in np.ndindex(*(n - b for n, b in zip(liver.shape, BOX))):
        box = tuple(slice(s, s + b) for s, b in zip(start, BOX))
        fraction = liver[box].mean()
        kind = "inside" if fraction == 1.0 else "across" if 0.2 <= fraction <= 0.35 else None
        wanted = count_inside if kind == "inside" else count_across
        if kind is None or len(chosen[kind]) >= wanted:
            continue
        if all(any(a.start >= b.stop + 3 or b.start >= a.stop + 3 for a, b in zip(box, other))
               for other in chosen["inside"] + chosen["across"]):
            chosen[kind].append(box)
    return chosen["inside"], chosen["across"]


@pytest.fixture(scope="module")
def two_boxes(assets):
    """An experiment whose case has one box inside the liver and one mostly outside it, with tolerances that
    pass any size: the second box fails inside_organ whatever LMNet samples, the first never fails."""
    exp_dir = assets["root"] / "two_boxes"
    row = phantom_row(exp_dir, assets["phantoms"], "case_000")
    seg, geometry = read_label(row["seg"])
    (inside,), (across,) = _boxes(seg == LIVER, 1, 1)
    boxes = np.zeros(seg.shape, dtype=np.uint8)
    boxes[inside] = boxes[across] = 2
    row["bbox"] = write_volume(exp_dir / "case_000" / "bbox.nii.gz", boxes, geometry, dtype=np.uint8)
    write_lists(exp_dir, [row])
    (exp_dir / "quality.toml").write_text("[tolerances]\nvolume_ratio = [0.0, 1000.0]\nextent_ratio = [0.0, 1000.0]\n"
                                          "fail_attributes = []\n")
    return exp_dir


def test_resampling_redoes_only_the_failed_lesion_and_records_every_seed(assets, two_boxes):
    exp_dir = two_boxes
    settings = dict(min_fill=0.0, min_component_voxels=1, overwrite=True)
    once = run("lmnet", assets, exp_dir, **settings).results[0]
    mask_once = read_label(once.outputs["mask"])[0]
    redone = run("lmnet", assets, exp_dir, resample_failed=2, **settings).results[0]
    assert once.ok and redone.ok, (once.error, redone.error)
    seg = read_label(assets["phantoms"] / "case_000" / "seg.nii.gz")[0]
    boxes, _ = ndimage.label(read_label(exp_dir / "case_000" / "bbox.nii.gz")[0] == 2)
    inside_box = next(boxes == index for index in (1, 2) if (seg[boxes == index] == LIVER).all())
    np.testing.assert_array_equal(read_label(redone.outputs["mask"])[0][inside_box], mask_once[inside_box])
    inside = {lesion.rank: "inside_organ" in lesion.candidates[0]["agree"] for lesion in redone.lesions}
    assert sorted(inside.values()) == [False, True]
    for before, after in zip(once.lesions, redone.lesions):
        if inside[after.rank]:   # passes at once: its one sample is the run's without resampling
            assert after.tries == 1 and len(after.candidates) == 1 and after.candidates[0]["failing"] == []
            assert fields(before) == {**fields(after), "candidates": [], "tries": 1}
        else:                    # fails whatever is sampled: 1 + 2 rounds, each seed recorded
            assert after.tries == 3 and "inside_organ" in after.disagree
            assert [r["seed"] for r in after.candidates] == [lesion_seed(7, "lmnet", 0, after.rank, 0, draw)
                                                             for draw in range(3)]
            assert all(r["failing"] == ["inside_organ"] for r in after.candidates)
    failing_rank = next(rank for rank, ok in inside.items() if not ok)
    lines = summary_lines([redone], "lmnet")
    assert any(line.startswith(f"    lesion {failing_rank}: 3 sample(s) in 3 round(s), seed ") and
               "inside_organ" in line.split("disagree: ")[1] for line in lines)
    report = json.loads((exp_dir / "lmnet_report.json").read_text())
    assert [lesion["candidates"] for lesion in report["cases"][0]["lesions"]] == \
        [lesion.candidates for lesion in redone.lesions]
    mask = read_label(redone.outputs["mask"])[0]
    rerun = run("lmnet", assets, exp_dir, resample_failed=2, **settings).results[0]
    np.testing.assert_array_equal(read_label(rerun.outputs["mask"])[0], mask)
    assert [fields(lesion) for lesion in rerun.lesions] == [fields(lesion) for lesion in redone.lesions]


def test_candidates_batched_equal_one_by_one_and_k1_is_the_run_without_candidates(assets, two_boxes):
    exp_dir = two_boxes
    settings = dict(min_fill=0.0, min_component_voxels=1, overwrite=True)
    outputs = {}
    for name, extra in (("plain", {}), ("k1", {"candidates": 1, "resample_failed": 0}),
                        ("k3", {"candidates": 3}), ("k3 batched", {"candidates": 3, "batch_size": 3})):
        result = run("lmnet", assets, exp_dir, **settings, **extra).results[0]
        outputs[name] = (read_label(result.outputs["mask"])[0], [fields(lesion) for lesion in result.lesions])
    np.testing.assert_array_equal(outputs["plain"][0], outputs["k1"][0])
    assert outputs["plain"][1] == outputs["k1"][1]
    assert [lesion["seed"] for lesion in outputs["plain"][1]] == [lesion_seed(7, "lmnet", 0, rank) for rank in (0, 1)]
    np.testing.assert_array_equal(outputs["k3"][0], outputs["k3 batched"][0])
    assert outputs["k3"][1] == outputs["k3 batched"][1]


def test_test_py_flags_set_the_options():
    args = build_parser().parse_args(["--base", "x.yaml", "--candidates", "4", "--resample-failed", "2"])
    assert {"inference.candidates=4", "inference.resample_failed=2"} <= set(command_overrides(args))


def test_candidates_without_a_judge_are_refused(assets, tmp_path):
    exp_dir = phantom_experiment(tmp_path / "exp", assets["phantoms"], cases=1)
    with pytest.raises(ConfigError, match="inference.candidates 2 .* no judge was given"):
        run_inference(inference_config("lmnet", assets["lmnet"], exp_dir, candidates=2))
    with pytest.raises(ConfigError, match="inference.candidates: must be an integer >= 1"):
        run_inference(inference_config("lmnet", assets["lmnet"], exp_dir, candidates=0), judge=lesion_judge)
